"""The diffusion U-Net: diffusers UNet2DModel and UNet2DConditionModel in one module (same keys as diffusers).

forward(x, t, class_labels=None, context=None, control=None, added_cond=None) -> prediction shaped like x.
t is per row (B,): every row may be a different request at its own noise level. added_cond carries SDXL's
per-row micro-conditioning (addition_embed_type "text_time": pooled text embeds and size/crop time ids).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch
from torch import nn

from model.attention import SpatialSelfAttention, Transformer2D
from model.blocks import AttnFactory, DownBlock, MidBlock, ModuleList, UpBlock
from model.config import TEXT_TIME, UNET2D, ControlNetConfig, UNetConfig, _per_block
from model.embeddings import (
    Conditioned,
    TimestepEmbedding,
    Timesteps,
    attach_text_time_embedding,
    attach_time_embedding,
    embed_conditioning,
)

if TYPE_CHECKING:
    from model.controlnet import ControlResiduals

AnyConfig = UNetConfig | ControlNetConfig


class Encoder(Conditioned, Protocol):
    """What build_encoder creates on its owner (UNet, ControlNet) and run_encoder runs."""

    down_blocks: ModuleList[DownBlock]
    mid_block: MidBlock


def _spatial_attn(
    cfg: AnyConfig, head_dim: int | None, groups: int | None, rescale: float = 1.0
) -> AttnFactory:
    """UNet2DModel self-attention: `head_dim` channels per head (None: one head over all channels)."""

    def make(ch: int) -> nn.Module:
        d = head_dim or ch
        return SpatialSelfAttention(ch, ch // d, d, groups, cfg.norm_eps, rescale)

    return make


def _cross_attn(cfg: AnyConfig, heads: int, context_dim: int, layers: int) -> AttnFactory:
    """UNet2DConditionModel transformer: `heads` heads of ch // heads channels (diffusers' head semantics)."""

    def make(ch: int) -> nn.Module:
        return Transformer2D(
            ch,
            heads,
            ch // heads,
            context_dim,
            layers,
            cfg.norm_num_groups,
            cfg.use_linear_projection,
            cfg.upcast_attention,
        )

    return make


def _n_blocks(cfg: AnyConfig) -> int:
    assert cfg.down_block_types is not None  # UNetConfig.__post_init__ fills the class default
    return len(cfg.down_block_types)


def time_embed_dim(cfg: AnyConfig) -> int:
    """Width of the time embedding injected into every resnet."""
    assert cfg.block_out_channels is not None  # UNetConfig.__post_init__ fills the class default
    return cfg.time_embedding_dim or 4 * cfg.block_out_channels[0]


def build_encoder(owner: Encoder, cfg: AnyConfig) -> None:
    """Create conv_in, time/class embedding, down_blocks and mid_block on `owner` (UNet and ControlNet)."""
    n = _n_blocks(cfg)
    chans = cfg.block_out_channels
    # UNetConfig.__post_init__ fills these with the class defaults (ControlNetConfig has no None default)
    assert chans is not None and cfg.in_channels is not None and cfg.down_block_types is not None
    temb = time_embed_dim(cfg)
    shift = cfg.resnet_time_scale_shift == "scale_shift"
    k_in = getattr(cfg, "conv_in_kernel", 3)
    owner.conv_in = nn.Conv2d(cfg.in_channels, chans[0], k_in, padding=(k_in - 1) // 2)
    attach_time_embedding(owner, chans[0], temb, cfg.flip_sin_to_cos, cfg.freq_shift, cfg.num_class_embeds)
    if cfg.addition_embed_type == TEXT_TIME:  # SDXL: pooled text + size/crop ids added to the time embedding
        assert cfg.addition_time_embed_dim and cfg.projection_class_embeddings_input_dim  # config checks it
        attach_text_time_embedding(
            owner,
            temb,
            cfg.addition_time_embed_dim,
            cfg.projection_class_embeddings_input_dim,
            cfg.flip_sin_to_cos,
            cfg.freq_shift,
        )

    layers = _per_block(cfg.layers_per_block, n, "layers_per_block")
    head_arg = _per_block(cfg.attention_head_dim, n, "attention_head_dim")
    if cfg.class_name != UNET2D:
        tlayers = _per_block(cfg.transformer_layers_per_block, n, "transformer_layers_per_block")
        cross = _per_block(cfg.cross_attention_dim, n, "cross_attention_dim")
    blocks = []
    out_ch = chans[0]
    for i, kind in enumerate(cfg.down_block_types):
        in_ch, out_ch = out_ch, chans[i]
        if kind == "AttnDownBlock2D":
            attn = _spatial_attn(cfg, head_arg[i], cfg.norm_num_groups)
        elif kind == "CrossAttnDownBlock2D":
            attn = _cross_attn(cfg, head_arg[i], cross[i], tlayers[i])
        else:
            attn = None
        blocks.append(
            DownBlock(
                in_ch,
                out_ch,
                temb,
                layers[i],
                i < n - 1,
                cfg.norm_num_groups,
                cfg.norm_eps,
                cfg.dropout,
                shift,
                cfg.downsample_padding,
                attn,
            )
        )
    owner.down_blocks = ModuleList(blocks)

    ch = chans[-1]
    mid_layers = 1
    if cfg.mid_block_type == "UNetMidBlock2DCrossAttn":
        attn = _cross_attn(cfg, head_arg[-1], cross[-1], tlayers[-1])
    elif isinstance(cfg, UNetConfig) and cfg.class_name == UNET2D:  # UNetMidBlock2D, optional self-attention
        groups = cfg.attn_norm_num_groups
        if groups is None:
            groups = cfg.norm_num_groups if not shift else None  # diffusers: no norm with scale_shift
        attn = (
            _spatial_attn(cfg, head_arg[-1], groups, cfg.mid_block_scale_factor)
            if cfg.add_attention
            else None
        )
    else:  # UNetMidBlock2D in a conditional model: a single resnet
        attn, mid_layers = None, 0
    owner.mid_block = MidBlock(
        ch,
        temb,
        mid_layers,
        cfg.norm_num_groups,
        cfg.norm_eps,
        cfg.dropout,
        shift,
        cfg.mid_block_scale_factor,
        attn,
    )


def run_encoder(
    owner: Encoder, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """conv_in + down blocks: x (B, Cin, H, W) -> (h, skips: conv_in out, then one per resnet/downsample)."""
    h = owner.conv_in(x)
    skips = [h]
    for block in owner.down_blocks:
        h, res = block(h, emb, context)
        skips.extend(res)
    return h, skips


class UNet(nn.Module):
    """Diffusion U-Net with diffusers' UNet2DModel / UNet2DConditionModel structure and parameter names."""

    # made by build_encoder / attach_time_embedding (the Encoder protocol)
    conv_in: nn.Conv2d
    time_proj: Timesteps
    time_embedding: TimestepEmbedding
    class_embedding: nn.Embedding | None
    down_blocks: ModuleList[DownBlock]
    mid_block: MidBlock
    attention_backend: str  # set by model.loading: the attention backend chosen at load time

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = config
        cfg = config
        n = _n_blocks(cfg)
        build_encoder(self, cfg)
        # UNetConfig.__post_init__ fills these with the class defaults
        assert cfg.block_out_channels is not None and cfg.up_block_types is not None
        assert cfg.out_channels is not None
        temb = time_embed_dim(cfg)
        shift = cfg.resnet_time_scale_shift == "scale_shift"
        rev = list(reversed(cfg.block_out_channels))
        layers = list(reversed(_per_block(cfg.layers_per_block, n, "layers_per_block")))
        head_arg = _per_block(cfg.attention_head_dim, n, "attention_head_dim")
        if cfg.has_cross_attention:
            tlayers = list(
                reversed(_per_block(cfg.transformer_layers_per_block, n, "transformer_layers_per_block"))
            )
            cross = list(reversed(_per_block(cfg.cross_attention_dim, n, "cross_attention_dim")))
        blocks = []
        out_ch = rev[0]
        for i, kind in enumerate(cfg.up_block_types):
            prev_ch, out_ch, in_ch = out_ch, rev[i], rev[min(i + 1, n - 1)]
            if kind == "AttnUpBlock2D":
                attn = _spatial_attn(cfg, head_arg[i], cfg.norm_num_groups)  # diffusers: not reversed
            elif kind == "CrossAttnUpBlock2D":
                attn = _cross_attn(cfg, list(reversed(head_arg))[i], cross[i], tlayers[i])
            else:
                attn = None
            blocks.append(
                UpBlock(
                    in_ch,
                    prev_ch,
                    out_ch,
                    temb,
                    layers[i] + 1,
                    i < n - 1,
                    cfg.norm_num_groups,
                    cfg.norm_eps,
                    cfg.dropout,
                    shift,
                    attn,
                )
            )
        self.up_blocks = ModuleList(blocks)
        ch0 = cfg.block_out_channels[0]
        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, ch0, eps=cfg.norm_eps)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(
            ch0, cfg.out_channels, cfg.conv_out_kernel, padding=(cfg.conv_out_kernel - 1) // 2
        )
        # Skips each up block consumes, and the index of the skip whose size its upsampler must produce.
        self._up_sizes: list[int | None] = []
        remaining = 1 + sum(len(b.resnets) + (b.downsamplers is not None) for b in self.down_blocks)
        for b in self.up_blocks:
            remaining -= len(b.resnets)
            self._up_sizes.append(remaining - 1 if b.upsamplers is not None else None)

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
        class_labels: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        control: ControlResiduals | None = None,
        added_cond: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """x (B, C, H, W); t (B,) per-row timesteps (scalar broadcast); class_labels (B,) long;
        context (B, L, D) for cross-attention models; control: ControlNet residuals; added_cond (SDXL):
        {"text_embeds": (B, P), "time_ids": (B, 6)}. -> (B, C_out, H, W)."""
        if self.config.has_cross_attention:
            if context is None:
                raise ValueError("UNet2DConditionModel needs context (B, L, cross_attention_dim)")
        elif context is not None:
            raise ValueError("this UNet has no cross-attention; context must be None")
        if self.config.center_input_sample:
            x = 2 * x - 1.0
        emb = embed_conditioning(self, x, t, class_labels, added_cond)  # (B, T)
        h, skips = run_encoder(self, x, emb, context)
        if control is not None:
            skips = [s + r for s, r in zip(skips, control.down, strict=True)]
        h = self.mid_block(h, emb, context)
        if control is not None:
            h = h + control.mid
        end = len(skips)
        for block, size_idx in zip(self.up_blocks, self._up_sizes, strict=True):
            start = end - len(block.resnets)
            size = skips[size_idx].shape[-2:] if size_idx is not None else None
            h = block(h, skips[start:end], emb, context, size)
            end = start
        return self.conv_out(self.conv_act(self.conv_norm_out(h)))
