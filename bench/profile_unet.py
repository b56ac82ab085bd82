"""Where the compiled U-Net forward spends its time: device kernel time by kind against each kind's floor.

    python -m bench.profile_unet --out $OUT                            # CUDA: SD1.5 config, batch 32, ours
    python -m bench.profile_unet --impl ours,diffusers --which sdxl --batch 8
    python -m bench.profile_unet --tiny                                # CPU smoke test (CPU op times)

The model is ``bench.unet_vs_diffusers``'s (same random-weight folder, same loading, fp16, channels_last),
compiled the same way (``torch.compile(mode="default", dynamic=False)``; diffusers with fused QKV). The
profile runs the compiled forward without a CUDA graph (kernel times are the graph's; kineto records
kernels inside graph replays unreliably); the wall time per forward is measured separately through a graph.

Kernels are grouped by name into convolution (cuDNN fprop / implicit GEMM), GEMM (cuBLAS / nvjet / CUTLASS),
attention (flash / cuDNN / memory-efficient SDPA), norm/pointwise (Inductor's Triton kernels, elementwise,
reductions) and other (copies, memsets). Each kind's floor on the card comes from one eager forward under a
dispatch mode at the same batch: convolution, GEMM and attention at max(FLOPs / 989 TFLOP/s fp16 dense,
bytes / 4.8 TB/s HBM3e); norm/pointwise at the bytes of every GroupNorm/LayerNorm's input and output / 4.8
TB/s (the traffic left if the activations and residual adds were fused into the norms or the convs'
epilogues: one read and one write per norm). "x floor" = measured / floor.
"""

from __future__ import annotations

import argparse
import time
import traceback
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from bench import common
from bench import unet_vs_diffusers as uvd

HBM_TBPS = 4.8  # H200 HBM3e, datasheet
KINDS = ("convolution", "GEMM", "attention", "norm/pointwise", "other")


def kernel_kind(name: str) -> str:
    """A CUDA kernel's (or, on CPU, an aten op's) kind from its name."""
    n = name.lower()
    if n.startswith("triton_tem"):  # Inductor's template kernels (max-autotune): matmuls / convolutions
        return "convolution" if "conv" in n else "GEMM"
    if n.startswith(
        "triton"
    ):  # Inductor's fused kernels are named after what they fuse ("..._convolution_...")
        return "norm/pointwise"
    if any(k in n for k in ("flash", "fmha", "sdpa", "attention", "attn")):
        return "attention"
    if any(k in n for k in ("fprop", "conv", "implicit", "dgrad", "wgrad", "winograd", "krsc", "cudnn")):
        return "convolution"
    if any(
        k in n for k in ("gemm", "nvjet", "cutlass", "cublas", "matmul", "gemv", "aten::mm", "addmm", "bmm")
    ):
        return "GEMM"
    if "memcpy" in n or "memset" in n:
        return "other"
    pointwise = ("elementwise", "vectorized", "reduce", "norm", "softmax", "silu", "gelu", "copy", "cat",
                 "fill", "upsample", "index", "gather", "aten::")  # fmt: skip
    if any(k in n for k in pointwise):
        return "norm/pointwise"
    return "other"


def op_kind(name: str) -> str:
    """An aten op's kind (for the FLOP and byte counts of the floors)."""
    if "convolution" in name:
        return "convolution"
    if any(
        k in name for k in ("scaled_dot_product", "flash_attention", "efficient_attention", "cudnn_attention")
    ):
        return "attention"
    if name.split(".")[-1] in ("mm", "addmm", "bmm", "baddbmm") or name in (
        "aten.mm",
        "aten.addmm",
        "aten.bmm",
    ):
        return "GEMM"
    if "group_norm" in name or "layer_norm" in name:
        return "norm"
    return "pointwise"


class OpCounter(TorchDispatchMode):
    """FLOPs and bytes (inputs + outputs, views free) of every aten op, summed by op_kind."""

    def __init__(self) -> None:
        super().__init__()
        from torch.utils.flop_counter import flop_registry

        self.registry = flop_registry
        self.flops: dict[str, float] = defaultdict(float)
        self.bytes: dict[str, float] = defaultdict(float)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = str(func.overloadpacket)  # e.g. "aten.convolution"
        kind = op_kind(name)
        ins = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        in_ptrs = {t.untyped_storage().data_ptr() for t in ins}
        if outs and all(o.untyped_storage().data_ptr() in in_ptrs for o in outs):
            return out  # a view (or in-place op on a view): no traffic of its own worth counting
        self.bytes[kind] += sum(t.numel() * t.element_size() for t in ins + outs)
        packet = func.overloadpacket
        if packet in self.registry:
            self.flops[kind] += self.registry[packet](*args, **kwargs, out_val=out)
        elif kind == "attention" and len(ins) >= 3:  # CPU SDPA kernels are not in the registry
            q, k = ins[0], ins[1]  # (B, H, L, D), (B, H, S, D)
            self.flops[kind] += 4 * q.shape[:-1].numel() * k.shape[-2] * q.shape[-1]
        return out


def floors(counter: OpCounter) -> dict[str, tuple[float, str, float, float]]:
    """kind -> (floor ms, basis, FLOPs, bytes) on an H200."""
    peak = common.PEAK_FP16_TFLOPS * 1e12
    bw = HBM_TBPS * 1e12
    out: dict[str, tuple[float, str, float, float]] = {}
    for kind in ("convolution", "GEMM", "attention"):
        f, b = counter.flops[kind], counter.bytes[kind]
        compute, memory = f / peak, b / bw
        out[kind] = (1e3 * max(compute, memory), "FLOPs" if compute >= memory else "bytes", f, b)
    nb = counter.bytes["norm"]
    out["norm/pointwise"] = (1e3 * nb / bw, "norm bytes", 0.0, nb)
    out["other"] = (0.0, "-", 0.0, 0.0)
    return out


def profile_kernels(
    fn: Any, iters: int, device: torch.device
) -> tuple[dict[str, list[float]], dict[str, str]]:
    """Run fn() ``iters`` times under torch.profiler; (name -> durations in µs, name -> kind)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(iters):
            fn()
        common.sync(device)
    times: dict[str, list[float]] = defaultdict(list)
    for e in prof.events():
        if device.type == "cuda":
            if e.device_type != DeviceType.CUDA:
                continue
            times[e.name].append(e.time_range.elapsed_us())
        elif e.name.startswith("aten::") and e.self_cpu_time_total > 0:
            times[e.name].append(e.self_cpu_time_total)  # CPU: self time of aten ops stands in for kernels
    return times, {n: kernel_kind(n) for n in times}


def run(args: argparse.Namespace) -> None:
    device = common.pick_device(args.device)
    common.setup_torch(device)
    common.set_sdpa_backend(args.sdpa_backend)
    import torch._dynamo.config as dynamo_config

    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 16)
    report = common.Report("profile_unet", common.env_info(device), args)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    spec = uvd.specs(args.tiny)[args.which]
    batch = args.batch or (4 if args.tiny else max(spec.batches))
    folder = uvd.random_folder(spec, Path(args.work_dir), device)
    ref, ours, why = uvd.load_both(spec, folder, device, dtype, args.fused_groupnorm, args.fp8)
    sdxl = spec.pooled_dim is not None
    inputs = uvd.make_inputs(spec, batch, device, dtype)
    nets: dict[str, Any] = {}
    if "diffusers" in args.impl:
        ref.fuse_qkv_projections()
        nets["diffusers"] = (ref, uvd.diffusers_call)
    if "ours" in args.impl:
        if ours is None:
            report.note(f"ours: SKIPPED ({why})")
        else:
            nets["ours"] = (ours, lambda n: uvd.ours_call(n, sdxl))

    # Floors from one eager forward of the first implementation at this batch (the same math on both).
    first_net, first_call = next(iter(nets.values()))
    counter = OpCounter()
    with torch.no_grad(), counter:
        first_call(first_net)(**inputs)
    fl = floors(counter)
    report.note(
        f"{spec.name} batch {batch}: {sum(counter.flops.values()) / 1e12:.3g} TFLOP per forward "
        f"(conv {counter.flops['convolution'] / 1e12:.3g}, GEMM {counter.flops['GEMM'] / 1e12:.3g}, "
        f"attention {counter.flops['attention'] / 1e12:.3g}); floors at {common.PEAK_FP16_TFLOPS:.0f} "
        f"TFLOP/s and {HBM_TBPS} TB/s"
    )
    kind_rows: list[dict[str, Any]] = []
    top_rows: list[dict[str, Any]] = []
    for impl, (net, call) in nets.items():
        try:
            t0 = time.monotonic()
            fn = call(uvd.compile_module(net, device, not args.no_compile))
            with torch.no_grad():
                for _ in range(3):  # compile + autotune + warm caches
                    fn(**inputs)
                common.sync(device)
                setup_s = time.monotonic() - t0
                times, kinds = profile_kernels(lambda fn=fn: fn(**inputs), args.iters, device)
                # wall per forward as a caller sees it: the same compiled function replayed as a CUDA graph
                runner = uvd.build_runner(impl, fn, inputs, [batch], device, device.type == "cuda")
                wall = common.time_call(lambda r=runner: r(batch), device, quick=args.tiny)["median_ms"]
                runner.graphed._signatures.clear()
        except Exception as e:  # noqa: BLE001
            report.note(f"{impl}: FAILED: {type(e).__name__}: {str(e)[:400]}")
            if args.verbose:
                traceback.print_exc()
            continue
        per_kind = {k: 0.0 for k in KINDS}
        count = {k: 0 for k in KINDS}
        for name, ts in times.items():
            per_kind[kinds[name]] += sum(ts) / 1e3 / args.iters  # ms per forward
            count[kinds[name]] += len(ts)
        total = sum(per_kind.values())
        for k in KINDS:
            floor_ms, basis, f, b = fl[k]
            ms = per_kind[k]
            kind_rows.append(
                {
                    "impl": impl,
                    "kind": k,
                    "ms/fwd": ms,
                    "share %": 100 * ms / total if total else None,
                    "kernels/fwd": count[k] / args.iters,
                    "TFLOP/s": f / (ms * 1e-3) / 1e12 if f and ms else None,
                    "GB/s": b / (ms * 1e-3) / 1e9 if b and ms and basis != "FLOPs" else None,
                    "floor ms": floor_ms,
                    "floor basis": basis,
                    "x floor": ms / floor_ms if floor_ms else None,
                }
            )
        floor_sum = sum(v[0] for v in fl.values())
        kind_rows.append(
            {
                "impl": impl,
                "kind": "TOTAL (kernels)",
                "ms/fwd": total,
                "share %": 100.0,
                "kernels/fwd": sum(count.values()) / args.iters,
                "floor ms": floor_sum,
                "x floor": total / floor_sum if floor_sum else None,
            }
        )
        kind_rows.append({"impl": impl, "kind": "wall (graphed)", "ms/fwd": wall, "floor ms": floor_sum,
                          "x floor": wall / floor_sum if floor_sum else None})  # fmt: skip
        report.note(
            f"{impl}: compile+warm-up {setup_s:.0f}s; wall {wall:.2f} ms per forward (CUDA graph), kernels "
            f"{total:.2f} ms ({100 * total / wall if wall else 0:.0f}% of wall)"
        )
        ranked = sorted(times.items(), key=lambda kv: -sum(kv[1]))[: args.top]
        for name, ts in ranked:
            top_rows.append(
                {
                    "impl": impl,
                    "kernel": name if len(name) <= 90 else name[:87] + "...",
                    "kind": kinds[name],
                    "ms/fwd": sum(ts) / 1e3 / args.iters,
                    "calls/fwd": len(ts) / args.iters,
                    "share %": 100 * sum(ts) / 1e3 / args.iters / total if total else None,
                }
            )
        common.free_memory()
    cols = ["impl", "kind", "ms/fwd", "share %", "kernels/fwd", "TFLOP/s", "GB/s", "floor ms", "floor basis",
            "x floor"]  # fmt: skip
    report.table(
        f"{spec.name} batch {batch}: device time per forward by kind vs the H200 floor", kind_rows, cols
    )
    report.table(
        f"top {args.top} kernels", top_rows, ["impl", "kind", "ms/fwd", "calls/fwd", "share %", "kernel"]
    )
    report.print_all()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--which", default="sd15", choices=["sd15", "sdxl"])
    p.add_argument("--batch", type=int, default=None, help="default: the model's largest benchmark batch")
    p.add_argument("--impl", default="ours", help="comma list of: ours, diffusers")
    p.add_argument("--iters", type=int, default=5, help="profiled forwards")
    p.add_argument("--top", type=int, default=15, help="rows of the top-kernels table")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--tiny", action="store_true", help="tiny config (CPU smoke test)")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument("--out", default=None)
    p.add_argument("--work-dir", default="/tmp/unet_bench")
    p.add_argument("--verbose", action="store_true")
    p.add_argument(
        "--fused-groupnorm", action="store_true", help="ours: GroupNorm+SiLU as Triton kernels (CUDA)"
    )
    p.add_argument("--fp8", action="store_true", help="ours: attention/feed-forward linears in FP8 (e4m3)")
    p.add_argument(
        "--sdpa-backend", default="auto", choices=common.SDPA_BACKENDS,
        help="attention kernels for every side (torch.backends.cuda.enable_*_sdp); auto: torch's choice",
    )  # fmt: skip
    args = p.parse_args(argv)
    args.impl = [s.strip() for s in args.impl.split(",")]
    run(args)


if __name__ == "__main__":
    main()
