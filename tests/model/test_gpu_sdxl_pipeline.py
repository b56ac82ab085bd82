"""GPU: an SDXL-config pipeline folder (the real SDXL base configs, random weights, fp16 files) through our
model path (load_pipelines, SDXLTextEncoder, model.sdxl rows, Denoiser + CFG + Euler, fp32 VAE as
force_upcast says) vs diffusers' StableDiffusionXLPipeline, 1024², 20 steps, guidance 5.0.

Run on a CUDA machine: .venv/bin/python -m pytest -m gpu -s -q tests/model/test_gpu_sdxl_pipeline.py
(building the folder takes a few minutes of CPU and ~16 GB of RAM; the served version with throughput is
bench/sdxl_serving.py).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

from model.denoiser import cfg_combine
from model.pipeline import load_pipelines
from model.samplers import get_sampler, sample
from model.sdxl import conditioning_rows, time_ids, zero_uncond
from tests.model.sdxl_helpers import build_sdxl_random

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

PROMPT = "a photo of an astronaut riding a horse on mars"


def run_ours(root: Path, latents: torch.Tensor, size: int, steps: int) -> tuple[torch.Tensor, float]:
    """Our model path on CUDA fp16: images (1, H, W, 3) in [0, 1] on the CPU, and the seconds it took."""
    p = load_pipelines(root.parent, [root.name], device="cuda", dtype=torch.float16)[root.name]
    assert p.is_sdxl and p.vae.dtype == torch.float32  # force_upcast: the VAE runs in fp32
    t0 = time.perf_counter()
    enc = p.text_encoder.encode_with_info([PROMPT, ""])
    context, added = conditioning_rows(
        (enc.states[0], enc.pooled[0]), (enc.states[1], enc.pooled[1]), time_ids(size, size), 1,
        zeros=zero_uncond(None, p.force_zeros_for_empty_prompt),
    )  # fmt: skip
    sampler = get_sampler("euler", p.schedule.kind)
    sigmas = sampler.make_sigmas(p.schedule, steps)

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        x0 = p.denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), context=context, added_cond=added)
        return cfg_combine(x0[:1], x0[1:], 5.0)

    with torch.no_grad():
        out = sample(denoise, latents.to("cuda"), sigmas, sampler)
        images = (p.vae.decode(out).float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu()
    torch.cuda.synchronize()
    return images, time.perf_counter() - t0


def compare(root: Path, size: int, steps: int) -> dict[str, float]:
    """Mean/max |Δ| of final images in [0, 1]: ours fp16 vs diffusers fp16, both vs diffusers fp32."""
    diffusers = pytest.importorskip("diffusers")
    latents = torch.randn(1, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(0))
    ours, ours_s = run_ours(root, latents, size, steps)
    torch.cuda.empty_cache()  # our pipeline is gone: room for diffusers' fp32 one

    def theirs(dtype: torch.dtype) -> torch.Tensor:
        pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(root, variant="fp16", dtype=dtype)
        pipe = pipe.to("cuda")
        pipe.set_progress_bar_config(disable=True)
        with torch.no_grad():
            img = pipe(PROMPT, height=size, width=size, num_inference_steps=steps, guidance_scale=5.0,
                       latents=latents.to("cuda", dtype), output_type="pt").images  # fmt: skip
        del pipe
        torch.cuda.empty_cache()
        return img.float().permute(0, 2, 3, 1).cpu()

    ref16, ref32 = theirs(torch.float16), theirs(torch.float32)
    return {
        "ours_vs_diffusers_max": (ours - ref16).abs().max().item(),
        "ours_vs_diffusers_mean": (ours - ref16).abs().mean().item(),
        "ours_vs_fp32_mean": (ours - ref32).abs().mean().item(),
        "diffusers_vs_fp32_mean": (ref16 - ref32).abs().mean().item(),
        "image_std": ref32.std().item(),
        "ours_seconds": ours_s,
    }


def test_sdxl_pipeline_fp16_matches_diffusers(tmp_path):
    # UNET_SERVER_SDXL_FOLDER: a folder bench/sdxl_serving.py built (it writes .complete), to skip the build
    prebuilt = Path(os.environ.get("UNET_SERVER_SDXL_FOLDER", "/nonexistent"))
    if (prebuilt / ".complete").is_file():
        root = prebuilt
    else:
        root = build_sdxl_random(tmp_path / "sdxl-random", variant="fp16")
    r = compare(root, 1024, 20)
    print(f"\n[sdxl pipeline fp16 1024² 20 steps euler] card={torch.cuda.get_device_name()} {r}")
    assert all(v == v for v in r.values()), "NaN: an fp16 overflow"
    # fp16: each implementation rounds differently; ours stays as close to fp32 as diffusers' fp16 does
    assert r["ours_vs_fp32_mean"] <= 2 * r["diffusers_vs_fp32_mean"] + 2e-3
    assert r["ours_vs_diffusers_mean"] <= 1e-2
