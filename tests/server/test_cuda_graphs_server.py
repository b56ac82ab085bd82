"""The server on CUDA with CUDA graphs (GPU only: `pytest -m gpu`): every bucket captured before ready,
graphed results match eager ones, and batching changes results only within fp16 tolerance."""

from __future__ import annotations

import asyncio
import base64
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from server.imaging import from_png
from tests.server.conftest import LiveServer, start_server
from tests.server.test_api import edges, png_b64
from tests.server.test_batching import REQUESTS, _send_all

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

BUCKETS = [4, 8, 16]
# Heun's second evaluation makes these random-weight tiny models chaotic: a 1e-3 relative perturbation of
# every denoiser output flips half the pixels (measured on CPU). The other samplers move by about a level.
STABLE = [r for r in REQUESTS if r["sampler"] not in ("heun", "flow_heun")]


def cuda_server(weights_dir: Path, **overrides: Any) -> LiveServer:
    return start_server(weights_dir, device="cuda", max_batch_rows=16, batch_buckets=BUCKETS, **overrides)


@pytest.fixture(scope="module")
def graphed(weights_dir: Path) -> Iterator[LiveServer]:
    server = cuda_server(weights_dir)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def eager(weights_dir: Path) -> Iterator[LiveServer]:
    server = cuda_server(weights_dir, cuda_graphs=False)
    yield server
    server.stop()


def images(body: dict[str, Any]) -> list[np.ndarray]:
    return [from_png(base64.b64decode(s)).astype(np.int64) for s in body["images"]]


def assert_close_images(a: dict[str, Any], b: dict[str, Any], what: str) -> None:
    """fp16 tolerance on uint8 images: mean difference ≤ 3 levels, ≤ 1% of pixels off by more than 16."""
    assert a["seeds"] == b["seeds"]
    for x, y in zip(images(a), images(b), strict=True):
        d = np.abs(x - y)
        assert d.mean() <= 3 and (d > 16).mean() <= 0.01, f"{what}: mean {d.mean():.2f}, max {d.max()}"


def all_graphs_captured(server: LiveServer) -> None:
    worker = server.core.worker
    assert worker.cuda_graphs and worker._graphs
    for runner in worker._graphs.values():
        assert runner.captured() == BUCKETS
        for sig in runner._signatures.values():  # every structure (with/without control) in every bucket
            assert sorted(sig.buckets) == BUCKETS
            assert all(b.graph is not None for b in sig.buckets.values())


def test_ready_only_after_every_bucket_is_captured(
    weights_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import server.worker as worker_module

    started, release = threading.Event(), threading.Event()

    class HeldGraphedDenoiser(worker_module.GraphedDenoiser):
        def warmup(self, *args: Any, **kwargs: Any) -> None:
            started.set()
            release.wait(60)
            super().warmup(*args, **kwargs)

    monkeypatch.setattr(worker_module, "GraphedDenoiser", HeldGraphedDenoiser)
    server = cuda_server(weights_dir, wait=False, models=["tiny-text-edges"])
    try:
        assert started.wait(120), server.state.load_error
        with server.client() as c:
            assert c.get("/health/ready").status_code == 503  # capture under way
            release.set()
            server.wait_ready(timeout=120)
            all_graphs_captured(server)
            worker = server.core.worker
            # A ControlNet pipeline: captured with control and without (a batch with no control map).
            den = worker.pipelines["tiny-text-edges"].denoiser
            assert {k[2] for k in worker._captured if k[0] == id(den)} == {True, False}
            body = {"prompt": "a shoe", "seed": 3, "control_image": png_b64(edges())}
            assert c.post("/generate", json=body).status_code == 200
    finally:
        release.set()
        server.stop()


def test_graphs_on_the_shared_server(graphed: LiveServer, monkeypatch: pytest.MonkeyPatch) -> None:
    all_graphs_captured(graphed)
    assert graphed.core.worker.device.type == "cuda"
    from server.settings import Settings

    for name in ("UNET_SERVER_MAX_BATCH_ROWS", "UNET_SERVER_DEVICE", "UNET_SERVER_BATCH_BUCKETS"):
        monkeypatch.delenv(name, raising=False)
    assert Settings().batch_buckets == [4, 8, 16, 32, 64, 128]  # auto on a CUDA machine


def test_graphed_forward_matches_eager_denoiser(graphed: LiveServer) -> None:
    """Denoiser level, a mixed ControlNet batch of 5 rows (bucket 8): graph replay ≈ the eager Denoiser."""
    worker = graphed.core.worker
    p = worker.pipelines["tiny-text-edges"]
    g = torch.Generator().manual_seed(0)
    rows, size = 5, p.defaults.height
    x = (torch.randn(rows, 3, size, size, generator=g) * 2).cuda()
    sigma = torch.rand(rows, generator=g, dtype=torch.float64).cuda() * 0.9 + 0.05
    encoded = worker._encode(p, ["a", "b", "c", "d", "e"])  # per prompt: (context, truncated, pooled)
    context = torch.stack([c for c, _, _ in encoded])  # (rows, L, D)
    control = (torch.rand(rows, 1, size, size, generator=g) > 0.8).float().cuda()
    mask = torch.tensor([True, False, True, False, False])
    scale = torch.where(mask, 0.7, 0.0).cuda()
    assert worker._runner(p.denoiser, x, control) is not None
    # The worker gives rows without a control map scale 0 (no mask in the graph); the eager reference masks.
    out = worker._forward(p.denoiser, x, sigma, None, context, control, scale)
    ref = p.denoiser(x, sigma, context=context, control_cond=control, control_scale=scale, control_mask=mask)
    assert out.shape == ref.shape == (rows, 3, size, size) and torch.isfinite(out).all()
    assert ((out - ref).norm() / ref.norm()).item() < 2e-3
    # The result is a copy, not a view into the graph's static output (DPM++2M keeps it as history).
    again = worker._forward(p.denoiser, x * 0, sigma, None, context, control, scale)
    assert not torch.equal(out, again)
    assert ((out - ref).norm() / ref.norm()).item() < 2e-3


def test_graphed_images_match_eager(graphed: LiveServer, eager: LiveServer) -> None:
    for req in STABLE:
        a = asyncio.run(_send_all(graphed.url, [req]))[0]
        b = asyncio.run(_send_all(eager.url, [req]))[0]
        assert_close_images(a, b, f"graphed vs eager, {req}")


def test_batch_invariance_with_graphs(graphed: LiveServer) -> None:
    together = asyncio.run(_send_all(graphed.url, STABLE))
    plans = graphed.core.scheduler.history
    assert max(len(p.entries) for p in plans) > 3  # requests really shared passes
    for req, a in zip(STABLE, together, strict=True):
        alone = asyncio.run(_send_all(graphed.url, [req]))[0]
        assert_close_images(a, alone, f"batched vs alone, {req}")


def test_other_sizes_run_eagerly(graphed: LiveServer) -> None:
    """A size that was not captured runs eagerly (no capture on the hot path) and still works."""
    before = {k: list(v) for k, v in graphed.core.worker.captured_graphs().items()}
    captured = set(graphed.core.worker._captured)
    with graphed.client() as c:
        body = {"model": "tiny-text", "prompt": "x", "width": 8, "height": 24, "seed": 1}
        r = c.post("/generate", json=body)
        assert r.status_code == 200, r.text
    assert graphed.core.worker._captured == captured
    assert graphed.core.worker.captured_graphs() == before


@pytest.mark.parametrize("cuda_graphs", [True, False], ids=["graphs", "eager"])
def test_step_makes_no_host_syncs(weights_dir: Path, cuda_graphs: bool) -> None:
    """Every engine step on CUDA (σ, labels, noise, control scale in; sampler updates out) runs under
    torch.cuda.set_sync_debug_mode("error"): no .item(), nonzero, or blocking copy. Only the final read-back
    of the images synchronises (once for all requests)."""
    from model.pipeline import load_pipelines
    from server.worker import Worker
    from tests.server.conftest import FakeTextEncoder
    from tests.server.test_worker import CLASS_REQUESTS, TEXT_REQUESTS, run

    pipelines = load_pipelines(
        weights_dir, device="cuda", dtype=torch.float16, text_encoder_loader=FakeTextEncoder
    )
    worker = Worker(pipelines, BUCKETS, cuda_graphs=cuda_graphs)
    worker.warmup()
    step = worker.step

    def checked_step(states: Any) -> list[bool]:
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            return step(states)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    worker.step = checked_step  # type: ignore[method-assign]
    for reqs in (TEXT_REQUESTS, CLASS_REQUESTS):
        # run(): one request joins per step (mixed step kinds); prepare (prompt encoding) and the final
        # read-back may synchronise, every step must not.
        pixels = run(worker, reqs)
        assert [p.shape[0] for p in pixels] == [r.num_images for r in reqs]
        # A read-back before the copy finished gives all-zero images. (One tiny random ε-model request —
        # guided DDIM from σ_max ≈ 2e4 — legitimately saturates to a constant image in fp16.)
        assert sum(p.std() > 0 for p in pixels) >= len(pixels) - 1
