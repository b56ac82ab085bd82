"""SDXL parity with diffusers (CPU, fp32, tiny random configs built here).

* The U-Net with SDXL's added conditioning (text_time: pooled text embeds + size/crop time ids), per-block
  transformer depths and linear projections: ours vs diffusers' UNet2DConditionModel on the same weights,
  one noise level and one set of time ids per row, ≤ 1e-5. The real SDXL base config builds the same
  parameter names and shapes in both (on the meta device: no memory).
* Text encoding: our two-encoder context and pooled embeds vs `StableDiffusionXLPipeline.encode_prompt`.
* End to end: a tiny StableDiffusionXLPipeline folder, our pipeline (load_pipelines, SDXLTextEncoder,
  model.sdxl rows, Denoiser behind a GraphedDenoiser's padded path, Euler, our VAE) vs diffusers' pipeline
  with the folder's EulerDiscreteScheduler, same prompt and initial latents, ≤ 1e-4 on the final images.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from model import UNetConfig, load_unet, save_pretrained  # noqa: E402
from model.cuda_graphs import GraphedDenoiser  # noqa: E402
from model.denoiser import cfg_combine  # noqa: E402
from model.pipeline import Pipeline, PipelineError, load_pipelines  # noqa: E402
from model.samplers import get_sampler, sample  # noqa: E402
from model.sdxl import conditioning_rows, time_ids, zero_uncond  # noqa: E402
from model.unet import UNet  # noqa: E402
from tests.model.helpers import perturb  # noqa: E402
from tests.model.sdxl_helpers import SDXL_UNET, build_tiny_sdxl  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/model/conftest.py

UNET_TOL = 1e-5
IMAGE_TOL = 1e-4
PROMPT = "a photo of an astronaut riding a horse on mars"
NEGATIVE = "blurry, low quality"


def _tiny_xl_unet(**kw) -> torch.nn.Module:
    torch.manual_seed(0)
    args = dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        layers_per_block=(1, 2, 1),
        norm_num_groups=8,
        attention_head_dim=(2, 4, 4),
        transformer_layers_per_block=(1, 2, 3),
        use_linear_projection=True,
        cross_attention_dim=24,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=20 + 6 * 8,
    )
    args.update(kw)
    return perturb(diffusers.UNet2DConditionModel(**args))


def _added(batch: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    ids = torch.tensor(
        [[1024, 1024, 0, 0, 1024, 1024], [512, 768, 16, 32, 1024, 896], [64, 64, 0, 0, 64, 64]],
        dtype=torch.float32,
    )[:batch]
    return {"text_embeds": torch.randn(batch, 20, generator=g), "time_ids": ids}


@pytest.mark.parametrize(
    "kw", [{}, {"upcast_attention": True, "num_class_embeds": 4}], ids=["sdxl", "classes"]
)
def test_unet_with_added_conditioning_matches_diffusers(tmp_path, kw):
    ref = _tiny_xl_unet(**kw)
    ref.save_pretrained(tmp_path, safe_serialization=True)
    ours = load_unet(tmp_path)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([3.0, 517.5, 999.0])  # a different noise level per row
    context = torch.randn(3, 7, 24, generator=g)
    added = _added(3)
    labels = torch.tensor([0, 3, 1]) if kw.get("num_class_embeds") else None
    with torch.no_grad():
        want = ref(x, t, encoder_hidden_states=context, class_labels=labels, added_cond_kwargs=added).sample
        got = ours(x, t, context=context, class_labels=labels, added_cond=added)
        # the added conditioning matters: other time ids or pooled embeds give another output
        halved = {**added, "time_ids": added["time_ids"] * 0.5}
        other = ours(x, t, context=context, class_labels=labels, added_cond=halved)
    assert (got - want).abs().max().item() <= UNET_TOL
    assert (other - want).abs().max().item() > 1e-3
    with pytest.raises(ValueError, match="text_time"):
        ours(x, t, context=context, class_labels=labels)


def test_our_sdxl_unet_loads_in_diffusers(tmp_path):
    """to_dict writes the text_time fields as diffusers reads them: our save loads there, same outputs."""
    ref = _tiny_xl_unet()
    ref.save_pretrained(tmp_path / "a", safe_serialization=True)
    ours = load_unet(tmp_path / "a")
    save_pretrained(ours, tmp_path / "b")
    back = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "b")
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 700.0]), torch.randn(2, 5, 24)
    with torch.no_grad():
        a = back(x, t, encoder_hidden_states=ctx, added_cond_kwargs=_added(2)).sample
        b = ours(x, t, context=ctx, added_cond=_added(2))
    assert (a - b).abs().max().item() <= UNET_TOL


def test_real_sdxl_config_builds_diffusers_parameters():
    """SDXL base's published unet config (transformer depths 1/2/10, 5/10/20 heads, 2816-wide add_embedding,
    upcast_attention null): the same parameter names and shapes as diffusers (meta device, no memory)."""
    cfg = UNetConfig.from_dict(SDXL_UNET)
    assert cfg.upcast_attention is False and cfg.transformer_layers_per_block == (1, 2, 10)
    with torch.device("meta"):
        ours = UNet(cfg)
        ref = diffusers.UNet2DConditionModel.from_config(SDXL_UNET)
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert got == want
    assert got["add_embedding.linear_1.weight"] == (1280, 2816)


def test_unsupported_addition_embed_type_is_refused():
    with pytest.raises(ValueError, match="addition_embed_type='text'"):
        UNetConfig.from_dict({**SDXL_UNET, "addition_embed_type": "text"})
    with pytest.raises(ValueError, match="addition_time_embed_dim"):
        UNetConfig.from_dict({**SDXL_UNET, "addition_time_embed_dim": None})


# -- pipelines --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return build_tiny_sdxl(tmp_path_factory.mktemp("weights") / "tiny-sdxl")


@pytest.fixture(scope="module")
def ours(folder) -> Pipeline:
    return load_pipelines(folder.parent, [folder.name])[folder.name]


@pytest.fixture(scope="module")
def theirs(folder):
    return diffusers.StableDiffusionXLPipeline.from_pretrained(folder)


def test_folder_loads_as_sdxl(ours):
    assert ours.is_sdxl and ours.force_zeros_for_empty_prompt
    assert ours.pipeline_class == "StableDiffusionXLPipeline"
    assert ours.text_encoder.hidden_size == 64 and ours.text_encoder.pooled_size == 16
    assert ours.vae.config.force_upcast and ours.sample_size == 64
    assert (ours.defaults.sampler, ours.defaults.guidance_scale) == ("euler", 5.0)


def test_text_encoding_matches_encode_prompt(ours, theirs):
    with torch.no_grad():
        pe, ne, pp, npp = theirs.encode_prompt(
            [PROMPT, "a cat"], device="cpu", do_classifier_free_guidance=True, negative_prompt=[NEGATIVE, ""]
        )
        _, zero_ne, _, zero_npp = theirs.encode_prompt(PROMPT, device="cpu", do_classifier_free_guidance=True)
    info = ours.text_encoder.encode_with_info([PROMPT, "a cat", NEGATIVE, ""])
    assert info.states.shape == (4, 77, 64) and info.pooled.shape == (4, 16)
    assert (info.states - torch.cat([pe, ne])).abs().max().item() <= 1e-5
    assert (info.pooled - torch.cat([pp, npp])).abs().max().item() <= 1e-5
    # no negative prompt + force_zeros_for_empty_prompt: zero uncond rows, exactly as diffusers
    assert zero_uncond(None, ours.force_zeros_for_empty_prompt) and not zero_uncond("", True)
    cond = (info.states[0], info.pooled[0])
    uncond = (info.states[3], info.pooled[3])
    context, added = conditioning_rows(cond, uncond, time_ids(64, 64), 2, zeros=True)
    assert context.shape == (4, 77, 64) and added["text_embeds"].shape == (4, 16)
    assert torch.equal(context[2:], zero_ne.expand(2, -1, -1))
    assert torch.equal(added["text_embeds"][2:], zero_npp.expand(2, -1))
    assert added["time_ids"].tolist() == [[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * 4


def run_ours(
    p: Pipeline, steps: int, latents: torch.Tensor, guidance: float, negative: str | None, sizes: dict
) -> np.ndarray:
    enc = p.text_encoder.encode_with_info([PROMPT, negative or ""])
    ids = time_ids(64, 64, **sizes)
    context, added = conditioning_rows(
        (enc.states[0], enc.pooled[0]), (enc.states[1], enc.pooled[1]), ids, 1,
        zeros=zero_uncond(negative, p.force_zeros_for_empty_prompt),
    )  # fmt: skip
    runner = GraphedDenoiser(p.denoiser, buckets=(4,), use_graphs=False)  # the worker's padded path
    sampler = get_sampler(p.defaults.sampler, p.schedule.kind)
    sigmas = sampler.make_sigmas(p.schedule, steps)

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        x0 = runner(torch.cat([x, x]), torch.cat([sigma, sigma]), context=context, added_cond=added)
        return cfg_combine(x0[:1], x0[1:], guidance)

    with torch.no_grad():
        images = p.vae.decode(sample(denoise, latents, sigmas, sampler))  # (1, 3, 64, 64) in [-1, 1]
    return (images / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


CASES = {
    "defaults": (None, {}),  # no negative prompt: zero uncond rows (force_zeros_for_empty_prompt)
    "negative+sizes": (NEGATIVE, {"original_size": (128, 96), "crops_coords_top_left": (8, 16),
                                  "target_size": (64, 48)}),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_images_match_diffusers(ours, theirs, case):
    negative, sizes = CASES[case]
    latents = torch.randn(1, *ours.latent_shape(64, 64), generator=torch.Generator().manual_seed(42))
    got = run_ours(ours, 6, latents, 5.0, negative, sizes)
    with torch.no_grad():
        want = theirs(
            PROMPT, negative_prompt=negative, height=64, width=64, num_inference_steps=6, guidance_scale=5.0,
            latents=latents.clone(), output_type="np", **sizes,
        ).images  # fmt: skip
    assert got.shape == want.shape == (1, 64, 64, 3)
    # an honest comparison: most pixels are inside (0, 1), not clamped to the same bound
    assert ((want > 0.001) & (want < 0.999)).mean() > 0.5 and want.std() > 0.02
    assert np.abs(got - want).max() <= IMAGE_TOL


def test_size_conditioning_changes_the_image(ours):
    """The parity above would catch wrong time ids only if they matter: they do."""
    latents = torch.randn(1, *ours.latent_shape(64, 64), generator=torch.Generator().manual_seed(42))
    a = run_ours(ours, 3, latents, 5.0, None, {})
    b = run_ours(ours, 3, latents, 5.0, None, {"original_size": (512, 512)})
    c = run_ours(ours, 3, latents, 5.0, "", {})  # "" is encoded, not zeros
    assert np.abs(a - b).max() > 1e-3 and np.abs(a - c).max() > 1e-3


def test_refiner_folders_are_refused(folder, tmp_path):
    refiner = tmp_path / "refiner"
    refiner.mkdir()
    for part in folder.iterdir():
        (refiner / part.name).symlink_to(part)
    index = json.loads((folder / "model_index.json").read_text())
    index.update(
        _class_name="StableDiffusionXLImg2ImgPipeline",
        text_encoder=[None, None],
        tokenizer=[None, None],
        requires_aesthetics_score=True,
    )
    (refiner / "model_index.json").unlink()
    (refiner / "model_index.json").write_text(json.dumps(index))
    why = "SDXL refiner folder .*text_encoder_2 only.*requires_aesthetics_score"
    with pytest.raises(PipelineError, match=why):
        load_pipelines(tmp_path, ["refiner"])


def test_hub_fetches_only_the_components_model_index_names():
    """SDXL base's repository also holds vae_1_0/, vae_decoder/ (ONNX) and a single-file checkpoint: only
    the components of model_index.json are fetched, one safetensors set each (plain files first)."""
    from model.hub import select_weight_files

    files = [
        "model_index.json", "sd_xl_base_1.0.safetensors", "vae_1_0/diffusion_pytorch_model.safetensors",
        "vae_decoder/model.onnx", "unet/diffusion_pytorch_model.safetensors",
        "unet/diffusion_pytorch_model.fp16.safetensors", "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors", "text_encoder_2/model.safetensors",
        "text_encoder_2/model.fp16.safetensors", "tokenizer_2/vocab.json",
    ]  # fmt: skip
    components = {"unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"}
    got = select_weight_files(files, {}, None, components)
    assert sorted(got) == [
        "text_encoder/model.safetensors", "text_encoder_2/model.safetensors",
        "unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
    ]  # fmt: skip
    assert "vae_1_0/diffusion_pytorch_model.safetensors" in select_weight_files(files, {}, None)
