"""The engine core in a child process (``engine_mode="process"``), on CPU: same bytes as the in-process
engine, jobs and cancellation across the pipe, metrics from the child's step stats, a dying child fails its
requests, load errors reach /health/ready, and shutdown stops the child."""

from __future__ import annotations

import asyncio
import concurrent.futures
import multiprocessing
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from server.engine_process import ProcessClient
from server.lifecycle import EngineStopped, QueueFull, RequestManager
from server.messages import AddRequest, CancelRequest, EngineOutputs, Sampled, Started, StepStats
from server.metrics import Metrics
from server.request import ResolvedRequest
from server.settings import Settings
from tests.server.conftest import SIZE, start_server
from tests.server.test_api import read_sse

pytestmark = pytest.mark.timeout(180)

CLASS = {"model": "tiny-class", "class_label": 1, "num_inference_steps": 5}
TEXT = {"model": "tiny-text", "prompt": "a red bag", "num_inference_steps": 4, "sampler": "dpmpp_2m"}
BODIES = [{**CLASS, "seed": s} for s in range(3)] + [{**TEXT, "seed": s, "num_images": 2} for s in range(3)]


@pytest.fixture(scope="module")
def proc_server(weights_dir: Path) -> Any:
    server = start_server(weights_dir, engine_mode="process")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def one_model_server(weights_dir: Path) -> Any:
    """tiny-class alone: its child (and a replacement) loads and warms one model, not three."""
    server = start_server(weights_dir, engine_mode="process", models=["tiny-class"])
    yield server
    server.stop()


@pytest.fixture(scope="module")
def thread_server(weights_dir: Path) -> Any:
    server = start_server(weights_dir, engine_mode="thread")
    yield server
    server.stop()


def metric(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_runs_in_a_child_process(proc_server: Any) -> None:
    client = proc_server.state.client
    assert isinstance(client, ProcessClient) and proc_server.engine.running
    assert client._proc.pid != os.getpid() and client._proc.is_alive()


def test_same_bytes_as_the_thread_engine_alone_and_batched(proc_server: Any, thread_server: Any) -> None:
    """CPU fp32 is byte-exact: a seed gives the same PNGs whichever process samples it, alone or with others
    sharing its forward passes."""
    bodies = BODIES
    with thread_server.client() as c:
        expected = [c.post("/generate", json=b).json()["images"] for b in bodies]
    with proc_server.client() as c:
        alone = [c.post("/generate", json=b).json()["images"] for b in bodies]
    assert alone == expected

    def post(body: dict) -> list[str]:
        with proc_server.client() as c:
            r = c.post("/generate", json=body)
            assert r.status_code == 200, r.text
            return r.json()["images"]

    with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
        together = list(pool.map(post, bodies))
    assert together == expected


def test_job_events_and_metrics_cross_the_pipe(proc_server: Any) -> None:
    with proc_server.client() as c:
        before = c.get("/metrics").text
        r = c.post("/v1/jobs", json={**CLASS, "seed": 3, "num_inference_steps": 6})
        assert r.status_code == 202, r.text
        job = r.json()
        events = read_sse(c, job["id"])
        names = [n for n, _ in events]
        assert names[0] == "queued" and "started" in names and names[-1] == "completed"
        steps = [d["step"] for n, d in events if n == "progress"]
        assert steps == sorted(steps) and steps[-1] == 6
        info = c.get(f"/v1/jobs/{job['id']}").json()
        assert info["status"] == "completed" and info["step"] == info["total_steps"] == 6
        same = c.post("/generate", json={**CLASS, "seed": 3, "num_inference_steps": 6}).json()
        assert same["images"] == info["result"]["images"]
        after = c.get("/metrics").text
    # Recorded in the child, replayed on the parent's registry: 2 requests x 6 steps x 2 rows (guidance).
    evals = 'unet_server_model_evaluations_total{model="tiny-class"}'
    assert metric(after, evals) - metric(before, evals) == 2 * 6 * 2
    assert metric(after, "unet_server_forward_duration_seconds_count") > metric(
        before, "unet_server_forward_duration_seconds_count"
    )
    assert metric(after, "unet_server_queue_size") == 0 and metric(after, "unet_server_running_requests") == 0


def test_cancel_reaches_the_child(proc_server: Any) -> None:
    with proc_server.client() as c:
        job = c.post("/v1/jobs", json={**CLASS, "seed": 1, "num_inference_steps": 900}).json()
        deadline = time.monotonic() + 30
        while c.get(f"/v1/jobs/{job['id']}").json()["step"] < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        r = c.post(f"/v1/jobs/{job['id']}/cancel")
        assert r.status_code == 200 and r.json()["status"] == "cancelled"
        assert c.post(f"/v1/jobs/{job['id']}/cancel").status_code == 409
        # The child dropped it: nothing left running there (its gauge, replayed here, falls to 0) ...
        deadline = time.monotonic() + 30
        while metric(c.get("/metrics").text, "unet_server_running_requests") != 0:
            assert time.monotonic() < deadline, "the cancelled job kept running in the engine process"
            time.sleep(0.05)
        # ... and it still serves.
        assert c.post("/generate", json={**CLASS, "seed": 2}).status_code == 200


def _start_long_job(c: Any) -> str:
    job = c.post("/v1/jobs", json={**CLASS, "seed": 1, "num_inference_steps": 900}).json()
    deadline = time.monotonic() + 30
    while c.get(f"/v1/jobs/{job['id']}").json()["status"] != "running":
        assert time.monotonic() < deadline
        time.sleep(0.02)
    return job["id"]


def _wait_failed(c: Any, job_id: str) -> dict:
    deadline = time.monotonic() + 30
    while (info := c.get(f"/v1/jobs/{job_id}").json())["status"] != "failed":
        assert time.monotonic() < deadline
        time.sleep(0.02)
    return info


def test_a_child_that_keeps_dying_stays_down(proc_server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The last test on the module's process server (it takes it down; a child spawn costs seconds on 2
    cores). MAX_RESTARTS 0: any exit within the window, this one included, exhausts the budget."""
    import server.engine_process as ep

    monkeypatch.setattr(ep, "MAX_RESTARTS", 0)
    server = proc_server
    with server.client() as c:
        job_id = _start_long_job(c)
        os.kill(server.state.client._proc.pid, signal.SIGKILL)
        _wait_failed(c, job_id)
        r = c.get("/health/ready")
        assert r.status_code == 503 and r.json()["status"] == "failed"
        assert "not restarting" in r.json()["error"]
        r = c.post("/generate", json=CLASS)
        assert r.status_code == 503 and "engine is down" in r.json()["message"]


def test_a_dying_child_fails_its_requests_and_is_replaced(one_model_server: Any) -> None:
    """Each child spawn costs seconds on 2 cores, so the server is shared: its replacement child is the one
    test_stop_drains_then_the_child_exits then stops with the server."""
    server = one_model_server
    engine = server.state.client
    first = engine._proc.pid
    with server.client() as c:
        job_id = _start_long_job(c)
        os.kill(first, signal.SIGKILL)
        info = _wait_failed(c, job_id)
        assert info["error"]["status_code"] == 500 and info["error"]["error_id"]
        assert "engine process exited" in info["error"]["message"]
        r = c.post("/generate", json=CLASS)  # while the new engine loads (or already serves)
        assert r.status_code in (200, 503) and "Traceback" not in r.text
        if r.status_code == 503:
            assert "restarting" in r.json()["message"]
        deadline = time.monotonic() + 60
        while c.get("/health/ready").status_code != 200:
            assert time.monotonic() < deadline, "no new engine process"
            time.sleep(0.05)
        assert engine._proc.pid != first and engine._proc.is_alive()
        assert c.post("/generate", json={**CLASS, "seed": 4}).status_code == 200
        assert metric(c.get("/metrics").text, "unet_server_engine_errors_total") >= 1


def test_stop_drains_then_the_child_exits(one_model_server: Any) -> None:
    """The last test on its server: it stops it (the fixture's stop is then a no-op). After
    test_a_dying_child_fails_its_requests_and_is_replaced the child stopped here is the replacement."""
    server = one_model_server
    engine, client = server.engine, server.state.client
    with server.client() as c:
        job = c.post("/v1/jobs", json={**CLASS, "num_inference_steps": 40}).json()
    task = engine.jobs[job["id"]]
    server.stop()
    assert task.status == "completed" and task.pngs
    assert not engine.running and client._proc.exitcode == 0 and not client._proc.is_alive()


def test_load_error_reaches_readiness(tmp_path: Path) -> None:
    server = start_server(tmp_path, wait=False, engine_mode="process", models=["missing"])
    try:
        with server.client() as c:
            deadline = time.monotonic() + 60
            while (r := c.get("/health/ready")).json()["status"] != "failed":
                assert time.monotonic() < deadline
                time.sleep(0.05)
            error = r.json()["error"]
            assert r.status_code == 503 and "missing" in error and not error.startswith("EngineLoadError")
    finally:
        server.stop()


# -- the parent's side alone (no child) -----------------------------------------------------------


def tiny_request() -> ResolvedRequest:
    return ResolvedRequest(
        model="tiny-class", prompt=None, negative_prompt=None, class_label=0, control=None, control_scale=1.0,
        num_inference_steps=4, sampler="ddim", guidance_scale=1.0, seed=0, num_images=1, width=SIZE,
        height=SIZE, guided=False,
    )  # fmt: skip


def test_parent_admission_bound_and_queue_positions() -> None:
    """The serving side bounds the queue itself (429 without a round trip) and counts a request as waiting
    until the core reports it started; the pipe carries typed messages."""

    async def body() -> None:
        ours, theirs = multiprocessing.Pipe()
        client = ProcessClient(Settings())
        client._conn = ours
        engine = RequestManager(client, Metrics(), max_queue_size=2)
        engine.start(asyncio.get_running_loop())
        a = engine.submit(tiny_request(), "generate", 10.0)
        b = engine.submit(tiny_request(), "generate", 10.0, is_job=True)
        with pytest.raises(QueueFull):
            engine.submit(tiny_request(), "generate", 10.0)
        sent = [theirs.recv() for _ in range(2)]
        assert [type(m) for m in sent] == [AddRequest, AddRequest]
        assert [m.request_id for m in sent] == [a.id, b.id] and [m.progress for m in sent] == [False, True]
        assert engine.queue_position(a.id) == 0 and engine.queue_position(b.id) == 1
        theirs.send(EngineOutputs(events=[Started(a.id, time.monotonic())]))
        deadline = time.monotonic() + 10
        while a.status != "running":
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        assert engine.queue_position(a.id) is None and engine.queue_position(b.id) == 0
        engine.submit(tiny_request(), "generate", 10.0)  # a started: room again
        # Once the core reports sampling done, it is too late to cancel.
        stats = StepStats(0.25, 0.0, 3, 4, (("tiny-class", 3),))
        theirs.send(EngineOutputs(events=[Sampled(a.id)], steps=[stats]))
        while not a.sampling_done:
            await asyncio.sleep(0.01)
        assert not engine.cancel(a.id) and engine.cancel(b.id) and b.status == "cancelled"
        assert isinstance(theirs.recv(), AddRequest) and theirs.recv() == CancelRequest(b.id)
        text = engine.metrics.render().decode()  # the child's step stats became the parent's metrics
        assert metric(text, 'unet_server_model_evaluations_total{model="tiny-class"}') == 3
        assert metric(text, "unet_server_forward_duration_seconds_sum") == 0.25
        theirs.close()  # the child is gone: in-flight requests fail, admission stops
        while engine.running:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.01)
        assert a.status == "failed" and a.error_status == 500
        with pytest.raises(EngineStopped):
            engine.submit(tiny_request(), "generate", 10.0)

    asyncio.run(body())


@pytest.mark.gpu
def test_gpu_process_mode_matches_thread_mode(weights_dir: Path) -> None:
    """On CUDA with graphs: the process engine gives the thread engine's images (alone, same buckets), and
    concurrent requests all complete."""
    import numpy as np
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from tests.server.test_api import decode

    bodies = BODIES
    images = {}
    for mode in ("thread", "process"):
        server = start_server(weights_dir, device="cuda", engine_mode=mode, max_batch_rows=16,
                              batch_buckets=[4, 8, 16])  # fmt: skip
        try:
            assert isinstance(server.state.client, ProcessClient) == (mode == "process")
            with server.client() as c:
                images[mode] = [decode(c.post("/generate", json=b).json()["images"]) for b in bodies]
                with concurrent.futures.ThreadPoolExecutor(16) as pool:
                    codes = list(pool.map(lambda b: c.post("/generate", json=b).status_code, bodies * 4))
                assert codes == [200] * len(codes)
        finally:
            server.stop()
    for a, b in zip(images["thread"], images["process"], strict=True):
        for x, y in zip(a, b, strict=True):
            assert x.shape == y.shape
            assert np.abs(x.astype(int) - y.astype(int)).max() <= 2  # same graphs; fp16 reductions may differ
