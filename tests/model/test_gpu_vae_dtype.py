"""GPU: the SD 1.5-config VAE (published config, random weights) decoded in bf16 and fp16 vs fp32, 512²:
pixel error (PSNR, mean |Δ| in uint8 levels), finiteness, and decode time per image (what
UNET_SERVER_VAE_DTYPE=bfloat16 buys and costs).

Run on a CUDA machine: .venv/bin/python -m pytest -m gpu -s -q tests/model/test_gpu_vae_dtype.py
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest
import torch

from model.loading import load_vae
from model.vae import AutoencoderKL
from server.worker import VAE_DECODE_MAX_ROWS
from tests.model.sd_helpers import SD15_VAE

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

# bf16 keeps 8 mantissa bits (fp32's exponent range). The same VAE (seed 0) and latents at 256² on the CPU
# (torch 2.13, oneDNN bf16): 49.6 dB vs fp32, mean |Δ| 0.55 levels (max 7); fp16 there: 59.8 dB, finite.
# 40 dB (~2.5 levels RMS) leaves ~10 dB for other kernels (cuDNN) and the larger size.
MIN_PSNR_DB = 40.0


def build_vae(folder: Path) -> Path:
    """The SD 1.5 VAE config with diffusers' random init (seeded), saved as safetensors (fp32)."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    with torch.device("cuda"):
        vae = diffusers.AutoencoderKL.from_config(SD15_VAE)
    vae.cpu().save_pretrained(folder, safe_serialization=True)
    return folder


def images(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """uint8-level images in [0, 255] as fp32 (N, 3, H, W), NaN kept; as the server decodes (sliced)."""
    with torch.no_grad():
        x = vae.decode_sliced(latents, VAE_DECODE_MAX_ROWS).float()
    return ((x / 2 + 0.5).clamp(0, 1) * 255).round().where(torch.isfinite(x), float("nan"))


def ms_per_image(vae: AutoencoderKL, latents: torch.Tensor, reps: int = 5) -> float:
    with torch.no_grad():
        vae.decode_sliced(latents, VAE_DECODE_MAX_ROWS)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            vae.decode_sliced(latents, VAE_DECODE_MAX_ROWS)
        torch.cuda.synchronize()
    return 1e3 * (time.perf_counter() - t0) / reps / latents.shape[0]


def test_bf16_vae_decode_is_close_to_fp32_and_finite(tmp_path: Path) -> None:
    folder = build_vae(tmp_path / "vae")
    latents = torch.randn(4, 4, 64, 64, generator=torch.Generator().manual_seed(0)).cuda()  # 512² images
    out, times = {}, {}
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        vae = load_vae(folder, device="cuda", dtype=dtype)
        out[dtype], times[dtype] = images(vae, latents), ms_per_image(vae, latents)
        del vae
    ref = out[torch.float32]
    assert torch.isfinite(ref).all() and ref.std() > 1  # a decoded image, not a flat one
    for dtype in (torch.bfloat16, torch.float16):
        finite = bool(torch.isfinite(out[dtype]).all())
        d = (out[dtype] - ref) / 255
        psnr = -10 * math.log10(float(d.pow(2).mean())) if finite else float("nan")
        levels = float((out[dtype] - ref).abs().mean()) if finite else float("nan")
        print(f"\n{dtype}: finite {finite}, PSNR {psnr:.1f} dB vs fp32, mean |Δ| {levels:.2f} levels, "
              f"{times[dtype]:.2f} ms/image (fp32 {times[torch.float32]:.2f})")  # fmt: skip
    bf16 = out[torch.bfloat16]
    assert torch.isfinite(bf16).all(), "bf16 VAE decode overflowed (it has fp32's exponent range)"
    psnr = -10 * math.log10(float(((bf16 - ref) / 255).pow(2).mean()))
    assert psnr > MIN_PSNR_DB, f"bf16 vs fp32: {psnr:.1f} dB"
    # the speed is printed, not asserted: timings are for benchmarks (bench.pipeline_vs_diffusers), not tests
