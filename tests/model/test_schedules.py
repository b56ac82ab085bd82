"""Schedules and grids against diffusers' own tables and timesteps."""

from __future__ import annotations

import pytest
import torch

from model.schedules import Schedule, flow_shift, initial_noise_scale, make_sigmas

diffusers = pytest.importorskip("diffusers")


def _schedule(scheduler) -> Schedule:
    return Schedule.from_config({**scheduler.config, "_class_name": type(scheduler).__name__})


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(beta_schedule="linear"),
        dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
        dict(beta_schedule="squaredcos_cap_v2"),
    ],
)
def test_vp_tables_match_diffusers(kwargs):
    ref = diffusers.DDIMScheduler(**kwargs)
    sch = _schedule(ref)
    assert sch.kind == "vp" and sch.prediction_type == "epsilon"
    assert torch.equal(sch.alphas_cumprod, ref.alphas_cumprod)
    ac = ref.alphas_cumprod.double()
    assert torch.allclose(sch.sigmas, ((1 - ac) / ac).sqrt(), rtol=1e-12)
    assert sch.sigma_max == float(sch.sigmas[-1]) and sch.sigma_min == float(sch.sigmas[0])


SPACINGS = [("leading", 1), ("leading", 0), ("trailing", 0), ("linspace", 0)]


@pytest.mark.parametrize("spacing, offset", SPACINGS)
@pytest.mark.parametrize("steps", [1, 7, 10, 50, 999])
def test_vp_grid_timesteps_match_ddim(spacing, offset, steps):
    if spacing == "leading" and offset == 1 and steps == 999:
        pytest.skip("diffusers itself indexes past the table here")
    ref = diffusers.DDIMScheduler(timestep_spacing=spacing, steps_offset=offset)
    ref.set_timesteps(steps)
    sch = _schedule(ref)
    sigmas = make_sigmas(sch, steps)
    assert sigmas.dtype == torch.float64 and sigmas.shape == (steps + 1,) and sigmas[-1] == 0
    assert (sigmas[1:] < sigmas[:-1]).all()
    # a table σ maps back to its integer training timestep, also when passed as fp32
    assert torch.equal(sch.sigma_to_t(sigmas[:-1]), ref.timesteps.double())
    assert (sch.sigma_to_t(sigmas[:-1].float()) - ref.timesteps).abs().max() < 1e-3


@pytest.mark.parametrize("T", [50, 300, 999, 1000])
def test_trailing_timesteps_stay_in_table_for_every_step_count(T):
    """Regression: a float-step arange overshoots for some (T, n) (T=300, n=7 gave 8 timesteps ending in −1;
    diffusers 0.42 still does). Every step count 1..T must give n timesteps in [0, T−1], equal to
    diffusers' wherever diffusers' own list is valid."""
    sch = Schedule.from_config({"_class_name": "DDIMScheduler", "num_train_timesteps": T,
                                "timestep_spacing": "trailing"})
    ref = diffusers.DDIMScheduler(num_train_timesteps=T, timestep_spacing="trailing")
    overshoots = 0
    for n in range(1, T + 1):
        sigmas = make_sigmas(sch, n)
        assert sigmas.shape == (n + 1,) and sigmas[-1] == 0
        ts = sch.sigma_to_t(sigmas[:-1])  # table σ map back to their integer timesteps
        assert torch.equal(ts, ts.round()) and ts.min() >= 0 and ts.max() <= T - 1, (T, n)
        assert (ts[1:] < ts[:-1]).all() and ts[0] == T - 1
        ref.set_timesteps(n)
        want = ref.timesteps.double()
        if want.shape == (n,) and want.min() >= 0:
            assert torch.equal(ts, want), (T, n)
        else:  # diffusers' broken case: one extra −1 appended to the right list
            overshoots += 1
            assert torch.equal(ts, want[:n]) and want[n:].tolist() == [-1.0], (T, n)
    if T == 300:
        assert overshoots > 0  # the test covers the bug it guards against (n=7 among them)


def test_karras_grid_matches_euler_discrete():
    ref = diffusers.EulerDiscreteScheduler(use_karras_sigmas=True, timestep_spacing="linspace")
    ref.set_timesteps(12)
    sigmas = make_sigmas(_schedule(ref), 12, "karras")
    assert torch.allclose(sigmas, ref.sigmas.double(), rtol=1e-5)
    assert torch.allclose(_schedule(ref).sigma_to_t(sigmas[:-1]).float(), ref.timesteps, atol=1e-3)


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("steps", [1, 4, 28])
def test_flow_grid_matches_flow_match_euler(shift, steps):
    ref = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
    ref.set_timesteps(steps)
    sch = _schedule(ref)
    assert sch.kind == "flow" and sch.prediction_type == "flow" and sch.sigma_max == 1.0
    sigmas = make_sigmas(sch, steps)
    assert torch.allclose(sigmas, ref.sigmas.double(), atol=1e-6)
    assert torch.allclose(sch.sigma_to_t(sigmas[:-1]).float(), ref.timesteps, atol=1e-3)


def test_flow_trailing_and_karras():
    sch = Schedule.from_config({"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0})
    trailing = make_sigmas(sch, 4, "trailing")
    expected = torch.tensor([flow_shift(v, 3.0) for v in (1.0, 0.75, 0.5, 0.25)] + [0.0], dtype=torch.float64)
    assert torch.allclose(trailing, expected)
    karras = make_sigmas(sch, 6, "karras")
    assert karras[0] == pytest.approx(1.0) and karras[-1] == 0 and (karras[1:] < karras[:-1]).all()


def test_initial_noise_scale_reproduces_vp_init():
    # x_T = noise·sqrt(1+σ²) in VE form ⇔ c_in·x_T = noise, diffusers' VP init
    assert initial_noise_scale("vp", 3.0) == pytest.approx(10**0.5)
    assert initial_noise_scale("flow", 1.0) == 1.0


def test_config_fields():
    sch = Schedule.from_config(
        {"_class_name": "DDIMScheduler", "prediction_type": "v_prediction", "clip_sample": True,
         "clip_sample_range": 1.5, "timestep_spacing": "trailing", "_diffusers_version": "0.30.0"}
    )
    assert sch.prediction_type == "v_prediction" and sch.clip_sample_range == 1.5
    assert sch.timestep_spacing == "trailing" and sch.dynamic_thresholding_ratio is None
    assert Schedule.from_config({"_class_name": "DDIMScheduler"}).clip_sample_range is None


@pytest.mark.parametrize(
    "config, match",
    [
        ({"beta_schedule": "sigmoid"}, "beta_schedule"),
        ({"prediction_type": "flow_prediction"}, "prediction_type"),
        ({"rescale_betas_zero_snr": True}, "zero_snr"),
        ({"_class_name": "FlowMatchEulerDiscreteScheduler", "use_dynamic_shifting": True}, "dynamic"),
        ({"timestep_spacing": "sideways"}, "timestep_spacing"),
    ],
)
def test_bad_configs_raise(config, match):
    with pytest.raises(ValueError, match=match):
        Schedule.from_config(config)


def test_bad_steps_raise():
    sch = Schedule.from_config({"_class_name": "DDIMScheduler", "num_train_timesteps": 100})
    with pytest.raises(ValueError, match="at least 1"):
        make_sigmas(sch, 0)
    with pytest.raises(ValueError, match="maximum of 50"):
        make_sigmas(sch, 51, max_steps=50)
    with pytest.raises(ValueError, match="exceeds num_train_timesteps"):
        make_sigmas(sch, 101, "trailing")
    with pytest.raises(ValueError, match="unknown spacing"):
        make_sigmas(sch, 10, "uniform")
    assert make_sigmas(sch, 101, "karras").shape == (102,)  # σ grids are not limited to table entries
