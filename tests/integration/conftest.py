"""A live server for the integration tests.

By default the tests start the container's command (`python -m server`, see the Dockerfile's CMD) as a real
process on a free loopback port, on CPU, serving the shipped models in weights/. With SERVER_URL set
(e.g. `SERVER_URL=http://127.0.0.1:8000` for a container) they target that server instead and start
nothing; INTEGRATION_DEVICE=cuda starts the process on the GPU (fp16) instead of the CPU. Set
UNET_SERVER_API_KEY to the server's key if it has one (the started server then requires it too).

These tests are marked `integration` and are part of the default `make test` run."""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
# The shipped models; INTEGRATION_WEIGHTS_DIR points the started server at another weights dir instead.
WEIGHTS = Path(os.environ.get("INTEGRATION_WEIGHTS_DIR") or REPO / "weights")
# Checks of image content (not flat, control steers) hold for trained weights, not for random test folders.
TRAINED_WEIGHTS = not os.environ.get("INTEGRATION_WEIGHTS_DIR")
SHIPPED_MODELS = ("fashion-class", "fashion-text", "fashion-text-edges")
STARTUP_TIMEOUT_S = float(os.environ.get("INTEGRATION_STARTUP_TIMEOUT", "240"))
# Few steps keep CPU runs short; every request in these tests sets its own steps.
FAST_STEPS = 4

# The server the tests start: on CPU (CI) small batch buckets keep warm-up (every bucket, every model)
# quick; INTEGRATION_DEVICE=cuda starts it on the GPU in fp16 with the default buckets instead.
if os.environ.get("INTEGRATION_DEVICE", "cpu") == "cuda":
    LOCAL_ENV = {
        "UNET_SERVER_DEVICE": "cuda",
        "UNET_SERVER_DTYPE": "float16",
        "UNET_SERVER_LOG_LEVEL": "warning",
    }
else:
    LOCAL_ENV = {
        "UNET_SERVER_DEVICE": "cpu",
        "UNET_SERVER_DTYPE": "float32",
        "UNET_SERVER_MAX_BATCH_ROWS": "16",
        "UNET_SERVER_BATCH_BUCKETS": "4,8,16",
        "UNET_SERVER_LOG_LEVEL": "warning",
    }


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def container_command() -> list[str]:
    """The Dockerfile's CMD (exec form), with `python` as this interpreter."""
    for line in (REPO / "Dockerfile").read_text().splitlines():
        if line.startswith("CMD "):
            argv = json.loads(line[4:])
            assert argv[0] == "python", argv
            return [sys.executable, *argv[1:]]
    raise AssertionError("Dockerfile has no exec-form CMD")


def missing_shipped_models() -> list[str]:
    return [name for name in SHIPPED_MODELS if not (WEIGHTS / name / "unet_server.json").is_file()]


@dataclass
class Server:
    url: str
    headers: dict[str, str]
    log_path: Path | None = None
    process: subprocess.Popen | None = None
    models: dict[str, dict] = field(default_factory=dict)
    device: str = ""  # as /health/ready reports it, e.g. "cpu" or "cuda:0"
    # (GET /health/live status, GET /health/ready status) seen while waiting for readiness
    startup_health: list[tuple[int, int]] = field(default_factory=list)

    @property
    def exact(self) -> bool:
        """CPU fp32 is bit-exact: the same seed gives the same bytes, alone or batched."""
        return self.device == "cpu"

    def client(self, **kwargs: object) -> httpx.Client:
        timeout = kwargs.pop("timeout", 120)
        return httpx.Client(base_url=self.url, headers=self.headers, timeout=timeout, **kwargs)

    def log_tail(self, chars: int = 4000) -> str:
        if self.log_path is None or not self.log_path.exists():
            return "(server log not available: SERVER_URL mode)"
        return self.log_path.read_text(errors="replace")[-chars:]

    def model_with(self, what: str) -> dict:
        """The first served model that accepts `what` in {"class", "text", "control"}; fail if none."""
        for spec in self.models.values():
            cond = spec["conditioning"]
            accepts = {
                "class": bool(cond.get("classes")),
                "text": bool(cond.get("text")) and not cond.get("control"),
                "control": bool(cond.get("control")),
            }
            if accepts[what]:
                return spec
        pytest.fail(
            f"no served model accepts {what!r} conditioning (served: {sorted(self.models)}). The shipped "
            f"models {', '.join(SHIPPED_MODELS)} belong in weights/; missing: {missing_shipped_models()}"
        )


def _wait_ready(server: Server, deadline: float) -> None:
    last = "no answer"
    with httpx.Client(base_url=server.url, timeout=5) as client:
        while time.monotonic() < deadline:
            if server.process is not None and server.process.poll() is not None:
                pytest.fail(
                    f"server process exited with {server.process.returncode} before it was ready:\n"
                    f"{server.log_tail()}"
                )
            try:
                r = client.get("/health/ready")
                server.startup_health.append((client.get("/health/live").status_code, r.status_code))
                if r.status_code == 200:
                    server.device = r.json().get("device", "")
                    return
                last = f"{r.status_code} {r.text[:200]}"
            except httpx.TransportError as exc:
                last = repr(exc)
            time.sleep(0.5)
    pytest.fail(
        f"server at {server.url} not ready within {STARTUP_TIMEOUT_S:.0f}s (last: {last})\n"
        f"{server.log_tail()}"
    )


@pytest.fixture(scope="session")
def server() -> Iterator[Server]:
    api_key = os.environ.get("UNET_SERVER_API_KEY")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    url = os.environ.get("SERVER_URL")
    if url:
        srv = Server(url=url.rstrip("/"), headers=headers)
        _wait_ready(srv, time.monotonic() + STARTUP_TIMEOUT_S)
        srv.models = {m["id"]: m for m in httpx.get(f"{srv.url}/v1/models", headers=headers).json()["data"]}
        yield srv
        return

    missing = missing_shipped_models()
    if missing:
        pytest.fail(
            f"the shipped models {missing} are absent from {WEIGHTS} (each needs unet_server.json): the "
            "integration tests serve the shipped weights; train/export them (issue 5) or set SERVER_URL"
        )
    port = free_port()
    log_dir = Path(tempfile.mkdtemp(prefix="unet-server-it-"))
    log_path = log_dir / "server.log"
    # The server's settings come from LOCAL_ENV alone; the text encoder's folder override passes through.
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("UNET_SERVER_") or k == "UNET_SERVER_TEXT_ENCODER_DIR"}
    env.update(LOCAL_ENV, UNET_SERVER_WEIGHTS_DIR=str(WEIGHTS), PYTHONUNBUFFERED="1")
    if api_key:
        env["UNET_SERVER_API_KEY"] = api_key
    cmd = [*container_command(), "--host", "127.0.0.1", "--port", str(port)]
    with log_path.open("wb") as log:
        process = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    srv = Server(url=f"http://127.0.0.1:{port}", headers=headers, log_path=log_path, process=process)
    try:
        _wait_ready(srv, time.monotonic() + STARTUP_TIMEOUT_S)
        srv.models = {m["id"]: m for m in httpx.get(f"{srv.url}/v1/models", headers=headers).json()["data"]}
        yield srv
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


@pytest.fixture()
def client(server: Server) -> Iterator[httpx.Client]:
    with server.client() as c:
        yield c


def png_b64(image: object) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")  # type: ignore[attr-defined]
    return base64.b64encode(buf.getvalue()).decode()


def decode_png(data: bytes) -> object:
    from PIL import Image

    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"not a PNG: {data[:16]!r}"
    image = Image.open(io.BytesIO(data))
    image.load()
    return image
