"""Schema fuzz of the HTTP API (bench.fuzz_api's generator, fixed seed) against the real app in-process.

A few hundred seeded requests, most with 1-3 broken fields (wrong types, NaN/Inf, huge numbers, unicode,
deep nesting, broken images and multipart bodies, unknown ControlNets and adapters, SDXL fields on SD
models, malformed JSON), on every POST route and the adapter registry, against tiny models of each kind:
a class model, a text model, a text ControlNet model, Stable Diffusion with an SD ControlNet and a LoRA
adapter, and SDXL. Asserted: no 5xx, no traceback or source path in any body, every error a JSON object with
a message (a 422's entries each naming a field), every 200's images decode as PNGs, valid bodies succeed,
and the server is ready afterwards.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.fuzz_api import Report, run_fuzz
from tests.model.helpers import perturb
from tests.server.conftest import LiveServer, build_model_folders, start_server

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.timeout(300)

# FUZZ_API_SEED / FUZZ_API_REQUESTS: a longer run by hand (the default is the CI-sized one)
SEED = int(os.environ.get("FUZZ_API_SEED", "15"))
REQUESTS = int(os.environ.get("FUZZ_API_REQUESTS", "300"))
UPLOAD_LIMIT = 200_000  # the server's max_control_image_bytes below


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    """tiny-class, tiny-text, tiny-text-edges; tiny-sd with ControlNet cn-edges and adapter sd-lora;
    tiny-sdxl. Returns the folder and the adapter's bytes (the fuzzer re-uploads them under fresh names)."""
    from model.lora import layer_specs
    from model.pipeline import load_pipelines
    from tests.model.lora_helpers import random_layers, write_peft
    from tests.model.sd_helpers import build_tiny_sd
    from tests.model.sdxl_helpers import build_tiny_sdxl

    root = build_model_folders(tmp_path_factory.mktemp("fuzz-weights"))
    build_tiny_sd(root / "tiny-sd")
    build_tiny_sdxl(root / "tiny-sdxl")
    base = diffusers.UNet2DConditionModel.from_pretrained(root / "tiny-sd" / "unet")
    net = diffusers.ControlNetModel.from_unet(base, conditioning_embedding_out_channels=(4, 8, 8, 16))
    perturb(net, seed=21).save_pretrained(root / "cn-edges", safe_serialization=True)
    (root / "tiny-sd" / "unet_server.json").write_text(json.dumps({"controlnets": ["cn-edges"]}))
    p = load_pipelines(root, ["tiny-sd"])["tiny-sd"]
    specs = layer_specs({"unet": p.unet, "text_encoder": p.text_encoder.model})
    (root / "loras").mkdir()
    path = write_peft(root / "loras" / "sd-lora.safetensors", random_layers(specs, 4, seed=1), 4, 8.0, specs)
    return root, path.read_bytes()


@pytest.fixture(scope="module")
def live(weights: tuple[Path, bytes]) -> Iterator[LiveServer]:
    env = {"UNET_SERVER_LORA_MAX_UPLOAD_BYTES": "400000"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    server = start_server(
        weights[0],
        max_image_size=64,
        max_control_image_bytes=UPLOAD_LIMIT,
        batch_buckets=[8, 32],
        max_inference_steps=200,
        max_images=4,
    )
    yield server
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    shutil.rmtree(weights[0] / "loras", ignore_errors=True)


def test_fuzzed_fields_never_500(live: LiveServer, weights: tuple[Path, bytes]) -> None:
    report: Report = asyncio.run(
        run_fuzz(
            live.url,
            REQUESTS,
            SEED,
            concurrency=8,
            timeout=60,
            lora_file=weights[1],
            upload_limit=UPLOAD_LIMIT,
        )
    )
    report.alive_after = live.thread.is_alive()
    print(report.table())
    print("transport errors:", dict(report.transport_errors), report.transport_examples[:5])
    summary = json.dumps(report.findings[:5], indent=1, default=str)
    assert report.n_5xx == 0, summary
    assert report.n_leaks == 0, summary
    assert not report.findings, summary  # also: errors without a message, non-JSON, undecodable PNGs
    assert not report.valid_not_2xx, json.dumps(report.valid_not_2xx[:5], indent=1)
    assert report.ready_after == 200 and report.alive_after
    codes = {s for c in report.statuses.values() for s in c}
    assert {"200", "422"} <= codes, codes  # the generator reached both sides of validation
    assert sum(c.get("200", 0) + c.get("202", 0) for c in report.statuses.values()) >= REQUESTS // 20


def _safetensors(header: str) -> bytes:
    raw = header.encode()
    return len(raw).to_bytes(8, "little") + raw + b"\0" * 8


# What the fuzzer found (each was a 500): (method, path, kwargs for httpx, the field the 422 names)
FOUND = [
    # a NaN / Infinity (Python's json reads them) echoed as the 422's input: rendering the 422 failed
    ("POST", "/generate", {"content": b'{"model": "tiny-text", "guidance_scale": NaN}'}, "guidance_scale"),
    ("POST", "/v1/images/generations", {"content": b'{"prompt": "x", "seed": -Infinity}'}, "seed"),
    # a lone surrogate in a string, or in an unknown key, echoed: the 422 could not be encoded as UTF-8
    ("POST", "/generate", {"content": b'{"model": "tiny-text", "prompt": "a\\ud800"}'}, "prompt"),
    ("POST", "/v1/jobs", {"content": b'{"model": "tiny-text", "\\udc80x": 1}'}, "body"),  # the key
    # ... and echoed by a check past pydantic (class_label is int | str: pydantic let the surrogate through)
    ("POST", "/generate", {"content": b'{"model": "tiny-text", "class_label": "a\\udfffb"}'}, "class_label"),
    ("POST", "/v1/images/generations", {"content": b'{"prompt": "x", "model": "\\ud800"}'}, "model"),
    # class labels that str.isdigit() calls digits but int() does not read
    ("POST", "/generate", {"json": {"model": "tiny-class", "class_label": "²"}}, "class_label"),
    ("POST", "/generate", {"json": {"model": "tiny-class", "class_label": "--1"}}, "class_label"),
    ("POST", "/v1/images/generations", {"json": {"model": "tiny-class", "prompt": "¹"}}, "prompt"),
    # adapter headers torch.empty refuses (negative, non-integer, overflowing shapes; bad alpha offsets)
    *(
        ("POST", "/v1/loras?name=bad", {"content": _safetensors(h)}, "file")
        for h in (
            '{"a.lora_down.weight": {"dtype": "F32", "shape": [-1, 2], "data_offsets": [0, 8]}}',
            '{"a.lora_down.weight": {"dtype": "F32", "shape": "ab", "data_offsets": [0, 8]}}',
            '{"a.lora_down.weight": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 8]}}',
            '{"a.lora_down.weight": {"dtype": "F32", "shape": [2147483647, 2147483647, 2147483647]}}',
            '{"a.alpha": {"dtype": "F32", "shape": [], "data_offsets": ["a", null]}}',
        )
    ),
    # a multipart JSON field nested deeper than Python's parser goes (RecursionError escaped pydantic)
    ("POST", "/generate", {"data": {"model": "tiny-sd", "controlnets": "[" * 5000}}, "controlnets"),
]


@pytest.mark.parametrize("method,path,kwargs,field", FOUND)
def test_found_by_the_fuzzer(live: LiveServer, method: str, path: str, kwargs: dict, field: str) -> None:
    with live.client() as c:
        if "data" in kwargs:  # multipart: a file part makes httpx send multipart/form-data
            kwargs = {**kwargs, "files": {"image": ("i.png", _png(), "image/png")}}
        r = c.request(method, path, **kwargs)
    assert r.status_code == 422, r.text
    body = r.json()
    assert any(field in map(str, e["loc"]) for e in body["detail"]), body


def _png() -> bytes:
    """A 64 x 64 RGB PNG (tiny-sd's native size)."""
    from tests.model.img2img_helpers import make_image

    buf = io.BytesIO()
    make_image().save(buf, format="PNG")
    return buf.getvalue()


def test_multipart_loras_as_json_text(live: LiveServer) -> None:
    """``loras`` in a multipart form is JSON text, as ``controlnets`` is (it was a 422 "not a list")."""
    data = {"model": "tiny-sd", "num_inference_steps": "2", "loras": '[{"name": "sd-lora", "scale": 0.5}]'}
    with live.client() as c:
        r = c.post("/generate", data=data, files={"image": ("i.png", _png(), "image/png")})
    assert r.status_code == 200, r.text
    assert len(r.json()["images"]) == 1


def test_edits_multipart_loras_as_json_text(live: LiveServer) -> None:
    """OpenAI's edits route reads ``loras`` from its form as JSON text too: a known adapter edits, an unknown
    one is a 422 naming ``loras`` (so the text was parsed and resolved, not refused as "not a list")."""
    files = {"image": ("i.png", _png(), "image/png")}
    form = {"model": "tiny-sd", "prompt": "a cat", "num_inference_steps": "2"}
    with live.client() as c:
        known, unknown = '[{"name": "sd-lora", "scale": 0.5}]', '[{"name": "no-such-adapter"}]'
        ok = c.post("/v1/images/edits", data={**form, "loras": known}, files=files)
        bad = c.post("/v1/images/edits", data={**form, "loras": unknown}, files=files)
    assert ok.status_code == 200, ok.text
    assert len(ok.json()["data"]) == 1
    assert bad.status_code == 422 and "loras" in bad.json()["message"] and "no-such-adapter" in bad.text
