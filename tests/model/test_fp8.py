"""FP8 linears (model.fp8) on the CPU, where torch's _scaled_mm runs too: the GEMM equals the dequantised
product, the error against fp32 is what e4m3 allows, a token's result does not depend on its batch, and
the switch covers the attention linears, keeps state dicts, and switches back exactly."""

from __future__ import annotations

import torch
from torch import nn

from model.attention import Transformer2D
from model.fp8 import E4M3_MAX, Fp8Linear, quantize_rows, use_fp8


def test_quantize_rows_scales_each_row_to_the_e4m3_range() -> None:
    x = torch.randn(5, 64) * torch.tensor([1e-3, 1.0, 30.0, 1e3, 0.0])[:, None]
    x8, scale = quantize_rows(x)
    assert x8.dtype == torch.float8_e4m3fn and scale.shape == (5, 1)
    amax = x8.float().abs().amax(1)
    assert torch.allclose(amax[:4], torch.full((4,), E4M3_MAX))  # every nonzero row uses the full range
    assert amax[4] == 0 and torch.isfinite(scale).all()  # an all-zero row stays zero
    back = x8.float() * scale
    rel = ((back - x).abs().amax(1) / x.abs().amax(1).clamp_min(1e-30))[:4]
    assert (rel <= 2**-4).all()  # e4m3 keeps 3 mantissa bits: half an ulp is at most 1/16 of the row's max


def test_fp8_linear_is_the_dequantised_product_and_close_to_fp32() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(64, 48)
    x = torch.randn(3, 7, 64)
    f8 = Fp8Linear(lin)
    with torch.no_grad():
        y = f8(x)
        x8, xs = quantize_rows(x.reshape(-1, 64))
        w8, ws = quantize_rows(lin.weight)
        ref_q = ((x8.float() * xs) @ (w8.float() * ws).t()).to(torch.bfloat16).float() + lin.bias
        ref = lin(x)
    assert y.shape == (3, 7, 48) and y.dtype == x.dtype
    torch.testing.assert_close(y.reshape(-1, 48), ref_q, atol=1e-5, rtol=1e-5)
    rel = (y - ref).norm() / ref.norm()
    assert 1e-4 < rel < 0.06, rel  # quantised (not the fp32 result), within what e4m3 allows


def test_a_token_does_not_depend_on_its_batch() -> None:
    torch.manual_seed(1)
    f8 = Fp8Linear(nn.Linear(32, 16))
    x = torch.randn(6, 32)
    x[3] *= 100  # a loud token elsewhere in the batch does not change the others' scales
    with torch.no_grad():
        batch = f8(x)
        alone = torch.cat([f8(x[i : i + 1]) for i in range(6)])
    torch.testing.assert_close(batch, alone, atol=0, rtol=0)


def test_use_fp8_switches_the_attention_linears_and_back() -> None:
    torch.manual_seed(2)
    block = Transformer2D(64, 2, 32, context_dim=32, num_layers=1, groups=8, linear_projection=True).eval()
    keys = set(block.state_dict())
    x, ctx = torch.randn(2, 64, 4, 4), torch.randn(2, 5, 32)
    with torch.no_grad():
        ref = block(x, ctx)
        n = use_fp8(block)
        # per layer: q, k, v, out of self- and cross-attention, GEGLU, feed-forward out; proj_in, proj_out
        assert n == 2 * 4 + 2 + 2
        assert set(block.state_dict()) == keys  # same names, same tensors
        out = block(x, ctx)
        assert use_fp8(block, enabled=False) == n
        back = block(x, ctx)
    assert torch.equal(back, ref)
    assert not torch.equal(out, ref)
    assert ((out - ref).norm() / ref.norm()) < 0.1
