"""What the playground needs from the engine, over HTTP on the tiny models: live previews on a job's event
stream only when the job asks (`preview_every`), and the request's parameters inside every PNG."""

from __future__ import annotations

import base64
import io
import json

import httpx
import numpy as np
from PIL import Image

from server.pngmeta import read_parameters
from tests.server.conftest import SIZE


def job_events(client: httpx.Client, body: dict) -> list[tuple[str, dict]]:
    r = client.post("/v1/jobs", json=body)
    assert r.status_code == 202, r.text
    events = []
    with client.stream("GET", f"/v1/jobs/{r.json()['id']}/events") as stream:
        name = None
        for line in stream.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                events.append((name, json.loads(line[6:])))
    return events


def test_no_previews_unless_asked(client: httpx.Client) -> None:
    body = {"model": "tiny-class", "class_label": 1, "num_inference_steps": 6, "seed": 1}
    events = job_events(client, body)
    names = [n for n, _ in events]
    assert names[-1] == "completed" and names.count("progress") >= 1
    assert "preview" not in names


def test_previews_every_k_steps_when_asked(client: httpx.Client) -> None:
    body = {"model": "tiny-text", "prompt": "a coat", "num_inference_steps": 6, "seed": 2, "num_images": 2}
    events = job_events(client, {**body, "preview_every": 2})
    previews = [d for n, d in events if n == "preview"]
    assert [p["step"] for p in previews] == [2, 4, 6] or [p["step"] for p in previews] == [2, 4]
    for p in previews:
        assert p["total_steps"] == 6 and p["id"]
        with Image.open(io.BytesIO(base64.b64decode(p["image"]))) as img:
            assert img.format == "PNG" and max(img.size) <= SIZE * 2  # small: one tile per image at most
            assert np.asarray(img).std() > 0  # an x0 estimate, not a blank
    # A preview precedes the outcome, and the result is the same as without previews (same seed).
    names = [n for n, _ in events]
    assert names.index("preview") < names.index("completed")
    plain = job_events(client, body)
    assert plain[-1][1]["result"]["images"] == events[-1][1]["result"]["images"]


def test_every_png_carries_its_parameters(client: httpx.Client) -> None:
    body = {"model": "tiny-text", "prompt": "a red coat, warm", "negative_prompt": "blue",
            "sampler": "flow_euler", "num_inference_steps": 3, "guidance_scale": 2.0, "seed": 11,
            "num_images": 2}
    r = client.post("/generate", json=body)
    assert r.status_code == 200, r.text
    for i, png in enumerate(r.json()["images"]):
        carried = read_parameters(base64.b64decode(png))
        assert {k: carried.get(k) for k in ("model", "prompt", "negative_prompt", "sampler",
                                            "num_inference_steps", "guidance_scale")} == {
            k: body[k] for k in ("model", "prompt", "negative_prompt", "sampler", "num_inference_steps",
                                 "guidance_scale")}
        assert carried["seed"] == 11 + i and (carried["width"], carried["height"]) == (SIZE, SIZE)
    r = client.post("/generate", json={"model": "tiny-class", "class_label": "sneaker", "seed": 5,
                                       "num_inference_steps": 2}, headers={"Accept": "image/png"})
    carried = read_parameters(r.content)
    assert carried["class_label"] == 1 and carried["seed"] == 5 and carried["model"] == "tiny-class"
