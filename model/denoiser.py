"""The one wrapper that turns any U-Net (ε, v, x0 or flow velocity) into a denoiser D(x, σ) → x0, per row.

All preconditioning lives here (as EDM keeps it in `EDMPrecond`): the σ → timestep map, the input scaling
c_in and the conversion of the network output into an x0 estimate. Samplers only ever see x0 estimates, and
the U-Net never sees σ arithmetic. Classifier-free guidance is a combination of two x0 estimates of the
same x and σ (cond row and uncond row), which is the same as combining ε or v because the conversions are
affine in the network output with identical coefficients.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from model.schedules import Schedule

Tensor = torch.Tensor


def _rows(v: Tensor, ndim: int) -> Tensor:
    # (B,) → (B, 1, 1, 1) for broadcasting against (B, C, H, W)
    return v.reshape(-1, *([1] * (ndim - 1)))


class Denoiser:
    """D(x, σ) for a packed batch whose rows can each sit at a different σ.

    Args:
        unet: callable `unet(x, t, class_labels=None, context=None, control=None) -> Tensor` with `.dtype`
            (and `added_cond=` for SDXL U-Nets; only passed when a call gives one).
        schedule: the model's training `Schedule` (decides VP vs flow and the prediction type).
        controlnet: optional `controlnet(x, t, cond, context=None, class_labels=None, scale=...)` returning
            `ControlResiduals(down: list[Tensor], mid: Tensor)`.
    """

    def __init__(self, unet: Any, schedule: Schedule, controlnet: Any | None = None) -> None:
        self.unet = unet
        self.schedule = schedule
        self.controlnet = controlnet

    def timesteps(self, sigma: Tensor) -> Tensor:
        """Model timestep per row, (B,) → (B,) fp32."""
        return self.schedule.sigma_to_t(sigma).float()

    @torch.no_grad()
    def __call__(
        self,
        x: Tensor,
        sigma: Tensor | Sequence[float],
        class_labels: Tensor | None = None,
        context: Tensor | None = None,
        control_cond: Tensor | None = None,
        control_scale: Tensor | float | None = None,
        control_mask: Tensor | None = None,
        added_cond: dict[str, Tensor] | None = None,
        x_concat: Tensor | None = None,
    ) -> Tensor:
        """x0 estimate (fp32) for x (B, C, H, W) at noise levels sigma (B,).

        sigma may be any float dtype (float64 keeps t exact for table σ) or a list of floats.
        control_cond (B, Cc, H, W) in [0, 1] feeds the ControlNet; control_scale is a float or (B,)
        (0 for rows without a control map gives them zero residuals without any host sync). control_mask (B,)
        bool, if given, runs the ControlNet only on those rows and leaves zero residuals elsewhere (the
        boolean indexing syncs with the host once). added_cond: SDXL's per-row micro-conditioning
        {"text_embeds": (B, P), "time_ids": (B, 6)}, given to the U-Net (and ControlNet) as is.
        x_concat (B, C', H, W): extra U-Net input channels appended after the input scaling (inpainting
        U-Nets: mask + masked-image latent, as diffusers' inpainting pipelines); the ControlNet sees x only.
        """
        x = x.float()
        if not torch.is_tensor(sigma):
            sigma = torch.tensor(list(sigma), dtype=torch.float64)
        sigma = sigma.to(x.device)
        if sigma.ndim == 0:
            sigma = sigma.expand(x.shape[0])
        if sigma.shape != (x.shape[0],):
            raise ValueError(f"sigma needs one entry per row: got {tuple(sigma.shape)}, x {tuple(x.shape)}")
        t = self.timesteps(sigma)  # (B,) fp32
        s = _rows(sigma.float(), x.ndim)  # (B, 1, 1, 1)
        if self.schedule.kind == "vp":
            # 1/sqrt, not rsqrt: both are correctly rounded, so a row's c_in does not depend on whether it
            # landed in a SIMD lane or the scalar tail (batch invariance to the last bit)
            c_in = 1 / (1 + s * s).sqrt()
            x_in = x * c_in  # exactly the VP sample sqrt(ᾱ)·x0 + sqrt(1 − ᾱ)·ε
        else:
            x_in = x
        dtype = self.unet.dtype
        x_in = x_in.to(dtype)
        if context is not None and context.is_floating_point():
            context = context.to(dtype)
        extra = {} if added_cond is None else {"added_cond": added_cond}  # plain U-Nets never see the key
        control = None
        if control_cond is not None:
            control = self._control(
                x_in, t, control_cond, context, class_labels, control_scale, control_mask, added_cond
            )
        if x_concat is not None:
            x_in = torch.cat([x_in, x_concat.to(device=x_in.device, dtype=dtype)], dim=1)  # (B, C + C', H, W)
        out = self.unet(x_in, t, class_labels=class_labels, context=context, control=control, **extra)
        out = out.float()
        return self._to_x0(out, x, s)

    def _to_x0(self, out: Tensor, x: Tensor, s: Tensor) -> Tensor:
        pred = self.schedule.prediction_type
        if pred == "epsilon":
            return x - s * out
        if pred == "v_prediction":
            # v = α·ε − σ_vp·x0 with α = c_in, σ_vp = σ·c_in (Salimans & Ho 2022) → x0 = c_in²·x − σ·c_in·v
            c_in = 1 / (1 + s * s).sqrt()
            return c_in * c_in * x - s * c_in * out
        if pred == "sample":
            return out
        # flow: v = ε − x0 and x = (1 − σ)·x0 + σ·ε  →  x0 = x − σ·v
        return x - s * out

    def _control(
        self,
        x_in: Tensor,
        t: Tensor,
        cond: Tensor,
        context: Tensor | None,
        class_labels: Tensor | None,
        scale: Tensor | float | None,
        mask: Tensor | None,
        added_cond: dict[str, Tensor] | None = None,
    ) -> Any:
        if self.controlnet is None:
            raise ValueError("control_cond was given but this Denoiser has no controlnet")
        cn = self.controlnet
        cond = cond.to(device=x_in.device, dtype=getattr(cn, "dtype", x_in.dtype))
        scale = 1.0 if scale is None else scale
        if mask is None:
            extra = {} if added_cond is None else {"added_cond": added_cond}  # SDXL ControlNets take it too
            return cn(x_in, t, cond, context=context, class_labels=class_labels, scale=scale, **extra)
        idx = mask.to(x_in.device).nonzero().squeeze(1)  # (M,)
        sub = {} if added_cond is None else {"added_cond": {k: v[idx] for k, v in added_cond.items()}}
        if torch.is_tensor(scale) and scale.ndim > 0:
            scale = scale[idx]
        res = cn(
            x_in[idx],
            t[idx],
            cond[idx] if cond.shape[0] == x_in.shape[0] else cond,
            context=None if context is None else context[idx],
            class_labels=None if class_labels is None else class_labels[idx],
            scale=scale,
            **sub,
        )

        def scatter(r: Tensor) -> Tensor:
            full = r.new_zeros((x_in.shape[0], *r.shape[1:]))  # (B, C_r, H_r, W_r)
            full[idx] = r
            return full

        return type(res)(down=[scatter(d) for d in res.down], mid=scatter(res.mid))


def cfg_combine(
    cond_x0: Tensor,
    uncond_x0: Tensor,
    guidance_scale: Tensor | float,
    guidance_rescale: Tensor | float = 0.0,
) -> Tensor:
    """Classifier-free guidance (Ho & Salimans 2022) on x0 estimates: uncond + g·(cond − uncond).

    cond_x0, uncond_x0 (B, C, H, W); guidance_scale float or (B,) per row. guidance_rescale φ (Lin et al.
    2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed", applied here to x0) pulls the
    per-row std of the guided x0 back towards the conditional one, countering over-saturation at large scales.
    """
    g = guidance_scale
    if torch.is_tensor(g):
        g = _rows(g.to(device=cond_x0.device, dtype=cond_x0.dtype), cond_x0.ndim)
    guided = torch.lerp(uncond_x0, cond_x0, g)  # exactly cond at g = 1
    if not torch.is_tensor(guidance_rescale) and guidance_rescale == 0.0:
        return guided
    phi = guidance_rescale
    if torch.is_tensor(phi):
        phi = _rows(phi.to(device=cond_x0.device, dtype=cond_x0.dtype), cond_x0.ndim)
    dims = tuple(range(1, cond_x0.ndim))
    std_cond = cond_x0.std(dim=dims, keepdim=True)
    std_guided = guided.std(dim=dims, keepdim=True).clamp_min(1e-8)
    return phi * guided * (std_cond / std_guided) + (1 - phi) * guided


def clamp_x0(x0: Tensor, clip_range: float | None = 1.0, dynamic_ratio: float | None = None) -> Tensor:
    """Keep an x0 estimate inside the data range ([-1, 1] for our pixel models).

    clip_range: static clamp to [−r, r] (diffusers' clip_sample). dynamic_ratio: Imagen's dynamic
    thresholding (Saharia et al. 2022): per row s = clamp(quantile(|x0|, ratio), 1, clip_range), clamp to
    [−s, s] and divide by s — it tames the over-saturation CFG causes on ε-models at small step counts
    without flattening highlights.
    """
    if dynamic_ratio is not None:
        flat = x0.reshape(x0.shape[0], -1).abs()  # (B, C·H·W)
        s = torch.quantile(flat, dynamic_ratio, dim=1)
        # clip_range doubles as diffusers' sample_max_value: the largest threshold allowed
        s = s.clamp(1.0, max(clip_range, 1.0)) if clip_range is not None else s.clamp_min(1.0)
        s = _rows(s, x0.ndim)
        return torch.maximum(torch.minimum(x0, s), -s) / s
    if clip_range is not None:
        return x0.clamp(-clip_range, clip_range)
    return x0
