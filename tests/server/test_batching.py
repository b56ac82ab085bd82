"""Step-level batching through the real server: batch invariance, evidence, freed rows, queue bound."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.server.conftest import LiveServer, start_server
from tests.server.test_api import edges, png_b64


def metric(text: str, name: str, sample: str | None = None, **labels: str) -> float:
    """Sum of the samples of ``name`` (or its ``sample`` suffix) whose labels include ``labels``."""
    total = 0.0
    for family in text_string_to_metric_families(text):
        if family.name not in (name, name.removesuffix("_total")):  # the parser drops counters' _total
            continue
        for s in family.samples:
            if s.name == (sample or name) and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def forward_stats(client: httpx.Client) -> tuple[float, float]:
    text = client.get("/metrics").text
    name = "unet_server_rows_per_forward"
    return metric(text, name, name + "_count"), metric(text, name, name + "_sum")


EVALS_PER_STEP = {"heun": 2, "flow_heun": 2}

# 16 requests: two models (two batch groups), mixed samplers (ODE and SDE), steps, seeds, guidance,
# several images, and ControlNet rows sharing the text U-Net with plain text rows.
REQUESTS: list[dict[str, Any]] = [
    {"model": "tiny-class", "class_label": 0, "sampler": "ddim", "num_inference_steps": 8, "seed": 1},
    {"model": "tiny-class", "class_label": 1, "sampler": "euler", "num_inference_steps": 10, "seed": 2},
    {"model": "tiny-class", "class_label": 2, "sampler": "heun", "num_inference_steps": 5, "seed": 3},
    {
        "model": "tiny-class",
        "class_label": "bag",
        "sampler": "dpmpp_2m",
        "num_inference_steps": 9,
        "seed": 4,
        "num_images": 2,
    },
    {
        "model": "tiny-class",
        "class_label": 0,
        "sampler": "euler_ancestral",
        "num_inference_steps": 7,
        "seed": 5,
    },
    {"model": "tiny-class", "class_label": 1, "sampler": "dpmpp_2m_sde", "num_inference_steps": 8, "seed": 6},
    {
        "model": "tiny-class",
        "class_label": 2,
        "sampler": "DPM++ 2M Karras",
        "num_inference_steps": 6,
        "seed": 7,
        "guidance_scale": 1.0,
    },
    {"model": "tiny-class", "sampler": "ddim", "num_inference_steps": 12, "seed": 8},
    {
        "model": "tiny-text",
        "prompt": "a red shirt",
        "sampler": "flow_euler",
        "num_inference_steps": 8,
        "seed": 9,
    },
    {
        "model": "tiny-text",
        "prompt": "a blue bag",
        "sampler": "flow_heun",
        "num_inference_steps": 5,
        "seed": 10,
    },
    {
        "model": "tiny-text",
        "prompt": "boots",
        "sampler": "flow_euler_maruyama",
        "num_inference_steps": 9,
        "seed": 11,
        "negative_prompt": "blurry",
    },
    {
        "model": "tiny-text",
        "prompt": "a hat",
        "sampler": "dpmpp_2m",
        "num_inference_steps": 10,
        "seed": 12,
        "num_images": 2,
        "guidance_scale": 1.0,
    },
    {
        "model": "tiny-text",
        "prompt": "sandals",
        "sampler": "euler",
        "num_inference_steps": 7,
        "seed": 13,
        "width": 16,
        "height": 16,
    },
    {
        "model": "tiny-text-edges",
        "prompt": "a shoe",
        "sampler": "flow_euler",
        "num_inference_steps": 8,
        "seed": 14,
        "control_image": png_b64(edges()),
    },
    {
        "model": "tiny-text-edges",
        "prompt": "a coat",
        "sampler": "euler_ancestral",
        "num_inference_steps": 6,
        "seed": 15,
        "control_image": png_b64(edges()),
        "control_scale": 0.5,
    },
    {
        "model": "tiny-text-edges",
        "prompt": "a sock",
        "sampler": "flow_euler",
        "num_inference_steps": 11,
        "seed": 16,
    },
]


def evaluations(req: dict[str, Any]) -> int:
    k = EVALS_PER_STEP.get(req["sampler"], 1)
    return req["num_inference_steps"] * k - (k - 1)


async def _send_all(url: str, bodies: list[dict[str, Any]]) -> list[dict[str, Any]]:
    async with httpx.AsyncClient(base_url=url, timeout=120) as c:
        responses = await asyncio.gather(*(c.post("/generate", json=b) for b in bodies))
    for r in responses:
        assert r.status_code == 200, r.text
    return [r.json() for r in responses]


def test_batch_invariance_and_batching_evidence(live: LiveServer, client: httpx.Client) -> None:
    assert len(REQUESTS) == 16
    count0, rows0 = forward_stats(client)
    plan0 = live.core.scheduler.last_plan.number if live.core.scheduler.last_plan else 0
    together = asyncio.run(_send_all(live.url, REQUESTS))
    count1, rows1 = forward_stats(client)
    forwards, rows = count1 - count0, rows1 - rows0
    total_evals = sum(evaluations(r) for r in REQUESTS)
    # Step-level batching: forward passes carry many rows, and there are far fewer of them than steps.
    assert rows / forwards > 2, (rows, forwards)
    assert forwards <= total_evals / 2, (forwards, total_evals)
    plans = [p for p in live.core.scheduler.history if p.number > plan0]
    assert max(len(p.entries) for p in plans) > 3
    # Requests of different samplers and step counts shared passes (joined and left at step granularity).
    alone = [asyncio.run(_send_all(live.url, [r]))[0] for r in REQUESTS]
    for a, b, req in zip(together, alone, REQUESTS, strict=True):
        assert a["seeds"] == b["seeds"]
        assert a["images"] == b["images"], f"batched result differs for {req}"


def _wait_for(predicate: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.005)
    raise TimeoutError


def _next_plan_after(live: LiveServer, number: int) -> Any:
    _wait_for(lambda: live.core.scheduler.last_plan.number > number)
    return next(p for p in live.core.scheduler.history if p.number == number + 1)


def test_cancel_frees_rows_for_the_next_forward_pass(live: LiveServer, client: httpx.Client) -> None:
    long = {"model": "tiny-class", "class_label": 0, "num_inference_steps": 400, "sampler": "Euler Karras"}
    a = client.post("/v1/jobs", json={**long, "seed": 1}).json()["id"]
    b = client.post("/v1/jobs", json={**long, "seed": 2}).json()["id"]
    _wait_for(lambda: {a, b} <= set(live.core.scheduler.last_plan.ids))
    assert client.post(f"/v1/jobs/{a}/cancel").json()["status"] == "cancelled"
    n = live.core.scheduler.last_plan.number  # at most this pass (in flight) still carries a
    nxt = _next_plan_after(live, n)
    assert a not in nxt.ids and b in nxt.ids
    assert client.post(f"/v1/jobs/{b}/cancel").status_code == 200
    live.wait_idle()


def test_client_disconnect_cancels(live: LiveServer, client: httpx.Client) -> None:
    def disconnects() -> float:
        text = client.get("/metrics").text
        return metric(text, "unet_server_requests_total", status="499", endpoint="generate")

    before = disconnects()
    long = {"model": "tiny-class", "num_inference_steps": 400, "sampler": "Euler Karras"}
    keep = client.post("/v1/jobs", json={**long, "class_label": 1})
    keep_id = keep.json()["id"]
    body = json.dumps({**long, "class_label": 0}).encode()
    host, port = live.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:  # a raw client we can hang up on at will
        sock.sendall(
            b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        _wait_for(lambda: len(live.core.scheduler) == 2)  # admitted and sampling beside the job
    # The abandoned request leaves the scheduler: only the job remains, and the next pass carries only it.
    _wait_for(lambda: len(live.core.scheduler) == 1)
    n = live.core.scheduler.last_plan.number
    assert _next_plan_after(live, n).ids == [keep_id]
    _wait_for(lambda: disconnects() == before + 1)
    client.post(f"/v1/jobs/{keep_id}/cancel")


@pytest.fixture(scope="module")
def small(weights_dir: Path) -> Any:
    """A server with room for 4 rows per pass, 2 waiting requests, and a 1.5 s request deadline."""
    server = start_server(
        weights_dir,
        max_batch_rows=4,
        batch_buckets=[4],
        max_queue_size=2,
        request_timeout_seconds=1.5,
        max_inference_steps=5000,
        models=["tiny-class"],
    )
    yield server
    server.stop()


def test_deadline_504_frees_rows(small: LiveServer) -> None:
    with small.client() as c:
        body = {"guidance_scale": 1, "num_inference_steps": 5000, "sampler": "Euler Karras"}
        keep = c.post("/v1/jobs", json={**body, "class_label": 1}).json()
        t0 = time.monotonic()
        r = c.post("/generate", json={**body, "class_label": 0})
        assert r.status_code == 504 and "deadline" in r.json()["detail"]
        assert 1.4 < time.monotonic() - t0 < 10
        # Expired entries leave before the next plan is made: the next pass carries only the job.
        n = small.core.scheduler.last_plan.number
        assert _next_plan_after(small, n).ids == [keep["id"]]
        assert small.core.scheduler.last_plan.ids == [keep["id"]]
        c.post(f"/v1/jobs/{keep['id']}/cancel")


def test_queue_bound_429_and_live_while_saturated(small: LiveServer) -> None:
    # Guided: 2 rows each, so 2 requests fill a pass. Karras spacing allows more steps than the table.
    body = {"class_label": 0, "num_inference_steps": 5000, "sampler": "Euler Karras"}
    with small.client() as c:
        ids = [c.post("/v1/jobs", json={**body, "seed": seed}).json()["id"] for seed in range(2)]
        # One full pass of 4 rows; admission counts what the serving side has heard has started.
        _wait_for(lambda: all(c.get(f"/v1/jobs/{i}").json()["status"] == "running" for i in ids))
        statuses = []
        for seed in range(2, 8):
            r = c.post("/v1/jobs", json={**body, "seed": seed})
            statuses.append(r.status_code)
            if r.status_code == 202:
                ids.append(r.json()["id"])
            else:
                assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
                assert "queue is full" in r.json()["detail"]
        assert statuses == [202, 202, 429, 429, 429, 429]  # max_queue_size=2 waiting
        queued = [c.get(f"/v1/jobs/{i}").json() for i in ids]
        assert [q["status"] for q in queued] == ["running"] * 2 + ["queued"] * 2
        assert [q["queue_position"] for q in queued] == [None, None, 0, 1]
        r = c.post("/generate", json=body)
        assert r.status_code == 429
        # Liveness answers quickly while saturated.
        t0 = time.monotonic()
        assert c.get("/health/live").status_code == 200
        assert time.monotonic() - t0 < 1.0
        text = c.get("/metrics").text
        assert metric(text, "unet_server_queue_size") == 2
        assert metric(text, "unet_server_running_requests") == 2
        assert metric(text, "unet_server_outstanding_rows") == 8  # 4 guided requests, 2 rows each
        assert metric(text, "unet_server_requests_total", status="429", endpoint="jobs") >= 4
        for i in ids:
            c.post(f"/v1/jobs/{i}/cancel")
        small.wait_idle()


def test_fault_fails_only_that_batch(small: LiveServer) -> None:
    small.wait_idle()  # no pass of an earlier test's requests may take the injected fault
    worker = small.core.worker
    real_step = worker.step
    armed = threading.Event()
    armed.set()

    def flaky(states: Any) -> Any:
        if armed.is_set():
            armed.clear()
            raise RuntimeError("injected fault")
        return real_step(states)

    worker.step = flaky
    try:
        with small.client() as c:
            r = c.post("/generate", json={"class_label": 0, "num_inference_steps": 3})
            assert r.status_code == 500
            body = r.json()
            assert body["error_id"] and body["error_id"] in body["detail"]
            assert "Traceback" not in r.text and "injected" not in r.text
            ok = c.post("/generate", json={"class_label": 0, "num_inference_steps": 3})
            assert ok.status_code == 200
            assert metric(c.get("/metrics").text, "unet_server_engine_errors_total") == 1
    finally:
        del worker.step


def test_cancel_between_schedule_and_step_stays_cancelled(small: LiveServer) -> None:
    """A job cancelled after the engine planned its pass, before that pass ran, stays cancelled: the
    pass's events do not flip it back to running, and it leaves the engine (no device state kept)."""
    core = small.core
    real_step = core._step
    planned, cancelled = threading.Event(), threading.Event()

    def step_after_cancel(plan: Any) -> Any:
        if not planned.is_set():
            planned.set()
            cancelled.wait(10)
        return real_step(plan)

    core._step = step_after_cancel
    try:
        with small.client() as c:
            body = {"class_label": 0, "num_inference_steps": 5, "sampler": "euler"}
            job = c.post("/v1/jobs", json=body).json()["id"]
            assert planned.wait(10)
            r = c.post(f"/v1/jobs/{job}/cancel")
            cancelled.set()
            assert r.status_code == 200 and r.json()["status"] == "cancelled"
            small.wait_idle()  # the planned pass ran; the cancel reached the core; nothing is left
            assert c.get(f"/v1/jobs/{job}").json()["status"] == "cancelled"
            # The engine keeps serving, and the cancelled job holds nothing.
            assert c.post("/generate", json={**body, "seed": 1}).status_code == 200
            assert c.get(f"/v1/jobs/{job}").json()["status"] == "cancelled"
    finally:
        del core._step
