"""Worker-level tests on CPU: the graph-runner plumbing (GraphedDenoiser is eager on CPU), step results."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from server.schemas import ResolvedRequest
from server.worker import Worker
from tests.server.conftest import SIZE, FakeTextEncoder

BUCKETS = [4, 8, 16]


@pytest.fixture(scope="module")
def pipelines(weights_dir: Path) -> dict[str, Any]:
    from model.pipeline import load_pipelines

    return load_pipelines(weights_dir, device="cpu", dtype=torch.float32, text_encoder_loader=FakeTextEncoder)


def request(model: str, sampler: str, steps: int, seed: int, **kw: Any) -> ResolvedRequest:
    fields: dict[str, Any] = dict(
        model=model, prompt=None, negative_prompt=None, class_label=None, control=None, control_scale=1.0,
        num_inference_steps=steps, sampler=sampler, guidance_scale=1.0, seed=seed, num_images=1,
        width=SIZE, height=SIZE, guided=False,
    )
    fields.update(kw)
    return ResolvedRequest(**fields)


def control_map() -> np.ndarray:
    return np.eye(SIZE, dtype=np.float32)


# Rows of one batch key (the text U-Net): plain text, ControlNet rows, and edges rows without a map.
TEXT_REQUESTS = [
    request("tiny-text", "dpmpp_2m", 5, 1, prompt="a", guidance_scale=2.0, guided=True, num_images=2),
    request("tiny-text-edges", "flow_euler", 4, 2, prompt="b", control=control_map(), control_scale=0.7),
    request("tiny-text-edges", "euler_ancestral", 6, 3, prompt="c"),
    request("tiny-text", "flow_euler_maruyama", 3, 4, prompt="d"),
]
CLASS_REQUESTS = [
    request("tiny-class", "ddim", 4, 5, class_label=1, guidance_scale=2.5, guided=True),
    request("tiny-class", "euler", 5, 6, class_label=0),
    request("tiny-class", "dpmpp_2m", 6, 7, class_label=2, num_images=3),
    request("tiny-class", "DPM++ 2M Karras", 5, 8, class_label=0, num_images=2),
]


def run(worker: Worker, reqs: list[ResolvedRequest]) -> list[np.ndarray]:
    """Sample requests sharing forward passes: one joins per step (so rows sit at different steps, e.g.
    DPM++ first and second order in one pass), each leaves when done."""
    states = [worker.prepare(r) for r in reqs]
    waiting, live = list(range(len(reqs))), []
    while waiting or live:
        if waiting:
            live.append(waiting.pop(0))
        done = worker.step([states[i] for i in live])
        live = [i for i, d in zip(live, done, strict=True) if not d]
    return worker.images(states)


@pytest.mark.parametrize("reqs", [TEXT_REQUESTS, CLASS_REQUESTS], ids=["text+control", "class"])
def test_runner_path_matches_eager(pipelines: dict[str, Any], reqs: list[ResolvedRequest]) -> None:
    """The worker's runners for captured structures (forced on; GraphedDenoiser is eager on CPU) give the
    images of its uncaptured (eager) runners: copies of the outputs, with/without-control structures."""
    eager = Worker(pipelines, BUCKETS)
    eager.warmup()
    graphed = Worker(pipelines, BUCKETS)
    graphed.cuda_graphs = True  # CPU: the runners execute eagerly on the padded buckets
    graphed.warmup()
    edges = pipelines["tiny-text-edges"].denoiser
    assert (id(edges), (3, SIZE, SIZE), True) in graphed._captured
    assert (id(edges), (3, SIZE, SIZE), False) in graphed._captured
    assert len(graphed._captured) == 4  # class, text, edges with and without control
    other_size = graphed._runner(edges, torch.zeros(1, 3, 8, 8), None)  # not captured: the eager runner
    assert other_size is not graphed._graphs[id(edges)] and not other_size.uses_graphs(torch.device("cuda"))
    for a, b in zip(run(eager, reqs), run(graphed, reqs), strict=True):
        assert a.shape == b.shape
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


def test_batched_equals_alone_bytewise(pipelines: dict[str, Any]) -> None:
    worker = Worker(pipelines, BUCKETS)
    worker.warmup()
    for reqs in (TEXT_REQUESTS, CLASS_REQUESTS):
        together = run(worker, reqs)
        for r, img in zip(reqs, together, strict=True):
            assert np.array_equal(run(worker, [r])[0], img), r


def test_prompt_cache_counts_each_lookup_once(pipelines: dict[str, Any]) -> None:
    """Prompts encoded in a batch at admission and looked up again by ``prepare`` count once each: a miss
    when encoded, a hit when already cached (not a miss and then a hit for the same lookup)."""
    worker = Worker(pipelines, BUCKETS)
    reqs = [
        request("tiny-text", "flow_euler", 2, 1, prompt="a red bag", guidance_scale=2.0, guided=True),
        request("tiny-text", "flow_euler", 2, 2, prompt="a red bag"),
    ]  # three lookups: "a red bag", "" (negative), "a red bag"
    worker.encode_prompts(reqs)
    for r in reqs:
        worker.prepare(r)
    assert (worker.prompt_cache_misses, worker.prompt_cache_hits) == (2, 1)
    worker.encode_prompts(reqs[1:])
    worker.prepare(reqs[1])
    assert (worker.prompt_cache_misses, worker.prompt_cache_hits) == (2, 2)
