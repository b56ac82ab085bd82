"""DeepCache (model/deepcache.py), the step-level caching lever: its quality cost and its speed.

    python -m bench.deepcache_quality                       # quality: shipped models on CPU, the judges
    python -m bench.deepcache_quality --speed --out $OUT    # speed: SD1.5-config U-Net, full vs shallow step
    python -m bench.deepcache_quality --speed --tiny        # CPU smoke test of the speed path

Quality: the shipped fashion-class and fashion-text models (fp32, CPU), their defaults (DPM++ 2M, 20 steps,
guidance 3), ``--images`` requests sampled together (one denoiser call per step, as in the server), once
with every step in full and once per (branch, interval): step k runs in full when k % interval == 0, else
shallow (levels 0..branch recomputed, deeper ones from the last full step). Judged by the independent judges
(the classifier trained on real Fashion-MNIST for the class; the colour judge on fashion-text) against the
uncached images' verdicts, with the binomial standard error of an accuracy at this many images as the
judges' noise; and the mean / max pixel distance to the uncached image of the same seed (0-255). The FLOP
fraction is the cached run's U-Net FLOPs over the uncached run's (FlopCounterMode, one call of each kind).
fashion-text-edges is not measured: a shallow step cannot take ControlNet residuals for the deep levels.

Speed: full vs shallow step of the SD1.5-config U-Net (random weights, fp16, channels_last, CUDA graphs;
``--compile`` adds torch.compile to both) at batches 2 and 32, and the per-step speedup at each interval,
interval x full / (full + (interval - 1) x shallow).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

import torch

from bench import common
from bench import unet_vs_diffusers as uvd
from model.deepcache import DeepCache, StepCachedUNet, full_step, shallow_step


def flops_of(fn: Any) -> int:
    return common.count_flops(fn)


# --- quality -----------------------------------------------------------------------------------------------


def conditioning(name: str, pipe: Any, n: int) -> tuple[dict, torch.Tensor, torch.Tensor | None]:
    """(cond for run_packed, class per image (n,), colour per image (n,) or None)."""
    classes = torch.arange(n) % 10
    if name == "fashion-class":
        return {"class_labels": classes, "null_label": torch.tensor([pipe.null_class_label])}, classes, None
    from training.captions import COLOUR_NAMES, eval_prompt

    colours = (torch.arange(n) // 10 * 7 + torch.arange(n)) % len(COLOUR_NAMES)
    prompts = [eval_prompt(int(c), int(j), 0) for c, j in zip(classes, colours, strict=True)]
    enc = pipe.text_encoder
    cond = {"context": enc.encode(prompts).float(), "null_context": enc.encode([""]).float()}
    return cond, classes, colours


def quality(args: argparse.Namespace, report: common.Report) -> None:
    from tests.model.samplers_shipped_helpers import load, load_judge
    from training.data import load_split
    from training.evaluate import ColourJudge

    judges: dict[str, Any] = {"class": load_judge()}
    rows: list[dict[str, Any]] = []
    for name in args.models.split(","):
        pipe = load(name)[name]
        if name != "fashion-class" and "colour" not in judges:
            train, _ = load_split("train", limit=12000)
            judges["colour"] = ColourJudge(torch.from_numpy(train).unsqueeze(1).float() / 255)
        rows += judge_model(name, pipe, judges, args, report)
    cols = ["model", "branch", "interval", "class acc", "colour acc", "mean dist", "max dist", "FLOP frac",
            "full/steps", "CPU s"]  # fmt: skip
    title = "DeepCache quality on the shipped models (judges; distance to the uncached image, 0-255)"
    report.table(title, rows, cols)


def judge_model(
    name: str, pipe: Any, judges: dict[str, Any], args: argparse.Namespace, report: common.Report
) -> list[dict[str, Any]]:
    """Uncached, then every (branch, interval): the judges' verdicts, distances and FLOP fractions."""
    from tests.model.samplers_shipped_helpers import run_packed
    from training.classifier import predict

    n = args.images
    cond, classes, colours = conditioning(name, pipe, n)
    steps = pipe.defaults.num_inference_steps
    jobs = [("dpmpp_2m", steps, k) for k in range(n)]
    unet = pipe.denoiser.unet
    s = pipe.sample_size
    one = torch.randn(1, unet.config.in_channels, s, s)
    extra: dict[str, Any] = {"context": cond["context"][:1]} if "context" in cond else {}
    if not extra:
        extra["class_labels"] = cond["class_labels"][:1]
    t1 = torch.full((1,), 500.0)
    f_full = flops_of(lambda: unet(one, t1, **extra))
    branches = [b for b in args.branches if b < len(unet.up_blocks) - 1]
    configs = [(None, 1)] + [(b, i) for b in branches for i in args.intervals]
    rows: list[dict[str, Any]] = []
    base = None
    for branch, interval in configs:
        t0 = time.monotonic()
        wrapped = StepCachedUNet(unet, branch, interval) if branch is not None else None
        pipe.denoiser.unet = wrapped or unet
        try:
            imgs = run_packed(pipe, jobs, cond)  # (n, C, H, W) in [0, 1]
        finally:
            pipe.denoiser.unet = unet
        secs = time.monotonic() - t0
        base = imgs if base is None else base
        pred = predict(judges["class"], imgs)[0]
        row: dict[str, Any] = {
            "model": name,
            "branch": "-" if branch is None else branch,
            "interval": interval,
            "class acc": float((pred == classes).float().mean()),
        }
        if colours is not None:
            row["colour acc"] = float((judges["colour"](imgs) == colours).float().mean())
        diff = (imgs - base).abs().flatten(1).mean(1) * 255  # (n,)
        row["mean dist"] = float(diff.mean())
        row["max dist"] = float(diff.max())
        row["FLOP frac"] = 1.0
        if wrapped is not None and branch is not None:
            _, cache = full_step(unet, one, t1, branch, **extra)
            f_shallow = flops_of(lambda c=cache: shallow_step(unet, one, t1, c, **extra))
            full_n, shallow_n = wrapped.full_calls, wrapped.calls - wrapped.full_calls
            row["FLOP frac"] = (full_n * f_full + shallow_n * f_shallow) / (wrapped.calls * f_full)
            row["full/steps"] = f"{full_n}/{wrapped.calls}"
        row["CPU s"] = secs
        rows.append(row)
        print(
            f"  {name} branch {row['branch']} interval {interval}: class {row['class acc']:.3f} "
            f"dist {row['mean dist']:.2f} flops {row['FLOP frac']:.2f} ({secs:.0f}s)",
            flush=True,
        )
    acc = rows[0]["class acc"]
    # judge noise: the binomial standard error of the uncached accuracy; with every image right, the 95%
    # bound of the rule of three (a true accuracy below 1 - 3/n would show a miss in n images 95% of the time)
    noise = math.sqrt(acc * (1 - acc) / n) if acc < 1 else 3 / n
    report.note(
        f"{name}: {n} images, {steps} steps dpmpp_2m, guidance {pipe.defaults.guidance_scale}; judge noise "
        f"{noise:.3f} ({'binomial std. error' if acc < 1 else 'rule of three, all right'})"
    )
    return rows


# --- speed -------------------------------------------------------------------------------------------------


def speed(args: argparse.Namespace, report: common.Report) -> None:
    device = common.pick_device(args.device)
    common.setup_torch(device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    spec = uvd.specs(args.tiny)["sd15"]
    folder = uvd.random_folder(spec, Path(args.work_dir), device)
    _, unet, why = uvd.load_both(spec, folder, device, dtype)
    if unet is None:
        report.note(f"speed: our U-Net did not load: {why}")
        return
    batches = [2, 4] if args.tiny else [2, 32]
    inputs = uvd.make_inputs(spec, max(batches), device, dtype)
    graphs = device.type == "cuda"
    levels = len(unet.up_blocks)
    rows: list[dict[str, Any]] = []
    with torch.no_grad():
        one = {k: v[:1] for k, v in inputs.items()}
        f_full = flops_of(lambda: unet(one["x"], one["t"], context=one["context"]))

        def full(x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
            return full_step(unet, x, t, 0, context=context)[0]

        runners = {"full": uvd.build_runner("full", uvd.compile_module(full, device, args.compile), inputs,
                                            batches, device, graphs)}  # fmt: skip
        for branch in range(levels - 1):
            _, cache = full_step(unet, inputs["x"], inputs["t"], branch, context=inputs["context"])

            def shallow(x, t, context, h, branch=branch):  # type: ignore[no-untyped-def]
                return shallow_step(unet, x, t, DeepCache(branch, h), context=context)

            small = DeepCache(branch, cache.h[:1])
            f_sh = flops_of(lambda c=small: shallow_step(unet, one["x"], one["t"], c, context=one["context"]))
            feeds = {**inputs, "h": cache.h}
            fn = uvd.compile_module(shallow, device, args.compile)
            runners[f"shallow b{branch}"] = uvd.build_runner(f"b{branch}", fn, feeds, batches, device, graphs)
            report.note(f"branch {branch}: shallow step = {f_sh / f_full:.3f} of the full step's FLOPs")
        for b in batches:
            ms = {k: common.time_call(lambda r=r, b=b: r(b), device, quick=args.tiny)["median_ms"]
                  for k, r in runners.items()}  # fmt: skip
            for k, v in ms.items():
                row: dict[str, Any] = {"batch": b, "step": k, "ms": v}
                if k != "full":
                    for i in args.intervals:
                        row[f"x{i}"] = i * ms["full"] / (ms["full"] + (i - 1) * v)
                rows.append(row)
        for r in runners.values():
            r.graphed._signatures.clear()
    cols = ["batch", "step", "ms"] + [f"x{i}" for i in args.intervals]
    recipe = ("compile+" if args.compile else "") + ("CUDA graphs" if graphs else "eager")
    title = f"{spec.name}: full vs shallow step, ms ({recipe}); xN = per-step speedup at interval N"
    report.table(title, rows, cols)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--speed", action="store_true", help="time full vs shallow steps instead of judging")
    p.add_argument("--models", default="fashion-class,fashion-text")
    p.add_argument("--images", type=int, default=100)
    p.add_argument("--intervals", default="2,3,5")
    p.add_argument(
        "--branches", default="0", help="quality: cache branches (0 = only the top level recomputed)"
    )
    p.add_argument("--compile", action="store_true", help="speed: torch.compile both kinds of step")
    p.add_argument("--tiny", action="store_true", help="speed: tiny config (CPU smoke test)")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument("--out", default=None)
    p.add_argument("--work-dir", default="/tmp/unet_bench")
    args = p.parse_args(argv)
    args.intervals = [int(i) for i in args.intervals.split(",")]
    args.branches = [int(b) for b in args.branches.split(",")]
    torch.manual_seed(0)
    device = common.pick_device(args.device) if args.speed else torch.device("cpu")
    report = common.Report("deepcache_quality", common.env_info(device), args)
    if args.speed:
        speed(args, report)
    else:
        quality(args, report)
    report.print_all()


if __name__ == "__main__":
    main()
