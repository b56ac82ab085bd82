"""Small helpers shared by the model tests (parity checks against diffusers)."""

from __future__ import annotations

import torch


def perturb(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Noise on every parameter, so zero-initialised ones (zero convs, unit norms) matter in a comparison."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return net.eval()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||."""
    return ((a - b).norm() / b.norm()).item()
