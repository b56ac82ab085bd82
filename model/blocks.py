"""U-Net building blocks: residual block with time injection, down/up sampling, and the block containers.

Module names follow diffusers (ResnetBlock2D, Downsample2D, Upsample2D, DownBlock2D/AttnDownBlock2D/
CrossAttnDownBlock2D, the Up and Mid equivalents) so state_dict keys are diffusers' keys.
A container's attention modules (if any) are made by a factory `attn(channels) -> nn.Module` whose
forward is `(x (B, C, H, W), context) -> (B, C, H, W)`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Generic, TypeVar, overload

import torch
import torch.nn.functional as F
from torch import nn

from model import fused_groupnorm

AttnFactory = Callable[[int], nn.Module]

M = TypeVar("M", bound=nn.Module)

if TYPE_CHECKING:

    class ModuleList(nn.ModuleList, Generic[M]):
        """What the type checker sees: an nn.ModuleList whose items are all `M` (torch's is untyped)."""

        def __init__(self, modules: Iterable[M] | None = None) -> None: ...
        def __iter__(self) -> Iterator[M]: ...
        @overload
        def __getitem__(self, idx: slice) -> ModuleList[M]: ...
        @overload
        def __getitem__(self, idx: int) -> M: ...
        def __getitem__(self, idx: int | slice) -> M | ModuleList[M]: ...

else:
    ModuleList = nn.ModuleList  # at run time exactly torch's class (same repr, state_dict, torch.compile)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero every parameter of `module` (ControlNet's output convs start as a no-op)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResnetBlock2D(nn.Module):
    """GroupNorm-SiLU-conv twice with the time embedding injected between; 1x1 skip conv if channels change.

    x (B, Cin, H, W), emb (B, T) -> (B, Cout, H, W). `scale_shift`: AdaGN, norm2(h) * (1 + s) + b.
    `temb_channels=None` (the VAE's resnets): no time injection, no `time_emb_proj`, emb must be None.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        temb_channels: int | None,
        groups: int,
        eps: float,
        dropout: float = 0.0,
        scale_shift: bool = False,
        output_scale_factor: float = 1.0,
    ) -> None:
        super().__init__()
        self.scale_shift, self.output_scale_factor = scale_shift, output_scale_factor
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj: nn.Linear | None = None
        if temb_channels is not None:
            self.time_emb_proj = nn.Linear(temb_channels, out_channels * (2 if scale_shift else 1))
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        # (norm1 + SiLU, time add + norm2 + SiLU) as Triton kernels: model.fused_groupnorm.use_fused_groupnorm
        self.fused_norms: tuple[nn.Module, nn.Module] | None = None

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None) -> torch.Tensor:
        if self.fused_norms is not None and fused_groupnorm.available(x) and not self.scale_shift:
            return self._forward_fused(x, emb)
        h = self.conv1(F.silu(self.norm1(x)))
        if self.time_emb_proj is None:
            h = self.norm2(h)
        elif self.scale_shift:
            assert emb is not None, "this resnet injects a time embedding"
            t = self.time_emb_proj(F.silu(emb))[:, :, None, None]  # (B, 2*Cout, 1, 1)
            scale, shift = t.chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            assert emb is not None, "this resnet injects a time embedding"
            h = self.norm2(h + self.time_emb_proj(F.silu(emb))[:, :, None, None])  # t: (B, Cout, 1, 1)
        h = self.conv2(self.dropout(F.silu(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        out = x + h
        return out if self.output_scale_factor == 1.0 else out / self.output_scale_factor

    def _forward_fused(self, x: torch.Tensor, emb: torch.Tensor | None) -> torch.Tensor:
        """forward with each GroupNorm (+ the time embedding's add) + SiLU as one fused op."""
        assert self.fused_norms is not None
        norm_act1, norm_act2 = self.fused_norms
        h = self.conv1(norm_act1(x))
        t = None
        if self.time_emb_proj is not None:
            assert emb is not None, "this resnet injects a time embedding"
            t = self.time_emb_proj(F.silu(emb))  # (B, Cout), added before norm2
        h = self.conv2(self.dropout(norm_act2(h, t)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        out = x + h
        return out if self.output_scale_factor == 1.0 else out / self.output_scale_factor


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv: (B, C, H, W) -> (B, C, ceil(H/2), ceil(W/2)); padding 0 pads right/bottom first."""

    def __init__(self, channels: int, padding: int = 1) -> None:
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample2D(nn.Module):
    """Nearest 2x (or to `size`) then 3x3 conv: (B, C, H, W) -> (B, C, 2H, 2W)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=size, mode="nearest")
        return self.conv(x)


class DownBlock(nn.Module):
    """DownBlock2D / AttnDownBlock2D / CrossAttnDownBlock2D: (resnet [+ attn]) x n, then optional downsample.

    forward(x, emb, context) -> (x, skips) with one skip per resnet and one after the downsampler.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        temb_channels: int | None,
        num_layers: int,
        add_downsample: bool,
        groups: int,
        eps: float,
        dropout: float,
        scale_shift: bool,
        downsample_padding: int,
        attn: AttnFactory | None = None,
    ) -> None:
        super().__init__()
        self.resnets = ModuleList(
            [
                ResnetBlock2D(
                    in_channels if i == 0 else out_channels,
                    out_channels,
                    temb_channels,
                    groups,
                    eps,
                    dropout,
                    scale_shift,
                )
                for i in range(num_layers)
            ]
        )
        self.attentions: ModuleList[nn.Module] | None
        if attn is not None:
            self.attentions = ModuleList([attn(out_channels) for _ in range(num_layers)])
        else:
            self.attentions = None
        self.downsamplers = (
            ModuleList([Downsample2D(out_channels, downsample_padding)]) if add_downsample else None
        )

    def forward(
        self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, emb)
            if self.attentions is not None:
                x = self.attentions[i](x, context)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class UpBlock(nn.Module):
    """UpBlock2D / AttnUpBlock2D / CrossAttnUpBlock2D: (concat skip, resnet [+ attn]) x n, optional upsample.

    forward(x, skips, emb, context, size) where skips are this block's encoder features (last used first)
    and size the spatial size to upsample to (None: 2x).
    """

    def __init__(
        self,
        in_channels: int,
        prev_output_channels: int,
        out_channels: int,
        temb_channels: int | None,
        num_layers: int,
        add_upsample: bool,
        groups: int,
        eps: float,
        dropout: float,
        scale_shift: bool,
        attn: AttnFactory | None = None,
    ) -> None:
        super().__init__()
        resnets = []
        for i in range(num_layers):
            skip_ch = in_channels if i == num_layers - 1 else out_channels
            res_in = prev_output_channels if i == 0 else out_channels
            resnets.append(
                ResnetBlock2D(
                    res_in + skip_ch, out_channels, temb_channels, groups, eps, dropout, scale_shift
                )
            )
        self.resnets = ModuleList(resnets)
        self.attentions: ModuleList[nn.Module] | None
        if attn is not None:
            self.attentions = ModuleList([attn(out_channels) for _ in range(num_layers)])
        else:
            self.attentions = None
        self.upsamplers = ModuleList([Upsample2D(out_channels)]) if add_upsample else None

    def forward(
        self,
        x: torch.Tensor,
        skips: list[torch.Tensor],
        emb: torch.Tensor,
        context: torch.Tensor | None = None,
        size: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        for i, resnet in enumerate(self.resnets):
            x = resnet(torch.cat([x, skips[-1 - i]], dim=1), emb)  # (B, C + Cskip, H, W)
            if self.attentions is not None:
                x = self.attentions[i](x, context)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, size)
        return x


class MidBlock(nn.Module):
    """UNetMidBlock2D / UNetMidBlock2DCrossAttn: resnet, then (attn, resnet) x num_layers.

    Without attention (`attn` None) it is resnets only (num_layers + 1 of them). (B, C, H, W) -> same.
    """

    def __init__(
        self,
        channels: int,
        temb_channels: int | None,
        num_layers: int,
        groups: int,
        eps: float,
        dropout: float,
        scale_shift: bool,
        output_scale_factor: float,
        attn: AttnFactory | None = None,
    ) -> None:
        super().__init__()
        self.resnets = ModuleList(
            [
                ResnetBlock2D(
                    channels, channels, temb_channels, groups, eps, dropout, scale_shift, output_scale_factor
                )
                for _ in range(num_layers + 1)
            ]
        )
        self.attentions = (
            ModuleList([attn(channels) for _ in range(num_layers)]) if attn is not None else None
        )

    def forward(
        self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None = None
    ) -> torch.Tensor:
        x = self.resnets[0](x, emb)
        for i in range(1, len(self.resnets)):
            if self.attentions is not None:
                x = self.attentions[i - 1](x, context)
            x = self.resnets[i](x, emb)
        return x
