"""DeepCache (Ma et al. 2023, "DeepCache: Accelerating Diffusion Models for Free"): reuse the deep U-Net
features of a recent step and recompute only the shallow levels.

Adjacent sampling steps change the U-Net's deep, low-resolution features little. A *full* step runs the whole
U-Net and keeps ``h``, the feature entering the up block of level ``branch`` (0 = the highest resolution);
a *shallow* step runs conv_in, the down blocks of levels 0..branch, then the up blocks of levels branch..0
from the cached ``h`` and the fresh skips, and the output head. Per request: the cache is a tensor per row,
so rows of different requests (each at its own σ and its own full/shallow schedule) may share a batch as
long as each group runs one kind of step.

Opt-in and lossy: a shallow step's output differs from a full step's by however much the deep features
moved since they were cached (bench/deepcache_quality.py measures the judges' verdicts). The skip list of
``model.unet.UNet.forward`` is rebuilt here from the U-Net's own modules; a shallow step on the very input
its cache came from equals the full step (tests/model/test_deepcache.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model.embeddings import embed_conditioning
from model.unet import UNet, run_encoder


@dataclass
class DeepCache:
    """The deep feature of a full step: (B, C, h, w) entering the up block of level ``branch``."""

    branch: int
    h: torch.Tensor


def skips_through(unet: UNet, branch: int) -> int:
    """Skips the up blocks of levels 0..branch consume (conv_in's + theirs, from the front of the list)."""
    n = len(unet.up_blocks)
    return sum(len(b.resnets) for b in list(unet.up_blocks)[n - 1 - branch :])


def _embed(
    unet: UNet, x: torch.Tensor, t: torch.Tensor | float, class_labels: torch.Tensor | None,
    added_cond: dict[str, torch.Tensor] | None,
) -> torch.Tensor:  # fmt: skip
    if added_cond is None:
        return embed_conditioning(unet, x, t, class_labels)  # (B, T)
    return embed_conditioning(unet, x, t, class_labels, added_cond)


def _check(unet: UNet, branch: int) -> None:
    n = len(unet.up_blocks)
    if not 0 <= branch < n - 1:
        raise ValueError(f"branch must be in 0..{n - 2} for a U-Net with {n} levels, got {branch}")


def _head(unet: UNet, h: torch.Tensor) -> torch.Tensor:
    return unet.conv_out(unet.conv_act(unet.conv_norm_out(h)))


@torch.no_grad()
def full_step(
    unet: UNet,
    x: torch.Tensor,
    t: torch.Tensor | float,
    branch: int,
    class_labels: torch.Tensor | None = None,
    context: torch.Tensor | None = None,
    added_cond: dict[str, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, DeepCache]:
    """The U-Net's forward, x (B, C, H, W), t (B,) -> (output (B, C_out, H, W), the deep feature to cache)."""
    _check(unet, branch)
    if unet.config.center_input_sample:
        x = 2 * x - 1.0
    emb = _embed(unet, x, t, class_labels, added_cond)  # (B, T)
    h, skips = run_encoder(unet, x, emb, context)
    h = unet.mid_block(h, emb, context)
    n = len(unet.up_blocks)
    end = len(skips)
    cache = None
    for i, (block, size_idx) in enumerate(zip(unet.up_blocks, unet._up_sizes, strict=True)):
        if i == n - 1 - branch:
            cache = DeepCache(branch, h)
        start = end - len(block.resnets)
        size = skips[size_idx].shape[-2:] if size_idx is not None else None
        h = block(h, skips[start:end], emb, context, size)
        end = start
    assert cache is not None
    return _head(unet, h), cache


@torch.no_grad()
def shallow_step(
    unet: UNet,
    x: torch.Tensor,
    t: torch.Tensor | float,
    cache: DeepCache,
    class_labels: torch.Tensor | None = None,
    context: torch.Tensor | None = None,
    added_cond: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """The levels 0..cache.branch only, the deeper ones replaced by ``cache.h`` (one row per row of x)."""
    branch = cache.branch
    _check(unet, branch)
    if cache.h.shape[0] != x.shape[0]:
        raise ValueError(f"the cache holds {cache.h.shape[0]} rows but x has {x.shape[0]}")
    if unet.config.center_input_sample:
        x = 2 * x - 1.0
    emb = _embed(unet, x, t, class_labels, added_cond)  # (B, T)
    h = unet.conv_in(x)
    skips = [h]
    for down in list(unet.down_blocks)[: branch + 1]:
        h, res = down(h, emb, context)
        skips.extend(res)
    # The level's downsampler output (if it has one) feeds only the deeper levels: drop it.
    skips = skips[: skips_through(unet, branch)]
    n = len(unet.up_blocks)
    h = cache.h
    end = len(skips)
    for block, size_idx in list(zip(unet.up_blocks, unet._up_sizes, strict=True))[n - 1 - branch :]:
        start = end - len(block.resnets)
        size = skips[size_idx].shape[-2:] if size_idx is not None else None
        h = block(h, skips[start:end], emb, context, size)
        end = start
    return _head(unet, h)


def is_full_step(step: int, interval: int) -> bool:
    """DeepCache's uniform schedule: steps 0, interval, 2·interval, ... run in full (interval 1 = always)."""
    return step % max(1, interval) == 0


class StepCachedUNet:
    """A stand-in for the U-Net inside ``model.denoiser.Denoiser`` for one group of rows that step together
    (the requests of one pipeline call): call k runs in full when ``is_full_step(k, interval)``, else
    shallow from the last full call's cache. The server would keep a cache per row instead (rows of one
    forward pass are at different steps); see bench/deepcache_quality.py.
    """

    def __init__(self, unet: UNet, branch: int, interval: int) -> None:
        _check(unet, branch)
        self.unet, self.branch, self.interval = unet, branch, interval
        self.calls = 0
        self.full_calls = 0
        self.cache: DeepCache | None = None

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def config(self) -> object:
        return self.unet.config

    def __call__(
        self,
        x: torch.Tensor,
        t: torch.Tensor | float,
        class_labels: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        control: object | None = None,
        added_cond: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """As ``UNet.forward`` (without ControlNet residuals): x (B, C, H, W), t (B,) -> (B, C_out, H, W)."""
        if control is not None:
            raise ValueError("DeepCache steps do not take ControlNet residuals")
        stale = self.cache is None or self.cache.h.shape[0] != x.shape[0]
        if stale or is_full_step(self.calls, self.interval):
            out, self.cache = full_step(self.unet, x, t, self.branch, class_labels, context, added_cond)
            self.full_calls += 1
        else:
            assert self.cache is not None
            out = shallow_step(self.unet, x, t, self.cache, class_labels, context, added_cond)
        self.calls += 1
        return out
