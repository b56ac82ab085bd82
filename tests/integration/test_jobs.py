"""Jobs on the live server: 202 + id, server-sent events with per-step progress, status, and cancel."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator

import httpx
import pytest

from .conftest import Server, decode_png

pytestmark = pytest.mark.integration

TERMINAL = {"completed", "failed", "cancelled"}


def sse_events(response: httpx.Response) -> Iterator[tuple[str, dict]]:
    """(event, data) pairs of a text/event-stream response (comments and keep-alives skipped)."""
    event, data = "message", []
    for line in response.iter_lines():
        if line == "":
            if data:
                yield event, json.loads("\n".join(data))
            event, data = "message", []
        elif line.startswith(":"):
            continue
        else:
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "event":
                event = value
            elif name == "data":
                data.append(value)


def _submit(client: httpx.Client, body: dict) -> str:
    r = client.post("/v1/jobs", json=body)
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["status"] in {"queued", "running"}, job
    return job["id"]


def test_job_streams_progress_and_completes(server: Server, client: httpx.Client) -> None:
    spec = server.model_with("class")
    steps = 8
    job_id = _submit(
        client, {"model": spec["id"], "class_label": 1, "seed": 11, "num_inference_steps": steps}
    )
    events: list[tuple[str, dict]] = []
    with client.stream("GET", f"/v1/jobs/{job_id}/events", timeout=120) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        for event, data in sse_events(r):
            events.append((event, data))
            if event in TERMINAL:
                break
    names = [e for e, _ in events]
    assert names[0] == "queued" and names[-1] == "completed", names
    progress = [d["step"] for e, d in events if e == "progress"]
    assert progress, f"no progress events: {names}"
    assert progress == sorted(progress) and progress[-1] <= events[-1][1]["total_steps"]
    assert all(d["id"] == job_id for _, d in events)

    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "completed"
    assert job["step"] == job["total_steps"] > 0
    assert job["queue_position"] is None
    result = job["result"]
    assert result["seeds"] == [11] and result["num_inference_steps"] == steps
    decode_png(base64.b64decode(result["images"][0]))


def test_job_cancel_stops_it_and_frees_its_rows(server: Server, client: httpx.Client) -> None:
    spec = server.model_with("text")
    # Long enough that it cannot finish before the cancel lands, even on a GPU.
    steps = 200
    job_id = _submit(
        client, {"model": spec["id"], "prompt": "a green bag", "seed": 1, "num_inference_steps": steps}
    )
    events: list[tuple[str, dict]] = []
    cancelled = False
    with client.stream("GET", f"/v1/jobs/{job_id}/events", timeout=120) as r:
        for event, data in sse_events(r):
            events.append((event, data))
            if event == "progress" and data["step"] >= 1 and not cancelled:
                cancel = client.post(f"/v1/jobs/{job_id}/cancel")
                assert cancel.status_code == 200, cancel.text
                assert cancel.json()["status"] == "cancelled"
                cancelled = True
            if event in TERMINAL:
                break
    names = [e for e, _ in events]
    assert names[-1] == "cancelled", names
    last_step = events[-1][1]["step"]
    assert last_step < steps

    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "cancelled" and job["result"] is None
    # Nothing of it is left running: the engine goes idle (no queued or running requests).
    deadline = time.monotonic() + 10
    while True:
        metrics = client.get("/metrics").text
        gauges = {
            line.split()[0]: float(line.split()[1])
            for line in metrics.splitlines()
            if line.startswith(("unet_server_running_requests ", "unet_server_queue_size "))
        }
        if gauges.get("unet_server_running_requests") == 0 and gauges.get("unet_server_queue_size") == 0:
            break
        assert time.monotonic() < deadline, f"cancelled job still holds the engine: {gauges}"
        time.sleep(0.2)
    # Cancelling a finished job is a 409 and changes nothing.
    again = client.post(f"/v1/jobs/{job_id}/cancel")
    assert again.status_code == 409, again.text
    assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "cancelled"


def test_unknown_job_is_a_404(client: httpx.Client) -> None:
    assert client.get("/v1/jobs/no-such-job").status_code == 404
    assert client.post("/v1/jobs/no-such-job/cancel").status_code == 404
