"""Image-to-image works with every listed sampler, on VP and flow schedules.

* Analytic: with the exact denoiser of a point mass at x0 (D(x, σ) = x0), every sampler started at the
  strength's σ from α(σ0)·x0 + σ0·ε must land on x0, with or without inpainting's blending; the start and
  the cut grid are checked against their definitions.
* The shipped pixel models (the init image itself is x0) through the server's row path: at a low strength
  the result stays near the init image (a picture the model itself drew), far nearer than at strength 1.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from model.img2img import blend, image_start, noised, strength_start
from model.noise import RequestNoise
from model.samplers import get_sampler, list_samplers
from model.schedules import Schedule

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/model/conftest.py

SCHEDULES = {
    "vp": {"_class_name": "DDIMScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085,
           "beta_end": 0.012, "num_train_timesteps": 1000, "timestep_spacing": "leading", "steps_offset": 1},
    "flow": {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0},
}  # fmt: skip


def samplers_for(kind: str) -> list[str]:
    return [s["name"] for s in list_samplers() if kind in s["model_kinds"]] + ["DPM++ 2M Karras"]


@pytest.mark.parametrize("kind", ["vp", "flow"])
@pytest.mark.parametrize("inpaint", [False, True])
def test_every_sampler_lands_on_x0_with_the_exact_denoiser(kind: str, inpaint: bool) -> None:
    schedule = Schedule.from_config(SCHEDULES[kind])
    x0 = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 2:6, 1:5] = 1
    for name in samplers_for(kind):
        sampler = get_sampler(name, kind)
        full = sampler.make_sigmas(schedule, 10)
        t_start = strength_start(10, 0.6)
        grid = full[t_start:].tolist()
        start = image_start(x0, mask if inpaint else None, RequestNoise(4), grid, kind, strength=0.6)
        eps = RequestNoise(4).initial(x0.shape)  # pixel models draw only the start noise
        assert torch.equal(start.noise, eps) and start.x0 is not None
        assert torch.allclose(start.x, noised(x0, eps, grid[0], kind))
        assert math.isclose(grid[0], float(full[4]))  # int(10 · 0.6) = 6 steps run
        state = sampler.init_at(start.x, grid, RequestNoise(9))
        while not sampler.done(state):
            sampler.advance(state, x0.clone())
            if inpaint and state.stage == 0:
                state.x = blend(state.x, x0, start.noise, mask, state.sigmas[state.i], kind)
        assert len(state.sigmas) == 7
        assert torch.allclose(sampler.result(state), x0, atol=1e-5), name


def test_inpainting_at_strength_1_starts_from_pure_noise_img2img_from_the_noised_image() -> None:
    """diffusers: the inpainting pipeline's is_strength_max starts from noise·init_noise_sigma; img2img at
    strength 1 still adds the image (scheduler.add_noise)."""
    x0 = torch.ones(1, 3, 8, 8)
    mask = torch.ones(1, 1, 8, 8)
    grid = [14.6, 1.0, 0.0]
    img2img = image_start(x0, None, RequestNoise(1), grid, "vp")
    inpaint = image_start(x0, mask, RequestNoise(1), grid, "vp")
    assert torch.allclose(img2img.x, x0 + 14.6 * img2img.noise)
    assert torch.allclose(inpaint.x, inpaint.noise * math.sqrt(1 + 14.6**2))


def _shipped() -> dict:
    from tests.model.samplers_shipped_helpers import WEIGHTS

    if not (WEIGHTS / "fashion-class" / "unet_server.json").exists():
        pytest.skip("weights not trained yet")
    from model.pipeline import load_pipelines

    return load_pipelines(WEIGHTS, ["fashion-class", "fashion-text"])


@pytest.fixture(scope="module")
def shipped() -> dict:
    return _shipped()


def _run(
    worker, p, sampler: str, seed: int, image: np.ndarray | None, strength: float, bag: bool = True
) -> torch.Tensor:
    """One image through the worker; a bag, or (bag=False) trousers."""
    from server.request import ResolvedRequest

    text = p.kind == "text"
    prompt = "a red bag" if bag else "blue trousers"
    req = ResolvedRequest(
        model=p.name, prompt=prompt if text else None, negative_prompt=None,
        class_label=None if text else (8 if bag else 1), control=None, control_scale=1.0,
        num_inference_steps=15, sampler=sampler, guidance_scale=p.defaults.guidance_scale, seed=seed,
        num_images=1, width=32, height=32, guided=True, image=image, strength=strength,
    )  # fmt: skip
    state = worker.prepare(req)
    while not worker.step([state])[0]:
        pass
    return state.sampler.result(state.states[0]).clamp(-1, 1)[0]  # (C, H, W) in [-1, 1]


@pytest.mark.parametrize("model", ["fashion-class", "fashion-text"])
def test_shipped_pixel_models_stay_near_the_init_image_at_low_strength(shipped, model: str) -> None:
    from server.worker import Worker

    p = shipped[model]
    worker = Worker({model: p}, buckets=[2])
    # the model's own picture of trousers (in its distribution), edited towards a bag
    init = _run(worker, p, "dpmpp_2m", 3, None, 1.0, bag=False)
    image = init.numpy().astype(np.float32)
    # Not the Karras alias: strength is diffusers' fraction of the steps, and 30% of a Karras grid on the
    # cosine schedule (σ_max ≈ 20,000) still starts at σ ≈ 13, far above the data (diffusers does the same).
    for name in samplers_for(p.schedule.kind)[:-1]:
        near = (_run(worker, p, name, 11, image, 0.2) - init).abs().mean().item()
        far = (_run(worker, p, name, 11, image, 1.0) - init).abs().mean().item()
        assert near < 0.2 and near < far / 2, (name, near, far)
