"""Per-request seeded noise."""

from __future__ import annotations

import pytest
import torch

from model.noise import MAX_SEED, RequestNoise, draw_step_noise


def test_same_seed_same_stream():
    a, b = RequestNoise(1234), RequestNoise(1234)
    assert torch.equal(a.initial((2, 3, 4, 4)), b.initial((2, 3, 4, 4)))
    assert torch.equal(a.step((2, 3, 4, 4)), b.step((2, 3, 4, 4)))
    assert not torch.equal(RequestNoise(1).initial((8,)), RequestNoise(2).initial((8,)))


def test_draws_are_fp32_cpu_and_independent_of_global_rng():
    torch.manual_seed(0)
    a = RequestNoise(7).initial((4, 4))
    torch.randn(100)  # global generator use must not matter
    torch.manual_seed(99)
    b = RequestNoise(7).initial((4, 4))
    assert a.dtype == torch.float32 and a.device.type == "cpu" and torch.equal(a, b)
    assert torch.equal(RequestNoise(7).initial((4, 4), device="cpu"), a)


def test_random_seed_is_recorded_and_replays():
    n = RequestNoise()
    assert isinstance(n.seed, int) and 0 <= n.seed <= MAX_SEED
    assert torch.equal(n.initial((5,)), RequestNoise(n.seed).initial((5,)))
    assert RequestNoise().seed != RequestNoise().seed or RequestNoise().seed != RequestNoise().seed


@pytest.mark.parametrize("seed", [-1, 2**64, 1.5, "3", True])
def test_bad_seed(seed):
    with pytest.raises(ValueError, match="seed"):
        RequestNoise(seed)


def test_draw_step_noise():
    like = torch.zeros(2, 3)
    assert torch.equal(draw_step_noise(RequestNoise(3), like), RequestNoise(3).step((2, 3)))
    g = torch.Generator().manual_seed(5)
    assert draw_step_noise(g, like).shape == (2, 3)
    with pytest.raises(ValueError, match="generator"):
        draw_step_noise(None, like)
