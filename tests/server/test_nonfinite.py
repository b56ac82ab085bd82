"""Non-finite model output never becomes an image: the request fails with a 500 that says so (with an error
id), a metric counts it, and other requests in the same forward passes are untouched."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from server.lifecycle import RequestManager, Task
from tests.server.conftest import start_server
from tests.server.test_readback import (
    finish,
    pipelines,
    reference_pngs,
    request,
    submit_together,
    with_engine,
)

__all__ = ["pipelines"]  # the fixture, re-used

pytestmark = pytest.mark.timeout(120)


def test_nan_weights_give_a_500_not_a_black_png(weights_dir: Path, tmp_path: Path) -> None:
    """A model whose every output is NaN (a NaN in conv_out): 500 naming the cause, counted per model."""
    root = tmp_path / "weights"
    shutil.copytree(weights_dir / "tiny-class", root / "tiny-class")
    path = root / "tiny-class" / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(path)
    tensors["conv_out.bias"] = torch.full_like(tensors["conv_out.bias"], float("nan"))
    save_file(tensors, path)
    server = start_server(root, models=["tiny-class"], batch_buckets=[4], max_batch_rows=4)
    try:
        with server.client() as c:
            for seed in range(2):
                r = c.post("/generate", json={"class_label": 0, "num_inference_steps": 3, "seed": seed})
                assert r.status_code == 500, r.text
                body = r.json()
                assert "non-finite" in body["detail"] and body["error_id"] in body["detail"]
                assert "Traceback" not in r.text
            metrics = c.get("/metrics").text
            line = 'unet_server_nonfinite_outputs_total{model="tiny-class"} 2.0'
            assert line in metrics
    finally:
        server.stop()


def test_nan_in_one_request_leaves_its_batch_mates_alone(pipelines: dict[str, Any]) -> None:
    """Mid-sampling NaN (e.g. fp16 overflow) in the rows of one request (class 2) at its second step; the
    class-0 request sharing every pass completes with exactly the images it gets alone."""
    bad_req, good_req = request(4, seed=5, label=2), request(4, seed=6, label=0)
    tasks: list[Task] = []

    async def body(engine: RequestManager, core: Any) -> None:
        worker = core.worker
        real_forward = worker._forward
        calls = [0]

        def forward(denoiser: Any, x: torch.Tensor, sigma: Any, labels: Any, *rest: Any, **kw: Any) -> Any:
            out = real_forward(denoiser, x, sigma, labels, *rest, **kw)
            calls[0] += 1
            if calls[0] == 2:
                out = torch.where((labels == 2)[:, None, None, None], float("nan"), out)
            return out

        worker._forward = forward
        tasks.extend(submit_together(engine, [bad_req, good_req]))
        await finish(*tasks)
        assert list(core.scheduler.history)[0].ids == [t.id for t in tasks]  # they shared the first pass

    engine = asyncio.run(with_engine(pipelines, body))
    bad, good = tasks
    assert bad.status == "failed" and bad.error_status == 500 and bad.pngs is None
    assert "non-finite" in (bad.error_message or "") and bad.error_id
    assert good.status == "completed" and good.pngs == reference_pngs(pipelines, good_req)
    registry = engine.metrics.registry
    assert registry.get_sample_value("unet_server_nonfinite_outputs_total", {"model": "tiny-class"}) == 1
