"""Shared by the image-to-image and inpainting parity tests: test images, a tiny 9-channel inpainting
pipeline folder (written by diffusers), and our side run through the server's real row path
(``server.worker.Worker``: prepare -> step until done), returning float images like diffusers' "np" output."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from model.pipeline import Pipeline
from server.request import ResolvedRequest
from server.worker import Worker
from tests.model.sd_helpers import build_tiny_sd

PROMPT = "a photo of an astronaut riding a horse on mars"
NEGATIVE = "blurry, low quality"

# our sampler -> (diffusers scheduler class, config overrides); see tests/model/test_sd_pipeline_parity.py
SCHEDULERS = {
    "ddim": ("DDIMScheduler", {"set_alpha_to_one": True}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_ancestral": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"timestep_spacing": "trailing"}),
}


def make_image(size: int = 64, seed: int = 0) -> Image.Image:
    """A smooth RGB picture with some texture (so the VAE's posterior is not flat)."""
    g = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    rgb = np.stack([xx, yy, 1 - xx * yy], axis=-1) * 200 + g.uniform(0, 55, (size, size, 3))
    return Image.fromarray(rgb.astype(np.uint8), "RGB")


def make_mask(size: int = 64) -> Image.Image:
    """White (repaint) rectangle on black (keep), grayscale."""
    mask = Image.new("L", (size, size), 0)
    ImageDraw.Draw(mask).rectangle([size // 4, size // 8, 3 * size // 4 - 1, size // 2 + 7], fill=255)
    return mask


def image_array(img: Image.Image) -> np.ndarray:
    """PIL RGB -> float32 (3, H, W) in [-1, 1], as diffusers' VaeImageProcessor (x / 255 · 2 − 1)."""
    return np.ascontiguousarray((np.asarray(img, dtype=np.float32) / 255.0 * 2.0 - 1.0).transpose(2, 0, 1))


def mask_array(mask: Image.Image) -> np.ndarray:
    """PIL L -> float32 (H, W) in {0, 1}, binarised at 0.5 as diffusers' mask processor."""
    return (np.asarray(mask.convert("L"), dtype=np.float32) / 255.0 >= 0.5).astype(np.float32)


def build_tiny_inpaint(root: Path, seed: int = 3) -> Path:
    """A StableDiffusionInpaintPipeline folder: the tiny SD folder with a 9-channel U-Net (latent, mask,
    masked-image latent), random perturbed weights."""
    import diffusers

    root = build_tiny_sd(Path(root), seed=seed)
    cfg = json.loads((root / "unet" / "config.json").read_text())
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(**{**cfg, "in_channels": 9})
    g = torch.Generator().manual_seed(seed + 10)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    for f in (root / "unet").iterdir():
        f.unlink()
    unet.save_pretrained(root / "unet", safe_serialization=True)
    index = json.loads((root / "model_index.json").read_text())
    index["_class_name"] = "StableDiffusionInpaintPipeline"
    (root / "model_index.json").write_text(json.dumps(index, indent=2))
    return root


def run_worker(
    p: Pipeline,
    sampler: str,
    steps: int,
    seed: int,
    image: np.ndarray | None,
    mask: np.ndarray | None = None,
    strength: float = 1.0,
    guidance: float = 7.5,
    negative: str = "",
    worker: Worker | None = None,
) -> np.ndarray:
    """Our image through the server's row path; (1, H, W, 3) float in [0, 1] like diffusers' "np"."""
    w = worker or Worker({p.name: p}, buckets=[1, 2, 4])
    req = ResolvedRequest(
        model=p.name, prompt=PROMPT, negative_prompt=negative, class_label=None, control=None,
        control_scale=1.0, num_inference_steps=steps, sampler=sampler, guidance_scale=guidance, seed=seed,
        num_images=1, width=64, height=64, guided=guidance != 1.0, image=image, mask=mask, strength=strength,
    )  # fmt: skip
    state = w.prepare(req)
    while not w.step([state])[0]:
        pass
    with torch.no_grad():
        images = p.vae.decode(state.sampler.result(state.states[0])).float()  # type: ignore[union-attr]
    return (images / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def set_scheduler(pipe: object, sampler: str) -> None:
    import diffusers

    cls_name, overrides = SCHEDULERS[sampler]
    # the folder's config, not the last override's (a trailing DPM config would leak into Euler)
    folder = getattr(pipe, "_folder_scheduler_config", None) or dict(pipe.scheduler.config)  # type: ignore[attr-defined]
    pipe._folder_scheduler_config = folder  # type: ignore[attr-defined]
    pipe.scheduler = getattr(diffusers, cls_name).from_config(folder, **overrides)  # type: ignore[attr-defined]


def honest(want: np.ndarray) -> bool:
    """Most pixels inside (0, 1) and not flat: a comparison that clamping cannot make pass."""
    return bool(((want > 0.001) & (want < 0.999)).mean() > 0.5 and want.std() > 0.02)
