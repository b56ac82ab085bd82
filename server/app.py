"""create_app(settings): the FastAPI app; its lifespan loads models, warms every bucket, starts the engine.

Loading runs in the background so /health/live answers at once and /health/ready is 503 until the models
are loaded and warmed (and then 200); shutdown stops admitting, drains running requests, joins the engine.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.metrics import Metrics
from server.schemas import (
    ClassInfo,
    Conditioning,
    ControlInfo,
    ModelDefaults,
    ModelSpec,
    SamplerInfo,
    ValidationContext,
)
from server.settings import Settings

log = logging.getLogger("server")

COUNTED_ENDPOINTS = {"/generate": "generate", "/v1/images/generations": "images", "/v1/jobs": "jobs"}


@dataclass
class ServerState:
    """What routes need, hung on ``app.state.server``."""

    settings: Settings
    metrics: Metrics
    engine: Any = None  # server.engine.Engine once loaded
    ready: bool = False
    load_error: str | None = None
    models: dict[str, ModelSpec] = field(default_factory=dict)
    samplers: list[SamplerInfo] = field(default_factory=list)
    ctx: ValidationContext | None = None
    device: str = ""
    load_task: asyncio.Task | None = None
    engine_process: Any = None  # server.engine_process.EngineProcess while it loads (engine_mode=process)


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


def _check_sampler(name: str, schedule_kind: str) -> str:
    """Raise ValueError unless ``name`` (stable name or alias) can sample a ``schedule_kind`` model."""
    from model.samplers import get_sampler

    get_sampler(name, schedule_kind)
    return name


def model_spec(p: Any) -> ModelSpec:
    """The public description of a loaded ``model.pipeline.Pipeline``."""
    classes = None
    if p.class_names:
        classes = [ClassInfo(index=i, name=n) for i, n in enumerate(p.class_names)]
    control = None
    if p.control:
        control = ControlInfo(
            type=str(p.control.get("type", "control")), channels=int(p.control.get("channels", 1))
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
        null_class_label=p.null_class_label,
        conditioning=Conditioning(classes=classes, text=p.kind == "text", control=control),
        defaults=ModelDefaults(
            sampler=d.sampler,
            num_inference_steps=d.num_inference_steps,
            guidance_scale=d.guidance_scale,
            width=d.width,
            height=d.height,
        ),
    )


@dataclass
class LoadInfo:
    """What the HTTP side needs from loading (picklable: an engine process sends it to the parent)."""

    device: str
    models: dict[str, ModelSpec]
    samplers: list[SamplerInfo]
    schedule_configs: dict[str, dict[str, Any]]  # model id -> its scheduler config (to check step counts)


def load_worker(settings: Settings, text_encoder_loader: Callable[..., Any] | None) -> tuple[Any, LoadInfo]:
    """Load pipelines, pick the attention backend, build and warm the worker (blocking; runs in a thread or
    in the engine process)."""
    import torch

    from model.attention import head_dims, select_backend, set_attention_backend
    from model.pipeline import compile_pipelines, load_pipelines
    from model.samplers import list_samplers
    from server.worker import Worker

    s = settings
    device, dtype = _resolve_device_dtype(s)
    weights_dir = s.weights_dir
    if not weights_dir.exists() and not weights_dir.is_absolute():
        # Installed console script run outside the repo: fall back to the weights beside the package.
        beside = Path(__file__).resolve().parents[1] / weights_dir
        if beside.is_dir():
            weights_dir = beside
    pipelines = load_pipelines(
        weights_dir, s.models or None, device=device, dtype=dtype, text_encoder_loader=text_encoder_loader
    )
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
    )
    compiled = 0  # before warm-up: it compiles every bucket, then the graphs capture the compiled kernels
    if s.compile:
        compiled = compile_pipelines(pipelines, device, shapes_per_module=2 * len(s.batch_buckets))
    worker = Worker(pipelines, s.batch_buckets, cuda_graphs=s.cuda_graphs, max_steps_ahead=s.max_steps_ahead)
    worker.warmup()
    if compiled:
        # A shape not warmed (another image size) runs eagerly instead of compiling on the hot path.
        torch.compiler.set_stance("eager_on_recompile")
    log.info("loaded %s on %s/%s, attention %s", sorted(pipelines), device, dtype, backend)
    return worker, info


def apply_load_info(state: ServerState, info: LoadInfo) -> None:
    """Fill the state routes validate against from what loading reported."""
    from model.samplers import get_sampler
    from model.schedules import Schedule

    schedules = {n: Schedule(c) for n, c in info.schedule_configs.items()}

    def check_steps(model: str, sampler: str, steps: int) -> None:
        schedule = schedules[model]
        get_sampler(sampler, schedule.kind).make_sigmas(schedule, steps)

    state.device = info.device
    state.models = info.models
    state.samplers = info.samplers
    state.ctx = ValidationContext(
        models=state.models, check_sampler=_check_sampler, settings=state.settings, check_steps=check_steps
    )


def use_engine_process(settings: Settings) -> bool:
    """``engine_mode``: "process" / "thread"; "auto" = a process for ``device`` cuda, and for device auto when
    the machine has an NVIDIA device node. Decided without importing torch, so that the engine process can
    start at once (the parent's own imports then overlap its loading); a wrong guess only picks the mode,
    the child resolves the device itself."""
    if settings.engine_mode != "auto":
        return settings.engine_mode == "process"
    if settings.device != "auto":
        return settings.device == "cuda"
    return any(Path("/dev").glob("nvidia[0-9]*"))


def _import_for_validation() -> None:
    """The parent's torch-backed imports that ``apply_load_info`` needs (overlapped with the child's load)."""
    import model.samplers  # noqa: F401
    import model.schedules  # noqa: F401


class _CountRequests:
    """Pure ASGI middleware: requests_total and request_duration_seconds for the generation endpoints."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        endpoint = COUNTED_ENDPOINTS.get(scope.get("path", "")) if scope["type"] == "http" else None
        if endpoint is None or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        import time

        start = time.monotonic()
        status = [500]

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            state = scope.get("state", {})
            model = state.get("model") or "unknown"
            code = state.get("status") or status[0]
            self.metrics.requests_total.labels(model, endpoint, str(code)).inc()
            self.metrics.request_duration_seconds.labels(model, endpoint).observe(time.monotonic() - start)


def create_app(
    settings: Settings | None = None,
    *,
    text_encoder_loader: Callable[..., Any] | None = None,
) -> FastAPI:
    """Build the app. ``text_encoder_loader(device, dtype)`` overrides the text encoder (tests)."""
    from server.engine import Engine
    from server.routes import router

    settings = settings or Settings()
    metrics = Metrics()
    state = ServerState(settings=settings, metrics=metrics)

    async def load_and_start() -> None:
        engine: Any
        try:
            if use_engine_process(settings):
                from server.engine_process import EngineProcess

                engine = EngineProcess(settings, metrics, text_encoder_loader)
                state.engine_process = engine  # stopped at shutdown even if loading is cancelled
                imports = asyncio.ensure_future(asyncio.to_thread(_import_for_validation))
                info = await asyncio.to_thread(engine.launch)
                await imports
            else:
                worker, info = await asyncio.to_thread(load_worker, settings, text_encoder_loader)
                engine = Engine(worker, settings.max_queue_size, metrics, settings.max_finished_jobs)
        except Exception as exc:  # noqa: BLE001 — reported by /health/ready, logged with traceback
            log.exception("model loading failed")
            own = type(exc).__name__ == "EngineLoadError"  # the child's message already names its exception
            state.load_error = str(exc) if own else f"{type(exc).__name__}: {exc}"
            return
        apply_load_info(state, info)
        if info.device.startswith("cuda"):
            if isinstance(engine, Engine):
                import torch

                metrics.set_gpu_memory_source(lambda: float(torch.cuda.memory_allocated(info.device)))
            else:
                metrics.set_gpu_memory_source(lambda: engine.gpu_bytes)
        engine.start(asyncio.get_running_loop())
        state.engine = engine
        state.ready = True
        log.info("ready")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.load_task = asyncio.create_task(load_and_start())
        try:
            yield
        finally:
            state.ready = False
            if not state.load_task.done():
                state.load_task.cancel()
            if state.engine is not None:
                await state.engine.stop(drain_timeout=min(30.0, settings.request_timeout_seconds))
            elif state.engine_process is not None:  # shut down while the engine process was loading
                state.engine_process.kill()

    app = FastAPI(
        title="unet-server",
        version="0.1.0",
        description="Diffusion U-Net sampling with step-level continuous batching.",
        lifespan=lifespan,
    )
    app.state.server = state
    app.include_router(router)
    app.add_middleware(_CountRequests, metrics=metrics)

    # Error bodies keep FastAPI's ``detail`` and add a top-level ``message`` (what OpenAI's client shows).
    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = jsonable_encoder(exc.errors())
        message = "; ".join(str(e.get("msg", "")) for e in errors)
        return JSONResponse({"detail": errors, "message": message}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        body = {"detail": exc.detail, "message": str(exc.detail)}
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        error_id = uuid.uuid4().hex[:12]
        log.error("unhandled error (error_id=%s) on %s %s", error_id, request.method, request.url.path,
                  exc_info=exc)
        message = f"internal error (error id {error_id})"
        return JSONResponse({"detail": message, "message": message, "error_id": error_id}, status_code=500)

    return app
