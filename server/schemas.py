"""Request/response models and the one place input is validated.

Static bounds live on the pydantic fields; checks that need the loaded models or the configured caps live
in ``resolve_generate`` / ``resolve_openai``. Every failure is a 422 whose ``detail[].loc`` names the field.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from model.strength import INPAINTING_UNET, LATENT_BLEND, strength_start
from server.catalog import (
    ClassInfo,
    Conditioning,
    ControlInfo,
    ModelDefaults,
    ModelList,
    ModelSpec,
    SamplerInfo,
    SamplerList,
)
from server.imaging import (
    ImageDecodeError,
    decode_base64,
    decode_control_image,
    decode_image,
    has_transparency,
    init_image_array,
    mask_array,
)
from server.request import (
    MAX_SEED,
    ControlNetInput,
    LoraRef,
    ResolvedRequest,
    needs_guidance,
    random_seed,
    rows_for,
)
from server.settings import Settings

__all__ = [
    "ClassInfo", "Conditioning", "ControlInfo", "GenerateRequest", "GenerateResponse", "JobError", "JobInfo",
    "ModelDefaults", "ModelList", "ModelSpec", "OpenAIImage", "OpenAIImageRequest", "OpenAIImagesResponse",
    "ResolvedRequest", "SamplerInfo", "SamplerList", "Timings", "ValidationContext", "field_error",
    "resolve_generate", "resolve_openai", "OpenAIEditRequest", "resolve_openai_edit", "echo_input",
    "utf8_text",
]

MAX_PROMPT_CHARS = 2000
MAX_SIZE_CONDITIONING = 16384  # SDXL size/crop conditioning, pixels
SDXL_FIELDS = ("original_size", "crops_coords_top_left", "target_size")
# The caps on steps, images and size are settings, checked in ``resolve_generate`` with a message that names
# the configured cap; the fields carry no static upper bound, which would be the one a user is told first.
STEPS_CAP = "At most UNET_SERVER_MAX_INFERENCE_STEPS (default 200); omitted = the model's default."
IMAGES_CAP = "At most UNET_SERVER_MAX_IMAGES (default 8)."
SIZE_CAP = (
    "A multiple of the model's size_multiple, at most UNET_SERVER_MAX_IMAGE_SIZE (unset: the model's native "
    "size, its sample_size in /v1/models); omitted = the model's default."
)


def utf8_text(value: Any) -> Any:
    """A string with lone surrogates (JSON's "\\ud800" escapes) made UTF-8-encodable (backslash escapes);
    anything else unchanged."""
    return value.encode("utf-8", "backslashreplace").decode() if isinstance(value, str) else value


def echo_input(value: Any) -> Any:
    """``value`` if a 422 can echo it as JSON, else None: NaN, ±Infinity (Python's json reads them) or a lone
    surrogate in the echoed input would make rendering the 422 itself fail, as a 500."""
    try:
        json.dumps(value, allow_nan=False, ensure_ascii=False).encode()
    except (ValueError, TypeError, RecursionError):  # UnicodeEncodeError is a ValueError
        return None
    return value


def json_form_field(v: Any, info: ValidationInfo) -> Any:
    """A list field sent in a multipart form (``controlnets``, ``loras``) arrives as JSON text: parse it."""
    if isinstance(v, str):
        try:
            return json.loads(v)
        except (ValueError, RecursionError):  # RecursionError: nested deeper than the parser goes
            raise ValueError(f"{info.field_name}: not valid JSON") from None
    return v


def field_error(field: str, message: str, value: Any = None) -> RequestValidationError:
    """A 422 for one body field, shaped like FastAPI's own validation errors."""
    # the app's 422 handler makes what is echoed renderable (surrogates escaped, NaN/Infinity dropped)
    return RequestValidationError(
        [{"type": "value_error", "loc": ("body", field), "msg": f"{field}: {message}", "input": value}]
    )


# -- models as clients see them: server/catalog.py (no web imports: the engine process builds them) --

# -- /generate ------------------------------------------------------------------------------------

MAX_CONTROLNETS = 4  # ControlNets one request may use (each one more encoder pass over its rows)


class ControlNetRequest(BaseModel):
    """One SD ControlNet of a request (`controlnets` on /generate and /v1/jobs)."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(
        None, max_length=128, description="A ControlNet of the model (/v1/models: conditioning.control."
        "controlnets); optional when the model has one.",
    )
    image: str = Field(description="Base64 PNG/JPEG/WebP control image (RGB), resized to width x height.")
    scale: float = Field(1.0, ge=0.0, le=4.0, description="conditioning_scale: strength of its residuals.")
    guidance_start: float = Field(0.0, ge=0.0, le=1.0, description="Fraction of the steps before it applies.")
    guidance_end: float = Field(1.0, ge=0.0, le=1.0, description="Fraction of the steps it stops after.")


class LoraInput(BaseModel):
    """One LoRA adapter of a request: a name from GET /v1/loras and its scale (0 = as if absent)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(max_length=128)
    scale: float = Field(1.0, ge=-8.0, le=8.0)


class GenerateRequest(BaseModel):
    """Body of POST /generate and POST /v1/jobs (JSON, or multipart with a ``control_image`` file)."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="Model id; optional when one model is loaded.")
    prompt: str | None = Field(None, max_length=MAX_PROMPT_CHARS, description="Text models only.")
    negative_prompt: str | None = Field(None, max_length=MAX_PROMPT_CHARS, description="Text models only.")
    class_label: int | str | None = Field(
        None, description="Class index or name (class models); omitted = unconditional."
    )
    control_image: str | None = Field(None, description="Base64 PNG/JPEG control map (ControlNet models).")
    control_scale: float = Field(1.0, ge=0.0, le=4.0)
    controlnets: list[ControlNetRequest] | None = Field(
        None, max_length=MAX_CONTROLNETS,
        description="SD models: ControlNets with their control images, scales and guidance windows. "
        "(control_image + control_scale is short for one entry on a model with one ControlNet.)",
    )
    num_inference_steps: int | None = Field(None, ge=1, description=STEPS_CAP)
    sampler: str | None = Field(None, max_length=64)
    guidance_scale: float | None = Field(None, ge=0.0, le=50.0, description="1 disables guidance.")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="Image i uses seed + i; omitted = random.")
    num_images: int = Field(1, ge=1, description=IMAGES_CAP)
    width: int | None = Field(None, ge=1, description=SIZE_CAP)
    height: int | None = Field(None, ge=1, description=SIZE_CAP)
    loras: list[LoraInput] | None = Field(
        None, description="LoRA adapters applied to this request's rows (U-Net and text encoder), "
        "e.g. [{\"name\": \"stripes\", \"scale\": 0.8}]; at most UNET_SERVER_LORA_MAX_PER_REQUEST (default "
        "4).",
    )
    preview_every: int = Field(
        0, ge=0, le=10_000,
        description="Jobs only: a `preview` event (small PNG of the current estimate) every k steps on the "
        "job's event stream; 0 = none.",
    )
    image: str | None = Field(
        None, description="Base64 PNG/JPEG/WebP init image: image-to-image, or inpainting with mask_image. "
        "Its size is the default width x height; another width/height resizes it (Lanczos).",
    )
    mask_image: str | None = Field(
        None, description="Base64 mask for inpainting, the size of image: white = repaint, black = keep.",
    )
    strength: float | None = Field(
        None, gt=0.0, le=1.0, description="With image: the fraction of the steps re-run from the noised "
        "image, in (0, 1]; omitted = 0.8 (image-to-image) or 1.0 (inpainting), as diffusers.",
    )
    # SDXL micro-conditioning (models with conditioning.size_conditioning); checked in resolve_generate
    original_size: tuple[int, int] | None = Field(
        None, description="SDXL: [height, width] the image is conditioned to look cropped/resized from; "
        "omitted = [height, width].",
    )
    crops_coords_top_left: tuple[int, int] | None = Field(
        None, description="SDXL: [top, left] crop offset conditioning; omitted = [0, 0].",
    )
    target_size: tuple[int, int] | None = Field(
        None, description="SDXL: [height, width] target size conditioning; omitted = [height, width].",
    )

    @field_validator("original_size", "crops_coords_top_left", "target_size", mode="before")
    @classmethod
    def _pair(cls, v: Any, info: ValidationInfo) -> Any:
        """Two integers: a JSON list, or in multipart forms "1024,1024" / "[1024, 1024]"."""
        if isinstance(v, str):
            text = v.strip().strip("[]()")
            try:
                v = [int(part) for part in re.split(r"[\s,xX]+", text) if part]
            except ValueError:
                raise ValueError(f"{info.field_name}: expected two integers, got {v!r}") from None
        if isinstance(v, (list, tuple)):
            low = 0 if info.field_name == "crops_coords_top_left" else 1
            if len(v) != 2 or not all(isinstance(x, int) and low <= x <= MAX_SIZE_CONDITIONING for x in v):
                raise ValueError(
                    f"{info.field_name}: expected two integers in [{low}, {MAX_SIZE_CONDITIONING}], got {v!r}"
                )
        return v

    @field_validator("controlnets", "loras", mode="before")
    @classmethod
    def _controlnets_json(cls, v: Any, info: ValidationInfo) -> Any:
        return json_form_field(v, info)


class Timings(BaseModel):
    queue_seconds: float
    sampling_seconds: float
    total_seconds: float


class GenerateResponse(BaseModel):
    id: str
    model: str
    sampler: str
    num_inference_steps: int
    guidance_scale: float
    width: int
    height: int
    seeds: list[int]
    images: list[str] = Field(description="Base64 PNGs, one per seed.")
    timings: Timings
    warnings: list[str] = Field(
        default_factory=list, description="What the server changed, e.g. a prompt truncated to 77 tokens."
    )
    strength: float | None = Field(None, description="Image-to-image and inpainting: the strength used.")
    inpaint_mode: Literal["inpainting_unet", "latent_blend"] | None = Field(
        None, description="Inpainting: `inpainting_unet` (a 9-channel inpainting U-Net) or `latent_blend` "
        "(an ordinary U-Net, the kept region blended back after every step). Also the X-Inpaint-Mode header.",
    )


# -- OpenAI images API ----------------------------------------------------------------------------


class OpenAIImageRequest(BaseModel):
    """POST /v1/images/generations; unknown OpenAI options (quality, style, user, …) are ignored."""

    model_config = ConfigDict(extra="ignore")

    prompt: str = Field(max_length=MAX_PROMPT_CHARS)
    model: str | None = None
    n: int = Field(1, ge=1, description=IMAGES_CAP)
    size: str | None = Field(None, description='"WIDTHxHEIGHT", e.g. "32x32"; omitted = model default.')
    response_format: str = Field("b64_json", description='Only "b64_json" is served.')
    # Extensions (send through the OpenAI client's extra_body).
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    sampler: str | None = Field(None, max_length=64)
    num_inference_steps: int | None = Field(None, ge=1, description=STEPS_CAP)
    guidance_scale: float | None = Field(None, ge=0.0, le=50.0)
    negative_prompt: str | None = Field(None, max_length=MAX_PROMPT_CHARS)
    loras: list[LoraInput] | None = Field(None, description="LoRA adapters, as on /generate.")

    @field_validator("loras", mode="before")
    @classmethod
    def _loras_json(cls, v: Any, info: ValidationInfo) -> Any:
        return json_form_field(v, info)


class OpenAIImage(BaseModel):
    b64_json: str
    revised_prompt: str | None = None


class OpenAIImagesResponse(BaseModel):
    created: int
    data: list[OpenAIImage]


# -- jobs -----------------------------------------------------------------------------------------

JobStatus = Literal["queued", "running", "completed", "failed", "cancelled"]


class JobError(BaseModel):
    status_code: int
    message: str
    error_id: str | None = None


class JobInfo(BaseModel):
    id: str
    status: JobStatus
    model: str
    step: int
    total_steps: int
    queue_position: int | None = Field(None, description="Waiting requests ahead; null once started.")
    result: GenerateResponse | None = None
    error: JobError | None = None


# -- resolution against loaded models and caps ----------------------------------------------------


@dataclass(frozen=True)
class ValidationContext:
    """What resolution needs to know: loaded models, sampler names, caps."""

    models: Mapping[str, ModelSpec]
    # (sampler name or alias, schedule kind) -> the name to sample with; ValueError saying why not
    check_sampler: Callable[[str, str], str]
    settings: Settings
    # (model id, sampler, steps) -> None; ValueError when the model's schedule cannot make that grid
    check_steps: Callable[[str, str, int], None] | None = None
    # models that did not load (not served) -> why, so that a request for one is told
    unavailable: Mapping[str, str] = field(default_factory=dict)


def _norm(name: str) -> str:
    return re.sub(r"[\s_\-/]+", "", name.lower())


def _pick_model(name: str | None, ctx: ValidationContext) -> ModelSpec:
    if name is None:
        if len(ctx.models) == 1:
            return next(iter(ctx.models.values()))
        raise field_error("model", f"required when several models are loaded; one of {sorted(ctx.models)}")
    spec = ctx.models.get(name)
    if spec is None and name in ctx.unavailable:
        message = f"model {name!r} is unavailable (it did not load: {ctx.unavailable[name]}); loaded: "
        raise field_error("model", message + str(sorted(ctx.models)), name)
    if spec is None:
        raise field_error("model", f"unknown model {name!r}; loaded: {sorted(ctx.models)}", name)
    return spec


def _class_index(value: int | str, spec: ModelSpec, field: str) -> int:
    classes = spec.conditioning.classes or []
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        try:
            value = int(value)
        except ValueError:  # digits int() does not read ("²", "--1", over 4300 of them): taken as a name
            pass
    if isinstance(value, int):
        if 0 <= value < len(classes):
            return value
        raise field_error(field, f"class index {value} out of range [0, {len(classes) - 1}]", value)
    wanted = _norm(value)
    for c in classes:
        if _norm(c.name) == wanted:
            return c.index
    names = ", ".join(c.name for c in classes)
    raise field_error(field, f"unknown class {value!r} for model {spec.id!r}; one of: {names}", value)


def _size(value: int | None, default: int, field: str, spec: ModelSpec, settings: Settings) -> int:
    if value is None:
        return default
    cap = settings.max_image_size or spec.sample_size
    if value > cap:
        why = (
            "the maximum image size, UNET_SERVER_MAX_IMAGE_SIZE" if settings.max_image_size
            else f"model {spec.id!r}'s native size, the maximum image size while UNET_SERVER_MAX_IMAGE_SIZE "
            "is unset"
        )
        raise field_error(field, f"{value} exceeds the maximum {cap} ({why})", value)
    if value % spec.size_multiple or value < spec.size_multiple:
        raise field_error(field, f"{value} must be a positive multiple of {spec.size_multiple}", value)
    return value


def resolve_generate(
    req: GenerateRequest,
    ctx: ValidationContext,
    control_bytes: bytes | None = None,
    *,
    image_bytes: bytes | None = None,
    mask_bytes: bytes | None = None,
    mask_source: str = "luma",
) -> ResolvedRequest:
    """Check ``req`` against the loaded models and caps; decodes the control map and the init image and
    mask (uploaded files as bytes; CPU: call off-loop). ``mask_source`` "alpha": transparent = repaint."""
    s = ctx.settings
    spec = _pick_model(req.model, ctx)
    cond = spec.conditioning
    if req.prompt is not None and not cond.text:
        raise field_error(
            "prompt", f"model {spec.id!r} is class-conditional and takes no prompt; send class_label",
            req.prompt,
        )
    if req.negative_prompt is not None and not cond.text:
        raise field_error("negative_prompt", f"model {spec.id!r} takes no text", req.negative_prompt)
    for name in SDXL_FIELDS:
        if getattr(req, name) is not None and not cond.size_conditioning:
            raise field_error(
                name, f"model {spec.id!r} is not an SDXL model; {name} is SDXL size/crop micro-conditioning",
                getattr(req, name),
            )
    class_label = None
    if req.class_label is not None:
        if not cond.classes:
            raise field_error(
                "class_label", f"model {spec.id!r} is text-conditional and takes no class_label; send prompt",
                req.class_label,
            )
        class_label = _class_index(req.class_label, spec, "class_label")
    has_control = req.control_image is not None or control_bytes is not None
    if has_control and cond.control is None:
        raise field_error("control_image", f"model {spec.id!r} has no ControlNet; it takes no control image")
    sd_controlnets = (cond.control.controlnets or []) if cond.control is not None else []
    if req.controlnets and not sd_controlnets:
        why = "send control_image" if cond.control is not None else "it takes no control images"
        raise field_error("controlnets", f"model {spec.id!r} has no Stable Diffusion ControlNets; {why}")

    sampler_name = req.sampler or spec.defaults.sampler
    try:
        sampler = ctx.check_sampler(sampler_name, spec.schedule)
    except ValueError as exc:
        raise field_error("sampler", str(exc), req.sampler) from None
    steps = req.num_inference_steps or spec.defaults.num_inference_steps
    if steps > s.max_inference_steps:
        raise field_error(
            "num_inference_steps",
            f"{steps} exceeds the maximum {s.max_inference_steps} (UNET_SERVER_MAX_INFERENCE_STEPS)", steps,
        )
    if ctx.check_steps is not None:
        try:
            ctx.check_steps(spec.id, sampler, steps)
        except ValueError as exc:
            raise field_error("num_inference_steps", str(exc), steps) from None
    if req.num_images > s.max_images:
        message = f"{req.num_images} exceeds the maximum {s.max_images} (UNET_SERVER_MAX_IMAGES)"
        raise field_error("num_images", message, req.num_images)
    init = _decode_init_images(req, spec, s, image_bytes, mask_bytes)  # None without an image
    size = init.image.size if init is not None else (spec.defaults.width, spec.defaults.height)
    width = _size(req.width, size[0], "width", spec, s)
    height = _size(req.height, size[1], "height", spec, s)
    guidance = spec.defaults.guidance_scale if req.guidance_scale is None else req.guidance_scale
    # Guidance needs an unconditional row: text models always have one (""), class models a null class.
    has_null = cond.text or (class_label is not None and spec.null_class_label is not None)
    guided = needs_guidance(guidance, has_null)
    rows = rows_for(req.num_images, guided)
    if rows > s.batch_rows:
        raise field_error(
            "num_images",
            f"{req.num_images} images{' with guidance' if guided else ''} need {rows} rows; "
            f"max_batch_rows is {s.max_batch_rows}",
            req.num_images,
        )

    control = None
    controlnets: tuple[ControlNetInput, ...] = ()
    if sd_controlnets:
        controlnets = _resolve_controlnets(req, sd_controlnets, spec.id, width, height, s, control_bytes)
    elif has_control:
        try:
            data = control_bytes
            if data is None:
                data = decode_base64(req.control_image or "", s.max_control_image_bytes)
            control = decode_control_image(
                data, width=width, height=height,
                max_bytes=s.max_control_image_bytes, max_pixels=s.max_control_image_pixels,
            )
        except ImageDecodeError as exc:
            raise field_error("control_image", str(exc)) from None

    return ResolvedRequest(
        model=spec.id,
        prompt=req.prompt,
        negative_prompt=req.negative_prompt,
        class_label=class_label,
        control=control,
        control_scale=req.control_scale,
        num_inference_steps=steps,
        sampler=sampler,
        guidance_scale=float(guidance),
        seed=random_seed() if req.seed is None else req.seed,
        num_images=req.num_images,
        width=width,
        height=height,
        guided=guided,
        loras=_resolve_loras(req, spec.id, ctx),
        controlnets=controlnets,
        **_image_fields(init, req, spec, steps, width, height, mask_source),
        original_size=req.original_size,
        crops_coords_top_left=req.crops_coords_top_left,
        target_size=req.target_size,
    )


def _resolve_controlnets(
    req: GenerateRequest, names: list[str], model: str, width: int, height: int, s: Settings,
    control_bytes: bytes | None,
) -> tuple[ControlNetInput, ...]:
    """The request's SD ControlNets, images decoded to RGB (height, width, 3) in [0, 1]. ``control_image``
    (+ ``control_scale``) is one entry for a model with one ControlNet."""
    entries = list(req.controlnets or [])
    if req.control_image is not None or control_bytes is not None:
        if entries:
            raise field_error("control_image", "send either control_image or controlnets, not both")
        if len(names) > 1:
            raise field_error(
                "control_image",
                f"model {model!r} has several ControlNets ({', '.join(names)}): send controlnets with names",
            )
        entries = [ControlNetRequest(name=names[0], image=req.control_image or "", scale=req.control_scale)]
    out, seen = [], set()
    for i, e in enumerate(entries):
        where = f"controlnets[{i}]" if req.controlnets else "control_image"
        name = e.name
        if name is None:
            if len(names) > 1:
                raise field_error(f"{where}.name", f"model {model!r} has several ControlNets: one of {names}")
            name = names[0]
        if name not in names:
            message = f"unknown ControlNet {name!r} for model {model!r}; one of {names}"
            raise field_error(f"{where}.name", message, name)
        if name in seen:
            raise field_error(f"{where}.name", f"ControlNet {name!r} is named twice", name)
        seen.add(name)
        if e.guidance_start >= e.guidance_end:
            raise field_error(
                f"{where}.guidance_end",
                f"guidance_end ({e.guidance_end}) must be greater than guidance_start ({e.guidance_start})",
                e.guidance_end,
            )
        try:
            data = control_bytes if (control_bytes is not None and not req.controlnets) else None
            if data is None:
                data = decode_base64(e.image, s.max_control_image_bytes)
            image = decode_control_image(
                data, width=width, height=height, max_bytes=s.max_control_image_bytes,
                max_pixels=s.max_control_image_pixels, mode="RGB",
            )
        except ImageDecodeError as exc:
            field = "control_image" if not req.controlnets else f"{where}.image"
            raise field_error(field, str(exc)) from None
        out.append(ControlNetInput(name, image, e.scale, e.guidance_start, e.guidance_end))
    return tuple(out)


# -- image-to-image and inpainting ---------------------------------------------------------------


@dataclass(frozen=True)
class _InitImages:
    image: Any  # PIL.Image.Image, decoded within the limits
    mask: Any  # PIL.Image.Image or None


def _decode_one(text: str | None, data: bytes | None, field: str, s: Settings) -> Any:
    """An uploaded image (file bytes, or base64 text) decoded within the control-map limits; 422 naming the
    field otherwise."""
    try:
        if data is None:
            data = decode_base64(text or "", s.max_control_image_bytes, what=field)
        return decode_image(
            data, max_bytes=s.max_control_image_bytes, max_pixels=s.max_control_image_pixels, what=field
        )
    except ImageDecodeError as exc:
        raise field_error(field, str(exc)) from None


def _decode_init_images(
    req: GenerateRequest, spec: ModelSpec, s: Settings, image_bytes: bytes | None, mask_bytes: bytes | None
) -> _InitImages | None:
    """The init image and mask, checked: a mask needs an image and the image's size; strength needs an
    image; an inpainting model needs both; an image whose size the model cannot take needs width/height."""
    has_image = req.image is not None or image_bytes is not None
    has_mask = req.mask_image is not None or mask_bytes is not None
    if has_mask and not has_image:
        raise field_error("mask_image", "a mask needs an image: send image (the picture to inpaint) too")
    if req.strength is not None and not has_image:
        message = "strength applies to image-to-image and inpainting: send image"
        raise field_error("strength", message, req.strength)
    if spec.inpainting and not (has_image and has_mask):
        raise field_error(
            "mask_image" if has_image else "image",
            f"model {spec.id!r} is an inpainting model (a 9-channel U-Net): send image and mask_image",
        )
    if not has_image:
        return None
    image = _decode_one(req.image, image_bytes, "image", s)
    mask = _decode_one(req.mask_image, mask_bytes, "mask_image", s) if has_mask else None
    if mask is not None and mask.size != image.size:
        (mw, mh), (iw, ih) = mask.size, image.size
        message = f"the mask is {mw}x{mh} but the image is {iw}x{ih}: send them at one size"
        raise field_error("mask_image", message)
    iw, ih = image.size
    cap, m = s.max_image_size or spec.sample_size, spec.size_multiple
    for side, given in ((iw, req.width), (ih, req.height)):
        if given is None and (side > cap or side % m or side < m):
            raise field_error(
                "image",
                f"image is {iw}x{ih}; model {spec.id!r} takes sizes that are multiples of {m} up to {cap}: "
                "resize it, or send width and height to have it resized (Lanczos, aspect ratio not kept)",
            )
    return _InitImages(image, mask)


def _image_fields(
    init: _InitImages | None, req: GenerateRequest, spec: ModelSpec, steps: int, width: int, height: int,
    mask_source: str,
) -> dict[str, Any]:
    """ResolvedRequest's image-to-image / inpainting fields (none without an image)."""
    if init is None:
        return {}
    strength = req.strength if req.strength is not None else (1.0 if init.mask is not None else 0.8)
    try:
        strength_start(steps, strength)
    except ValueError as exc:
        raise field_error("strength", str(exc), strength) from None
    notes = []
    if init.image.size != (width, height):
        iw, ih = init.image.size
        notes.append(f"image was resized from {iw}x{ih} to {width}x{height} (Lanczos; aspect ratio not kept)")
    mode = None
    if init.mask is not None:
        mode = INPAINTING_UNET if spec.inpainting else LATENT_BLEND
    return {
        "image": init_image_array(init.image, spec.image_channels, width, height),
        "mask": None if init.mask is None else mask_array(init.mask, width, height, mask_source),
        "strength": float(strength),
        "inpaint_mode": mode,
        "notes": tuple(notes),
    }


def _resolve_loras(req: GenerateRequest, model: str, ctx: ValidationContext) -> tuple[LoraRef, ...]:
    """The request's adapters checked against the registry and ``model`` (a 422 on ``loras`` saying why)."""
    entries = list(req.loras or [])
    if not entries:
        return ()
    from model.lora import LoraError
    from server.loras import LoraNotFound, LoraSettings, registry_for

    cfg = LoraSettings()
    if not cfg.enabled:
        raise field_error("loras", "LoRA adapters are disabled on this server (UNET_SERVER_LORA_ENABLED)")
    if len(entries) > cfg.max_per_request:
        cap = cfg.max_per_request
        message = f"{len(entries)} adapters exceed the maximum {cap} (UNET_SERVER_LORA_MAX_PER_REQUEST)"
        raise field_error("loras", message)
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        raise field_error("loras", f"an adapter is named twice: {names}")
    registry = registry_for(ctx.settings)
    refs = []
    for e in entries:
        try:
            sha = registry.check(e.name, model)
        except ValueError as exc:  # an invalid name
            raise field_error("loras", str(exc), e.name) from None
        except LoraNotFound:
            message = f"unknown adapter {e.name!r}; GET /v1/loras lists them"
            raise field_error("loras", message, e.name) from None
        except LoraError as exc:
            message = f"adapter {e.name!r} cannot be used with model {model!r}: {exc}"
            raise field_error("loras", message, e.name) from None
        refs.append(LoraRef(e.name, float(e.scale), sha))
    return tuple(refs)


_SIZE_RE = re.compile(r"^\s*(\d{1,5})\s*[xX]\s*(\d{1,5})\s*$")


def resolve_openai(
    req: OpenAIImageRequest,
    ctx: ValidationContext,
    *,
    image_bytes: bytes | None = None,
    mask_bytes: bytes | None = None,
    mask_source: str = "luma",
    strength: float | None = None,
) -> ResolvedRequest:
    """Map an OpenAI images request onto ``resolve_generate``; a class model takes a class name as prompt.
    Edits pass the image, mask (``mask_source`` "alpha": transparent = edit) and strength through."""
    if req.response_format != "b64_json":
        raise field_error(
            "response_format",
            f"{req.response_format!r} is not served; this server returns images inline: use \"b64_json\"",
            req.response_format,
        )
    width = height = None
    if req.size is not None and req.size != "auto":
        m = _SIZE_RE.match(req.size)
        if not m:
            raise field_error("size", f'{req.size!r} is not "WIDTHxHEIGHT" (e.g. "32x32")', req.size)
        width, height = int(m.group(1)), int(m.group(2))
    spec = _pick_model(req.model, ctx)
    prompt: str | None = req.prompt
    class_label: str | None = None
    if not spec.conditioning.text:
        class_label, prompt = req.prompt, None
    try:
        gen = GenerateRequest(
            model=spec.id, prompt=prompt, negative_prompt=req.negative_prompt, class_label=class_label,
            loras=req.loras,
            num_inference_steps=req.num_inference_steps, sampler=req.sampler,
            guidance_scale=req.guidance_scale, seed=req.seed, num_images=req.n, width=width, height=height,
            strength=strength,
        )
    except Exception as exc:  # pydantic.ValidationError: map our field names back onto OpenAI's
        raise field_error("size", str(exc)) from None
    try:
        return resolve_generate(
            gen, ctx, image_bytes=image_bytes, mask_bytes=mask_bytes, mask_source=mask_source
        )
    except RequestValidationError as exc:
        renamed = {
            "num_images": "n", "width": "size", "height": "size", "class_label": "prompt",
            "mask_image": "mask",
        }
        errors = []
        for err in exc.errors():
            field = err["loc"][-1]
            new = renamed.get(field, field)
            errors.append({**err, "loc": ("body", new), "msg": err["msg"].replace(f"{field}:", f"{new}:", 1)})
        raise RequestValidationError(errors) from None


class OpenAIEditRequest(OpenAIImageRequest):
    """POST /v1/images/edits (multipart: ``image`` file, optional ``mask`` file, ``prompt``, …); unknown
    OpenAI options (quality, background, input_fidelity, user, …) are ignored."""

    strength: float | None = Field(
        None, gt=0.0, le=1.0, description="Extension: as /generate's strength (omitted: 1.0 with a mask or a "
        "transparent image, else 0.8).",
    )


def resolve_openai_edit(
    req: OpenAIEditRequest, ctx: ValidationContext, image_bytes: bytes, mask_bytes: bytes | None
) -> ResolvedRequest:
    """An OpenAI edit as inpainting or image-to-image. OpenAI's mask convention: a PNG with an alpha channel
    whose transparent pixels (alpha < 128 here; OpenAI says fully transparent) are edited and the rest kept.
    Without a mask, the image's own transparent pixels are the region to edit (as OpenAI's dall-e-2); an
    image without transparency is edited as a whole (image-to-image at ``strength``). Without ``size``, an
    image whose size the model cannot take is resized to the model's default size (OpenAI's clients send
    whatever size the picture has); /generate refuses it instead."""
    s = ctx.settings
    image = _decode_one(None, image_bytes, "image", s)
    spec = _pick_model(req.model, ctx)
    cap, m = s.max_image_size or spec.sample_size, spec.size_multiple
    if req.size in (None, "auto") and any(side > cap or side % m or side < m for side in image.size):
        req = req.model_copy(update={"size": f"{spec.defaults.width}x{spec.defaults.height}"})
    source: bytes | None = None
    if mask_bytes is not None:
        mask = _decode_one(None, mask_bytes, "mask", s)
        if mask.mode not in ("RGBA", "LA", "PA", "RGBa", "La") and "transparency" not in mask.info:
            raise field_error(
                "mask",
                f"mask has no alpha channel (mode {mask.mode}): OpenAI's edits mask marks the region to edit "
                "with transparent pixels; send a PNG with alpha, or use /generate's mask_image (white = "
                "repaint)",
            )
        source = mask_bytes
    elif has_transparency(image):
        source = image_bytes
    return resolve_openai(
        req, ctx, image_bytes=image_bytes, mask_bytes=source, mask_source="alpha", strength=req.strength
    )
