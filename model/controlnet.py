"""ControlNet (diffusers ControlNetModel): a copy of the U-Net encoder fed x + embed(cond), emitting residuals
for every skip feature and the mid block through zero-initialised 1x1 convs. The U-Net adds them (scaled)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from model.blocks import DownBlock, MidBlock, ModuleList, zero_module
from model.config import ControlNetConfig
from model.embeddings import TimestepEmbedding, Timesteps, embed_conditioning
from model.unet import UNet, build_encoder


@dataclass
class ControlResiduals:
    """What `UNet.forward(control=...)` takes: a residual per encoder skip feature, one for the mid block."""

    down: list[torch.Tensor]  # shapes of the U-Net's skips: [(B, C_i, H_i, W_i)]
    mid: torch.Tensor  # (B, C_last, H_min, W_min)


class ControlNetConditioningEmbedding(nn.Module):
    """Small conv stack (SiLU between) mapping the control image to the feature map after conv_in.

    cond (B, Cc, H*2^k, W*2^k) -> (B, C0, H, W) with k = len(block_out_channels) - 1 stride-2 convs;
    conv_out starts at zero.
    """

    def __init__(self, out_channels: int, cond_channels: int, block_out_channels: tuple[int, ...]) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(cond_channels, block_out_channels[0], 3, padding=1)
        blocks = []
        for c_in, c_out in zip(block_out_channels[:-1], block_out_channels[1:], strict=True):
            blocks.append(nn.Conv2d(c_in, c_in, 3, padding=1))
            blocks.append(nn.Conv2d(c_in, c_out, 3, padding=1, stride=2))
        self.blocks = nn.ModuleList(blocks)
        self.conv_out = zero_module(nn.Conv2d(block_out_channels[-1], out_channels, 3, padding=1))

    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.conv_in(cond))
        for block in self.blocks:
            h = F.silu(block(h))
        return self.conv_out(h)


class ControlNet(nn.Module):
    """diffusers ControlNetModel: forward(x, t, cond, context, class_labels, scale) -> ControlResiduals."""

    # made by build_encoder / attach_time_embedding (model.unet.Encoder)
    conv_in: nn.Conv2d
    time_proj: Timesteps
    time_embedding: TimestepEmbedding
    class_embedding: nn.Embedding | None
    down_blocks: ModuleList[DownBlock]
    mid_block: MidBlock
    attention_backend: str  # set by model.loading: the attention backend chosen at load time

    def __init__(self, config: ControlNetConfig) -> None:
        super().__init__()
        self.config = config
        build_encoder(self, config)
        ch0 = config.block_out_channels[0]
        self.controlnet_cond_embedding = ControlNetConditioningEmbedding(
            ch0, config.conditioning_channels, config.conditioning_embedding_out_channels
        )
        convs = [nn.Conv2d(ch0, ch0, 1)]
        n = len(config.down_block_types)
        for i, ch in enumerate(config.block_out_channels):
            convs += [nn.Conv2d(ch, ch, 1) for _ in range(config.layers_per_block + (i < n - 1))]
        self.controlnet_down_blocks = nn.ModuleList([zero_module(c) for c in convs])
        ch = config.block_out_channels[-1]
        self.controlnet_mid_block = zero_module(nn.Conv2d(ch, ch, 1))
        self._needs_context = config.mid_block_type == "UNetMidBlock2DCrossAttn" or any(
            b.startswith("CrossAttn") for b in config.down_block_types
        )

    @classmethod
    def from_unet(
        cls,
        unet: UNet,
        conditioning_channels: int = 3,
        conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256),
    ) -> ControlNet:
        """A ControlNet whose encoder starts as a copy of `unet`'s (as diffusers' from_unet)."""
        cfg = ControlNetConfig.from_unet_config(
            unet.config, conditioning_channels, conditioning_embedding_out_channels
        )
        net = cls(cfg).to(device=unet.device, dtype=unet.dtype)
        shared = {
            k: v
            for k, v in unet.state_dict().items()
            if k.split(".")[0] in ("conv_in", "time_embedding", "class_embedding", "down_blocks", "mid_block")
        }
        result = net.load_state_dict(shared, strict=False)
        assert not result.unexpected_keys, result.unexpected_keys  # same structure by construction
        return net

    @property
    def dtype(self) -> torch.dtype:
        return self.conv_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.conv_in.weight.device

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor | float,
        cond: torch.Tensor,
        context: torch.Tensor | None = None,
        class_labels: torch.Tensor | None = None,
        scale: float | torch.Tensor = 1.0,
        added_cond: dict[str, torch.Tensor] | None = None,
    ) -> ControlResiduals:
        """x (B, C, H, W); t (B,); cond (B, Cc, H', W') in [0, 1] at image resolution (H' = H * 2^k);
        context (B, L, D); class_labels (B,); scale float or (B,) per-row strength; added_cond: SDXL's
        {"text_embeds": (B, P), "time_ids": (B, 6)} for a text_time ControlNet. -> ControlResiduals."""
        if context is None and self._needs_context:
            raise ValueError("this ControlNet has cross-attention; pass context (B, L, cross_attention_dim)")
        if self.config.controlnet_conditioning_channel_order == "bgr":
            cond = torch.flip(cond, dims=[1])
        emb = embed_conditioning(self, x, t, class_labels, added_cond)  # (B, T)
        h = self.conv_in(x) + self.controlnet_cond_embedding(cond.to(self.dtype))  # (B, C0, H, W)
        skips = [h]
        for block in self.down_blocks:
            h, res = block(h, emb, context)
            skips.extend(res)
        h = self.mid_block(h, emb, context)
        down = [conv(s) for conv, s in zip(self.controlnet_down_blocks, skips, strict=True)]
        mid = self.controlnet_mid_block(h)
        if isinstance(scale, torch.Tensor):
            s = scale.to(device=mid.device, dtype=mid.dtype).reshape(-1, 1, 1, 1)  # (B or 1, 1, 1, 1)
            down = [d * s for d in down]
            mid = mid * s
        elif scale != 1.0:
            down = [d * scale for d in down]
            mid = mid * scale
        return ControlResiduals(down=down, mid=mid)
