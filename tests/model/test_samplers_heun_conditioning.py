"""Heun over extreme σ ratios (issue 15): σ-space Heun's corrector extrapolates the step's second x0
estimate by σ/2σ', so a VP cosine schedule's first step (σ 20,291 → 6.4) draws noise even with the exact
denoiser. model.samplers.Heun takes steps with σ/σ' > max_sigma_ratio through the exponential trapezoid.

Analytic (exact Gaussian denoiser, tests/model/test_samplers_analytic.py) and parity with diffusers' Heun
schedulers where no step crosses the ratio (there our update is Karras' σ-space one, unchanged).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from model.samplers import get_sampler, sample
from model.schedules import Schedule, initial_noise_scale
from tests.model.test_samplers_analytic import MU, exact_ode, gaussian_denoiser, marginal_std, order_grid

REPO = Path(__file__).resolve().parents[2]
# The shipped fashion-class schedule (squaredcos_cap_v2, v_prediction, trailing): σ_max ≈ 20,291.
COSINE = Schedule.from_config(
    {
        "_class_name": "DDIMScheduler",
        "beta_schedule": "squaredcos_cap_v2",
        "prediction_type": "v_prediction",
        "timestep_spacing": "trailing",
    }
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/model/conftest.py


def _max_ratio(sigmas: torch.Tensor) -> float:
    """Largest σ/σ' over the grid's steps into σ' > 0."""
    g = sigmas.tolist()
    return max(a / b for a, b in zip(g[:-2], g[1:-1], strict=True)) if len(g) > 2 else 1.0


def _heun(kind: str, max_sigma_ratio: float | None = None):
    sampler = get_sampler("heun" if kind == "vp" else "flow_heun", kind)
    if max_sigma_ratio is not None:
        sampler.max_sigma_ratio = max_sigma_ratio  # an instance override, for the comparisons below
    return sampler


def _error_to_exact_ode(sampler, sigmas: torch.Tensor, n: int = 2000) -> float:
    """Mean |sample − exact probability-flow ODE solution| for Gaussian data started on the σ0 marginal."""
    s0 = float(sigmas[0])
    z = torch.randn(n, 4, generator=torch.Generator().manual_seed(0))
    x_start = MU + marginal_std("vp", s0).float() * z  # (n, 4)
    truth = exact_ode("vp", x_start, s0, 0.0)
    out = sample(gaussian_denoiser("vp"), x_start / initial_noise_scale("vp", s0), sigmas, sampler)
    return (out.double() - truth).abs().mean().item()


def test_shipped_schedule_is_the_one_tested():
    shipped = json.loads((REPO / "weights/fashion-class/scheduler/scheduler_config.json").read_text())
    assert Schedule.from_config(shipped).sigma_max == pytest.approx(COSINE.sigma_max)
    assert COSINE.sigma_max > 2e4


@pytest.mark.parametrize("steps", [5, 10, 20, 40])
def test_heun_on_cosine_schedule_follows_the_exact_ode(steps):
    """The data's std is 0.2–1. σ-space Heun (ratio ∞: the old update, diffusers' too) is off by 89, 11.5,
    1.5, 0.18 at 5/10/20/40 steps (measured); the fixed one by 0.053, 0.015, 0.0050, 0.0017."""
    sigmas = _heun("vp").make_sigmas(COSINE, steps)
    assert _max_ratio(sigmas) > 700  # the first step: σ_max → σ(t = T(1 − 1/steps))
    fixed = _error_to_exact_ode(_heun("vp"), sigmas)
    old = _error_to_exact_ode(_heun("vp", math.inf), sigmas)
    assert fixed < 0.5 / steps, fixed
    assert old > 0.1, old
    euler = _error_to_exact_ode(get_sampler("euler", "vp"), sigmas)
    assert fixed < euler / 2, (fixed, euler)  # still the better solver at the same step count


@pytest.mark.parametrize("kind", ["vp", "flow"])
def test_exponential_trapezoid_is_second_order(kind):
    """With every step through the exponential branch (ratio threshold 1), doubling the steps quarters the
    error against the exact solution (measured ratios 3.5–3.9 at 16→32→64)."""
    sampler = _heun(kind, 1.0)
    hi, lo = float(order_grid(kind, 1)[0]), float(order_grid(kind, 1)[-1])
    x_start = torch.randn(64, 4, generator=torch.Generator().manual_seed(0)) * marginal_std(kind, hi).float()
    if kind == "flow":
        x_start = x_start + (1 - hi) * MU
    truth = exact_ode(kind, x_start, hi, lo)
    errors = []
    for n in (16, 32, 64):
        noise = x_start / initial_noise_scale(kind, hi)
        out = sample(gaussian_denoiser(kind), noise, order_grid(kind, n), sampler)
        errors.append((out.double() - truth).abs().max().item())
    ratios = [a / b for a, b in zip(errors, errors[1:], strict=False)]
    assert all(3.2 < r < 5.0 for r in ratios), (errors, ratios)
    assert errors[-1] < 0.01


def test_exponential_branch_from_flow_sigma_one():
    """From flow σ = 1 (α = 0, h = ∞) a 2-step grid's first step is x' = σ'·x + α'·D' — finite, no 0/0."""
    sampler = _heun("flow")
    x = torch.randn(1, 4, generator=torch.Generator().manual_seed(0))
    st = sampler.init(x, [1.0, 0.2, 0.0])
    d0, d1 = torch.full((1, 4), 0.3), torch.full((1, 4), -0.1)
    sampler.advance(st, d0)
    assert torch.allclose(st.x, 0.2 * x + 0.8 * d0)  # exponential Euler predictor
    sampler.advance(st, d1)
    assert st.i == 1 and st.stage == 0
    assert torch.allclose(st.x, 0.2 * x + 0.8 * d1)


# ---- parity with diffusers where no step crosses the ratio -----------------------------------------------

diffusers = pytest.importorskip("diffusers")

from model.denoiser import Denoiser  # noqa: E402
from tests.model.test_samplers_parity import VP, WrappedUNet  # noqa: E402


@pytest.fixture(scope="module")
def unet() -> torch.nn.Module:
    """A tiny perturbed diffusers UNet2DModel (as in test_samplers_parity) driving both paths."""
    torch.manual_seed(0)
    m = diffusers.UNet2DModel(
        sample_size=8, in_channels=2, out_channels=2, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    )
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m.eval()


@pytest.fixture(scope="module")
def noise() -> torch.Tensor:
    return torch.randn(2, 2, 8, 8, generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def _diffusers_heun_states(scheduler, module, x_init: torch.Tensor, steps: int) -> list[torch.Tensor]:
    """diffusers' Heun loop from x_init; the sample after every completed step (at each σ of the grid)."""
    scheduler.set_timesteps(steps)
    x, out = x_init, []
    scale = getattr(scheduler, "scale_model_input", lambda x, t: x)
    for t in scheduler.timesteps:
        x = scheduler.step(module(scale(x, t), t).sample, t, x).prev_sample
        if scheduler.state_in_first_order:  # a step is complete (Heun: after its correction)
            out.append(x)
    return [*out, x]  # the last step, into σ = 0, is Euler: complete without a correction


@torch.no_grad()
def _our_states(schedule: Schedule, sampler, module, x_init: torch.Tensor, sigmas) -> list[torch.Tensor]:
    denoiser = Denoiser(WrappedUNet(module), schedule)
    st = sampler.init(x_init / initial_noise_scale(schedule.kind, float(sigmas[0])), sigmas)
    out = []
    while not sampler.done(st):
        x, sigma = sampler.next_input(st)
        i = st.i
        sampler.advance(st, denoiser(x, torch.full((x.shape[0],), sigma, dtype=torch.float64)))
        if st.i > i:
            out.append(st.x)
    return out


@pytest.mark.parametrize(
    "prediction_type, spacing, karras, steps",
    [("epsilon", "trailing", False, 10), ("v_prediction", "trailing", False, 20),
     ("epsilon", "linspace", True, 20), ("v_prediction", "linspace", True, 16)],
)
def test_heun_parity_where_no_step_crosses_the_ratio(unet, noise, prediction_type, spacing, karras, steps):
    """scaled_linear (σ_max 14.6) trailing ≥ 10 steps and Karras ≥ 16 steps keep σ/σ' < 2: the same update
    as before the fix, and diffusers' HeunDiscreteScheduler to 1e-4."""
    sch = diffusers.HeunDiscreteScheduler(
        **VP, prediction_type=prediction_type, timestep_spacing=spacing, use_karras_sigmas=karras
    )
    schedule = Schedule.from_config({**sch.config, "_class_name": "HeunDiscreteScheduler"})
    sampler = get_sampler("Heun Karras" if karras else "HeunDiscreteScheduler", "vp")
    sigmas = sampler.make_sigmas(schedule, steps)
    assert _max_ratio(sigmas) < sampler.max_sigma_ratio
    # diffusers starts trailing/linspace grids at σ_max·noise; start both from our exact VP point
    x_init = noise * math.sqrt(1 + float(sigmas[0]) ** 2)
    ref = _diffusers_heun_states(sch, unet, x_init, steps)
    ours = _our_states(schedule, sampler, unet, x_init, sigmas)
    assert len(ours) == len(ref) == steps
    assert (ours[-1] - ref[-1]).abs().max() <= 1e-4


@pytest.mark.parametrize("kind, steps", [("vp", 10), ("flow", 8)])
def test_heun_matches_diffusers_up_to_the_first_extreme_step(unet, noise, kind, steps):
    """Where a grid has an extreme step (scaled_linear "leading": σ 0.34 → 0.029, ratio 11.8; FlowMatch
    shift 3: 0.11 → 0.003, ratio 38, both the last step into σ' > 0), every step before it is diffusers' to
    1e-4 and that step is not: the fix changes only the steps it is for."""
    if kind == "vp":
        sch = diffusers.HeunDiscreteScheduler(**VP, timestep_spacing="leading", steps_offset=1)
        schedule = Schedule.from_config({**sch.config, "_class_name": "HeunDiscreteScheduler"})
        sampler = get_sampler("heun", "vp")
    else:
        sch = diffusers.FlowMatchHeunDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
        schedule = Schedule.from_config({**sch.config, "_class_name": "FlowMatchEulerDiscreteScheduler"})
        sampler = get_sampler("FlowMatchHeunDiscreteScheduler", "flow")
    sigmas = sampler.make_sigmas(schedule, steps)
    g = sigmas.tolist()
    extreme = [i for i in range(steps - 1) if g[i] > sampler.max_sigma_ratio * g[i + 1]]
    assert extreme == [steps - 2], (g, extreme)
    x_init = noise * initial_noise_scale(kind, g[0])
    ref = _diffusers_heun_states(sch, unet, x_init, steps)
    ours = _our_states(schedule, sampler, unet, x_init, sigmas)
    assert len(ours) == len(ref) == steps
    for i in range(steps - 2):
        assert (ours[i] - ref[i]).abs().max() <= 1e-4, i
    assert (ours[steps - 2] - ref[steps - 2]).abs().max() > 1e-3
