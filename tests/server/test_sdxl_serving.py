"""SDXL folders through the real server process (`python -m server`, CPU): a tiny StableDiffusionXLPipeline
folder (no metadata of ours) served beside a tiny SD folder. /generate and /v1/jobs with the size/crop
micro-conditioning fields; the served image is diffusers' to one uint8 level; 12 concurrent mixed SDXL and SD
requests give the bytes they give one at a time; an SDXL-only field on the SD model is a 422 naming it."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch

from model.noise import RequestNoise
from tests.model.sd_helpers import build_tiny_sd
from tests.model.sdxl_helpers import build_tiny_sdxl
from tests.server.test_sd_serving import ServerProcess, png

pytestmark = pytest.mark.timeout(300)

XL, SD = "tiny-sdxl", "tiny-sd"


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sdxl-weights")
    build_tiny_sdxl(root / XL)
    build_tiny_sd(root / SD)
    return root


@pytest.fixture(scope="module")
def server(root: Path) -> Any:
    server = ServerProcess(root, f"{XL},{SD}")
    yield server
    server.stop()


def _generate(c: httpx.Client, **body: Any) -> dict[str, Any]:
    r = c.post("/generate", json={"model": XL, "prompt": "a red bag", "num_inference_steps": 3, **body})
    assert r.status_code == 200, r.text
    return r.json()


def test_models_say_which_take_size_conditioning(server: ServerProcess) -> None:
    with server.client() as c:
        specs = {m["id"]: m for m in c.get("/v1/models").json()["data"]}
    xl, sd = specs[XL], specs[SD]
    assert xl["conditioning"]["size_conditioning"] and not sd["conditioning"]["size_conditioning"]
    assert xl["conditioning"]["text"] and xl["sample_size"] == 64
    assert (xl["defaults"]["sampler"], xl["defaults"]["guidance_scale"]) == ("euler", 5.0)


def test_served_image_is_diffusers_image(server: ServerProcess, root: Path) -> None:
    """The whole server path (SDXL text rows, zero uncond rows, time ids, padding, Euler, VAE, PNG) against
    StableDiffusionXLPipeline with the same initial noise (the request's seeded generator)."""
    import diffusers

    sizes = {"original_size": [128, 96], "crops_coords_top_left": [8, 0], "target_size": [64, 64]}
    with server.client() as c:
        got = png(_generate(c, seed=5, num_inference_steps=4, **sizes)["images"][0]).astype(int)
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(root / XL)
    latents = RequestNoise(5).initial((1, 4, 8, 8), torch.device("cpu"))
    with torch.no_grad():
        want = pipe(
            "a red bag", num_inference_steps=4, guidance_scale=5.0, height=64, width=64, latents=latents,
            output_type="np", **{k: tuple(v) for k, v in sizes.items()},
        ).images[0]  # fmt: skip
    want = np.round(want * 255).astype(int)
    assert got.shape == want.shape == (64, 64, 3) and want.std() > 2
    assert np.abs(got - want).max() <= 1


def test_size_fields_change_the_image_and_default_as_diffusers(server: ServerProcess) -> None:
    with server.client() as c:
        plain = _generate(c, seed=2)["images"]
        defaults = {"original_size": [64, 64], "crops_coords_top_left": [0, 0], "target_size": [64, 64]}
        explicit = _generate(c, seed=2, **defaults)
        cropped = _generate(c, seed=2, crops_coords_top_left=[16, 16])["images"]
        negative = _generate(c, seed=2, negative_prompt="")["images"]  # "" is encoded, not zero rows
    # the defaults are (height, width), (0, 0), (height, width): the same pixels (the PNG's parameters
    # chunk differs: it records the fields sent)
    assert png(explicit["images"][0]).tobytes() == png(plain[0]).tobytes()
    assert png(cropped[0]).tobytes() != png(plain[0]).tobytes()
    assert png(negative[0]).tobytes() != png(plain[0]).tobytes()
    assert png(plain[0]).std() > 2  # a decoded RGB image, not a flat one


def test_sdxl_field_on_sd_model_is_a_422_naming_it(server: ServerProcess) -> None:
    with server.client() as c:
        fields = {"original_size": [64, 64], "crops_coords_top_left": [0, 0], "target_size": [8, 8]}
        for name, value in fields.items():
            r = c.post("/generate", json={"model": SD, "prompt": "a red bag", name: value})
            assert r.status_code == 422, r.text
            assert r.json()["detail"][0]["loc"][-1] == name and "not an SDXL model" in r.text
            r = c.post("/v1/jobs", json={"model": SD, "prompt": "a red bag", name: value})
            assert r.status_code == 422 and name in r.text
        r = c.post("/generate", json={"model": XL, "prompt": "a", "original_size": [64, 0]})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == "original_size"
        r = c.post("/generate", json={"model": XL, "prompt": "a", "target_size": [1, 2, 3]})
        assert r.status_code == 422 and "target_size" in r.text


def test_jobs_and_multipart_carry_the_fields(server: ServerProcess) -> None:
    body = {"model": XL, "prompt": "a red bag", "seed": 9, "num_inference_steps": 3, "target_size": [32, 48]}
    with server.client() as c:
        direct = c.post("/generate", json=body).json()
        job = c.post("/v1/jobs", json=body).json()
        for _ in range(600):
            info = c.get(f"/v1/jobs/{job['id']}").json()
            if info["status"] == "completed":
                break
            time.sleep(0.05)
        assert info["status"] == "completed", info
        assert info["result"]["images"] == direct["images"]
        form = {k: (json.dumps(v) if isinstance(v, list) else str(v)) for k, v in body.items()}
        form["target_size"] = "32,48"
        multipart = c.post("/generate", files={k: (None, v) for k, v in form.items()})  # form fields
        assert multipart.status_code == 200, multipart.text
        assert multipart.json()["images"] == direct["images"]


async def _send(url: str, bodies: list[dict[str, Any]]) -> list[dict[str, Any]]:
    async with httpx.AsyncClient(base_url=url, timeout=240) as c:
        rs = await asyncio.gather(*(c.post("/generate", json=b) for b in bodies))
    assert all(r.status_code == 200 for r in rs), [r.text for r in rs if r.status_code != 200]
    return [r.json() for r in rs]


BODIES = [
    {"model": model, "prompt": p, "seed": s, "sampler": sampler, "num_inference_steps": steps, **extra}
    for _ in range(2)
    for model, p, s, sampler, steps, extra in [
        (XL, "a red bag", 1, "euler", 3, {}),
        (XL, "a blue coat", 2, "ddim", 3, {"original_size": [256, 256]}),
        (XL, "a green shoe", 3, "dpmpp_2m", 3, {"negative_prompt": "red", "crops_coords_top_left": [8, 8]}),
        (XL, "a yellow dress", 4, "euler_ancestral", 3, {"target_size": [32, 32]}),
        (XL, "a red bag", 6, "euler", 2, {"num_images": 2, "negative_prompt": "", "guidance_scale": 1}),
        (SD, "a grey sock", 8, "ddim", 2, {"negative_prompt": "blue"}),
    ]
]
for i, body in enumerate(BODIES[6:]):
    body["seed"] += 100 + i


def test_concurrent_mixed_requests_match_one_at_a_time(server: ServerProcess) -> None:
    assert len(BODIES) == 12
    together = asyncio.run(_send(server.url, BODIES))
    alone = [asyncio.run(_send(server.url, [b]))[0] for b in BODIES]
    for a, b, body in zip(together, alone, BODIES, strict=True):
        assert a["images"] == b["images"], f"batched result differs for {body}"
    # different seeds and conditioning give different images (the comparison above is not vacuous)
    assert len({t["images"][0] for t in together}) == len(BODIES)
