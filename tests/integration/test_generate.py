"""POST /generate on the live server: PNG and JSON answers, class labels, prompts, control maps (JSON base64
and multipart upload), per-request seeds, and 422s that name the field."""

from __future__ import annotations

import base64

import httpx
import numpy as np
import pytest
from PIL import Image, ImageDraw

from .conftest import FAST_STEPS, SHIPPED_MODELS, TRAINED_WEIGHTS, Server, decode_png, png_b64

pytestmark = pytest.mark.integration


def _mode(spec: dict) -> str:
    return {1: "L", 3: "RGB"}[spec["image_channels"]]


def _edge_map(width: int, height: int) -> Image.Image:
    """A white outline on black, the control-map convention (grayscale PNG)."""
    image = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(image)
    draw.rectangle((width // 4, height // 8, 3 * width // 4, 7 * height // 8), outline=255, width=1)
    return image


def test_health_and_model_listing(server: Server, client: httpx.Client) -> None:
    assert client.get("/health/live").status_code == 200
    assert client.get("/health/ready").status_code == 200
    listing = client.get("/v1/models").json()
    ids = [m["id"] for m in listing["data"]]
    if server.process is not None:  # started here on weights/: every shipped model must be served
        assert set(SHIPPED_MODELS) <= set(ids), f"shipped models missing from /v1/models: {ids}"
        # While loading and warming up, the process was live but not ready (503), then ready.
        seen = server.startup_health
        assert (200, 503) in seen and seen[-1] == (200, 200), seen
    for spec in listing["data"]:
        assert spec["defaults"]["num_inference_steps"] >= 1
        assert spec["defaults"]["sampler"] in {
            name for s in client.get("/v1/samplers").json()["data"] for name in [s["name"], *s["aliases"]]
        }


def test_png_for_a_class_label(server: Server, client: httpx.Client) -> None:
    spec = server.model_with("class")
    classes = spec["conditioning"]["classes"]
    label = classes[min(7, len(classes) - 1)]["name"]  # by name; indexes work too
    r = client.post(
        "/generate",
        json={"model": spec["id"], "class_label": label, "seed": 1234, "num_inference_steps": FAST_STEPS},
        headers={"Accept": "image/png"},
    )
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png"
    seed_headers = {k: v for k, v in r.headers.items() if "seed" in k.lower()}
    assert list(seed_headers.values()) == ["1234"], r.headers
    image = decode_png(r.content)
    assert image.size == (spec["defaults"]["width"], spec["defaults"]["height"])
    assert image.mode == _mode(spec)
    colors = image.getcolors(maxcolors=1 << 24) or []
    assert len(colors) > (4 if TRAINED_WEIGHTS else 1), "a flat image: the model produced nothing"


def test_json_for_a_prompt_with_per_image_seeds(server: Server, client: httpx.Client) -> None:
    spec = server.model_with("text")
    body = {
        "model": spec["id"],
        "prompt": "a red sneaker",
        "seed": 42,
        "num_images": 2,
        "num_inference_steps": FAST_STEPS,
    }
    r = client.post("/generate", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["model"] == spec["id"]
    assert out["seeds"] == [42, 43]
    assert out["num_inference_steps"] == FAST_STEPS
    assert out["sampler"]
    assert set(out["timings"]) >= {"queue_seconds", "sampling_seconds", "total_seconds"}
    assert out["timings"]["total_seconds"] >= out["timings"]["sampling_seconds"] >= 0
    images = [decode_png(base64.b64decode(b)) for b in out["images"]]
    assert len(images) == 2 and all(im.mode == _mode(spec) for im in images)
    assert images[0].tobytes() != images[1].tobytes(), "seeds 42 and 43 gave the same image"

    # A seed is a complete description: image 1 of the batch is seed 43 on its own.
    alone = client.post("/generate", json={**body, "seed": 43, "num_images": 1})
    assert alone.status_code == 200, alone.text
    again = decode_png(base64.b64decode(alone.json()["images"][0]))
    if server.exact:
        assert again.tobytes() == images[1].tobytes(), "same seed alone vs batched: different pixels on CPU"
    else:  # GPU: within float tolerance (a few 8-bit levels)
        diff = np.abs(np.asarray(again, dtype=np.int16) - np.asarray(images[1], dtype=np.int16))
        assert diff.mean() < 2.0, f"same seed alone vs batched: mean difference {diff.mean():.2f} levels"


def test_control_map_as_base64_and_as_upload(server: Server, client: httpx.Client) -> None:
    spec = server.model_with("control")
    width, height = spec["defaults"]["width"], spec["defaults"]["height"]
    edges = _edge_map(width, height)
    body = {
        "model": spec["id"],
        "prompt": "a white t-shirt",
        "control_image": png_b64(edges),
        "control_scale": 1.0,
        "seed": 5,
        "num_inference_steps": FAST_STEPS,
    }
    r = client.post("/generate", json=body, headers={"Accept": "image/png"})
    assert r.status_code == 200, r.text
    controlled = decode_png(r.content)
    assert controlled.size == (width, height)

    # The same control map uploaded as a multipart file gives the same image.
    fields = {k: str(v) for k, v in body.items() if k != "control_image"}
    files = {"control_image": ("edges.png", base64.b64decode(body["control_image"]), "image/png")}
    upload = client.post("/generate", data=fields, files=files, headers={"Accept": "image/png"})
    assert upload.status_code == 200, upload.text
    if server.exact:
        assert decode_png(upload.content).tobytes() == controlled.tobytes()

    # The control map steers the image: without it (scale 0) the same seed draws something else.
    free = client.post("/generate", json={**body, "control_scale": 0.0}, headers={"Accept": "image/png"})
    assert free.status_code == 200, free.text
    assert decode_png(free.content).tobytes() != controlled.tobytes()


@pytest.mark.parametrize(
    "what, patch, field",
    [
        ("class", {"sampler": "no-such-sampler"}, "sampler"),
        ("class", {"prompt": "a red sneaker"}, "prompt"),
        ("text", {"class_label": 3}, "class_label"),
        ("class", {"control_image": "aGVsbG8="}, "control_image"),
        ("class", {"num_inference_steps": 100_000}, "num_inference_steps"),
        ("control", {"control_image": "bm90IGFuIGltYWdl"}, "control_image"),
    ],
)
def test_invalid_input_is_a_422_naming_the_field(
    server: Server, client: httpx.Client, what: str, patch: dict, field: str
) -> None:
    spec = server.model_with(what)
    body = {"model": spec["id"], "num_inference_steps": FAST_STEPS, **patch}
    if what != "class" and "prompt" not in body:
        body["prompt"] = "a coat"
    r = client.post("/generate", json=body)
    assert r.status_code == 422, r.text
    assert field in r.text, f"the 422 should name {field!r}: {r.text}"
