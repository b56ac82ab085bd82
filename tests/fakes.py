"""Test doubles importable by module path (a spawned engine process unpickles them by name)."""

from __future__ import annotations

import zlib

import torch

TEXT_DIM = 32
TEXT_LEN = 8


class FakeTextEncoder:
    """Deterministic stand-in for MiniLM: each prompt maps to fixed random token states (L, D)."""

    max_length = TEXT_LEN

    def __init__(self, device: torch.device, dtype: torch.dtype) -> None:
        self.device, self.dtype = device, dtype
        self.calls = 0

    def encode(self, prompts: list[str]) -> torch.Tensor:
        self.calls += 1
        rows = []
        for p in prompts:
            g = torch.Generator().manual_seed(zlib.crc32(p.encode()))
            rows.append(torch.randn(TEXT_LEN, TEXT_DIM, generator=g))
        return torch.stack(rows).to(self.device, self.dtype)  # (B, L, D)
