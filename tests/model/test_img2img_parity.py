"""Image-to-image parity with diffusers' StableDiffusionImg2ImgPipeline on a tiny random pipeline (CPU fp32).

Same folder, prompt, init image, strength and seed: diffusers draws the VAE posterior sample and the noise
from ``torch.Generator().manual_seed(seed)``; ours from the request's ``RequestNoise(seed)`` in the same
order, through the server's row path (``Worker.prepare`` / ``step``). Final images agree to 1e-4.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from model.img2img import strength_start  # noqa: E402
from model.pipeline import load_pipelines  # noqa: E402
from tests.model.img2img_helpers import (  # noqa: E402
    NEGATIVE,
    PROMPT,
    honest,
    image_array,
    make_image,
    run_worker,
    set_scheduler,
)
from tests.model.sd_helpers import build_tiny_sd  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/model/conftest.py

TOL = 1e-4


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_tiny_sd(tmp_path_factory.mktemp("weights") / "tiny-sd")


@pytest.fixture(scope="module")
def ours(folder):
    return load_pipelines(folder.parent, [folder.name])[folder.name]


@pytest.fixture(scope="module")
def theirs(folder):
    return diffusers.StableDiffusionImg2ImgPipeline.from_pretrained(
        folder, safety_checker=None, requires_safety_checker=False
    )


def run_theirs(pipe, sampler, steps, seed, strength, guidance=7.5, negative=""):
    set_scheduler(pipe, sampler)
    return pipe(
        PROMPT, image=make_image(), strength=strength, negative_prompt=negative, num_inference_steps=steps,
        guidance_scale=guidance, generator=torch.Generator().manual_seed(seed), output_type="np",
    ).images  # fmt: skip


@pytest.mark.parametrize(
    ("sampler", "steps", "strength"),
    [("ddim", 8, 0.6), ("euler", 10, 0.75), ("euler_ancestral", 8, 0.5), ("dpmpp_2m", 10, 0.8),
     ("euler", 6, 1.0)],
)  # fmt: skip
def test_img2img_matches_diffusers(ours, theirs, sampler, steps, strength):
    negative = NEGATIVE if sampler == "euler" else ""
    got = run_worker(ours, sampler, steps, 7, image_array(make_image()), strength=strength, negative=negative)
    want = run_theirs(theirs, sampler, steps, 7, strength, negative=negative)
    assert got.shape == want.shape == (1, 64, 64, 3)
    assert honest(want)
    assert np.abs(got - want).max() <= TOL


def test_strength_and_image_matter(ours):
    """The comparison above would catch an ignored image or strength: both change the result, and a low
    strength stays close to the init image (in pixels, through the VAE)."""
    image = image_array(make_image())
    a = run_worker(ours, "euler", 10, 7, image, strength=0.3)
    b = run_worker(ours, "euler", 10, 7, image, strength=0.9)
    c = run_worker(ours, "euler", 10, 7, image_array(make_image(seed=5).rotate(90)), strength=0.3)
    assert np.abs(a - b).max() > 1e-2 and np.abs(a - c).max() > 1e-2


def test_strength_start_is_diffusers_get_timesteps():
    assert strength_start(10, 1.0) == 0
    assert strength_start(10, 0.75) == 3  # int(7.5) = 7 steps run
    assert strength_start(25, 0.8) == 5
    assert strength_start(3, 0.34) == 2
    for bad in (0.0, -0.1, 1.01):
        with pytest.raises(ValueError, match="strength"):
            strength_start(10, bad)
    with pytest.raises(ValueError, match="0 steps"):
        strength_start(10, 0.05)
