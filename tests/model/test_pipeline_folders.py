"""Diffusers pipeline folders as models: what load_pipelines gives the engine, defaults, clear refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from model.clip_text import CLIPTextEncoder  # noqa: E402
from model.pipeline import PipelineError, list_models, load_pipelines, read_metadata  # noqa: E402
from model.pipeline_folder import scheduler_sampler  # noqa: E402
from model.samplers import get_sampler  # noqa: E402
from model.vae import AutoencoderKL  # noqa: E402
from tests.model.sd_helpers import build_tiny_sd  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/model/conftest.py


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory) -> Path:
    return build_tiny_sd(tmp_path_factory.mktemp("built") / "tiny-sd")


@pytest.fixture
def weights(sd_folder, tmp_path) -> Path:
    """A fresh weights dir holding a copy of the tiny SD folder (tests may damage it)."""
    root = tmp_path / "weights"
    shutil.copytree(sd_folder, root / "tiny-sd")
    return root


def _index(folder: Path) -> dict:
    return json.loads((folder / "model_index.json").read_text())


def test_pipeline_fields_for_the_engine(weights, caplog):
    (weights / "tiny-sd" / "model_index.json").write_text(
        json.dumps({**_index(weights / "tiny-sd"), "safety_checker": ["stable_diffusion", "Checker"]})
    )
    with caplog.at_level("INFO", logger="model.pipeline_folder"):
        p = load_pipelines(weights, ["tiny-sd"])["tiny-sd"]
    assert "ignoring component safety_checker" in caplog.text
    assert p.kind == "text" and p.pipeline_class == "StableDiffusionPipeline" and p.is_latent
    assert isinstance(p.vae, AutoencoderKL) and isinstance(p.text_encoder, CLIPTextEncoder)
    assert (p.latent_channels, p.vae_scale_factor, p.image_channels) == (4, 8, 3)
    assert (p.sample_size, p.latent_size, p.size_multiple) == (64, 8, 8)  # native = unet 8 x vae 8
    assert p.latent_shape(64, 48) == (4, 8, 6)
    with pytest.raises(ValueError, match="multiple of the latent factor 8"):
        p.latent_shape(60, 64)
    # SD's defaults: PNDM folder -> dpmpp_2m (documented equivalent), 25 steps, guidance 7.5, native size
    d = p.defaults
    got = (d.sampler, d.num_inference_steps, d.guidance_scale, d.width, d.height)
    assert got == ("dpmpp_2m", 25, 7.5, 64, 64)
    assert p.schedule.kind == "vp" and p.schedule.timestep_spacing == "leading"
    assert p.text_encoder.encode(["a cat", ""]).shape == (2, 77, 32)
    # the engine's whole path runs: one denoiser call on a latent row, then a VAE decode
    x = torch.randn(1, *p.latent_shape(64, 64))
    ctx = p.text_encoder.encode(["a cat"])
    x0 = p.denoiser(x, torch.tensor([3.0]), context=ctx)
    assert x0.shape == (1, 4, 8, 8) and p.vae.decode(x0).shape == (1, 3, 64, 64)
    assert list_models(weights) == ["tiny-sd"]


def test_unet_server_json_overrides(weights):
    meta = {"defaults": {"sampler": "euler", "num_inference_steps": 12}, "clip_skip": 1, "description": "x"}
    (weights / "tiny-sd" / "unet_server.json").write_text(json.dumps(meta))
    got = read_metadata(weights, "tiny-sd")
    assert got["defaults"] == {
        "sampler": "euler", "num_inference_steps": 12, "guidance_scale": 7.5, "width": 64, "height": 64
    }
    p = load_pipelines(weights, ["tiny-sd"])["tiny-sd"]
    assert (p.defaults.sampler, p.defaults.num_inference_steps) == ("euler", 12)
    assert p.text_encoder.clip_skip == 1 and p.metadata["description"] == "x"
    (weights / "tiny-sd" / "unet_server.json").write_text(json.dumps({"kind": "class"}))
    with pytest.raises(PipelineError, match="text model"):
        read_metadata(weights, "tiny-sd")


@pytest.mark.parametrize(
    "config, sampler",
    [
        ({"_class_name": "PNDMScheduler"}, "dpmpp_2m"),
        ({"_class_name": "LMSDiscreteScheduler"}, "dpmpp_2m"),
        ({"_class_name": "DDIMScheduler"}, "ddim"),
        ({"_class_name": "EulerDiscreteScheduler"}, "euler"),
        ({"_class_name": "EulerDiscreteScheduler", "use_karras_sigmas": True}, "Euler Karras"),
        ({"_class_name": "EulerAncestralDiscreteScheduler"}, "euler_ancestral"),
        ({"_class_name": "DPMSolverMultistepScheduler"}, "dpmpp_2m"),
        ({"_class_name": "DPMSolverMultistepScheduler", "use_karras_sigmas": True}, "DPM++ 2M Karras"),
        ({"_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "sde-dpmsolver++"}, "dpmpp_2m_sde"),
        ({"_class_name": "SomethingNewScheduler"}, "dpmpp_2m"),
    ],
)
def test_scheduler_class_to_sampler(config, sampler):
    assert scheduler_sampler(config) == sampler
    get_sampler(sampler, "vp")  # every mapped name is one of ours


def test_fp16_variants_and_sharded_unet(weights, sd_folder):
    import diffusers
    from safetensors.torch import load_file, save_file

    folder = weights / "tiny-sd"
    for comp, stem in (("vae", "diffusion_pytorch_model"), ("text_encoder", "model")):
        f = folder / comp / f"{stem}.safetensors"
        save_file({k: v.half() for k, v in load_file(f).items()}, folder / comp / f"{stem}.fp16.safetensors")
        f.unlink()
    unet = diffusers.UNet2DConditionModel.from_pretrained(sd_folder / "unet")
    shutil.rmtree(folder / "unet")
    unet.save_pretrained(folder / "unet", safe_serialization=True, max_shard_size="100KB")
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    p = load_pipelines(weights, ["tiny-sd"])["tiny-sd"]
    ref = load_pipelines(sd_folder.parent, [sd_folder.name])[sd_folder.name]
    x, ctx = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 32)
    assert torch.equal(p.denoiser(x, torch.tensor([2.0]), context=ctx),
                       ref.denoiser(x, torch.tensor([2.0]), context=ctx))  # shards: same weights exactly
    assert p.vae.dtype == torch.float32  # fp16 files, loaded in the requested dtype
    err = (p.vae.decode(x) - ref.vae.decode(x)).abs().max().item()
    assert 0 < err < 1e-2


def test_bin_only_folder_is_refused_with_how_to_convert(weights):
    folder = weights / "tiny-sd"
    unet = folder / "unet"
    (unet / "diffusion_pytorch_model.safetensors").rename(unet / "diffusion_pytorch_model.bin")
    msg = r"unet/.*pickle.*unsafe.*save_pretrained\(out, safe_serialization"
    with pytest.raises(PipelineError, match=msg):
        load_pipelines(weights, ["tiny-sd"])


def test_unserved_pipeline_class_is_named(weights):
    folder = weights / "tiny-sd"
    (folder / "model_index.json").write_text(
        json.dumps({**_index(folder), "_class_name": "StableDiffusion3Pipeline"})
    )
    msg = "'StableDiffusion3Pipeline' is not served.*StableDiffusionPipeline"
    with pytest.raises(PipelineError, match=msg):
        load_pipelines(weights, ["tiny-sd"])
    assert list_models(weights) == []  # not listed either


@pytest.mark.parametrize("how", ["index", "folder"])
def test_missing_component_is_named(weights, how):
    folder = weights / "tiny-sd"
    if how == "index":
        index = _index(folder)
        del index["vae"]
        (folder / "model_index.json").write_text(json.dumps(index))
        match = "needs a 'vae' component"
    else:
        shutil.rmtree(folder / "text_encoder")
        match = "missing component folder text_encoder/"
    with pytest.raises(PipelineError, match=match):
        load_pipelines(weights, ["tiny-sd"])


def test_component_of_another_class_is_refused(weights):
    folder = weights / "tiny-sd"
    (folder / "model_index.json").write_text(
        json.dumps({**_index(folder), "text_encoder": ["transformers", "CLIPTextModelWithProjection"]})
    )
    with pytest.raises(PipelineError, match="'text_encoder' is a CLIPTextModelWithProjection"):
        load_pipelines(weights, ["tiny-sd"])


def test_paths_stay_confined(weights, tmp_path):
    outside = tmp_path / "outside-vae"
    shutil.move(weights / "tiny-sd" / "vae", outside)
    (weights / "tiny-sd" / "vae").symlink_to(outside)
    with pytest.raises(PipelineError, match="outside"):
        load_pipelines(weights, ["tiny-sd"])
