"""The latent autoencoder of Stable Diffusion: diffusers `AutoencoderKL` (same keys), built from our blocks.

Images live in [-1, 1] (B, 3, H, W); the U-Net samples latents (B, 4, H/8, W/8) in diffusers' scaled
convention  z_u = (z - shift_factor) * scaling_factor  (shift 0 for SD 1.x/2.x, scaling 0.18215 for SD).
`decode` and `encode` take and return those scaled latents, so a sampler's output goes straight in.

    encoder: conv_in, DownEncoderBlock2D x n (resnets, stride-2 conv with right/bottom padding),
             mid block (resnet, self-attention, resnet), GroupNorm-SiLU-conv_out -> 2 * latent channels
    quant_conv (1x1) -> (mean, logvar)          post_quant_conv (1x1) -> decoder
    decoder: conv_in, mid block, UpDecoderBlock2D x n (layers_per_block + 1 resnets, nearest 2x + conv),
             GroupNorm-SiLU-conv_out -> image
"""

from __future__ import annotations

import torch
from torch import nn

from model.attention import SpatialSelfAttention
from model.blocks import DownBlock, MidBlock, ResnetBlock2D, Upsample2D
from model.config import VAEConfig
from model.noise import RequestNoise, draw_step_noise

EPS = 1e-6  # diffusers hard-codes the VAE's GroupNorm epsilon


def _mid_block(cfg: VAEConfig, ch: int) -> MidBlock:
    """UNetMidBlock2D without time embedding: resnet, one-head self-attention over all channels, resnet."""
    attn = None
    if cfg.mid_block_add_attention:

        def attn(c: int) -> nn.Module:
            return SpatialSelfAttention(c, 1, c, cfg.norm_num_groups, EPS)

    return MidBlock(ch, None, 1, cfg.norm_num_groups, EPS, 0.0, False, 1.0, attn)


class UpDecoderBlock(nn.Module):
    """diffusers UpDecoderBlock2D: resnets (no skips, no time embedding), then an optional 2x upsampler.

    (B, Cin, H, W) -> (B, Cout, 2H, 2W) (or (B, Cout, H, W) for the last block).
    """

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, add_upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            [
                ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, None, groups, EPS)
                for i in range(num_layers)
            ]
        )
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)]) if add_upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x, None)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class Encoder(nn.Module):
    """Image (B, Cin, H, W) -> moments (B, 2 * latent_channels, H / f, W / f) (before quant_conv)."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        chans = cfg.block_out_channels
        self.conv_in = nn.Conv2d(cfg.in_channels, chans[0], 3, padding=1)
        blocks, out_ch = [], chans[0]
        for i in range(len(chans)):
            in_ch, out_ch = out_ch, chans[i]
            last = i == len(chans) - 1
            # downsample_padding=0: the stride-2 conv pads right/bottom only, as diffusers' VAE
            blocks.append(
                DownBlock(
                    in_ch, out_ch, None, cfg.layers_per_block, not last, cfg.norm_num_groups, EPS,
                    dropout=0.0, scale_shift=False, downsample_padding=0,
                )
            )
        self.down_blocks = nn.ModuleList(blocks)
        self.mid_block = _mid_block(cfg, chans[-1])
        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, chans[-1], eps=EPS)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(chans[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for block in self.down_blocks:
            h, _ = block(h, None)
        h = self.mid_block(h, None)
        return self.conv_out(self.conv_act(self.conv_norm_out(h)))


class Decoder(nn.Module):
    """Latent z (B, latent_channels, h, w) (after post_quant_conv) -> image (B, Cout, h * f, w * f)."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        chans = cfg.block_out_channels
        rev = list(reversed(chans))
        self.conv_in = nn.Conv2d(cfg.latent_channels, rev[0], 3, padding=1)
        self.mid_block = _mid_block(cfg, rev[0])
        blocks, out_ch = [], rev[0]
        for i in range(len(rev)):
            in_ch, out_ch = out_ch, rev[i]
            blocks.append(
                UpDecoderBlock(in_ch, out_ch, cfg.layers_per_block + 1, cfg.norm_num_groups, i < len(rev) - 1)
            )
        self.up_blocks = nn.ModuleList(blocks)
        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, chans[0], eps=EPS)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(chans[0], cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid_block(self.conv_in(z), None)
        for block in self.up_blocks:
            h = block(h)
        return self.conv_out(self.conv_act(self.conv_norm_out(h)))


class AutoencoderKL(nn.Module):
    """diffusers AutoencoderKL (parameter names identical). Load a folder with `model.loading.load_vae`.

    Public API (scaled latents, see the module docstring):
      decode(latents (B, C_lat, h, w)) -> images (B, C_img, h * f, w * f), nominally in [-1, 1] (not clamped)
      encode(images (B, C_img, H, W) in [-1, 1], generator=None) -> latents (B, C_lat, H / f, W / f)
      posterior(images) -> (mean, logvar) of the unscaled latent, each (B, C_lat, H / f, W / f)
    f = `scale_factor` (8 for SD). Inputs are cast to the module's dtype; outputs are in the module's dtype.
    """

    attention_backend: str  # set by model.loading: the attention backend chosen at load time

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        c = config.latent_channels
        self.quant_conv = nn.Conv2d(2 * c, 2 * c, 1) if config.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(c, c, 1) if config.use_post_quant_conv else None

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.conv_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.decoder.conv_in.weight.device

    @property
    def scale_factor(self) -> int:
        """Image pixels per latent pixel along each side (8 for SD)."""
        return self.config.scale_factor

    @property
    def latent_channels(self) -> int:
        return self.config.latent_channels

    @property
    def scaling_factor(self) -> float:
        return self.config.scaling_factor

    @property
    def shift_factor(self) -> float:
        return self.config.shift_factor or 0.0

    def posterior(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Diagonal Gaussian q(z | x): images (B, C_img, H, W) -> (mean, logvar), each (B, C_lat, H/f, W/f).

        logvar is clamped to [-30, 20] as diffusers' DiagonalGaussianDistribution does.
        """
        moments = self.encoder(images.to(self.dtype))  # (B, 2 * C_lat, H/f, W/f)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def encode(
        self, images: torch.Tensor, generator: torch.Generator | RequestNoise | None = None
    ) -> torch.Tensor:
        """Scaled latents (B, C_lat, H/f, W/f) for images (B, C_img, H, W) in [-1, 1].

        With a generator (CPU torch.Generator or a request's RequestNoise) z is sampled from the posterior,
        z = mean + std * ε with ε drawn in fp32 (as diffusers' `latent_dist.sample(generator)`); without one
        z is the posterior mean (diffusers' sample_mode="argmax").
        Returns (z - shift_factor) * scaling_factor.
        """
        mean, logvar = self.posterior(images)
        z = mean
        if generator is not None:
            eps = draw_step_noise(generator, mean).to(mean.dtype)  # (B, C_lat, h, w), drawn in fp32
            z = mean + torch.exp(0.5 * logvar) * eps
        return (z - self.shift_factor) * self.scaling_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images (B, C_img, h*f, w*f), nominally in [-1, 1] (not clamped), from latents (B, C_lat, h, w).

        Applies z = latents / scaling_factor + shift_factor first (diffusers' pipelines do this before
        `vae.decode`). Map to 8-bit as the pipelines do: ((x / 2 + 0.5).clamp(0, 1) * 255).round().
        """
        z = latents.to(self.dtype) / self.scaling_factor + self.shift_factor
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def decode_sliced(self, latents: torch.Tensor, max_rows: int) -> torch.Tensor:
        """`decode` in slices of at most `max_rows` rows (bounds activation memory; same result within float
        rounding: CPU conv kernels may differ by batch size)."""
        if latents.shape[0] <= max_rows:
            return self.decode(latents)
        return torch.cat([self.decode(part) for part in latents.split(max_rows)])  # (B, C_img, H, W)

    def forward(
        self, images: torch.Tensor, generator: torch.Generator | RequestNoise | None = None
    ) -> torch.Tensor:
        """Reconstruction: decode(encode(images, generator)) (B, C_img, H, W)."""
        return self.decode(self.encode(images, generator))
