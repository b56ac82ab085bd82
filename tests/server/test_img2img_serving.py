"""Image-to-image and inpainting through the real app (uvicorn, CPU, engine thread): rows of txt2img,
img2img, inpainting and ControlNet requests on one tiny SD model share forward passes and give the bytes
they give alone; JSON and multipart uploads; both inpainting modes; the pixel-model path; the 422s that
name their field."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.model.helpers import perturb
from tests.model.img2img_helpers import build_tiny_inpaint, make_image, make_mask
from tests.model.sd_helpers import build_tiny_sd
from tests.server.conftest import LiveServer, build_model_folders, start_server

diffusers = pytest.importorskip("diffusers")

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    root = build_model_folders(tmp_path_factory.mktemp("img2img-weights"))
    for unused in ("tiny-text", "tiny-text-edges"):  # tiny-class stays: a pixel model
        shutil.rmtree(root / unused)
    build_tiny_sd(root / "tiny-sd")
    build_tiny_inpaint(root / "tiny-inpaint")
    # a ControlNet paired with tiny-sd (unet_server.json "controlnets"; model.sd_controlnet), so that
    # ControlNet rows join the mix as well
    base = diffusers.StableDiffusionPipeline.from_pretrained(root / "tiny-sd")
    net = diffusers.ControlNetModel.from_unet(base.unet, conditioning_embedding_out_channels=(4, 8, 8, 16))
    perturb(net, seed=21).save_pretrained(root / "cn-edges", safe_serialization=True)
    (root / "tiny-sd" / "unet_server.json").write_text(json.dumps({"controlnets": ["cn-edges"]}))
    server = start_server(
        root, max_image_size=64, max_control_image_bytes=200_000, batch_buckets=[8, 32]
    )
    yield server
    server.stop()


def b64png(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


IMAGE, MASK = b64png(make_image()), b64png(make_mask())
IMG2IMG = {"model": "tiny-sd", "image": IMAGE}
INPAINT = {"model": "tiny-sd", "image": IMAGE, "mask_image": MASK}


def control(seed: int, **kw: Any) -> list[dict[str, Any]]:
    """One ControlNet entry with a random black-and-white control image."""
    g = np.random.default_rng(seed)
    edges = Image.fromarray(((g.random((64, 64)) > 0.7) * 255).astype(np.uint8), "L").convert("RGB")
    return [{"name": "cn-edges", "image": b64png(edges), **kw}]


def evaluations(body: dict[str, Any]) -> int:
    """Denoiser calls of a request: its steps cut by strength (Heun: 2 per step, the last 1)."""
    steps = body["num_inference_steps"]
    if "image" in body:
        strength = body.get("strength", 1.0 if "mask_image" in body else 0.8)
        steps = int(steps * strength)
    return 2 * steps - 1 if body["sampler"] == "heun" else steps


BODIES: list[dict[str, Any]] = [
    {"model": "tiny-sd", "prompt": "a red bag", "seed": 1, "sampler": "ddim", "num_inference_steps": 4},
    {"model": "tiny-sd", "prompt": "a blue coat", "seed": 2, "sampler": "euler", "num_inference_steps": 3},
    {**IMG2IMG, "prompt": "a green shoe", "seed": 3, "sampler": "euler", "num_inference_steps": 6,
     "strength": 0.7},
    {**IMG2IMG, "prompt": "a hat", "seed": 4, "sampler": "dpmpp_2m", "num_inference_steps": 8,
     "strength": 0.5, "negative_prompt": "red"},
    {**IMG2IMG, "prompt": "a sock", "seed": 5, "sampler": "euler_ancestral", "num_inference_steps": 5},
    {**IMG2IMG, "prompt": "a scarf", "seed": 6, "sampler": "heun", "num_inference_steps": 4, "strength": 0.6},
    {**INPAINT, "prompt": "a cat", "seed": 7, "sampler": "ddim", "num_inference_steps": 4},
    {**INPAINT, "prompt": "a dog", "seed": 8, "sampler": "euler", "num_inference_steps": 4, "strength": 0.75,
     "num_images": 2},
    {**INPAINT, "prompt": "a bird", "seed": 9, "sampler": "dpmpp_2m_sde", "num_inference_steps": 3},
    {**INPAINT, "prompt": "a fish", "seed": 10, "sampler": "heun", "num_inference_steps": 3,
     "guidance_scale": 1},
    {**IMG2IMG, "prompt": "a lamp", "seed": 11, "sampler": "ddim", "num_inference_steps": 5, "strength": 1.0,
     "guidance_scale": 3},
    {"model": "tiny-sd", "prompt": "a chair", "seed": 12, "sampler": "dpmpp_2m", "num_inference_steps": 4,
     "guidance_scale": 1},
    {"model": "tiny-sd", "prompt": "a bed", "seed": 13, "sampler": "euler", "num_inference_steps": 4,
     "controlnets": control(1)},
    {"model": "tiny-sd", "prompt": "a desk", "seed": 14, "sampler": "ddim", "num_inference_steps": 5,
     "controlnets": control(2, scale=0.7, guidance_end=0.6)},
    {**IMG2IMG, "prompt": "a vase", "seed": 15, "sampler": "dpmpp_2m", "num_inference_steps": 6,
     "strength": 0.7, "controlnets": control(3)},
    {**INPAINT, "prompt": "a rug", "seed": 16, "sampler": "euler", "num_inference_steps": 4,
     "controlnets": control(4, guidance_start=0.25)},
]  # fmt: skip


def forward_totals(c: httpx.Client) -> tuple[float, float]:
    """(forward passes, rows in them) summed over the rows-per-forward histogram's series."""
    text = c.get("/metrics").text
    count = sum(float(v) for v in re.findall(r"^unet_server_rows_per_forward_count(?:\{[^}]*\})? (\S+)$",
                                             text, re.M))  # fmt: skip
    rows = sum(float(v) for v in re.findall(r"^unet_server_rows_per_forward_sum(?:\{[^}]*\})? (\S+)$", text,
                                            re.M))  # fmt: skip
    return count, rows


async def _send(url: str, bodies: list[dict[str, Any]]) -> list[dict[str, Any]]:
    async with httpx.AsyncClient(base_url=url, timeout=240) as c:
        rs = await asyncio.gather(*(c.post("/generate", json=b) for b in bodies))
    assert all(r.status_code == 200 for r in rs), [r.text for r in rs if r.status_code != 200]
    return [r.json() for r in rs]


def test_mixed_requests_share_passes_and_match_one_at_a_time(live: LiveServer) -> None:
    """16 requests: txt2img, img2img, inpainting, ControlNet, and ControlNet with img2img / inpainting."""
    assert len(BODIES) == 16
    with live.client() as c:
        live.wait_idle()
        passes0, rows0 = forward_totals(c)
        together = asyncio.run(_send(live.url, BODIES))
        live.wait_idle()
        passes1, rows1 = forward_totals(c)
    evals = [evaluations(b) for b in BODIES]
    rows_per_eval = [b.get("num_images", 1) * (1 if b.get("guidance_scale") == 1 else 2) for b in BODIES]
    # every evaluation of every request is accounted for, in far fewer passes than evaluations
    assert rows1 - rows0 == sum(e * r for e, r in zip(evals, rows_per_eval, strict=True))
    assert passes1 - passes0 <= 0.6 * sum(evals), (passes1 - passes0, sum(evals))
    alone = [asyncio.run(_send(live.url, [b]))[0] for b in BODIES]
    for a, b, body in zip(together, alone, BODIES, strict=True):
        assert a["images"] == b["images"], f"batched result differs for {body['prompt']}"
    for r, body in zip(together, BODIES, strict=True):
        assert r["inpaint_mode"] == ("latent_blend" if "mask_image" in body else None)
        assert r["strength"] == (body.get("strength", 1.0 if "mask_image" in body else 0.8)
                                 if "image" in body else None)  # fmt: skip
        assert len(r["images"]) == body.get("num_images", 1)


def test_three_kinds_of_rows_share_one_pass(live: LiveServer) -> None:
    """One txt2img, one img2img and one inpainting request of 6 evaluations each, sent together: if the
    kinds could not share a pass the engine would need at least 18 passes."""
    common = {"seed": 3, "sampler": "euler", "num_inference_steps": 6, "prompt": "a coat"}
    bodies = [{"model": "tiny-sd", **common}, {**IMG2IMG, **common, "strength": 1.0}, {**INPAINT, **common}]
    with live.client() as c:
        live.wait_idle()
        passes0, _ = forward_totals(c)
        asyncio.run(_send(live.url, bodies))
        live.wait_idle()
        passes1, _ = forward_totals(c)
    assert passes1 - passes0 < 12


def test_json_and_multipart_uploads_give_the_same_image(live: LiveServer) -> None:
    body = {**INPAINT, "prompt": "a red bag", "seed": 4, "sampler": "euler", "num_inference_steps": 3}
    with live.client() as c:
        a = c.post("/generate", json=body)
        assert a.status_code == 200, a.text
        form = {k: str(v) for k, v in body.items() if k not in ("image", "mask_image")}
        files = {"image": ("i.png", base64.b64decode(IMAGE), "image/png"),
                 "mask_image": ("m.png", base64.b64decode(MASK), "image/png")}  # fmt: skip
        b = c.post("/generate", data=form, files=files)
        assert b.status_code == 200, b.text
        assert a.json()["images"] == b.json()["images"]
        png = c.post("/generate", json=body, headers={"Accept": "image/png"})
        assert png.headers["content-type"] == "image/png"
        assert png.headers["X-Inpaint-Mode"] == "latent_blend" and png.headers["X-Strength"] == "1.0"
        assert base64.b64encode(png.content).decode() == a.json()["images"][0]
        job = c.post("/v1/jobs", data=form, files=files)
        assert job.status_code == 202, job.text
        for _ in range(600):
            info = c.get(f"/v1/jobs/{job.json()['id']}").json()
            if info["status"] == "completed":
                break
            asyncio.run(asyncio.sleep(0.05))
        assert info["result"]["images"] == a.json()["images"]
        assert info["result"]["inpaint_mode"] == "latent_blend" and info["total_steps"] == 3


def test_the_inpainting_model_uses_its_9_channel_unet(live: LiveServer) -> None:
    with live.client() as c:
        specs = {m["id"]: m for m in c.get("/v1/models").json()["data"]}
        assert specs["tiny-inpaint"]["inpainting"] and not specs["tiny-sd"]["inpainting"]
        body = {"model": "tiny-inpaint", "prompt": "a cat", "seed": 1, "num_inference_steps": 3,
                "image": IMAGE, "mask_image": MASK}  # fmt: skip
        r = c.post("/generate", json=body)
        assert r.status_code == 200, r.text
        assert r.json()["inpaint_mode"] == "inpainting_unet" and r.json()["strength"] == 1.0
        other = c.post("/generate", json={**body, "mask_image": b64png(make_mask().rotate(90))})
        assert other.json()["images"] != r.json()["images"]  # the mask reaches the U-Net
        for dropped, field in ((("mask_image",), "mask_image"), (("mask_image", "image"), "image")):
            r = c.post("/generate", json={k: v for k, v in body.items() if k not in dropped})
            assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", field], r.text
            assert "inpainting model" in r.text


def test_pixel_models_take_the_image_itself_as_x0(live: LiveServer) -> None:
    """tiny-class (pixel space, 1 channel, 16 px): with blending, pixels outside the mask are the init
    image's own bytes; inside they are sampled."""
    g = np.random.default_rng(0)
    image = Image.fromarray(g.integers(0, 256, (16, 16), dtype=np.uint8), "L")
    mask = np.zeros((16, 16), np.uint8)
    mask[4:12, 2:9] = 255
    body = {"model": "tiny-class", "class_label": "bag", "seed": 2, "num_inference_steps": 6,
            "image": b64png(image), "mask_image": b64png(Image.fromarray(mask, "L"))}  # fmt: skip
    with live.client() as c:
        r = c.post("/generate", json=body)
        assert r.status_code == 200, r.text
        out = pixels(r.json()["images"][0])
        keep = mask == 0
        assert np.array_equal(out[keep], np.asarray(image)[keep])
        assert not np.array_equal(out[~keep], np.asarray(image)[~keep])
        assert r.json()["inpaint_mode"] == "latent_blend"
        r = c.post("/generate", json={**body, "mask_image": None, "strength": 0.5})  # img2img
        assert r.status_code == 200 and r.json()["inpaint_mode"] is None


def _error(r: httpx.Response) -> tuple[str, str]:
    assert r.status_code == 422, r.text
    detail = r.json()["detail"][0]
    assert detail.get("input") is None or not str(detail["input"]).startswith("iVBOR")  # no image echoed
    return detail["loc"][-1], detail["msg"]


def test_clear_422s_name_the_field(live: LiveServer) -> None:
    base = {"model": "tiny-sd", "prompt": "a red bag", "num_inference_steps": 10}
    sixteen_bit = io.BytesIO()
    Image.fromarray(np.full((64, 64), 40000, np.uint16)).save(sixteen_bit, format="PNG")
    cases = [
        ({**base, "image": IMAGE, "strength": 0}, "strength", "greater than 0"),
        ({**base, "image": IMAGE, "strength": 1.5}, "strength", "less than or equal to 1"),
        ({**base, "image": IMAGE, "strength": 0.05}, "strength", "0 steps"),
        ({**base, "strength": 0.5}, "strength", "send image"),
        ({**base, "mask_image": MASK}, "mask_image", "needs an image"),
        ({**base, "image": IMAGE, "mask_image": b64png(make_mask(32))}, "mask_image", "32x32"),
        ({**base, "image": base64.b64encode(sixteen_bit.getvalue()).decode()}, "image", "mode I;16"),
        ({**base, "image": b64png(make_image(72))}, "image", "pixels"),  # over 64x64 pixels: not decoded
        ({**base, "image": b64png(make_image(60).crop((0, 0, 60, 56)))}, "image", "multiples of 8"),
        ({**base, "image": "not base64!"}, "image", "base64"),
        ({**base, "image": IMAGE, "mask_image": "aGVsbG8="}, "mask_image", "could not be decoded"),
    ]
    with live.client() as c:
        for body, field, words in cases:
            loc, msg = _error(c.post("/generate", json=body))
            assert loc == field and words in msg and msg.startswith(f"{field}:"), (loc, msg)
        r = c.post("/generate", data=base, files={"picture": ("p.png", b"x", "image/png")})
        assert _error(r)[0] == "picture"


def test_another_size_resizes_the_image_and_says_so(live: LiveServer) -> None:
    odd = b64png(make_image(60).crop((0, 0, 60, 56)))
    body = {"model": "tiny-sd", "prompt": "a red bag", "num_inference_steps": 4, "image": odd,
            "width": 64, "height": 48, "seed": 1}  # fmt: skip
    with live.client() as c:
        r = c.post("/generate", json=body)
        assert r.status_code == 200, r.text
        assert pixels(r.json()["images"][0]).shape == (48, 64, 3)
        assert any("resized from 60x56 to 64x48" in w for w in r.json()["warnings"])
        same_size = c.post("/generate", json={**body, "image": IMAGE, "width": None, "height": None})
        assert same_size.json()["warnings"] == [] and same_size.json()["width"] == 64


def test_openapi_lists_the_new_fields(live: LiveServer, tmp_path: Path) -> None:
    with live.client() as c:
        spec = c.get("/openapi.json").json()
    props = spec["components"]["schemas"]["GenerateRequest"]["properties"]
    assert {"image", "mask_image", "strength"} <= set(props)
    assert "/v1/images/edits" in spec["paths"]
