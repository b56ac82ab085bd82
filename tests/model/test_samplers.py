"""Sampler registry, aliases, state machine behaviour and errors."""

from __future__ import annotations

import pytest
import torch

from model.noise import RequestNoise
from model.samplers import SAMPLERS, get_sampler, list_samplers, resolve_sampler_name, sample
from model.schedules import Schedule

VP = Schedule.from_config({"_class_name": "DDIMScheduler", "timestep_spacing": "trailing"})
FLOW = Schedule.from_config({"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0})


def gaussian_x0(x, sigma):  # exact denoiser for N(0, 1) data in VE form
    return x / (1 + sigma.float().view(-1, *[1] * (x.ndim - 1)) ** 2)


@pytest.mark.parametrize(
    "alias, name, spacing",
    [
        ("DDIMScheduler", "ddim", None),
        ("EulerDiscreteScheduler", "euler", None),
        ("HeunDiscreteScheduler", "heun", None),
        ("DPMSolverMultistepScheduler", "dpmpp_2m", None),
        ("EulerAncestralDiscreteScheduler", "euler_ancestral", None),
        ("DDPMScheduler", "euler_ancestral", None),
        ("FlowMatchEulerDiscreteScheduler", "flow_euler", None),
        ("FlowMatchHeunDiscreteScheduler", "flow_heun", None),
        ("Euler a", "euler_ancestral", None),
        ("DPM++ 2M", "dpmpp_2m", None),
        ("DPM++ 2M Karras", "dpmpp_2m", "karras"),
        ("dpm++ 2m sde karras", "dpmpp_2m_sde", "karras"),
        ("DPM++ 2M SDE", "dpmpp_2m_sde", None),
        ("k_euler_a", "euler_ancestral", None),
        ("Flow_Euler", "flow_euler", None),
    ],
)
def test_aliases(alias, name, spacing):
    assert resolve_sampler_name(alias) == (name, spacing)
    sampler = get_sampler(alias, "flow" if name.startswith("flow") else "vp")
    assert sampler.name == name
    assert sampler.spacing == (spacing or type(sampler).default_spacing)


def test_list_samplers():
    listed = list_samplers()
    assert [s["name"] for s in listed] == list(SAMPLERS)
    for s in listed:
        assert set(s) >= {"name", "aliases", "kind", "model_kinds", "default_spacing", "description"}
        assert s["kind"] in ("ode", "sde") and set(s["model_kinds"]) <= {"vp", "flow"} and s["description"]
    by_name = {s["name"]: s for s in listed}
    assert by_name["flow_euler_maruyama"]["kind"] == "sde"
    assert by_name["flow_euler"]["model_kinds"] == ["flow"]
    assert "DDPMScheduler" in by_name["euler_ancestral"]["aliases"]
    assert by_name["heun"]["evaluations_per_step"] == 2


def test_unknown_sampler_lists_valid_names():
    with pytest.raises(ValueError, match="unknown sampler 'LMS'.*ddim, euler, heun"):
        get_sampler("LMS", "vp")


def test_model_kind_errors():
    with pytest.raises(ValueError, match="does not support vp models"):
        get_sampler("FlowMatchEulerDiscreteScheduler", "vp")
    with pytest.raises(ValueError, match="model_kind"):
        get_sampler("euler", "ve")
    unbound = get_sampler("dpmpp_2m")  # both kinds: formulas depend on it, so init refuses
    with pytest.raises(ValueError, match="model_kind=schedule.kind"):
        unbound.init(torch.zeros(1, 1, 2, 2), [1.0, 0.0])
    assert get_sampler("flow_heun").model_kind == "flow"
    with pytest.raises(ValueError, match="got a flow schedule"):
        get_sampler("euler", "vp").make_sigmas(FLOW, 10)
    with pytest.raises(ValueError, match="deterministic"):
        get_sampler("euler", "vp", eta=0.5)


def test_steps_cap_and_bad_grids():
    sampler = get_sampler("euler", "vp")
    with pytest.raises(ValueError, match="at least 1"):
        sampler.make_sigmas(VP, 0)
    with pytest.raises(ValueError, match="maximum of 100"):
        sampler.make_sigmas(VP, 101, max_steps=100)
    with pytest.raises(ValueError, match="strictly decreasing"):
        sampler.init(torch.zeros(1, 2), [1.0, 2.0, 0.0])
    with pytest.raises(ValueError, match="at least 2"):
        sampler.init(torch.zeros(1, 2), [1.0])


@pytest.mark.parametrize("name", ["heun", "dpmpp_2m", "euler"])
def test_state_machine_counts_and_sigmas(name):
    sampler = get_sampler(name, "vp")
    sigmas = sampler.make_sigmas(VP, 6)
    st = sampler.init(torch.randn(1, 1, 2, 2), sigmas)
    seen = []
    while not sampler.done(st):
        x, sigma = sampler.next_input(st)
        assert isinstance(sigma, float) and x.dtype == torch.float32
        seen.append(sigma)
        st = sampler.advance(st, gaussian_x0(x, torch.tensor([sigma])))
    assert len(seen) == sampler.num_evaluations(6)
    grid = sigmas.tolist()
    if name == "heun":  # σ_i then σ_{i+1} for every step but the last (Euler into σ = 0)
        assert seen == [s for a, b in zip(grid[:-2], grid[1:-1], strict=True) for s in (a, b)] + [grid[-2]]
    else:
        assert seen == grid[:-1]


def test_vp_initial_noise_is_scaled_to_first_sigma():
    sampler = get_sampler("ddim", "vp")
    sigmas = sampler.make_sigmas(VP, 10)
    noise = torch.randn(1, 1, 4, 4)
    st = sampler.init(noise, sigmas)
    assert torch.allclose(st.x, noise * (1 + float(sigmas[0]) ** 2) ** 0.5)
    assert torch.equal(get_sampler("flow_euler").init(noise, [1.0, 0.0]).x, noise)


@pytest.mark.parametrize("name, kind", [("euler_ancestral", "vp"), ("dpmpp_2m_sde", "flow"),
                                        ("flow_euler_maruyama", "flow")])
def test_sde_reproducible_per_seed(name, kind):
    sampler = get_sampler(name, kind)
    sigmas = sampler.make_sigmas(VP if kind == "vp" else FLOW, 8)
    noise = torch.randn(1, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    a = sample(gaussian_x0, noise, sigmas, sampler, RequestNoise(5))
    b = sample(gaussian_x0, noise, sigmas, sampler, RequestNoise(5))
    c = sample(gaussian_x0, noise, sigmas, sampler, RequestNoise(6))
    assert torch.equal(a, b) and not torch.allclose(a, c)
    st = sampler.init(noise, sigmas)  # no generator: a fresh RequestNoise with a recorded seed
    assert isinstance(st.generator, RequestNoise)
    eta0 = get_sampler(name, kind, eta=0.0)
    d = sample(gaussian_x0, noise, sigmas, eta0, RequestNoise(5))
    e = sample(gaussian_x0, noise, sigmas, eta0, RequestNoise(6))
    assert torch.equal(d, e)  # η = 0 draws no noise into the result
