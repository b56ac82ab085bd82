"""A request's life on the serving side: one object on the event loop owns it from admission to PNGs.

``RequestManager`` is what routes talk to, whichever transport runs the engine core (a thread of this
process or an engine process: ``server.client.EngineClient``). It owns, once for both:

- admission: the queue bound (429 with a Retry-After estimate) and 503 while the engine is unavailable;
- the ``Task`` of every request in flight: status queued -> running -> completed / failed / cancelled,
  queue position, step counts, the SSE subscribers, the job table and its trimming;
- cancel rules (a request can be cancelled until its sampling is done);
- the core's outputs: events applied to Tasks, step stats turned into metrics, final images PNG-encoded
  (small results inline, large ones in the thread pool, so the loop stays responsive).

Everything here runs on the event loop thread; the core never touches a Task. A cancel marks the Task
terminal at once and tells the core, which drops the request before its next plan; whatever the core
still reports for it afterwards is ignored.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from starlette.concurrency import run_in_threadpool

from server.client import EngineClient
from server.imaging import to_png, to_pngs
from server.messages import (
    AddRequest,
    CancelRequest,
    EngineOutputs,
    Failed,
    Finished,
    Preview,
    Progress,
    Sampled,
    Started,
)
from server.metrics import Metrics
from server.pngmeta import image_parameters, parameters_chunks
from server.request import ResolvedRequest

log = logging.getLogger(__name__)

TERMINAL = ("completed", "failed", "cancelled")
SHUTTING_DOWN = "server is shutting down"
# Results up to this many pixel bytes are PNG-encoded on the event loop (a 32x32 image takes tens of µs,
# less than the hand-over to a pool thread); larger ones go to the thread pool so the loop stays responsive.
INLINE_PNG_MAX_BYTES = 64 * 1024
RETRY_AFTER_MAX_S = 60
# Shed a request whose estimated finish is past this fraction of its deadline: the estimate is a mean, and
# a request admitted right at its deadline misses it about half the time (measured on an H200 at 1.5x
# overload: at a margin of 1.0, 5% of the admitted requests still timed out).
SHED_MARGIN = 0.8


class QueueFull(Exception):
    """More requests are waiting than the configured queue size."""


class EngineStopped(Exception):
    """The engine admits no requests now (shutting down, restarting or down); the message says which."""


class Overloaded(Exception):
    """The request would not finish before its deadline at the current load: shed at the door (503)."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:16]}"


@dataclass(eq=False)
class Task:
    """One request's life on the server, as routes and SSE streams see it (event-loop thread only)."""

    id: str
    request: ResolvedRequest
    endpoint: str
    is_job: bool
    created: float  # time.monotonic()
    created_wall: float  # time.time(), for OpenAI's `created`
    preview_every: int = 0
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
    warnings: list[str] = field(default_factory=list)  # said in the response (e.g. a truncated prompt)
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

    def subscribe(self) -> asyncio.Queue:
        """A queue of (event, data) pairs, pre-filled with what already happened."""
        q: asyncio.Queue = asyncio.Queue()
        q.put_nowait(("queued", {**self.event_data(), "status": "queued", "step": 0}))
        if self.started is not None:
            q.put_nowait(("started", {**self.event_data(), "status": "running"}))
        if self._last_progress is not None and not self.done:
            q.put_nowait(("progress", self._last_progress))
        if self.done:
            q.put_nowait((self.status, self.event_data()))
        else:
            self._subscribers.append(q)
        return q

    def unsubscribe(self, q: asyncio.Queue) -> None:
        if q in self._subscribers:
            self._subscribers.remove(q)

    def event_data(self) -> dict[str, Any]:
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

    def publish(self, event: str, data: dict[str, Any] | None = None) -> None:
        data = data if data is not None else self.event_data()
        if event == "progress":
            self._last_progress = data
        for q in list(self._subscribers):
            q.put_nowait((event, data))
        if event in TERMINAL:
            self._subscribers.clear()
            self._done.set()

    def fail(self, status: int, message: str, error_id: str | None = None) -> None:
        """Mark failed and tell the waiters; no-op once terminal."""
        if self.done:
            return
        self.status = "failed"
        self.finished = time.monotonic()
        self.error_status, self.error_message, self.error_id = status, message, error_id
        self.publish("failed")

    def cancel(self) -> None:
        self.status = "cancelled"
        self.finished = time.monotonic()
        self.publish("cancelled")


class RequestManager:
    """Owns every request's life on the event loop; talks to the engine core through ``client``."""

    def __init__(
        self,
        client: EngineClient,
        metrics: Metrics,
        max_queue_size: int,
        max_finished_jobs: int = 1000,
        class_names: Mapping[str, list[str]] | None = None,
        max_rows: int | None = None,
    ) -> None:
        """``class_names``: per model, for the PNG parameters of class-conditional images. ``max_rows``: the
        engine's rows per forward pass; given, admission sheds requests that could not meet their deadline
        (see ``estimated_seconds``)."""
        self.client = client
        self.max_rows = max_rows
        self.class_names = dict(class_names or {})
        self.metrics = metrics
        self.max_queue_size = max_queue_size
        self.max_finished_jobs = max_finished_jobs
        self.jobs: OrderedDict[str, Task] = OrderedDict()
        self._live: dict[str, Task] = {}  # submitted, not terminal, not yet handed to PNG encoding
        self._queued: OrderedDict[str, Task] = OrderedDict()  # not started, in arrival order
        self._rows = 0  # rows of the requests in ``_live`` (the outstanding-rows gauge)
        self._forward_ewma = 0.05  # seconds per forward pass, for Retry-After
        self._period_ewma: float | None = None  # seconds from one busy step to the next (load shedding)
        self._work = 0.0  # row-steps the engine still owes the requests in ``_live`` (estimated)
        self._accepting = False
        self._stopping = False
        self.gpu_bytes = 0.0

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start the engine client; its outputs arrive on ``loop`` (``on_outputs`` / ``on_lost``)."""
        self.client.start(loop, self)
        self._accepting = True

    async def stop(self, drain_timeout: float = 30.0) -> None:
        """Stop admitting, let requests in flight finish (up to ``drain_timeout``), then stop the engine;
        whatever it had not finished fails with 503."""
        self._accepting = False
        self._stopping = True
        deadline = time.monotonic() + drain_timeout
        while self._live and self.client.serving and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await self.client.stop()
        await asyncio.sleep(0)  # the client's last callbacks
        for task in list(self._live.values()):
            self._forget(task)
            task.fail(503, SHUTTING_DOWN)
        self._gauges()

    @property
    def running(self) -> bool:
        """The engine serves (loaded, warmed, not restarting)."""
        return self.client.serving

    @property
    def failure(self) -> str | None:
        """Why the engine is down for good (readiness reports it), else None."""
        return self.client.failure

    @property
    def idle(self) -> bool:
        """No request in flight on the serving side."""
        return not self._live

    # -- API for routes -----------------------------------------------------------------------

    def submit(
        self,
        request: ResolvedRequest,
        endpoint: str,
        timeout: float,
        is_job: bool = False,
        preview_every: int = 0,
    ) -> Task:
        """Admit a request; raises QueueFull (429) or EngineStopped (503)."""
        if self._stopping or not self._accepting:
            raise EngineStopped(SHUTTING_DOWN)
        if not self.client.serving:
            failure = self.client.failure
            raise EngineStopped(
                f"the engine is down: {failure}" if failure else "the engine is restarting; retry shortly"
            )
        waiting, limit = len(self._queued), self.max_queue_size
        if waiting >= limit:
            raise QueueFull(f"{waiting} requests are waiting (max_queue_size={limit})")
        estimate = self.estimated_seconds(request)
        if estimate is not None and estimate > SHED_MARGIN * timeout:
            self.metrics.shed_requests_total.inc()
            raise Overloaded(
                f"the server is overloaded: this request would take about {estimate:.1f} s, past its "
                f"{timeout:g} s deadline; retry later",
                retry_after=max(1, min(RETRY_AFTER_MAX_S, int(estimate - timeout) + 1)),
            )
        task = Task(
            id=new_id("job" if is_job else "gen"),
            request=request,
            endpoint=endpoint,
            is_job=is_job,
            created=time.monotonic(),
            created_wall=time.time(),
            preview_every=preview_every,
            total_steps=request.num_inference_steps,
        )
        message = AddRequest(
            task.id, request, task.created, timeout, progress=is_job, preview_every=preview_every
        )
        if not self.client.send(message):
            raise EngineStopped("the engine is restarting; retry shortly")
        self._live[task.id] = task
        self._queued[task.id] = task
        self._rows += request.rows
        self._work += request.rows * request.num_inference_steps
        if is_job:
            self.jobs[task.id] = task
            self._trim_jobs()
        self._gauges()
        task.publish("queued")
        return task

    def cancel(self, task_id: str) -> bool:
        """Cancel a queued or running request. False once it is terminal or its sampling has finished."""
        task = self._live.get(task_id)
        if task is None or task.done or task.sampling_done:
            return False
        self.client.send(CancelRequest(task_id))
        self._forget(task)
        self._gauges()
        task.cancel()
        return True

    def queue_position(self, task_id: str) -> int | None:
        """How many waiting requests arrived before this one; None once it has started or left."""
        if task_id not in self._queued:
            return None
        return list(self._queued).index(task_id)

    def estimated_seconds(self, request: ResolvedRequest) -> float | None:
        """Seconds until ``request`` would finish if admitted now, or None before the engine has been
        measured busy (no shedding on a guess).

        The engine does ``max_rows`` row-steps per busy step period. Work ahead: the row-steps still owed
        to the requests in flight (their rows x steps at admission, less the rows of every step run since).
        The request finishes no sooner than its own steps take, and no sooner than the work ahead plus its
        own at full-batch throughput. Heun-type samplers take two evaluations per step: their time is
        under-estimated by up to half (the deadline still bounds them).
        """
        if self.max_rows is None or self._period_ewma is None:
            return None
        own = request.rows * request.num_inference_steps
        throughput = self.max_rows / self._period_ewma  # row-steps per second when full
        return max(request.num_inference_steps * self._period_ewma, (max(0.0, self._work) + own) / throughput)

    def retry_after(self) -> int:
        """Seconds a rejected client should wait: a rough time to drain the waiting requests' first step."""
        return max(1, min(RETRY_AFTER_MAX_S, int(len(self._queued) * self._forward_ewma) + 1))

    # -- the engine's outputs (EngineSink) ----------------------------------------------------

    def on_outputs(self, out: EngineOutputs) -> None:
        """Apply one loop turn's outputs of the core: metrics, then events in order."""
        m = self.metrics
        for s in out.steps:
            self._forward_ewma = 0.9 * self._forward_ewma + 0.1 * s.forward_seconds
            self._work = max(0.0, self._work - s.rows)
            if s.period_seconds > 0:
                p = self._period_ewma
                self._period_ewma = s.period_seconds if p is None else 0.9 * p + 0.1 * s.period_seconds
            m.forward_duration_seconds.observe(s.forward_seconds)
            m.rows_per_forward.observe(s.rows)
            m.padded_rows_per_forward.observe(s.padded_rows)
            for model, rows in s.evaluations:
                m.model_evaluations_total.labels(model).inc(rows)
        if out.faults:
            m.engine_errors_total.inc(out.faults)
        for model, count in out.nonfinite:
            m.nonfinite_outputs_total.labels(model).inc(count)
        if out.prompt_cache_hits:
            m.prompt_cache_total.labels("hit").inc(out.prompt_cache_hits)
        if out.prompt_cache_misses:
            m.prompt_cache_total.labels("miss").inc(out.prompt_cache_misses)
        if out.gpu_bytes is not None:
            self.gpu_bytes = out.gpu_bytes
        for event in out.events:
            task = self._live.get(event.request_id)
            if task is None:  # cancelled here, or already failed
                continue
            if isinstance(event, Started):
                self._queued.pop(task.id, None)
                task.started, task.status = event.at, "running"
                m.queue_wait_seconds.labels(task.request.model).observe(max(0.0, event.at - task.created))
                task.publish("started")
            elif isinstance(event, Progress):
                task.step, task.total_steps = event.step, event.total_steps
                task.publish("progress", task.event_data())
            elif isinstance(event, Preview):
                task.publish("preview", self._preview_data(task, event))
            elif isinstance(event, Sampled):
                task.sampling_done = True
            elif isinstance(event, Finished):
                self._forget(task)
                task.warnings = list(event.warnings)
                self._complete(task, event.images)
            elif isinstance(event, Failed):
                self._forget(task)
                task.fail(event.status, event.message, event.error_id)
        self._gauges()

    def on_lost(self, message: str, error_id: str) -> None:
        """The engine went away (its process exited): every request in flight fails with a 500."""
        self.metrics.engine_errors_total.inc()
        for task in list(self._live.values()):
            self._forget(task)
            task.fail(500, f"internal error: {message} (error id {error_id})", error_id)
        self._gauges()

    # -- internals ----------------------------------------------------------------------------

    def _forget(self, task: Task) -> None:
        """Out of flight (terminal, or handed to PNG encoding); the caller updates the gauges."""
        if self._live.pop(task.id, None) is not None:
            self._rows -= task.request.rows
            steps = task.request.num_inference_steps
            if task.started is None:  # never ran: all its work leaves with it
                self._work -= task.request.rows * steps
            elif not task.sampling_done:  # left mid-run (cancelled, failed, expired): its remaining steps
                done = (time.monotonic() - task.started) / self._period_ewma if self._period_ewma else 0.0
                self._work = max(0.0, self._work - task.request.rows * max(0.0, steps - done))
            if not self._live:
                self._work = 0.0  # nothing owed: drop what the estimate drifted by (cancels mid-run)
        self._queued.pop(task.id, None)

    def _gauges(self) -> None:
        m = self.metrics
        m.queue_size.set(len(self._queued))
        m.running_requests.set(len(self._live) - len(self._queued))
        m.outstanding_rows.set(self._rows)

    def _trim_jobs(self) -> None:
        finished = [k for k, t in self.jobs.items() if t.done]
        for k in finished[: max(0, len(finished) - self.max_finished_jobs)]:
            del self.jobs[k]

    @staticmethod
    def _preview_data(task: Task, event: Preview) -> dict[str, Any]:
        images = [base64.b64encode(to_png(img)).decode() for img in event.images]
        return {
            "id": task.id,
            "step": event.step,
            "total_steps": event.total_steps,
            "image": images[0],
            "images": images,
        }

    def _complete(self, task: Task, images: np.ndarray) -> None:
        """PNG-encode ``images`` (uint8 (n, H, W, C)) and complete ``task``: small results inline, large
        ones in the thread pool."""

        def completed(pngs: list[bytes]) -> None:
            if task.done:
                return
            task.pngs = pngs
            task.status = "completed"
            task.finished = time.monotonic()
            self.metrics.images_generated_total.labels(task.request.model).inc(len(pngs))
            task.publish("completed")
            if task.is_job:
                self._trim_jobs()

        def encoding_failed() -> None:
            error_id = uuid.uuid4().hex[:12]
            log.exception("PNG encoding failed (error_id=%s, request=%s)", error_id, task.id)
            task.fail(500, f"internal error while encoding (error id {error_id})", error_id)

        def encode_now() -> list[bytes]:
            r = task.request
            names = self.class_names.get(r.model) or []
            name = names[r.class_label] if r.class_label is not None and r.class_label < len(names) else None
            infos = [parameters_chunks(image_parameters(r, i, name)) for i in range(len(images))]
            return to_pngs(images, infos)

        async def encode() -> None:
            try:
                pngs = await run_in_threadpool(encode_now)
            except Exception:
                encoding_failed()
                return
            completed(pngs)

        if images.size > INLINE_PNG_MAX_BYTES:
            asyncio.ensure_future(encode())
            return
        try:
            pngs = encode_now()
        except Exception:
            encoding_failed()
            return
        completed(pngs)
