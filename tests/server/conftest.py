"""Tiny model folders built at test time, and the real app served by uvicorn on a free port."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from tests.fakes import TEXT_DIM, TEXT_LEN, FakeTextEncoder  # noqa: F401 — re-exported for the tests

SIZE = 16
CLASS_NAMES = ["shirt", "sneaker", "bag"]


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))


def build_model_folders(root: Path) -> Path:
    """tiny-class (VP, 1 channel, 3 classes + null), tiny-text (flow, 3 channels), tiny-text-edges."""
    from model import ControlNet, UNet, UNetConfig, save_pretrained

    torch.manual_seed(0)
    class_cfg = UNetConfig.from_dict({
        "_class_name": "UNet2DModel",
        "sample_size": SIZE,
        "in_channels": 1,
        "out_channels": 1,
        "block_out_channels": [8, 16],
        "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
        "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
        "layers_per_block": 1,
        "norm_num_groups": 4,
        "attention_head_dim": 8,
        "num_class_embeds": len(CLASS_NAMES) + 1,
    })
    save_pretrained(UNet(class_cfg), root / "tiny-class" / "unet")
    # clip_sample: a random tiny U-Net's x0 estimate at the cosine schedule's σ_max (~20,000) is ~1e5; the
    # next step's fp16 U-Net then overflows to NaN (on CUDA, where tests run fp16). Clipping x0 to [-1, 1],
    # as DDIM configs may, keeps these random weights' images finite, so GPU tests compare real pixels.
    _write_json(root / "tiny-class" / "scheduler" / "scheduler_config.json", {
        "_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2",
        "prediction_type": "epsilon", "timestep_spacing": "trailing", "clip_sample": True,
    })
    _write_json(root / "tiny-class" / "unet_server.json", {
        "kind": "class", "base_model": None, "class_names": CLASS_NAMES, "null_class_label": len(CLASS_NAMES),
        "text_encoder": None, "control": None, "image_channels": 1, "sample_size": SIZE,
        "defaults": {"sampler": "ddim", "num_inference_steps": 4, "guidance_scale": 2.0,
                     "width": SIZE, "height": SIZE},
    })

    text_cfg = UNetConfig.from_dict({
        "_class_name": "UNet2DConditionModel",
        "sample_size": SIZE,
        "in_channels": 3,
        "out_channels": 3,
        "block_out_channels": [8, 16],
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
        "layers_per_block": 1,
        "norm_num_groups": 4,
        "attention_head_dim": 2,
        "cross_attention_dim": TEXT_DIM,
    })
    unet = UNet(text_cfg)
    save_pretrained(unet, root / "tiny-text" / "unet")
    flow = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 1.0}
    _write_json(root / "tiny-text" / "scheduler" / "scheduler_config.json", flow)
    text_meta = {
        "kind": "text", "base_model": None, "class_names": None, "null_class_label": None,
        "text_encoder": {"name": "fake", "max_length": TEXT_LEN}, "control": None, "image_channels": 3,
        "sample_size": SIZE,
        "defaults": {"sampler": "flow_euler", "num_inference_steps": 4, "guidance_scale": 3.0,
                     "width": SIZE, "height": SIZE},
    }
    _write_json(root / "tiny-text" / "unet_server.json", text_meta)

    controlnet = ControlNet.from_unet(unet, conditioning_channels=1, conditioning_embedding_out_channels=(8,))
    with torch.no_grad():  # from_unet zero-initialises the outputs; make control visibly matter
        for p in controlnet.parameters():
            if p.abs().sum() == 0 and p.dim() > 1:
                p.normal_(0, 0.2)
    save_pretrained(controlnet, root / "tiny-text-edges" / "controlnet")
    _write_json(root / "tiny-text-edges" / "unet_server.json", {
        **text_meta, "base_model": "tiny-text", "control": {"type": "edges", "channels": 1},
    })
    return root


@pytest.fixture(scope="session")
def weights_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_model_folders(tmp_path_factory.mktemp("weights"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LiveServer:
    url: str
    app: Any
    server: Any
    thread: threading.Thread

    @property
    def state(self) -> Any:
        return self.app.state.server

    @property
    def engine(self) -> Any:
        """The request manager (``server.lifecycle.RequestManager``) routes talk to."""
        return self.state.engine

    @property
    def core(self) -> Any:
        """The engine core (``server.core.EngineCore``; thread mode only: it lives in this process)."""
        return self.state.client.core

    def wait_idle(self, timeout: float = 30.0) -> None:
        """Until no request is in flight on either side and the core has no turn in progress."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.engine.idle and self.core.idle:
                return
            time.sleep(0.005)
        raise TimeoutError("the engine did not become idle")

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=kwargs.pop("timeout", 60.0), **kwargs)

    def wait_ready(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        with self.client() as c:
            while time.monotonic() < deadline and not self.state.load_error:
                try:
                    if c.get("/health/ready").status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                time.sleep(0.02)
        raise TimeoutError(f"server not ready: {self.state.load_error}")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def start_server(
    weights: Path, wait: bool = True, text_encoder_loader: Any = "fake", **overrides: Any
) -> LiveServer:
    import uvicorn

    from server.app import create_app
    from server.settings import Settings

    options: dict[str, Any] = {
        "weights_dir": weights,
        "device": "cpu",
        "max_batch_rows": 32,
        "batch_buckets": [4, 8, 16, 32],
        "max_queue_size": 64,
        "max_image_size": 32,
        "max_images": 4,
        "max_inference_steps": 2000,
        "max_control_image_bytes": 20_000,
        "max_control_image_pixels": 64 * 64,
        "engine_mode": "thread",  # tests inspect engine internals; test_engine_process covers "process"
    }
    options.update(overrides)
    loader = FakeTextEncoder if text_encoder_loader == "fake" else text_encoder_loader  # None: the real one
    app = create_app(Settings(**options), text_encoder_loader=loader)
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    live = LiveServer(url=f"http://127.0.0.1:{port}", app=app, server=server, thread=thread)
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    if wait:
        live.wait_ready()
    return live


@pytest.fixture(scope="session")
def live(weights_dir: Path) -> Iterator[LiveServer]:
    """The shared server: all three tiny models, CPU, buckets 4..32."""
    server = start_server(weights_dir)
    yield server
    server.stop()


@pytest.fixture
def client(live: LiveServer) -> Iterator[httpx.Client]:
    with live.client() as c:
        yield c
