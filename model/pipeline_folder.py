"""Standard diffusers pipeline folders (model_index.json + component subfolders): checks and defaults.

A Stable Diffusion folder as diffusers writes it (``StableDiffusionPipeline.save_pretrained``) or as it sits
in the hub cache::

    model_index.json            {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", ...], ...}
    unet/          config.json + diffusion_pytorch_model[.fp16].safetensors (or a sharded index)
    vae/           config.json + diffusion_pytorch_model[.fp16].safetensors
    text_encoder/  config.json + model[.fp16].safetensors
    tokenizer/     vocab.json + merges.txt (+ tokenizer_config.json, special_tokens_map.json)
    scheduler/     scheduler_config.json
    safety_checker/, feature_extractor/    ignored (logged)

An SDXL folder (``StableDiffusionXLPipeline``) adds text_encoder_2/ (CLIPTextModelWithProjection) and
tokenizer_2/, and model_index.json's ``force_zeros_for_empty_prompt``. SDXL refiner folders (only
text_encoder_2, ``requires_aesthetics_score``) are refused with a message saying so.

`read_pipeline_folder` reads only JSON and checks every needed file is there (safetensors only; a pickle-
only component is refused with how to convert it), so a bad folder fails before any weights are read.
`scheduler_sampler` maps the folder's scheduler class to one of our sampler names (model.samplers).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MODEL_INDEX = "model_index.json"

# Served pipeline classes -> {component: accepted classes}.
SERVED_PIPELINES: dict[str, dict[str, tuple[str, ...]]] = {
    "StableDiffusionPipeline": {
        "unet": ("UNet2DConditionModel",),
        "vae": ("AutoencoderKL",),
        "text_encoder": ("CLIPTextModel",),
        "tokenizer": ("CLIPTokenizer", "CLIPTokenizerFast"),
        "scheduler": (),  # any scheduler class: only its training schedule is used
    },
    "StableDiffusionXLPipeline": {
        "unet": ("UNet2DConditionModel",),
        "vae": ("AutoencoderKL",),
        "text_encoder": ("CLIPTextModel",),
        "tokenizer": ("CLIPTokenizer", "CLIPTokenizerFast"),
        "text_encoder_2": ("CLIPTextModelWithProjection",),
        "tokenizer_2": ("CLIPTokenizer", "CLIPTokenizerFast"),
        "scheduler": (),
    },
}
SDXL_PIPELINES = ("StableDiffusionXLPipeline",)
# SD / SDXL with their own ControlNet(s) in controlnet/ (model.sd_controlnet.paired_controlnets reads them)
_CONTROLNET = ("ControlNetModel", "MultiControlNetModel")
SERVED_PIPELINES["StableDiffusionControlNetPipeline"] = {
    **SERVED_PIPELINES["StableDiffusionPipeline"],
    "controlnet": _CONTROLNET,
}
SERVED_PIPELINES["StableDiffusionXLControlNetPipeline"] = {
    **SERVED_PIPELINES["StableDiffusionXLPipeline"],
    "controlnet": _CONTROLNET,
}
# SD inpainting folders (usually a 9-channel U-Net: latent + mask + masked-image latent, model.img2img) and SD
# image-to-image folders: the same components; every SD folder serves txt2img, img2img and inpainting rows.
SERVED_PIPELINES["StableDiffusionInpaintPipeline"] = dict(SERVED_PIPELINES["StableDiffusionPipeline"])
SERVED_PIPELINES["StableDiffusionImg2ImgPipeline"] = dict(SERVED_PIPELINES["StableDiffusionPipeline"])
IGNORED_COMPONENTS = ("safety_checker", "feature_extractor", "image_encoder")
_WEIGHT_STEMS = {
    "unet": "diffusion_pytorch_model",
    "vae": "diffusion_pytorch_model",
    "text_encoder": "model",
    "text_encoder_2": "model",
    "controlnet": "diffusion_pytorch_model",
}

# Stable Diffusion's usual settings (the issue's SD defaults; diffusers' own call default is 50 steps).
SD_STEPS = 25
SD_GUIDANCE = 7.5
SDXL_GUIDANCE = 5.0  # StableDiffusionXLPipeline's own default

# diffusers scheduler class -> our sampler (model.samplers names/aliases). Samplers we do not implement get a
# documented equivalent: PNDM (PLMS) and LMS are linear multistep solvers of the same probability-flow ODE;
# DPM++ 2M is the multistep solver we have, second order, and at SD's 20-50 steps it lands on that ODE's
# solution as they do. UniPC, DEIS and single-step DPM-Solver are the same kind of ODE solver.
SCHEDULER_SAMPLERS: dict[str, str] = {
    "DDIMScheduler": "ddim",
    "EulerDiscreteScheduler": "euler",
    "EulerAncestralDiscreteScheduler": "euler_ancestral",
    "HeunDiscreteScheduler": "heun",
    "DPMSolverMultistepScheduler": "dpmpp_2m",
    "DDPMScheduler": "euler_ancestral",  # ancestral sampling is DDPM's reverse process
    "PNDMScheduler": "dpmpp_2m",  # equivalent (see above)
    "LMSDiscreteScheduler": "dpmpp_2m",  # equivalent
    "UniPCMultistepScheduler": "dpmpp_2m",  # equivalent
    "DEISMultistepScheduler": "dpmpp_2m",  # equivalent
    "DPMSolverSinglestepScheduler": "dpmpp_2m",  # equivalent
}
_KARRAS_ALIASES = {
    "euler": "Euler Karras",
    "heun": "Heun Karras",
    "dpmpp_2m": "DPM++ 2M Karras",
    "dpmpp_2m_sde": "DPM++ 2M SDE Karras",
}


class PipelineError(ValueError):
    """A model folder is missing, malformed, not served or outside the weights directory."""


@dataclass(frozen=True)
class PipelineFolder:
    """What `read_pipeline_folder` found: JSON only, nothing loaded yet."""

    path: Path
    class_name: str  # e.g. "StableDiffusionPipeline"
    components: dict[str, tuple[str, str]]  # served component -> (library, class) from model_index.json
    unet_config: dict[str, Any]
    vae_config: dict[str, Any]
    scheduler_config: dict[str, Any]  # with `_class_name`
    variants: dict[str, str | None]  # weighted component -> weights variant found (None: plain files)
    force_zeros_for_empty_prompt: bool = False  # SDXL: no negative prompt -> zero uncond rows

    @property
    def is_sdxl(self) -> bool:
        """An SDXL folder (any served class with text_encoder_2): two text encoders and the U-Net's size/crop
        micro-conditioning."""
        return "text_encoder_2" in self.components

    @property
    def vae_scale_factor(self) -> int:
        """Image pixels per latent pixel (8 for SD)."""
        return 2 ** (len(self.vae_config.get("block_out_channels", (64,))) - 1)

    @property
    def native_size(self) -> int:
        """The training image size in pixels: unet sample_size x vae_scale_factor (512 for SD 1.5)."""
        size = self.unet_config.get("sample_size") or 64
        if isinstance(size, (list, tuple)):
            size = size[0]
        return int(size) * self.vae_scale_factor


def _json(path: Path, what: str) -> dict[str, Any]:
    try:
        d = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PipelineError(f"{path}: cannot read {what} ({exc})") from exc
    if not isinstance(d, dict):
        raise PipelineError(f"{path}: {what} is not a JSON object")
    return d


def served_classes() -> str:
    """The pipeline classes we serve, for messages."""
    return ", ".join(SERVED_PIPELINES)


def model_index_class(folder: Path) -> str | None:
    """`_class_name` of folder/model_index.json, or None when there is no (readable) model_index.json."""
    path = folder / MODEL_INDEX
    if not path.is_file():
        return None
    try:
        d = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return d.get("_class_name") if isinstance(d, dict) else None


def read_pipeline_folder(folder: str | Path, variant: str | None = None) -> PipelineFolder:
    """Check a diffusers pipeline folder and read its configs; PipelineError says what is wrong.

    Errors: no model_index.json; a pipeline class we do not serve (named, with the served list); a missing
    or unexpected-class component; a component with pickle weights only (how to convert) or none.
    """
    from model.loading import WeightsError, find_weights

    folder = Path(folder)
    index = _json(folder / MODEL_INDEX, MODEL_INDEX) if (folder / MODEL_INDEX).is_file() else None
    if index is None:
        raise PipelineError(f"{folder}: no {MODEL_INDEX} (not a diffusers pipeline folder)")
    class_name = index.get("_class_name")
    _refuse_refiner(folder, index)
    if class_name not in SERVED_PIPELINES:
        raise PipelineError(
            f"{folder}: pipeline class {class_name!r} is not served; served pipeline classes: "
            f"{served_classes()} (and unet-server folders with unet_server.json)"
        )
    wanted = SERVED_PIPELINES[class_name]
    components: dict[str, tuple[str, str]] = {}
    for name, classes in wanted.items():
        entry = index.get(name)
        if not (isinstance(entry, list) and len(entry) == 2 and entry[1]):
            raise PipelineError(f"{folder}: {class_name} needs a {name!r} component; {MODEL_INDEX} has none")
        if classes and entry[1] not in classes:
            raise PipelineError(
                f"{folder}: component {name!r} is a {entry[1]}; "
                f"{class_name} is served with {', '.join(classes)}"
            )
        if not (folder / name).is_dir():
            raise PipelineError(f"{folder}: missing component folder {name}/ (named in {MODEL_INDEX})")
        components[name] = (str(entry[0]), str(entry[1]))
    for name, entry in index.items():
        if name.startswith("_") or name in wanted or not isinstance(entry, list) or not any(entry):
            continue
        why = "not used for serving" if name in IGNORED_COMPONENTS else "not a component we use"
        log.info("%s: ignoring component %s (%s: %s)", folder.name, name, entry[-1], why)

    variants: dict[str, str | None] = {}
    for name, stem in _WEIGHT_STEMS.items():
        if name in components:
            try:
                _, variants[name] = find_weights(folder / name, stem, variant)
            except WeightsError as exc:
                raise PipelineError(f"{folder}: component {name}/: {exc}") from exc
    for tok_name in (c for c in components if c.startswith("tokenizer")):
        tok = folder / tok_name
        if (
            not ((tok / "vocab.json").is_file() and (tok / "merges.txt").is_file())
            and not (tok / "tokenizer.json").is_file()
        ):
            raise PipelineError(
                f"{folder}: {tok_name}/ has neither vocab.json + merges.txt nor tokenizer.json"
            )
    sched_path = folder / "scheduler" / "scheduler_config.json"
    if not sched_path.is_file():
        raise PipelineError(f"{folder}: missing scheduler/scheduler_config.json")
    sched = _json(sched_path, "the scheduler config")
    sched.setdefault("_class_name", components["scheduler"][1])
    for name in ("unet", "vae"):
        if not (folder / name / "config.json").is_file():
            raise PipelineError(f"{folder}: missing {name}/config.json")
    return PipelineFolder(
        path=folder,
        class_name=class_name,
        components=components,
        unet_config=_json(folder / "unet" / "config.json", "the unet config"),
        vae_config=_json(folder / "vae" / "config.json", "the vae config"),
        scheduler_config=sched,
        variants=variants,
        # diffusers' StableDiffusionXLPipeline registers True when model_index.json leaves it out
        force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", True))
        if "text_encoder_2" in wanted
        else False,
    )


def _refuse_refiner(folder: Path, index: dict[str, Any]) -> None:
    """An SDXL refiner folder is refused with what it is and what to serve instead."""
    class_name = str(index.get("_class_name"))
    if not class_name.startswith("StableDiffusionXL"):
        return
    te = index.get("text_encoder")
    no_first_encoder = not (isinstance(te, list) and len(te) == 2 and te[1])
    if index.get("requires_aesthetics_score") or no_first_encoder:
        raise PipelineError(
            f"{folder}: an SDXL refiner folder ({class_name}"
            f"{', text_encoder_2 only' if no_first_encoder else ''}"
            f"{', requires_aesthetics_score' if index.get('requires_aesthetics_score') else ''}) "
            "is not served: "
            "refiners run img2img on a base model's output with aesthetic-score conditioning. Serve the SDXL "
            "base folder (StableDiffusionXLPipeline, text_encoder + text_encoder_2) instead"
        )


def scheduler_sampler(scheduler_config: dict[str, Any]) -> str:
    """Our sampler name (or alias) for a diffusers scheduler config: its class mapped by SCHEDULER_SAMPLERS,
    DPM-Solver's SDE variant to dpmpp_2m_sde, `use_karras_sigmas` to the Karras alias; unknown -> dpmpp_2m."""
    cls = str(scheduler_config.get("_class_name", ""))
    name = SCHEDULER_SAMPLERS.get(cls)
    if name is None:
        log.info("scheduler %r has no sampler of its own here; defaulting to dpmpp_2m", cls)
        name = "dpmpp_2m"
    if cls == "DPMSolverMultistepScheduler" and "sde" in str(scheduler_config.get("algorithm_type", "")):
        name = "dpmpp_2m_sde"
    if scheduler_config.get("use_karras_sigmas") and name in _KARRAS_ALIASES:
        name = _KARRAS_ALIASES[name]
    return name


def pipeline_defaults(pf: PipelineFolder) -> dict[str, Any]:
    """unet_server.json-style defaults for a pipeline folder: sampler from its scheduler, SD's 25 steps and
    guidance 7.5 (SDXL: 5.0, its pipeline's default), the native size."""
    return {
        "sampler": scheduler_sampler(pf.scheduler_config),
        "num_inference_steps": SD_STEPS,
        "guidance_scale": SDXL_GUIDANCE if pf.is_sdxl else SD_GUIDANCE,
        "width": pf.native_size,
        "height": pf.native_size,
    }
