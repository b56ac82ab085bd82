"""Stable Diffusion pipeline folders through the real server process (`python -m server`, CPU): a standard
diffusers folder with no metadata of ours, and the same folder as a hub id from a laid-out cache;
/generate, jobs and the OpenAI route; 16 concurrent mixed requests give the bytes they give one at a time."""

from __future__ import annotations

import asyncio
import base64
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.model.sd_helpers import build_tiny_sd
from tests.model.test_hub import lay_out_cache
from tests.server.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.timeout(300)

HUB_ID = "tiny-org/tiny-sd"
SERVER = {
    "UNET_SERVER_MAX_BATCH_ROWS": "16", "UNET_SERVER_BATCH_BUCKETS": "4,8,16", "UNET_SERVER_MAX_IMAGES": "4",
    "UNET_SERVER_DEVICE": "cpu", "UNET_SERVER_LOG_LEVEL": "warning",
}  # fmt: skip


class ServerProcess:
    """``python -m server`` on a free loopback port (the container's command), stopped with SIGTERM."""

    def __init__(self, weights: Path, models: str, wait: bool = True, **env: str) -> None:
        self.url = f"http://127.0.0.1:{free_port()}"
        paths = {"UNET_SERVER_WEIGHTS_DIR": str(weights), "UNET_SERVER_MODELS": models}
        full_env = {**os.environ, **SERVER, **paths, **env}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "server", "--host", "127.0.0.1", "--port", self.url.rsplit(":", 1)[1]],
            cwd=ROOT, env=full_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        deadline = time.monotonic() + 180
        while wait:
            assert self.proc.poll() is None, self.proc.stderr.read().decode() if self.proc.stderr else ""
            try:
                if httpx.get(self.url + "/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "not ready"
            time.sleep(0.1)

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=240)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def sd_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sd-weights")
    build_tiny_sd(root / "tiny-sd")
    assert not (root / "tiny-sd" / "unet_server.json").exists()  # a plain diffusers folder
    return root


@pytest.fixture(scope="module")
def sd(sd_root: Path) -> Any:
    server = ServerProcess(sd_root, "tiny-sd")
    yield server
    server.stop()


def png(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


def test_a_diffusers_folder_is_served_with_its_defaults(sd: ServerProcess) -> None:
    with sd.client() as c:
        (spec,) = c.get("/v1/models").json()["data"]
        assert spec["id"] == "tiny-sd" and spec["conditioning"]["text"] and spec["sample_size"] == 64
        d = spec["defaults"]
        assert (d["num_inference_steps"], d["guidance_scale"], d["width"], d["height"]) == (25, 7.5, 64, 64)
        r = c.post("/generate", json={"prompt": "a red bag", "seed": 3, "num_inference_steps": 4})
        assert r.status_code == 200, r.text
        image = png(r.json()["images"][0])
        assert image.shape == (64, 64, 3) and image.std() > 2  # a decoded RGB image, not a flat one
        assert r.json()["warnings"] == []
        # Larger than the model's native size is refused by default, naming the cap.
        r = c.post("/generate", json={"prompt": "a red bag", "width": 128})
        assert r.status_code == 422 and "native size" in r.text and "64" in r.text
        r = c.post("/generate", json={"prompt": "a red bag", "width": 60})
        assert r.status_code == 422 and "multiple of 8" in r.text


def test_long_prompt_is_truncated_and_the_response_says_so(sd: ServerProcess) -> None:
    with sd.client() as c:
        long = " ".join(["a very red leather bag"] * 30)  # far over 77 tokens
        r = c.post("/generate", json={"prompt": long, "seed": 1, "num_inference_steps": 2})
        assert r.status_code == 200, r.text
        assert any("prompt was truncated" in w and "77" in w for w in r.json()["warnings"])


async def _send(url: str, bodies: list[dict[str, Any]]) -> list[dict[str, Any]]:
    async with httpx.AsyncClient(base_url=url, timeout=240) as c:
        rs = await asyncio.gather(*(c.post("/generate", json=b) for b in bodies))
    assert all(r.status_code == 200 for r in rs), [r.text for r in rs if r.status_code != 200]
    return [r.json() for r in rs]


BODIES = [  # 8 requests, then the same 8 with other seeds (16 distinct)
    {"prompt": p, "seed": s, "sampler": sampler, "num_inference_steps": steps, **extra}
    for _ in range(2)
    for p, s, sampler, steps, extra in [
        ("a red bag", 1, "ddim", 3, {}),
        ("a blue coat", 2, "euler", 4, {}),
        ("a green shoe", 3, "dpmpp_2m", 5, {"negative_prompt": "red"}),
        ("a yellow dress", 4, "euler_ancestral", 3, {}),
        ("a black hat", 5, "heun", 2, {}),
        ("a white shirt", 6, "dpmpp_2m", 4, {"guidance_scale": 1}),
        ("a red bag", 7, "ddim", 6, {"num_images": 2}),
        ("a grey sock", 8, "euler", 3, {"guidance_scale": 3}),
    ]
]
for i, body in enumerate(BODIES[8:]):
    body["seed"] += 100 + i


def test_concurrent_mixed_requests_match_one_at_a_time(sd: ServerProcess) -> None:
    assert len({repr(sorted(b.items())) for b in BODIES}) == 16  # 16 distinct requests
    together = asyncio.run(_send(sd.url, BODIES))
    with sd.client() as c:
        text = c.get("/metrics").text
    assert 'unet_server_prompt_cache_total{result="hit"}' in text
    alone = [asyncio.run(_send(sd.url, [b]))[0] for b in BODIES]
    for a, b, body in zip(together, alone, BODIES, strict=True):
        assert a["images"] == b["images"], f"batched result differs for {body}"


def test_jobs_and_the_openai_route(sd: ServerProcess) -> None:
    with sd.client() as c:
        job = c.post("/v1/jobs", json={"prompt": "a red bag", "seed": 9, "num_inference_steps": 3}).json()
        for _ in range(600):
            info = c.get(f"/v1/jobs/{job['id']}").json()
            if info["status"] == "completed":
                break
            asyncio.run(asyncio.sleep(0.05))
        assert info["status"] == "completed" and info["step"] == 3
        direct = c.post("/generate", json={"prompt": "a red bag", "seed": 9, "num_inference_steps": 3}).json()
        assert info["result"]["images"] == direct["images"]
        r = c.post("/v1/images/generations", json={"prompt": "a red bag", "n": 2, "size": "64x64",
                                                   "response_format": "b64_json"})  # fmt: skip
        assert r.status_code == 200 and len(r.json()["data"]) == 2


def test_a_hub_id_from_a_laid_out_cache(sd: ServerProcess, sd_root: Path, tmp_path: Path) -> None:
    cache = tmp_path / "hub"
    lay_out_cache(cache, HUB_ID, sd_root / "tiny-sd")
    (tmp_path / "empty").mkdir()
    server = ServerProcess(tmp_path / "empty", HUB_ID, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1")
    try:
        with server.client() as c:
            assert [m["id"] for m in c.get("/v1/models").json()["data"]] == [HUB_ID]
            r = c.post("/generate", json={"model": HUB_ID, "prompt": "a red bag", "seed": 3,
                                          "num_inference_steps": 4})  # fmt: skip
            assert r.status_code == 200, r.text
    finally:
        server.stop()
    # The same weights as the folder: the same image.
    with sd.client() as c:
        same = c.post("/generate", json={"prompt": "a red bag", "seed": 3, "num_inference_steps": 4})
    assert png(same.json()["images"][0]).tobytes() == png(r.json()["images"][0]).tobytes()


def test_a_hub_id_missing_offline_fails_readiness_clearly(tmp_path: Path) -> None:
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    server = ServerProcess(tmp_path, "tiny-org/absent", wait=False, **env)
    try:
        with server.client() as c:
            for _ in range(1200):
                try:
                    r = c.get("/health/ready")
                except httpx.TransportError:  # not listening yet
                    time.sleep(0.1)
                    continue
                if r.json()["status"] == "failed":
                    break
                asyncio.run(asyncio.sleep(0.05))
            assert r.status_code == 503 and "tiny-org/absent" in r.json()["error"]
            assert "HF_HUB_OFFLINE" in r.json()["error"]
    finally:
        server.stop()
