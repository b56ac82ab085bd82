"""create_app(settings): the FastAPI app; its lifespan loads models, warms every bucket, starts the engine.

Loading runs in the background so /health/live answers at once and /health/ready is 503 until the models
are loaded and warmed (and then 200); shutdown stops admitting, drains running requests, joins the engine.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.client import EngineClient, EngineLoadError, InprocClient
from server.devices import DevicesError, engine_devices, engine_settings
from server.heap import freeze_startup_heap
from server.lifecycle import RequestManager
from server.looplag import LoopLag, StallWatch
from server.metrics import Metrics
from server.schemas import ValidationContext, echo_input, utf8_text
from server.settings import Settings
from server.state import ServerState

if TYPE_CHECKING:
    from server.loading import LoadInfo

log = logging.getLogger("server")

COUNTED_ENDPOINTS = {
    "/generate": "generate",
    "/v1/images/generations": "images",
    "/v1/images/edits": "edits",
    "/v1/jobs": "jobs",
}


def _check_sampler(name: str, schedule_kind: str) -> str:
    """Raise ValueError unless ``name`` (stable name or alias) can sample a ``schedule_kind`` model."""
    from model.samplers import get_sampler

    get_sampler(name, schedule_kind)
    return name


def apply_load_info(state: ServerState, info: LoadInfo) -> None:
    """Fill the state routes validate against from what loading reported."""
    from model.samplers import get_sampler
    from model.schedules import Schedule

    schedules = {n: Schedule(c) for n, c in info.schedule_configs.items()}

    @functools.lru_cache(maxsize=4096)
    def check_steps(model: str, sampler: str, steps: int) -> None:
        """Raise unless ``sampler`` can make ``steps`` sigmas on ``model``'s schedule. Cached: the answer
        depends on these three alone (loaded schedules do not change), and building the sigmas costs
        every request ~50 µs of the front end's CPU; a refusal raises, so it is never cached."""
        schedule = schedules[model]
        get_sampler(sampler, schedule.kind).make_sigmas(schedule, steps)

    state.device = info.device
    state.models = info.models
    state.unavailable = dict(info.unavailable)
    state.samplers = info.samplers
    state.ctx = ValidationContext(
        models=state.models,
        check_sampler=_check_sampler,
        settings=state.settings,
        check_steps=check_steps,
        unavailable=state.unavailable,
    )


def openapi_schema(app: FastAPI) -> dict[str, Any]:
    """FastAPI's OpenAPI document plus the request bodies the routes parse by hand (``$ref``'d there)."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        from server.routes import OPENAPI_REQUEST_MODELS

        schema = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in OPENAPI_REQUEST_MODELS:
            body = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(body.pop("$defs", {}))
            components[model.__name__] = body
        app.openapi_schema = schema
    return app.openapi_schema


def use_engine_process(settings: Settings) -> bool:
    """``engine_mode``: "process" / "thread"; "auto" = a process for ``device`` cuda, and for device auto when
    the machine has an NVIDIA device node. Decided without importing torch, so that the engine process can
    start at once (the parent's own imports then overlap its loading); a wrong guess only picks the mode,
    the child resolves the device itself."""
    if settings.engine_mode != "auto":
        return settings.engine_mode == "process"
    if settings.device != "auto":
        return settings.device.startswith("cuda")
    return any(Path("/dev").glob("nvidia[0-9]*"))


def _import_for_validation() -> None:
    """The parent's torch-backed imports that ``apply_load_info`` needs (overlapped with the child's load)."""
    import model.samplers  # noqa: F401
    import model.schedules  # noqa: F401


# The front end sheds on its lag only with at least this many generation requests in flight: a loop that is
# behind with a few requests is not overloaded by traffic, and refusing more would not help it.
FRONT_SHED_MIN_IN_FLIGHT = 8
MAX_422_ERRORS = 20  # validation errors listed in a 422 (the message counts the rest)


class _CountRequests:
    """Pure ASGI middleware: requests_total and request_duration_seconds for the generation endpoints, and
    the front end's own load shedding: while the event loop runs more than ``shed_lag`` seconds behind, tick
    after tick (``LoopLag.sustained``), and at least FRONT_SHED_MIN_IN_FLIGHT generation requests are in
    flight, a new generation request gets 503 + Retry-After before its body is read; likewise while the
    work already admitted would by itself carry any new request past its deadline (``door``: admission's
    verdict taken before the body is read, parsed and validated, which costs the loop more than the
    answer)."""

    def __init__(
        self,
        app: ASGIApp,
        metrics: Metrics,
        lag: LoopLag | None = None,
        shed_lag: float = 0.0,
        door: Callable[[str], tuple[int, str, int] | None] | None = None,
    ):
        self.app = app
        self.metrics = metrics
        self.lag = lag
        self.shed_lag = shed_lag  # seconds; 0: never
        # endpoint -> (status, message, retry-after s) when admission would refuse any request of it
        # (RequestManager.door_verdict: a full queue, or work owed past the deadline): refused unread
        self.door = door
        self.in_flight = 0  # generation requests this middleware is handling now

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        endpoint = COUNTED_ENDPOINTS.get(scope.get("path", "")) if scope["type"] == "http" else None
        if endpoint is None or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        import time

        start = time.monotonic()
        if (
            self.shed_lag > 0
            and self.lag is not None
            and self.in_flight >= FRONT_SHED_MIN_IN_FLIGHT
            and (lag := self.lag.sustained()) > self.shed_lag
        ):
            self.metrics.front_shed_requests_total.inc()
            message = f"the server is overloaded (its event loop is {lag:.2f} s behind); retry later"
            await self._shed(scope, endpoint, 503, message, math.ceil(lag), send, start)
            return
        if self.door is not None and (verdict := self.door(endpoint)) is not None:
            await self._shed(scope, endpoint, *verdict, send, start)
            return
        # The deadline counts from here: time spent waiting for the event loop before admission is part of
        # what the client sees (RequestManager.submit sheds a request whose deadline has passed by then).
        scope.setdefault("state", {})["arrived"] = start
        status = [500]

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        self.in_flight += 1
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.in_flight -= 1
            state = scope.get("state", {})
            model = state.get("model") or "unknown"
            code = state.get("status") or status[0]
            self.metrics.requests_total.labels(model, endpoint, str(code)).inc()
            self.metrics.request_duration_seconds.labels(model, endpoint).observe(time.monotonic() - start)

    async def _shed(
        self, scope: Scope, endpoint: str, status: int, message: str, retry_after: int, send: Send,
        start: float,
    ) -> None:  # fmt: skip
        """``status`` (429 / 503) without reading the body: the cheapest answer a saturated server can
        give; Retry-After ``retry_after`` seconds, clamped to 1-60; counted and timed from ``start``."""
        import time

        self.metrics.requests_total.labels("unknown", endpoint, str(status)).inc()
        retry = str(max(1, min(60, retry_after)))
        headers = {"Retry-After": retry}
        response = JSONResponse({"detail": message, "message": message}, status, headers=headers)
        await response(scope, _no_body, send)
        self.metrics.request_duration_seconds.labels("unknown", endpoint).observe(time.monotonic() - start)


async def _no_body() -> Message:
    return {"type": "http.disconnect"}  # never called: a response does not read the request


def create_app(
    settings: Settings | None = None,
    *,
    text_encoder_loader: Callable[..., Any] | None = None,
    freeze_heap: bool = False,
) -> FastAPI:
    """Build the app. ``text_encoder_loader(device, dtype)`` overrides the text encoder (tests).
    ``freeze_heap``: once ready, freeze this process's start-up heap out of the cyclic GC's full collections
    (server/heap.py) — what ``python -m server`` does; not for a process that builds many apps (tests),
    where objects alive at that moment would never be collected."""
    from server.lora_routes import router as lora_router
    from server.playground import router as playground_router
    from server.routes import router

    settings = settings or Settings()
    metrics = Metrics()
    state = ServerState(settings=settings, metrics=metrics)
    lag = LoopLag(observe=metrics.event_loop_delay_seconds.observe)
    metrics.event_loop_lag_seconds.set_function(lag.current)
    stall_watch = StallWatch(lag, settings.loop_stall_log_seconds, metrics.event_loop_stalls_total.inc)

    def make_client(engine_settings: Settings) -> EngineClient:
        if use_engine_process(settings):
            from server.engine_process import ProcessClient

            return ProcessClient(engine_settings, text_encoder_loader)
        return InprocClient(engine_settings, text_encoder_loader)

    async def load_and_start() -> None:
        try:
            devices = engine_devices(settings)
        except DevicesError as exc:
            log.error("%s", exc)
            state.load_error = str(exc)
            return
        pinned = len(devices) > 1 or settings.devices.strip().lower() != "auto"
        clients = [make_client(engine_settings(settings, d) if pinned else settings) for d in devices]
        state.clients = clients
        state.client = clients[0]
        need = min(settings.min_engines or len(clients), len(clients))
        imports = asyncio.ensure_future(asyncio.to_thread(_import_for_validation))
        # Every engine loads at once (each in its own process on CUDA): start-up takes the slowest load,
        # not the sum.
        loads: list[asyncio.Future[LoadInfo]] = [
            asyncio.ensure_future(asyncio.to_thread(c.load)) for c in clients
        ]
        index: dict[asyncio.Future[LoadInfo], int] = {f: i for i, f in enumerate(loads)}
        infos: dict[int, LoadInfo] = {}
        errors: dict[int, str] = {}
        pending: set[asyncio.Future[LoadInfo]] = set(loads)
        while pending and len(infos) < need and len(errors) <= len(clients) - need:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for f in done:
                i = index[f]
                try:
                    infos[i] = f.result()
                except Exception as exc:  # noqa: BLE001 — reported by /health/ready, logged with traceback
                    log.error("engine %d (%s): model loading failed", i, devices[i], exc_info=exc)
                    own = isinstance(exc, EngineLoadError)  # its message names the underlying exception
                    errors[i] = str(exc) if own else f"{type(exc).__name__}: {exc}"
        if len(infos) < need:
            for f in pending:
                clients[index[f]].kill()
            if len(clients) == 1:
                state.load_error = errors[0]
            else:
                failed = sorted(errors.items())
                state.load_error = "; ".join(f"engine {i} ({devices[i]}): {m}" for i, m in failed)
            return
        await imports
        info = infos[min(infos)]
        apply_load_info(state, info)
        class_names = {
            name: [c.name for c in spec.conditioning.classes or []] for name, spec in info.models.items()
        }
        engine = RequestManager(
            clients,
            metrics,
            settings.max_queue_size,
            settings.max_finished_jobs,
            class_names=class_names,
            max_rows=settings.batch_rows,
            devices=devices if pinned else [info.device],
            shed=settings.shed_load,
            png_compress_level=settings.png_compress_level,
            shed_deadline_fraction=settings.shed_deadline_fraction,
        )
        for i, message in errors.items():
            engine.engine_failed(i, message)
        for e in engine.engines:
            if e.device.startswith("cuda"):
                metrics.set_gpu_memory_source(e.label, e.device, functools.partial(getattr, e, "gpu_bytes"))
        metrics.engines_serving.set_function(lambda: sum(e.client.serving for e in engine.engines))
        engine.start(asyncio.get_running_loop(), loaded=infos)
        state.engine = engine
        if freeze_heap:
            frozen = freeze_startup_heap()  # full GC collections no longer walk the start-up heap
            log.debug("froze %d start-up objects out of the cyclic GC's reach", frozen)
        state.ready = True
        served = ", ".join(sorted(state.models))
        on = ", ".join(devices[i] for i in sorted(infos)) if pinned else info.device
        log.info("ready: serving %s on %s; /health/ready answers 200", served, on)
        for f in pending:  # engines still loading join when they are ready (or are reported failed)
            f.add_done_callback(functools.partial(late_load, engine, index[f]))

    def late_load(engine: RequestManager, i: int, f: asyncio.Future) -> None:
        try:
            f.result()
        except Exception as exc:  # noqa: BLE001 — reported by /health/ready, logged with traceback
            log.error("engine %d: model loading failed", i, exc_info=exc)
            engine.engine_failed(i, str(exc))
            return
        engine.engine_loaded(i)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.load_task = asyncio.create_task(load_and_start())
        lag.start()
        stall_watch.start()
        try:
            yield
        finally:
            stall_watch.stop()
            await lag.stop()
            state.ready = False
            if not state.load_task.done():
                state.load_task.cancel()
            if state.engine is not None:
                await state.engine.stop(drain_timeout=min(30.0, settings.request_timeout_seconds))
            else:  # shut down while the engines were loading
                for client in state.clients:
                    client.kill()

    app = FastAPI(
        title="unet-server",
        version="0.1.0",
        description="Diffusion U-Net sampling with step-level continuous batching.",
        lifespan=lifespan,
        docs_url=None,  # server.routes serves /docs with Swagger UI's files from this package (no CDN)
        redoc_url=None,  # ReDoc would load from a CDN; /docs is the one documentation page
    )
    app.openapi = lambda: openapi_schema(app)  # type: ignore[method-assign]
    app.state.server = state
    app.include_router(router)
    app.include_router(lora_router)
    app.include_router(playground_router)
    # a request that meets a loop this far behind has lost a fifth of its deadline before admission sees it
    shed_lag = min(settings.shed_loop_lag_seconds, 0.2 * settings.request_timeout_seconds)
    shed_lag = shed_lag if settings.shed_load else 0.0

    def door(endpoint: str) -> tuple[int, str, int] | None:
        """Admission's verdict on any request of ``endpoint``, before its body is read (None: let it in)."""
        manager = state.engine
        if manager is None:
            return None
        timeout = settings.job_timeout_seconds if endpoint == "jobs" else settings.request_timeout_seconds
        return manager.door_verdict(timeout)

    app.add_middleware(_CountRequests, metrics=metrics, lag=lag, shed_lag=shed_lag, door=door)

    # Error bodies keep FastAPI's ``detail`` and add a top-level ``message`` (what OpenAI's client shows).
    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        # Every source of a 422 renders: a NaN/Infinity or lone-surrogate input is not echoed, texts are made
        # UTF-8-encodable (else rendering the 422 itself fails, as a 500).
        # At most MAX_422_ERRORS are rendered: a 100 KB body with 5,000 unknown fields otherwise held the
        # event loop 180-370 ms for a 796 kB answer on the 2-core CI machine (every request in flight waits
        # that out); capped, ~20 ms and 3 kB.
        found = exc.errors()
        raw = [
            {**e, "msg": utf8_text(e.get("msg", "")), "loc": tuple(map(utf8_text, e.get("loc", ()))),
             "input": echo_input(e.get("input"))}
            for e in found[:MAX_422_ERRORS]
        ]  # fmt: skip
        errors = jsonable_encoder(raw)
        message = "; ".join(str(e.get("msg", "")) for e in errors)
        if len(found) > MAX_422_ERRORS:
            message += f"; and {len(found) - MAX_422_ERRORS} more errors (the first {MAX_422_ERRORS} listed)"
        return JSONResponse({"detail": errors, "message": message}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        body = {"detail": exc.detail, "message": str(exc.detail)}
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        error_id = uuid.uuid4().hex[:12]
        log.error(
            "unhandled error (error_id=%s) on %s %s", error_id, request.method, request.url.path, exc_info=exc
        )
        message = f"internal error (error id {error_id})"
        return JSONResponse({"detail": message, "message": message, "error_id": error_id}, status_code=500)

    return app
