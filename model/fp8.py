"""FP8 (e4m3) matrix multiplies for the U-Net's attention and feed-forward linears: an opt-in precision.

Hopper runs e4m3 GEMMs at twice the fp16 rate. ``Fp8Linear`` replaces an ``nn.Linear``:

- weights: quantised once, when switched on, with one scale per output row (``amax(|W[o, :]|) / 448``,
  448 being e4m3's largest finite value), so a row with small weights keeps its precision;
- activations: quantised on the fly with one scale per token (row of the flattened input), so a token's
  result never depends on the other tokens or rows in the batch (the server's batch invariance);
- ``torch._scaled_mm(x8, w8ᵀ, scale_a=(tokens, 1), scale_b=(1, out))`` accumulates in fp32 and writes bf16
  (the row-wise-scaled output type cuBLASLt supports), cast back to the input's dtype; the bias is added
  after, in that dtype.

``use_fp8(module)`` switches every plain ``nn.Linear`` inside the attention blocks (``Transformer2D``:
q/k/v/out projections, GEGLU and feed-forward, linear proj_in/proj_out) whose sizes suit the FP8 GEMM
(multiples of 16); time-embedding and other small linears stay as they are. Switched layers keep their
original parameters under the same names (state dicts unchanged), so switching back is exact.
Quality is the reader's call: ``bench.unet_vs_diffusers --fp8`` reports the error against fp16 diffusers.
"""

from __future__ import annotations

import torch
from torch import nn

E4M3_MAX = 448.0  # the largest finite float8_e4m3fn
MIN_SCALE = 1e-12  # an all-zero row still gets a usable scale


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (R, K) -> (x8 (R, K) float8_e4m3fn, scale (R, 1) fp32) with x ≈ x8 * scale, one scale per row."""
    scale = (x.abs().amax(dim=1, keepdim=True).float() / E4M3_MAX).clamp_min(MIN_SCALE)
    x8 = (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return x8, scale


def suits_fp8(layer: nn.Linear) -> bool:
    """Sizes the FP8 GEMM takes: in and out features multiples of 16."""
    return layer.in_features % 16 == 0 and layer.out_features % 16 == 0


class Fp8Linear(nn.Module):
    """y = x Wᵀ + b with W and x in e4m3 (per-output-row and per-token scales); x (..., in) -> (..., out)."""

    w8: torch.Tensor  # (out, in) float8_e4m3fn
    w_scale: torch.Tensor  # (1, out) fp32

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        if not suits_fp8(linear):
            sizes = f"{linear.in_features}->{linear.out_features}"
            raise ValueError(f"FP8 needs features in multiples of 16, not {sizes}")
        # the original's parameters under the same names (state dicts unchanged); the module itself kept
        # unregistered, for switching back
        self.weight, self.bias = linear.weight, linear.bias
        object.__setattr__(self, "linear", linear)
        w8, w_scale = quantize_rows(linear.weight.detach())  # (out, in), (out, 1)
        self.register_buffer("w8", w8, persistent=False)
        self.register_buffer("w_scale", w_scale.t().contiguous(), persistent=False)  # (1, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x8, x_scale = quantize_rows(x.reshape(-1, shape[-1]))  # (tokens, in), (tokens, 1)
        y = torch._scaled_mm(  # noqa: SLF001 - torch's FP8 GEMM
            x8, self.w8.t(), scale_a=x_scale, scale_b=self.w_scale, out_dtype=torch.bfloat16
        ).to(x.dtype)  # (tokens, out)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], y.shape[-1])


def use_fp8(module: nn.Module, enabled: bool = True) -> int:
    """Switch the suitable ``nn.Linear`` layers inside ``module``'s attention blocks to ``Fp8Linear`` (or
    back); returns how many layers are switched."""
    from model.attention import Transformer2D

    count = 0
    for block in [m for m in module.modules() if isinstance(m, Transformer2D)]:
        for parent in list(block.modules()):
            for name, child in list(parent.named_children()):
                if enabled and type(child) is nn.Linear and suits_fp8(child):
                    setattr(parent, name, Fp8Linear(child))
                    count += 1
                elif not enabled and isinstance(child, Fp8Linear):
                    setattr(parent, name, child.linear)
                    count += 1
    return count
