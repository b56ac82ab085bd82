"""Diffusion U-Net, ControlNet, attention dispatch and diffusers-compatible safetensors loading.

Exports load lazily (PEP 562), so that importing a torch-free submodule (``model.seeds``) does not import
torch: the HTTP side imports it before the engine process has started.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "ControlNet": "model.controlnet",
    "ControlNetConfig": "model.config",
    "ControlResiduals": "model.controlnet",
    "UNet": "model.unet",
    "UNetConfig": "model.config",
    "WeightsError": "model.loading",
    "load_controlnet": "model.loading",
    "load_unet": "model.loading",
    "save_pretrained": "model.loading",
}

__all__ = [
    "ControlNet",
    "ControlNetConfig",
    "ControlResiduals",
    "UNet",
    "UNetConfig",
    "WeightsError",
    "load_controlnet",
    "load_unet",
    "save_pretrained",
]

if TYPE_CHECKING:
    from model.config import ControlNetConfig, UNetConfig
    from model.controlnet import ControlNet, ControlResiduals
    from model.loading import WeightsError, load_controlnet, load_unet, save_pretrained
    from model.unet import UNet


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'model' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
