"""A validated generation request as the engine sees it, and the rules every layer shares about it.

No web imports here: the engine process imports this module (the HTTP side builds the object in
``server.schemas``; the engine core and the worker only read it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from model.seeds import MAX_SEED, random_seed
from model.strength import strength_start

__all__ = [
    "MAX_SEED",
    "ControlNetInput",
    "LoraRef",
    "ResolvedRequest",
    "needs_guidance",
    "random_seed",
    "rows_for",
]


def needs_guidance(guidance_scale: float, has_null_condition: bool) -> bool:
    """Whether a request runs classifier-free guidance (and so carries unconditional rows).

    ``guidance_scale == 1`` is plain conditional sampling. Any other scale guides when the request has an
    unconditional counterpart: always for text models (the empty prompt), for class models when a class is
    given and the model has a null class. Otherwise the request samples without guidance.
    """
    return guidance_scale != 1.0 and has_null_condition


def rows_for(num_images: int, guided: bool) -> int:
    """Rows a request occupies in a forward pass: its images, twice with guidance (cond + uncond halves)."""
    return num_images * (2 if guided else 1)


@dataclass(frozen=True)
class ControlNetInput:
    """One SD ControlNet a request uses (model.sd_controlnet): which, its image and its schedule."""

    name: str  # a ControlNet of the model (ModelSpec.conditioning.control.controlnets)
    image: Any  # float32 numpy (height, width, C) in [0, 1] at the request's pixel size
    scale: float = 1.0  # conditioning_scale
    guidance_start: float = 0.0  # the net applies from this fraction of the steps ...
    guidance_end: float = 1.0  # ... to this one (diffusers' control_guidance_start/end)


@dataclass(frozen=True)
class LoraRef:
    """One LoRA adapter a request applies (server.loras): registry name, user scale, file digest."""

    name: str
    scale: float
    sha256: str  # of the file validated at admission (the engine loads exactly that file)


@dataclass
class ResolvedRequest:
    """A fully validated generation request with every default filled in."""

    model: str
    prompt: str | None
    negative_prompt: str | None
    class_label: int | None
    control: Any  # float32 numpy (height, width) in [0, 1], or None
    control_scale: float
    num_inference_steps: int
    sampler: str
    guidance_scale: float
    seed: int
    num_images: int
    width: int
    height: int
    guided: bool  # whether rows carry an unconditional half (model.denoiser.needs_guidance)
    controlnets: tuple[ControlNetInput, ...] = ()  # SD ControlNets (the toy models' map is ``control``)
    loras: tuple[LoraRef, ...] = ()  # LoRA adapters applied to every row of the request (server.loras)
    # Image-to-image and inpainting (model.img2img): the init image at (height, width), float32 numpy
    # (C, H, W) in [-1, 1]; the mask float32 (H, W) in {0, 1}, 1 = repaint; strength in (0, 1].
    image: Any = None
    mask: Any = None
    strength: float = 1.0
    inpaint_mode: str | None = None  # "inpainting_unet" | "latent_blend" for inpainting requests
    notes: tuple[str, ...] = ()  # what validation changed (an image resized), returned as warnings
    # SDXL micro-conditioning (model.sdxl), (height, width) / (top, left) in pixels; None = diffusers'
    # defaults: original = target = (height, width), crop (0, 0). Only SDXL models accept them.
    original_size: tuple[int, int] | None = None
    crops_coords_top_left: tuple[int, int] | None = None
    target_size: tuple[int, int] | None = None

    @property
    def lora_key(self) -> tuple[tuple[str, str, float], ...]:
        """(name, sha256, scale) of the request's adapters, in order: what its prompt encoding and rows depend
        on beyond the model."""
        return tuple((ref.name, ref.sha256, ref.scale) for ref in self.loras)

    @property
    def seeds(self) -> list[int]:
        """Image i of the request uses seed + i, so an image is the same alone or in a larger request."""
        return [self.seed + i for i in range(self.num_images)]

    @property
    def rows(self) -> int:
        return rows_for(self.num_images, self.guided)

    @property
    def sampling_steps(self) -> int:
        """Steps the sampler runs: num_inference_steps, or for image-to-image / inpainting the strength's
        share, int(steps · strength) (model.strength)."""
        if self.image is None:
            return self.num_inference_steps
        return self.num_inference_steps - strength_start(self.num_inference_steps, self.strength)
