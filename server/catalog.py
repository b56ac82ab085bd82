"""Models and samplers as clients see them (/v1/models, /v1/samplers), built from loaded pipelines.

Pydantic only, no web framework: the engine process describes what it loaded with these and sends them to
the server process (``server.loading.LoadInfo``).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field


class ClassInfo(BaseModel):
    index: int
    name: str


class ControlInfo(BaseModel):
    type: str
    channels: int
    controlnets: list[str] | None = Field(
        None, description="SD models: the ControlNets a request can name in `controlnets` (type controlnet)."
    )


class Conditioning(BaseModel):
    classes: list[ClassInfo] | None = Field(None, description="Class labels accepted (class models).")
    text: bool = Field(False, description="Whether a text prompt is accepted.")
    control: ControlInfo | None = Field(None, description="Control map accepted (ControlNet models).")
    size_conditioning: bool = Field(
        False, description="SDXL micro-conditioning accepted (original_size, crops_coords_top_left, "
        "target_size).",
    )


class ModelDefaults(BaseModel):
    sampler: str
    num_inference_steps: int
    guidance_scale: float
    width: int
    height: int


class ModelSpec(BaseModel):
    """A loaded model as /v1/models reports it (OpenAI-style list entry plus our fields)."""

    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "unet-server"
    kind: Literal["class", "text"]
    schedule: Literal["vp", "flow"] = Field(description="noise schedule family (decides the samplers)")
    base_model: str | None = None
    image_channels: int
    sample_size: int
    size_multiple: int = Field(description="width and height must be multiples of this")
    inpainting: bool = Field(
        False, description="a 9-channel inpainting U-Net: requests need image and mask_image (other models "
        "take them too, inpainting by masked latent blending)",
    )
    null_class_label: int | None = Field(None, exclude=True)
    conditioning: Conditioning
    defaults: ModelDefaults


class UnavailableModel(BaseModel):
    """A model that did not load (served without it: UNET_SERVER_SKIP_BROKEN_MODELS)."""

    model: str
    error: str = Field(description="Why it did not load.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelSpec]
    unavailable: list[UnavailableModel] = Field(
        default_factory=list, description="Models that failed to load and are not served, with the reason."
    )


class SamplerInfo(BaseModel):
    name: str
    aliases: list[str] = []
    kind: str = Field("ode", description='"ode" (deterministic) or "sde" (stochastic, seeded per request)')
    model_kinds: list[str] = Field(default_factory=list, description="schedules it supports: vp, flow")
    default_spacing: str | None = None
    evaluations_per_step: int = 1
    description: str = ""


class SamplerList(BaseModel):
    data: list[SamplerInfo]



def _inpainting_unet(p: Any) -> bool:
    """A latent model whose U-Net takes more input channels than the latent (mask + masked-image latent)."""
    if getattr(p, "vae", None) is None:
        return False
    return int(p.unet.config.in_channels or 0) > int(p.latent_channels or 0)


def model_spec(p: Any) -> ModelSpec:
    """The public description of a loaded ``model.pipeline.Pipeline``."""
    classes = None
    if p.class_names:
        classes = [ClassInfo(index=i, name=n) for i, n in enumerate(p.class_names)]
    control = None
    if p.control:
        control = ControlInfo(
            type=str(p.control.get("type", "control")),
            channels=int(p.control.get("channels", 1)),
            controlnets=p.control.get("controlnets"),
        )
    d = p.defaults
    return ModelSpec(
        id=p.name,
        kind=p.kind,
        schedule=p.schedule.kind,
        base_model=p.base_model,
        image_channels=p.image_channels,
        sample_size=p.sample_size,
        size_multiple=p.size_multiple,
        inpainting=_inpainting_unet(p),
        null_class_label=p.null_class_label,
        conditioning=Conditioning(
            classes=classes, text=p.kind == "text", control=control,
            size_conditioning=bool(getattr(p, "is_sdxl", False)),
        ),
        defaults=ModelDefaults(
            sampler=d.sampler,
            num_inference_steps=d.num_inference_steps,
            guidance_scale=d.guidance_scale,
            width=d.width,
            height=d.height,
        ),
    )
