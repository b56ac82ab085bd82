"""/v1/loras: list, upload and delete LoRA adapters (server.loras); the app includes ``router``.

* ``GET /v1/loras`` -> ``{"object": "list", "data": [adapter, ...]}``, each with its name, bytes, sha256,
  format, rank, components, layer count, the served models it fits and, for the others, why not.
* ``POST /v1/loras`` uploads one: multipart (``name`` field + ``file``) or the raw file as the body with
  ``?name=``. 201 with the adapter; 413 past ``UNET_SERVER_LORA_MAX_UPLOAD_BYTES``; 422 for a bad name, a
  file that is not safetensors (pickle is never read), keys that match no layer or another architecture
  (each served model's reason); 409 when the name exists.
* ``DELETE /v1/loras/{name}`` -> 200; 404 unknown; 409 while a queued or running request names it.

File work (hashing, header parsing) runs in the thread pool, never on the event loop.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from model.lora import LoraError
from server.loras import LoraConflict, LoraNotFound, LoraSettings, LoraTooLarge, registry_for
from server.routes import require_api_key
from server.schemas import field_error
from server.state import ServerState

router = APIRouter(dependencies=[Depends(require_api_key)], tags=["loras"])

_FORM_OVERHEAD = 64 * 1024  # multipart boundaries and the name field, beyond the file itself


def _state(request: Request) -> ServerState:
    return request.app.state.server


def _models(state: ServerState) -> list[str]:
    return sorted(state.models)


def requests_naming(state: ServerState, name: str) -> int:
    """How many queued or running requests name adapter ``name``."""
    engine = state.engine
    if engine is None:
        return 0
    return sum(any(ref.name == name for ref in r.loras) for r in engine.live_requests())


@router.get("/v1/loras")
async def list_loras(request: Request) -> dict[str, Any]:
    state = _state(request)
    registry = registry_for(state.settings)
    infos = await run_in_threadpool(registry.list, _models(state))
    return {"object": "list", "data": [i.as_dict() for i in infos]}


async def _read_capped(request: Request, cap: int) -> tuple[str | None, bytes]:
    """(name from the form or query, file bytes); 413 past ``cap``."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > cap + _FORM_OVERHEAD:
        raise HTTPException(
            413, f"the adapter exceeds the cap of {cap} bytes (UNET_SERVER_LORA_MAX_UPLOAD_BYTES)"
        )
    ctype = request.headers.get("content-type", "")
    name = request.query_params.get("name")
    if ctype.startswith("multipart/form-data"):
        form = await request.form()
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise field_error("file", "send the adapter as a multipart file field named 'file'")
        data = await upload.read(cap + 1)
        field_name = form.get("name")
        name = field_name if isinstance(field_name, str) else name
        if name is None and upload.filename:
            name = upload.filename.rsplit("/", 1)[-1].removesuffix(".safetensors")
    else:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > cap:
                break
            chunks.append(chunk)
        data = b"".join(chunks) if size <= cap else b"\0" * (cap + 1)
    if len(data) > cap:
        raise HTTPException(
            413, f"the adapter exceeds the cap of {cap} bytes (UNET_SERVER_LORA_MAX_UPLOAD_BYTES)"
        )
    return name, data


@router.post("/v1/loras", status_code=201)
async def upload_lora(request: Request) -> JSONResponse:
    state = _state(request)
    if not state.ready:
        raise HTTPException(503, "models are loading; retry shortly", headers={"Retry-After": "5"})
    registry = registry_for(state.settings)
    name, data = await _read_capped(request, LoraSettings().max_upload_bytes)
    if not name:
        raise field_error("name", "name the adapter (form field or ?name=)")
    try:
        info = await run_in_threadpool(registry.add, name, data, _models(state))
    except LoraTooLarge as exc:
        raise HTTPException(413, str(exc)) from None
    except LoraConflict as exc:
        raise HTTPException(409, str(exc)) from None
    except LoraError as exc:
        raise field_error("file", str(exc)) from None
    except ValueError as exc:  # the name rule
        raise field_error("name", str(exc), name) from None
    return JSONResponse(info.as_dict(), status_code=201)


@router.delete("/v1/loras/{name}")
async def delete_lora(name: str, request: Request) -> dict[str, Any]:
    state = _state(request)
    registry = registry_for(state.settings)
    users = requests_naming(state, name)
    if users:
        raise HTTPException(409, f"adapter {name!r} is in use by {users} queued or running request(s)")
    try:
        registry.delete(name)  # no await between the check and the unlink: no request slips in between
    except LoraNotFound as exc:
        raise HTTPException(404, str(exc)) from None
    except ValueError as exc:
        raise field_error("name", str(exc), name) from None
    return {"name": name, "object": "lora", "deleted": True}
