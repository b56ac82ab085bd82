"""Diffusion U-Net, ControlNet, attention dispatch and diffusers-compatible safetensors loading."""

from model.config import ControlNetConfig, UNetConfig
from model.controlnet import ControlNet, ControlResiduals
from model.loading import WeightsError, load_controlnet, load_unet, save_pretrained
from model.unet import UNet

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
