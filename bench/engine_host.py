"""Host cost of one engine step: the server's ``Worker.step`` over N requests vs one sampler state for all.

    python -m bench.engine_host --out $OUT                 # CUDA: shipped fashion-class, real U-Net + graphs
    python -m bench.engine_host --device cpu --null-denoiser

Every request is one guided image (2 rows), DPM++2M, 20 steps, all requests in flight together. Rows:
- ``worker``: ``server.worker.Worker.step`` as the engine calls it (gather, pack, forward, guidance,
  sampler update), ``ms/step host`` = time until the step returns (no device sync inside), ``ms/step wall``
  = 20 steps with a sync at the end, divided by 20;
- ``vectorised loop`` (the baseline): the same denoiser and sampler with one ``SamplerState`` holding all N
  images, i.e. no per-request work at all — the floor for the worker's host cost.

``--null-denoiser`` replaces the U-Net call with one elementwise op, so the table shows the host work of
the step itself (what bounds the server when the forward pass is short).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from bench import common
from model.noise import RequestNoise
from model.samplers import get_sampler
from server.schemas import ResolvedRequest
from server.worker import Worker

STEPS = 20
GUIDANCE = 5.0


class NullDenoiser:
    """Stands in for the denoiser: x0 = x / 2 (one kernel), same call signature."""

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **_: Any) -> torch.Tensor:
        return x.float() * 0.5


def requests(n: int, model: str, label: int) -> list[ResolvedRequest]:
    return [
        ResolvedRequest(
            model=model,
            prompt=None,
            negative_prompt=None,
            class_label=(label + i) % 10,
            control=None,
            control_scale=1.0,
            num_inference_steps=STEPS,
            sampler="dpmpp_2m",
            guidance_scale=GUIDANCE,
            seed=i,
            num_images=1,
            width=32,
            height=32,
            guided=True,
        )
        for i in range(n)
    ]


def time_worker(worker: Worker, reqs: list[ResolvedRequest], device: torch.device) -> tuple[float, float]:
    states = [worker.prepare(r) for r in reqs]
    common.sync(device)
    host = 0.0
    t_wall = time.perf_counter()
    for _ in range(STEPS):
        t0 = time.perf_counter()
        worker.step(states)
        host += time.perf_counter() - t0
    worker.images(states)  # reads back: waits for every step
    wall = time.perf_counter() - t_wall
    return 1e3 * host / STEPS, 1e3 * wall / STEPS


def time_vectorised(worker: Worker, reqs: list[ResolvedRequest], device: torch.device) -> tuple[float, float]:
    p = worker.pipelines[reqs[0].model]
    sampler = get_sampler("dpmpp_2m", p.schedule.kind)
    sigmas = sampler.make_sigmas(p.schedule, STEPS)
    noise = torch.cat([RequestNoise(r.seed).initial((1, 1, 32, 32), device) for r in reqs])
    st = sampler.init(noise, sigmas)
    n = len(reqs)
    labels = torch.tensor([r.class_label for r in reqs] + [p.null_class_label] * n, device=device)
    g = torch.full((n, 1, 1, 1), GUIDANCE, device=device)
    runner = worker._graphs.get(id(p.denoiser)) if worker.cuda_graphs else None
    den = runner if runner is not None else p.denoiser
    common.sync(device)
    host = 0.0
    t_wall = time.perf_counter()
    for _ in range(STEPS):
        t0 = time.perf_counter()
        x, sigma = sampler.next_input(st)
        x2 = torch.cat([x, x])
        s = torch.full((2 * n,), sigma, dtype=torch.float64, device=device)
        out = den(x2, s, class_labels=labels)
        sampler.advance(st, torch.lerp(out[n:], out[:n], g))
        host += time.perf_counter() - t0
    st.x.cpu()
    wall = time.perf_counter() - t_wall
    return 1e3 * host / STEPS, 1e3 * wall / STEPS


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    common.add_common_args(parser)
    parser.add_argument(
        "--null-denoiser", action="store_true", help="replace the U-Net by one elementwise op"
    )
    parser.add_argument("--requests", default=None, help="comma-separated request counts (default 1,8,32,64)")
    args = parser.parse_args()
    device = common.pick_device(args.device)
    common.setup_torch(device)
    from model.pipeline import load_pipelines

    dtype = torch.float16 if device.type == "cuda" else torch.float32
    pipelines = load_pipelines(args.weights_dir, device=device, dtype=dtype, names=["fashion-class"])
    if args.null_denoiser:
        for p in pipelines.values():
            p.denoiser = NullDenoiser()
    counts = [int(c) for c in (args.requests or ("1,2,8" if args.quick else "1,8,32,64")).split(",")]
    worker = Worker(pipelines, buckets=common_buckets(max(counts) * 2))
    worker.warmup()
    info = common.env_info(device)
    report = common.Report("engine_host", info, args)
    rows = []
    for n in counts:
        reqs = requests(n, "fashion-class", 0)
        for name, fn in (("worker", time_worker), ("vectorised loop", time_vectorised)):
            fn(worker, reqs, device)  # warm
            host, wall = fn(worker, reqs, device)
            rows.append(
                {"requests": n, "rows": 2 * n, "path": name, "ms/step host": host, "ms/step wall": wall}
            )
        rows[-2]["host vs loop"] = rows[-2]["ms/step host"] / max(rows[-1]["ms/step host"], 1e-9)
    what = (
        "null denoiser"
        if args.null_denoiser
        else "fashion-class U-Net" + (" + CUDA graphs" if worker.cuda_graphs else "")
    )
    report.table(
        f"Engine step host cost, {what}, DPM++2M guided, 1 image per request",
        rows,
        ["requests", "rows", "path", "ms/step host", "ms/step wall", "host vs loop"],
    )
    report.save()
    report.print_all()


def common_buckets(max_rows: int) -> list[int]:
    from model.cuda_graphs import default_buckets

    return list(default_buckets(max_rows))


if __name__ == "__main__":
    main()
