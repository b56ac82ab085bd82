"""U-Net forward: ours vs diffusers on identical weights, eager / channels_last / CUDA graphs.

    python -m bench.unet_forward --out $OUT                 # CUDA: SD1.5, CIFAR-sized, shipped fashion models
    python -m bench.unet_forward --device cpu --quick       # CPU smoke test of every code path

For each model and batch: median latency (ms per forward, as a caller in a steady loop sees it), images/s,
model FLOP utilisation against the fp16 dense peak (FLOPs counted once by torch.utils.flop_counter), peak
memory, and the relative error of the output against diffusers' on the same inputs (a wrong fast model is
not a fast model).
"""

from __future__ import annotations

import argparse
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bench import common, models
from model.cuda_graphs import GraphedCallable

FULL_BATCHES = {"sd15": [1, 2, 8, 32], "small": [1, 2, 4, 8, 16, 32, 64, 128, 256]}
QUICK_BATCHES = {"sd15": [1, 2], "small": [1, 3]}
NCHW, NHWC = torch.contiguous_format, torch.channels_last


def variant_fns(
    name: str,
    net: torch.nn.Module,
    inputs: dict[str, torch.Tensor],
    batches: list[int],
    args: argparse.Namespace,
) -> tuple[Callable[[int], Any], Callable[[], None]]:
    """For a variant: ``run(B)`` (one forward on the first B rows) and ``cleanup()``."""
    layout = NHWC if "NHWC" in name else NCHW
    net.to(memory_format=layout)
    x = inputs["x"].contiguous(memory_format=layout)
    feeds = {**inputs, "x": x}
    sliced = {b: {k: v[:b] for k, v in feeds.items()} for b in batches}
    fn: Callable[..., Any] = net
    if "compile" in name:
        fn = torch.compile(net, mode=args.compile_mode, dynamic=False)
    if "graphs" in name:
        graphed = GraphedCallable(fn, buckets=batches, warmup_iters=2)
        graphed.warmup(**sliced[batches[-1]])  # captures every bucket, largest first, one shared pool
        return (lambda b: graphed(**sliced[b])), (lambda: graphed._signatures.clear())
    return (lambda b: fn(**sliced[b])), (lambda: None)


def bench_case(case: models.Case, batches: list[int], args, device, report: common.Report, budget) -> None:
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    rows: list[dict[str, Any]] = []
    t0 = time.monotonic()
    try:
        ref_net = models.load_diffusers(case, device, dtype)
    except Exception as e:  # noqa: BLE001
        report.note(f"{case.name}: diffusers could not load it: {type(e).__name__}: {e}")
        ref_net = None
    try:
        ours = models.load_ours(case, device, dtype)
    except Exception as e:  # noqa: BLE001
        report.note(f"{case.name}: our loader failed: {type(e).__name__}: {e}")
        if args.verbose:
            traceback.print_exc()
        ours = None
    load_s = time.monotonic() - t0
    inputs = models.make_inputs(case, max(batches), device, dtype)
    one = {k: v[:1] for k, v in inputs.items()}
    flops_ref = flops_ours = None
    with torch.no_grad():
        if ref_net is not None:
            flops_ref = common.count_flops(lambda: ref_net(**one))
        if ours is not None:
            try:
                flops_ours = common.count_flops(lambda: ours(**one))
            except Exception as e:  # noqa: BLE001
                report.note(f"{case.name}: FLOP count of ours failed: {e}")
    flops = flops_ref or flops_ours or 0
    params = models.param_count((ref_net or ours).unet) / 1e6 if (ref_net or ours) else float("nan")
    report.note(
        f"{case.name}: {case.note}; {params:.1f}M params; {fmt_g(flops_ref)} GFLOP/image (diffusers), "
        f"{fmt_g(flops_ours)} (ours); load {load_s:.1f}s"
    )

    # References: diffusers eager output per batch size, for the error column.
    refs: dict[int, torch.Tensor] = {}
    if ref_net is not None:
        with torch.no_grad():
            for b in batches:
                refs[b] = ref_net(**{k: v[:b] for k, v in inputs.items()}).float()

    variants: list[tuple[str, torch.nn.Module]] = []
    if ref_net is not None:
        variants += [("diffusers", ref_net), ("diffusers+graphs", ref_net)]
    if ours is not None:
        variants += [
            ("ours NCHW", ours),
            ("ours NHWC", ours),
            ("ours NCHW+graphs", ours),
            ("ours NHWC+graphs", ours),
        ]
        if args.compile:
            # Inductor fuses the pointwise work (GroupNorm+SiLU, residual adds); graphs remove the launches.
            variants += [("ours NHWC+compile", ours), ("ours NHWC+compile+graphs", ours)]
    if device.type == "cpu" and not args.all_variants:
        variants = [v for v in variants if "NHWC" not in v[0] or "graphs" in v[0]]

    for vname, net in variants:
        if budget.exhausted():
            report.note(f"{case.name}/{vname}: skipped (time budget of {args.budget_s}s spent)")
            continue
        try:
            with torch.no_grad():
                ts = time.monotonic()
                run, cleanup = variant_fns(vname, net, inputs, batches, args)
                setup_s = time.monotonic() - ts
                for b in batches:
                    if budget.exhausted():
                        report.note(f"{case.name}/{vname}: batches from {b} skipped (budget)")
                        break
                    row = {"model": case.name, "variant": vname, "batch": b}
                    try:
                        out = run(b)
                        row["err_vs_diffusers"] = models.rel_err(out.float(), refs[b]) if b in refs else None
                        row["finite"] = bool(torch.isfinite(out).all())
                        with common.peak_memory(device) as mem:
                            tm = common.time_call(lambda b=b, run=run: run(b), device, quick=args.quick)
                        ms = tm["median_ms"]
                        row.update(
                            ms=ms,
                            spread_pct=tm["spread_pct"],
                            img_s=1e3 * b / ms,
                            tflops=flops * b / (ms * 1e-3) / 1e12,
                            mfu_pct=common.mfu(flops * b, ms),
                            peak_mib=mem["peak_mib"],
                        )
                    except Exception as e:  # noqa: BLE001
                        row["error"] = "OOM" if common.is_oom(e) else f"{type(e).__name__}: {e}"[:120]
                        common.free_memory()
                    rows.append(row)
                row0 = next((r for r in rows if r["variant"] == vname), None)
                if row0 is not None:
                    row0["setup_s"] = setup_s
                cleanup()
        except Exception as e:  # noqa: BLE001 - e.g. a capture error: report it, go on
            report.note(f"{case.name}/{vname}: failed: {type(e).__name__}: {str(e)[:300]}")
            if args.verbose:
                traceback.print_exc()
        finally:
            common.free_memory()
        print(f"  {case.name:>16} {vname:<18} done at {budget.elapsed():6.1f}s", flush=True)

    for net in (ref_net, ours):
        if net is not None:
            net.to(memory_format=NCHW)
    report.table(f"{case.name} (long)", rows, LONG_COLUMNS)
    report.table(
        f"{case.name}: ms per forward (speedup = diffusers / best ours)",
        pivot(rows, batches),
        pivot_columns(rows),
    )
    ref_net = ours = None
    refs.clear()
    common.free_memory()


LONG_COLUMNS = [
    "model",
    "variant",
    "batch",
    "ms",
    "spread_pct",
    "img_s",
    "tflops",
    "mfu_pct",
    "peak_mib",
    "err_vs_diffusers",
    "finite",
    "setup_s",
    "error",
]


def fmt_g(flops: int | None) -> str:
    return "-" if not flops else f"{flops / 1e9:.1f}"


def pivot_columns(rows: list[dict[str, Any]]) -> list[str]:
    names = list(dict.fromkeys(r["variant"] for r in rows))
    return ["batch"] + names + ["best ours", "img/s", "MFU %", "speedup", "max err"]


def pivot(rows: list[dict[str, Any]], batches: list[int]) -> list[dict[str, Any]]:
    out = []
    for b in batches:
        at_b = [r for r in rows if r["batch"] == b]
        if not at_b:
            continue
        line: dict[str, Any] = {"batch": b}
        for r in at_b:
            line[r["variant"]] = r.get("ms", r.get("error"))
        ours = [r for r in at_b if r["variant"].startswith("ours") and "ms" in r]
        base = next((r for r in at_b if r["variant"] == "diffusers" and "ms" in r), None)
        if ours:
            best = min(ours, key=lambda r: r["ms"])
            line.update(
                {
                    "best ours": best["variant"].removeprefix("ours "),
                    "img/s": best["img_s"],
                    "MFU %": best["mfu_pct"],
                }
            )
            if base:
                line["speedup"] = base["ms"] / best["ms"]
            errs = [r["err_vs_diffusers"] for r in ours if r.get("err_vs_diffusers") is not None]
            line["max err"] = max(errs) if errs else None
        out.append(line)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(p)
    p.add_argument("--models", default="sd15,cifar36m,shipped", help="comma list: sd15, cifar36m, shipped")
    p.add_argument("--work-dir", default="/tmp/unet_bench", help="where random-weight folders are saved")
    p.add_argument("--compile", action="store_true", help="add ours+torch.compile (slow to compile)")
    p.add_argument("--compile-mode", default="max-autotune-no-cudagraphs")
    p.add_argument("--all-variants", action="store_true", help="on CPU too, run every variant")
    p.add_argument("--sd15-batches", default=None, help="e.g. 1,2,8,32")
    p.add_argument("--small-batches", default=None, help="e.g. 1,2,4,...,256")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)

    device = common.pick_device(args.device)
    common.setup_torch(device)
    report = common.Report("unet_forward", common.env_info(device), args)
    budget = common.Budget(args.budget_s)
    table = QUICK_BATCHES if args.quick else FULL_BATCHES
    sd_batches = [int(b) for b in args.sd15_batches.split(",")] if args.sd15_batches else table["sd15"]
    small_batches = [int(b) for b in args.small_batches.split(",")] if args.small_batches else table["small"]
    work = Path(args.work_dir)
    wanted = args.models.split(",")

    cases: list[tuple[models.Case, list[int]]] = []
    for kind in ("sd15", "cifar36m"):
        if kind in wanted:
            t0 = time.monotonic()
            case = models.random_case(kind, work, args.quick, device)
            print(f"  {kind}: folder ready in {time.monotonic() - t0:.1f}s ({case.unet_dir})", flush=True)
            cases.append((case, sd_batches if kind == "sd15" else small_batches))
    if "shipped" in wanted:
        shipped, notes = models.shipped_cases(Path(args.weights_dir))
        for n in notes:
            report.note(n)
        cases += [(c, small_batches) for c in shipped]
        if not shipped:
            report.note("no shipped fashion model: timing a random stand-in of fashion-class's shape instead")
            cases.append((models.random_case("fashion-standin", work, args.quick, device), small_batches))

    for case, batches in cases:
        if budget.exhausted():
            report.note(f"{case.name}: skipped (time budget spent)")
            continue
        bench_case(case, batches, args, device, report, budget)
    report.print_all(long_tables=False)


if __name__ == "__main__":
    main()
