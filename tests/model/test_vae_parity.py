"""VAE parity with diffusers' AutoencoderKL (CPU fp32, tiny configs saved with save_pretrained)."""

from __future__ import annotations

import json

import pytest
import torch

from model.config import VAEConfig
from model.loading import WeightsError, load_vae, save_pretrained
from model.noise import RequestNoise
from model.vae import AutoencoderKL
from tests.model.helpers import perturb

diffusers = pytest.importorskip("diffusers")

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/model/conftest.py

TOL = 1e-5


def _ref(**kw) -> torch.nn.Module:
    torch.manual_seed(0)
    args = dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(8, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
    )
    args.update(kw)
    return perturb(diffusers.AutoencoderKL(**args))


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize(
    "kw",
    [
        dict(),  # SD's structure and scaling_factor 0.18215
        dict(scaling_factor=0.5, shift_factor=0.1, layers_per_block=2),
        dict(use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=False),
    ],
    ids=["sd", "shift-2layers", "no-quant-no-attn"],
)
def test_decode_and_encode_match_diffusers(tmp_path, kw):
    ref = _ref(**kw)
    ref.save_pretrained(tmp_path, safe_serialization=True)
    ours = load_vae(tmp_path)
    assert isinstance(ours, AutoencoderKL) and ours.scale_factor == 4
    cfg = ref.config
    shift = cfg.shift_factor or 0.0

    g = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 4, 5, 6, generator=g)  # scaled latents, odd sizes on purpose
    images = torch.rand(2, 3, 24, 20, generator=g) * 2 - 1
    with torch.no_grad():
        # diffusers' pipelines: vae.decode(latents / scaling_factor (+ shift_factor))
        want = ref.decode(latents / cfg.scaling_factor + shift).sample
        got = ours.decode(latents)
        assert got.shape == want.shape == (2, 3, 20, 24)
        assert _max_err(got, want) <= TOL

        dist = ref.encode(images).latent_dist
        mean, logvar = ours.posterior(images)
        assert _max_err(mean, dist.mean) <= TOL and _max_err(logvar, dist.logvar) <= TOL
        assert _max_err(ours.encode(images), (dist.mean - shift) * cfg.scaling_factor) <= TOL
        # a sample from the posterior with the same generator seed draws the same ε
        want_z = (dist.sample(torch.Generator().manual_seed(7)) - shift) * cfg.scaling_factor
        got_z = ours.encode(images, torch.Generator().manual_seed(7))
        assert _max_err(got_z, want_z) <= TOL
        assert _max_err(ours.encode(images, RequestNoise(7)), want_z) <= TOL  # a request's stream works too
        assert _max_err(got_z, ours.encode(images)) > 1e-3  # and sampling differs from the mean


def test_sliced_decode_equals_batched(tmp_path):
    ref = _ref()
    ref.save_pretrained(tmp_path, safe_serialization=True)
    ours = load_vae(tmp_path)
    latents = torch.randn(5, 4, 4, 4, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        # not bitwise: CPU conv kernels may differ by batch size
        assert _max_err(ours.decode_sliced(latents, 2), ours.decode(latents)) <= TOL


def test_config_round_trip_and_ours_load_in_diffusers(tmp_path):
    ref = _ref(shift_factor=0.2, force_upcast=False)
    d = json.loads(json.dumps(dict(ref.config)))
    cfg = VAEConfig.from_dict(d)
    assert cfg.shift_factor == 0.2 and not cfg.force_upcast and cfg.scale_factor == 4
    assert VAEConfig.from_dict(cfg.to_dict()) == cfg
    torch.manual_seed(0)
    ours = perturb(AutoencoderKL(cfg))
    save_pretrained(ours, tmp_path)
    back = diffusers.AutoencoderKL.from_pretrained(tmp_path).eval()
    z = torch.randn(1, 4, 3, 3)
    with torch.no_grad():
        assert _max_err(ours.decode(z), back.decode(z / 0.18215 + 0.2).sample) <= TOL


def test_strict_keys_and_clear_config_errors(tmp_path):
    from safetensors.torch import load_file, save_file

    ref = _ref()
    ref.save_pretrained(tmp_path, safe_serialization=True)
    f = tmp_path / "diffusion_pytorch_model.safetensors"
    sd = load_file(f)
    sd.pop("decoder.conv_out.bias")
    sd["decoder.extra.weight"] = torch.zeros(1)
    save_file(sd, f)
    msg = "missing keys: decoder.conv_out.bias.*unexpected keys: decoder.extra"
    with pytest.raises(WeightsError, match=msg):
        load_vae(tmp_path)
    with pytest.raises(ValueError, match="unsupported down block type 'AttnDownEncoderBlock2D'"):
        VAEConfig.from_dict({**dict(ref.config), "down_block_types": ["AttnDownEncoderBlock2D"] * 3})
    with pytest.raises(ValueError, match="unknown AutoencoderKL config field 'mystery'"):
        VAEConfig.from_dict({**dict(ref.config), "mystery": 1})
    with pytest.raises(ValueError, match="unsupported VAE class 'AutoencoderTiny'"):
        VAEConfig.from_dict({"_class_name": "AutoencoderTiny"})
