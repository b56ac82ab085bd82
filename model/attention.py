"""Attention: one dispatch over backends {xformers, sdpa, math}, and the attention modules of the U-Net.

The backend is chosen at load time by `select_backend`, which runs a tiny real call on the target device
and dtype and checks it against the math path (an installed backend is not necessarily a working one:
xformers 0.0.35 imports on torch 2.11/CUDA 13 but has no kernels). Modules keep the chosen name in
`.backend`; `set_attention_backend(model, name)` changes it for every module.

Module and parameter names follow diffusers (`Attention`, `Transformer2DModel`, `BasicTransformerBlock`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

BACKENDS = ("xformers", "sdpa", "math")
# Probe outcomes already reported by this process: every model load probes again (cheap), but saying the
# same thing once per model only repeats it; a repeat goes to DEBUG.
_REPORTED: set[str] = set()


def _report(level: int, msg: str, *args: object) -> None:
    text = msg % args
    log.log(logging.DEBUG if text in _REPORTED else level, "%s", text)
    _REPORTED.add(text)


def reset_probe_log() -> None:
    """Forget what was reported (the next probe outcome is logged at its level again)."""
    _REPORTED.clear()


def _math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Reference attention in fp32: softmax(q k^T / sqrt(d)) v."""
    scale = q.shape[-1] ** -0.5
    w = torch.matmul(q.float() * scale, k.float().transpose(-1, -2)).softmax(dim=-1)  # (B, h, Lq, Lk)
    return torch.matmul(w, v.float()).to(q.dtype)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v)


def _xformers(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    import xformers.ops as xops  # optional dependency; import cost is paid once (module cache)

    # xformers wants (B, L, heads, d)
    out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)  # (B, heads, Lq, d)


_FNS: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "xformers": _xformers,
    "sdpa": _sdpa,
    "math": _math,
}


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "sdpa") -> torch.Tensor:
    """Scaled dot-product attention. q (B, heads, Lq, d), k/v (B, heads, Lk, d) -> (B, heads, Lq, d)."""
    return _FNS[backend](q, k, v)


def _probe(backend: str, device: torch.device, dtype: torch.dtype, head_dims: Iterable[int]) -> None:
    """Run `backend` on tiny self- and cross-attention inputs; raise with the reason if it fails/is wrong."""
    g = torch.Generator().manual_seed(0)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    with torch.no_grad():
        for d in head_dims:
            for lk in (16, 7):  # self-attention and cross-attention with another key length
                q = torch.randn(2, 2, 16, d, generator=g).to(device, dtype)
                k = torch.randn(2, 2, lk, d, generator=g).to(device, dtype)
                v = torch.randn(2, 2, lk, d, generator=g).to(device, dtype)
                out = attention(q, k, v, backend).float()
                ref = _math(q.float(), k.float(), v.float())
                err = ((out - ref).norm() / ref.norm()).item()
                if not err <= tol:  # also catches NaN
                    raise RuntimeError(f"wrong result (relative error {err:.2e}) at head_dim={d}")


def select_backend(
    device: torch.device | str,
    dtype: torch.dtype,
    preferred: str | None = None,
    head_dims: Iterable[int] = (64,),
) -> str:
    """The first backend in xformers > sdpa > math that runs correctly on `device`/`dtype`.

    A `preferred` backend is the only one tried and raises RuntimeError if it cannot run.
    `head_dims`: the per-head widths the model uses (probed, since kernels support a subset).
    """
    device = torch.device(device)
    head_dims = sorted(set(head_dims)) or [64]
    if preferred is not None:
        if preferred not in BACKENDS:
            raise ValueError(f"unknown attention backend {preferred!r}; choose one of {', '.join(BACKENDS)}")
        try:
            _probe(preferred, device, dtype, head_dims)
        except Exception as e:
            raise RuntimeError(
                f"attention backend {preferred!r} cannot run on {device}/{dtype}: {type(e).__name__}: {e}"
            ) from e
        _report(logging.INFO, "attention backend %s (requested) on %s/%s", preferred, device, dtype)
        return preferred
    for i, name in enumerate(BACKENDS):
        try:
            _probe(name, device, dtype, head_dims)
        except Exception as e:
            nxt = BACKENDS[i + 1] if i + 1 < len(BACKENDS) else None
            level = logging.INFO if isinstance(e, ImportError) else logging.WARNING
            _report(
                level,
                "attention backend %s unavailable on %s/%s (%s: %s); trying %s",
                name,
                device,
                dtype,
                type(e).__name__,
                str(e).splitlines()[0] if str(e) else "",
                nxt,
            )
            continue
        _report(logging.INFO, "attention backend %s on %s/%s", name, device, dtype)
        return name
    raise RuntimeError("no attention backend works, not even math")  # math only fails on a broken device


class Attention(nn.Module):
    """Multi-head attention on token sequences: x (B, L, C), context (B, Lk, Cc) or None -> (B, L, C).

    Keys as diffusers `Attention`: to_q, to_k, to_v, to_out.0 (to_out.1 is dropout).
    """

    def __init__(
        self,
        query_dim: int,
        heads: int,
        dim_head: int,
        context_dim: int | None = None,
        bias: bool = False,
        upcast: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        inner = heads * dim_head
        self.heads, self.dim_head, self.upcast = heads, dim_head, upcast
        self.backend = "sdpa"
        self.to_q = nn.Linear(query_dim, inner, bias=bias)
        self.to_k = nn.Linear(context_dim or query_dim, inner, bias=bias)
        self.to_v = nn.Linear(context_dim or query_dim, inner, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim), nn.Dropout(dropout)])

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        b, n, _ = x.shape
        ctx = x if context is None else context
        q = self.to_q(x).view(b, n, self.heads, self.dim_head).transpose(1, 2)  # (B, h, L, d)
        k = self.to_k(ctx).view(b, -1, self.heads, self.dim_head).transpose(1, 2)  # (B, h, Lk, d)
        v = self.to_v(ctx).view(b, -1, self.heads, self.dim_head).transpose(1, 2)  # (B, h, Lk, d)
        if self.upcast:
            q, k, v = q.float(), k.float(), v.float()
        out = attention(q, k, v, self.backend)  # (B, h, L, d)
        out = out.transpose(1, 2).reshape(b, n, self.heads * self.dim_head).to(x.dtype)  # (B, L, h*d)
        return self.to_out[1](self.to_out[0](out))


class SpatialSelfAttention(Attention):
    """UNet2DModel's attention block: GroupNorm, self-attention over H*W, residual, / rescale.

    x (B, C, H, W) -> (B, C, H, W). Keys: group_norm (optional), to_q/k/v (with bias), to_out.0.
    """

    def __init__(
        self, channels: int, heads: int, dim_head: int, groups: int | None, eps: float, rescale: float = 1.0
    ) -> None:
        super().__init__(channels, heads, dim_head, bias=True)
        self.group_norm = nn.GroupNorm(groups, channels, eps=eps) if groups is not None else None
        self.rescale = rescale

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.group_norm(x) if self.group_norm is not None else x
        y = y.reshape(b, c, h * w).transpose(1, 2)  # (B, HW, C)
        y = super().forward(y)
        y = y.transpose(1, 2).reshape(b, c, h, w)  # (B, C, H, W)
        y = y + x
        return y if self.rescale == 1.0 else y / self.rescale


class GEGLU(nn.Module):
    """Linear to 2*dim_out, then a * gelu(gate): (..., dim_in) -> (..., dim_out)."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, gate = self.proj(x).chunk(2, dim=-1)
        return a * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU MLP with 4x width; keys net.0.proj, net.2 as diffusers."""

    def __init__(self, dim: int, dropout: float = 0.0, mult: int = 4) -> None:
        super().__init__()
        self.net = nn.ModuleList([GEGLU(dim, dim * mult), nn.Dropout(dropout), nn.Linear(dim * mult, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for m in self.net:
            x = m(x)
        return x


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm self-attention, cross-attention to the context, GEGLU feed-forward; (B, L, C)."""

    def __init__(
        self,
        dim: int,
        heads: int,
        dim_head: int,
        context_dim: int,
        upcast: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, dim_head, upcast=upcast, dropout=dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, dim_head, context_dim=context_dim, upcast=upcast, dropout=dropout)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, dropout=dropout)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class Transformer2D(nn.Module):
    """diffusers Transformer2DModel (continuous input): x (B, C, H, W), context (B, Lk, Cc) -> (B, C, H, W).

    GroupNorm(eps 1e-6), proj_in (1x1 conv or Linear), transformer blocks over H*W tokens, proj_out, residual.
    """

    def __init__(
        self,
        channels: int,
        heads: int,
        dim_head: int,
        context_dim: int,
        num_layers: int,
        groups: int,
        linear_projection: bool,
        upcast: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        inner = heads * dim_head
        self.linear_projection = linear_projection
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in: nn.Linear | nn.Conv2d
        self.proj_out: nn.Linear | nn.Conv2d
        if linear_projection:
            self.proj_in, self.proj_out = nn.Linear(channels, inner), nn.Linear(inner, channels)
        else:
            self.proj_in, self.proj_out = nn.Conv2d(channels, inner, 1), nn.Conv2d(inner, channels, 1)
        self.transformer_blocks = nn.ModuleList(
            [
                BasicTransformerBlock(inner, heads, dim_head, context_dim, upcast, dropout)
                for _ in range(num_layers)
            ]
        )

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        if self.linear_projection:
            y = self.proj_in(y.permute(0, 2, 3, 1).reshape(b, h * w, c))  # (B, HW, inner)
        else:
            y = self.proj_in(y)  # (B, inner, H, W)
            y = y.permute(0, 2, 3, 1).reshape(b, h * w, y.shape[1])  # (B, HW, inner)
        for block in self.transformer_blocks:
            y = block(y, context)
        if self.linear_projection:
            y = self.proj_out(y).reshape(b, h, w, c).permute(0, 3, 1, 2)  # (B, C, H, W)
        else:
            y = self.proj_out(y.reshape(b, h, w, -1).permute(0, 3, 1, 2))  # (B, inner, H, W) -> (B, C, H, W)
        return y + x


def set_attention_backend(module: nn.Module, backend: str) -> None:
    """Make every attention module inside `module` use `backend` (one of BACKENDS)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    for m in module.modules():
        if isinstance(m, Attention):
            m.backend = backend


def head_dims(module: nn.Module) -> set[int]:
    """The per-head widths used by the attention modules inside `module` (for probing backends)."""
    return {m.dim_head for m in module.modules() if isinstance(m, Attention)}
