"""The engine: one thread owns the device and runs ``plan = schedule(); step(plan); update(plan)`` forever.

Requests are submitted from the event loop (``submit`` is cheap: it only admits the request to the
scheduler, or raises ``QueueFull``); the loop thread prepares a request (prompt encoding, initial noise,
sampler states) at its first step, so the device is touched by this thread only. New requests join at
the next step and finished ones leave (step-level continuous batching). Events (started, progress,
completed, failed) go to an events sink: ``EngineEvents`` hands them to the event loop with
``call_soon_threadsafe``, batched: one call per step for all its jobs' progress (each call wakes the loop
and costs both threads a GIL hand-over); in an engine process (``server.engine_process``) ``PipeEvents``
sends them to the server process instead, one message per loop iteration.
PNG encoding never runs on the engine thread: small results are encoded on the event loop, large ones in
the thread pool (``INLINE_PNG_MAX_BYTES``).
On CUDA the engine never waits for the device inside a step: finished images are copied to host memory
asynchronously and the requests complete when their copy has landed (polled between steps; waited for
only when there is nothing else to run), and the worker lets the host run at most ``max_steps_ahead``
steps (1 by default) ahead of it.

A step that raises fails only the requests in that plan (500 with an error id, logged with traceback);
cancellation and deadlines remove a request from the scheduler at once, so the next plan never carries it.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from starlette.concurrency import run_in_threadpool

from server.imaging import to_pngs
from server.metrics import Metrics
from server.scheduler import Plan, QueueFull, Scheduler
from server.schemas import ResolvedRequest
from server.worker import PendingImages, Worker

log = logging.getLogger(__name__)

TERMINAL = ("completed", "failed", "cancelled")
# The engine thread shares the GIL with the HTTP event loop. CUDA calls (graph replay, event waits) release
# it, and a thread that wants it back waits until the holder yields: at the latest after the switch
# interval (5 ms by default), which under load would stall every step. 0.5 ms keeps those stalls short.
GIL_SWITCH_INTERVAL_S = 0.0005
# Results up to this many pixel bytes are PNG-encoded on the event loop (a 32x32 image takes tens of µs,
# less than the hand-over to a pool thread); larger ones go to the thread pool so the loop stays responsive.
INLINE_PNG_MAX_BYTES = 64 * 1024

__all__ = ["Engine", "EngineStopped", "QueueFull", "Task"]


class EngineStopped(Exception):
    """The engine is shutting down (or not started) and admits no new requests."""


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:16]}"


def new_task(
    request: ResolvedRequest,
    endpoint: str,
    is_job: bool,
    task_id: str | None = None,
    created: float | None = None,
) -> Task:
    """A fresh Task; an engine process passes the id and arrival time its server process gave it."""
    return Task(
        id=task_id or new_id("job" if is_job else "gen"),
        request=request,
        endpoint=endpoint,
        is_job=is_job,
        created=time.monotonic() if created is None else created,
        created_wall=time.time(),
        total_steps=request.num_inference_steps,
    )


@dataclass(eq=False)
class Task:
    """One request's life on the server, as routes and SSE streams see it (read on the event loop)."""

    id: str
    request: ResolvedRequest
    endpoint: str
    is_job: bool
    created: float  # time.monotonic()
    created_wall: float  # time.time(), for OpenAI's `created`
    status: str = "queued"
    step: int = 0
    total_steps: int = 0
    started: float | None = None
    finished: float | None = None
    pngs: list[bytes] | None = None
    sampling_done: bool = False  # images are being read back / encoded: too late to cancel
    error_status: int | None = None
    error_message: str | None = None
    error_id: str | None = None
    worker_state: Any = None  # the worker's RequestState, built on the engine thread
    _done: asyncio.Event = field(default_factory=asyncio.Event)
    _subscribers: list[asyncio.Queue] = field(default_factory=list)
    _last_progress: dict[str, Any] | None = None

    @property
    def done(self) -> bool:
        return self.status in TERMINAL

    async def wait(self) -> None:
        await self._done.wait()

    def timings(self) -> dict[str, float]:
        end = self.finished if self.finished is not None else time.monotonic()
        start = self.started if self.started is not None else end
        return {
            "queue_seconds": round(start - self.created, 6),
            "sampling_seconds": round(end - start, 6),
            "total_seconds": round(end - self.created, 6),
        }

    # -- event plumbing (event-loop thread only) ----------------------------------------------

    def subscribe(self) -> asyncio.Queue:
        """A queue of (event, data) pairs, pre-filled with what already happened."""
        q: asyncio.Queue = asyncio.Queue()
        q.put_nowait(("queued", self._event_data()))
        if self.started is not None:
            q.put_nowait(("started", self._event_data()))
        if self._last_progress is not None and not self.done:
            q.put_nowait(("progress", self._last_progress))
        if self.done:
            q.put_nowait((self.status, self._event_data()))
        else:
            self._subscribers.append(q)
        return q

    def unsubscribe(self, q: asyncio.Queue) -> None:
        if q in self._subscribers:
            self._subscribers.remove(q)

    def _event_data(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "id": self.id,
            "status": self.status,
            "step": self.step,
            "total_steps": self.total_steps,
        }
        if self.status == "failed":
            data["error"] = {
                "status_code": self.error_status,
                "message": self.error_message,
                "error_id": self.error_id,
            }
        return data

    def _publish(self, event: str, data: dict[str, Any] | None = None) -> None:
        data = data if data is not None else self._event_data()
        if event == "progress":
            self._last_progress = data
        for q in list(self._subscribers):
            q.put_nowait((event, data))
        if event in TERMINAL:
            self._subscribers.clear()
            self._done.set()


def _publish_many(events: list[tuple[Task, str, dict[str, Any] | None]]) -> None:
    """Publish several tasks' events in one event-loop callback (event-loop thread)."""
    for task, event, data in events:
        task._publish(event, data)


# -- what happens to a task on the event loop (shared by Engine and server.engine_process.EngineProcess) --


def fail_task(task: Task, status: int, message: str, error_id: str | None = None) -> None:
    """Mark ``task`` failed and tell its waiters (event-loop thread); no-op once it is terminal."""
    if task.done:
        return
    task.status = "failed"
    task.finished = time.monotonic()
    task.error_status, task.error_message, task.error_id = status, message, error_id
    task._publish("failed")


def complete_task(task: Task, images: np.ndarray, metrics: Metrics, after: Callable[[Task], None]) -> None:
    """PNG-encode ``images`` (uint8 (n, H, W, C)) and complete ``task`` (event-loop thread): small results
    inline, large ones in the thread pool; ``after(task)`` runs once it completed."""

    def completed(pngs: list[bytes]) -> None:
        if task.done:
            return
        task.pngs = pngs
        task.status = "completed"
        task.finished = time.monotonic()
        metrics.images_generated_total.labels(task.request.model).inc(len(pngs))
        task._publish("completed")
        after(task)

    def encoding_failed() -> None:
        error_id = uuid.uuid4().hex[:12]
        log.exception("PNG encoding failed (error_id=%s, request=%s)", error_id, task.id)
        fail_task(task, 500, f"internal error while encoding (error id {error_id})", error_id)

    async def encode() -> None:
        try:
            pngs = await run_in_threadpool(to_pngs, images)
        except Exception:
            encoding_failed()
            return
        completed(pngs)

    if images.size > INLINE_PNG_MAX_BYTES:
        asyncio.ensure_future(encode())
        return
    try:
        pngs = to_pngs(images)
    except Exception:
        encoding_failed()
        return
    completed(pngs)


class EngineEvents:
    """Where the engine thread sends what happened to its tasks. This one: to the ``Task`` objects on the
    asyncio loop, one ``call_soon_threadsafe`` per batch of events (each call wakes the loop and costs both
    threads a GIL hand-over). ``server.engine_process`` has one that writes them to a pipe instead."""

    def __init__(self, engine: Engine, loop: asyncio.AbstractEventLoop) -> None:
        self.engine = engine
        self.loop = loop

    def _call(self, fn: Callable[..., Any], *args: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # loop closed during shutdown
            pass

    def started(self, tasks: list[Task]) -> None:
        self._call(_publish_many, [(t, "started", None) for t in tasks])

    def progress(self, tasks: list[Task]) -> None:
        """Jobs that advanced one step (``task.step`` / ``total_steps`` already updated)."""
        self._call(_publish_many, [(t, "progress", t._event_data()) for t in tasks])

    def sampled(self, tasks: list[Task]) -> None:
        """Sampling finished; images are being read back (in-process: nothing to do, the Task is shared)."""

    def completed(self, finished: list[tuple[Task, np.ndarray]]) -> None:
        self._call(self.engine._complete_many, finished)

    def failed(self, task: Task, status: int, message: str, error_id: str | None) -> None:
        self._call(fail_task, task, status, message, error_id)

    def flush(self) -> None:
        """Once per engine-loop iteration, before the loop may wait (batching transports send here)."""


class Engine:
    """Step-level continuous batching over a ``Worker``; see the module docstring."""

    def __init__(
        self,
        worker: Worker,
        max_queue_size: int,
        metrics: Metrics,
        max_finished_jobs: int = 1000,
        clock: Callable[[], float] = time.monotonic,
        events: Any = None,
    ) -> None:
        """``events``: an ``EngineEvents``-like sink; None: to the asyncio loop given to ``start``."""
        self.worker = worker
        self.events = events
        self.metrics = metrics
        self.scheduler = Scheduler(max_rows=worker.max_rows, max_queue_size=max_queue_size, clock=clock)
        self.jobs: OrderedDict[str, Task] = OrderedDict()
        self.max_finished_jobs = max_finished_jobs
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._accepting = False
        self._stop = False
        self.steps_run = 0
        # Read-backs in flight (engine thread only): requests that finished sampling, oldest first.
        self._reading: deque[tuple[list[Task], PendingImages]] = deque()
        self._forward_ewma = 0.05

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop | None) -> None:
        """Start the loop thread; events go to ``loop`` unless an events sink was given."""
        if self.events is None:
            self.events = EngineEvents(self, loop)
        self._accepting = True
        self._thread = threading.Thread(target=self._run, name="unet-engine", daemon=True)
        self._thread.start()

    async def stop(self, drain_timeout: float = 30.0) -> None:
        """Stop admitting, let running requests finish (up to ``drain_timeout``), cancel the rest, join."""
        self._accepting = False
        deadline = time.monotonic() + drain_timeout
        while time.monotonic() < deadline:
            with self._cond:
                if len(self.scheduler) == 0:
                    break
            await asyncio.sleep(0.05)
        for task in self.halt():
            fail_task(task, 503, "server is shutting down")
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10.0)

    def halt(self) -> list[Task]:
        """Tell the loop thread to finish (it completes pending read-backs first); returns the requests
        still in the scheduler, removed from it (the caller fails them)."""
        self._accepting = False
        with self._cond:
            leftover = [e.payload for e in self.scheduler.entries()]
            for task in leftover:
                self.scheduler.remove(task.id)
            self._stop = True
            self._cond.notify_all()
        return leftover

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- API for routes (event-loop thread) ---------------------------------------------------

    def submit(self, request: ResolvedRequest, endpoint: str, timeout: float, is_job: bool = False) -> Task:
        """Admit a request; raises QueueFull (429) or EngineStopped (503)."""
        task = new_task(request, endpoint, is_job)
        self.admit(task, timeout)
        if is_job:
            self.jobs[task.id] = task
            self._trim_jobs()
        task._publish("queued")
        return task

    def admit(self, task: Task, timeout: float) -> None:
        """Put ``task`` in the scheduler (any thread); raises QueueFull or EngineStopped."""
        if not self._accepting:
            raise EngineStopped("server is shutting down")
        request = task.request
        with self._cond:
            self.scheduler.add(
                task.id,
                key=self.worker.batch_key(request),
                rows=request.rows,
                total_steps=request.num_inference_steps,
                timeout=timeout,
                payload=task,
            )
            self._cond.notify()
            self._gauges()

    def cancel(self, task_id: str) -> bool:
        """Cancel a queued or running request; its rows leave the next plan. False if already finished."""
        task = self.withdraw(task_id)
        if task is None:
            return False
        task.status = "cancelled"
        task.finished = time.monotonic()
        task._publish("cancelled")
        return True

    def withdraw(self, task_id: str) -> Task | None:
        """Take a request out of the scheduler (any thread); None if it is not there (finished sampling)."""
        with self._cond:
            entry = self.scheduler.remove(task_id)
            self._gauges()
        return None if entry is None else entry.payload

    def queue_position(self, task_id: str) -> int | None:
        with self._cond:
            return self.scheduler.queue_position(task_id)

    def retry_after(self) -> int:
        """Seconds a rejected client should wait: a rough time to drain the waiting requests' first step."""
        with self._cond:
            waiting = self.scheduler.waiting_count
        return max(1, min(60, int(waiting * self._forward_ewma) + 1))

    def _trim_jobs(self) -> None:
        finished = [k for k, t in self.jobs.items() if t.done]
        for k in finished[: max(0, len(finished) - self.max_finished_jobs)]:
            del self.jobs[k]

    # -- the loop (engine thread) -------------------------------------------------------------

    def _gauges(self) -> None:
        self.metrics.queue_size.set(self.scheduler.waiting_count)
        self.metrics.running_requests.set(self.scheduler.running_count)

    def _run(self) -> None:
        sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
        while True:
            self._collect(block=False)
            self.events.flush()  # the previous step's and this collect's events, before any wait
            with self._cond:
                while not self._stop and len(self.scheduler) == 0 and not self._reading:
                    self._cond.wait(0.5)
                if self._stop:
                    break
                expired = self.scheduler.expire()
                plan = self.scheduler.schedule()
                self._gauges()
            for entry in expired:
                self._fail(entry.payload, 504, "request passed its deadline before finishing")
            if plan is not None and plan.entries:
                try:
                    self._step(plan)
                except Exception:  # a bug outside the guarded calls must not kill the device loop
                    self._fault([e.payload for e in plan.entries if not e.payload.done], "engine step failed")
            elif self._reading:
                self._collect(block=True)  # nothing to run: wait for the device to finish the read-backs
        self._collect(block=True)
        self.events.flush()

    def _collect(self, block: bool) -> None:
        """Complete the requests whose images have reached host memory (all of them when ``block``)."""
        while self._reading:
            tasks, pending = self._reading[0]
            try:  # ready() and wait() are where asynchronous device errors surface on CUDA
                if not (block or pending.ready()):
                    return
                finished = list(zip(tasks, pending.wait(), strict=True))
            except Exception:
                self._reading.popleft()
                self._fault(tasks, "reading back images failed")
                continue
            self._reading.popleft()
            self.events.completed(finished)

    def _step(self, plan: Plan) -> None:
        tasks: list[Task] = [e.payload for e in plan.entries]
        now = time.monotonic()
        started: list[Task] = []
        for task in tasks:
            if task.started is None:
                task.started = now
                task.status = "running"
                self.metrics.queue_wait_seconds.labels(task.request.model).observe(now - task.created)
                started.append(task)
        if started:
            self.events.started(started)
        # Prepare newcomers (engine thread: the device is ours); a bad request fails alone.
        ready: list[Task] = []
        for task in tasks:
            if task.worker_state is None:
                try:
                    task.worker_state = self.worker.prepare(task.request)
                    task.total_steps = self._total_evaluations(task)
                except Exception:
                    self._fault([task], "preparing a request failed")
                    continue
            ready.append(task)
        if not ready:
            return
        t0 = time.perf_counter()
        try:
            done = self.worker.step([t.worker_state for t in ready])
        except Exception:
            self._fault(ready, "a forward pass failed")
            return
        elapsed = time.perf_counter() - t0
        self.steps_run += 1
        self._forward_ewma = 0.9 * self._forward_ewma + 0.1 * elapsed
        rows = sum(t.request.rows for t in ready)
        m = self.metrics
        m.forward_duration_seconds.observe(elapsed)
        m.rows_per_forward.observe(rows)
        m.padded_rows_per_forward.observe(self.worker.bucket_for(rows))
        per_model: dict[str, int] = {}
        for task in ready:
            per_model[task.request.model] = per_model.get(task.request.model, 0) + task.request.rows
        for model, count in per_model.items():
            m.model_evaluations_total.labels(model).inc(count)
        finished_ids = [t.id for t, d in zip(ready, done, strict=True) if d]
        with self._cond:
            finished = self.scheduler.update(plan, finished_ids)
            self._gauges()
        finished_set = {e.id for e in finished}
        completing: list[Task] = []
        # One event batch per step for every job's progress (not one per request). Only jobs can be watched
        # (SSE); a /generate request's progress has no reader, so it is not published.
        progress: list[Task] = []
        for task, d in zip(ready, done, strict=True):
            if task.done:  # cancelled or expired while the step ran: its output is dropped
                continue
            task.step = task.worker_state.evaluations
            if task.is_job:
                progress.append(task)
            if d and task.id in finished_set:
                completing.append(task)
        if progress:
            self.events.progress(progress)
        if not completing:
            return
        for task in completing:
            task.sampling_done = True
        self.events.sampled(completing)
        try:  # one device-to-host copy for every request finishing in this step, collected when it lands
            pending = self.worker.read_images([t.worker_state for t in completing])
        except Exception:
            self._fault(completing, "reading back images failed")
            return
        for task in completing:
            task.worker_state = None  # free device memory now
        self._reading.append((completing, pending))

    def _total_evaluations(self, task: Task) -> int:
        """Denoiser calls the request will take (sampler-specific, e.g. Heun: 2 per step but the last)."""
        state = task.worker_state
        count = getattr(state.sampler, "num_evaluations", None)
        if callable(count):
            try:
                return int(count(task.request.num_inference_steps))
            except Exception:  # noqa: BLE001 — an estimate only
                pass
        return task.request.num_inference_steps

    def _fault(self, tasks: list[Task], what: str) -> None:
        error_id = uuid.uuid4().hex[:12]
        log.exception("%s (error_id=%s, requests=%s)", what, error_id, [t.id for t in tasks])
        self.metrics.engine_errors_total.inc()
        with self._cond:
            for task in tasks:
                self.scheduler.remove(task.id)
            self._gauges()
        for task in tasks:
            self._fail(task, 500, f"internal error while sampling (error id {error_id})", error_id)

    def _fail(self, task: Task, status: int, message: str, error_id: str | None = None) -> None:
        task.worker_state = None
        self.events.failed(task, status, message, error_id)

    # -- completion (event-loop thread) -------------------------------------------------------

    def _complete_many(self, finished: list[tuple[Task, np.ndarray]]) -> None:
        for task, images in finished:
            complete_task(task, images, self.metrics, self._after_complete)

    def _after_complete(self, task: Task) -> None:
        if task.is_job:
            self._trim_jobs()
