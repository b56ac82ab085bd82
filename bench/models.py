"""The U-Nets the benchmarks run, built by diffusers with random weights (or the shipped ones), saved once
as diffusers folders, and loaded from the same folder by diffusers and by our loader: identical weights.

Both implementations are wrapped to one call signature, ``fn(x, t, class_labels=None, context=None,
control=None)``, the project's U-Net signature (control = ``model.controlnet.ControlResiduals``-like).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

# SD1.5's scheduler (VP, scaled-linear betas, epsilon), as in its scheduler/scheduler_config.json.
SD15_SCHEDULER = {
    "_class_name": "DDIMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "timestep_spacing": "leading",
}
# DDPM's (linear betas, epsilon): for the CIFAR-sized model and the fashion stand-in.
DDPM_SCHEDULER = {
    "_class_name": "DDIMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "prediction_type": "epsilon",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 0,
    "timestep_spacing": "trailing",
}


@dataclasses.dataclass
class Case:
    """One model to benchmark: where its folder is and what inputs it takes."""

    name: str
    unet_dir: Path
    in_channels: int
    sample_size: int
    context: tuple[int, int] | None = None  # (tokens, width) of the cross-attention context
    num_classes: int | None = None  # class-embedding rows (incl. the null row), None = no class input
    null_class: int | None = None
    controlnet_dir: Path | None = None
    control_channels: int = 0
    scheduler: dict[str, Any] = dataclasses.field(default_factory=lambda: dict(DDPM_SCHEDULER))
    note: str = ""


# --- random-weight folders --------------------------------------------------------------------------


def _sd15_kwargs(quick: bool) -> dict[str, Any]:
    if quick:
        return dict(
            block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            layers_per_block=1,
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=8,
            sample_size=16,
        )
    # The SD1.5 config: diffusers' defaults are SD1.5's blocks and channels.
    return dict(cross_attention_dim=768, attention_head_dim=8, sample_size=64)


def _cifar_kwargs(quick: bool) -> dict[str, Any]:
    # google/ddpm-cifar10-32: 35.7M parameters, self-attention (one head) at 16x16.
    return dict(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32, 32, 32) if quick else (128, 256, 256, 256),
        layers_per_block=1 if quick else 2,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=None,
        norm_num_groups=8 if quick else 32,
    )


def _fashion_standin_kwargs(quick: bool) -> dict[str, Any]:
    # Shaped like a ~4M-parameter class-conditional Fashion-MNIST model (10 classes + null row).
    return dict(
        sample_size=32,
        in_channels=1,
        out_channels=1,
        block_out_channels=(16, 32, 32) if quick else (48, 96, 96),
        layers_per_block=1 if quick else 2,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        num_class_embeds=11,
        norm_num_groups=8 if quick else 16,
        attention_head_dim=8 if quick else 32,
    )


def _is_saved(folder: Path) -> bool:
    return (folder / "config.json").exists() and any(folder.glob("*.safetensors"))


def quiet_diffusers() -> None:
    """diffusers warns about accelerate and fp32 modules on every load; the tables are what we want."""
    try:
        from diffusers.utils import logging as dlog

        dlog.set_verbosity_error()
    except Exception:  # noqa: BLE001
        pass


def make_random_folder(kind: str, root: Path, quick: bool, device: torch.device) -> Path:
    """Create (once) a diffusers folder with random weights, saved in fp16 on CUDA / fp32 on CPU."""
    import diffusers

    quiet_diffusers()
    folder = root / f"{kind}{'-quick' if quick else ''}"
    if _is_saved(folder):
        return folder
    torch.manual_seed(0)
    if kind == "sd15":
        cls, kwargs = diffusers.UNet2DConditionModel, _sd15_kwargs(quick)
    elif kind == "cifar36m":
        cls, kwargs = diffusers.UNet2DModel, _cifar_kwargs(quick)
    elif kind == "fashion-standin":
        cls, kwargs = diffusers.UNet2DModel, _fashion_standin_kwargs(quick)
    else:
        raise ValueError(kind)
    with torch.device(device):  # random init on the GPU: SD1.5's 860M parameters init in seconds there
        net = cls(**kwargs)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    net.to(dtype).save_pretrained(folder, safe_serialization=True)
    return folder


def random_case(kind: str, root: Path, quick: bool, device: torch.device) -> Case:
    folder = make_random_folder(kind, root, quick, device)
    if kind == "sd15":
        ctx = (8, 32) if quick else (77, 768)
        return Case(
            "sd15",
            folder,
            4,
            16 if quick else 64,
            context=ctx,
            scheduler=dict(SD15_SCHEDULER),
            note="SD1.5 U-Net config, random init",
        )
    if kind == "cifar36m":
        return Case("cifar36m", folder, 3, 32, note="DDPM-CIFAR10 U-Net config, random init")
    return Case(
        "fashion-standin",
        folder,
        1,
        32,
        num_classes=11,
        null_class=10,
        note="random stand-in shaped like fashion-class (shipped weights absent)",
    )


def shipped_cases(weights_dir: Path) -> tuple[list[Case], list[str]]:
    """The fashion models in weights/ (diffusers layout + unet_server.json); notes for missing ones."""
    cases, notes = [], []
    for name in ("fashion-class", "fashion-text", "fashion-text-edges"):
        folder = weights_dir / name
        meta_path = folder / "unet_server.json"
        if not meta_path.exists():
            notes.append(f"{name}: not in {weights_dir} (skipped)")
            continue
        meta = json.loads(meta_path.read_text())
        base = weights_dir / meta["base_model"] if meta.get("base_model") else folder
        unet_dir = base / "unet"
        if not _is_saved(unet_dir):
            notes.append(f"{name}: no unet weights in {unet_dir} (skipped)")
            continue
        cfg = json.loads((unet_dir / "config.json").read_text())
        sched_path = base / "scheduler" / "scheduler_config.json"
        sched = json.loads(sched_path.read_text()) if sched_path.exists() else dict(DDPM_SCHEDULER)
        text = meta.get("text_encoder")
        ctx = (int(text.get("max_length", 24)), int(cfg.get("cross_attention_dim") or 384)) if text else None
        n_cls = cfg.get("num_class_embeds")
        control = meta.get("control")
        cn_dir = folder / "controlnet" if control else None
        if cn_dir is not None and not _is_saved(cn_dir):
            notes.append(f"{name}: no controlnet weights in {cn_dir} (skipped)")
            continue
        cases.append(
            Case(
                name,
                unet_dir,
                int(cfg["in_channels"]),
                int(meta.get("sample_size") or cfg.get("sample_size") or 32),
                context=ctx,
                num_classes=n_cls,
                null_class=meta.get("null_class_label"),
                controlnet_dir=cn_dir,
                control_channels=int(control["channels"]) if control else 0,
                scheduler=sched,
                note="shipped weights",
            )
        )
    return cases, notes


# --- inputs -----------------------------------------------------------------------------------------


def make_inputs(case: Case, batch: int, device: torch.device, dtype: torch.dtype, seed: int = 0) -> dict:
    """Random, valid inputs for ``batch`` rows (never zeros: they can run faster than real data)."""
    g = torch.Generator().manual_seed(seed)
    s = case.sample_size
    inputs: dict[str, Any] = {
        "x": torch.randn(batch, case.in_channels, s, s, generator=g).to(device, dtype),
        "t": (torch.rand(batch, generator=g) * 999).to(device),
    }
    if case.context is not None:
        inputs["context"] = torch.randn(batch, *case.context, generator=g).to(device, dtype)
    if case.num_classes is not None:
        inputs["class_labels"] = torch.randint(0, case.num_classes, (batch,), generator=g).to(device)
    if case.controlnet_dir is not None:
        cond = (torch.rand(batch, case.control_channels, s, s, generator=g) > 0.8).float()
        inputs["cond"] = cond.to(device, dtype)
    return inputs


# --- the two implementations behind one signature ---------------------------------------------------


@dataclasses.dataclass
class Residuals:
    """Same fields as model.controlnet.ControlResiduals (used for diffusers' residuals)."""

    down: list
    mid: torch.Tensor


class DiffusersUNet(torch.nn.Module):
    """diffusers UNet2DModel / UNet2DConditionModel (+ ControlNetModel) with the project's signature."""

    def __init__(self, unet: torch.nn.Module, controlnet: torch.nn.Module | None = None):
        super().__init__()
        self.unet, self.controlnet = unet, controlnet
        self.conditional = hasattr(unet.config, "cross_attention_dim")

    def forward(self, x, t, class_labels=None, context=None, cond=None):
        if not self.conditional:
            return self.unet(x, t, class_labels=class_labels, return_dict=False)[0]
        down = mid = None
        if self.controlnet is not None:
            down, mid = self.controlnet(
                x,
                t,
                encoder_hidden_states=context,
                controlnet_cond=cond,
                class_labels=class_labels,
                return_dict=False,
            )
        return self.unet(
            x,
            t,
            encoder_hidden_states=context,
            class_labels=class_labels,
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
            return_dict=False,
        )[0]


def load_diffusers(case: Case, device: torch.device, dtype: torch.dtype) -> DiffusersUNet:
    import diffusers

    quiet_diffusers()
    cfg = json.loads((case.unet_dir / "config.json").read_text())
    cls = (
        diffusers.UNet2DConditionModel
        if cfg.get("_class_name") == "UNet2DConditionModel"
        else diffusers.UNet2DModel
    )
    unet = cls.from_pretrained(case.unet_dir, torch_dtype=dtype).to(device).eval()
    cn = None
    if case.controlnet_dir is not None:
        cn = (
            diffusers.ControlNetModel.from_pretrained(case.controlnet_dir, torch_dtype=dtype)
            .to(device)
            .eval()
        )
    return DiffusersUNet(unet, cn).eval()


class OurUNet(torch.nn.Module):
    """model.unet.UNet (+ model.controlnet.ControlNet), taking the control map like DiffusersUNet."""

    def __init__(self, unet: torch.nn.Module, controlnet: torch.nn.Module | None = None):
        super().__init__()
        self.unet, self.controlnet = unet, controlnet

    def forward(self, x, t, class_labels=None, context=None, cond=None):
        control = None
        if self.controlnet is not None:
            control = self.controlnet(x, t, cond, context=context, class_labels=class_labels)
        return self.unet(x, t, class_labels=class_labels, context=context, control=control)


def load_ours(case: Case, device: torch.device, dtype: torch.dtype) -> OurUNet:
    import model

    unet = model.load_unet(case.unet_dir, device=device, dtype=dtype)
    cn = None
    if case.controlnet_dir is not None:
        cn = model.load_controlnet(case.controlnet_dir, device=device, dtype=dtype)
    return OurUNet(unet, cn).eval()


def to_memory_format(module: torch.nn.Module, fmt: torch.memory_format) -> torch.nn.Module:
    """4-D parameters (conv weights) into ``fmt``; everything else stays."""
    return module.to(memory_format=fmt)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def param_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
