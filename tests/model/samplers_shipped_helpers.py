"""Sampling the shipped models with every listed sampler, and judging the images (issue 15).

`heun` on fashion-class (VP cosine schedule, σ_max ≈ 20,291) drew pure noise at 10–40 steps: σ-space Heun's
corrector over the first step multiplied the model's error by ~1,600 (model/samplers.py, Heun). The tests in
test_samplers_shipped_{class,text,edges}.py run each sampler of `list_samplers()` that
supports a model's schedule at the model's defaults (steps, guidance) on a few seeds — all of them packed
into one denoiser call per step, each row at its own σ, as in the server — and judge the images by

* the mean absolute pixel distance to a converged reference of the same seed (DPM++ 2M at 30 steps: within
  0.7/255 of 100 steps, and 100 steps within 0.4 of 200-step Euler), tight for the deterministic (ODE)
  samplers, loose for the SDE ones, whose image differs from the ODE one by design;
* the shipped classifier (weights/fashion-classifier) finding the requested garment, and on
  fashion-text-edges the image's edges following the control map (edge F1).

Control maps are the edges (training.data.edges, as in training) of the class model's reference images of
the same garments, so no dataset is needed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from model.denoiser import cfg_combine
from model.noise import RequestNoise
from model.samplers import Sampler, SamplerState, get_sampler, list_samplers

REPO = Path(__file__).resolve().parents[2]
WEIGHTS = Path(os.environ.get("SHIPPED_WEIGHTS_DIR", REPO / "weights"))
CLASSES = (1, 7, 8, 9)  # trouser, sneaker, bag, ankle boot: the class asked for with seed k is CLASSES[k]
REFERENCE = ("dpmpp_2m", 30)

needs_weights = pytest.mark.skipif(
    not (WEIGHTS / "fashion-class" / "unet_server.json").exists(), reason="weights not trained yet"
)


@dataclass
class Request:
    """One image: its sampler, its state and its conditioning row (the seed's index)."""

    sampler: Sampler
    state: SamplerState
    row: int


@torch.no_grad()
def run_packed(pipe: Any, jobs: list[tuple[str, int, int]], cond: dict) -> torch.Tensor:
    """Images in [0, 1] (len(jobs), C, H, W) for jobs (sampler name, steps, seed k); one call per step.

    `cond` holds the conditioning per seed k (class_labels (S,), context (S, L, D), control_cond
    (S, 1, H, W)) and the unconditional rows (null_label (1,), null_context (1, L, D)). Every live request
    adds its cond and uncond row at its own σ; guidance is the model's default.
    """
    d = pipe.defaults
    shape = (1, pipe.image_channels, d.height, d.width)
    requests = []
    for name, steps, k in jobs:
        sampler = get_sampler(name, pipe.schedule.kind)
        noise = RequestNoise(k)
        sigmas = sampler.make_sigmas(pipe.schedule, steps)
        requests.append(Request(sampler, sampler.init(noise.initial(shape), sigmas, noise), k))
    while live := [r for r in requests if not r.sampler.done(r.state)]:
        xs, sigmas = zip(*(r.sampler.next_input(r.state) for r in live), strict=True)
        x = torch.cat(xs)  # (N, C, H, W)
        sigma = torch.tensor(sigmas, dtype=torch.float64)  # (N,)
        rows = torch.tensor([r.row for r in live])
        kw: dict[str, Any] = {}
        if "class_labels" in cond:
            kw["class_labels"] = torch.cat([cond["class_labels"][rows], cond["null_label"].expand(len(live))])
        if "context" in cond:
            kw["context"] = torch.cat([cond["context"][rows], cond["null_context"].expand(len(live), -1, -1)])
        if "control_cond" in cond:
            control = cond["control_cond"][rows]  # (N, 1, H, W)
            kw |= {"control_cond": torch.cat([control, control]), "control_scale": 1.0}
        x0 = pipe.denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), **kw)  # (2N, C, H, W)
        denoised = cfg_combine(x0[: len(live)], x0[len(live) :], d.guidance_scale)
        for i, r in enumerate(live):
            r.sampler.advance(r.state, denoised[i : i + 1])
    out = torch.cat([r.sampler.result(r.state) for r in requests])  # (len(jobs), C, H, W)
    assert torch.isfinite(out).all()
    return ((out.float() + 1) / 2).clamp(0, 1)


Job = tuple[str, int, int]  # (sampler name, steps, seed k)


def run_unique(pipe: Any, jobs: list[Job], cond: dict) -> dict[Job, torch.Tensor]:
    """``run_packed`` over the distinct jobs, all in one packed run: {job: image (C, H, W)}.

    A (sampler, steps, seed) draws the same image whatever it is packed with (rows are independent), so
    tests that need it more than once sample it once.
    """
    unique = list(dict.fromkeys(jobs))
    return dict(zip(unique, run_packed(pipe, unique, cond), strict=True))


def listed_jobs(pipe: Any, seeds: int) -> list[Job]:
    """The reference's jobs, then every listed sampler's at the model's default steps (``judge_listed``)."""
    steps = pipe.defaults.num_inference_steps
    jobs = [(*REFERENCE, k) for k in range(seeds)]
    return jobs + [(s["name"], steps, k) for s in listed(pipe) for k in range(seeds)]


def distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean absolute pixel distance of two images, in 0–255 units."""
    return (a - b).abs().mean().item() * 255


def class_cond(pipe: Any, seeds: int) -> dict:
    return {
        "class_labels": torch.tensor(CLASSES[:seeds]),
        "null_label": torch.tensor([pipe.null_class_label]),
    }


def load(*names: str) -> dict[str, Any]:
    """Shipped pipelines on CPU in fp32, loaded as the server loads them."""
    from model.pipeline import load_pipelines

    return load_pipelines(WEIGHTS, names=list(names), device="cpu", dtype=torch.float32)


def load_judge() -> Any:
    from training import classifier

    return classifier.load(WEIGHTS / "fashion-classifier")


def text_cond(pipe: Any, seeds: int, control: torch.Tensor | None = None) -> dict:
    """Canonical prompts of CLASSES; `control` (S, 1, H, W) maps of the same garments, or None."""
    from training.captions import eval_prompt

    enc = pipe.text_encoder
    prompts = [eval_prompt(c, k * 3 % 12, 0) for k, c in enumerate(CLASSES[:seeds])]
    cond = {"context": enc.encode(prompts).float(), "null_context": enc.encode([""]).float()}
    if control is not None:
        cond["control_cond"] = control
    return cond


def listed(pipe: Any) -> list[dict]:
    """The server's sampler catalogue entries that support the model's schedule."""
    return [s for s in list_samplers() if pipe.schedule.kind in s["model_kinds"]]


def judge_listed(
    pipe: Any, judge: Any, cond: dict, seeds: int, sampled: dict[Job, torch.Tensor] | None = None
) -> tuple[list[str], list[str]]:
    """Run every listed sampler at the model's default steps; (failures, one line of measurements each).

    ODE samplers: every image within 8/255 of the reference; SDE samplers within 64/255 (an image of noise
    is ~170 away); the classifier agrees with the requested class on every seed; with a control map, the
    images' mean edge F1 against it ≥ 0.8. ``sampled``: ``run_unique``'s images of (at least)
    ``listed_jobs``, if the caller sampled them already.
    """
    from training.classifier import predict
    from training.data import edges
    from training.evaluate import edge_f1

    samplers = listed(pipe)
    jobs = listed_jobs(pipe, seeds)
    if sampled is None:
        sampled = run_unique(pipe, jobs, cond)
    images = torch.stack([sampled[j] for j in jobs])  # (seeds + len(samplers)·seeds, C, H, W)
    reference = images[:seeds]
    by_sampler = images[seeds:].reshape(len(samplers), seeds, *images.shape[1:])
    labels = torch.tensor(CLASSES[:seeds])
    assert (predict(judge, reference)[0] == labels).all(), "the reference images are not the requested class"
    failures, table = [], []
    for s, imgs in zip(samplers, by_sampler, strict=True):
        worst = max(distance(a, b) for a, b in zip(imgs, reference, strict=True))
        hits = int((predict(judge, imgs)[0] == labels).sum())
        line = f"{s['name']}: {worst:.1f}/255, class {hits}/{seeds}"
        if worst >= (8.0 if s["kind"] == "ode" else 64.0):
            failures.append(f"{s['name']}: {worst:.1f}/255 from the reference")
        if hits < seeds:
            failures.append(f"{s['name']}: the classifier finds the class on {hits}/{seeds}")
        if "control_cond" in cond:
            f1 = edge_f1(edges(imgs), cond["control_cond"]).mean().item()
            line += f", edge F1 {f1:.2f}"
            if f1 < 0.8:
                failures.append(f"{s['name']}: edge F1 {f1:.2f}")
        table.append(line)
    return failures, table
