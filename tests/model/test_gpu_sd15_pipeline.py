"""GPU: an SD 1.5-config pipeline folder (real configs, random weights, fp16 files) through our model path
(load_pipelines, CLIP, Denoiser + CFG + sampler, VAE) vs diffusers' StableDiffusionPipeline, 512², 20 steps.

Run on a CUDA machine: .venv/bin/python -m pytest -m gpu -s -q tests/model/test_gpu_sd15_pipeline.py
(machines without a package index: build the CLIP tokenizer first with UNET_SERVER_TEST_CACHE pointing at
a folder that travels with the tree; see tests/model/sd_helpers.py).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from model.denoiser import cfg_combine
from model.pipeline import load_pipelines
from model.samplers import get_sampler, sample
from tests.model.sd_helpers import build_sd15_random

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

PROMPT = "a photo of an astronaut riding a horse on mars"


def compare(root: Path, device: str, dtype: torch.dtype, size: int, steps: int) -> dict[str, float]:
    """Max/mean abs differences of final images in [0, 1] (ours vs diffusers in `dtype`, both vs diffusers
    fp32) for the Euler sampler with the folder's own (leading) spacing, guidance 7.5."""
    diffusers = pytest.importorskip("diffusers")
    p = load_pipelines(root.parent, [root.name], device=device, dtype=dtype)[root.name]
    latents = torch.randn(1, *p.latent_shape(size, size), generator=torch.Generator().manual_seed(0))

    t0 = time.perf_counter()
    context = torch.cat([p.text_encoder.encode([PROMPT]), p.text_encoder.encode([""])])  # (2, 77, 768)
    sampler = get_sampler("euler", p.schedule.kind)
    sigmas = sampler.make_sigmas(p.schedule, steps)

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        x0 = p.denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), context=context)
        return cfg_combine(x0[:1], x0[1:], 7.5)

    with torch.no_grad():
        out = sample(denoise, latents.to(device), sigmas, sampler)
        ours = (p.vae.decode(out).float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu()
    if device == "cuda":
        torch.cuda.synchronize()
    ours_s = time.perf_counter() - t0

    def theirs(torch_dtype: torch.dtype) -> torch.Tensor:
        pipe = diffusers.StableDiffusionPipeline.from_pretrained(
            root, variant="fp16", torch_dtype=torch_dtype, safety_checker=None, requires_safety_checker=False
        ).to(device)
        pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        img = pipe(PROMPT, height=size, width=size, num_inference_steps=steps, guidance_scale=7.5,
                   latents=latents.to(device, torch_dtype), output_type="pt").images
        return img.float().permute(0, 2, 3, 1).cpu()

    ref16, ref32 = theirs(dtype), theirs(torch.float32)
    return {
        "ours_vs_diffusers_max": (ours - ref16).abs().max().item(),
        "ours_vs_diffusers_mean": (ours - ref16).abs().mean().item(),
        "ours_vs_fp32_mean": (ours - ref32).abs().mean().item(),
        "diffusers_vs_fp32_mean": (ref16 - ref32).abs().mean().item(),
        "ours_seconds": ours_s,
    }


def test_sd15_pipeline_fp16_matches_diffusers(tmp_path):
    root = build_sd15_random(tmp_path / "sd15-random", variant="fp16")
    r = compare(root, "cuda", torch.float16, 512, 20)
    print(f"\n[sd15 pipeline fp16 512² 20 steps euler] card={torch.cuda.get_device_name()} {r}")
    assert all(v == v for v in r.values()), "NaN: an fp16 overflow (our VAE runs in fp32: force_upcast)"
    # fp16: each implementation rounds differently; both stay as close to the fp32 reference as each other
    assert r["ours_vs_fp32_mean"] <= 2 * r["diffusers_vs_fp32_mean"] + 2e-3
    assert r["ours_vs_diffusers_mean"] <= 1e-2
