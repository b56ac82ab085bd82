"""`pip install .` (not editable) serves the shipped models out of the box: the wheel carries the served
weights, the playground and the /docs assets, and the console entry point finds them from any directory."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.server.conftest import free_port

REPO = Path(__file__).resolve().parents[2]
SHIPPED = ["fashion-class", "fashion-text", "fashion-text-edges"]


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project built as a wheel from a copy of what the Dockerfile copies (plus weights/) and installed
    into its own folder (dependencies come from this venv)."""
    tmp = tmp_path_factory.mktemp("installed")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("model", "server", "training", "weights"):
        shutil.copytree(REPO / name, src / name, ignore=ignore)
    target = tmp / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target",
         str(target), str(src)],
        check=True, capture_output=True, timeout=300,
    )
    return target


def _env(site: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("UNET_SERVER_")}
    env["PYTHONPATH"] = str(site)
    return env


def test_package_data_and_weights_are_found(installed: Path, tmp_path: Path) -> None:
    code = (
        "import json, server, model\n"
        "from server.loading import resolve_weights_dir\n"
        "from server.playground import ASSETS\n"
        "from server.routes import SWAGGER_DIR\n"
        "from server.settings import Settings\n"
        "from model.pipeline import list_models\n"
        "weights = resolve_weights_dir(Settings())\n"
        "print(json.dumps({'server': server.__file__, 'model': model.__file__, 'weights': str(weights),\n"
        "    'models': list_models(weights), 'assets': sorted(ASSETS),\n"
        "    'swagger': sorted(p.name for p in SWAGGER_DIR.iterdir()),\n"
        "    'loras': sorted(p.name for p in (weights / 'loras').glob('*.safetensors'))}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=_env(installed), capture_output=True, text=True,
        check=True, timeout=120,
    )
    found = json.loads(out.stdout.strip().splitlines()[-1])
    for key in ("server", "model", "weights"):
        assert found[key].startswith(str(installed)), found  # the installed copy, not the repository
    assert found["models"] == SHIPPED, found
    assert {"index.html", "playground.js", "playground.css"} <= set(found["assets"])
    assert {"swagger-ui-bundle.js", "swagger-ui.css", "LICENSE"} <= set(found["swagger"])
    assert found["loras"] == ["stripes.safetensors"], found  # the shipped adapter (README's LoRA section)


def test_installed_server_serves_the_shipped_models(installed: Path, tmp_path: Path) -> None:
    port = free_port()
    env = _env(installed)
    env.update(UNET_SERVER_DEVICE="cpu", UNET_SERVER_MAX_BATCH_ROWS="4", UNET_SERVER_BATCH_BUCKETS="4")
    proc = subprocess.Popen(
        [sys.executable, "-m", "server", "--port", str(port)], cwd=tmp_path, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as c:
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    if (r := c.get("/health/ready")).status_code == 200 or r.json()["status"] == "failed":
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.3)
            ready = c.get("/health/ready")
            assert ready.status_code == 200, ready.text
            assert [m["id"] for m in c.get("/v1/models").json()["data"]] == SHIPPED
            body = {"model": "fashion-text", "prompt": "a red sneaker", "seed": 1, "num_inference_steps": 2}
            assert c.post("/generate", json=body, timeout=60).status_code == 200
            assert c.get("/docs/static/swagger-ui-bundle.js").status_code == 200
            assert c.get("/").status_code == 200
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=60)
        if proc.returncode not in (0, -15):
            print(out[-3000:])
