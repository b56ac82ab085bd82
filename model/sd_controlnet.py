"""Stable Diffusion ControlNets: several diffusers ControlNetModels on one base U-Net, scaled per row.

The network itself is `model.controlnet.ControlNet` (diffusers ControlNetModel: an encoder copy of the U-Net
fed conv_in(x) + an embedding of the control image at pixel resolution, 8x the latent for SD's
(16, 32, 96, 256) embedder, zero 1x1 convs out). This module adds what serving SD ControlNets needs:

- `MultiControlNet`: the ControlNets paired with one base model, run on one packed batch; each net's
  residuals are scaled per row (scale 0: exactly zero, a row that does not use the net) and summed in net
  order, as diffusers' MultiControlNetModel sums them. `select(names)` is the subset one forward pass uses.
- `guidance_keep`: diffusers' control_guidance_start/end rule (is a net applied at step i of n).
- `pack_controls`: a pass's control input (B, ΣC, H, W) and per-row, per-net scales (B, K).
- `paired_controlnets`: where a base model's ControlNets are found (see its docstring), confined to the
  weights directory; `load_paired_controlnets` loads them and checks they fit the U-Net.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from model.blocks import ModuleList
from model.controlnet import ControlNet, ControlResiduals

if TYPE_CHECKING:
    from model.denoiser import Denoiser
    from model.unet import UNet

Tensor = torch.Tensor

CONTROLNET_CLASSES = ("ControlNetModel", "MultiControlNetModel")
# A pipeline folder's own ControlNets: controlnet/ and, for a MultiControlNetModel, controlnet_1/, ...
_SUBFOLDER_RE = re.compile(r"^controlnet(_[1-9][0-9]*)?$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
METADATA_KEY = "controlnets"  # unet_server.json: ControlNet folders in the weights dir paired with the model


class MultiControlNet(nn.Module):
    """The ControlNets of one base model: forward -> summed ControlResiduals, one scale per (row, net).

    Same call as `ControlNet` (so `model.denoiser.Denoiser` takes either), with cond the nets' control
    images stacked along channels in net order (B, ΣC_k, H, W) and scale (B, K) (a float or (B,) applies to
    every net).
    """

    def __init__(self, nets: dict[str, ControlNet]) -> None:
        super().__init__()
        if not nets:
            raise ValueError("MultiControlNet needs at least one ControlNet")
        self.names: tuple[str, ...] = tuple(nets)
        self.nets: ModuleList[ControlNet] = ModuleList(nets.values())  # not a ModuleDict: names may hold '.'
        self.channels: tuple[int, ...] = tuple(int(n.config.conditioning_channels) for n in self.nets)
        self._subsets: dict[tuple[str, ...], MultiControlNet] = {}  # select() cache (a plain dict: no module)
        self._denoisers: dict[tuple[int, tuple[str, ...]], Any] = {}  # denoiser_for() cache

    @property
    def dtype(self) -> torch.dtype:
        return self.nets[0].dtype

    @property
    def device(self) -> torch.device:
        return self.nets[0].device

    def net(self, name: str) -> ControlNet:
        return self.nets[self.names.index(name)]

    def select(self, names: Sequence[str]) -> MultiControlNet:
        """The nets named (in this module's order), sharing their weights; cached so ids stay stable."""
        key = tuple(n for n in self.names if n in set(names))
        if key == self.names:
            return self
        missing = set(names) - set(key)
        if missing:
            raise KeyError(f"no ControlNet named {sorted(missing)}; have {list(self.names)}")
        sub = self._subsets.get(key)
        if sub is None:
            sub = self._subsets[key] = MultiControlNet({n: self.net(n) for n in key})
        return sub

    def denoiser_for(self, base: Denoiser, names: Sequence[str]) -> Denoiser:
        """``base``'s U-Net and schedule with the nets ``names`` as its ControlNet (cached per U-Net and
        subset: the worker keys its CUDA-graph runners by denoiser)."""
        from model.denoiser import Denoiser

        sub = self.select(names)
        if sub is self and getattr(base.controlnet, "_orig_mod", base.controlnet) is self:
            return base  # all nets: the model's own denoiser (the one warmed up and captured)
        key = (id(base.unet), sub.names)
        d = self._denoisers.get(key)
        if d is None:
            d = self._denoisers[key] = Denoiser(base.unet, base.schedule, controlnet=sub)
        return d

    def forward(
        self,
        x: Tensor,
        t: Tensor | float,
        cond: Tensor,
        context: Tensor | None = None,
        class_labels: Tensor | None = None,
        scale: float | Tensor = 1.0,
        added_cond: dict[str, Tensor] | None = None,
    ) -> ControlResiduals:
        """x (B, C, h, w); t (B,); cond (B, ΣC_k, H, W) in [0, 1]; context (B, L, D); scale (B, K), (B,) or
        float; added_cond: SDXL's micro-conditioning (model.controlnet.ControlNet). -> the nets' residuals,
        each scaled per row, summed in net order."""
        if cond.shape[1] != sum(self.channels):
            raise ValueError(f"cond has {cond.shape[1]} channels; the nets take {list(self.channels)}")
        conds = torch.split(cond, list(self.channels), dim=1)  # K x (B, C_k, H, W)
        total: ControlResiduals | None = None
        for k, (net, c) in enumerate(zip(self.nets, conds, strict=True)):
            s = scale[:, k] if torch.is_tensor(scale) and scale.ndim == 2 else scale  # (B,) or float
            extra = {} if added_cond is None else {"added_cond": added_cond}  # SD nets never see the key
            res = net(x, t, c, context=context, class_labels=class_labels, scale=s, **extra)
            if total is None:
                total = res
            else:  # as diffusers' MultiControlNetModel: running sums in net order
                total = ControlResiduals(
                    down=[a + b for a, b in zip(total.down, res.down, strict=True)], mid=total.mid + res.mid
                )
        assert total is not None  # at least one net (checked in __init__)
        return total


def guidance_keep(step: int, steps: int, start: float, end: float) -> bool:
    """Whether a ControlNet applies at step ``step`` of ``steps`` (0-based): diffusers' rule, applied
    unless ``step / steps < start`` or ``(step + 1) / steps > end``."""
    return not (step / steps < start or (step + 1) / steps > end)


@dataclass(frozen=True)
class ControlInput:
    """One ControlNet a request uses (worker side): its image on the device and its schedule."""

    name: str  # the ControlNet's name in MultiControlNet.names
    image: Tensor  # (1, C, H, W) in [0, 1] at the request's pixel size
    scale: float  # conditioning_scale
    guidance_start: float = 0.0  # fraction of the steps before which the net is off
    guidance_end: float = 1.0  # fraction of the steps after which the net is off


def pack_controls(
    multi: MultiControlNet, rows: Sequence[tuple[Sequence[ControlInput], int, int]], size: tuple[int, int]
) -> tuple[Tensor, Tensor]:
    """One pass's ControlNet inputs for ``multi``'s nets.

    rows: per row (the request's controls, the row's step index, the request's step count); a row with no
    controls (or a net it does not use) gets scale 0 there, i.e. exactly zero residuals. size (H, W) in
    pixels. -> cond (B, ΣC_k, H, W) (zeros where unused), scale (B, K) fp32, both on multi's device.
    """
    dev = multi.device
    blank = {c: torch.zeros(1, c, *size, device=dev) for c in set(multi.channels)}  # (1, C, H, W)
    images: list[Tensor] = []
    scales: list[list[float]] = []
    for controls, step, steps in rows:
        by_name = {c.name: c for c in controls}
        row_scales = []
        for name, ch in zip(multi.names, multi.channels, strict=True):
            c = by_name.get(name)
            on = c is not None and guidance_keep(step, steps, c.guidance_start, c.guidance_end)
            images.append(c.image.to(dev) if c is not None else blank[ch])
            row_scales.append(c.scale if (c is not None and on) else 0.0)
        scales.append(row_scales)
    k = len(multi.names)
    per_row = [torch.cat(images[r * k : (r + 1) * k], dim=1) for r in range(len(rows))]  # (1, ΣC_k, H, W)
    cond = torch.cat(per_row)  # (B, ΣC_k, H, W)
    scale = torch.tensor(scales, dtype=torch.float32).to(dev)  # (B, K)
    return cond, scale


def paired_controlnets(
    weights_root: Path, folder: Path, folder_root: Path, meta: dict[str, Any], model_index: dict[str, Any]
) -> dict[str, Path]:
    """name -> ControlNet folder for a base model, in this order (names must be unique):

    1. its own: a StableDiffusionControlNetPipeline folder's ``controlnet/`` component (name
       ``"controlnet"``), and for a MultiControlNetModel the ``controlnet_1/``, ``controlnet_2/``, …
       folders diffusers saves beside it (names as the folders);
    2. named in its unet_server.json as ``"controlnets": ["<folder>", ...]``: ControlNetModel folders
       (config.json + diffusion_pytorch_model.safetensors) in the weights directory, named by folder.

    Every path is confined (symlinks resolved) to ``folder_root`` (own) or ``weights_root`` (named).
    """
    from model.pipeline_folder import PipelineError

    def confined(root: Path, path: Path) -> Path:
        p = path.resolve()
        if p != root and root not in p.parents:
            raise PipelineError(f"ControlNet folder {path.name} resolves outside the weights directory")
        return p

    out: dict[str, Path] = {}
    entry = model_index.get("controlnet")
    if isinstance(entry, list) and len(entry) == 2 and entry[1]:
        if entry[1] not in CONTROLNET_CLASSES:
            raise PipelineError(f"{folder}: component controlnet is a {entry[1]}, not a ControlNetModel")
        names = ["controlnet"]
        if entry[1] == "MultiControlNetModel":
            names += sorted(
                (p.name for p in folder.iterdir() if _SUBFOLDER_RE.match(p.name) and p.name != "controlnet"),
                key=lambda n: int(n.rsplit("_", 1)[1]),
            )
        for n in names:
            out[n] = confined(folder_root, folder / n)
    named = meta.get(METADATA_KEY) or []
    if not isinstance(named, list) or not all(isinstance(n, str) for n in named):
        raise PipelineError(f"{folder}: unet_server.json {METADATA_KEY!r} must be a list of folder names")
    for n in named:
        if not _NAME_RE.match(n):
            raise PipelineError(f"{folder}: ControlNet {n!r} is not a folder name in the weights directory")
        if n in out:
            raise PipelineError(f"{folder}: ControlNet name {n!r} is used twice")
        out[n] = confined(weights_root, weights_root / n)
    for n, p in out.items():
        if not (p / "config.json").is_file():
            raise PipelineError(f"{folder}: ControlNet {n!r}: {p} has no config.json")
    return out


def load_paired_controlnets(
    unet: UNet,
    paths: dict[str, Path],
    device: torch.device,
    dtype: torch.dtype,
    variant: str | None = None,
    latent_channels: int | None = None,
) -> MultiControlNet | None:
    """Load ``paths`` (from `paired_controlnets`) and check each fits ``unet``; None when there are none.

    ``latent_channels``: the channels of x a ControlNet takes (the VAE's latents; an inpainting U-Net's
    in_channels also count its mask and masked-image channels, which diffusers never feeds the ControlNet).
    """
    from model.loading import WeightsError, load_controlnet
    from model.pipeline_folder import PipelineError

    if not paths:
        return None
    nets: dict[str, ControlNet] = {}
    for name, path in paths.items():
        try:
            net = load_controlnet(path, device=device, dtype=dtype, variant=variant)
        except (WeightsError, ValueError) as exc:
            raise PipelineError(f"ControlNet {name!r} ({path}): {exc}") from exc
        c, u = net.config, unet.config
        if c.in_channels != (latent_channels or u.in_channels):
            raise PipelineError(
                f"ControlNet {name!r} does not fit the base model: in_channels={c.in_channels}, the latents "
                f"have {latent_channels or u.in_channels} channels"
            )
        for field in ("block_out_channels", "cross_attention_dim", "down_block_types", "addition_embed_type"):
            if getattr(c, field) != getattr(u, field):
                raise PipelineError(
                    f"ControlNet {name!r} does not fit the base U-Net: {field}={getattr(c, field)!r}, "
                    f"the U-Net has {getattr(u, field)!r}"
                )
        nets[name] = net
    return MultiControlNet(nets)
