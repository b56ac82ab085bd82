"""Sampler.advance_many (many requests' states in one set of tensor ops) is bitwise the per-state advance."""

from __future__ import annotations

import pytest
import torch

from model.noise import RequestNoise
from model.samplers import get_sampler
from model.schedules import Schedule

VP = Schedule.from_config({"_class_name": "DDIMScheduler", "timestep_spacing": "trailing"})
FLOW = Schedule.from_config({"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0})


@pytest.fixture(autouse=True)
def two_threads():
    n = torch.get_num_threads()
    torch.set_num_threads(2)  # large batches split across threads at a position inside a row
    yield
    torch.set_num_threads(n)


def states_pair(name: str, schedule: Schedule, rows: int, shape: tuple[int, ...]):
    """Two identical sets of states: different step counts and seeds per row."""
    sampler = get_sampler(name, schedule.kind)
    pair = ([], [])
    for i in range(rows):
        sigmas = sampler.make_sigmas(schedule, 3 + i % 6)
        for states in pair:
            noise = RequestNoise(i)
            states.append(sampler.init(noise.initial((1, *shape)), sigmas, generator=noise))
    return sampler, pair


@pytest.mark.parametrize(
    "name, schedule",
    [("ddim", VP), ("euler", VP), ("dpmpp_2m", VP), ("ddim", FLOW), ("dpmpp_2m", FLOW),
     ("flow_euler", FLOW), ("heun", VP), ("euler_ancestral", VP)],
)
@pytest.mark.parametrize("shape", [(1, 16, 16), (3, 8, 24), (3, 41, 43)])
def test_advance_many_is_bitwise_the_per_state_loop(name, schedule, shape):
    # 41 rows of (3, 41, 43): ~217k elements, split over 2 threads at an odd offset inside row 20 (where
    # lerp-like kernels, FMA in SIMD lanes but not in the scalar tail, would differ from the loop).
    sampler, (alone, many) = states_pair(name, schedule, 41, shape)
    g = torch.Generator().manual_seed(0)
    # Rows start at different points, so one call mixes steps (DPM++: first and second order).
    for i, st in enumerate(alone):
        for _ in range(i % 3):
            d = torch.randn(1, *shape, generator=g)
            sampler.advance(st, d)
            sampler.advance(many[i], d.clone())
    while True:
        live = [i for i, st in enumerate(alone) if not sampler.done(st)]
        if not live:
            break
        denoised = torch.randn(len(live), *shape, generator=g) * 2  # (N, C, H, W)
        for j, i in enumerate(live):
            sampler.advance(alone[i], denoised[j : j + 1])
        sampler.advance_many([many[i] for i in live], denoised)
        for i in live:
            assert torch.equal(alone[i].x, many[i].x), (name, shape, i, alone[i].i)
            assert alone[i].i == many[i].i and alone[i].stage == many[i].stage
    for a, b in zip(alone, many, strict=True):
        assert torch.equal(sampler.result(a), sampler.result(b))


def test_batch_key_separates_configurations():
    assert get_sampler("ddim", "vp").batch_key == get_sampler("DDIMScheduler", "vp").batch_key
    assert get_sampler("ddim", "vp").batch_key != get_sampler("ddim", "flow").batch_key
    assert get_sampler("euler", "vp").batch_key != get_sampler("ddim", "vp").batch_key
    sde = get_sampler("euler_ancestral", "vp")
    assert sde.batch_key != get_sampler("euler_ancestral", "vp", eta=0.5).batch_key
