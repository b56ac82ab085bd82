"""GroupNorm (+ a per-channel add before it, + SiLU after it) as three Triton kernels, for the U-Net's
resnets: ``silu(group_norm(x + t[:, :, None, None]))``. Opt-in (``use_fused_groupnorm``), CUDA only.

Why: in the compiled SD1.5 forward at batch 32 the norm and pointwise kernels Inductor generates move
their bytes at 15% of the H200's bandwidth (bench/RESULTS.md run 18, ``bench.profile_unet``), 23% of the
time. The kernels here read ``x`` twice and write ``y`` once, every access coalesced along channels
(channels_last, the layout the U-Net runs in), with no atomics, so a row's result does not depend on the
other rows of the batch (the server's batch invariance):

1. ``_partial_stats``: per (row, chunk of H*W, block of channels) the count, mean and M2 (sum of squared
   deviations) of each channel over the chunk, combined tile by tile with Chan's formula (no E[x²]-E[x]²
   cancellation);
2. ``_group_stats``: per (row, group) the chunks' and channels' partials combined the same way -> mean,
   1/sqrt(var + eps) (biased variance, as ``nn.GroupNorm``);
3. ``_apply``: y = (x + t - mean) * rstd * weight + bias, then SiLU, in x's dtype and memory format.

Statistics are fp32 whatever x's dtype. Without Triton or CUDA, ``group_norm_silu`` computes the same with
torch ops (the reference the tests compare against). Tests run the kernels in Triton's interpreter on the
CPU (``TRITON_INTERPRET=1``); their speed is measured by ``bench.profile_unet --fused-groupnorm``.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

BLOCK_C = 64  # channels per program (coalesced along C in channels_last)
BLOCK_HW = 32  # pixels per tile
CHUNK_HW = 256  # pixels per program of the stats pass (64x64 latents: 16 chunks per row and channel block)


def reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    groups: int,
    eps: float,
    add: torch.Tensor | None = None,
    silu: bool = True,
) -> torch.Tensor:
    """The torch-ops definition: silu(group_norm(x + add[:, :, None, None])) -> x's shape and dtype."""
    h = x if add is None else x + add[:, :, None, None].to(x.dtype)
    y = F.group_norm(h, groups, weight, bias, eps)
    return F.silu(y) if silu else y


@functools.cache
def _have_triton() -> bool:
    return importlib.util.find_spec("triton") is not None  # ships with CUDA builds of torch


def available(x: torch.Tensor) -> bool:
    """Whether the Triton kernels can run on ``x`` (CUDA, or the interpreter in tests)."""
    if x.dim() != 4 or not (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        return False
    return _have_triton()


def triton_usable(device: torch.device | str) -> bool:
    """Whether the kernels can run on ``device`` (CUDA with Triton, or any device under the interpreter)."""
    dev = torch.device(device)
    return (dev.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1") and _have_triton()


def group_norm_silu(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    groups: int,
    eps: float,
    add: torch.Tensor | None = None,
    silu: bool = True,
) -> torch.Tensor:
    """silu(group_norm(x + add[:, :, None, None], groups, weight, bias, eps)) (SiLU only with ``silu``).

    x (B, C, H, W), channels_last or contiguous; weight, bias (C,); add (B, C) or None -> like x."""
    if not available(x) or _layout(x) is None:
        return reference(x, weight, bias, groups, eps, add, silu)
    return _fused(x, weight, bias, groups, eps, add, silu)


def _layout(x: torch.Tensor) -> tuple[int, int, int] | None:
    """(stride of a row, of a pixel, of a channel) when H and W flatten into one pixel index, else None."""
    b, c, h, w = x.shape
    sb, sc, sh, sw = x.stride()
    if sh != w * sw:
        return None
    return sb, sw, sc


def _fused(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    groups: int,
    eps: float,
    add: torch.Tensor | None,
    silu: bool,
) -> torch.Tensor:
    import triton

    partial_stats, group_stats, apply = _kernels()
    b, c, h, w = x.shape
    if c % groups:
        raise ValueError(f"{c} channels do not split into {groups} groups")
    layout = _layout(x)
    assert layout is not None
    sb, sp, sc = layout
    hw, cg = h * w, c // groups
    n_cblocks = triton.cdiv(c, BLOCK_C)
    chunk = CHUNK_HW  # fixed, not sized to the batch: a row's sums run in the same order in any batch
    n_chunks = triton.cdiv(hw, chunk)
    dev, f32 = x.device, torch.float32
    part_mean = torch.empty(b, n_chunks, c, device=dev, dtype=f32)
    part_m2 = torch.empty(b, n_chunks, c, device=dev, dtype=f32)
    mean = torch.empty(b, groups, device=dev, dtype=f32)
    rstd = torch.empty(b, groups, device=dev, dtype=f32)
    t = add.float().contiguous() if add is not None else part_mean  # (B, C); unused when HAS_ADD is False
    partial_stats[(b, n_chunks, n_cblocks)](
        x, t, part_mean, part_m2, hw, c, sb, sp, sc, chunk, n_chunks,
        HAS_ADD=add is not None, BLOCK_HW=BLOCK_HW, BLOCK_C=BLOCK_C,
    )  # fmt: skip
    group_stats[(b, groups)](
        part_mean, part_m2, mean, rstd, hw, c, cg, chunk, n_chunks, eps,
        BLOCK_S=triton.next_power_of_2(n_chunks), BLOCK_CG=triton.next_power_of_2(cg),
    )  # fmt: skip
    y = torch.empty_like(x)  # same memory format as x
    apply[(b, triton.cdiv(hw, BLOCK_HW), n_cblocks)](
        x, t, y, mean, rstd, weight.float().contiguous(), bias.float().contiguous(), hw, c, cg, sb, sp, sc,
        HAS_ADD=add is not None, SILU=silu, BLOCK_HW=BLOCK_HW, BLOCK_C=BLOCK_C,
    )  # fmt: skip
    return y


@functools.cache
def _kernels() -> tuple[Any, Any, Any]:
    """The three jitted kernels (Triton imported on first use: the server's CPU paths never import it)."""
    from model import fused_groupnorm_kernels as k

    return k.partial_stats, k.group_stats, k.apply


class FusedGroupNormSiLU(nn.Module):
    """Drop-in for ``nn.GroupNorm`` followed by SiLU, sharing the GroupNorm's parameters (state dicts
    unchanged): forward(x, add=None) = silu(norm(x + add[:, :, None, None]))."""

    def __init__(self, norm: nn.GroupNorm, silu: bool = True) -> None:
        super().__init__()
        self.norm, self.silu = norm, silu

    def forward(self, x: torch.Tensor, add: torch.Tensor | None = None) -> torch.Tensor:
        n = self.norm
        assert n.weight is not None and n.bias is not None, "an affine GroupNorm"
        return group_norm_silu(x, n.weight, n.bias, n.num_groups, n.eps, add, self.silu)


def use_fused_groupnorm(module: nn.Module, enabled: bool = True) -> int:
    """Switch every ``ResnetBlock2D`` under ``module`` to the fused kernels (or back); returns how many.
    Only where they can run (CUDA tensors); elsewhere the blocks compute the same with torch ops."""
    count = 0
    for m in module.modules():  # ResnetBlock2D (not imported: model.blocks imports this module)
        if hasattr(m, "fused_norms") and not m.scale_shift:
            norm1, norm2 = m.norm1, m.norm2
            assert isinstance(norm1, nn.GroupNorm) and isinstance(norm2, nn.GroupNorm)
            fused = (FusedGroupNormSiLU(norm1), FusedGroupNormSiLU(norm2)) if enabled else None
            object.__setattr__(m, "fused_norms", fused)  # a plain attribute: not registered as submodules
            count += 1
    return count
