"""DeepCache steps (model/deepcache.py): a full step is the U-Net's forward; a shallow step on the input its
cache came from is the full step again; a shallow step never runs the deep levels and does use the cache."""

from __future__ import annotations

import pytest
import torch

from model.config import UNetConfig
from model.deepcache import StepCachedUNet, full_step, shallow_step
from model.unet import UNet

COND = {
    "_class_name": "UNet2DConditionModel",
    "block_out_channels": [16, 32, 32],
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "layers_per_block": 1,
    "cross_attention_dim": 16,
    "attention_head_dim": 4,
    "norm_num_groups": 8,
    "sample_size": 8,
}
CLASS = {
    "_class_name": "UNet2DModel",
    "block_out_channels": [16, 32, 32],
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "layers_per_block": 2,
    "in_channels": 1,
    "out_channels": 1,
    "num_class_embeds": 11,
    "attention_head_dim": 8,
    "norm_num_groups": 8,
    "sample_size": 12,
}


def _unet(cfg: dict) -> UNet:
    torch.manual_seed(0)
    net = UNet(UNetConfig.from_dict(cfg)).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():  # no zero-initialised path may hide a skipped block
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return net


def _inputs(cfg: dict, t: float) -> dict:
    g = torch.Generator().manual_seed(2)
    s = cfg["sample_size"]
    kw = {"x": torch.randn(3, cfg.get("in_channels", 4), s, s, generator=g), "t": torch.full((3,), t)}
    if "cross_attention_dim" in cfg:
        kw["context"] = torch.randn(3, 5, cfg["cross_attention_dim"], generator=g)
    if "num_class_embeds" in cfg:
        kw["class_labels"] = torch.tensor([0, 3, 10])
    return kw


@pytest.mark.parametrize("cfg", [COND, CLASS], ids=["cross-attention", "class"])
@pytest.mark.parametrize("branch", [0, 1])
def test_full_is_forward_and_shallow_on_same_input_is_full(cfg: dict, branch: int) -> None:
    net = _unet(cfg)
    kw = _inputs(cfg, 500.0)
    with torch.no_grad():
        ref = net(**kw)
    extra = {k: v for k, v in kw.items() if k not in ("x", "t")}
    out, cache = full_step(net, kw["x"], kw["t"], branch, **extra)
    assert torch.equal(out, ref)
    shallow = shallow_step(net, kw["x"], kw["t"], cache, **extra)
    torch.testing.assert_close(shallow, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("branch", [0, 1])
def test_shallow_skips_deep_levels_and_uses_the_cache(branch: int) -> None:
    net = _unet(COND)
    calls: list[str] = []
    for i, block in enumerate(net.down_blocks):
        block.register_forward_hook(lambda *_, i=i: calls.append(f"down{i}"))
    net.mid_block.register_forward_hook(lambda *_: calls.append("mid"))
    a, b = _inputs(COND, 900.0), _inputs(COND, 100.0)
    _, cache_a = full_step(net, a["x"], a["t"], branch, context=a["context"])
    out_b, cache_b = full_step(net, b["x"], b["t"], branch, context=b["context"])
    calls.clear()
    stale = shallow_step(net, b["x"], b["t"], cache_a, context=b["context"])
    assert calls == [f"down{i}" for i in range(branch + 1)]  # no deeper level, no mid block
    fresh = shallow_step(net, b["x"], b["t"], cache_b, context=b["context"])
    torch.testing.assert_close(fresh, out_b, rtol=1e-5, atol=1e-5)
    assert (stale - out_b).abs().max() > 1e-3  # a stale cache changes the output: it is really used


def test_step_cached_unet_schedule() -> None:
    net = _unet(CLASS)
    kw = _inputs(CLASS, 300.0)
    wrapped = StepCachedUNet(net, branch=0, interval=3)
    for _ in range(7):
        wrapped(kw["x"], kw["t"], class_labels=kw["class_labels"])
    assert (wrapped.calls, wrapped.full_calls) == (7, 3)  # calls 0, 3, 6 in full
    with pytest.raises(ValueError, match="branch"):
        StepCachedUNet(net, branch=2, interval=2)  # the deepest level has no up block below it to cache
