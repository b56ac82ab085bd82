"""Load and warm what the engine core serves: pipelines, attention backend, worker (blocking).

Runs in a thread of the server process or in the engine process; imports no web framework.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from model.pipeline import PipelineError, TextEncoderLoader
from server.catalog import ModelSpec, SamplerInfo, model_spec
from server.settings import Settings
from server.worker import Worker

log = logging.getLogger(__name__)


def _resolve_device_dtype(settings: Settings) -> tuple[Any, Any]:
    import torch

    if settings.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(settings.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("UNET_SERVER_DEVICE=cuda but CUDA is not available")
    if settings.dtype == "auto":
        dtype = torch.float16 if device.type == "cuda" else torch.float32
    else:
        dtype = getattr(torch, settings.dtype)
    return device, dtype


def resolve_vae_dtype(settings: Settings) -> Any:
    """``vae_dtype`` as a torch dtype for the loader; None for "auto" (the loader's rule: fp32 when the VAE
    config sets force_upcast and the U-Net runs in fp16, else the U-Net's dtype)."""
    import torch

    return None if settings.vae_dtype == "auto" else getattr(torch, settings.vae_dtype)


def use_vae_groupnorm(pipelines: dict[str, Any], device: Any, choice: str) -> int:
    """Apply ``vae_groupnorm`` to the latent pipelines' VAEs; returns how many resnet blocks run the fused
    kernels. "triton" where they cannot run raises (no silent fallback); "auto" uses them on CUDA only."""
    from model.fused_groupnorm import triton_usable, use_fused_groupnorm

    if choice == "torch":
        return 0
    usable = triton_usable(device)
    if choice == "triton" and not usable:
        raise RuntimeError(
            f"UNET_SERVER_VAE_GROUPNORM=triton needs CUDA and the triton package (device {device}); "
            "use auto or torch"
        )
    if choice == "auto" and getattr(device, "type", str(device)) != "cuda":
        return 0
    return sum(use_fused_groupnorm(p.vae) for p in pipelines.values() if p.vae is not None) if usable else 0


@dataclass
class LoadInfo:
    """What the HTTP side needs from loading (picklable: an engine process sends it to the parent)."""

    device: str
    models: dict[str, ModelSpec]
    samplers: list[SamplerInfo]
    schedule_configs: dict[str, dict[str, Any]]  # model id -> its scheduler config (to check step counts)
    # Models that did not load and are not served (skip_broken_models): model id -> why.
    unavailable: dict[str, str] = field(default_factory=dict)


def resolve_weights_dir(settings: Settings) -> Path:
    """``weights_dir``; a relative one that does not exist here falls back to the folder of that name beside
    the packages: the repository's weights/ for a checkout, or the shipped models a wheel installs there
    (``pip install unet-server`` run from any directory serves them)."""
    weights_dir = settings.weights_dir
    if not weights_dir.exists() and not weights_dir.is_absolute():
        beside = Path(__file__).resolve().parents[1] / weights_dir
        if beside.is_dir():
            return beside
    return weights_dir


def check_failures(loaded: dict[str, Any], failures: dict[str, str], skip_broken: bool) -> None:
    """Raise ``PipelineError`` naming every model that failed, unless ``skip_broken`` and some loaded (then
    log each failure: the server serves the others and reports these in /health/ready and /v1/models)."""
    if not failures:
        return
    listed = "; ".join(f"{name}: {why}" for name, why in sorted(failures.items()))
    if not skip_broken:
        others = f" ({', '.join(sorted(loaded))})" if loaded else ""
        raise PipelineError(
            f"{len(failures)} model(s) failed to load: {listed}. UNET_SERVER_SKIP_BROKEN_MODELS=true serves "
            f"the models that load{others} and reports these as unavailable"
        )
    if not loaded:
        raise PipelineError(f"no model could be loaded: {listed}")
    for name, why in sorted(failures.items()):
        log.warning("model %s is unavailable (not served): %s", name, why)


def load_worker(settings: Settings, text_encoder_loader: TextEncoderLoader | None) -> tuple[Worker, LoadInfo]:
    """Load pipelines, pick the attention backend, build and warm the worker (blocking; runs in a thread or
    in the engine process)."""
    import torch

    from model.attention import head_dims, select_backend, set_attention_backend
    from model.pipeline import compile_pipelines, load_pipelines
    from model.samplers import list_samplers

    s = settings
    device, dtype = _resolve_device_dtype(s)
    weights_dir = resolve_weights_dir(s)
    failures: dict[str, str] = {}
    pipelines = load_pipelines(
        weights_dir,
        s.models or None,
        device=device,
        dtype=dtype,
        text_encoder_loader=text_encoder_loader,
        vae_dtype=resolve_vae_dtype(s),
        failures=failures,
    )
    check_failures(pipelines, failures, s.skip_broken_models)
    fused_vae_blocks = use_vae_groupnorm(pipelines, device, s.vae_groupnorm)
    modules = {id(m): m for p in pipelines.values() for m in (p.unet, p.controlnet) if m is not None}
    dims: set[int] = set()
    for m in modules.values():
        dims |= head_dims(m)
    preferred = None if s.attention_backend == "auto" else s.attention_backend
    backend = select_backend(device, dtype, preferred, head_dims=dims or (64,))
    for m in modules.values():
        set_attention_backend(m, backend)
    info = LoadInfo(
        device=str(device),
        models={n: model_spec(p) for n, p in pipelines.items()},
        samplers=[SamplerInfo(**i) for i in list_samplers()],
        schedule_configs={n: dict(p.schedule.config) for n, p in pipelines.items()},
        unavailable=failures,
    )
    compiled = 0  # before warm-up: it compiles every bucket, then the graphs capture the compiled kernels
    if s.compile:
        compiled = compile_pipelines(pipelines, device, shapes_per_module=2 * len(s.batch_buckets))
    from server.loras import lora_dir

    worker = Worker(
        pipelines,
        s.batch_buckets,
        cuda_graphs=s.cuda_graphs,
        max_steps_ahead=s.max_steps_ahead,
        lora_dir=lora_dir(weights_dir),
    )
    worker.warmup()
    if compiled:
        # A shape not warmed (another image size) runs eagerly instead of compiling on the hot path.
        torch.compiler.set_stance("eager_on_recompile")
    vaes = {n: str(p.vae.dtype).removeprefix("torch.") for n, p in pipelines.items() if p.vae is not None}
    vae_norms = f", VAE GroupNorm+SiLU in Triton ({fused_vae_blocks} blocks)" if fused_vae_blocks else ""
    log.info(
        "loaded %s on %s/%s, attention %s, VAEs %s%s",
        sorted(pipelines), device, dtype, backend, vaes or "-", vae_norms,
    )  # fmt: skip
    return worker, info
