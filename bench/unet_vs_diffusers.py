"""U-Net forward, ours vs diffusers, each with its best recipe, side by side on identical random weights.

    python -m bench.unet_vs_diffusers --out $OUT                        # CUDA: SD1.5 (b 2, 32), SDXL (b 2, 8)
    python -m bench.unet_vs_diffusers --which sd15 --batches 2,32       # one model, chosen batches
    python -m bench.unet_vs_diffusers --tiny                            # CPU smoke test, tiny configs

Both sides load one diffusers folder (random init written once by diffusers' ``save_pretrained``, fp16 on
CUDA): ours through ``model.load_unet`` (the diffusers-layout loader), diffusers through
``UNet2DConditionModel.from_pretrained``. fp16, channels_last (weights and input) on both sides.

- ours: ``torch.compile(mode="default", dynamic=False)`` then a CUDA graph per batch (the server's recipe:
  ``model.pipeline.compile_pipelines`` + ``model.cuda_graphs``);
- diffusers: ``fuse_qkv_projections()``, ``torch.compile(mode="default", dynamic=False)``, then the same CUDA
  graph capture (``GraphedCallable``). diffusers' documented ``mode="max-autotune"`` did not compile one
  SD1.5 shape in 10 minutes on an H200 (issue 17), so it is not the baseline.

Per batch: ms per forward (median of CUDA-event-timed loops, both sides timed alternately), the ratio
diffusers / ours, TFLOP/s (FLOPs counted once by ``torch.utils.flop_counter`` on diffusers' eager model) and
% of the 989 TFLOP/s fp16 dense peak; and a parity check: max |ours - diffusers| on the same input next to
max |diffusers compiled - diffusers eager| (the noise that compiling alone brings) and the output scale.

SDXL: our U-Net must accept SDXL's added conditioning (``addition_embed_type="text_time"``); until it does,
the SDXL rows say why they were skipped. On CPU, ``torch.compile`` uses the ``eager`` backend (the dynamo
path is exercised; Inductor on 2 cores would take minutes) and graphs are not captured.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bench import common, models
from model.cuda_graphs import GraphedCallable

NHWC = torch.channels_last

# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (the fields that differ from diffusers'
# defaults): 3 levels, 10 transformer layers at the deepest, 2048-wide context, text_time added conditioning.
SDXL_UNET: dict[str, Any] = {
    "_class_name": "UNet2DConditionModel",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_num_groups": 32,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,  # 1280 pooled text + 6 time ids x 256
    "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "use_linear_projection": True,
}
SDXL_POOLED_DIM = 1280  # width of text_embeds (OpenCLIP-bigG's pooled output)

# Tiny stand-ins with the same block kinds (CPU smoke test).
TINY_SD15: dict[str, Any] = {
    "_class_name": "UNet2DConditionModel",
    "block_out_channels": [32, 64],
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "layers_per_block": 1,
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
    "norm_num_groups": 8,
    "sample_size": 16,
}
TINY_SDXL: dict[str, Any] = {
    "_class_name": "UNet2DConditionModel",
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "attention_head_dim": [2, 4],
    "block_out_channels": [32, 64],
    "cross_attention_dim": 32,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "projection_class_embeddings_input_dim": 16 + 6 * 8,
    "sample_size": 16,
    "transformer_layers_per_block": [1, 2],
    "use_linear_projection": True,
}


@dataclass
class Spec:
    """One U-Net to compare: its config, latent size, conditioning widths and default batches."""

    name: str
    config: dict[str, Any]
    latent: int  # latent height = width
    tokens: int  # context length
    context_dim: int
    pooled_dim: int | None = None  # SDXL text_embeds width (None: no added conditioning)
    batches: list[int] = field(default_factory=list)


def specs(tiny: bool) -> dict[str, Spec]:
    from tests.model.sd_helpers import SD15_UNET  # the published SD1.5 unet/config.json

    if tiny:
        return {
            "sd15": Spec("sd15-tiny", TINY_SD15, 16, 8, 32, batches=[2, 4]),
            "sdxl": Spec("sdxl-tiny", TINY_SDXL, 16, 8, 32, pooled_dim=16, batches=[2, 4]),
        }
    return {
        "sd15": Spec("sd15", dict(SD15_UNET), 64, 77, 768, batches=[2, 32]),
        "sdxl": Spec("sdxl", SDXL_UNET, 128, 77, 2048, pooled_dim=SDXL_POOLED_DIM, batches=[2, 8]),
    }


# --- weights ------------------------------------------------------------------------------------------


def random_folder(spec: Spec, work: Path, device: torch.device) -> Path:
    """A diffusers UNet2DConditionModel folder with seeded random weights, written once per config/dtype."""
    import diffusers

    models.quiet_diffusers()
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    key = hashlib.sha1(json.dumps([spec.config, str(dtype)], sort_keys=True).encode()).hexdigest()[:10]
    folder = work / f"{spec.name}-{key}"
    if (folder / "config.json").is_file() and any(folder.glob("*.safetensors")):
        return folder
    torch.manual_seed(0)
    with torch.device(device):  # init on the GPU: SDXL's 2.6 B parameters in seconds
        net = diffusers.UNet2DConditionModel.from_config(spec.config)
    net.to(dtype).save_pretrained(folder, safe_serialization=True)
    return folder


def make_inputs(spec: Spec, batch: int, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Seeded inputs for ``batch`` rows: x (B, 4, h, w) channels_last on CUDA, t (B,), context (B, L, D),
    and for SDXL text_embeds (B, P) and time_ids (B, 6)."""
    g = torch.Generator().manual_seed(1)
    s = spec.latent
    x = torch.randn(batch, 4, s, s, generator=g).to(device, dtype)
    if device.type == "cuda":
        x = x.contiguous(memory_format=NHWC)
    inputs = {
        "x": x,
        "t": (torch.rand(batch, generator=g) * 999).to(device),
        "context": torch.randn(batch, spec.tokens, spec.context_dim, generator=g).to(device, dtype),
    }
    if spec.pooled_dim is not None:
        inputs["text_embeds"] = torch.randn(batch, spec.pooled_dim, generator=g).to(device, dtype)
        size = 8 * spec.latent
        # (orig h, orig w, crop top, crop left, target h, target w), as SDXL's pipeline builds them
        ids = torch.tensor([size, size, 0, 0, size, size], dtype=torch.float32)
        inputs["time_ids"] = ids.expand(batch, 6).to(device, dtype)
    return inputs


# --- the two implementations behind one call ----------------------------------------------------------


def diffusers_call(unet: torch.nn.Module) -> Callable[..., torch.Tensor]:
    """fn(x, t, context, [text_embeds, time_ids]) -> (B, 4, h, w) through diffusers' forward."""

    def fn(x, t, context, text_embeds=None, time_ids=None):
        added = None if text_embeds is None else {"text_embeds": text_embeds, "time_ids": time_ids}
        return unet(x, t, encoder_hidden_states=context, added_cond_kwargs=added, return_dict=False)[0]

    return fn


def ours_call(unet: torch.nn.Module, sdxl: bool) -> Callable[..., torch.Tensor]:
    """fn(x, t, context, [text_embeds, time_ids]) through ``model.unet.UNet.forward``.

    SDXL's added conditioning is passed by whichever name our forward takes (it is being added): a dict
    ``added_cond_kwargs`` / ``added_cond`` like diffusers', or ``text_embeds`` + ``time_ids`` keywords.
    Raises NotImplementedError when it takes none of them."""
    params = inspect.signature(type(getattr(unet, "_orig_mod", unet)).forward).parameters
    if not sdxl:
        return lambda x, t, context: unet(x, t, context=context)
    for name in ("added_cond_kwargs", "added_cond"):
        if name in params:
            return lambda x, t, context, text_embeds, time_ids: unet(
                x, t, context=context, **{name: {"text_embeds": text_embeds, "time_ids": time_ids}}
            )
    if "text_embeds" in params and "time_ids" in params:
        return lambda x, t, context, text_embeds, time_ids: unet(
            x, t, context=context, text_embeds=text_embeds, time_ids=time_ids
        )
    raise NotImplementedError(
        "model.unet.UNet.forward takes no SDXL added conditioning (added_cond_kwargs / text_embeds+time_ids)"
    )


def load_both(
    spec: Spec, folder: Path, device: torch.device, dtype: torch.dtype, fused_groupnorm: bool = False,
    fp8: bool = False,
) -> tuple[torch.nn.Module, torch.nn.Module | None, str | None]:  # fmt: skip
    """(diffusers U-Net, ours or None, why ours is None): both eval, fp16/fp32, channels_last on CUDA.
    ``fused_groupnorm``: our resnets' GroupNorm(+add)+SiLU as model.fused_groupnorm's Triton kernels;
    ``fp8``: our attention and feed-forward linears in e4m3 (model.fp8)."""
    import diffusers

    import model

    models.quiet_diffusers()
    ref = diffusers.UNet2DConditionModel.from_pretrained(folder, torch_dtype=dtype).to(device).eval()
    if device.type == "cuda":
        ref.to(memory_format=NHWC)
    try:
        ours = model.load_unet(folder, device=device, dtype=dtype)  # channels_last on CUDA
        ours_call(ours, spec.pooled_dim is not None)  # raises when the forward lacks SDXL's inputs
        if fused_groupnorm:
            from model.fused_groupnorm import use_fused_groupnorm

            use_fused_groupnorm(ours)
        if fp8:
            from model.fp8 import use_fp8

            use_fp8(ours)
    except (ValueError, NotImplementedError, KeyError) as e:
        return ref, None, f"{type(e).__name__}: {str(e)[:300]}"
    return ref, ours, None


def compile_module(net: Any, device: torch.device, enabled: bool) -> Any:
    """torch.compile(mode="default", dynamic=False) of a module or function on CUDA; on CPU the eager backend
    (the dynamo path only: Inductor on 2 cores takes minutes)."""
    if not enabled:
        return net
    if device.type == "cuda":
        return torch.compile(net, mode="default", dynamic=False)
    return torch.compile(net, backend="eager", dynamic=False)


@dataclass
class Runner:
    """One side's graphed (or eager) forward over the benchmark's batches."""

    name: str
    graphed: GraphedCallable
    feeds: dict[int, dict[str, torch.Tensor]]
    setup_s: float

    def __call__(self, batch: int) -> torch.Tensor:
        return self.graphed(**self.feeds[batch])


def build_runner(
    name: str,
    fn: Callable[..., torch.Tensor],
    inputs: dict[str, torch.Tensor],
    batches: list[int],
    device: torch.device,
    graphs: bool,
) -> Runner:
    """Compile (lazily, per shape) and capture every batch, largest first, one graph pool per side."""
    t0 = time.monotonic()
    graphed = GraphedCallable(fn, buckets=batches, device=device, use_graphs=graphs, warmup_iters=3)
    feeds = {b: {k: v[:b] for k, v in inputs.items()} for b in batches}
    graphed.warmup(**feeds[max(batches)])
    common.sync(device)
    return Runner(name, graphed, feeds, time.monotonic() - t0)


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


# --- one model ----------------------------------------------------------------------------------------


def bench_spec(
    spec: Spec, batches: list[int], args: argparse.Namespace, device: torch.device, report: common.Report,
    budget: common.Budget, rows: list[dict[str, Any]],
) -> None:  # fmt: skip
    """Measure one model; append a row per batch to ``rows`` (the report is rewritten after each)."""
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    t0 = time.monotonic()
    folder = random_folder(spec, Path(args.work_dir), device)
    ref, ours, why = load_both(spec, folder, device, dtype, args.fused_groupnorm, args.fp8)
    sdxl = spec.pooled_dim is not None
    params = models.param_count(ref) / 1e6
    report.note(
        f"{spec.name}: {params:.0f}M params, folder {folder}, made+loaded in {time.monotonic() - t0:.1f}s"
    )
    if ours is None:
        report.note(f"{spec.name}: SKIPPED, our U-Net cannot load/run this config yet: {why}")
        rows += [{"model": spec.name, "batch": b, "note": "skipped: ours unsupported"} for b in batches]
        return
    inputs = make_inputs(spec, max(batches), device, dtype)
    with torch.no_grad():
        one = {k: v[:1] for k, v in inputs.items()}
        flops = common.count_flops(lambda: diffusers_call(ref)(**one))  # per image
        b0 = min(batches)
        feed0 = {k: v[:b0] for k, v in inputs.items()}
        eager_ref = diffusers_call(ref)(**feed0).float()
        eager_ours = ours_call(ours, sdxl)(**feed0).float()
    report.note(
        f"{spec.name}: {flops / 1e9:.3g} GFLOP per image; eager parity at batch {b0}: max|ours-diffusers| "
        f"{max_abs(eager_ours, eager_ref):.2e} (max|diffusers| {float(eager_ref.abs().max()):.2f})"
    )
    graphs = device.type == "cuda" and not args.no_graphs
    compile_on = not args.no_compile
    # diffusers' speed recipe: fused QKV projections (one GEMM instead of three), then compile.
    ref.fuse_qkv_projections()
    runners: list[Runner] = []
    for name, net, call in (
        ("diffusers", ref, diffusers_call),
        ("ours", ours, lambda n: ours_call(n, sdxl)),
    ):
        if budget.exhausted():
            report.note(f"{spec.name}/{name}: skipped (budget)")
            continue
        try:
            with torch.no_grad():
                runners.append(
                    build_runner(
                        name, call(compile_module(net, device, compile_on)), inputs, batches, device, graphs
                    )
                )
            print(f"  {spec.name} {name}: compiled+captured in {runners[-1].setup_s:.1f}s", flush=True)
        except Exception as e:  # noqa: BLE001 - report it, go on with the other side
            report.note(f"{spec.name}/{name}: FAILED to build: {type(e).__name__}: {str(e)[:400]}")
            if args.verbose:
                traceback.print_exc()
            common.free_memory()
    by = {r.name: r for r in runners}
    for b in batches:
        row: dict[str, Any] = {"model": spec.name, "batch": b}
        try:
            with torch.no_grad():
                outs = {n: r(b).float().clone() for n, r in by.items()}
                ref_b = diffusers_call(ref)(**{k: v[:b] for k, v in inputs.items()}).float()  # fused, eager
                if "ours" in outs and "diffusers" in outs:
                    row["max|ours-diff|"] = max_abs(outs["ours"], outs["diffusers"])
                if "diffusers" in outs:
                    row["max|diff c-e|"] = max_abs(outs["diffusers"], ref_b)
                row["max|out|"] = float(ref_b.abs().max())
                row["finite"] = all(bool(torch.isfinite(o).all()) for o in outs.values())
                # alternate the two sides so that clock or thermal drift hits both alike
                times: dict[str, list[float]] = {n: [] for n in by}
                for _ in range(1 if args.tiny else args.rounds):
                    for n, r in by.items():
                        tm = common.time_call(lambda r=r, b=b: r(b), device, quick=args.tiny, repeats=3)
                        times[n].append(tm["median_ms"])
            for n, ts in times.items():
                ms = sorted(ts)[len(ts) // 2]
                row[f"{n} ms"] = ms
                row[f"{n} TFLOP/s"] = flops * b / (ms * 1e-3) / 1e12
                row[f"{n} %peak"] = common.mfu(flops * b, ms)
            if "ours ms" in row and "diffusers ms" in row:
                row["speedup"] = row["diffusers ms"] / row["ours ms"]
        except Exception as e:  # noqa: BLE001
            row["note"] = "OOM" if common.is_oom(e) else f"{type(e).__name__}: {str(e)[:120]}"
            if args.verbose:
                traceback.print_exc()
        rows.append(row)
        publish(report, rows)
        print(f"  {spec.name} batch {b}: {common.fmt(row.get('diffusers ms'))} ms diffusers, "
              f"{common.fmt(row.get('ours ms'))} ms ours", flush=True)  # fmt: skip
    for r in runners:
        row = next((x for x in rows if x["model"] == spec.name and x["batch"] == min(batches)), None)
        if row is not None:
            row[f"{r.name} setup s"] = r.setup_s
        r.graphed._signatures.clear()
    runners.clear()
    by.clear()
    common.free_memory()
    publish(report, rows)


def publish(report: common.Report, rows: list[dict[str, Any]]) -> None:
    """(Re)write the one table: a run cut short by its time limit still leaves every finished row."""
    report.tables.clear()
    report.table(
        "U-Net forward: ours vs diffusers (ms per forward; speedup = diffusers / ours)", rows, COLUMNS
    )


COLUMNS = [
    "model", "batch", "diffusers ms", "ours ms", "speedup", "ours TFLOP/s", "ours %peak", "diffusers %peak",
    "max|ours-diff|", "max|diff c-e|", "max|out|", "finite", "ours setup s", "diffusers setup s", "note",
]  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--which", default="sd15,sdxl", help="comma list of: sd15, sdxl")
    p.add_argument("--batches", default=None, help="override every model's batches, e.g. 2,32")
    p.add_argument("--no-compile", action="store_true", help="both sides without torch.compile")
    p.add_argument("--no-graphs", action="store_true", help="both sides without CUDA graphs")
    p.add_argument("--tiny", action="store_true", help="tiny configs (CPU smoke test)")
    p.add_argument("--rounds", type=int, default=3, help="alternating timing rounds per batch (median)")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument("--out", default=None, help="folder for unet_vs_diffusers.json")
    p.add_argument("--budget-s", type=float, default=None, help="skip what would start past this")
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
    device = common.pick_device(args.device)
    common.setup_torch(device)
    common.set_sdpa_backend(args.sdpa_backend)
    import torch._dynamo.config as dynamo_config

    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 16)  # one graph per batch per side
    report = common.Report("unet_vs_diffusers", common.env_info(device), args)
    recipe = "compile(default)+CUDA graphs" if not args.no_compile else "no compile"
    if device.type != "cuda":
        recipe = "CPU: compile backend eager, no graphs" if not args.no_compile else "CPU eager"
    ours_recipe = recipe
    if args.fused_groupnorm:
        ours_recipe += " + fused GroupNorm+SiLU (Triton)"
    if args.fp8:
        ours_recipe += " + FP8 attention/feed-forward linears (max|ours-diff| is then their error too)"
    report.note(
        f"recipe: ours {ours_recipe}; diffusers fuse_qkv_projections + {recipe}; fp16 on CUDA, fp32 on CPU"
    )
    if args.sdpa_backend != "auto":
        report.note(f"attention: both sides restricted to SDPA's {args.sdpa_backend} kernels")
    budget = common.Budget(args.budget_s)
    table = specs(args.tiny)
    rows: list[dict[str, Any]] = []
    for key in args.which.split(","):
        spec = table[key.strip()]
        batches = [int(b) for b in args.batches.split(",")] if args.batches else spec.batches
        if budget.exhausted():
            report.note(f"{spec.name}: skipped (budget)")
            continue
        try:
            bench_spec(spec, batches, args, device, report, budget, rows)
        except Exception as e:  # noqa: BLE001
            report.note(f"{spec.name}: FAILED: {type(e).__name__}: {str(e)[:400]}")
            if args.verbose:
                traceback.print_exc()
        common.free_memory()
        publish(report, rows)
    report.print_all()


if __name__ == "__main__":
    main()
