"""Inpainting parity with diffusers' StableDiffusionInpaintPipeline on tiny random pipelines (CPU fp32).

Two modes, both through the server's row path (``Worker.prepare`` / ``step``), same folder, prompt,
image, mask, strength and seed (diffusers' generator and our ``RequestNoise`` draw in the same order):
* a 9-channel inpainting U-Net folder (StableDiffusionInpaintPipeline, as the hub's SD inpainting models):
  the U-Net input is cat(latent, mask, masked-image latent);
* an ordinary 4-channel SD folder: masked latent blending after every step.
Final images agree to 1e-4.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from model.pipeline import load_pipelines  # noqa: E402
from model.pipeline_folder import read_pipeline_folder  # noqa: E402
from tests.model.img2img_helpers import (  # noqa: E402
    NEGATIVE,
    PROMPT,
    build_tiny_inpaint,
    honest,
    image_array,
    make_image,
    make_mask,
    mask_array,
    run_worker,
    set_scheduler,
)
from tests.model.sd_helpers import build_tiny_sd  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/model/conftest.py

TOL = 1e-4


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("weights")
    return {"inpaint9": build_tiny_inpaint(root / "tiny-inpaint"), "sd4": build_tiny_sd(root / "tiny-sd")}


@pytest.fixture(scope="module")
def ours(folders):
    return {k: load_pipelines(f.parent, [f.name])[f.name] for k, f in folders.items()}


@pytest.fixture(scope="module")
def theirs(folders):
    return {
        k: diffusers.StableDiffusionInpaintPipeline.from_pretrained(
            f, safety_checker=None, requires_safety_checker=False
        )
        for k, f in folders.items()
    }


def run_theirs(pipe, sampler, steps, seed, strength, negative="", guidance=7.5):
    set_scheduler(pipe, sampler)
    return pipe(
        PROMPT, image=make_image(), mask_image=make_mask(), strength=strength, negative_prompt=negative,
        num_inference_steps=steps, guidance_scale=guidance, height=64, width=64,
        generator=torch.Generator().manual_seed(seed), output_type="np",
    ).images  # fmt: skip


def test_inpainting_folder_loads_as_a_9_channel_unet(folders, ours):
    assert read_pipeline_folder(folders["inpaint9"]).class_name == "StableDiffusionInpaintPipeline"
    p = ours["inpaint9"]
    assert p.unet.config.in_channels == 9 and p.latent_channels == 4
    assert ours["sd4"].unet.config.in_channels == 4


CASES = [
    ("ddim", 8, 1.0, 1),
    ("euler", 8, 0.75, 2),
    ("dpmpp_2m", 10, 1.0, 3),
    ("euler_ancestral", 8, 0.6, 4),
]


@pytest.mark.parametrize(("sampler", "steps", "strength", "seed"), CASES)
@pytest.mark.parametrize("mode", ["inpaint9", "sd4"])
def test_inpainting_matches_diffusers(ours, theirs, mode, sampler, steps, strength, seed):
    negative = NEGATIVE if sampler == "euler" else ""
    image, mask = image_array(make_image()), mask_array(make_mask())
    got = run_worker(ours[mode], sampler, steps, seed, image, mask, strength=strength, negative=negative)
    want = run_theirs(theirs[mode], sampler, steps, seed, strength, negative=negative)
    assert got.shape == want.shape == (1, 64, 64, 3)
    assert honest(want)
    assert np.abs(got - want).max() <= TOL


def test_mask_and_masked_image_matter(ours):
    """The comparison would catch an ignored mask: another mask changes the result."""
    image, mask = image_array(make_image()), mask_array(make_mask())
    p = ours["inpaint9"]
    a = run_worker(p, "euler", 6, 1, image, mask)
    b = run_worker(p, "euler", 6, 1, image, 1.0 - mask)
    assert np.abs(a - b).max() > 1e-2


@pytest.mark.parametrize("sampler", ["heun", "dpmpp_2m_sde"])
def test_blending_keeps_the_known_latent_exactly(ours, sampler):
    """Blend mode, with samplers diffusers has no inpainting parity for here (Heun: two evaluations per
    step, blended after the corrector only): the final latent outside the mask is the init latent itself,
    inside it is sampled."""
    from server.request import ResolvedRequest
    from server.worker import Worker

    p = ours["sd4"]
    w = Worker({p.name: p}, buckets=[1, 2, 4])
    req = ResolvedRequest(
        model=p.name, prompt=PROMPT, negative_prompt="", class_label=None, control=None, control_scale=1.0,
        num_inference_steps=6, sampler=sampler, guidance_scale=7.5, seed=5, num_images=2, width=64,
        height=64, guided=True, image=image_array(make_image()), mask=mask_array(make_mask()), strength=0.9,
    )  # fmt: skip
    state = w.prepare(req)
    assert state.known is not None and state.blend_mask is not None and state.x_concat is None
    while not w.step([state])[0]:
        pass
    keep = state.blend_mask[0, 0] == 0  # (h, w)
    assert 0 < keep.sum() < keep.numel()
    for st, (x0, _) in zip(state.states, state.known, strict=True):
        final = st.x[0]  # (C, h, w)
        assert torch.equal(final[:, keep], x0[0][:, keep])
        assert (final[:, ~keep] - x0[0][:, ~keep]).abs().max() > 1e-2
