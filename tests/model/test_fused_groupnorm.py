"""The fused GroupNorm(+add)+SiLU kernels (model.fused_groupnorm) against torch's GroupNorm and SiLU, run in
Triton's interpreter on the CPU: layouts, dtypes, group sizes that are not powers of two, the time
embedding's add, numerically hard inputs, batch invariance, and the resnet block switched to them."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from model import fused_groupnorm as fg
from model.blocks import ResnetBlock2D

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")


@pytest.fixture(autouse=True)
def interpret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the kernels on CPU tensors


def params(c: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return 1 + 0.3 * torch.randn(c, generator=g), 0.2 * torch.randn(c, generator=g)


@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("with_add", [True, False])
@pytest.mark.parametrize("silu", [True, False])
def test_matches_torch_fp32(channels_last: bool, with_add: bool, silu: bool) -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 80, 5, 7, generator=g) * 3 + 1  # 8 groups of 10 channels; 35 pixels (masked tiles)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    add = torch.randn(2, 80, generator=g) if with_add else None
    w, b = params(80)
    assert fg.available(x)
    ours = fg.group_norm_silu(x, w, b, 8, 1e-5, add, silu)
    ref = fg.reference(
        x.double(), w.double(), b.double(), 8, 1e-5, None if add is None else add.double(), silu
    )
    assert ours.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    torch.testing.assert_close(ours.double(), ref, atol=2e-5, rtol=1e-5)


def test_more_pixels_than_one_chunk_and_an_offset_mean() -> None:
    # 20x20 = 400 pixels: two chunks of the stats pass; a mean 1000x the spread (no E[x²]-E[x]² cancellation)
    g = torch.Generator().manual_seed(2)
    x = (1000 + torch.randn(1, 64, 20, 20, generator=g)).to(memory_format=torch.channels_last)
    w, b = params(64)
    ours = fg.group_norm_silu(x, w, b, 32, 1e-6)
    ref = fg.reference(x.double(), w.double(), b.double(), 32, 1e-6)
    torch.testing.assert_close(ours.double(), ref, atol=2e-3, rtol=1e-3)


def test_half_precision_input() -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 40, 6, 6, generator=g).half().to(memory_format=torch.channels_last)
    add = torch.randn(2, 40, generator=g)
    w, b = params(40)
    ours = fg.group_norm_silu(x, w, b, 4, 1e-5, add)
    assert ours.dtype == torch.float16
    ref = fg.reference(x.double(), w.double(), b.double(), 4, 1e-5, add.double())
    torch.testing.assert_close(ours.double(), ref, atol=4e-3, rtol=4e-3)  # fp16 output rounding


def test_a_row_is_the_same_alone_and_in_a_batch() -> None:
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 64, 17, 17, generator=g).to(memory_format=torch.channels_last)
    add = torch.randn(3, 64, generator=g)
    w, b = params(64)
    batch = fg.group_norm_silu(x, w, b, 32, 1e-5, add)
    alone = fg.group_norm_silu(x[1:2], w, b, 32, 1e-5, add[1:2])
    assert torch.equal(batch[1:2], alone)  # bitwise: the server's batch invariance


def test_resnet_block_switched_to_the_fused_kernels() -> None:
    torch.manual_seed(5)
    block = ResnetBlock2D(32, 64, temb_channels=16, groups=8, eps=1e-5).eval()
    x = torch.randn(2, 32, 6, 6).to(memory_format=torch.channels_last)
    emb = torch.randn(2, 16)
    with torch.no_grad():
        ref = block(x, emb)
        assert fg.use_fused_groupnorm(block) == 1
        fused = block(x, emb)
        fg.use_fused_groupnorm(block, enabled=False)
        back = block(x, emb)
    torch.testing.assert_close(fused, ref, atol=1e-4, rtol=1e-4)
    assert not torch.equal(fused, ref)  # it did run the other path
    assert torch.equal(back, ref)
    block.fused_norms = (fg.FusedGroupNormSiLU(block.norm1), fg.FusedGroupNormSiLU(block.norm2))
    names = set(block.state_dict())
    assert not any("fused" in n for n in names)  # the switch adds no weights to the state dict


def test_without_triton_or_cuda_the_torch_path_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET")
    x = torch.randn(1, 16, 4, 4)
    w, b = params(16)
    assert not fg.available(x)
    torch.testing.assert_close(fg.group_norm_silu(x, w, b, 4, 1e-5), fg.reference(x, w, b, 4, 1e-5))
