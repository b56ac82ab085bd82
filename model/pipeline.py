"""A model folder (diffusers layout + unet_server.json) -> Pipeline: U-Net, schedule, encoders, metadata.

Folder layout (docs/CONTRACTS.md, "Shipped model folders")::

    <weights_dir>/<name>/unet_server.json          our metadata (kind, classes, control, defaults)
    <weights_dir>/<name>/unet/                     config.json + diffusion_pytorch_model.safetensors
    <weights_dir>/<name>/scheduler/scheduler_config.json
    <weights_dir>/<name>/controlnet/               ControlNet folders only

A ControlNet folder names its ``base_model``; it reuses that model's U-Net *instance* and schedule, so rows
of both share one forward pass. Every path read is confined to ``weights_dir`` (symlinks resolved).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

METADATA_FILE = "unet_server.json"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

TextEncoderLoader = Callable[[torch.device, torch.dtype], Any]


class PipelineError(ValueError):
    """A model folder is missing, malformed or outside the weights directory."""


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
    """Everything needed to sample one model; ``unet`` may be shared with a base model (ControlNet)."""

    name: str
    path: Path
    kind: str  # "class" | "text"
    unet: torch.nn.Module
    schedule: Any  # model.schedules.Schedule
    denoiser: Any  # model.denoiser.Denoiser (with the ControlNet when there is one)
    defaults: Defaults
    image_channels: int
    sample_size: int
    controlnet: torch.nn.Module | None = None
    text_encoder: Any = None  # model.text_encoder.TextEncoder, shared by every text model
    class_names: list[str] | None = None
    null_class_label: int | None = None
    control: dict[str, Any] | None = None  # {"type": "edges", "channels": 1}
    base_model: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def size_multiple(self) -> int:
        """Width and height must be multiples of this (2 ** number of downsamplings)."""
        return 2 ** (len(self.unet.config.block_out_channels) - 1)

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


def list_models(weights_dir: str | Path) -> list[str]:
    """Names of the model folders (those holding unet_server.json) in ``weights_dir``, sorted."""
    root = Path(weights_dir).resolve()
    if not root.is_dir():
        return []
    return sorted(
        p.name for p in root.iterdir() if _NAME_RE.match(p.name) and (p / METADATA_FILE).is_file()
    )


def read_metadata(weights_dir: str | Path, name: str) -> dict[str, Any]:
    """The parsed unet_server.json of ``name``; raises PipelineError with the reason."""
    if not _NAME_RE.match(name):
        raise PipelineError(f"invalid model name {name!r}")
    root = Path(weights_dir).resolve()
    folder = _confined(root, name)
    meta_path = _confined(root, name, METADATA_FILE)
    if not meta_path.is_file():
        raise PipelineError(f"{folder} has no {METADATA_FILE}")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise PipelineError(f"{meta_path}: invalid JSON ({exc})") from exc
    if meta.get("kind") not in ("class", "text"):
        raise PipelineError(f"{meta_path}: kind must be 'class' or 'text', got {meta.get('kind')!r}")
    return meta


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


def load_pipelines(
    weights_dir: str | Path,
    names: Iterable[str] | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    text_encoder_loader: TextEncoderLoader | None = None,
) -> dict[str, Pipeline]:
    """Load ``names`` (default: every model folder) from ``weights_dir``; base models load first and once.

    ``text_encoder_loader(device, dtype)`` builds the one text encoder shared by every text model
    (default: ``TextEncoder.load``).
    """
    from model import load_controlnet, load_unet
    from model.denoiser import Denoiser
    from model.schedules import Schedule

    root = Path(weights_dir).resolve()
    device = torch.device(device)
    wanted = list(names) if names else list_models(root)
    if not wanted:
        raise PipelineError(f"no model folders (with {METADATA_FILE}) in {root}")
    metas = {n: read_metadata(root, n) for n in wanted}
    # Base models a ControlNet folder needs, even when not requested (loaded but not served).
    for n in list(metas):
        base = metas[n].get("base_model")
        if base and base not in metas:
            metas[base] = read_metadata(root, base)
    loaded: dict[str, Pipeline] = {}
    encoder: list[Any] = []  # the shared text encoder, built on first need

    def text_encoder() -> Any:
        if not encoder:
            encoder.append((text_encoder_loader or _default_text_encoder)(device, dtype))
        return encoder[0]

    def load(n: str, chain: tuple[str, ...] = ()) -> Pipeline:
        if n in loaded:
            return loaded[n]
        if n in chain:
            raise PipelineError(f"base_model cycle: {' -> '.join(chain + (n,))}")
        meta = metas[n]
        base_name = meta.get("base_model")
        controlnet = None
        if base_name:
            base = load(base_name, chain + (n,))
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
            class_names=list(class_names) if kind == "class" else None,
            null_class_label=meta.get("null_class_label") if kind == "class" else None,
            control=meta.get("control") or None,
            base_model=base_name or None,
            metadata=meta,
        )
        loaded[n] = pipe
        log.info("loaded model %s (%s%s)", n, kind, f", ControlNet on {base_name}" if base_name else "")
        return pipe

    for n in metas:
        load(n)
    return {n: loaded[n] for n in wanted}


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
    compiled: dict[int, torch.nn.Module] = {}  # id(original) -> compiled; keeps the originals alive

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
