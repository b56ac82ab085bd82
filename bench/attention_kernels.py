"""Which SDPA kernel to use on this GPU: flash vs memory-efficient vs cuDNN attention, alone and in SD1.5.

    python -m bench.attention_kernels --out $OUT
    python -m bench.attention_kernels --device cpu --quick      # exercises the code paths only

Two tables:
- the attention call alone at SD1.5's shapes (512x512 images: self-attention over 4096/1024/256/64 tokens,
  cross-attention to 77 tokens), fp16, for ``--batch`` images: ms and achieved TFLOP/s per backend;
- our SD1.5 U-Net (random init, channels_last, fp16, CUDA graph) at batch 2 and 32 with SDPA restricted to
  each backend during capture, against PyTorch's default choice (the baseline) in the same run.
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench import common, models
from model.cuda_graphs import GraphedCallable

BACKENDS = {
    "default": None,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
}
# SD1.5 at 512x512: (query tokens, key tokens, heads, head dim) per attention layer type.
SD15_SHAPES = [
    ("self 64x64", 4096, 4096, 8, 40),
    ("cross 64x64", 4096, 77, 8, 40),
    ("self 32x32", 1024, 1024, 8, 80),
    ("self 16x16", 256, 256, 8, 160),
    ("self 8x8", 64, 64, 8, 160),
]


def restricted(backend: str):
    b = BACKENDS[backend]
    return sdpa_kernel([b]) if b is not None else contextlib.nullcontext()


def op_rows(batch: int, device: torch.device, dtype: torch.dtype, quick: bool) -> list[dict[str, Any]]:
    rows = []
    for name, lq, lk, heads, dim in SD15_SHAPES:
        if quick:
            lq, lk = min(lq, 64), min(lk, 64)
        q = torch.randn(batch, heads, lq, dim, device=device, dtype=dtype)
        k = torch.randn(batch, heads, lk, dim, device=device, dtype=dtype)
        v = torch.randn_like(k)
        flops = 4 * batch * heads * lq * lk * dim
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
        for backend in BACKENDS:
            row: dict[str, Any] = {"layer": name, "backend": backend}
            try:
                with restricted(backend), torch.no_grad():
                    out = F.scaled_dot_product_attention(q, k, v)
                    call = lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v)  # noqa: E731
                    t = common.time_call(call, device, quick)
                row["ms"] = t["median_ms"]
                row["TFLOP/s"] = flops / (t["median_ms"] * 1e-3) / 1e12
                row["max abs err vs fp32"] = (out.float() - ref).abs().max().item()
            except Exception as e:  # noqa: BLE001 — a backend that cannot run these shapes
                row["error"] = type(e).__name__ + ": " + str(e).splitlines()[0][:80]
            rows.append(row)
    return rows


def unet_rows(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> list[dict[str, Any]]:
    case = models.random_case("sd15", Path(args.work_dir), args.quick, device)
    net = models.to_memory_format(models.load_ours(case, device, dtype), torch.channels_last)
    batches = [int(b) for b in args.unet_batches.split(",")]
    inputs = models.make_inputs(case, max(batches), device, dtype)
    inputs["x"] = inputs["x"].contiguous(memory_format=torch.channels_last)
    flops = {b: common.count_flops(lambda b=b: net(**{k: v[:b] for k, v in inputs.items()})) for b in batches}
    rows, base = [], {}
    reference = {b: net(**{k: v[:b] for k, v in inputs.items()}).float() for b in batches}
    for backend in BACKENDS:
        try:
            with restricted(backend), torch.no_grad():
                graphed = GraphedCallable(net, buckets=batches, warmup_iters=2)
                graphed.warmup(**inputs)
                for b in batches:
                    feed = {k: v[:b] for k, v in inputs.items()}
                    out = graphed(**feed).float()
                    t = common.time_call(lambda g=graphed, feed=feed: g(**feed), device, args.quick)
                    ms = t["median_ms"]
                    base.setdefault(b, ms if backend == "default" else None)
                    rows.append({
                        "batch": b, "backend": backend, "ms": ms,
                        "MFU %": common.mfu(flops[b], ms) if device.type == "cuda" else None,
                        "vs default": base[b] / ms if base.get(b) else None,
                        "rel err vs default": models.rel_err(out, reference[b]),
                    })
            graphed._signatures.clear()  # drop the graphs and their memory pool before the next backend
            common.free_memory()
        except Exception as e:  # noqa: BLE001
            rows.append({"batch": "-", "backend": backend, "error": type(e).__name__ + ": " + str(e)[:80]})
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(p)
    p.add_argument("--batch", type=int, default=32, help="images for the attention-only table")
    p.add_argument("--unet-batches", default="2,32")
    p.add_argument("--work-dir", default="/tmp/unet_bench")
    args = p.parse_args(argv)
    device = common.pick_device(args.device)
    common.setup_torch(device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    if args.quick:
        args.batch, args.unet_batches = 2, "1,2"
    report = common.Report("attention_kernels", common.env_info(device), args)
    report.table(
        f"SDPA alone at SD1.5 shapes, batch {args.batch}, {str(dtype).replace('torch.', '')}",
        op_rows(args.batch, device, dtype, args.quick),
        ["layer", "backend", "ms", "TFLOP/s", "max abs err vs fp32", "error"],
    )
    report.table(
        "SD1.5 U-Net (ours, NHWC, CUDA graph) with SDPA restricted to one backend",
        unet_rows(args, device, dtype),
        ["batch", "backend", "ms", "MFU %", "vs default", "rel err vs default", "error"],
    )
    report.print_all()


if __name__ == "__main__":
    main()
