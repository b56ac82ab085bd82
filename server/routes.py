"""HTTP routes: /generate, /v1/images/generations, /v1/jobs…, /v1/models, /v1/samplers, /health, /metrics."""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import re
from collections.abc import Awaitable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Annotated, Any, TypeVar

import numpy as np
from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.requests import ClientDisconnect

from server.catalog import UnavailableModel
from server.lifecycle import QUEUE_FULL, EngineStopped, Overloaded, QueueFull, RequestManager, Task
from server.metrics import CONTENT_TYPE
from server.schemas import (
    GenerateRequest,
    GenerateResponse,
    JobError,
    JobInfo,
    ModelList,
    OpenAIEditRequest,
    OpenAIImage,
    OpenAIImageRequest,
    OpenAIImagesResponse,
    ResolvedRequest,
    SamplerList,
    Timings,
    field_error,
    resolve_generate,
    resolve_openai,
    resolve_openai_edit,
)
from server.state import ServerState

T = TypeVar("T")
SSE_KEEPALIVE_SECONDS = 15.0
# Deepest JSON nesting a body may have. Ours is 2 deep; the limit only keeps Python's recursive JSON parser
# (and pydantic) from being driven into RecursionError by a few hundred KB of brackets.
MAX_JSON_DEPTH = 32
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')
_JSON_OVERHEAD = 64 * 1024  # allowance for the non-image fields of a body


def _state(request: Request) -> ServerState:
    return request.app.state.server


# Dependencies are `async def` on purpose: FastAPI runs a plain `def` dependency in the thread pool, and
# that hop (thread hand-over, GIL ping-pong with the engine thread) costs more than the check itself.
async def require_api_key(request: Request) -> None:
    """Bearer-token check (constant time) when UNET_SERVER_API_KEY is set."""
    key = _state(request).settings.api_key
    if key is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    ok = scheme.lower() == "bearer" and hmac.compare_digest(
        token.strip().encode(), key.get_secret_value().encode()
    )
    if not ok:
        raise HTTPException(401, "missing or invalid API key", headers={"WWW-Authenticate": "Bearer"})


async def ready_engine(request: Request) -> RequestManager:
    state = _state(request)
    if not state.ready or state.engine is None:
        raise HTTPException(503, "models are loading; retry shortly", headers={"Retry-After": "5"})
    return state.engine


EngineDep = Annotated[RequestManager, Depends(ready_engine)]
router = APIRouter()
api = APIRouter(dependencies=[Depends(require_api_key)])


# -- body parsing ---------------------------------------------------------------------------------


def _body_errors(exc: ValidationError) -> RequestValidationError:
    errors = []
    for err in exc.errors(include_url=False):
        # the app's 422 handler makes what is echoed renderable (surrogates escaped, NaN/Infinity dropped)
        field = ".".join(str(p) for p in err["loc"])
        err = {**err, "loc": ("body", *err["loc"]), "msg": f"{field}: {err['msg']}" if field else err["msg"]}
        if {"control_image", "image", "mask_image"} & set(map(str, err["loc"])):
            err["input"] = None  # never echo an image back
        errors.append(err)
    return RequestValidationError(errors)


async def _read(request: Request, body: Awaitable[T]) -> T:
    """Await reading the request body; a client that hangs up mid-body is a 499 (nobody reads the answer),
    not a 500."""
    try:
        return await body
    except ClientDisconnect:
        request.state.status = 499  # the metrics middleware records this
        raise HTTPException(499, "client disconnected") from None


def json_depth(raw: bytes) -> int:
    """The deepest nesting of [ and { in a JSON text (strings skipped), without parsing it: one regex pass
    and a cumulative sum, linear in the body's size."""
    if raw.count(b"[") + raw.count(b"{") <= MAX_JSON_DEPTH:
        return 0  # cannot be deeper than the limit: skip the scan for ordinary bodies
    a = np.frombuffer(_JSON_STRING.sub(b'""', raw), dtype=np.uint8)
    steps = (a == ord("[")).astype(np.int32) + (a == ord("{")) - (a == ord("]")) - (a == ord("}"))
    return int(np.cumsum(steps).max(initial=0))


async def _json_body(request: Request, limit: int) -> Any:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise HTTPException(413, f"request body is larger than {limit} bytes")
    raw = await _read(request, request.body())
    if len(raw) > limit:
        raise HTTPException(413, f"request body is larger than {limit} bytes")
    depth = json_depth(raw)
    if depth > MAX_JSON_DEPTH:
        raise RequestValidationError(
            [{"type": "json_invalid", "loc": ("body",), "input": None,
              "msg": f"body: JSON nested {depth} levels deep; at most {MAX_JSON_DEPTH} are accepted"}]
        )  # fmt: skip
    try:
        data = json.loads(raw or b"null")
    except (ValueError, RecursionError):  # JSONDecodeError, UnicodeDecodeError, over-long integers
        raise RequestValidationError(
            [{"type": "json_invalid", "loc": ("body",), "msg": "body: not valid JSON", "input": None}]
        ) from None
    if not isinstance(data, dict):
        raise RequestValidationError(
            [{"type": "model_type", "loc": ("body",), "msg": "body: expected a JSON object", "input": None}]
        )
    return data


@dataclass
class Uploads:
    """Image files of a multipart body, raw bytes by field (None: not uploaded)."""

    control_image: bytes | None = None
    image: bytes | None = None
    mask_image: bytes | None = None


UPLOAD_FIELDS = ("control_image", "image", "mask_image")


async def _upload(value: UploadFile, field: str, limit: int) -> bytes:
    """An uploaded file's bytes, at most ``limit`` (a 422 naming the field beyond it)."""
    data = await value.read(limit + 1)
    if len(data) > limit:
        raise field_error(field, f"{field.replace('_', ' ')} is larger than {limit} bytes")
    return data


async def _generate_body(request: Request, state: ServerState) -> tuple[GenerateRequest, Uploads]:
    """A GenerateRequest from JSON or multipart (``control_image``, ``image``, ``mask_image`` as files or
    base64 fields)."""
    s = state.settings
    limit = s.max_control_image_bytes
    files = Uploads()
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        form = await _read(
            request,
            request.form(
                max_files=len(UPLOAD_FIELDS), max_fields=32, max_part_size=2 * limit + _JSON_OVERHEAD
            ),
        )
        try:
            data: dict[str, Any] = {}
            for key, value in form.multi_items():
                if isinstance(value, UploadFile):
                    if key not in UPLOAD_FIELDS:
                        message = f"unexpected file upload ({', '.join(UPLOAD_FIELDS)} take files)"
                        raise field_error(key, message)
                    setattr(files, key, await _upload(value, key, limit))
                else:
                    data[key] = value
        finally:
            await form.close()
    else:
        # base64 text of up to three images (control map, init image, mask): 4/3 of their bytes each
        data = await _json_body(request, 4 * limit + _JSON_OVERHEAD)
    try:
        return GenerateRequest.model_validate(data), files
    except ValidationError as exc:
        raise _body_errors(exc) from None


async def _resolve(body: GenerateRequest, state: ServerState, files: Uploads) -> ResolvedRequest:
    """``resolve_generate``: in the thread pool when there is an image to decode (CPU-bound), else
    inline — a pool hop costs more than checking a few fields, and under load it is GIL time the engine
    thread waits for."""
    assert state.ctx is not None
    images = (files.control_image, files.image, files.mask_image, body.control_image, body.image,
              body.mask_image)  # fmt: skip
    if all(i is None for i in images) and not body.controlnets:
        return resolve_generate(body, state.ctx, None)
    call = partial(
        resolve_generate, body, state.ctx, files.control_image, image_bytes=files.image,
        mask_bytes=files.mask_image,
    )  # fmt: skip
    return await run_in_threadpool(call)


def _openai_images(task: Task, headers: dict[str, str] | None = None) -> Response:
    """OpenAI's images response for a finished task (the generations and edits routes), or its error."""
    try:
        _raise_for(task)
    except _ServerFault as exc:
        return _fault_response(exc)
    out = OpenAIImagesResponse(
        created=int(task.created_wall),
        data=[OpenAIImage(b64_json=base64.b64encode(p).decode()) for p in task.pngs or []],
    )
    return JSONResponse(out.model_dump(), headers=headers)


async def _submit(
    request: Request,
    engine: RequestManager,
    resolved: ResolvedRequest,
    endpoint: str,
    timeout: float,
    is_job: bool,
    preview_every: int = 0,
) -> Task:
    request.state.model = resolved.model
    try:
        arrived = getattr(request.state, "arrived", None)  # set by the app's request-counting middleware
        return engine.submit(
            resolved, endpoint, timeout, is_job=is_job, preview_every=preview_every, arrived=arrived
        )
    except QueueFull:
        raise HTTPException(429, QUEUE_FULL, headers={"Retry-After": str(engine.retry_after())}) from None
    except Overloaded as exc:
        request.state.status = 503
        raise HTTPException(503, str(exc), headers={"Retry-After": str(exc.retry_after)}) from None
    except EngineStopped as exc:
        raise HTTPException(503, str(exc), headers={"Retry-After": "5"}) from None


async def _until_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _wait(request: Request, engine: RequestManager, task: Task, timeout: float) -> None:
    """Wait for ``task``; a client disconnect (or a stuck engine) cancels it."""
    waiter = asyncio.ensure_future(task.wait())
    watcher = asyncio.ensure_future(_until_disconnect(request))
    try:
        done, _ = await asyncio.wait({waiter, watcher}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
        watcher.cancel()
    if waiter in done or task.done:
        return
    engine.cancel(task.id)
    if watcher in done:
        request.state.status = 499  # nobody reads the response; the metrics middleware records this
        raise HTTPException(499, "client disconnected")
    raise HTTPException(504, "request passed its deadline")


def _raise_for(task: Task) -> None:
    if task.status == "completed":
        return
    if task.status == "cancelled":
        raise HTTPException(409, "request was cancelled")
    status = task.error_status or 500
    if status == 500:
        raise _ServerFault(task.error_message or "internal error", task.error_id)
    raise HTTPException(status, task.error_message or "request failed")


class _ServerFault(Exception):
    def __init__(self, message: str, error_id: str | None) -> None:
        self.message, self.error_id = message, error_id


def _fault_response(exc: _ServerFault) -> JSONResponse:
    body = {"detail": exc.message, "message": exc.message, "error_id": exc.error_id}
    return JSONResponse(body, status_code=500)


def _generate_response(task: Task) -> GenerateResponse:
    r = task.request
    return GenerateResponse(
        id=task.id,
        model=r.model,
        sampler=r.sampler,
        num_inference_steps=r.num_inference_steps,
        guidance_scale=r.guidance_scale,
        width=r.width,
        height=r.height,
        seeds=r.seeds,
        images=[base64.b64encode(p).decode() for p in task.pngs or []],
        timings=Timings(**task.timings()),
        warnings=task.warnings,
        strength=r.strength if r.image is not None else None,
        inpaint_mode=r.inpaint_mode,
    )


def _image_headers(r: ResolvedRequest) -> dict[str, str]:
    """Image-to-image / inpainting response headers: the strength and which inpainting mode ran."""
    if r.image is None:
        return {}
    headers = {"X-Strength": str(r.strength)}
    if r.inpaint_mode is not None:
        headers["X-Inpaint-Mode"] = r.inpaint_mode
    return headers


def _job_info(task: Task, engine: RequestManager) -> JobInfo:
    error = None
    if task.status == "failed":
        error = JobError(status_code=task.error_status or 500, message=task.error_message or "",
                         error_id=task.error_id)
    return JobInfo(
        id=task.id,
        status=task.status,
        model=task.request.model,
        step=task.step,
        total_steps=task.total_steps,
        queue_position=engine.queue_position(task.id) if task.status == "queued" else None,
        result=_generate_response(task) if task.status == "completed" else None,
        error=error,
    )


# -- OpenAPI: request bodies (the routes parse them by hand) and error responses --------------------
# Request schemas are added to components.schemas by ``server.app.openapi_schema`` (FastAPI registers only
# the models a route declares as parameters).
OPENAPI_REQUEST_MODELS: tuple[type[BaseModel], ...] = (GenerateRequest, OpenAIImageRequest, OpenAIEditRequest)


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


_GENERATE_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": _ref("GenerateRequest")},
            "multipart/form-data": {
                "schema": {
                    "allOf": [_ref("GenerateRequest")],
                    "properties": {
                        "control_image": {
                            "type": "string", "format": "binary", "description": "The control map as a file.",
                        },
                    },
                }
            },
        },
    }
}
_OPENAI_BODY = {
    "requestBody": {"required": True, "content": {"application/json": {"schema": _ref("OpenAIImageRequest")}}}
}


class ErrorBody(BaseModel):
    """Every error: FastAPI's ``detail`` and a top-level ``message`` (what OpenAI's client shows)."""

    detail: str = Field(description="What went wrong.")
    message: str = Field(description="The same, for OpenAI-style clients.")


class FieldError(BaseModel):
    loc: list[str | int] = Field(description='Where: ["body", "<field>"].')
    msg: str = Field(description='"<field>: <what is wrong>", e.g. the configured cap it exceeds.')
    type: str


class ValidationErrorBody(BaseModel):
    """422: one entry per invalid field; ``message`` joins their messages."""

    detail: list[FieldError]
    message: str


class FaultBody(ErrorBody):
    """500: a server fault (also a model that produced non-finite values); no traceback, an id to find it in
    the server's log."""

    error_id: str | None = Field(None, description="Quote it when reporting; the log line carries it.")


_RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before retrying.",
                               "schema": {"type": "integer"}}}
_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "No valid bearer token (when UNET_SERVER_API_KEY is set)."},
    413: {"model": ErrorBody, "description": "The request body is too large."},
    422: {"model": ValidationErrorBody, "description": "A field is invalid; `detail[].loc` names it."},
    429: {"model": ErrorBody, "description": "The queue is full.", "headers": _RETRY_AFTER},
    500: {"model": FaultBody, "description": "A server fault, with an `error_id`."},
    503: {"model": ErrorBody, "description": "Models loading or engine restarting.", "headers": _RETRY_AFTER},
    504: {"model": ErrorBody, "description": "Past its deadline (UNET_SERVER_REQUEST_TIMEOUT_SECONDS)."},
}


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {c: _ERRORS[c] for c in codes}


# -- generation -----------------------------------------------------------------------------------


@api.post(
    "/generate",
    response_model=GenerateResponse,
    openapi_extra=_GENERATE_BODY,
    responses={
        200: {
            "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
            "description": "JSON, or the PNG itself with `Accept: image/png` and one image.",
        },
        **_errors(401, 413, 422, 429, 500, 503, 504),
    },
)
async def generate(request: Request, engine: EngineDep) -> Response:
    """Generate images; waits for the result. A client that disconnects cancels its request."""
    state = _state(request)
    body, files = await _generate_body(request, state)
    if body.preview_every:
        raise field_error("preview_every", "previews are sent on a job's event stream: use POST /v1/jobs")
    resolved = await _resolve(body, state, files)
    timeout = state.settings.request_timeout_seconds
    task = await _submit(request, engine, resolved, "generate", timeout, is_job=False)
    await _wait(request, engine, task, timeout + 30.0)
    try:
        _raise_for(task)
    except _ServerFault as exc:
        return _fault_response(exc)
    timings = task.timings()
    if "image/png" in request.headers.get("accept", "") and resolved.num_images == 1:
        headers = {
            "X-Request-Id": task.id,
            "X-Seed": str(resolved.seed),
            "X-Model": resolved.model,
            "X-Sampler": resolved.sampler,
            "X-Num-Inference-Steps": str(resolved.num_inference_steps),
            "X-Queue-Seconds": f"{timings['queue_seconds']:.6f}",
            "X-Sampling-Seconds": f"{timings['sampling_seconds']:.6f}",
            "X-Total-Seconds": f"{timings['total_seconds']:.6f}",
            **_image_headers(resolved),
        }
        return Response((task.pngs or [b""])[0], media_type="image/png", headers=headers)
    return JSONResponse(_generate_response(task).model_dump())


@api.post(
    "/v1/images/generations",
    response_model=OpenAIImagesResponse,
    openapi_extra=_OPENAI_BODY,
    responses=_errors(401, 413, 422, 429, 500, 503, 504),
)
async def openai_images(request: Request, engine: EngineDep) -> Response:
    """OpenAI-compatible image generation (response_format b64_json). Class models take a class name."""
    state = _state(request)
    data = await _json_body(request, _JSON_OVERHEAD)
    try:
        body = OpenAIImageRequest.model_validate(data)
    except ValidationError as exc:
        raise _body_errors(exc) from None
    assert state.ctx is not None
    resolved = resolve_openai(body, state.ctx)
    timeout = state.settings.request_timeout_seconds
    task = await _submit(request, engine, resolved, "images", timeout, is_job=False)
    await _wait(request, engine, task, timeout + 30.0)
    return _openai_images(task)


_OPENAI_EDIT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "allOf": [_ref("OpenAIEditRequest")],
                    "required": ["image", "prompt"],
                    "properties": {
                        "image": {"type": "string", "format": "binary", "description": "The image to edit."},
                        "mask": {
                            "type": "string", "format": "binary",
                            "description": "PNG with alpha, the image's size: transparent pixels are edited.",
                        },
                    },
                }
            }
        },
    }
}


@api.post(
    "/v1/images/edits",
    response_model=OpenAIImagesResponse,
    openapi_extra=_OPENAI_EDIT_BODY,
    responses=_errors(401, 413, 422, 429, 500, 503, 504),
)
async def openai_image_edits(request: Request, engine: EngineDep) -> Response:
    """OpenAI-compatible image edits (multipart: image, optional mask, prompt): inpainting where the mask (or
    the image) is transparent, else image-to-image. Headers: X-Inpaint-Mode, X-Strength."""
    state = _state(request)
    limit = state.settings.max_control_image_bytes
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        message = "send multipart/form-data with the image as a file (as OpenAI's images.edit)"
        raise field_error("image", message)
    part = 2 * limit + _JSON_OVERHEAD
    form = await _read(request, request.form(max_files=2, max_fields=32, max_part_size=part))
    image = mask = None
    try:
        data: dict[str, Any] = {}
        for key, value in form.multi_items():
            if not isinstance(value, UploadFile):
                data[key] = value
            elif key in ("image", "image[]"):
                if image is not None:
                    raise field_error("image", "one image is edited per request; several were sent")
                image = await _upload(value, "image", limit)
            elif key == "mask":
                mask = await _upload(value, "mask", limit)
            else:
                raise field_error(key, "unexpected file upload (image and mask take files)")
    finally:
        await form.close()
    if image is None:
        raise field_error("image", "required: the image to edit, as a file")
    try:
        body = OpenAIEditRequest.model_validate(data)
    except ValidationError as exc:
        raise _body_errors(exc) from None
    assert state.ctx is not None
    resolved = await run_in_threadpool(resolve_openai_edit, body, state.ctx, image, mask)
    timeout = state.settings.request_timeout_seconds
    task = await _submit(request, engine, resolved, "edits", timeout, is_job=False)
    await _wait(request, engine, task, timeout + 30.0)
    return _openai_images(task, headers=_image_headers(resolved))


# -- jobs -----------------------------------------------------------------------------------------


def _job(engine: RequestManager, job_id: str) -> Task:
    task = engine.jobs.get(job_id)
    if task is None:
        raise HTTPException(404, f"no job {job_id!r}")
    return task


@api.post(
    "/v1/jobs",
    status_code=202,
    response_model=JobInfo,
    openapi_extra=_GENERATE_BODY,
    responses=_errors(401, 413, 422, 429, 500, 503),
)
async def create_job(request: Request, engine: EngineDep) -> Response:
    """Queue a generation; poll GET /v1/jobs/{id} or stream GET /v1/jobs/{id}/events."""
    state = _state(request)
    body, files = await _generate_body(request, state)
    resolved = await _resolve(body, state, files)
    timeout = state.settings.job_timeout_seconds
    task = await _submit(
        request, engine, resolved, "jobs", timeout, is_job=True, preview_every=body.preview_every
    )
    info = _job_info(task, engine)
    return JSONResponse(info.model_dump(), status_code=202, headers={"Location": f"/v1/jobs/{task.id}"})


_NO_JOB: dict[int | str, dict[str, Any]] = {404: {"model": ErrorBody, "description": "No such job."}}


@api.get("/v1/jobs/{job_id}", response_model=JobInfo, responses=_NO_JOB)
async def get_job(job_id: str, engine: EngineDep) -> JobInfo:
    """Status, step, total steps, queue position; the result once completed."""
    return _job_info(_job(engine, job_id), engine)


@api.post(
    "/v1/jobs/{job_id}/cancel",
    response_model=JobInfo,
    responses={
        404: {"model": ErrorBody, "description": "No such job."},
        409: {"model": ErrorBody, "description": "The job has already finished (or its sampling has)."},
    },
)
async def cancel_job(job_id: str, engine: EngineDep) -> Response:
    """Cancel a queued or running job (409 when it has already finished)."""
    task = _job(engine, job_id)
    if not engine.cancel(job_id):
        # "running" here means sampling has finished and the images are being read back and encoded
        what = "finishing (sampling done)" if task.status == "running" else task.status
        message = f"job {job_id} is already {what}"
        return JSONResponse({"detail": message, "message": message, "status": task.status}, status_code=409)
    return JSONResponse(_job_info(task, engine).model_dump())


@api.get(
    "/v1/jobs/{job_id}/events",
    response_class=StreamingResponse,
    responses={
        200: {
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
            "description": "`event: <name>` / `data: <JSON>` pairs until completed, failed or cancelled.",
        },
        404: {"model": ErrorBody, "description": "No such job."},
    },
)
async def job_events(job_id: str, request: Request, engine: EngineDep) -> Response:
    """Server-sent events: queued, started, progress (per step), then completed, failed or cancelled."""
    task = _job(engine, job_id)
    queue = task.subscribe()

    async def stream() -> Any:
        try:
            while True:
                try:
                    event, data = await asyncio.wait_for(queue.get(), SSE_KEEPALIVE_SECONDS)
                except asyncio.TimeoutError:
                    yield ": keep-alive\n\n"
                    continue
                if event == "queued" and task.status == "queued":
                    data = {**data, "queue_position": engine.queue_position(task.id)}
                if event == "completed":
                    data = _job_info(task, engine).model_dump()
                yield f"event: {event}\ndata: {json.dumps(data)}\n\n"
                if event in ("completed", "failed", "cancelled"):
                    return
        finally:
            task.unsubscribe(queue)

    return StreamingResponse(
        stream(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


# -- catalogue, health, metrics -------------------------------------------------------------------


@api.get("/v1/models", response_model=ModelList)
async def list_models(request: Request, engine: EngineDep) -> ModelList:
    """Loaded models: conditioning each accepts (classes with names, text, control) and defaults."""
    state = _state(request)
    return ModelList(data=list(state.models.values()), unavailable=_unavailable(state))


def _unavailable(state: ServerState) -> list[UnavailableModel]:
    return [UnavailableModel(model=n, error=e) for n, e in sorted(state.unavailable.items())]


@api.get("/v1/samplers", response_model=SamplerList)
async def list_samplers(request: Request, engine: EngineDep) -> SamplerList:
    """Sampler names accepted by ``sampler`` (aliases included)."""
    return SamplerList(data=_state(request).samplers)


@router.get("/health/live")
async def live() -> dict[str, str]:
    """The process answers (no model or engine check)."""
    return {"status": "ok"}


@router.get("/health/ready")
async def ready(request: Request) -> Response:
    """200 once every model is loaded and every batch bucket warmed; 503 before (or if loading failed)."""
    state = _state(request)
    if state.ready and state.engine is not None and state.engine.running:
        unavailable = [u.model_dump() for u in _unavailable(state)]
        body = {"status": "ready", "models": sorted(state.models), "device": state.device}
        return JSONResponse({**body, "unavailable": unavailable, "engines": state.engine.engine_states()})
    failure = state.load_error or getattr(state.engine, "failure", None)
    if failure:
        return JSONResponse({"status": "failed", "error": failure}, status_code=503)
    return JSONResponse({"status": "loading"}, status_code=503, headers={"Retry-After": "5"})


@router.get(
    "/metrics",
    response_class=PlainTextResponse,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                     "description": "Prometheus text exposition format 0.0.4."}},
)
async def metrics(request: Request) -> Response:
    """Prometheus text exposition."""
    return Response(_state(request).metrics.render(), media_type=CONTENT_TYPE)


# -- /docs: Swagger UI from this server's own files (no CDN; the page works offline) ------------------

SWAGGER_DIR = Path(__file__).resolve().parent / "static" / "swagger"
_SWAGGER_TYPES = {
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "swagger-ui.css": "text/css; charset=utf-8",
    "favicon-32x32.png": "image/png",
    "LICENSE": "text/plain; charset=utf-8",
    "NOTICE": "text/plain; charset=utf-8",
}


@router.get("/docs", include_in_schema=False)
async def swagger_ui(request: Request) -> HTMLResponse:
    """Swagger UI for /openapi.json; its script, style sheet and icon come from /docs/static/."""
    root = request.scope.get("root_path", "")
    return get_swagger_ui_html(
        openapi_url=f"{root}{request.app.openapi_url}",
        title=f"{request.app.title} - API docs",
        swagger_js_url=f"{root}/docs/static/swagger-ui-bundle.js",
        swagger_css_url=f"{root}/docs/static/swagger-ui.css",
        swagger_favicon_url=f"{root}/docs/static/favicon-32x32.png",
    )


@router.get("/docs/static/{name}", include_in_schema=False)
async def swagger_asset(name: str) -> Response:
    """One of the vendored Swagger UI files (a fixed list: no path leaves server/static/swagger/)."""
    media_type = _SWAGGER_TYPES.get(name)
    path = SWAGGER_DIR / name
    if media_type is None or not path.is_file():
        raise HTTPException(404, f"no docs asset {name!r}")
    headers = {"Cache-Control": "public, max-age=86400"}
    return Response(path.read_bytes(), media_type=media_type, headers=headers)


router.include_router(api)
