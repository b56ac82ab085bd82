"""Image-to-image and inpainting as rows: where such a request starts and what it keeps after each step.

The forward pass is the one text-to-image uses (the rows share it); what differs is the start (an init
latent noised to the strength's σ, the grid cut at that σ) and, for inpainting, either extra U-Net input
channels or a blend after each step. Semantics are diffusers' (StableDiffusionImg2ImgPipeline and
StableDiffusionInpaintPipeline), to the order of the generator draws, so a seed gives diffusers' image:

* strength: ``init_timestep = int(steps · strength)``, ``t_start = steps − init_timestep`` (diffusers'
  ``get_timesteps``); sampling runs the grid from its ``t_start``-th σ (`strength_start`).
* start: x0 = the VAE posterior sample of the image (the request's generator) × scaling_factor (pixel
  models: the image itself); x = α(σ0)·x0 + σ0·ε (``scheduler.add_noise``). Inpainting at strength 1
  starts from pure noise instead (diffusers' ``is_strength_max``).
* 9-channel inpainting U-Nets: the U-Net input is cat(c_in·x, mask at latent size (nearest), latent of
  image·(mask < 0.5)) (`ImageStart.concat`, appended by the denoiser after its input scaling).
* ordinary U-Nets (masked latent blending): after every completed step into σ' the known region (mask 0)
  becomes α(σ')·x0 + σ'·ε with the request's fixed ε; after the last step (σ' = 0) exactly x0 (`blend`).

Generator draws, per image, in diffusers' order: [posterior ε of the image], initial ε, [posterior ε of the
masked image] — the first only when the start needs x0, the last for inpainting on latent models (drawn
and discarded in blend mode, where the masked-image latent is not used), so SDE samplers draw what
diffusers' schedulers draw afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from model.noise import RequestNoise
from model.strength import INPAINTING_UNET, LATENT_BLEND, strength_start

Tensor = torch.Tensor

__all__ = [
    "INPAINTING_UNET", "LATENT_BLEND", "ImageStart", "alpha", "blend", "image_start", "inpainting_channels",
    "latent_mask", "noised", "strength_start",
]


def alpha(sigma: float, model_kind: str) -> float:
    """Signal coefficient of x = α·x0 + σ·ε in sampler space: 1 (VP, VE form) or 1 − σ (flow)."""
    return 1.0 - sigma if model_kind == "flow" else 1.0


def noised(x0: Tensor, noise: Tensor, sigma: float, model_kind: str) -> Tensor:
    """x0 noised to σ in sampler space (diffusers' ``scheduler.add_noise``), (B, C, h, w)."""
    return x0 * alpha(sigma, model_kind) + noise * sigma


def inpainting_channels(unet_in_channels: int, latent_channels: int) -> int:
    """Extra U-Net input channels beyond the latent (5 for SD inpainting: mask + masked-image latent)."""
    return unet_in_channels - latent_channels


@dataclass(eq=False)
class ImageStart:
    """One image's start: the first sample and what later steps need (all fp32, on the device)."""

    x: Tensor  # (1, C, h, w) the first sample in sampler space, at the grid's first σ
    x0: Tensor | None  # (1, C, h, w) init latent (or pixels); None for a 9-channel start at strength 1
    noise: Tensor  # (1, C, h, w) the unit noise of the start (blend mode re-noises x0 with it)
    concat: Tensor | None = None  # (1, 1 + C, h, w) mask + masked-image latent (9-channel U-Nets)


def _encode(vae: Any, image: Tensor, generator: RequestNoise) -> Tensor:
    """Posterior sample of image (1, 3, H, W) in [-1, 1] -> scaled latent (1, C, h, w) fp32."""
    return vae.encode(image.to(device=vae.device), generator=generator).float()


def image_start(
    image: Tensor,
    mask: Tensor | None,
    generator: RequestNoise,
    sigmas: list[float],
    model_kind: str,
    vae: Any = None,
    inpainting_unet: bool = False,
    strength: float = 1.0,
) -> ImageStart:
    """The start of one image of an image-to-image or inpainting request.

    image (1, C_img, H, W) in [-1, 1] on the device; mask (1, 1, H, W) in {0, 1} (1 = repaint) or None;
    sigmas: the grid already cut at the strength's σ (`strength_start`); vae None for pixel models (then
    the latent is the image). Draws from ``generator`` in diffusers' order (module docstring).
    """
    device, sigma0 = image.device, sigmas[0]
    pure_noise = mask is not None and strength == 1.0  # diffusers' is_strength_max (inpainting only)
    x0 = None
    if vae is None:
        x0 = image.float()
    elif not (inpainting_unet and pure_noise):
        x0 = _encode(vae, image, generator)
    f = 1 if vae is None else vae.scale_factor
    channels = image.shape[1] if vae is None else vae.latent_channels
    shape = (1, channels, image.shape[2] // f, image.shape[3] // f)  # (1, C, h, w)
    noise = generator.initial(shape, device)
    concat = None
    if mask is not None and vae is not None:
        if inpainting_unet:
            masked = _encode(vae, image * (mask < 0.5), generator)  # (1, C, h, w)
            small = F.interpolate(mask.float(), size=shape[2:])  # (1, 1, h, w), nearest as diffusers
            concat = torch.cat([small, masked], dim=1)  # (1, 1 + C, h, w)
        else:
            generator.step(shape, device)  # diffusers encodes the masked image here too (unused): same draws
    if pure_noise or x0 is None:
        from model.schedules import initial_noise_scale

        x = noise * initial_noise_scale(model_kind, sigma0)
    else:
        x = noised(x0, noise, sigma0, model_kind)
    return ImageStart(x=x, x0=x0, noise=noise, concat=concat)


def latent_mask(mask: Tensor, size: tuple[int, int]) -> Tensor:
    """Mask (1, 1, H, W) -> (1, 1, h, w) at the sample's size (nearest, as diffusers)."""
    if tuple(mask.shape[-2:]) == tuple(size):
        return mask.float()
    return F.interpolate(mask.float(), size=size)


def blend(x: Tensor, x0: Tensor, noise: Tensor, mask: Tensor, sigma: float, model_kind: str) -> Tensor:
    """Masked latent blending after a step into σ: keep x where mask = 1, the known region x0 noised to σ
    elsewhere (diffusers: ``(1 − mask)·add_noise(x0, ε, t') + mask·x``). x, x0, noise (N, C, h, w);
    mask (1, 1, h, w) or (N, 1, h, w)."""
    return (1 - mask) * noised(x0, noise, sigma, model_kind) + mask * x
