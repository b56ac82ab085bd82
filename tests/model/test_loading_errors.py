"""Loader errors are clear: not a model, unsupported config, wrong keys/shapes, pickle refused unread."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

from model import UNet, UNetConfig, WeightsError, load_controlnet, load_unet, save_pretrained
from model.config import ControlNetConfig


def _tiny_cfg(**kw) -> UNetConfig:
    args = dict(
        class_name="UNet2DModel",
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=4,
    )
    args.update(kw)
    return UNetConfig(**args)


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    save_pretrained(UNet(_tiny_cfg()), tmp_path / "m")
    return tmp_path / "m"


def test_folder_that_is_not_a_model(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(WeightsError, match="not a model folder.*config.json"):
        load_unet(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_unet(tmp_path / "missing")
    (tmp_path / "model_index.json").write_text("{}")
    with pytest.raises(WeightsError, match="pipeline folder.*unet/"):
        load_unet(tmp_path)


def test_config_without_weights(saved):
    (saved / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(WeightsError, match="no diffusion_pytorch_model.safetensors"):
        load_unet(saved)


def test_non_model_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "DDIMScheduler", "beta_start": 0.1}))
    with pytest.raises(ValueError, match="unsupported model class 'DDIMScheduler'"):
        load_unet(tmp_path)
    (tmp_path / "config.json").write_text("not json")
    with pytest.raises(WeightsError, match="not valid JSON"):
        load_unet(tmp_path)


def test_unsupported_block_type(saved):
    d = json.loads((saved / "config.json").read_text())
    d["down_block_types"] = ["DownBlock2D", "SkipDownBlock2D"]
    (saved / "config.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match="unsupported down block type 'SkipDownBlock2D'.*AttnDownBlock2D"):
        load_unet(saved)
    with pytest.raises(ValueError, match="unsupported up block type 'ResnetUpsampleBlock2D'"):
        _tiny_cfg(up_block_types=("ResnetUpsampleBlock2D", "UpBlock2D"))
    with pytest.raises(ValueError, match="unsupported mid_block_type"):
        UNetConfig.from_dict(
            {"_class_name": "UNet2DConditionModel", "mid_block_type": "UNetMidBlock2DSimpleCrossAttn"}
        )
    with pytest.raises(ValueError, match="addition_embed_type='text' is not supported"):
        UNetConfig.from_dict({"_class_name": "UNet2DConditionModel", "addition_embed_type": "text"})
    with pytest.raises(ValueError, match="unknown UNet2DModel config field 'cross_attention_dim'"):
        UNetConfig.from_dict({"_class_name": "UNet2DModel", "cross_attention_dim": 8})
    with pytest.raises(ValueError, match="expected a ControlNetModel config"):
        ControlNetConfig.from_dict({"_class_name": "UNet2DModel"})


def test_wrong_key(saved):
    f = saved / "diffusion_pytorch_model.safetensors"
    sd = load_file(f)
    sd["conv_in.weights"] = sd.pop("conv_in.weight")
    save_file(sd, f)
    with pytest.raises(
        WeightsError, match=r"missing keys: conv_in\.weight.*unexpected keys: conv_in\.weights"
    ):
        load_unet(saved)


def test_wrong_shape(saved):
    f = saved / "diffusion_pytorch_model.safetensors"
    sd = load_file(f)
    sd["conv_out.weight"] = torch.zeros(2, 8, 3, 3)
    save_file(sd, f)
    with pytest.raises(
        WeightsError, match=r"shape mismatches: conv_out\.weight: file \(2, 8, 3, 3\) vs model \(1, 8, 3, 3\)"
    ):
        load_unet(saved)


class _Boom:
    def __reduce__(self):
        return (exec, ("raise SystemExit('pickle was executed')",))


@pytest.mark.parametrize("name", ["diffusion_pytorch_model.bin", "model.ckpt", "unet.pt", "w.pth"])
def test_pickle_refused_without_loading(saved, name):
    (saved / "diffusion_pytorch_model.safetensors").unlink()
    (saved / name).write_bytes(pickle.dumps(_Boom()))  # would exit the test run if ever unpickled
    with pytest.raises(WeightsError, match="pickle.*unsafe.*arbitrary code"):
        load_unet(saved)
    with pytest.raises(WeightsError, match="pickle.*unsafe"):
        load_unet(saved / name)


def test_not_safetensors_content(saved):
    (saved / "diffusion_pytorch_model.safetensors").write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(WeightsError, match="not a readable safetensors file"):
        load_unet(saved)


def test_controlnet_folder_given_to_load_unet(tmp_path):
    from model import ControlNet

    cfg = ControlNetConfig(
        block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        layers_per_block=1,
        norm_num_groups=4,
        attention_head_dim=2,
        cross_attention_dim=8,
        conditioning_embedding_out_channels=(4, 8),
    )
    save_pretrained(ControlNet(cfg), tmp_path)
    with pytest.raises(WeightsError, match="load_controlnet"):
        load_unet(tmp_path)
    assert load_controlnet(tmp_path).config == cfg


def test_no_torch_load_in_loader_code():
    import pathlib

    import model

    root = pathlib.Path(model.__file__).parent
    for name in ("loading.py", "config.py", "unet.py", "controlnet.py", "attention.py", "blocks.py"):
        assert "torch.load(" not in (root / name).read_text(), name
