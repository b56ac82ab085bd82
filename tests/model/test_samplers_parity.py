"""Parity with diffusers schedulers: same tiny model, same starting point, final samples agree to 1e-4.

The model is a tiny randomly initialised (and perturbed) diffusers UNet2DModel, wrapped in our U-Net call
signature so the same network drives both paths: diffusers' scheduler loop and our Denoiser + sampler.
"""

from __future__ import annotations

import math

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from model.denoiser import Denoiser  # noqa: E402
from model.samplers import get_sampler, sample  # noqa: E402
from model.schedules import Schedule  # noqa: E402


class WrappedUNet:
    """A diffusers UNet2DModel behind our contract: unet(x, t, class_labels=, context=, control=), .dtype."""

    dtype = torch.float32

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module

    def __call__(self, x, t, class_labels=None, context=None, control=None):
        return self.module(x, t).sample


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/model/conftest.py


@pytest.fixture(scope="module")
def unet() -> torch.nn.Module:
    torch.manual_seed(0)
    m = diffusers.UNet2DModel(
        sample_size=8,
        in_channels=2,
        out_channels=2,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    )
    with torch.no_grad():  # move away from the init so no output path is (near) zero
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m.eval()


@pytest.fixture(scope="module")
def noise() -> torch.Tensor:
    return torch.randn(2, 2, 8, 8, generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def run_diffusers(scheduler, unet, noise, steps: int, init_scale: float | None = None) -> torch.Tensor:
    scheduler.set_timesteps(steps)
    if init_scale is None:
        init_scale = getattr(scheduler, "init_noise_sigma", 1.0)  # flow schedulers start from plain noise
    x = noise * init_scale
    scale = getattr(scheduler, "scale_model_input", lambda x, t: x)  # flow schedulers feed x as is
    for t in scheduler.timesteps:
        out = unet(scale(x, t), t).sample
        x = scheduler.step(out, t, x).prev_sample
    return x


def run_ours(scheduler, unet, noise, steps: int, sampler_name: str, spacing: str | None = None):
    schedule = Schedule.from_config({**scheduler.config, "_class_name": type(scheduler).__name__})
    sampler = get_sampler(sampler_name, schedule.kind)
    sigmas = sampler.make_sigmas(schedule, steps, spacing)
    return sample(Denoiser(WrappedUNet(unet), schedule), noise, sigmas, sampler), sigmas


VP = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


@pytest.mark.parametrize(
    "prediction_type, spacing, steps_offset, steps",
    [("epsilon", "leading", 1, 10), ("v_prediction", "trailing", 0, 10), ("epsilon", "trailing", 0, 20)],
)
def test_ddim_parity(unet, noise, prediction_type, spacing, steps_offset, steps):
    sch = diffusers.DDIMScheduler(
        **VP, prediction_type=prediction_type, timestep_spacing=spacing, steps_offset=steps_offset,
        clip_sample=False, set_alpha_to_one=True,
    )
    ours, _ = run_ours(sch, unet, noise, steps, "ddim")
    ref = run_diffusers(sch, unet, noise, steps)
    assert (ours - ref).abs().max() <= 1e-4


@pytest.mark.parametrize(
    "prediction_type, spacing, karras",
    [("epsilon", "leading", False), ("v_prediction", "trailing", False), ("epsilon", "linspace", True)],
)
def test_euler_parity(unet, noise, prediction_type, spacing, karras):
    sch = diffusers.EulerDiscreteScheduler(
        **VP, prediction_type=prediction_type, timestep_spacing=spacing,
        steps_offset=1 if spacing == "leading" else 0, use_karras_sigmas=karras,
    )
    ours, sigmas = run_ours(sch, unet, noise, 12, "Euler Karras" if karras else "EulerDiscreteScheduler")
    # diffusers starts linspace/trailing grids at σ_max·noise instead of sqrt(1+σ_max²)·noise; start both
    # from our (exact VP) point so that the comparison is about the steps.
    ref = run_diffusers(sch, unet, noise, 12, init_scale=math.sqrt(1 + float(sigmas[0]) ** 2))
    assert torch.allclose(sch.sigmas.double(), sigmas, rtol=1e-5, atol=0)
    assert (ours - ref).abs().max() <= 1e-4


@pytest.mark.parametrize(
    "prediction_type, steps", [("epsilon", 10), ("v_prediction", 10), ("epsilon", 20), ("v_prediction", 20)]
)
def test_dpmpp_2m_parity(unet, noise, prediction_type, steps):
    # 10 steps exercises diffusers' lower_order_final (< 15 steps); 20 does not.
    sch = diffusers.DPMSolverMultistepScheduler(
        **VP, prediction_type=prediction_type, timestep_spacing="trailing",
        algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint",
    )
    ours, _ = run_ours(sch, unet, noise, steps, "DPM++ 2M")
    ref = run_diffusers(sch, unet, noise, steps)
    assert (ours - ref).abs().max() <= 1e-4


@pytest.mark.parametrize("shift, steps", [(1.0, 8), (3.0, 12)])
def test_flow_euler_parity(unet, noise, shift, steps):
    sch = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    ours, sigmas = run_ours(sch, unet, noise, steps, "FlowMatchEulerDiscreteScheduler")
    ref = run_diffusers(sch, unet, noise, steps)
    assert torch.allclose(sch.sigmas.double(), sigmas, atol=1e-6)
    assert (ours - ref).abs().max() <= 1e-4


def test_flow_ddim_and_dpmpp_are_flow_forms(unet, noise):
    # For flow, DDIM = flow Euler exactly, and DPM++ 2M's first step from σ = 1 is x' = (1 − σ')·x0 + σ'·x.
    sch = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=2.0)
    a, _ = run_ours(sch, unet, noise, 6, "flow_euler")
    b, _ = run_ours(sch, unet, noise, 6, "ddim")
    assert (a - b).abs().max() <= 1e-5
    one, sigmas = run_ours(sch, unet, noise, 1, "dpmpp_2m")
    ref = run_diffusers(sch, unet, noise, 1)
    assert (one - ref).abs().max() <= 1e-5
