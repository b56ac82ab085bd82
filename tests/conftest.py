"""Session-wide test setup, loaded before any test module is imported."""

from __future__ import annotations

import os

import torch

# Without a GPU, Triton kernels (model.fused_groupnorm) run in Triton's interpreter. Triton reads this when
# it is imported, and diffusers imports it as a side effect, so it must be set before any test module loads
# (a fixture is too late). With a GPU, real kernels run: never set there.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
