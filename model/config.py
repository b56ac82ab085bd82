"""Model configs: frozen dataclasses whose field names are diffusers' config.json names.

`UNetConfig` covers diffusers `UNet2DModel` (pixel U-Net, optional class labels) and
`UNet2DConditionModel` (cross-attention to a context sequence); `ControlNetConfig` covers `ControlNetModel`;
`VAEConfig` covers `AutoencoderKL` (the latent autoencoder of Stable Diffusion pipelines).
`from_dict` reads a diffusers config.json dict (missing keys take that class's diffusers default) and
rejects what we do not implement with an error naming the field; `to_dict` writes one diffusers loads.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

UNET2D = "UNet2DModel"
UNET2D_COND = "UNet2DConditionModel"
CONTROLNET = "ControlNetModel"

# Block types per class (the only ones implemented).
DOWN_BLOCKS = {
    UNET2D: ("DownBlock2D", "AttnDownBlock2D"),
    UNET2D_COND: ("DownBlock2D", "CrossAttnDownBlock2D"),
    CONTROLNET: ("DownBlock2D", "CrossAttnDownBlock2D"),
}
UP_BLOCKS = {
    UNET2D: ("UpBlock2D", "AttnUpBlock2D"),
    UNET2D_COND: ("UpBlock2D", "CrossAttnUpBlock2D"),
}
MID_BLOCKS = {
    UNET2D: ("UNetMidBlock2D",),
    UNET2D_COND: ("UNetMidBlock2DCrossAttn", "UNetMidBlock2D"),
    CONTROLNET: ("UNetMidBlock2DCrossAttn", "UNetMidBlock2D"),
}

# diffusers defaults that differ between the two U-Net classes; a UNetConfig field left at None gets these.
_UNET_CLASS_DEFAULTS: dict[str, dict[str, Any]] = {
    UNET2D: {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        "mid_block_type": "UNetMidBlock2D",
        "up_block_types": ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        "block_out_channels": (224, 448, 672, 896),
    },
    UNET2D_COND: {
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": (
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "DownBlock2D",
        ),
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        "block_out_channels": (320, 640, 1280, 1280),
        "cross_attention_dim": 1280,
    },
}

# Fields that exist only in one U-Net class (written by to_dict only for that class).
_UNET2D_ONLY = {"attn_norm_num_groups", "add_attention", "num_train_timesteps"}
_UNET2D_COND_ONLY = {
    "cross_attention_dim",
    "transformer_layers_per_block",
    "use_linear_projection",
    "upcast_attention",
    "conv_in_kernel",
    "conv_out_kernel",
    "addition_embed_type",
    "addition_time_embed_dim",
    "projection_class_embeddings_input_dim",
}

# diffusers fields we accept only at their default value (the feature is not implemented).
_FIXED: dict[str, Any] = {
    "time_embedding_type": "positional",
    "class_embed_type": None,
    "downsample_type": "conv",
    "upsample_type": "conv",
    "only_cross_attention": False,
    "reverse_transformer_layers_per_block": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "num_attention_heads": None,
    "dual_cross_attention": False,
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "attention_type": "default",
    "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None,
    "cross_attention_norm": None,
    "global_pool_conditions": False,
}
# diffusers fields that have no effect on what we implement.
_IGNORED = {"addition_embed_type_num_heads"}

_ACT_FNS = ("silu", "swish")
# addition_embed_type values implemented: SDXL's micro-conditioning (pooled text + size/crop time ids)
TEXT_TIME = "text_time"
_ADDITION_EMBED_TYPES = (None, TEXT_TIME)
_TIME_SHIFTS = ("default", "scale_shift")


def _tuple(v: Any) -> Any:
    """JSON lists -> tuples (frozen, hashable); scalars unchanged."""
    return tuple(v) if isinstance(v, list) else v


def _per_block(v: Any, n: int, name: str) -> tuple:
    """An int-or-tuple diffusers field expanded to one value per block."""
    if isinstance(v, tuple):
        if len(v) != n:
            raise ValueError(f"{name} has {len(v)} entries but there are {n} down blocks")
        return v
    return (v,) * n


def _check_common(cfg: Any, class_name: str) -> None:
    """Validation shared by UNetConfig and ControlNetConfig; errors name the field."""
    downs = DOWN_BLOCKS[class_name]
    for b in cfg.down_block_types:
        if b not in downs:
            raise ValueError(
                f"unsupported down block type {b!r} in down_block_types for {class_name}; "
                f"supported: {', '.join(downs)}"
            )
    if cfg.mid_block_type not in MID_BLOCKS[class_name]:
        raise ValueError(
            f"unsupported mid_block_type {cfg.mid_block_type!r} for {class_name}; "
            f"supported: {', '.join(MID_BLOCKS[class_name])}"
        )
    if len(cfg.block_out_channels) != len(cfg.down_block_types):
        raise ValueError(
            f"block_out_channels has {len(cfg.block_out_channels)} entries but down_block_types "
            f"has {len(cfg.down_block_types)}"
        )
    if cfg.act_fn not in _ACT_FNS:
        raise ValueError(f"unsupported act_fn {cfg.act_fn!r}; supported: {', '.join(_ACT_FNS)}")
    if cfg.resnet_time_scale_shift not in _TIME_SHIFTS:
        raise ValueError(
            f"unsupported resnet_time_scale_shift {cfg.resnet_time_scale_shift!r}; "
            f"supported: {', '.join(_TIME_SHIFTS)}"
        )
    if cfg.norm_num_groups is None:
        raise ValueError("norm_num_groups=None is not supported")
    if cfg.num_class_embeds is not None and cfg.num_class_embeds < 1:
        raise ValueError(f"num_class_embeds must be positive, got {cfg.num_class_embeds}")
    if cfg.downsample_padding not in (0, 1):
        raise ValueError(f"unsupported downsample_padding {cfg.downsample_padding}; supported: 0, 1")
    _check_addition_embed(cfg)


def _check_addition_embed(cfg: Any) -> None:
    """SDXL's text_time embedding needs both of its widths; other addition_embed_type values are refused."""
    kind = getattr(cfg, "addition_embed_type", None)
    if kind not in _ADDITION_EMBED_TYPES:
        raise ValueError(
            f"addition_embed_type={kind!r} is not supported (only {TEXT_TIME!r}, SDXL's, is implemented)"
        )
    if kind == TEXT_TIME:
        for name in ("addition_time_embed_dim", "projection_class_embeddings_input_dim"):
            v = getattr(cfg, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"addition_embed_type='text_time' needs a positive int {name}, got {v!r}")


def _split_dict(d: dict[str, Any], known: set[str], class_name: str) -> dict[str, Any]:
    """Keep known fields; check fixed ones are at their default; drop bookkeeping keys."""
    kwargs: dict[str, Any] = {}
    for k, v in d.items():
        if k.startswith("_") or k in _IGNORED:
            continue
        v = _tuple(v)
        if k in known:
            kwargs[k] = v
        elif k in _FIXED:
            # per-block lists (only_cross_attention: [false, false, ...]) at the default everywhere are fine
            if v != _FIXED[k] and not (isinstance(v, tuple) and v and all(x == _FIXED[k] for x in v)):
                raise ValueError(
                    f"{class_name} config field {k}={v!r} is not supported "
                    f"(only {_FIXED[k]!r} is implemented)"
                )
        else:
            raise ValueError(f"unknown {class_name} config field {k!r}")
    return kwargs


@dataclass(frozen=True)
class UNetConfig:
    """A diffusers `UNet2DModel` or `UNet2DConditionModel` config (field names as in config.json).

    Fields left at None take the diffusers default of `class_name`.
    """

    class_name: str = UNET2D_COND  # diffusers `_class_name`: UNet2DModel or UNet2DConditionModel
    sample_size: int | None = None  # training resolution (metadata; the model takes any multiple of 2^depth)
    in_channels: int | None = None  # channels of x (3 / 4 by class when None)
    out_channels: int | None = None  # channels of the prediction
    center_input_sample: bool = False  # map x from [0, 1] to [-1, 1] first
    flip_sin_to_cos: bool = True  # timestep embedding order: cos first when True
    freq_shift: int = 0  # timestep embedding frequency denominator is half_dim - freq_shift
    time_embedding_dim: int | None = None  # width of the time embedding (None: 4 * block_out_channels[0])
    down_block_types: tuple[str, ...] | None = None  # encoder blocks, one per resolution
    mid_block_type: str | None = None  # bottleneck block
    up_block_types: tuple[str, ...] | None = None  # decoder blocks, one per resolution
    block_out_channels: tuple[int, ...] | None = None  # channels per resolution
    layers_per_block: int | tuple[int, ...] = 2  # resnets per down block (up blocks have one more)
    mid_block_scale_factor: float = 1.0  # output_scale_factor of the mid block's resnets/attention
    downsample_padding: int = 1  # padding of the stride-2 downsampling conv (0: pad right/bottom)
    dropout: float = 0.0  # dropout inside resnets (train only)
    act_fn: str = "silu"  # nonlinearity (silu only)
    norm_num_groups: int = 32  # GroupNorm groups in resnets, attention and the output norm
    norm_eps: float = 1e-5  # GroupNorm epsilon
    resnet_time_scale_shift: str = "default"  # "default": add time emb; "scale_shift": AdaGN h*(1+s)+b
    attention_head_dim: int | tuple[int, ...] | None = 8  # UNet2DModel: per-head dim; Condition: head count
    num_class_embeds: int | None = None  # rows of the class embedding (incl. a null row for CFG), None = none
    # UNet2DModel only
    attn_norm_num_groups: int | None = None  # GroupNorm groups of the mid attention (None: diffusers rule)
    add_attention: bool = True  # self-attention in the mid block
    num_train_timesteps: int | None = None  # metadata only (diffusers uses it for "learned" embeddings)
    # UNet2DConditionModel only
    cross_attention_dim: int | tuple[int, ...] | None = None  # width of the context tokens (1280 default)
    transformer_layers_per_block: int | tuple[int, ...] = 1  # transformer blocks per attention
    use_linear_projection: bool = False  # proj_in/proj_out as Linear (True) or 1x1 Conv (False)
    upcast_attention: bool = False  # compute attention in fp32
    conv_in_kernel: int = 3  # kernel of conv_in
    conv_out_kernel: int = 3  # kernel of conv_out
    addition_embed_type: str | None = None  # "text_time": SDXL micro-conditioning added to the time embedding
    addition_time_embed_dim: int | None = None  # sinusoid width per time id (SDXL: 256)
    projection_class_embeddings_input_dim: int | None = None  # add_embedding input: pooled text + time ids

    def __post_init__(self) -> None:
        if self.class_name not in _UNET_CLASS_DEFAULTS:
            raise ValueError(
                f"unsupported model class {self.class_name!r}; supported: {UNET2D}, {UNET2D_COND}"
            )
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _tuple(getattr(self, f.name)))
        if self.upcast_attention is None:  # SDXL's config.json says null: diffusers reads it as False
            object.__setattr__(self, "upcast_attention", False)
        for k, v in _UNET_CLASS_DEFAULTS[self.class_name].items():
            if getattr(self, k) is None:
                object.__setattr__(self, k, v)
        assert self.up_block_types is not None and self.down_block_types is not None  # class defaults
        _check_common(self, self.class_name)
        ups = UP_BLOCKS[self.class_name]
        for b in self.up_block_types:
            if b not in ups:
                raise ValueError(
                    f"unsupported up block type {b!r} in up_block_types for {self.class_name}; "
                    f"supported: {', '.join(ups)}"
                )
        if len(self.up_block_types) != len(self.down_block_types):
            raise ValueError("down_block_types and up_block_types must have the same length")
        n = len(self.down_block_types)
        for name in (
            "layers_per_block",
            "attention_head_dim",
            "transformer_layers_per_block",
            "cross_attention_dim",
        ):
            _per_block(getattr(self, name), n, name)
        if self.class_name == UNET2D:
            if isinstance(self.layers_per_block, tuple) or isinstance(self.attention_head_dim, tuple):
                raise ValueError("UNet2DModel takes an int layers_per_block and attention_head_dim")
        elif None in _per_block(self.attention_head_dim, n, "attention_head_dim"):
            raise ValueError("UNet2DConditionModel needs attention_head_dim (the number of heads per block)")

    @property
    def has_cross_attention(self) -> bool:
        """True for UNet2DConditionModel (takes `context`)."""
        return self.class_name == UNET2D_COND

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> UNetConfig:
        """Read a diffusers config.json dict; `_class_name` picks the class (inferred when absent)."""
        class_name = d.get("_class_name")
        if class_name is None:
            cross = "cross_attention_dim" in d or any("CrossAttn" in b for b in d.get("down_block_types", ()))
            class_name = UNET2D_COND if cross else UNET2D
        if class_name not in _UNET_CLASS_DEFAULTS:
            raise ValueError(f"unsupported model class {class_name!r}; supported: {UNET2D}, {UNET2D_COND}")
        if "mid_block_type" in d and d["mid_block_type"] is None:
            raise ValueError("mid_block_type=None (no mid block) is not supported")
        known = {f.name for f in dataclasses.fields(cls)} - {"class_name"}
        other_only = _UNET2D_COND_ONLY if class_name == UNET2D else _UNET2D_ONLY
        return cls(class_name=class_name, **_split_dict(d, known - other_only, class_name))

    def to_dict(self) -> dict[str, Any]:
        """A diffusers config.json dict (with `_class_name`)."""
        skip = _UNET2D_COND_ONLY if self.class_name == UNET2D else _UNET2D_ONLY
        out: dict[str, Any] = {"_class_name": self.class_name}
        for f in dataclasses.fields(self):
            if f.name != "class_name" and f.name not in skip:
                v = getattr(self, f.name)
                out[f.name] = list(v) if isinstance(v, tuple) else v
        return out


@dataclass(frozen=True)
class ControlNetConfig:
    """A diffusers `ControlNetModel` config: a copy of a UNet2DConditionModel encoder plus a cond embedder."""

    in_channels: int = 4  # channels of x (same as the base U-Net)
    conditioning_channels: int = 3  # channels of the control image (1 for edge maps)
    flip_sin_to_cos: bool = True  # timestep embedding order: cos first when True
    freq_shift: int = 0  # timestep embedding frequency denominator is half_dim - freq_shift
    down_block_types: tuple[str, ...] = (  # encoder blocks, one per resolution
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    )
    mid_block_type: str = "UNetMidBlock2DCrossAttn"  # bottleneck block
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)  # channels per resolution
    layers_per_block: int = 2  # resnets per down block
    downsample_padding: int = 1  # padding of the stride-2 downsampling conv
    mid_block_scale_factor: float = 1.0  # output_scale_factor of the mid block
    act_fn: str = "silu"  # nonlinearity (silu only)
    norm_num_groups: int = 32  # GroupNorm groups
    norm_eps: float = 1e-5  # GroupNorm epsilon
    cross_attention_dim: int = 1280  # width of the context tokens
    transformer_layers_per_block: int | tuple[int, ...] = 1  # transformer blocks per attention
    attention_head_dim: int | tuple[int, ...] = 8  # number of heads per block (diffusers naming)
    use_linear_projection: bool = False  # proj_in/proj_out as Linear (True) or 1x1 Conv (False)
    num_class_embeds: int | None = None  # rows of the class embedding (None = no class conditioning)
    upcast_attention: bool = False  # compute attention in fp32
    resnet_time_scale_shift: str = "default"  # "default" additive or "scale_shift" (AdaGN)
    controlnet_conditioning_channel_order: str = "rgb"  # "bgr" flips the cond channels first
    conditioning_embedding_out_channels: tuple[int, ...] = field(  # cond embedder conv widths
        default=(16, 32, 96, 256)
    )
    addition_embed_type: str | None = None  # "text_time": SDXL micro-conditioning (as the base U-Net)
    addition_time_embed_dim: int | None = None  # sinusoid width per time id (SDXL: 256)
    projection_class_embeddings_input_dim: int | None = None  # add_embedding input: pooled text + time ids

    class_name = CONTROLNET  # not a field: the diffusers class is fixed
    dropout = 0.0  # ControlNetModel has no dropout
    time_embedding_dim = None  # always 4 * block_out_channels[0]

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _tuple(getattr(self, f.name)))
        if self.upcast_attention is None:  # SDXL ControlNet configs say null: diffusers reads it as False
            object.__setattr__(self, "upcast_attention", False)
        _check_common(self, CONTROLNET)
        if self.controlnet_conditioning_channel_order not in ("rgb", "bgr"):
            raise ValueError("controlnet_conditioning_channel_order must be 'rgb' or 'bgr'")
        n = len(self.down_block_types)
        for name in ("attention_head_dim", "transformer_layers_per_block"):
            _per_block(getattr(self, name), n, name)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ControlNetConfig:
        """Read a diffusers ControlNetModel config.json dict."""
        class_name = d.get("_class_name", CONTROLNET)
        if class_name != CONTROLNET:
            raise ValueError(f"expected a {CONTROLNET} config, got _class_name={class_name!r}")
        if "mid_block_type" in d and d["mid_block_type"] is None:
            raise ValueError("mid_block_type=None (no mid block) is not supported")
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**_split_dict(d, known, CONTROLNET))

    @classmethod
    def from_unet_config(
        cls,
        unet: UNetConfig,
        conditioning_channels: int = 3,
        conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256),
    ) -> ControlNetConfig:
        """The ControlNet config matching a UNet2DConditionModel config (as diffusers' `from_unet`)."""
        if unet.class_name != UNET2D_COND:
            raise ValueError("a ControlNet needs a UNet2DConditionModel base")
        if isinstance(unet.layers_per_block, tuple) or isinstance(unet.cross_attention_dim, tuple):
            raise ValueError("ControlNetModel takes an int layers_per_block and cross_attention_dim")
        # __post_init__ filled these with the UNet2DConditionModel defaults (and checked attention_head_dim)
        assert unet.in_channels is not None and unet.block_out_channels is not None
        assert unet.down_block_types is not None and unet.mid_block_type is not None
        assert unet.cross_attention_dim is not None and unet.attention_head_dim is not None
        return cls(
            in_channels=unet.in_channels,
            conditioning_channels=conditioning_channels,
            flip_sin_to_cos=unet.flip_sin_to_cos,
            freq_shift=unet.freq_shift,
            down_block_types=unet.down_block_types,
            mid_block_type=unet.mid_block_type,
            block_out_channels=unet.block_out_channels,
            layers_per_block=unet.layers_per_block,
            downsample_padding=unet.downsample_padding,
            mid_block_scale_factor=unet.mid_block_scale_factor,
            act_fn=unet.act_fn,
            norm_num_groups=unet.norm_num_groups,
            norm_eps=unet.norm_eps,
            cross_attention_dim=unet.cross_attention_dim,
            transformer_layers_per_block=unet.transformer_layers_per_block,
            attention_head_dim=unet.attention_head_dim,
            use_linear_projection=unet.use_linear_projection,
            num_class_embeds=unet.num_class_embeds,
            upcast_attention=unet.upcast_attention,
            resnet_time_scale_shift=unet.resnet_time_scale_shift,
            conditioning_embedding_out_channels=conditioning_embedding_out_channels,
            addition_embed_type=unet.addition_embed_type,
            addition_time_embed_dim=unet.addition_time_embed_dim,
            projection_class_embeddings_input_dim=unet.projection_class_embeddings_input_dim,
        )

    def to_dict(self) -> dict[str, Any]:
        """A diffusers config.json dict (with `_class_name`)."""
        out: dict[str, Any] = {"_class_name": CONTROLNET}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out


AUTOENCODER_KL = "AutoencoderKL"


@dataclass(frozen=True)
class VAEConfig:
    """A diffusers `AutoencoderKL` config (vae/config.json of a Stable Diffusion pipeline folder).

    Latent convention (as diffusers' pipelines): the U-Net samples latents z_u = (z - shift_factor) *
    scaling_factor, where z is the autoencoder's latent; decoding undoes it first.
    """

    in_channels: int = 3  # image channels into the encoder
    out_channels: int = 3  # image channels out of the decoder
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)  # encoder blocks, one per resolution
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)  # decoder blocks, one per resolution
    block_out_channels: tuple[int, ...] = (64,)  # channels per resolution (encoder order)
    layers_per_block: int = 1  # resnets per encoder block (decoder blocks have one more)
    act_fn: str = "silu"  # nonlinearity (silu only)
    latent_channels: int = 4  # channels of z
    norm_num_groups: int = 32  # GroupNorm groups everywhere (eps is fixed at 1e-6, as diffusers)
    sample_size: int | tuple[int, ...] = 32  # training image size (diffusers' tiling threshold; metadata)
    scaling_factor: float = 0.18215  # latents the U-Net sees are (z - shift_factor) * scaling_factor
    shift_factor: float | None = None  # None = 0 (SD 1.x/2.x); SD3/Flux VAEs set it
    latents_mean: tuple[float, ...] | None = None  # SDXL-style per-channel stats (metadata: not applied)
    latents_std: tuple[float, ...] | None = None  # (StableDiffusionPipeline ignores them too)
    force_upcast: bool = True  # the VAE overflows in fp16: run it in fp32 (diffusers' flag)
    use_quant_conv: bool = True  # 1x1 conv on the encoder's moments
    use_post_quant_conv: bool = True  # 1x1 conv on z before the decoder
    mid_block_add_attention: bool = True  # self-attention in both mid blocks

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _tuple(getattr(self, f.name)))
        for b in self.down_block_types:
            if b != "DownEncoderBlock2D":
                raise ValueError(
                    f"unsupported down block type {b!r} in {AUTOENCODER_KL} down_block_types; "
                    "supported: DownEncoderBlock2D"
                )
        for b in self.up_block_types:
            if b != "UpDecoderBlock2D":
                raise ValueError(
                    f"unsupported up block type {b!r} in {AUTOENCODER_KL} up_block_types; "
                    "supported: UpDecoderBlock2D"
                )
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError(
                f"{AUTOENCODER_KL}: down_block_types ({len(self.down_block_types)}), up_block_types "
                f"({len(self.up_block_types)}) and block_out_channels ({n}) must have the same length"
            )
        if self.act_fn not in _ACT_FNS:
            raise ValueError(f"unsupported act_fn {self.act_fn!r}; supported: {', '.join(_ACT_FNS)}")
        if not self.scaling_factor > 0:
            raise ValueError(f"scaling_factor must be positive, got {self.scaling_factor}")

    @property
    def scale_factor(self) -> int:
        """Image pixels per latent pixel along each side (8 for SD: three downsamplings)."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VAEConfig:
        """Read a diffusers AutoencoderKL config.json dict; unknown fields are an error naming them."""
        class_name = d.get("_class_name", AUTOENCODER_KL)
        if class_name != AUTOENCODER_KL:
            raise ValueError(f"unsupported VAE class {class_name!r}; supported: {AUTOENCODER_KL}")
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for k, v in d.items():
            if k.startswith("_"):
                continue
            if k not in known:
                raise ValueError(f"unknown {AUTOENCODER_KL} config field {k!r}")
            kwargs[k] = v
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """A diffusers config.json dict (with `_class_name`)."""
        out: dict[str, Any] = {"_class_name": AUTOENCODER_KL}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out
