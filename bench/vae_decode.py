"""VAE decode, SD 1.5 config (random weights) at 512²: what each recipe costs per image and how far its
pixels move from the fp32 eager decode (the server's default, UNET_SERVER_VAE_DTYPE=auto).

    python -m bench.vae_decode --out $OUT          # CUDA: fp32 / bf16, eager / fused GroupNorm / compiled
    python -m bench.vae_decode --quick             # CPU smoke test (64², one repeat)

Recipes, each at 1, 2 and 4 images per decode call (the server decodes the images finishing in one step
together, up to server.worker.VAE_DECODE_MAX_ROWS):
- ``eager``: ``AutoencoderKL.decode`` as the server runs it;
- ``fused GN``: the resnets' GroupNorm+SiLU as model.fused_groupnorm's Triton kernels (CUDA);
- ``compiled``: ``torch.compile(mode="default", dynamic=False)`` of the decode (one compile per batch size).
Columns: ms per image (median of repeats, CUDA events), PSNR and mean |Δ| in uint8 levels against the
fp32 eager images of the same latents.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench import common

SD15_VAE = {
    "_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "in_channels": 3, "latent_channels": 4,
    "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3, "sample_size": 512,
    "scaling_factor": 0.18215, "up_block_types": ["UpDecoderBlock2D"] * 4,
}  # fmt: skip


def build(folder: Path, quick: bool) -> Path:
    """The SD 1.5 VAE config (smaller when ``quick``) with diffusers' seeded random init, as safetensors."""
    import diffusers

    cfg = dict(SD15_VAE)
    if quick:
        cfg.update(block_out_channels=[32, 32], down_block_types=["DownEncoderBlock2D"] * 2,
                   up_block_types=["UpDecoderBlock2D"] * 2, layers_per_block=1)  # fmt: skip
    torch.manual_seed(0)
    diffusers.AutoencoderKL.from_config(cfg).save_pretrained(folder, safe_serialization=True)
    return folder


def to_levels(x: torch.Tensor) -> torch.Tensor:
    return ((x.float() / 2 + 0.5).clamp(0, 1) * 255).round()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(p)
    p.add_argument("--batches", default="1,2,4")
    p.add_argument("--no-compile", action="store_true")
    args = p.parse_args(argv)
    device = common.pick_device(args.device)
    common.setup_torch(device)
    from model.fused_groupnorm import available, use_fused_groupnorm
    from model.loading import load_vae

    report = common.Report("vae_decode", common.env_info(device), args)
    side = 8 if args.quick else 64  # latent side: 512² images (64² with --quick)
    batches = [int(b) for b in args.batches.split(",")]
    folder = build(Path(tempfile.mkdtemp(prefix="vae_decode_")) / "vae", args.quick)
    g = torch.Generator().manual_seed(0)
    latents = {b: torch.randn(b, 4, side, side, generator=g).to(device) for b in batches}
    dtypes = [torch.float32, torch.bfloat16]
    rows: list[dict[str, Any]] = []
    reference: dict[int, torch.Tensor] = {}
    for dtype in dtypes:
        vae = load_vae(folder, device=device, dtype=dtype)
        recipes: list[tuple[str, Any]] = [("eager", vae.decode)]
        probe = torch.zeros(1, 4, 4, 4, device=device).to(memory_format=torch.channels_last)
        if available(probe):
            recipes.append(("fused GN", "fused"))
        if device.type == "cuda" and not args.no_compile:
            recipes.append(("compiled", torch.compile(vae.decode, mode="default", dynamic=False)))
        for name, fn in recipes:
            use_fused_groupnorm(vae, enabled=fn == "fused")
            call = vae.decode if fn == "fused" else fn
            for b in batches:
                z = latents[b]
                t0 = time.monotonic()
                with torch.no_grad():
                    out = to_levels(call(z))
                    setup_s = time.monotonic() - t0
                    t = common.time_call(lambda c=call, z=z: c(z), device, quick=args.quick, repeats=5)
                if dtype == torch.float32 and name == "eager":
                    reference[b] = out
                ref = reference[b]
                finite = bool(torch.isfinite(out).all())
                mse = float(((out - ref) / 255).pow(2).mean()) if finite else math.nan
                rows.append({
                    "dtype": str(dtype).removeprefix("torch."), "recipe": name, "images": b,
                    "ms/image": t["median_ms"] / b, "first call s": setup_s,
                    "PSNR vs fp32 eager dB": -10 * math.log10(mse) if mse > 0 else math.inf,
                    "mean |Δ| levels": float((out - ref).abs().mean()) if finite else math.nan,
                })  # fmt: skip
                print(f"  {rows[-1]['dtype']:8} {name:9} {b} image(s): {rows[-1]['ms/image']:.2f} ms/image",
                      flush=True)  # fmt: skip
            use_fused_groupnorm(vae, enabled=False)
        del vae
    cols = ["dtype", "recipe", "images", "ms/image", "first call s", "PSNR vs fp32 eager dB",
            "mean |Δ| levels"]  # fmt: skip
    report.table("VAE decode, SD 1.5 config, 512² (ms per image)", rows, cols)
    report.note(f"latents {side}x{side}; fp32 eager is the server's default decode (VAE_DTYPE=auto)")
    report.print_all()
    return {"rows": rows}


if __name__ == "__main__":
    main()
