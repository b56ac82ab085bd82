"""One broken model folder or a missing optional dependency: by default the server fails, naming every
broken model and the way out; with UNET_SERVER_SKIP_BROKEN_MODELS it serves the models that load and
reports the others (name + reason) in /health/ready and /v1/models."""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import pytest

from model.pipeline import load_pipelines
from tests.server.conftest import start_server


@pytest.fixture(scope="module")
def weights_with_broken(weights_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The three tiny models plus tiny-broken: tiny-class with a truncated safetensors file."""
    root = tmp_path_factory.mktemp("broken")
    for name in ("tiny-class", "tiny-text", "tiny-text-edges"):
        shutil.copytree(weights_dir / name, root / name)
    shutil.copytree(weights_dir / "tiny-class", root / "tiny-broken")
    weights = root / "tiny-broken" / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    return root


@pytest.fixture()
def no_transformers(monkeypatch: pytest.MonkeyPatch) -> None:
    """transformers not installed (the `text` extra left out): its import fails as it would then."""
    monkeypatch.setitem(sys.modules, "transformers", None)


def test_load_pipelines_collects_failures_per_model(weights_with_broken: Path, no_transformers: None) -> None:
    with pytest.raises(Exception, match="safetensors|transformers"):
        load_pipelines(weights_with_broken)  # default: the first failure raises, as before
    failures: dict[str, str] = {}
    pipelines = load_pipelines(weights_with_broken, failures=failures)
    assert sorted(pipelines) == ["tiny-class"]
    assert sorted(failures) == ["tiny-broken", "tiny-text", "tiny-text-edges"]
    assert "safetensors" in failures["tiny-broken"]
    assert "transformers" in failures["tiny-text"] and "unet-server[text]" in failures["tiny-text"]
    assert "tiny-text" in failures["tiny-text-edges"]  # its base model, named


def test_default_fails_naming_every_broken_model(weights_with_broken: Path) -> None:
    live = start_server(weights_with_broken, wait=False)
    try:
        with live.client() as c:
            deadline = time.monotonic() + 60
            while (r := c.get("/health/ready")).json()["status"] == "loading" and time.monotonic() < deadline:
                time.sleep(0.05)
            assert r.status_code == 503 and r.json()["status"] == "failed", r.text
            error = r.json()["error"]
            assert "tiny-broken" in error and "safetensors" in error
            assert "UNET_SERVER_SKIP_BROKEN_MODELS" in error
            assert "tiny-text:" not in error and "1 model(s) failed" in error  # the others loaded
    finally:
        live.stop()


def test_skip_serves_what_loads_and_reports_the_rest(
    weights_with_broken: Path, no_transformers: None
) -> None:
    live = start_server(weights_with_broken, skip_broken_models=True, text_encoder_loader=None)
    try:
        with live.client() as c:
            ready = c.get("/health/ready")
            assert ready.status_code == 200, ready.text
            assert ready.json()["models"] == ["tiny-class"]
            unavailable = {u["model"]: u["error"] for u in ready.json()["unavailable"]}
            assert sorted(unavailable) == ["tiny-broken", "tiny-text", "tiny-text-edges"]
            assert "transformers" in unavailable["tiny-text"]
            models = c.get("/v1/models").json()
            assert [m["id"] for m in models["data"]] == ["tiny-class"]
            assert {u["model"]: u["error"] for u in models["unavailable"]} == unavailable
            r = c.post("/generate", json={"model": "tiny-text", "prompt": "x", "num_inference_steps": 2})
            assert r.status_code == 422 and "unavailable" in r.text and "transformers" in r.text, r.text
            r = c.post("/generate", json={"model": "tiny-class", "class_label": 1, "num_inference_steps": 2})
            assert r.status_code == 200, r.text
    finally:
        live.stop()


def test_skip_with_nothing_loadable_fails(weights_with_broken: Path, tmp_path: Path) -> None:
    shutil.copytree(weights_with_broken / "tiny-broken", tmp_path / "tiny-broken")
    live = start_server(tmp_path, wait=False, skip_broken_models=True)
    try:
        with live.client() as c:
            deadline = time.monotonic() + 60
            while (r := c.get("/health/ready")).json()["status"] == "loading" and time.monotonic() < deadline:
                time.sleep(0.05)
            assert r.json()["status"] == "failed" and "tiny-broken" in r.json()["error"], r.text
    finally:
        live.stop()
