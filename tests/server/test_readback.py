"""Asynchronous read-back of finished images (the core's ``_reading`` / ``_collect``), driven on CPU.

On CPU ``PendingImages.event`` is None, so every read-back is ready at once. These tests wrap
``Worker.read_images`` to hand the engine a ``PendingImages`` stand-in that answers ``ready()`` as told
(and records when it was polled and waited for), so the CUDA-only paths run here: polling between steps,
waiting when nothing else can run, read-back faults, and the oldest-first completion order.

The request manager and an in-process core are driven directly (no HTTP) on one tiny class-conditional
model, one batch bucket of 4 rows. Requests submitted while holding the core's inbox lock reach it in one
turn and share every forward pass from the first one, so with distinct step counts they finish (and start
their read-backs) in a known order and at known steps.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from server.client import InprocClient
from server.core import EngineCore
from server.lifecycle import RequestManager, Task
from server.metrics import Metrics
from server.request import ResolvedRequest
from server.settings import Settings
from server.worker import PendingImages, RequestState, Worker
from tests.server.conftest import SIZE, FakeTextEncoder, start_server

BUCKETS = [4]
TIMEOUT = 20.0  # seconds; every wait below ends much sooner unless the engine is broken

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def pipelines(weights_dir: Path) -> dict[str, Any]:
    from model.pipeline import load_pipelines

    return load_pipelines(
        weights_dir, ["tiny-class"], device="cpu", dtype=torch.float32, text_encoder_loader=FakeTextEncoder
    )


def request(steps: int, seed: int, label: int = 0, num_images: int = 1) -> ResolvedRequest:
    return ResolvedRequest(
        model="tiny-class", prompt=None, negative_prompt=None, class_label=label, control=None,
        control_scale=1.0, num_inference_steps=steps, sampler="ddim", guidance_scale=1.0, seed=seed,
        num_images=num_images, width=SIZE, height=SIZE, guided=False,
    )  # fmt: skip


class GatedPending:
    """A ``PendingImages`` stand-in around the real (CPU, already complete) one.

    ``ready()`` answers False for its first ``not_ready_polls`` polls (forever when None), then True.
    ``wait()`` raises when ``fail`` is set, else returns the real images. Runs on the core's thread, where
    it records ``core.steps_run`` and ``probe()`` at creation, at every poll and at the wait.
    """

    def __init__(
        self,
        inner: PendingImages,
        engine: EngineCore,
        probe: Callable[[], Any],
        not_ready_polls: int | None,
        fail: bool = False,
    ) -> None:
        self.inner, self.engine, self.probe = inner, engine, probe
        self.not_ready_polls, self.fail = not_ready_polls, fail
        self.created = (engine.steps_run, probe())
        self.polls: list[tuple[int, Any, bool]] = []  # (steps_run, probe(), answer)
        self.waited: tuple[int, Any, int] | None = None  # (steps_run, probe(), scheduler entries)

    def ready(self) -> bool:
        answer = self.not_ready_polls is not None and len(self.polls) >= self.not_ready_polls
        self.polls.append((self.engine.steps_run, self.probe(), answer))
        return answer

    def wait(self) -> list[np.ndarray | None]:
        self.waited = (self.engine.steps_run, self.probe(), len(self.engine.scheduler))
        if self.fail:
            raise RuntimeError("injected read-back fault")
        return self.inner.wait()


def gate_read_backs(
    worker: Worker,
    engine: EngineCore,
    specs: Sequence[dict[str, Any]],
    probe: Callable[[], Any] = lambda: None,
) -> list[tuple[int, GatedPending]]:
    """Wrap ``worker.read_images``: its i-th call returns ``GatedPending(**specs[i])`` (later calls: plain).

    Returns the list, filled as read-backs start, of (number of requests in it, its GatedPending).
    """
    real = worker.read_images
    started: list[tuple[int, GatedPending]] = []

    def read_images(states: Sequence[RequestState]) -> Any:
        inner = real(states)
        assert inner.event is None and inner.ready()  # CPU: the images are already on the host
        if len(started) >= len(specs):
            return inner
        pending = GatedPending(inner, engine, probe, **specs[len(started)])
        started.append((len(states), pending))
        return pending

    worker.read_images = read_images  # type: ignore[method-assign]
    return started


async def with_engine(
    pipelines: dict[str, Any],
    body: Callable[[RequestManager, EngineCore], Awaitable[None]],
    drain_timeout: float = TIMEOUT,
) -> RequestManager:
    """Run ``body(engine, core)`` against a started in-process engine over a fresh worker; stop it after."""
    client = InprocClient(Settings())
    core = client.core = EngineCore(Worker(pipelines, BUCKETS, cuda_graphs=False))
    engine = RequestManager(client, Metrics(), max_queue_size=16)
    engine.start(asyncio.get_running_loop())
    try:
        await body(engine, core)
    finally:
        await engine.stop(drain_timeout=drain_timeout)
    assert not engine.running
    return engine


def submit_together(engine: RequestManager, reqs: Sequence[ResolvedRequest]) -> list[Task]:
    """Admit ``reqs`` in one core turn (the inbox lock is re-entrant), so they share the first pass."""
    core = engine.client.core  # type: ignore[attr-defined]
    with core._wake:
        return [engine.submit(r, "generate", timeout=TIMEOUT) for r in reqs]


def evaluations(core: EngineCore, tasks: list[Task], i: int) -> int | None:
    """Denoiser evaluations request ``tasks[i]`` has taken, as the core sees it (core thread)."""
    req = core._requests.get(tasks[i].id) if len(tasks) > i else None
    return None if req is None or req.state is None else req.state.evaluations


async def finish(*tasks: Task) -> None:
    await asyncio.wait_for(asyncio.gather(*(t.wait() for t in tasks)), TIMEOUT)


_reference: dict[tuple[Any, ...], list[bytes]] = {}


def reference_pngs(pipelines: dict[str, Any], req: ResolvedRequest) -> list[bytes]:
    """The request's PNGs alone on an engine whose read-backs are the plain CPU ones."""
    key = (req.num_inference_steps, req.seed, req.class_label, req.num_images)
    if key not in _reference:

        async def body(engine: RequestManager, core: EngineCore) -> None:
            (task,) = submit_together(engine, [req])
            await finish(task)
            assert task.status == "completed", task.error_message
            _reference[key] = task.pngs or []

        asyncio.run(with_engine(pipelines, body))
    return _reference[key]


def test_engine_keeps_stepping_while_a_read_back_is_pending(pipelines: dict[str, Any]) -> None:
    """Request a finishes at step 2; its read-back answers not ready for 4 polls. Meanwhile b (30 steps)
    takes a step between every poll; a completes, with its own PNGs, once the read-back is ready."""
    k = 4
    a_req, b_req = request(2, seed=11, label=1), request(30, seed=12, label=2)
    tasks: list[Task] = []

    async def body(engine: RequestManager, core: EngineCore) -> None:
        started = gate_read_backs(
            core.worker, core, [{"not_ready_polls": k}], probe=lambda: evaluations(core, tasks, 1)
        )
        with core._wake:  # `tasks` is filled before the core's first step (the probe reads it)
            tasks.extend(submit_together(engine, [a_req, b_req]))
        a, b = tasks
        await finish(a)
        assert a.status == "completed", a.error_message
        await finish(b)
        assert b.status == "completed", b.error_message

        ((count, pending),) = started
        assert count == 1  # a alone finished in that step
        assert pending.created == (2, 2)  # a's read-back began after step 2 (b at step 2 as well)
        answers = [answer for _, _, answer in pending.polls]
        assert answers == [False] * k + [True]  # polled once per loop turn until ready, then not again
        steps = [s for s, _, _ in pending.polls]
        b_progress = [p for _, p, _ in pending.polls]
        # One forward pass (of b) between consecutive polls: the engine did not wait for the read-back.
        assert steps == list(range(2, 2 + k + 1))
        assert b_progress == steps
        assert pending.waited is not None
        waited_step, b_step, entries = pending.waited
        assert waited_step == 2 + k and b_step == 2 + k  # completed right after the first True
        assert entries == 1  # b was still running when a completed
        assert core.steps_run == 30

    asyncio.run(with_engine(pipelines, body))
    a, b = tasks
    assert a.pngs == reference_pngs(pipelines, a_req)
    assert b.pngs == reference_pngs(pipelines, b_req)
    assert a.pngs != b.pngs


def test_read_back_is_waited_for_when_nothing_else_runs(pipelines: dict[str, Any]) -> None:
    """A read-back that never reports ready: with nothing else to schedule the engine waits for it
    (``_collect(block=True)``) instead of polling, and the request completes without another submission."""
    req = request(3, seed=21, label=0, num_images=2)
    tasks: list[Task] = []

    async def body(engine: RequestManager, core: EngineCore) -> None:
        started = gate_read_backs(core.worker, core, [{"not_ready_polls": None}])
        tasks.extend(submit_together(engine, [req]))
        await finish(*tasks)
        assert tasks[0].status == "completed", tasks[0].error_message
        ((count, pending),) = started
        assert count == 1 and pending.created[0] == 3
        # Exactly one non-blocking poll (the top of the next loop turn), then the blocking wait: no spin.
        assert [answer for _, _, answer in pending.polls] == [False]
        assert pending.waited is not None and pending.waited[0] == 3 and pending.waited[2] == 0
        assert core.steps_run == 3  # nothing else ran

    asyncio.run(with_engine(pipelines, body))
    (task,) = tasks
    assert task.pngs is not None and len(task.pngs) == 2
    assert task.pngs == reference_pngs(pipelines, req)


def test_stop_completes_a_pending_read_back(pipelines: dict[str, Any]) -> None:
    """Stopping while a read-back is pending (and another request is still sampling): the sampling one is
    turned away (503) and the finished one still completes with its images."""
    a_req, c_req = request(2, seed=31), request(900, seed=32)
    tasks: list[Task] = []

    async def body(engine: RequestManager, core: EngineCore) -> None:
        started = gate_read_backs(core.worker, core, [{"not_ready_polls": None}])
        tasks.extend(submit_together(engine, [a_req, c_req]))
        c = tasks[1]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + TIMEOUT
        while not started or len(started[0][1].polls) < 3:  # a's read-back pending across a few steps
            assert loop.time() < deadline and not c.done
            await asyncio.sleep(0.005)
        await engine.stop(drain_timeout=0)
        await finish(*tasks)
        assert started[0][1].waited is not None

    asyncio.run(with_engine(pipelines, body))
    a, c = tasks
    assert c.status == "failed" and c.error_status == 503
    assert a.status == "completed", a.error_message
    assert a.pngs == reference_pngs(pipelines, a_req)


def test_failed_read_back_fails_only_its_requests(pipelines: dict[str, Any]) -> None:
    """a1 and a2 finish in the same step (one read-back, whose wait raises); b finishes later and
    completes normally; the engine goes on to serve a later request."""
    a1_req, a2_req = request(2, seed=41, label=0), request(2, seed=42, label=1)
    b_req, c_req = request(5, seed=43, label=2), request(3, seed=44, label=1)
    tasks: list[Task] = []

    async def body(engine: RequestManager, core: EngineCore) -> None:
        started = gate_read_backs(core.worker, core, [{"not_ready_polls": 2, "fail": True}])
        tasks.extend(submit_together(engine, [a1_req, a2_req, b_req]))
        await finish(*tasks)
        ((count, pending),) = started
        assert count == 2 and pending.waited is not None
        assert pending.waited[2] == 1  # b was still sampling when the read-back failed
        tasks.append(engine.submit(c_req, "generate", timeout=TIMEOUT))
        await finish(tasks[-1])
        assert engine.running

    engine = asyncio.run(with_engine(pipelines, body))
    a1, a2, b, c = tasks
    for task in (a1, a2):
        assert task.status == "failed" and task.error_status == 500 and task.pngs is None
        assert task.error_id and task.error_id in (task.error_message or "")
    assert a1.error_id == a2.error_id  # one fault, one id
    assert "injected" not in (a1.error_message or "")
    assert b.status == "completed" and b.pngs == reference_pngs(pipelines, b_req)
    assert c.status == "completed" and c.pngs == reference_pngs(pipelines, c_req)
    assert engine.metrics.registry.get_sample_value("unet_server_engine_errors_total") == 1


def test_oldest_read_back_holds_back_later_ready_ones(pipelines: dict[str, Any]) -> None:
    """Two read-backs: a's (finished at step 2) is not ready for 8 polls; b's (finished at step 4) is
    ready at once. ``_collect(block=False)`` only looks at the oldest, so b's is not even polled until
    a's is ready: b completes in the same collect as a, 6 steps after its images were available."""
    k = 8
    a_req, b_req, c_req = request(2, seed=51), request(4, seed=52), request(40, seed=53)
    tasks: list[Task] = []
    completed: list[str] = []

    async def body(engine: RequestManager, core: EngineCore) -> None:
        started = gate_read_backs(core.worker, core, [{"not_ready_polls": k}, {"not_ready_polls": 0}])
        real = engine._complete

        def record(task: Task, images: Any) -> None:  # runs as each task completes, in completion order
            completed.append(task.id)
            real(task, images)

        engine._complete = record  # type: ignore[method-assign]
        tasks.extend(submit_together(engine, [a_req, b_req, c_req]))
        await finish(*tasks)
        (_, first), (_, second) = started
        assert first.created[0] == 2 and second.created[0] == 4
        assert [answer for _, _, answer in first.polls] == [False] * k + [True]
        assert first.waited is not None and first.waited[0] == 2 + k
        # b's read-back was ready all along but was first polled, and waited for, only once a's was.
        assert [(s, answer) for s, _, answer in second.polls] == [(2 + k, True)]
        assert second.waited is not None and second.waited[0] == first.waited[0]
        assert second.waited[2] == 1  # c still sampling: this was the non-blocking collect

    asyncio.run(with_engine(pipelines, body))
    a, b, c = tasks
    assert completed == [a.id, b.id, c.id]
    for task, req in zip(tasks, (a_req, b_req, c_req), strict=True):
        assert task.status == "completed" and task.pngs == reference_pngs(pipelines, req)


def test_cpu_read_back_is_ready_at_once(pipelines: dict[str, Any]) -> None:
    """Plain CPU worker: ``PendingImages`` has no event, is ready at once, ``wait`` splits per request."""
    worker = Worker(pipelines, BUCKETS, cuda_graphs=False)
    states = [worker.prepare(request(2, seed=61, num_images=2)), worker.prepare(request(2, seed=63))]
    while not all(worker.step(states)):
        pass
    pending = worker.read_images(states)
    assert pending.event is None and pending.ready()
    images = pending.wait()
    assert [im.shape for im in images] == [(2, SIZE, SIZE, 1), (1, SIZE, SIZE, 1)]
    assert all(im.dtype == np.uint8 for im in images)
    assert [im.tobytes() for im in images] == [im.tobytes() for im in worker.images(states)]


def test_failed_read_back_is_a_500_with_error_id_over_http(weights_dir: Path) -> None:
    server = start_server(weights_dir, models=["tiny-class"], batch_buckets=[4], max_batch_rows=4)
    try:
        gate_read_backs(server.core.worker, server.core, [{"not_ready_polls": 1, "fail": True}])
        body = {"class_label": 0, "num_inference_steps": 3, "guidance_scale": 1, "seed": 7}
        with server.client() as c:
            r = c.post("/generate", json=body)
            assert r.status_code == 500
            detail = r.json()
            assert detail["error_id"] and detail["error_id"] in detail["detail"]
            assert "Traceback" not in r.text and "injected" not in r.text
            ok = c.post("/generate", json=body)  # the next read-back is the plain CPU one
            assert ok.status_code == 200 and len(ok.json()["images"]) == 1
    finally:
        server.stop()


def test_read_back_whose_ready_raises_fails_its_requests(pipelines: dict[str, Any]) -> None:
    tasks: list[Task] = []

    class Broken(GatedPending):
        def ready(self) -> bool:
            raise RuntimeError("injected poll fault")

    async def body(engine: RequestManager, core: EngineCore) -> None:
        real = core.worker.read_images
        core.worker.read_images = lambda states: Broken(  # type: ignore[method-assign]
            real(states), core, lambda: None, not_ready_polls=None
        )
        tasks.extend(submit_together(engine, [request(2, seed=71), request(6, seed=72)]))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + TIMEOUT
        while not tasks[0].done and engine.running and loop.time() < deadline:
            await asyncio.sleep(0.01)
        assert engine.running, "the engine thread died"
        await finish(*tasks)

    asyncio.run(with_engine(pipelines, body, drain_timeout=0))
    assert tasks[0].status == "failed" and tasks[0].error_status == 500


def test_cancel_during_read_back_is_409_finishing_then_the_job_completes(weights_dir: Path) -> None:
    """A job whose sampling has finished can no longer be cancelled: 409 saying it is finishing (not
    "running"), and its images still arrive."""
    server = start_server(weights_dir, models=["tiny-class"], batch_buckets=[4], max_batch_rows=4)
    try:
        started = gate_read_backs(server.core.worker, server.core, [{"not_ready_polls": None}])
        with server.client() as c:
            long = c.post(
                "/v1/jobs",
                json={"class_label": 1, "num_inference_steps": 400, "guidance_scale": 1, "seed": 1},
            ).json()["id"]
            short = c.post(
                "/v1/jobs", json={"class_label": 0, "num_inference_steps": 2, "guidance_scale": 1, "seed": 2}
            ).json()["id"]
            deadline = time.monotonic() + 20
            while not started and time.monotonic() < deadline:  # the short job's read-back has begun
                time.sleep(0.01)
            assert started, "the short job never reached its read-back"
            r = c.post(f"/v1/jobs/{short}/cancel")
            assert r.status_code == 409, r.text
            assert "finishing" in r.json()["detail"]
            assert (
                c.post(f"/v1/jobs/{long}/cancel").status_code == 200
            )  # now idle: the read-back is waited for
            while c.get(f"/v1/jobs/{short}").json()["status"] != "completed" and time.monotonic() < deadline:
                time.sleep(0.01)
            done = c.get(f"/v1/jobs/{short}").json()
            assert done["status"] == "completed" and len(done["result"]["images"]) == 1
    finally:
        server.stop()
