"""A request's life on the serving side: one object on the event loop owns it from admission to PNGs.

``RequestManager`` is what routes talk to, whichever transport runs the engine core (a thread of this
process or an engine process: ``server.client.EngineClient``). It owns, once for both:

- admission: the queue bound (429 with a Retry-After estimate), shedding of requests that would miss their
  deadline, and 503 while no engine is available;
- routing: with several engine cores (one per GPU, ``UNET_SERVER_DEVICES``) each request goes to the engine
  where it should finish soonest (see ``_route``); a request stays on its engine for its whole life;
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
from collections import Counter, OrderedDict
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from starlette.concurrency import run_in_threadpool

from server.client import EngineClient, EngineSink
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
QUEUE_FULL = "the request queue is full; retry later"
# Results up to this many pixel bytes are PNG-encoded on the event loop (a 32x32 image takes tens of µs,
# less than the hand-over to a pool thread); larger ones go to the thread pool so the loop stays responsive.
INLINE_PNG_MAX_BYTES = 64 * 1024
RETRY_AFTER_MAX_S = 60


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
    engine: Engine | None = None  # the engine core the request was routed to
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


def batch_key(request: ResolvedRequest) -> tuple[str, int, int]:
    """Requests with the same key can share a forward pass (same U-Net, same latent shape)."""
    return (request.model, request.height, request.width)


@dataclass(eq=False)
class Engine:
    """One engine core behind its client, with what admission knows of its load (event-loop thread only)."""

    index: int
    device: str
    client: EngineClient
    rows: int = 0  # rows of the live requests routed here
    work: float = 0.0  # row-steps this engine still owes them (estimated)
    forward_ewma: float = 0.05  # seconds per forward pass (Retry-After)
    period_ewma: float | None = None  # seconds from one busy step to the next, once measured
    gpu_bytes: float = 0.0
    batches: Counter[tuple[str, int, int]] = field(default_factory=Counter)  # batch_key of live requests
    queued: int = 0  # of those, not started yet (kept with RequestManager._queued; the gauge reads it)
    started: bool = False  # loaded and started (an engine may still be loading when the server serves)
    load_error: str | None = None  # why it failed to load

    @property
    def label(self) -> str:
        return str(self.index)

    @property
    def failure(self) -> str | None:
        """Why this engine is down for good, else None."""
        return self.load_error or (self.client.failure if self.started else None)

    def state(self) -> str:
        """"serving", "loading", "failed" (down for good) or "restarting" (a replacement is starting)."""
        if self.failure:
            return "failed"
        if not self.started:
            return "loading"
        return "serving" if self.client.serving else "restarting"


class _EngineSink(EngineSink):
    """What one engine's client reports, tagged with that engine."""

    def __init__(self, manager: RequestManager, engine: Engine) -> None:
        self.manager, self.engine = manager, engine

    def on_outputs(self, out: EngineOutputs) -> None:
        self.manager.on_outputs(out, self.engine)

    def on_lost(self, message: str, error_id: str) -> None:
        self.manager.on_lost(message, error_id, self.engine)


class RequestManager:
    """Owns every request's life on the event loop; talks to the engine cores through their clients."""

    def __init__(
        self,
        clients: EngineClient | Sequence[EngineClient],
        metrics: Metrics,
        max_queue_size: int,
        max_finished_jobs: int = 1000,
        class_names: Mapping[str, list[str]] | None = None,
        max_rows: int | None = None,
        devices: Sequence[str] | None = None,
        shed: bool = True,
        png_compress_level: int = 1,
        shed_deadline_fraction: float = 0.8,
    ) -> None:
        """``clients``: one per engine core (``devices`` names their devices, for metrics and readiness).
        ``class_names``: per model, for the PNG parameters of class-conditional images. ``max_rows``: an
        engine's rows per forward pass; given, routing and admission estimate finish times from it, and with
        ``shed`` admission refuses requests that could not meet their deadline (see ``estimated_seconds``).
        ``png_compress_level``: the zlib level of the PNGs returned (``server.imaging.to_png``).
        ``shed_deadline_fraction``: shed a request whose estimated finish is past this fraction of its
        deadline (the estimate is a mean: admitted right at its deadline, a request misses it about half
        the time). The server passes ``Settings.shed_deadline_fraction`` (0.5 by default); 0.8 here is
        what the admission-arithmetic tests assume."""
        if not 0 < shed_deadline_fraction <= 1:
            raise ValueError(f"shed_deadline_fraction {shed_deadline_fraction} is not in (0, 1]")
        if not isinstance(clients, Sequence):
            clients = [clients]
        if not clients:
            raise ValueError("at least one engine client")
        devices = list(devices) if devices is not None else ["" for _ in clients]
        if len(devices) != len(clients):
            raise ValueError(f"{len(clients)} engine clients but {len(devices)} devices")
        self.engines = [Engine(i, d, c) for i, (c, d) in enumerate(zip(clients, devices, strict=True))]
        self.max_rows = max_rows
        self.shed = shed
        self.png_compress_level = png_compress_level
        self.shed_deadline_fraction = shed_deadline_fraction
        self.class_names = dict(class_names or {})
        self.metrics = metrics
        self.max_queue_size = max_queue_size
        self.max_finished_jobs = max_finished_jobs
        self.jobs: OrderedDict[str, Task] = OrderedDict()
        self._live: dict[str, Task] = {}  # submitted, not terminal, not yet handed to PNG encoding
        self._queued: OrderedDict[str, Task] = OrderedDict()  # not started, in arrival order
        self._rows = 0  # rows of the requests in ``_live`` (the outstanding-rows gauge)
        self._accepting = False
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def client(self) -> EngineClient:
        """The first engine's client (the only one with a single engine)."""
        return self.engines[0].client

    @property
    def gpu_bytes(self) -> float:
        """GPU memory allocated, summed over the engines (as last reported)."""
        return sum(e.gpu_bytes for e in self.engines)

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop, loaded: Collection[int] | None = None) -> None:
        """Start the engine clients (those in ``loaded``, default all); their outputs arrive on ``loop``
        (``on_outputs`` / ``on_lost``). Engines still loading join later through ``engine_loaded``."""
        self._loop = loop
        for e in self.engines:
            if loaded is None or e.index in loaded:
                self._start_engine(e)
        self._accepting = True

    def _start_engine(self, e: Engine) -> None:
        assert self._loop is not None
        e.client.start(self._loop, _EngineSink(self, e))
        e.started = True

    def engine_loaded(self, index: int) -> None:
        """An engine that was still loading when serving began is ready: it takes requests from now on."""
        e = self.engines[index]
        if self._stopping:
            e.client.kill()
            return
        self._start_engine(e)
        log.info("engine %d (%s) is ready and serving", index, e.device)

    def engine_failed(self, index: int, message: str) -> None:
        """An engine failed to load: it is reported (readiness) and never routed to."""
        self.engines[index].load_error = message

    async def stop(self, drain_timeout: float = 30.0) -> None:
        """Stop admitting, let requests in flight finish (up to ``drain_timeout``), then stop the engines;
        whatever they had not finished fails with 503."""
        self._accepting = False
        self._stopping = True
        deadline = time.monotonic() + drain_timeout
        while self._live and self.running and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for e in self.engines:
            if not e.started:
                e.client.kill()  # still loading (or failed to)
        await asyncio.gather(*(e.client.stop() for e in self.engines if e.started))
        await asyncio.sleep(0)  # the clients' last callbacks
        for task in list(self._live.values()):
            self._forget(task)
            task.fail(503, SHUTTING_DOWN)
        self._gauges()

    @property
    def running(self) -> bool:
        """At least one engine serves (loaded, warmed, not restarting)."""
        return any(e.client.serving for e in self.engines)

    @property
    def failure(self) -> str | None:
        """Why every engine is down for good (readiness reports it), else None."""
        failures = [e.failure for e in self.engines]
        if any(f is None for f in failures):
            return None
        if len(self.engines) == 1:
            return failures[0]
        return "; ".join(f"engine {e.label} ({e.device}): {e.failure}" for e in self.engines)

    @property
    def idle(self) -> bool:
        """No request in flight on the serving side."""
        return not self._live

    def live_requests(self) -> list[ResolvedRequest]:
        """The requests submitted and not yet finished (queued or running), a snapshot."""
        return [t.request for t in self._live.values()]

    def engine_states(self) -> list[dict[str, Any]]:
        """Per engine: index, device, state (serving / restarting / failed), the failure, outstanding rows."""
        return [
            {
                "engine": e.index,
                "device": e.device,
                "state": e.state(),
                "failure": e.failure,
                "outstanding_rows": e.rows,
            }
            for e in self.engines
        ]

    # -- API for routes -----------------------------------------------------------------------

    def submit(
        self,
        request: ResolvedRequest,
        endpoint: str,
        timeout: float,
        is_job: bool = False,
        preview_every: int = 0,
        arrived: float | None = None,
    ) -> Task:
        """Admit a request and route it to an engine; raises QueueFull (429), Overloaded or EngineStopped
        (503). ``arrived`` (``time.monotonic()`` when the HTTP request reached the app; default now) starts
        the deadline: time spent before admission counts against ``timeout``."""
        now = time.monotonic()
        arrived = now if arrived is None else min(arrived, now)
        if self._stopping or not self._accepting:
            raise EngineStopped(SHUTTING_DOWN)
        serving = [e for e in self.engines if e.client.serving]
        if not serving:
            failure = self.failure
            raise EngineStopped(
                f"the engine is down: {failure}" if failure else "the engine is restarting; retry shortly"
            )
        waiting, limit = len(self._queued), self.max_queue_size
        if waiting >= limit:
            raise QueueFull(f"{waiting} requests are waiting (max_queue_size={limit})")
        engine, estimate = self._route(request, serving)
        waited = now - arrived  # before admission: the event loop was busy
        budget = self.shed_deadline_fraction * timeout
        late = waited >= timeout or (estimate is not None and waited + estimate > budget)
        if self.shed and late:
            self.metrics.shed_requests_total.inc()
            total = waited + (estimate or 0.0)
            raise Overloaded(
                f"the server is overloaded: this request would take about {total:.1f} s, past its "
                f"{timeout:g} s deadline; retry later",
                retry_after=max(1, min(RETRY_AFTER_MAX_S, int(total - timeout) + 1)),
            )
        task = Task(
            id=new_id("job" if is_job else "gen"),
            request=request,
            endpoint=endpoint,
            is_job=is_job,
            created=arrived,
            created_wall=time.time() - (now - arrived),
            preview_every=preview_every,
            total_steps=request.sampling_steps,
            engine=engine,
        )
        message = AddRequest(
            task.id, request, task.created, timeout, progress=is_job, preview_every=preview_every
        )
        if not engine.client.send(message):
            raise EngineStopped("the engine is restarting; retry shortly")
        self._live[task.id] = task
        self._queued[task.id] = task
        engine.queued += 1
        self._rows += request.rows
        engine.rows += request.rows
        engine.work += request.rows * request.sampling_steps
        engine.batches[batch_key(request)] += 1
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
        assert task.engine is not None
        task.engine.client.send(CancelRequest(task_id))
        self._forget(task)
        self._gauges()
        task.cancel()
        return True

    def queue_position(self, task_id: str) -> int | None:
        """How many waiting requests on the same engine arrived before this one; None once it has started
        or left."""
        task = self._queued.get(task_id)
        if task is None:
            return None
        ahead = 0
        for other in self._queued.values():
            if other is task:
                return ahead
            ahead += other.engine is task.engine
        return ahead

    def door_seconds(self) -> float | None:
        """A lower bound on any new request's finish time: the least work already owed on a serving engine
        at that engine's measured full-batch pace (a request's own steps only add to it). None while no
        engine serves or one serving has not been measured busy (no shedding on a guess). The front end
        uses it to shed before reading a body, when even the smallest request could not make its deadline.
        """
        serving = [e for e in self.engines if e.client.serving]
        if not serving or self.max_rows is None or any(e.period_ewma is None for e in serving):
            return None
        return min(e.work * e.period_ewma / self.max_rows for e in serving)  # type: ignore[operator]

    def door_verdict(self, timeout: float) -> tuple[int, str, int] | None:
        """Admission's refusals that do not depend on the request, decided before its body is read, in
        ``submit``'s order: (429, message, retry-after s) while the queue is full; with shedding on, (503,
        message, retry-after s) while the work already owed alone (``door_seconds``) is past
        ``shed_deadline_fraction`` of ``timeout`` (counted as a shed). None: let the request in (a stopped
        or restarting engine is the route's to answer)."""
        if self._stopping or not self._accepting or not any(e.client.serving for e in self.engines):
            return None
        if len(self._queued) >= self.max_queue_size:
            return 429, QUEUE_FULL, self.retry_after()
        bound = self.door_seconds() if self.shed else None
        if bound is None or bound <= self.shed_deadline_fraction * timeout:
            return None
        self.metrics.shed_requests_total.inc()
        message = (
            f"the server is overloaded: the work already queued takes about {bound:.1f} s, past this "
            f"request's {timeout:g} s deadline; retry later"
        )
        return 503, message, max(1, min(RETRY_AFTER_MAX_S, int(bound - timeout) + 1))

    def estimated_seconds(self, request: ResolvedRequest) -> float | None:
        """Seconds until ``request`` would finish if admitted now (on the engine it would be routed to), or
        None before that engine has been measured busy (no shedding on a guess)."""
        serving = [e for e in self.engines if e.client.serving] or self.engines
        return self._route(request, serving)[1]

    def _finish_seconds(self, engine: Engine, request: ResolvedRequest) -> float | None:
        """Seconds until ``request`` would finish on ``engine``, or None before it has been measured busy.

        The engine does ``max_rows`` row-steps per busy step period. Work ahead: the row-steps still owed
        to the requests in flight there (their rows x steps at admission, less the rows of every step run
        since). The request finishes no sooner than its own steps take, and no sooner than the work ahead
        plus its own at full-batch throughput. Heun-type samplers take two evaluations per step: their time
        is under-estimated by up to half (the deadline still bounds them).
        """
        if self.max_rows is None or engine.period_ewma is None:
            return None
        own = request.rows * request.sampling_steps
        throughput = self.max_rows / engine.period_ewma  # row-steps per second when full
        return max(request.sampling_steps * engine.period_ewma, (engine.work + own) / throughput)

    def _route(self, request: ResolvedRequest, serving: list[Engine]) -> tuple[Engine, float | None]:
        """The engine where ``request`` should finish soonest, and that finish estimate (None: unmeasured).

        Cost of an engine: its outstanding rows after admitting the request, times its measured step
        period (an engine not yet measured counts at the mean of the measured ones; none measured: rows
        alone). An engine already holding a request of the same batch key (same U-Net and shape) with room in
        its passes does not count the new rows: they join passes that run anyway. Ties go to the compatible
        engine, then to the lower index. So requests spread by load, and fill compatible batches where that
        costs nothing.
        """
        if len(serving) == 1:
            return serving[0], self._finish_seconds(serving[0], request)
        key = batch_key(request)
        measured = [e.period_ewma for e in serving if e.period_ewma is not None]
        default_period = sum(measured) / len(measured) if measured else 1.0

        def order(e: Engine) -> tuple[float, bool, int]:
            period = e.period_ewma if e.period_ewma is not None else default_period
            compatible = key in e.batches
            joins = compatible and (self.max_rows is None or e.rows + request.rows <= self.max_rows)
            rows = e.rows + (0 if joins else request.rows)
            return rows * period, not compatible, e.index

        best = min(serving, key=order)
        return best, self._finish_seconds(best, request)

    def retry_after(self) -> int:
        """Seconds a rejected client should wait: a rough time to drain the waiting requests' first step."""
        serving = [e for e in self.engines if e.client.serving] or self.engines
        forward = sum(e.forward_ewma for e in serving) / len(serving)
        return max(1, min(RETRY_AFTER_MAX_S, int(len(self._queued) * forward / len(serving)) + 1))

    # -- the engines' outputs (via _EngineSink) -----------------------------------------------

    def on_outputs(self, out: EngineOutputs, engine: Engine | None = None) -> None:
        """Apply one loop turn's outputs of an engine core: metrics, then events in order."""
        e = engine if engine is not None else self.engines[0]
        m = self.metrics
        labels = (e.label, e.device)
        for s in out.steps:
            e.forward_ewma = 0.9 * e.forward_ewma + 0.1 * s.forward_seconds
            e.work = max(0.0, e.work - s.rows)
            if s.period_seconds > 0:
                p = e.period_ewma
                e.period_ewma = s.period_seconds if p is None else 0.9 * p + 0.1 * s.period_seconds
            m.forward_duration_seconds.labels(*labels).observe(s.forward_seconds)
            m.rows_per_forward.labels(*labels).observe(s.rows)
            m.padded_rows_per_forward.labels(*labels).observe(s.padded_rows)
            m.lora_rows_per_forward.labels(*labels).observe(s.lora_rows)
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
            e.gpu_bytes = out.gpu_bytes
        if out.lora_loads:
            m.lora_loads_total.inc(out.lora_loads)
        if out.lora_evictions:
            m.lora_evictions_total.inc(out.lora_evictions)
        if out.lora_resident is not None:
            m.lora_adapters_resident.labels(*labels).set(out.lora_resident)
        for event in out.events:
            task = self._live.get(event.request_id)
            if task is None or task.engine is not e:  # cancelled here, or already failed
                continue
            if isinstance(event, Started):
                self._unqueue(task)
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

    def on_lost(self, message: str, error_id: str, engine: Engine | None = None) -> None:
        """An engine went away (its process exited): the requests in flight on it fail with a 500; the
        other engines' requests are untouched."""
        e = engine if engine is not None else self.engines[0]
        self.metrics.engine_errors_total.inc()
        for task in list(self._live.values()):
            if task.engine is e:
                self._forget(task)
                task.fail(500, f"internal error: {message} (error id {error_id})", error_id)
        e.period_ewma = None  # its replacement starts unmeasured
        self._gauges()

    # -- internals ----------------------------------------------------------------------------

    def _forget(self, task: Task) -> None:
        """Out of flight (terminal, or handed to PNG encoding); the caller updates the gauges."""
        if self._live.pop(task.id, None) is not None:
            e = task.engine
            assert e is not None
            self._rows -= task.request.rows
            e.rows -= task.request.rows
            key = batch_key(task.request)
            e.batches[key] -= 1
            if e.batches[key] <= 0:
                del e.batches[key]
            steps = task.request.sampling_steps
            if task.started is None:  # never ran: all its work leaves with it
                e.work -= task.request.rows * steps
            elif not task.sampling_done:  # left mid-run (cancelled, failed, expired): its remaining steps
                done = (time.monotonic() - task.started) / e.period_ewma if e.period_ewma else 0.0
                e.work = max(0.0, e.work - task.request.rows * max(0.0, steps - done))
            if e.rows == 0:
                e.work = 0.0  # nothing owed: drop what the estimate drifted by (cancels mid-run)
        self._unqueue(task)

    def _unqueue(self, task: Task) -> None:
        if self._queued.pop(task.id, None) is not None and task.engine is not None:
            task.engine.queued -= 1

    def _gauges(self) -> None:
        m = self.metrics
        m.queue_size.set(len(self._queued))
        m.running_requests.set(len(self._live) - len(self._queued))
        m.outstanding_rows.set(self._rows)
        for e in self.engines:
            m.engine_outstanding_rows.labels(e.label, e.device).set(e.rows)
            m.engine_queue_size.labels(e.label, e.device).set(e.queued)

    def _trim_jobs(self) -> None:
        finished = [k for k, t in self.jobs.items() if t.done]
        for k in finished[: max(0, len(finished) - self.max_finished_jobs)]:
            del self.jobs[k]

    @staticmethod
    def _preview_data(task: Task, event: Preview) -> dict[str, Any]:
        images = [base64.b64encode(to_png(img)).decode() for img in event.images]  # small: level 1
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
            return to_pngs(images, infos, self.png_compress_level)

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
