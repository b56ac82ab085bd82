"""Per-row LoRA (issue 16): the U-Net with 8 adapters mixed in a batch vs none; the server vs diffusers.

    python -m bench.lora_bench --out $OUT                 # CUDA: SD1.5 config, random weights, fp16
    python -m bench.lora_bench --quick --device cpu       # CPU smoke test: tiny configs, every path

Part 1, U-Net forward (CUDA graph per variant, as the server replays them; ``--compile`` adds
``torch.compile`` before capture, the server's UNET_SERVER_COMPILE recipe): SD1.5's U-Net config with random
weights, batch ``--rows`` (32) at 64x64 latents, 77x768 context; 8 random rank-16 adapters on the attention
(to_q/k/v/out) and feed-forward linears (``model.lora_batched.LoraBank``, 1 page of rank 16 per adapter,
one page per row). Variants: ``base`` (no adapters: the plain graph), ``8 adapters`` (row i carries adapter
i % 8), ``slot 0 only`` (the LoRA graph, every row on the zero page: the gather-only cost), and the same at
64 rows (one pass of 32 guided images). The bar: ``8 adapters`` runs at >= 85% of ``base``.

Part 2, end to end: an SD1.5-config pipeline folder (random fp16 weights, tests.model.sd_helpers), 8 PEFT
adapter files in its ``loras/``, 32 images (512x512, 20 Euler steps, guidance 7.5), image i with adapter
i % 8:
- ours: the real server (``server.app``, engine process, CUDA graphs, ``--compile`` optional) on a local
  port; 32 concurrent /generate requests, one image each (one pass of 64 rows per step). Timed after a
  warm-up round; the same 32 without adapters for reference;
- diffusers: ``StableDiffusionPipeline`` fp16 with ``enable_lora_hotswap(target_rank=16)``, the U-Net under
  ``torch.compile(mode="default")``; adapter group by group (4 images = 8 rows per call), each group's
  adapter hot-swapped in (``load_lora_weights(..., hotswap=True)``). Timed after a warm-up over two groups
  (compilation). Where its time goes: hot-swap loads vs pipeline calls.
The bar: ours >= 1.5x faster. Results print as tables and go to $OUT/lora_bench.json.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from bench.common import Report, add_common_args, env_info, pick_device, setup_torch, sync, time_call

ATTN_FF = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
           "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2")  # fmt: skip
TINY_UNET = {
    "_class_name": "UNet2DConditionModel", "sample_size": 8, "in_channels": 4, "out_channels": 4,
    "block_out_channels": [32, 64], "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "layers_per_block": 1, "norm_num_groups": 8,
    "attention_head_dim": 8, "cross_attention_dim": 32,
}  # fmt: skip


def random_adapters(specs: dict[str, Any], n: int, rank: int, seed: int = 0) -> list[Any]:
    """``n`` LoraAdapters of ``rank`` on the attention and feed-forward linears, random weights."""
    from model.lora import LoraAdapter, LoraLayer

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        layers = {}
        for name, s in specs["unet"].items():
            if name.endswith(ATTN_FF):
                down = torch.randn(rank, s.in_features, generator=g) / s.in_features**0.5
                up = torch.randn(s.out_features, rank, generator=g) * 0.1 / rank**0.5
                layers[name] = LoraLayer(down, up, 1.0)
        out.append(LoraAdapter({"unet": layers}, "peft"))
    return out


# -- part 1 ----------------------------------------------------------------------------------------------


def forward_bench(args: argparse.Namespace, device: torch.device, report: Report) -> None:
    from model.config import UNetConfig
    from model.cuda_graphs import GraphedCallable
    from model.lora import layer_specs
    from model.lora_batched import LoraBank
    from model.unet import UNet
    from tests.model.sd_helpers import SD15_UNET

    quick = args.quick
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    cfg = UNetConfig.from_dict(TINY_UNET if quick else SD15_UNET)
    unet = UNet(cfg).to(device, dtype).eval()
    size, ctx_dim = (8, 32) if quick else (64, 768)
    specs = layer_specs({"unet": unet})
    adapters = random_adapters(specs, 8, args.rank)
    row_counts = [args.rows] if quick else [args.rows, 2 * args.rows]
    bank = LoraBank({"unet": unet}, pages=9, page_rank=args.rank, row_pages=1, max_rows=max(row_counts),
                    convs=False)  # fmt: skip
    for i, a in enumerate(adapters):
        bank.write([i + 1], a)
    fn = unet
    if args.compile and device.type == "cuda":
        fn = torch.compile(unet, mode="default", dynamic=False)

    def call(x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return fn(x, t, context=context)

    rows_out = []
    for rows in row_counts:
        x = torch.randn(rows, 4, size, size, device=device, dtype=dtype)
        t = torch.full((rows,), 500.0, device=device)
        ctx = torch.randn(rows, 77, ctx_dim, device=device, dtype=dtype)
        base = GraphedCallable(call, buckets=(rows,), device=device)
        base.warmup(x=x, t=t, context=ctx)
        lora = GraphedCallable(call, buckets=(rows,), device=device)
        with bank.rows():
            lora.warmup(x=x, t=t, context=ctx)
        mixed = torch.tensor([[1 + i % 8] for i in range(rows)])
        ones = torch.ones(rows, 1)
        zeros = torch.zeros(rows, 1, dtype=torch.long)

        inputs = {"x": x, "t": t, "context": ctx}

        def run_lora(graph: GraphedCallable = lora, inputs: dict[str, Any] = inputs) -> Any:
            with bank.rows():  # replays read the rows bank.fill wrote
                return graph(**inputs)

        bank.fill(mixed.to(device), ones.to(device))
        t_base = time_call(lambda g=base, i=inputs: g(**i), device, quick)
        t_mixed = time_call(run_lora, device, quick)
        bank.fill(zeros.to(device), ones.to(device))
        t_zero = time_call(run_lora, device, quick)
        sync(device)
        b = t_base["median_ms"]
        for name, tm in (("base", t_base), ("8 adapters", t_mixed), ("slot 0 only", t_zero)):
            rows_out.append({
                "rows": rows, "variant": name, "ms": tm["median_ms"], "spread_%": tm["spread_pct"],
                "base/this": b / tm["median_ms"], "rows/s": rows / tm["median_ms"] * 1e3,
            })  # fmt: skip
    title = f"U-Net forward, {'tiny' if quick else 'SD1.5 config'}, rank {args.rank}" + (
        ", torch.compile" if fn is not unet else ""
    )
    report.table(title, rows_out, ["rows", "variant", "ms", "spread_%", "base/this", "rows/s"])
    mixed32 = next(r for r in rows_out if r["rows"] == args.rows and r["variant"] == "8 adapters")
    report.note(f"bar: 8 adapters at {args.rows} rows run at {mixed32['base/this']:.1%} of base (>= 85%)")
    bank.remove()


# -- part 2 ----------------------------------------------------------------------------------------------


def build_folder(work: Path, quick: bool) -> tuple[Path, str, int]:
    """(weights dir, model name, image size): the pipeline folder and 8 PEFT adapters in its loras/."""
    from model.lora import LayerSpec, layer_specs
    from tests.model.lora_helpers import random_layers, write_peft
    from tests.model.sd_helpers import build_sd15_random, build_tiny_sd

    weights = work / "weights"
    name = "tiny-sd" if quick else "sd15"
    folder = weights / name
    if not (folder / "model_index.json").is_file():
        if quick:
            build_tiny_sd(folder)
        else:
            build_sd15_random(folder, variant="fp16")
    loras = weights / "loras"
    if not (loras / "a7.safetensors").is_file():
        from model.config import UNetConfig
        from model.loading import read_config
        from model.unet import UNet

        with torch.device("meta"):  # the layer shapes only
            unet = UNet(UNetConfig.from_dict(read_config(folder / "unet")))
        specs: dict[str, dict[str, LayerSpec]] = layer_specs({"unet": unet})
        loras.mkdir(parents=True, exist_ok=True)
        for i in range(8):
            layers = random_layers(specs, 16, seed=100 + i, unet=ATTN_FF, text=(), std=0.3)
            write_peft(loras / f"a{i}.safetensors", layers, 16, 16.0, specs)
    return weights, name, 64 if quick else 512


def start_ours(weights: Path, model: str, args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    from tests.server.conftest import free_port

    port = free_port()
    env = {
        **os.environ, "UNET_SERVER_WEIGHTS_DIR": str(weights), "UNET_SERVER_MODELS": model,
        "UNET_SERVER_MAX_BATCH_ROWS": "64", "UNET_SERVER_BATCH_BUCKETS": args.buckets,
        "UNET_SERVER_MAX_IMAGE_SIZE": "512", "UNET_SERVER_LOG_LEVEL": "warning",
        "UNET_SERVER_LORA_PAGES": "8", "UNET_SERVER_LORA_PAGE_RANK": "16", "UNET_SERVER_LORA_ROW_PAGES": "1",
        "UNET_SERVER_COMPILE": "true" if args.compile else "false", "UNET_SERVER_MAX_QUEUE_SIZE": "256",
    }  # fmt: skip
    if args.quick:
        env["UNET_SERVER_DEVICE"] = "cpu"
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "server", "--host", "127.0.0.1", "--port", str(port)],
                            env=env, cwd=str(Path(__file__).resolve().parents[1]))  # fmt: skip
    import httpx

    deadline = time.monotonic() + args.ready_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("the server exited during start-up")
        try:
            if httpx.get(url + "/health/ready", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise TimeoutError("the server did not become ready")


def ours_round(url: str, bodies: list[dict[str, Any]]) -> float:
    import httpx

    async def run() -> list[Any]:
        async with httpx.AsyncClient(base_url=url, timeout=600) as c:
            return await asyncio.gather(*(c.post("/generate", json=b) for b in bodies))

    t0 = time.perf_counter()
    rs = asyncio.run(run())
    dt = time.perf_counter() - t0
    bad = [r.text[:300] for r in rs if r.status_code != 200]
    if bad:
        raise RuntimeError(f"{len(bad)} requests failed: {bad[0]}")
    return dt


def diffusers_run(folder: Path, weights: Path, args: argparse.Namespace, device: torch.device,
                  size: int, images: int, steps: int) -> dict[str, float]:  # fmt: skip
    import diffusers

    dtype = torch.float16 if device.type == "cuda" else torch.float32
    variant = None if args.quick else "fp16"
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(
        folder, torch_dtype=dtype, variant=variant, safety_checker=None, requires_safety_checker=False
    ).to(device)
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe.enable_lora_hotswap(target_rank=16)
    loras = weights / "loras"
    pipe.load_lora_weights(str(loras), weight_name="a0.safetensors", adapter_name="default_0")
    if device.type == "cuda":
        pipe.unet = torch.compile(pipe.unet, mode="default", dynamic=False)
    per_group = images // 8

    def group(i: int) -> tuple[float, float]:
        t0 = time.perf_counter()
        pipe.load_lora_weights(str(loras), weight_name=f"a{i}.safetensors", adapter_name="default_0",
                               hotswap=True)  # fmt: skip
        sync(device)
        t1 = time.perf_counter()
        gen = torch.Generator(device).manual_seed(i)
        pipe(["a photo of a striped shirt"] * per_group, negative_prompt=["blurry"] * per_group,
             num_inference_steps=steps, guidance_scale=7.5, height=size, width=size, generator=gen,
             output_type="np")  # fmt: skip
        sync(device)
        return t1 - t0, time.perf_counter() - t1

    for i in (1, 0):  # warm-up: compilation, then a hot-swap back
        group(i)
    t0 = time.perf_counter()
    loads = calls = 0.0
    for i in range(8):
        a, b = group(i)
        loads, calls = loads + a, calls + b
    return {"total_s": time.perf_counter() - t0, "hotswap_s": loads, "pipeline_s": calls}


def end_to_end(args: argparse.Namespace, device: torch.device, report: Report) -> None:
    work = Path(args.work)
    weights, model, size = build_folder(work, args.quick)
    images, steps = (8, 3) if args.quick else (32, 20)
    bodies = [
        {"model": model, "prompt": "a photo of a striped shirt", "negative_prompt": "blurry", "seed": i,
         "sampler": "euler", "num_inference_steps": steps, "guidance_scale": 7.5, "width": size,
         "height": size, "loras": [{"name": f"a{i % 8}", "scale": 1.0}]}
        for i in range(images)
    ]  # fmt: skip
    rows = []
    proc, url = start_ours(weights, model, args)
    try:
        ours_round(url, bodies)  # warm-up: adapters read and paged in, every path run once
        t_lora = min(ours_round(url, bodies) for _ in range(2))
        plain = [{**b, "loras": None} for b in bodies]
        ours_round(url, plain)
        t_plain = min(ours_round(url, plain) for _ in range(2))
    finally:
        proc.terminate()
        proc.wait(60)
    rows.append({"who": "ours, 8 adapters", "images": images, "s": t_lora, "img/s": images / t_lora})
    rows.append({"who": "ours, no adapters", "images": images, "s": t_plain, "img/s": images / t_plain})
    if device.type == "cuda":
        torch.cuda.empty_cache()
    d = diffusers_run(weights / model, weights, args, device, size, images, steps)
    rows.append(
        {
            "who": "diffusers, hot-swap + compile",
            "images": images,
            "s": d["total_s"],
            "img/s": images / d["total_s"],
            "hotswap_s": d["hotswap_s"],
            "pipeline_s": d["pipeline_s"],
        }
    )
    for r in rows:
        r["vs diffusers"] = d["total_s"] / r["s"]
    title = f"{images} images, {size}x{size}, {steps} Euler steps, guidance 7.5, image i with adapter i % 8"
    report.table(title, rows, ["who", "images", "s", "img/s", "vs diffusers", "hotswap_s", "pipeline_s"])
    report.note(
        f"bar: ours {d['total_s'] / t_lora:.2f}x diffusers (>= 1.5x); ours runs one pass of {2 * images} "
        f"rows per step for all adapters, diffusers 8 groups of {2 * images // 8} rows (+ a hot-swap each)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(parser)
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--compile", action="store_true", help="torch.compile before graph capture")
    parser.add_argument("--skip", default="", help="comma list of parts to skip: forward,e2e")
    parser.add_argument("--work", default="/tmp/lora-bench-work", help="where the SD1.5 folder is built")
    parser.add_argument("--ready-timeout", type=float, default=900.0)
    parser.add_argument("--buckets", default="2,4,8,16,32,64",
                        help="the server's batch buckets (fewer with --compile: each compiles at start-up)")
    args = parser.parse_args()
    device = pick_device(args.device)
    setup_torch(device)
    if args.quick:
        args.rows = min(args.rows, 8)
    report = Report("lora_bench", env_info(device), args)
    skip = set(filter(None, args.skip.split(",")))
    if "forward" not in skip:
        forward_bench(args, device, report)
    if "e2e" not in skip:
        end_to_end(args, device, report)
    report.print_all()
    if args.quick and not args.out:
        shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
