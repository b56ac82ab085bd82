"""UNet parity with diffusers (CPU fp32, tiny configs): their weights load in ours and ours in diffusers."""

from __future__ import annotations

import inspect
import json

import pytest
import torch

from model import UNet, UNetConfig, load_unet, save_pretrained
from tests.model.helpers import perturb, rel_err

diffusers = pytest.importorskip("diffusers")

TOL = 1e-5


def _unet2d(**kw) -> torch.nn.Module:
    torch.manual_seed(0)
    args = dict(
        sample_size=16,
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=8,
        attention_head_dim=8,
    )
    args.update(kw)
    return perturb(diffusers.UNet2DModel(**args))


def _unet2d_cond(**kw) -> torch.nn.Module:
    torch.manual_seed(0)
    args = dict(
        sample_size=16,
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
    return perturb(diffusers.UNet2DConditionModel(**args))


def _inputs(ref: torch.nn.Module, batch: int = 3, size: int = 16):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, ref.config.in_channels, size, size, generator=g)
    t = torch.tensor([3.0, 517.5, 999.0][:batch])  # a different noise level per row
    return x, t


def _ref_out(ref, x, t, **kw) -> torch.Tensor:
    with torch.no_grad():
        return ref(x, t, **kw).sample


@pytest.mark.parametrize(
    "kw",
    [
        dict(),  # unconditional, mid attention with GroupNorm
        dict(num_class_embeds=5, resnet_time_scale_shift="scale_shift", flip_sin_to_cos=False, freq_shift=1),
        dict(attention_head_dim=None, add_attention=False, downsample_padding=0, center_input_sample=True),
    ],
    ids=["uncond", "class-scale_shift", "variants"],
)
def test_unet2d_parity(tmp_path, kw):
    ref = _unet2d(**kw)
    ref.save_pretrained(tmp_path, safe_serialization=True)
    ours = load_unet(tmp_path)
    x, t = _inputs(ref)
    labels = torch.tensor([0, 4, 2]) if kw.get("num_class_embeds") else None
    want = _ref_out(ref, x, t, class_labels=labels)
    with torch.no_grad():
        got = ours(x, t, class_labels=labels)
    assert want.norm() > 0 and got.shape == want.shape
    assert rel_err(got, want) <= TOL


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(
            use_linear_projection=True,
            attention_head_dim=(2, 4),
            transformer_layers_per_block=2,
            num_class_embeds=3,
            resnet_time_scale_shift="scale_shift",
        ),
        dict(
            mid_block_type="UNetMidBlock2D", layers_per_block=(1, 2), upcast_attention=True, conv_in_kernel=1
        ),
    ],
    ids=["sd-like", "linear-proj-class", "variants"],
)
def test_unet2d_condition_parity(tmp_path, kw):
    ref = _unet2d_cond(**kw)
    ref.save_pretrained(tmp_path, safe_serialization=True)
    ours = load_unet(tmp_path)
    x, t = _inputs(ref)
    ctx = torch.randn(3, 7, 24, generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([0, 2, 1]) if kw.get("num_class_embeds") else None
    want = _ref_out(ref, x, t, encoder_hidden_states=ctx, class_labels=labels)
    with torch.no_grad():
        got = ours(x, t, class_labels=labels, context=ctx)
    assert rel_err(got, want) <= TOL


def test_odd_spatial_size_matches_diffusers(tmp_path):
    ref = _unet2d_cond()
    ref.save_pretrained(tmp_path, safe_serialization=True)
    ours = load_unet(tmp_path)
    x, t = _inputs(ref, size=11)
    ctx = torch.randn(3, 5, 24)
    with torch.no_grad():
        got = ours(x, t, context=ctx)
    assert rel_err(got, _ref_out(ref, x, t, encoder_hidden_states=ctx)) <= TOL


def test_round_trip_ours_to_diffusers(tmp_path):
    cfg = UNetConfig(
        class_name="UNet2DConditionModel",
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=1,
        norm_num_groups=8,
        attention_head_dim=2,
        cross_attention_dim=12,
        num_class_embeds=4,
    )
    torch.manual_seed(0)
    ours = perturb(UNet(cfg))
    save_pretrained(ours, tmp_path)
    ref = diffusers.UNet2DConditionModel.from_pretrained(tmp_path).eval()
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([10.0, 900.0])
    ctx, y = torch.randn(2, 4, 12), torch.tensor([3, 0])
    with torch.no_grad():
        got = ours(x, t, class_labels=y, context=ctx)
    assert rel_err(got, _ref_out(ref, x, t, encoder_hidden_states=ctx, class_labels=y)) <= TOL
    assert load_unet(tmp_path).config == cfg


def test_round_trip_unet2d_sharded(tmp_path):
    cfg = UNetConfig(
        class_name="UNet2DModel",
        in_channels=1,
        out_channels=1,
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        mid_block_type="UNetMidBlock2D",
        layers_per_block=1,
        norm_num_groups=8,
        num_class_embeds=3,
    )
    torch.manual_seed(0)
    ours = perturb(UNet(cfg))
    save_pretrained(ours, tmp_path, max_shard_size=40_000)
    assert (tmp_path / "diffusion_pytorch_model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("diffusion_pytorch_model-*.safetensors"))) > 1
    ref = diffusers.UNet2DModel.from_pretrained(tmp_path).eval()
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([10.0, 900.0]), torch.tensor([2, 0])
    with torch.no_grad():
        got = load_unet(tmp_path)(x, t, class_labels=y)
    assert rel_err(got, _ref_out(ref, x, t, class_labels=y)) <= TOL


def test_loads_diffusers_sharded_folder(tmp_path):
    ref = _unet2d_cond()
    ref.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="60KB")
    assert (tmp_path / "diffusion_pytorch_model.safetensors.index.json").is_file()
    x, t = _inputs(ref)
    ctx = torch.randn(3, 7, 24)
    with torch.no_grad():
        got = load_unet(tmp_path)(x, t, context=ctx)
    assert rel_err(got, _ref_out(ref, x, t, encoder_hidden_states=ctx)) <= TOL


def test_legacy_attention_keys(tmp_path):
    """Old UNet2DModel checkpoints name attention weights query/key/value/proj_attn."""
    from safetensors.torch import load_file, save_file

    ref = _unet2d()
    ref.save_pretrained(tmp_path, safe_serialization=True)
    f = tmp_path / "diffusion_pytorch_model.safetensors"
    legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    sd = {}
    for k, v in load_file(f).items():
        for new, old in legacy.items():
            k = k.replace(f".{new}.", f".{old}.")
        sd[k] = v
    assert any(".query." in k for k in sd) and any(".proj_attn." in k for k in sd)
    save_file(sd, f)
    x, t = _inputs(ref)
    with torch.no_grad():
        got = load_unet(tmp_path)(x, t)
    assert rel_err(got, _ref_out(ref, x, t)) <= TOL


def test_rows_are_independent_and_t_broadcasts():
    """Each row at its own t gives what it gives alone; a scalar t equals a repeated (B,) t."""
    cfg = UNetConfig(
        class_name="UNet2DModel",
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=4,
        num_class_embeds=3,
    )
    torch.manual_seed(0)
    net = perturb(UNet(cfg))
    x, t, y = torch.randn(3, 1, 8, 8), torch.tensor([1.0, 250.5, 999.0]), torch.tensor([0, 1, 2])
    with torch.no_grad():
        batch = net(x, t, class_labels=y)
        rows = torch.cat([net(x[i : i + 1], t[i : i + 1], class_labels=y[i : i + 1]) for i in range(3)])
        scalar = net(x, 250.5, class_labels=y)
        vector = net(x, torch.full((3,), 250.5), class_labels=y)
    assert rel_err(batch, rows) <= TOL
    assert not torch.allclose(batch[0], net(x[:1], t[1:2], class_labels=y[:1])[0])  # t matters per row
    assert torch.allclose(scalar, vector)


def test_timestep_embedding_fp32_then_model_dtype():
    from model.embeddings import timestep_embedding

    t = torch.tensor([999.0, 1.0], dtype=torch.float16)
    emb = timestep_embedding(t, 32)
    assert emb.dtype == torch.float32
    cfg = UNetConfig(
        class_name="UNet2DModel",
        in_channels=1,
        out_channels=1,
        block_out_channels=(8,),
        down_block_types=("DownBlock2D",),
        up_block_types=("UpBlock2D",),
        layers_per_block=1,
        norm_num_groups=4,
    )
    net = UNet(cfg).to(torch.bfloat16)
    with torch.no_grad():
        out = net(torch.randn(2, 1, 4, 4, dtype=torch.bfloat16), torch.tensor([999.0, 1.0]))
    assert out.dtype == torch.bfloat16


def test_config_dict_round_trip_and_diffusers_fields():
    for cls, ref in (
        (diffusers.UNet2DModel, _unet2d(num_class_embeds=3)),
        (diffusers.UNet2DConditionModel, _unet2d_cond()),
    ):
        d = dict(ref.config)
        cfg = UNetConfig.from_dict(d)
        assert cfg.class_name == cls.__name__
        assert UNetConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
        # every field we write is a diffusers __init__ argument of that class
        params = set(inspect.signature(cls.__init__).parameters)
        assert set(cfg.to_dict()) - {"_class_name"} <= params
    # missing keys take the class's diffusers defaults
    assert UNetConfig.from_dict({"_class_name": "UNet2DModel"}).block_out_channels == (224, 448, 672, 896)
    assert UNetConfig.from_dict({"_class_name": "UNet2DConditionModel"}).cross_attention_dim == 1280
