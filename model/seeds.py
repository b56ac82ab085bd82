"""Seed range and random-seed draw (no torch import: the HTTP side validates seeds without loading torch)."""

from __future__ import annotations

import secrets

MAX_SEED = 2**32 - 1  # 32-bit seeds, like A1111; safe as a JSON number in every client


def random_seed() -> int:
    """A fresh seed in [0, MAX_SEED] from the OS entropy pool (not from torch's global generator)."""
    return secrets.randbelow(MAX_SEED + 1)
