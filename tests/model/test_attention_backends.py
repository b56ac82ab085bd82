"""Attention dispatch: each backend that runs here agrees with math; selection probes and falls back."""

from __future__ import annotations

import importlib.util
import logging

import pytest
import torch

from model import attention as attn_mod
from model.attention import BACKENDS, attention, select_backend, set_attention_backend

HAVE_XFORMERS = importlib.util.find_spec("xformers") is not None


def _backends_here() -> list:
    out = []
    for name in BACKENDS:
        marks = (
            [pytest.mark.skipif(not HAVE_XFORMERS, reason="xformers not installed")]
            if name == "xformers"
            else []
        )
        out.append(pytest.param(name, marks=marks))
    return out


@pytest.mark.parametrize("backend", _backends_here())
@pytest.mark.parametrize("lk", [12, 5], ids=["self", "cross"])
def test_backend_matches_math(backend, lk):
    if backend == "xformers":
        try:
            select_backend("cpu", torch.float32, preferred="xformers")
        except RuntimeError as e:
            pytest.skip(f"xformers cannot run on CPU: {e}")
    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 2, 12, 16, generator=g)
    k = torch.randn(3, 2, lk, 16, generator=g)
    v = torch.randn(3, 2, lk, 16, generator=g)
    k[1] *= 3.0  # rows differ in scale: a backend mixing rows or heads would be caught
    v[2] += 1.0
    ref = attention(q, k, v, "math")
    got = attention(q, k, v, backend)
    assert got.shape == (3, 2, 12, 16)
    assert ((got - ref).norm() / ref.norm()).item() <= 1e-5
    # each row alone gives its batched result
    for i in range(3):
        one = attention(q[i : i + 1], k[i : i + 1], v[i : i + 1], backend)
        assert torch.allclose(one[0], got[i], atol=1e-5)


def test_math_is_softmax_qk_v():
    q, k, v = torch.randn(1, 1, 3, 4), torch.randn(1, 1, 5, 4), torch.randn(1, 1, 5, 4)
    w = torch.softmax(q[0, 0] @ k[0, 0].T / 2.0, dim=-1)
    assert torch.allclose(attention(q, k, v, "math")[0, 0], w @ v[0, 0], atol=1e-6)


def test_select_backend_cpu_picks_working_and_logs_failures(caplog, monkeypatch):
    def broken(q, k, v):
        raise RuntimeError("No operator found for memory_efficient_attention_forward")

    monkeypatch.setitem(attn_mod._FNS, "xformers", broken)  # as seen on the GPU image
    with caplog.at_level(logging.INFO, logger="model.attention"):
        assert select_backend("cpu", torch.float32, head_dims=(8, 40)) == "sdpa"
    assert "No operator found" in caplog.text and "trying sdpa" in caplog.text


def test_select_backend_falls_back_to_math_on_wrong_results(monkeypatch):
    monkeypatch.setitem(
        attn_mod._FNS, "xformers", lambda q, k, v: (_ for _ in ()).throw(ImportError("absent"))
    )
    monkeypatch.setitem(attn_mod._FNS, "sdpa", lambda q, k, v: torch.zeros_like(q))  # runs, but wrong
    assert select_backend("cpu", torch.float32) == "math"


def test_preferred_backend_fails_loudly(monkeypatch):
    assert select_backend("cpu", torch.float32, preferred="math") == "math"
    monkeypatch.setitem(attn_mod._FNS, "sdpa", lambda q, k, v: torch.full_like(q, float("nan")))
    with pytest.raises(RuntimeError, match="sdpa"):
        select_backend("cpu", torch.float32, preferred="sdpa")
    with pytest.raises(ValueError, match="unknown attention backend"):
        select_backend("cpu", torch.float32, preferred="flash9000")
    if not HAVE_XFORMERS:
        with pytest.raises(RuntimeError, match="xformers"):
            select_backend("cpu", torch.float32, preferred="xformers")


def test_set_attention_backend_reaches_every_module():
    from model import UNet, UNetConfig

    cfg = UNetConfig(
        block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=1,
        norm_num_groups=4,
        attention_head_dim=2,
        cross_attention_dim=8,
    )
    torch.manual_seed(0)
    net = UNet(cfg).eval()
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([1.0, 500.0]), torch.randn(2, 3, 8)
    with torch.no_grad():
        set_attention_backend(net, "sdpa")
        a = net(x, t, context=ctx)
        set_attention_backend(net, "math")
        b = net(x, t, context=ctx)
    mods = [m for m in net.modules() if isinstance(m, attn_mod.Attention)]
    assert mods and all(m.backend == "math" for m in mods)
    assert ((a - b).norm() / b.norm()).item() <= 1e-5
