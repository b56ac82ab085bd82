"""LoRA adapters through the real app (CPU, thread engine, a tiny Stable Diffusion folder).

* 12 concurrent requests over 3 adapters (one per format: diffusers/PEFT with text-encoder layers, kohya
  with LoCon 3x3 convolutions, older lora.down/up), 2 combinations and none, with different samplers and
  step counts, give the bytes each gives sent alone — rows with different adapters share forward passes;
* scale 0 gives the bytes of no adapter; /v1/jobs and the OpenAI route take ``loras`` too;
* the registry through HTTP: upload, list, use, delete; refusals (oversized, pickle, unknown keys, another
  architecture, a name taken, a name in use by a queued request);
* a second server with 2 device pages (so adapters are evicted and passes split) gives the same bytes.
"""

from __future__ import annotations

import asyncio
import base64
import io
import os
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from model.lora import layer_specs
from server.pngmeta import read_parameters
from tests.model.lora_helpers import (
    ATTENTION,
    LOCON,
    random_layers,
    write_diffusers_old,
    write_kohya,
    write_peft,
)
from tests.model.sd_helpers import build_tiny_sd
from tests.server.conftest import LiveServer, start_server
from tests.server.test_batching import metric

pytest.importorskip("transformers")
pytestmark = pytest.mark.timeout(600)

MODEL = "tiny-sd"
ENV = {
    "UNET_SERVER_LORA_PAGE_RANK": "4",
    "UNET_SERVER_LORA_ROW_PAGES": "3",
    "UNET_SERVER_LORA_MAX_UPLOAD_BYTES": "400000",
}


def _start(root: Path, pages: int) -> LiveServer:
    """A server whose engine has ``pages`` device pages per layer (read from the env at load)."""
    saved = {k: os.environ.get(k) for k in [*ENV, "UNET_SERVER_LORA_PAGES"]}
    os.environ.update({**ENV, "UNET_SERVER_LORA_PAGES": str(pages)})
    try:
        live = start_server(
            root, text_encoder_loader=None, max_image_size=64, max_batch_rows=16, batch_buckets=[4, 8, 16]
        )
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return live


@pytest.fixture(scope="module")
def env() -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in ENV}
    os.environ.update(ENV)
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("lora-weights")
    build_tiny_sd(root / MODEL)
    return root


@pytest.fixture(scope="module")
def files(root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """Adapter files for the tiny model (not yet in the registry), and a few that must be refused."""
    from model.pipeline import load_pipelines

    p = load_pipelines(root, [MODEL])[MODEL]
    specs = layer_specs({"unet": p.unet, "text_encoder": p.text_encoder.model})
    d = tmp_path_factory.mktemp("adapters")
    paths = {
        "peft": write_peft(d / "a.safetensors", random_layers(specs, 4, seed=1, std=0.6), 4, 8.0, specs),
        "kohya": write_kohya(
            d / "b.safetensors",
            random_layers(specs, 4, seed=2, unet=ATTENTION + LOCON, text=(), std=0.6),
            4.0,
            specs,
        ),
        "old": write_diffusers_old(d / "c.safetensors", random_layers(specs, 4, seed=3, std=0.6), specs),
    }
    unknown = random_layers(specs, 2, seed=4, text=())
    unknown["unet"]["down_blocks.9.attentions.0.proj_in"] = unknown["unet"].pop(next(iter(unknown["unet"])))
    paths["unknown"] = write_diffusers_old(d / "u.safetensors", unknown, specs)
    wide = {
        "unet": {
            n: (torch.zeros(2, 2048), torch.zeros(s.out_features, 2))
            for n, s in specs["unet"].items()
            if n.endswith("attn2.to_k")
        }
    }  # SDXL-wide context
    paths["wide"] = write_diffusers_old(d / "w.safetensors", wide, specs)
    out = {k: v.read_bytes() for k, v in paths.items()}
    buf = io.BytesIO()
    pickle.dump({"lora_unet_x.lora_down.weight": [0.0] * 4}, buf)  # never unpickled: refused unread
    out["pickle"] = buf.getvalue()
    return out


@pytest.fixture(scope="module")
def live(root: Path, env: None) -> Iterator[LiveServer]:
    server = _start(root, pages=8)
    yield server
    server.stop()


def _upload(c: httpx.Client, name: str, data: bytes) -> httpx.Response:
    return c.post("/v1/loras", files={"file": (f"{name}.safetensors", data)}, data={"name": name})


@pytest.fixture(scope="module")
def adapters(live: LiveServer, files: dict[str, bytes]) -> list[str]:
    with live.client() as c:
        for name in ("peft", "kohya", "old"):
            r = _upload(c, name, files[name])
            assert r.status_code == 201, r.text
    return ["peft", "kohya", "old"]


def _body(
    loras: list[tuple[str, float]],
    sampler: str = "euler",
    steps: int = 3,
    seed: int = 7,
    prompt: str = "a striped sock",
    guidance: float = 4.0,
) -> dict[str, Any]:
    return {
        "model": MODEL,
        "prompt": prompt,
        "negative_prompt": "blurry",
        "seed": seed,
        "sampler": sampler,
        "num_inference_steps": steps,
        "guidance_scale": guidance,
        "loras": [{"name": n, "scale": s} for n, s in loras] or None,
    }


# 12 requests: 3 adapters alone, 2 combinations, none; samplers and steps vary
MIX = [
    _body([("peft", 1.0)], "euler", 3, seed=1),
    _body([("kohya", 0.8)], "ddim", 4, seed=2),
    _body([("old", 1.2)], "dpmpp_2m", 3, seed=3),
    _body([("peft", 0.7), ("kohya", -0.5)], "heun", 2, seed=4),
    _body([("kohya", 1.0), ("old", 0.6)], "euler_ancestral", 3, seed=5),
    _body([], "euler", 3, seed=6),
    _body([("peft", 1.0)], "dpmpp_2m", 4, seed=7, prompt="a plain shirt"),
    _body([], "ddim", 3, seed=8, guidance=1.0),
    _body([("old", 1.0)], "euler", 2, seed=9, guidance=1.0),
    _body([("peft", 0.7), ("kohya", -0.5)], "euler", 3, seed=10),
    _body([("kohya", 1.0), ("old", 0.6)], "ddim", 3, seed=11, prompt="a plain shirt"),
    _body([], "heun", 2, seed=12),
]


def _pixels(png_b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(png_b64))))


def _alone(live: LiveServer, bodies: list[dict[str, Any]]) -> list[list[str]]:
    out = []
    with live.client() as c:
        for b in bodies:
            r = c.post("/generate", json=b)
            assert r.status_code == 200, r.text
            out.append(r.json()["images"])
            live.wait_idle()
    return out


def _together(live: LiveServer, bodies: list[dict[str, Any]]) -> list[list[str]]:
    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=live.url, timeout=300) as c:
            return await asyncio.gather(*(c.post("/generate", json=b) for b in bodies))

    rs = asyncio.run(run())
    assert all(r.status_code == 200 for r in rs), [r.text for r in rs if r.status_code != 200]
    return [r.json()["images"] for r in rs]


@pytest.fixture(scope="module")
def alone(live: LiveServer, adapters: list[str]) -> list[list[str]]:
    return _alone(live, MIX)


def test_adapters_change_images(live: LiveServer, alone: list[list[str]]) -> None:
    """Each adapter and combination changes the image (so byte-identity below is not vacuous)."""
    plain = _alone(live, [{**b, "loras": None} for b in MIX])
    for body, with_lora, without in zip(MIX, alone, plain, strict=True):
        same = np.array_equal(_pixels(with_lora[0]), _pixels(without[0]))  # PNG text chunks differ anyway
        assert same != bool(body["loras"]), body


def test_concurrent_mixed_adapters_match_alone(live: LiveServer, alone: list[list[str]]) -> None:
    worker = live.core.worker
    before = worker.lora_stats()
    with live.client() as c:
        text_before = c.get("/metrics").text
    assert _together(live, MIX) == alone
    after = worker.lora_stats()
    # rows with different adapters (and none) shared forward passes
    assert after.mixed_passes > before.mixed_passes
    carried, rows = after.rows_with_adapter - before.rows_with_adapter, after.rows - before.rows
    assert 0 < carried < rows
    with live.client() as c:
        text_after = c.get("/metrics").text
    name = "unet_server_lora_rows_per_forward"
    metered = metric(text_after, name, name + "_sum") - metric(text_before, name, name + "_sum")
    assert metered == carried  # the per-pass metric counts exactly the rows that carried adapters


def test_scale_zero_is_no_adapter(live: LiveServer, adapters: list[str]) -> None:
    zero, none = _alone(live, [_body([("peft", 0.0), ("kohya", 0.0)]), _body([])])
    assert np.array_equal(_pixels(zero[0]), _pixels(none[0]))  # the PNGs' parameter chunks name the loras


def test_jobs_and_openai_routes(live: LiveServer, adapters: list[str]) -> None:
    body = _body([("peft", 1.0)], "euler", 3, seed=21)
    (ref,) = _alone(live, [body])
    with live.client() as c:
        job = c.post("/v1/jobs", json=body).json()
        for _ in range(600):
            info = c.get(f"/v1/jobs/{job['id']}").json()
            if info["status"] in ("completed", "failed"):
                break
            live.wait_idle(60)
        assert info["status"] == "completed", info
        assert info["result"]["images"] == ref
        oa = {
            "model": MODEL,
            "prompt": body["prompt"],
            "negative_prompt": "blurry",
            "seed": 21,
            "sampler": "euler",
            "num_inference_steps": 3,
            "guidance_scale": 4.0,
            "size": "64x64",
        }
        with_lora = c.post("/v1/images/generations", json={**oa, "loras": [{"name": "peft", "scale": 1.0}]})
        without = c.post("/v1/images/generations", json=oa)
    assert with_lora.status_code == 200, with_lora.text
    a, b = with_lora.json()["data"][0]["b64_json"], without.json()["data"][0]["b64_json"]
    assert not np.array_equal(_pixels(a), _pixels(b))

    assert np.array_equal(_pixels(a), _pixels(ref[0]))


def test_registry_list_use_delete(live: LiveServer, files: dict[str, bytes], adapters: list[str]) -> None:
    with live.client() as c:
        assert _upload(c, "temp-1", files["old"]).status_code == 201
        listed = {a["name"]: a for a in c.get("/v1/loras").json()["data"]}
        assert listed["temp-1"]["models"] == [MODEL] and listed["temp-1"]["format"] == "diffusers"
        assert listed["peft"]["components"] == ["unet", "text_encoder"] and listed["peft"]["rank"] == 4
        r = c.post("/generate", json=_body([("temp-1", 1.0)]))
        assert r.status_code == 200
        png = base64.b64decode(r.json()["images"][0])
        assert read_parameters(png)["loras"] == [{"name": "temp-1", "scale": 1.0}]  # the PNG says how
        assert c.delete("/v1/loras/temp-1").status_code == 200
        assert "temp-1" not in {a["name"] for a in c.get("/v1/loras").json()["data"]}
        r = c.post("/generate", json=_body([("temp-1", 1.0)]))
        assert r.status_code == 422 and "unknown adapter" in r.text
        assert c.delete("/v1/loras/temp-1").status_code == 404


def test_registry_refusals(live: LiveServer, files: dict[str, bytes], adapters: list[str]) -> None:
    with live.client() as c:
        too_big = files["peft"] + b"\0" * 400_001
        assert _upload(c, "big", too_big).status_code == 413
        r = _upload(c, "pickled", files["pickle"])
        assert r.status_code == 422 and "not a safetensors file" in r.text
        r = _upload(c, "unknown-keys", files["unknown"])
        assert r.status_code == 422 and "down_blocks.9.attentions.0.proj_in" in r.text
        r = _upload(c, "wide", files["wide"])
        assert r.status_code == 422 and "another architecture" in r.text
        assert _upload(c, "peft", files["peft"]).status_code == 409  # the name is taken
        assert _upload(c, "../evil", files["peft"]).status_code in (404, 422)
        assert _upload(c, ".hidden", files["peft"]).status_code == 422
        listed = {a["name"] for a in c.get("/v1/loras").json()["data"]}
        assert not listed & {"big", "pickled", "unknown-keys", "wide", "hidden"}
        r = c.post("/generate", json=_body([("no-such", 1.0)]))
        assert r.status_code == 422 and "loras" in r.text
        # a name in use by a queued or running request cannot be deleted
        assert _upload(c, "busy", files["kohya"]).status_code == 201
        job = c.post("/v1/jobs", json=_body([("busy", 1.0)], steps=400)).json()
        try:
            r = c.delete("/v1/loras/busy")
            assert r.status_code == 409 and "in use" in r.text
        finally:
            c.post(f"/v1/jobs/{job['id']}/cancel")
        live.wait_idle(120)
        assert c.delete("/v1/loras/busy").status_code == 200


def test_eviction_under_small_page_budget(root: Path, env: None, alone: list[list[str]]) -> None:
    """2 device pages: the 3 adapters cannot all be resident, combinations fill both, passes over all of
    them split; every image is still the bytes it was with room for all."""
    tight = _start(root, pages=2)
    try:
        assert _together(tight, MIX) == alone
        stats = tight.core.worker.lora_stats()
        assert stats.evictions > 0 and stats.resident <= 2
        with tight.client() as c:
            text = c.get("/metrics").text
        assert metric(text, "unet_server_lora_evictions_total") == stats.evictions
        assert metric(text, "unet_server_lora_loads_total") == stats.loads
        assert metric(text, "unet_server_lora_adapters_resident") == stats.resident
    finally:
        tight.stop()
