"""Sampling loop: images/s for 20 steps of DPM++2M with classifier-free guidance, ours vs diffusers.

    python -m bench.sampling_loop --out $OUT
    python -m bench.sampling_loop --device cpu --quick

Every forward pass carries cond + uncond rows (batch = 2 x images). Variants:
- ``diffusers loop``: what a diffusers pipeline does after text encoding — DPMSolverMultistepScheduler
  (dpmsolver++, order 2) + the diffusers U-Net, eager fp16 (SDPA), latents in fp16.
- ``ours eager/per-request``: our U-Net + model.denoiser + model.samplers, one sampler state per image,
  rows gathered and scattered every step the way the server's worker does it.
- ``ours graphs/per-request``: the same with the whole denoiser call (σ→t, c_in, U-Net, x0) in a CUDA graph
  per batch bucket (model.cuda_graphs) — the server's path.
- ``ours graphs/vectorised``: one sampler state holding all images: the per-request Python loop removed;
  the gap to the previous row is what vectorising the sampler update across requests would buy.
"""

from __future__ import annotations

import argparse
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from bench import common, models
from model.cuda_graphs import GraphedDenoiser, GraphedUNet

FULL_IMAGES = {"sd15": [1, 8], "small": [1, 8, 64, 128]}
QUICK_IMAGES = {"sd15": [1, 2], "small": [1, 3]}


def conditioning(case: models.Case, n: int, device, dtype) -> tuple[dict, dict]:
    """(cond, uncond) keyword inputs for n images: class labels + null label, or context + empty context."""
    g = torch.Generator().manual_seed(1)
    if case.context is not None:
        ctx = torch.randn(n, *case.context, generator=g).to(device, dtype)
        null = torch.randn(1, *case.context, generator=g).to(device, dtype).expand(n, -1, -1)
        return {"context": ctx}, {"context": null.contiguous()}
    if case.num_classes is not None:
        labels = torch.randint(0, case.num_classes - 1, (n,), generator=g).to(device)
        null = torch.full((n,), case.null_class if case.null_class is not None else case.num_classes - 1)
        return {"class_labels": labels}, {"class_labels": null.to(device)}
    return {}, {}


def cat_rows(a: dict, b: dict) -> dict:
    return {k: torch.cat([a[k], b[k]]) for k in a}


# --- diffusers ---------------------------------------------------------------------------------------


def diffusers_loop(net: models.DiffusersUNet, case, n, steps, guidance, device, dtype, seed=0):
    from diffusers import DPMSolverMultistepScheduler

    cfg = {k: v for k, v in case.scheduler.items() if not k.startswith("_")}
    sched = DPMSolverMultistepScheduler.from_config(cfg, algorithm_type="dpmsolver++", solver_order=2)
    cond, uncond = conditioning(case, n, device, dtype)
    both = cat_rows(cond, uncond)
    g = torch.Generator().manual_seed(seed)
    shape = (n, case.in_channels, case.sample_size, case.sample_size)

    def run() -> torch.Tensor:
        sched.set_timesteps(steps, device=device)
        latents = (torch.randn(shape, generator=g) * sched.init_noise_sigma).to(device, dtype)
        for t in sched.timesteps:
            inp = sched.scale_model_input(torch.cat([latents, latents]), t)
            eps = net(inp, t, **both)
            eps_c, eps_u = eps.chunk(2)
            eps = eps_u + guidance * (eps_c - eps_u)
            latents = sched.step(eps, t, latents, return_dict=False)[0]
        return latents

    return run


# --- ours ---------------------------------------------------------------------------------------------


def ours_loop(denoise, case, n, steps, guidance, device, dtype, vectorised: bool, seed=0):
    from model.denoiser import cfg_combine
    from model.noise import RequestNoise
    from model.samplers import get_sampler
    from model.schedules import Schedule

    schedule = Schedule.from_config(case.scheduler)
    sampler = get_sampler("dpmpp_2m", schedule.kind)
    sigmas = sampler.make_sigmas(schedule, steps)
    cond, uncond = conditioning(case, n, device, dtype)
    both = cat_rows(cond, uncond)
    shape = (case.in_channels, case.sample_size, case.sample_size)

    def run() -> torch.Tensor:
        if vectorised:
            states = [sampler.init(RequestNoise(seed).initial((n, *shape), device), sigmas)]
        else:
            states = [
                sampler.init(RequestNoise(seed + i).initial((1, *shape), device), sigmas) for i in range(n)
            ]
        while not sampler.done(states[0]):
            xs, sig = [], []
            for st in states:  # gather, as the worker does: rows of many requests, each with its own σ
                x, s = sampler.next_input(st)
                xs.append(x)
                sig += [s] * x.shape[0]
            x = torch.cat(xs)  # (n, C, H, W)
            sigma = torch.tensor(sig + sig, dtype=torch.float64).to(device, non_blocking=True)  # (2n,)
            x0 = denoise(x=torch.cat([x, x]), sigma=sigma, **both)  # (2n, C, H, W) fp32
            guided = cfg_combine(x0[:n], x0[n:], guidance)
            start = 0
            for st in states:  # scatter
                rows = st.x.shape[0]
                sampler.advance(st, guided[start : start + rows])
                start += rows
        return torch.cat([sampler.result(st) for st in states])

    return run


def make_denoise(
    net: torch.nn.Module, case, graphs: bool, row_buckets: list[int], device, dtype, report, example
):
    """The denoiser call, eager or behind per-bucket graphs (whole Denoiser; else U-Net only)."""
    from model.denoiser import Denoiser
    from model.schedules import Schedule

    unet = net.unet
    schedule = Schedule.from_config(case.scheduler)
    den = Denoiser(unet, schedule)
    if not graphs:
        return den, "eager"
    try:
        graphed = GraphedDenoiser(den, buckets=row_buckets)
        graphed.warmup(**example)
        return graphed, "graphs(denoiser)" if device.type == "cuda" else "bucketed eager (no CUDA)"
    except Exception as e:  # noqa: BLE001 - the Denoiser may not be capturable; graph the U-Net alone
        report.note(
            f"{case.name}: capturing the whole Denoiser failed ({type(e).__name__}: {str(e)[:200]}); "
            "falling back to graphing the U-Net only"
        )
        common.free_memory()
        gunet = GraphedUNet(unet, buckets=row_buckets)
        ex = example
        gunet.warmup(
            x=ex["x"].to(unet.dtype),
            t=den.timesteps(ex["sigma"]),
            class_labels=ex.get("class_labels"),
            context=ex.get("context"),
        )
        return Denoiser(gunet, schedule), "graphs(unet)"


def bench_case(case, images, args, device, report, budget):
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    steps, guidance = args.steps, args.guidance
    rows_out: list[dict[str, Any]] = []
    nets: dict[str, Any] = {}
    for name, loader in (("diffusers", models.load_diffusers), ("ours", models.load_ours)):
        try:
            nets[name] = loader(case, device, dtype)
        except Exception as e:  # noqa: BLE001
            report.note(f"{case.name}: {name} could not load it: {type(e).__name__}: {e}")
    row_buckets = sorted({2 * n for n in images})

    def example_rows(r: int) -> dict:
        n = r // 2
        cond, uncond = conditioning(case, n, device, dtype)
        x = torch.randn(r, case.in_channels, case.sample_size, case.sample_size, device=device)
        sig = torch.linspace(10.0, 0.1, r, dtype=torch.float64, device=device)
        return {"x": x, "sigma": sig, **cat_rows(cond, uncond)}

    variants: list[tuple[str, Any]] = []
    if "diffusers" in nets:
        variants.append(("diffusers loop", None))
    if "ours" in nets:
        variants += [
            ("ours eager/per-request", (False, False)),
            ("ours graphs/per-request", (True, False)),
            ("ours graphs/vectorised", (True, True)),
        ]
    for vname, spec in variants:
        if budget.exhausted():
            report.note(f"{case.name}/{vname}: skipped (budget)")
            continue
        try:
            denoise, how = None, "eager"
            if spec is not None:
                graphs, _ = spec
                ts = time.monotonic()
                denoise, how = make_denoise(
                    nets["ours"],
                    case,
                    graphs,
                    row_buckets,
                    device,
                    dtype,
                    report,
                    example_rows(row_buckets[-1]),
                )
                setup_s = time.monotonic() - ts
            else:
                setup_s = 0.0
            for n in images:
                if budget.exhausted():
                    report.note(f"{case.name}/{vname}: from {n} images on skipped (budget)")
                    break
                if spec is None:
                    run = diffusers_loop(nets["diffusers"], case, n, steps, guidance, device, dtype)
                else:
                    run = ours_loop(denoise, case, n, steps, guidance, device, dtype, vectorised=spec[1])
                row: dict[str, Any] = {
                    "model": case.name,
                    "variant": vname,
                    "images": n,
                    "rows": 2 * n,
                    "forward": how,
                    "setup_s": setup_s if n == images[0] else None,
                }
                try:
                    with torch.no_grad():
                        out = run()
                        row["finite"] = bool(torch.isfinite(out).all())
                        tm = common.time_call(
                            run, device, quick=args.quick, target_ms=0, repeats=args.repeats, warmup=0
                        )
                    ms = tm["median_ms"]
                    row.update(
                        ms_per_image_batch=ms,
                        ms_per_step=ms / steps,
                        img_s=1e3 * n / ms,
                        spread_pct=tm["spread_pct"],
                    )
                except Exception as e:  # noqa: BLE001
                    row["error"] = "OOM" if common.is_oom(e) else f"{type(e).__name__}: {e}"[:120]
                    if args.verbose:
                        traceback.print_exc()
                    common.free_memory()
                rows_out.append(row)
        except Exception as e:  # noqa: BLE001
            report.note(f"{case.name}/{vname}: failed: {type(e).__name__}: {str(e)[:300]}")
            if args.verbose:
                traceback.print_exc()
        finally:
            common.free_memory()
        print(f"  {case.name:>16} {vname:<24} done at {budget.elapsed():6.1f}s", flush=True)
    for r in rows_out:
        base = next(
            (
                b
                for b in rows_out
                if b["variant"] == "diffusers loop" and b["images"] == r["images"] and "img_s" in b
            ),
            None,
        )
        if base and "img_s" in r:
            r["vs_diffusers"] = r["img_s"] / base["img_s"]
    report.table(
        f"{case.name}: {steps} steps DPM++2M, guidance {guidance} (rows = 2 x images)", rows_out, COLUMNS
    )
    nets.clear()
    common.free_memory()


COLUMNS = [
    "model",
    "variant",
    "images",
    "rows",
    "forward",
    "ms_per_image_batch",
    "ms_per_step",
    "img_s",
    "vs_diffusers",
    "spread_pct",
    "finite",
    "setup_s",
    "error",
]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(p)
    p.add_argument("--models", default="sd15,fashion", help="sd15, fashion (fashion-class or a stand-in)")
    p.add_argument("--work-dir", default="/tmp/unet_bench")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--repeats", type=int, default=2, help="timed runs of the whole loop (median)")
    p.add_argument("--sd15-images", default=None)
    p.add_argument("--small-images", default=None)
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.steps = min(args.steps, 3)

    device = common.pick_device(args.device)
    common.setup_torch(device)
    report = common.Report("sampling_loop", common.env_info(device), args)
    budget = common.Budget(args.budget_s)
    table = QUICK_IMAGES if args.quick else FULL_IMAGES
    sd_n = [int(v) for v in args.sd15_images.split(",")] if args.sd15_images else table["sd15"]
    small_n = [int(v) for v in args.small_images.split(",")] if args.small_images else table["small"]
    work = Path(args.work_dir)
    wanted = args.models.split(",")

    cases = []
    if "sd15" in wanted:
        cases.append((models.random_case("sd15", work, args.quick, device), sd_n))
    if "fashion" in wanted:
        shipped, _ = models.shipped_cases(Path(args.weights_dir))
        cls = [c for c in shipped if c.name == "fashion-class"]
        if cls:
            cases.append((cls[0], small_n))
        else:
            report.note("fashion-class not in weights/: using a random stand-in of its shape")
            cases.append((models.random_case("fashion-standin", work, args.quick, device), small_n))
    for case, images in cases:
        if budget.exhausted():
            report.note(f"{case.name}: skipped (budget)")
            continue
        bench_case(case, images, args, device, report, budget)
    report.print_all()


if __name__ == "__main__":
    main()
