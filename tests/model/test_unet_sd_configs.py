"""The U-Net configs of Stable Diffusion 1.5 and 2.1 load: same modules and shapes as diffusers builds, and
numerical parity on tiny-channel versions with the same flags (CPU fp32)."""

from __future__ import annotations

import json

import pytest
import torch

from model import UNet, UNetConfig, load_unet
from tests.model.helpers import perturb, rel_err
from tests.model.sd_helpers import SD15_UNET, SD21_UNET

diffusers = pytest.importorskip("diffusers")

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/model/conftest.py

PARAMS = {"sd15": (SD15_UNET, 859_520_964), "sd21": (SD21_UNET, 865_910_724)}  # published sizes


@pytest.mark.parametrize("name", list(PARAMS))
def test_real_configs_build_diffusers_modules(name):
    d, n_params = PARAMS[name]
    cfg = UNetConfig.from_dict(json.loads(json.dumps(d)))
    with torch.device("meta"):  # shapes only: no 3.4 GB of weights
        ours = UNet(cfg)
        ref = diffusers.UNet2DConditionModel.from_config(d)
    shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert shapes == {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert sum(p.numel() for p in ours.parameters()) == n_params
    # diffusers' full config (every field its current version writes) reads back to the same config
    assert UNetConfig.from_dict(json.loads(json.dumps(dict(ref.config)))) == cfg
    heads = {m.heads for m in ours.modules() if hasattr(m, "heads")}
    dims = {m.dim_head for m in ours.modules() if hasattr(m, "dim_head")}
    assert (heads, dims) == (({8}, {40, 80, 160}) if name == "sd15" else ({5, 10, 20}, {64}))


def _tiny(base: dict, **kw) -> dict:
    """The real config's flags with tiny channels (3 resolutions, like SD's first three)."""
    d = {**base}
    d.update(
        block_out_channels=[16, 32, 32],
        down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        norm_num_groups=8,
        sample_size=8,
        cross_attention_dim=24,
    )
    d.update(kw)
    return d


@pytest.mark.parametrize(
    "d",
    [
        _tiny(SD15_UNET, attention_head_dim=2),
        _tiny(SD21_UNET, attention_head_dim=[1, 2, 4]),  # per-block head counts, linear proj, upcast
        _tiny(SD21_UNET, attention_head_dim=[2, 4, 4], only_cross_attention=[False, False, False]),
    ],
    ids=["sd15-flags", "sd21-flags", "sd21-per-block-list-fields"],
)
def test_tiny_parity_with_sd_flags(tmp_path, d):
    torch.manual_seed(0)
    ref = perturb(diffusers.UNet2DConditionModel.from_config(d))
    ref.save_pretrained(tmp_path, safe_serialization=True)
    ours = load_unet(tmp_path)
    assert ours.config.use_linear_projection == d.get("use_linear_projection", False)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([981.0, 21.0])
    ctx = torch.randn(2, 77, 24, generator=g)  # CLIP's 77 tokens
    with torch.no_grad():
        want = ref(x, t, encoder_hidden_states=ctx).sample
        got = ours(x, t, context=ctx)
    assert rel_err(got, want) <= 1e-5


def test_unsupported_sd_variants_are_named():
    with pytest.raises(ValueError, match="only_cross_attention"):
        UNetConfig.from_dict({**SD15_UNET, "only_cross_attention": True})
    with pytest.raises(ValueError, match="addition_embed_type"):  # SDXL's added conditioning: next issue
        UNetConfig.from_dict({**SD15_UNET, "addition_embed_type": "text_time"})
