"""The image-to-image strength rule and the inpainting mode names, torch-free (the HTTP side validates with
them; model.img2img samples with them)."""

from __future__ import annotations

INPAINTING_UNET = "inpainting_unet"  # a 9-channel inpainting U-Net (mask + masked-image latent as input)
LATENT_BLEND = "latent_blend"  # an ordinary U-Net, the known region blended back after every step


def strength_start(num_inference_steps: int, strength: float) -> int:
    """Index of the grid σ an image-to-image request starts at (diffusers' ``get_timesteps``: t_start =
    steps − int(steps · strength)); the request runs ``steps − t_start`` steps.

    Raises ValueError for strength outside (0, 1] or one that leaves no step (int(steps · strength) = 0)."""
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    init_timestep = min(int(num_inference_steps * strength), num_inference_steps)
    if init_timestep < 1:
        raise ValueError(
            f"strength {strength} with {num_inference_steps} steps runs "
            f"int({num_inference_steps} × {strength}) = 0 steps; raise strength or num_inference_steps"
        )
    return num_inference_steps - init_timestep
