"""Every endpoint and every error case against the real app (live uvicorn, tiny models, CPU)."""

from __future__ import annotations

import base64
import io
import json

import httpx
import numpy as np
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from server.imaging import from_png
from tests.server.conftest import CLASS_NAMES, SIZE


def png_b64(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def big_png_b64() -> str:
    """A 16x16 PNG padded past the 20 kB control-image limit with a text chunk."""
    info = PngInfo()
    info.add_text("padding", "x" * 30_000)
    buf = io.BytesIO()
    edges().save(buf, format="PNG", pnginfo=info)
    return base64.b64encode(buf.getvalue()).decode()


def edges(size: int = SIZE) -> Image.Image:
    img = Image.new("L", (size, size), 0)
    for i in range(size):
        img.putpixel((i, i), 255)
    return img


def decode(images: list[str]) -> list[np.ndarray]:
    return [from_png(base64.b64decode(s)) for s in images]


def error_fields(r: httpx.Response) -> list[str]:
    assert r.status_code == 422, r.text
    return [e["loc"][-1] for e in r.json()["detail"]]


# -- happy paths ----------------------------------------------------------------------------------


def test_generate_class_json(client: httpx.Client) -> None:
    r = client.post(
        "/generate", json={"model": "tiny-class", "class_label": "sneaker", "seed": 7, "num_images": 2}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "tiny-class" and body["sampler"] == "ddim" and body["num_inference_steps"] == 4
    assert body["seeds"] == [7, 8]
    imgs = decode(body["images"])
    assert len(imgs) == 2 and imgs[0].shape == (SIZE, SIZE) and imgs[0].dtype == np.uint8
    assert not np.array_equal(imgs[0], imgs[1])  # different seeds
    t = body["timings"]
    assert 0 <= t["queue_seconds"] <= t["total_seconds"] and t["sampling_seconds"] > 0
    # Image i of a request is the image of seed + i requested alone.
    alone = client.post("/generate", json={"model": "tiny-class", "class_label": 1, "seed": 8}).json()
    assert alone["images"][0] == body["images"][1]


def test_trailing_step_counts_that_once_gave_timestep_minus_one(client: httpx.Client) -> None:
    """tiny-class is trailing with T=1000: 61 steps used to make a grid ending in timestep −1 (a 422)."""
    r = client.post(
        "/generate", json={"model": "tiny-class", "num_inference_steps": 61, "seed": 1, "guidance_scale": 1}
    )
    assert r.status_code == 200, r.text
    assert r.json()["num_inference_steps"] == 61


def test_generate_png_accept(client: httpx.Client) -> None:
    r = client.post(
        "/generate",
        json={"model": "tiny-text", "prompt": "a red dress", "seed": 3, "width": 8, "height": 24},
        headers={"Accept": "image/png"},
    )
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.headers["x-seed"] == "3" and float(r.headers["x-total-seconds"]) > 0
    assert "x-queue-seconds" in r.headers and "x-sampling-seconds" in r.headers
    assert from_png(r.content).shape == (24, 8, 3)
    # Several images with Accept: image/png fall back to JSON.
    r = client.post(
        "/generate",
        json={"model": "tiny-text", "prompt": "x", "num_images": 2},
        headers={"Accept": "image/png"},
    )
    assert r.headers["content-type"].startswith("application/json") and len(r.json()["images"]) == 2


def test_random_seed_is_reported_and_reproducible(client: httpx.Client) -> None:
    a = client.post("/generate", json={"model": "tiny-class", "class_label": 0}).json()
    b = client.post("/generate", json={"model": "tiny-class", "class_label": 0, "seed": a["seeds"][0]}).json()
    assert a["images"] == b["images"]


def test_control_json_and_multipart(client: httpx.Client) -> None:
    base = {"model": "tiny-text-edges", "prompt": "a shoe", "seed": 11}
    r1 = client.post("/generate", json={**base, "control_image": png_b64(edges())})
    assert r1.status_code == 200, r1.text
    buf = io.BytesIO()
    edges().save(buf, format="PNG")
    form = {k: str(v) for k, v in base.items()}
    r2 = client.post("/generate", data=form, files={"control_image": ("e.png", buf.getvalue(), "image/png")})
    assert r2.status_code == 200, r2.text
    assert r1.json()["images"] == r2.json()["images"]
    # The control map changes the image; scale 0 gives the base model's image.
    plain = client.post("/generate", json={**base, "model": "tiny-text"}).json()
    assert plain["images"] != r1.json()["images"]
    zero = client.post(
        "/generate", json={**base, "control_image": png_b64(edges()), "control_scale": 0}
    ).json()
    # Same pixels (the PNGs differ only in their parameters chunk: model, control scale).
    assert [x.tobytes() for x in decode(zero["images"])] == [x.tobytes() for x in decode(plain["images"])]


def test_models_and_samplers(client: httpx.Client) -> None:
    models = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert set(models) == {"tiny-class", "tiny-text", "tiny-text-edges"}
    cls = models["tiny-class"]["conditioning"]
    assert [c["name"] for c in cls["classes"]] == CLASS_NAMES and not cls["text"] and cls["control"] is None
    assert (
        models["tiny-text"]["conditioning"]["text"] and models["tiny-text"]["conditioning"]["classes"] is None
    )
    assert models["tiny-text-edges"]["conditioning"]["control"] == {
        "type": "edges",
        "channels": 1,
        "controlnets": None,
    }
    assert models["tiny-text-edges"]["base_model"] == "tiny-text"
    assert models["tiny-class"]["defaults"]["sampler"] == "ddim"
    samplers = {s["name"]: s for s in client.get("/v1/samplers").json()["data"]}
    assert {"ddim", "euler", "dpmpp_2m", "flow_euler"} <= set(samplers)
    assert "DPM++ 2M Karras" in samplers["dpmpp_2m"]["aliases"]


def test_sampler_alias_accepted(client: httpx.Client) -> None:
    r = client.post(
        "/generate",
        json={
            "model": "tiny-class",
            "class_label": 0,
            "sampler": "DPM++ 2M Karras",
            "seed": 1,
            "num_inference_steps": 3,
        },
    )
    assert r.status_code == 200, r.text


def test_health_and_metrics(client: httpx.Client) -> None:
    assert client.get("/health/live").json() == {"status": "ok"}
    r = client.get("/health/ready")
    assert r.status_code == 200 and r.json()["status"] == "ready"
    text = client.get("/metrics").text
    for name in (
        "unet_server_requests_total",
        "unet_server_request_duration_seconds",
        "unet_server_queue_wait_seconds",
        "unet_server_queue_size",
        "unet_server_running_requests",
        "unet_server_rows_per_forward",
        "unet_server_forward_duration_seconds",
        "unet_server_images_generated_total",
        "unet_server_model_evaluations_total",
    ):
        assert name in text, name
    assert "unet_server_gpu_memory_allocated_bytes" not in text  # CPU


def test_openapi_docs(client: httpx.Client) -> None:
    spec = client.get("/openapi.json").json()
    assert {"/generate", "/v1/images/generations", "/v1/jobs", "/v1/jobs/{job_id}/events"} <= set(
        spec["paths"]
    )
    assert client.get("/docs").status_code == 200


# -- jobs and SSE -------------------------------------------------------------------------------------


def read_sse(client: httpx.Client, job_id: str) -> list[tuple[str, dict]]:
    events = []
    with client.stream("GET", f"/v1/jobs/{job_id}/events") as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        name = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                events.append((name, json.loads(line[6:])))
    return events


def test_job_lifecycle_with_sse(client: httpx.Client) -> None:
    r = client.post(
        "/v1/jobs",
        json={
            "model": "tiny-class",
            "class_label": "bag",
            "seed": 5,
            "num_inference_steps": 6,
            "sampler": "heun",
        },
    )
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["status"] in ("queued", "running") and r.headers["location"] == f"/v1/jobs/{job['id']}"
    events = read_sse(client, job["id"])
    names = [n for n, _ in events]
    assert names[0] == "queued" and names[1] == "started" and names[-1] == "completed"
    progress = [d for n, d in events if n == "progress"]
    total = 2 * 6 - 1  # Heun: two evaluations per step, none for the correction of the last
    assert [p["step"] for p in progress] == list(range(1, total + 1))
    assert all(p["total_steps"] == total for p in progress)
    done = events[-1][1]
    assert done["status"] == "completed" and len(done["result"]["images"]) == 1
    info = client.get(f"/v1/jobs/{job['id']}").json()
    assert info["status"] == "completed" and info["step"] == info["total_steps"] == total
    assert info["queue_position"] is None and info["result"]["seeds"] == [5]
    # Same request through /generate gives the same bytes.
    same = client.post(
        "/generate",
        json={
            "model": "tiny-class",
            "class_label": "bag",
            "seed": 5,
            "num_inference_steps": 6,
            "sampler": "heun",
        },
    ).json()
    assert same["images"] == info["result"]["images"]
    # SSE on a finished job replays and closes.
    assert [n for n, _ in read_sse(client, job["id"])][-1] == "completed"
    assert client.post(f"/v1/jobs/{job['id']}/cancel").status_code == 409


def test_job_cancel_with_sse(client: httpx.Client) -> None:
    job = client.post(
        "/v1/jobs", json={"model": "tiny-text", "prompt": "slow", "num_inference_steps": 400}
    ).json()
    seen = []
    with client.stream("GET", f"/v1/jobs/{job['id']}/events") as r:
        name = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
                seen.append(name)
                if name == "progress" and seen.count("progress") == 2:
                    c = client.post(f"/v1/jobs/{job['id']}/cancel")
                    assert c.status_code == 200 and c.json()["status"] == "cancelled"
    assert seen[-1] == "cancelled"
    info = client.get(f"/v1/jobs/{job['id']}").json()
    assert info["status"] == "cancelled" and info["step"] < 400 and info["result"] is None


def test_unknown_job(client: httpx.Client) -> None:
    assert client.get("/v1/jobs/nope").status_code == 404
    assert client.post("/v1/jobs/nope/cancel").status_code == 404


# -- OpenAI compatibility -------------------------------------------------------------------------


def test_openai_endpoint_raw(client: httpx.Client) -> None:
    r = client.post(
        "/v1/images/generations",
        json={
            "model": "tiny-class",
            "prompt": "Sneaker",
            "n": 2,
            "size": "16x16",
            "response_format": "b64_json",
        },
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert isinstance(body["created"], int) and len(body["data"]) == 2
    assert from_png(base64.b64decode(body["data"][0]["b64_json"])).shape == (16, 16)
    r = client.post(
        "/v1/images/generations", json={"model": "tiny-text", "prompt": "x", "response_format": "url"}
    )
    assert error_fields(r) == ["response_format"] and "b64_json" in r.text
    r = client.post("/v1/images/generations", json={"model": "tiny-text", "prompt": "x", "size": "big"})
    assert error_fields(r) == ["size"]
    r = client.post("/v1/images/generations", json={"model": "tiny-text", "prompt": "x", "size": "1024x1024"})
    assert error_fields(r) == ["size"]
    r = client.post("/v1/images/generations", json={"model": "tiny-class", "prompt": "a spaceship"})
    assert error_fields(r) == ["prompt"] and "sneaker" in r.text
    r = client.post("/v1/images/generations", json={"model": "tiny-text", "prompt": "x", "n": 99})
    assert error_fields(r) == ["n"]


# -- every listed error case ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "field", "words"),
    [
        ({"model": "tiny-class", "sampler": "warp_drive"}, "sampler", "unknown sampler"),
        ({"model": "tiny-class", "sampler": "flow_euler"}, "sampler", "does not support vp"),
        ({"model": "tiny-class", "prompt": "a shirt"}, "prompt", "class-conditional"),
        ({"model": "tiny-text", "class_label": 1}, "class_label", "text-conditional"),
        ({"model": "tiny-class", "class_label": "spaceship"}, "class_label", "unknown class"),
        ({"model": "tiny-class", "class_label": 3}, "class_label", "out of range"),
        ({"model": "tiny-class", "control_image": "AAAA"}, "control_image", "no ControlNet"),
        ({"model": "tiny-text", "prompt": "x", "width": 64}, "width", "maximum image size"),
        ({"model": "tiny-text", "prompt": "x", "height": 7}, "height", "multiple"),
        (
            {"model": "tiny-text", "prompt": "x", "num_inference_steps": 2001},
            "num_inference_steps",
            "maximum",
        ),
        ({"model": "tiny-text", "prompt": "x", "num_inference_steps": 0}, "num_inference_steps", "greater"),
        (
            {"model": "tiny-class", "num_inference_steps": 1001, "sampler": "dpmpp_2m", "guidance_scale": 1},
            "num_inference_steps",
            "num_train_timesteps",
        ),
        ({"model": "tiny-text", "prompt": "x", "num_images": 5}, "num_images", "maximum"),
        ({"model": "tiny-text", "prompt": "x", "guidance_scale": -1}, "guidance_scale", "greater"),
        ({"model": "tiny-text", "prompt": "x", "seed": -1}, "seed", "greater"),
        ({"model": "nope"}, "model", "unknown model"),
        ({"prompt": "x"}, "model", "several models"),
        ({"model": "tiny-text", "prompt": "x", "bogus": 1}, "bogus", "extra"),
        (
            {"model": "tiny-text-edges", "prompt": "x", "control_image": "!!notbase64"},
            "control_image",
            "base64",
        ),
        (
            {
                "model": "tiny-text-edges",
                "prompt": "x",
                "control_image": base64.b64encode(b"GIF89a...").decode(),
            },
            "control_image",
            "decoded",
        ),
        (
            {"model": "tiny-text-edges", "prompt": "x", "control_image": png_b64(Image.new("L", (65, 64)))},
            "control_image",
            "pixels",
        ),
        (
            {"model": "tiny-text-edges", "prompt": "x", "control_image": big_png_b64()},
            "control_image",
            "bytes",
        ),
    ],
)
def test_validation_errors(client: httpx.Client, body: dict, field: str, words: str) -> None:
    for path in ("/generate", "/v1/jobs"):
        r = client.post(path, json=body)
        assert error_fields(r) == [field], r.text
        assert words.lower() in r.text.lower(), r.text


def test_bad_bodies(client: httpx.Client) -> None:
    r = client.post("/generate", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and "JSON" in r.text
    r = client.post("/generate", json=[1, 2])
    assert r.status_code == 422
    r = client.post(
        "/generate",
        data={"model": "tiny-text", "prompt": "x"},
        files={"other": ("x.png", b"123", "image/png")},
    )
    assert error_fields(r) == ["other"]
    r = client.post(
        "/generate",
        data={"model": "tiny-text-edges", "prompt": "x"},
        files={"control_image": ("e.png", base64.b64decode(big_png_b64()), "image/png")},
    )
    assert error_fields(r) == ["control_image"] and "bytes" in r.text
