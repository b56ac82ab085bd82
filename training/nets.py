"""Model configs of the shipped models and one calling convention over two implementations.

The training builds the team's `model.UNet` / `model.ControlNet` (pure PyTorch, what the server runs).
Until those
exist in the tree — and only then — it falls back to diffusers' UNet2DModel / UNet2DConditionModel /
ControlNetModel built from the identical config (same key names, same weights layout). `TRAINING_BACKEND=ours|
diffusers` forces one; the GPU machine has no diffusers, so there it is always ours.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

# fashion-class: UNet2DModel layout, 1 channel, 10 classes + null row 10 (2.7M parameters).
CLASS_CONFIG: dict[str, Any] = {
    "_class_name": "UNet2DModel",
    "sample_size": 32,
    "in_channels": 1,
    "out_channels": 1,
    "block_out_channels": [32, 64, 96],
    "layers_per_block": 2,
    "norm_num_groups": 16,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "mid_block_type": "UNetMidBlock2D",
    "num_class_embeds": 11,
    "attention_head_dim": 32,
}
# fashion-text: UNet2DConditionModel layout, RGB, cross-attention to 24 MiniLM token states (4.1M parameters).
TEXT_CONFIG: dict[str, Any] = {
    "_class_name": "UNet2DConditionModel",
    "sample_size": 32,
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": [32, 48, 96],
    "layers_per_block": 2,
    "norm_num_groups": 16,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "cross_attention_dim": 384,
    "attention_head_dim": 4,
}
# The cond embedder keeps full resolution (pixel-space model: no stride-2 convs) — one width only.
CONTROL_EMBED_CHANNELS = [16]

SMOKE_OVERRIDES: dict[str, Any] = {
    "block_out_channels": [16, 32, 32],
    "layers_per_block": 1,
    "norm_num_groups": 8,
}


def config_for(kind: str, smoke: bool = False) -> dict[str, Any]:
    cfg = copy.deepcopy(CLASS_CONFIG if kind == "class" else TEXT_CONFIG)
    if smoke:
        cfg.update(SMOKE_OVERRIDES)
        cfg["attention_head_dim"] = 8 if kind == "class" else 2
    return cfg


def backend() -> str:
    """'ours' when model.unet / model.controlnet import (or forced), else 'diffusers'."""
    forced = os.environ.get("TRAINING_BACKEND", "auto")
    if forced in ("ours", "diffusers"):
        return forced
    try:
        import model.controlnet  # noqa: F401
        import model.unet  # noqa: F401

        return "ours"
    except ImportError:
        return "diffusers"


class Net(nn.Module):
    """forward(x, t, class_labels=None, context=None, control=None) -> prediction, for either implementation.

    `control` is a (down residuals list, mid residual) pair.
    """

    def __init__(self, inner: nn.Module, impl: str, conditional: bool) -> None:
        super().__init__()
        self.inner = inner
        self.impl = impl
        self.conditional = conditional

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def forward(self, x, t, class_labels=None, context=None, control=None):
        if control is not None and hasattr(control, "down"):
            control = (control.down, control.mid)
        if self.impl == "ours":
            res = None
            if control is not None:
                from model.controlnet import ControlResiduals

                res = ControlResiduals(down=list(control[0]), mid=control[1])
            return self.inner(x, t, class_labels=class_labels, context=context, control=res)
        if self.conditional:
            kw = {}
            if control is not None:
                kw = {
                    "down_block_additional_residuals": tuple(control[0]),
                    "mid_block_additional_residual": control[1],
                }
            return self.inner(x, t, encoder_hidden_states=context, return_dict=False, **kw)[0]
        return self.inner(x, t, class_labels=class_labels, return_dict=False)[0]


class Residuals(NamedTuple):
    down: list
    mid: torch.Tensor


class Control(nn.Module):
    """forward(x, t, cond, context=None, class_labels=None, scale=1.0) -> Residuals(down list, mid)."""

    def __init__(self, inner: nn.Module, impl: str) -> None:
        super().__init__()
        self.inner = inner
        self.impl = impl

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def forward(self, x, t, cond, context=None, class_labels=None, scale=1.0):
        if self.impl == "ours":
            r = self.inner(x, t, cond, context=context, scale=scale)
            return Residuals(list(r.down), r.mid)
        down, mid = self.inner(
            x,
            t,
            encoder_hidden_states=context,
            controlnet_cond=cond,
            conditioning_scale=float(scale),
            return_dict=False,
        )
        return Residuals(list(down), mid)


def build_unet(cfg: dict[str, Any], impl: str | None = None) -> Net:
    impl = impl or backend()
    conditional = cfg["_class_name"] == "UNet2DConditionModel"
    if impl == "ours":
        from model.config import UNetConfig
        from model.unet import UNet

        inner = UNet(UNetConfig.from_dict(cfg))
    else:
        from diffusers import UNet2DConditionModel, UNet2DModel

        cls = UNet2DConditionModel if conditional else UNet2DModel
        inner = cls(**{k: v for k, v in cfg.items() if not k.startswith("_")})
    return Net(inner, impl, conditional)


def build_controlnet(base: Net) -> Control:
    """A ControlNet for `base` (edge maps, 1 channel), its encoder initialised from the base's weights."""
    if base.impl == "ours":
        from model.config import ControlNetConfig
        from model.controlnet import ControlNet

        ccfg = ControlNetConfig.from_unet_config(
            base.inner.config,
            conditioning_channels=1,
            conditioning_embedding_out_channels=tuple(CONTROL_EMBED_CHANNELS),
        )
        inner = ControlNet(ccfg)
    else:
        from diffusers import ControlNetModel

        inner = ControlNetModel.from_unet(
            base.inner,
            conditioning_channels=1,
            conditioning_embedding_out_channels=tuple(CONTROL_EMBED_CHANNELS),
            load_weights_from_unet=False,
        )
    src = base.inner.state_dict()
    own = inner.state_dict()
    shared = {k: v for k, v in src.items() if k in own and own[k].shape == v.shape}
    inner.load_state_dict(shared, strict=False)
    assert any(k.startswith("down_blocks.") for k in shared), (
        "ControlNet shares no encoder weights with the base"
    )
    return Control(inner, base.impl)


def num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def save_fp16(module: nn.Module, path: str | Path, impl: str) -> None:
    """Write config.json + diffusion_pytorch_model.safetensors with the weights stored in fp16."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    half = copy.deepcopy(module).to("cpu", torch.float16)
    if impl == "ours":
        from model import save_pretrained

        save_pretrained(half, path)
    else:
        half.save_pretrained(path, safe_serialization=True)


def load(
    path: str | Path, kind: str, impl: str | None = None, device: str | torch.device = "cpu"
) -> nn.Module:
    """Load a saved folder in fp32 (kind: 'unet' or 'controlnet') and wrap it like the trained module."""
    impl = impl or backend()
    if impl == "ours":
        import model

        if kind == "unet":
            inner = model.load_unet(path, device=device, dtype=torch.float32)
            return Net(inner, impl, inner.config.class_name == "UNet2DConditionModel")
        return Control(model.load_controlnet(path, device=device, dtype=torch.float32), impl)
    from diffusers import ControlNetModel, UNet2DConditionModel, UNet2DModel

    if kind == "controlnet":
        return Control(
            ControlNetModel.from_pretrained(path, torch_dtype=torch.float32).to(device).eval(), impl
        )
    import json

    cfg = json.loads((Path(path) / "config.json").read_text())
    cond = cfg["_class_name"] == "UNet2DConditionModel"
    cls = UNet2DConditionModel if cond else UNet2DModel
    return Net(cls.from_pretrained(path, torch_dtype=torch.float32).to(device).eval(), impl, cond)


# diffusers scheduler configs of the shipped models (the samplers read these; the training uses the same
# tables).
CLASS_SCHEDULER: dict[str, Any] = {
    "_class_name": "DDIMScheduler",
    "num_train_timesteps": 1000,
    "beta_schedule": "squaredcos_cap_v2",
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "prediction_type": "v_prediction",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 0,
    "timestep_spacing": "trailing",
    "rescale_betas_zero_snr": False,
}
TEXT_SCHEDULER: dict[str, Any] = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "use_dynamic_shifting": False,
}
