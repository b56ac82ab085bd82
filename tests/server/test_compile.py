"""UNET_SERVER_COMPILE: parsed from env and flags, wired into loading, each distinct module compiled once.

CPU tests use a recording stand-in for torch.compile (no Inductor); the GPU test (`pytest -m gpu`) serves
the tiny models compiled and compares images with the uncompiled graphed server.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest
import torch

from server.__main__ import build_parser
from server.settings import Settings
from tests.server.conftest import FakeTextEncoder, start_server


def test_compile_setting_from_env_and_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("UNET_SERVER_COMPILE", raising=False)
    assert Settings().compile is False
    monkeypatch.setenv("UNET_SERVER_COMPILE", "1")
    assert Settings().compile is True
    monkeypatch.delenv("UNET_SERVER_COMPILE")
    args = vars(build_parser().parse_args(["--compile", "true"]))
    assert Settings(**{k: v for k, v in args.items() if v is not None}).compile is True


@pytest.fixture
def recorded_compile(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, dict[str, Any]]]:
    """torch.compile replaced by a recorder returning a real, lazy OptimizedModule (eager backend)."""
    import torch._dynamo.config as dynamo_config

    monkeypatch.setattr(dynamo_config, "recompile_limit", dynamo_config.recompile_limit)  # restored after
    real, calls = torch.compile, []

    def record(module: Any, **kwargs: Any) -> Any:
        calls.append((module, kwargs))
        return real(module, backend="eager")

    monkeypatch.setattr(torch, "compile", record)
    return calls


def test_each_distinct_module_compiled_once_and_sharing_kept(
    weights_dir: Path, recorded_compile: list
) -> None:
    from model.pipeline import compile_pipelines, load_pipelines

    pipelines = load_pipelines(weights_dir, text_encoder_loader=FakeTextEncoder)
    originals = {id(m): m for p in pipelines.values() for m in (p.unet, p.controlnet) if m is not None}
    assert len(originals) == 3  # tiny-class U-Net, tiny-text U-Net (shared with tiny-text-edges), ControlNet

    assert compile_pipelines(pipelines, torch.device("cpu")) == 0  # CPU: skipped
    assert recorded_compile == []

    # The CUDA branch (no tensor moves there, so a CPU-loaded pipeline can take it).
    assert compile_pipelines(pipelines, torch.device("cuda"), shapes_per_module=10) == 3
    assert sorted(id(m) for m, _ in recorded_compile) == sorted(originals)
    assert all(kw == {"mode": "default", "dynamic": False} for _, kw in recorded_compile)
    text, edges = pipelines["tiny-text"], pipelines["tiny-text-edges"]
    assert edges.unet is text.unet  # still one instance: rows of both batch together
    for p in pipelines.values():
        assert isinstance(p.unet, torch._dynamo.eval_frame.OptimizedModule)
        assert p.denoiser.unet is p.unet and p.denoiser.controlnet is p.controlnet
        # What the rest of the code reads passes through to the original module.
        orig = p.unet._orig_mod
        assert p.unet.config is orig.config and p.unet.dtype == orig.dtype == p.dtype
        assert p.device == torch.device("cpu") and p.size_multiple == 2
    assert isinstance(edges.controlnet, torch._dynamo.eval_frame.OptimizedModule)
    assert torch._dynamo.config.recompile_limit >= 30


def test_server_wires_the_setting_and_skips_on_cpu(
    weights_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import model.pipeline

    seen, real = [], model.pipeline.compile_pipelines

    def spy(pipelines: Any, device: torch.device, **kwargs: Any) -> int:
        seen.append((sorted(pipelines), device.type, kwargs))
        return real(pipelines, device, **kwargs)

    monkeypatch.setattr(model.pipeline, "compile_pipelines", spy)
    caplog.set_level(logging.INFO, logger="model.pipeline")
    server = start_server(
        weights_dir, compile=True, models=["tiny-class"], batch_buckets=[4, 8], max_batch_rows=8
    )
    try:
        assert seen == [(["tiny-class"], "cpu", {"shapes_per_module": 4})]
        assert "compile: skipped on cpu" in caplog.text
        p = server.core.worker.pipelines["tiny-class"]
        assert not isinstance(p.unet, torch._dynamo.eval_frame.OptimizedModule)
        with server.client() as c:
            assert c.post("/generate", json={"class_label": 1, "seed": 1}).status_code == 200
    finally:
        server.stop()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_server_matches_uncompiled(weights_dir: Path) -> None:
    from tests.server.test_batching import _send_all
    from tests.server.test_cuda_graphs_server import (
        STABLE,
        all_graphs_captured,
        assert_close_images,
        cuda_server,
    )

    compiled = cuda_server(weights_dir, compile=True, wait=False)
    try:
        compiled.wait_ready(timeout=900)  # warm-up compiles every bucket before ready
        all_graphs_captured(compiled)
        for p in compiled.core.worker.pipelines.values():
            assert isinstance(p.unet, torch._dynamo.eval_frame.OptimizedModule)
        stats = torch._dynamo.utils.counters["stats"]
        frames = stats["unique_graphs"]
        got = [asyncio.run(_send_all(compiled.url, [req]))[0] for req in STABLE]
        assert stats["unique_graphs"] == frames  # nothing compiled on the hot path
    finally:
        compiled.stop()
        torch.compiler.set_stance("default")  # the server left eager_on_recompile (process-wide)
    reference = cuda_server(weights_dir)
    try:
        for req, a in zip(STABLE, got, strict=True):
            b = asyncio.run(_send_all(reference.url, [req]))[0]
            assert_close_images(a, b, f"compiled vs uncompiled, {req}")
    finally:
        reference.stop()
