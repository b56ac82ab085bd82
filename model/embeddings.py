"""Timestep embedding (sinusoidal + MLP) and the conditioning embedding shared by UNet and ControlNet."""

from __future__ import annotations

import math
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn


def timestep_embedding(
    t: torch.Tensor,
    dim: int,
    flip_sin_to_cos: bool = True,
    freq_shift: float = 0.0,
    max_period: float = 10000.0,
) -> torch.Tensor:
    """Sinusoidal embedding of per-row timesteps, computed in fp32 (as diffusers' get_timestep_embedding).

    t: (B,) any dtype -> (B, dim) float32. Frequencies exp(-ln(max_period) * i / (half - freq_shift)),
    rounded in diffusers' order (multiply, then divide): SDXL feeds pixel sizes (~1024) as timesteps, where
    an ulp in a frequency is ~1e-4 in the argument.
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
    exponent = exponent / (half - freq_shift)
    args = t.float()[:, None] * exponent.exp()[None, :]  # (B, half)
    if flip_sin_to_cos:
        emb = torch.cat([args.cos(), args.sin()], dim=-1)  # (B, 2 * half)
    else:
        emb = torch.cat([args.sin(), args.cos()], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class Timesteps(nn.Module):
    """Parameter-free sinusoidal projection: (B,) -> (B, dim) float32."""

    def __init__(self, dim: int, flip_sin_to_cos: bool, freq_shift: float) -> None:
        super().__init__()
        self.dim, self.flip_sin_to_cos, self.freq_shift = dim, flip_sin_to_cos, freq_shift

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return timestep_embedding(t, self.dim, self.flip_sin_to_cos, self.freq_shift)


class TimestepEmbedding(nn.Module):
    """MLP on the sinusoidal embedding: (B, in_dim) -> (B, dim). Keys linear_1 / linear_2 as diffusers."""

    def __init__(self, in_dim: int, dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


def exponent_check(dim: int, freq_shift: float) -> None:
    """Raise for an embedding width whose frequency denominator would be zero."""
    if dim // 2 - freq_shift == 0:
        raise ValueError(f"timestep embedding dim {dim} with freq_shift {freq_shift} divides by zero")


class Conditioned(Protocol):
    """A model with attach_time_embedding's modules and a conv_in (UNet, ControlNet)."""

    conv_in: nn.Conv2d  # its weight's dtype is the model dtype
    time_proj: Timesteps
    time_embedding: TimestepEmbedding
    class_embedding: nn.Embedding | None


def attach_time_embedding(
    owner: Conditioned,
    base_channels: int,
    time_embed_dim: int,
    flip_sin_to_cos: bool,
    freq_shift: float,
    num_class_embeds: int | None,
) -> None:
    """Create owner.time_proj, owner.time_embedding and owner.class_embedding (None without classes)."""
    exponent_check(base_channels, freq_shift)
    owner.time_proj = Timesteps(base_channels, flip_sin_to_cos, freq_shift)
    owner.time_embedding = TimestepEmbedding(base_channels, time_embed_dim)
    owner.class_embedding = nn.Embedding(num_class_embeds, time_embed_dim) if num_class_embeds else None


class TextTimeConditioned(Protocol):
    """A model with SDXL's added embedding (attach_text_time_embedding's modules)."""

    conv_in: nn.Conv2d
    add_time_proj: Timesteps
    add_embedding: TimestepEmbedding


def attach_text_time_embedding(
    owner: Any,  # an nn.Module (UNet, ControlNet; typed by the Encoder protocol at the call site)
    time_embed_dim: int,
    addition_time_embed_dim: int,
    projection_class_embeddings_input_dim: int,
    flip_sin_to_cos: bool,
    freq_shift: float,
) -> None:
    """Create owner.add_time_proj and owner.add_embedding (diffusers' names) for addition_embed_type
    "text_time" (SDXL): the sinusoid of each time id and the MLP on [pooled text, sinusoids]."""
    exponent_check(addition_time_embed_dim, freq_shift)
    owner.add_time_proj = Timesteps(addition_time_embed_dim, flip_sin_to_cos, freq_shift)
    owner.add_embedding = TimestepEmbedding(projection_class_embeddings_input_dim, time_embed_dim)


def text_time_embedding(
    owner: TextTimeConditioned, added_cond: dict[str, torch.Tensor] | None
) -> torch.Tensor:
    """SDXL's added embedding: add_embedding([text_embeds, sin(time_ids) per id]) -> (B, time_embed_dim).

    added_cond: {"text_embeds": (B, P) pooled projected text, "time_ids": (B, n) original size, crop top-left,
    target size (n = 6)}; P + n * addition_time_embed_dim must be add_embedding's input width.
    """
    if added_cond is None or "text_embeds" not in added_cond or "time_ids" not in added_cond:
        raise ValueError(
            "this model uses SDXL micro-conditioning (addition_embed_type='text_time'): pass "
            "added_cond={'text_embeds': (B, P), 'time_ids': (B, 6)}"
        )
    text_embeds, time_ids = added_cond["text_embeds"], added_cond["time_ids"]
    dtype = owner.conv_in.weight.dtype
    time_embeds = owner.add_time_proj(time_ids.flatten())  # (B * n, addition_time_embed_dim) fp32
    time_embeds = time_embeds.reshape(text_embeds.shape[0], -1)  # (B, n * addition_time_embed_dim)
    add_embeds = torch.cat([text_embeds.to(time_embeds.dtype), time_embeds], dim=-1)  # (B, P + n * d)
    return owner.add_embedding(add_embeds.to(dtype))


def embed_conditioning(
    owner: Conditioned,
    x: torch.Tensor,
    t: torch.Tensor | float,
    class_labels: torch.Tensor | None,
    added_cond: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """e = time_embedding(sin(t)) [+ class_embedding(y)] [+ text_time_embedding(added_cond)] for a module
    set up by attach_time_embedding.

    x: (B, C, H, W) gives batch, device and dtype; t: (B,) per-row timesteps (0-dim or a number is
    broadcast); class_labels: (B,) long; added_cond: SDXL's {"text_embeds", "time_ids"} (see
    text_time_embedding). Returns (B, time_embed_dim) in the model dtype.
    """
    dtype = owner.conv_in.weight.dtype
    t = torch.as_tensor(t, device=x.device)
    if t.ndim == 0:
        t = t.expand(x.shape[0])  # (B,)
    emb = owner.time_embedding(owner.time_proj(t).to(dtype))  # fp32 sinusoid -> model dtype
    if owner.class_embedding is not None:
        if class_labels is None:
            raise ValueError("this model is class-conditional: pass class_labels (B,) long")
        emb = emb + owner.class_embedding(class_labels).to(dtype)
    elif class_labels is not None:
        raise ValueError("this model has no class embedding (num_class_embeds is None) but got class_labels")
    if getattr(owner, "add_embedding", None) is not None:  # SDXL (attach_text_time_embedding)
        emb = emb + text_time_embedding(owner, added_cond)  # type: ignore[arg-type]  # checked just above
    elif added_cond is not None:
        raise ValueError("this model has no added (text_time) conditioning but got added_cond")
    return emb
