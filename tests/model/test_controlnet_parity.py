"""ControlNet parity with diffusers ControlNetModel + UNet2DConditionModel (CPU fp32, tiny configs)."""

from __future__ import annotations

import pytest
import torch

from model import ControlNet, ControlNetConfig, ControlResiduals, load_controlnet, load_unet, save_pretrained
from tests.model.helpers import perturb, rel_err

diffusers = pytest.importorskip("diffusers")

TOL = 1e-5


def _pair(tmp_path, **kw):
    """A diffusers UNet + ControlNet (1-channel cond), saved to tmp_path/{unet,controlnet}, loaded by ours."""
    torch.manual_seed(0)
    args = dict(
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=1,
        norm_num_groups=8,
        attention_head_dim=2,
        cross_attention_dim=24,
    )
    args.update(kw)
    ref_unet = perturb(diffusers.UNet2DConditionModel(**args))
    ref_cn = diffusers.ControlNetModel.from_unet(
        ref_unet, conditioning_channels=1, conditioning_embedding_out_channels=(8, 16)
    )
    perturb(ref_cn, seed=1)
    ref_unet.save_pretrained(tmp_path / "unet", safe_serialization=True)
    ref_cn.save_pretrained(tmp_path / "controlnet", safe_serialization=True)
    return ref_unet, ref_cn, load_unet(tmp_path / "unet"), load_controlnet(tmp_path / "controlnet")


def _inputs(batch: int = 3):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(batch, 4, 16, 16, generator=g)
    t = torch.tensor([3.0, 517.5, 999.0][:batch])
    ctx = torch.randn(batch, 7, 24, generator=g)
    cond = (torch.rand(batch, 1, 32, 32, generator=g) > 0.8).float()  # edge-map-like, [0, 1]
    return x, t, ctx, cond


@pytest.mark.parametrize(
    "kw", [dict(), dict(num_class_embeds=3, use_linear_projection=True)], ids=["text", "class"]
)
def test_controlnet_residuals_and_unet_output(tmp_path, kw):
    ref_unet, ref_cn, unet, cn = _pair(tmp_path, **kw)
    x, t, ctx, cond = _inputs()
    y = torch.tensor([0, 2, 1]) if kw.get("num_class_embeds") else None
    with torch.no_grad():
        down, mid = ref_cn(
            x,
            t,
            encoder_hidden_states=ctx,
            controlnet_cond=cond,
            conditioning_scale=0.7,
            class_labels=y,
            return_dict=False,
        )
        want = ref_unet(
            x,
            t,
            encoder_hidden_states=ctx,
            class_labels=y,
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
        ).sample
        res = cn(x, t, cond, context=ctx, class_labels=y, scale=0.7)
        got = unet(x, t, class_labels=y, context=ctx, control=res)
        plain = unet(x, t, class_labels=y, context=ctx)
    assert isinstance(res, ControlResiduals) and len(res.down) == len(down)
    for a, b in zip(res.down, down, strict=True):
        assert rel_err(a, b) <= TOL
    assert rel_err(res.mid, mid) <= TOL
    assert rel_err(got, want) <= TOL
    assert rel_err(plain, want) > 1e-3  # the residuals changed the output


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return _pair(tmp_path_factory.mktemp("pair"))


def test_per_row_scale(pair):
    _, _, unet, cn = pair
    x, t, ctx, cond = _inputs()
    scale = torch.tensor([0.0, 0.5, 1.0])
    with torch.no_grad():
        res = cn(x, t, cond, context=ctx, scale=scale)
        full = cn(x, t, cond, context=ctx)
        got = unet(x, t, context=ctx, control=res)
        plain = unet(x, t, context=ctx)
    assert res.mid[0].abs().max() == 0 and all(d[0].abs().max() == 0 for d in res.down)
    assert torch.allclose(res.mid[1], 0.5 * full.mid[1]) and torch.allclose(res.down[2][2], full.down[2][2])
    assert torch.allclose(got[0], plain[0], atol=1e-6)  # scale 0 row == no control
    assert not torch.allclose(got[2], plain[2], atol=1e-3)


def test_round_trip_ours_to_diffusers(tmp_path, pair):
    unet = pair[2]
    cn = perturb(
        ControlNet.from_unet(unet, conditioning_channels=1, conditioning_embedding_out_channels=(8, 16))
    )
    save_pretrained(cn, tmp_path / "ours")
    ref = diffusers.ControlNetModel.from_pretrained(tmp_path / "ours").eval()
    x, t, ctx, cond = _inputs(2)
    with torch.no_grad():
        down, mid = ref(x, t, encoder_hidden_states=ctx, controlnet_cond=cond, return_dict=False)
        res = cn(x, t, cond, context=ctx)
    assert rel_err(res.mid, mid) <= TOL
    assert load_controlnet(tmp_path / "ours").config == cn.config


def test_from_unet_copies_encoder_and_starts_as_noop(pair):
    unet = pair[2]
    cn = ControlNet.from_unet(unet, conditioning_channels=1, conditioning_embedding_out_channels=(8, 16))
    assert cn.config == ControlNetConfig.from_unet_config(unet.config, 1, (8, 16))
    assert torch.equal(cn.down_blocks[0].resnets[0].conv1.weight, unet.down_blocks[0].resnets[0].conv1.weight)
    x, t, ctx, cond = _inputs(2)
    with torch.no_grad():
        res = cn(x, t, cond, context=ctx)
    assert all(d.abs().max() == 0 for d in res.down) and res.mid.abs().max() == 0
