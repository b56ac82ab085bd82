"""The engine core: owns the scheduler and the worker; every loop turn is schedule -> execute -> update.

It knows nothing of HTTP, jobs or PNGs. Messages come in (``AddRequest``, ``CancelRequest``, ``Shutdown``)
through ``put`` from any thread and are applied by the core's own thread at the top of each loop turn, so
the scheduler and the request states have one writer and need no lock — a cancelled or expired request
leaves before the next pass is planned. What happens goes out as one ``EngineOutputs`` per turn through
the ``emit`` callable the transport gave it (``server.client``): to the event loop in-process, to a pipe
in an engine process.

One turn:
1. apply the inbox (admit, cancel, shutdown); complete the read-backs that have landed;
2. expire requests past their deadline (504);
3. emit the turn's outputs (before any wait, so the serving side hears of everything promptly);
4. plan one forward pass (``scheduler.schedule``), prepare newcomers (prompt encoding, initial noise,
   sampler states: on this thread, which owns the device), run it (``worker.step``), record its stats,
   report started / progress / previews, and start reading back the images of requests that finished.
   With nothing to run it waits for read-backs, or for the inbox.

On CUDA the core never waits for the device inside a step: final images are copied to host memory
asynchronously and their requests finish when the copy has landed (polled between steps, waited for only
when there is nothing else to run); the worker lets the host run at most ``max_steps_ahead`` steps ahead.
A step that raises fails only the requests in its plan (500 with an error id, logged with traceback).
"""

from __future__ import annotations

import logging
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

from server.messages import (
    AddRequest,
    CancelRequest,
    EngineOutputs,
    Failed,
    Finished,
    Preview,
    Progress,
    Sampled,
    Shutdown,
    Started,
    StepStats,
    Stopped,
    ToCore,
)
from server.request import ResolvedRequest
from server.scheduler import Plan, Scheduler
from server.settings import GIL_SWITCH_INTERVAL_S
from server.worker import PendingImages, RequestState, Worker

log = logging.getLogger(__name__)

GPU_MEMORY_REPORT_S = 1.0  # how often the core reports torch.cuda.memory_allocated with its outputs
NONFINITE_MESSAGE = "the model produced non-finite values (NaN or infinity) for this request"

Emit = Callable[[EngineOutputs | Stopped], None]


@dataclass(eq=False)
class CoreRequest:
    """One admitted request inside the core (core thread only)."""

    id: str
    request: ResolvedRequest
    progress: bool = False
    preview_every: int = 0
    state: RequestState | None = None  # built at its first step
    total_steps: int = 0
    warnings: tuple[str, ...] = ()  # from preparing it (e.g. a truncated prompt), sent with its images


def new_error_id() -> str:
    return uuid.uuid4().hex[:12]


class EngineCore:
    """Continuous batching over a ``Worker``; see the module docstring."""

    def __init__(self, worker: Worker, clock: Callable[[], float] = time.monotonic) -> None:
        self.worker = worker
        self.clock = clock
        self.scheduler = Scheduler(max_rows=worker.max_rows, clock=clock)
        self.steps_run = 0
        self._requests: dict[str, CoreRequest] = {}
        self._inbox: deque[ToCore] = deque()
        self._wake = threading.Condition()
        self._busy = False  # a turn is applying messages or running a step (for ``idle``)
        # Read-backs in flight: requests that finished sampling, oldest first.
        self._reading: deque[tuple[list[CoreRequest], PendingImages]] = deque()
        self._out = EngineOutputs()
        self._gpu_reported = 0.0
        self._hits = self._misses = 0  # the worker's prompt-cache counters at the last emit
        self._lora = (0, 0, -1)  # the worker's LoRA loads, evictions and resident adapters at the last emit
        self._last_step_start = 0.0
        self._busy_since_step = False  # cleared when the loop waits for work
        self._stopping: Shutdown | None = None

    # -- any thread ---------------------------------------------------------------------------

    def put(self, message: ToCore) -> None:
        """Hand the core a message; it takes effect at the start of the next loop turn."""
        with self._wake:
            self._inbox.append(message)
            self._wake.notify()

    @property
    def idle(self) -> bool:
        """Nothing admitted, nothing in the inbox, no read-back in flight and no turn in progress."""
        with self._wake:
            return not (self._inbox or self._busy or self._requests or self._reading or self._out)

    # -- the loop (core thread) ---------------------------------------------------------------

    def run(self, emit: Emit) -> None:
        """Loop until a ``Shutdown`` message has been handled; ``emit`` receives every output, then
        ``Stopped``."""
        sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
        while True:
            with self._wake:
                while not (self._inbox or self._requests or self._reading or self._out):
                    self._busy_since_step = False
                    self._wake.wait(0.5)
                self._busy = True
                inbox = list(self._inbox)
                self._inbox.clear()
            for message in inbox:
                self._apply(message)
            self._collect(block=False)
            for entry in self.scheduler.expire():
                self._fail(self._requests.pop(entry.id), 504, "request passed its deadline before finishing")
            if self._stopping is not None:
                break
            # One message per turn: the previous step's events and this turn's, before the next step (and
            # before any wait: the wait above never starts while there are outputs to send).
            self._emit(emit)
            plan = self.scheduler.schedule()
            if plan is not None:
                try:
                    self._step(plan)
                except Exception:  # a bug outside the guarded calls must not kill the device loop
                    alive = [self._requests[i] for i in plan.ids if i in self._requests]
                    self._fault(alive, "engine step failed")
            elif self._reading:
                self._collect(block=True)  # nothing to run: wait for the device to finish the read-backs
            with self._wake:
                self._busy = False
        for entry in self.scheduler.entries():
            self.scheduler.remove(entry.id)
            self._fail(self._requests.pop(entry.id), 503, self._stopping.message)
        self._collect(block=True)
        self._emit(emit)
        with self._wake:
            self._busy = False
        emit(Stopped())

    def _apply(self, message: ToCore) -> None:
        if isinstance(message, AddRequest):
            self._add(message)
        elif isinstance(message, CancelRequest):
            if self.scheduler.remove(message.request_id) is not None:
                self._requests.pop(message.request_id, None)  # its device state goes with it
        elif isinstance(message, Shutdown):
            self._stopping = message
        else:
            raise TypeError(f"unknown message {type(message).__name__}")

    def _add(self, message: AddRequest) -> None:
        request = message.request
        req = CoreRequest(message.request_id, request, message.progress, message.preview_every)
        try:
            self.scheduler.add(
                req.id,
                key=self.worker.batch_key(request),
                rows=request.rows,
                total_steps=request.sampling_steps,
                deadline=message.created + message.timeout,  # counted from arrival at the server
            )
        except Exception:  # noqa: BLE001 — this request only
            self._fault([req], "admitting a request failed", count=False)
            return
        self._requests[req.id] = req

    def _emit(self, emit: Emit) -> None:
        hits, misses = self.worker.prompt_cache_hits, self.worker.prompt_cache_misses
        self._out.prompt_cache_hits, self._out.prompt_cache_misses = hits - self._hits, misses - self._misses
        self._hits, self._misses = hits, misses
        lora = self.worker.lora_stats()
        if lora is not None:  # deltas of the monotonic counters; the gauge when it moved
            self._out.lora_loads = lora.loads - self._lora[0]
            self._out.lora_evictions = lora.evictions - self._lora[1]
            if lora.resident != self._lora[2]:
                self._out.lora_resident = lora.resident
            self._lora = (lora.loads, lora.evictions, lora.resident)
        if self.worker.device.type == "cuda":
            now = time.monotonic()
            if now - self._gpu_reported >= GPU_MEMORY_REPORT_S:
                self._gpu_reported = now
                self._out.gpu_bytes = float(torch.cuda.memory_allocated(self.worker.device))
        if self._out:
            out, self._out = self._out, EngineOutputs()
            emit(out)

    def _collect(self, block: bool) -> None:
        """Finish the requests whose images have reached host memory (all of them when ``block``)."""
        while self._reading:
            requests, pending = self._reading[0]
            try:  # ready() and wait() are where asynchronous device errors surface on CUDA
                if not (block or pending.ready()):
                    return
                images = pending.wait()
            except Exception:
                self._reading.popleft()
                self._fault(requests, "reading back images failed")
                continue
            self._reading.popleft()
            nonfinite: dict[str, int] = {}
            for req, pixels in zip(requests, images, strict=True):
                if pixels is not None:
                    self._out.events.append(Finished(req.id, pixels, req.warnings))
                    continue
                error_id = new_error_id()
                log.error("%s (error_id=%s, request=%s, model=%s)", NONFINITE_MESSAGE, error_id, req.id,
                          req.request.model)
                message = f"{NONFINITE_MESSAGE} (error id {error_id})"
                self._out.events.append(Failed(req.id, 500, message, error_id))
                nonfinite[req.request.model] = nonfinite.get(req.request.model, 0) + 1
            if nonfinite:
                merged = dict(self._out.nonfinite)
                for model, count in nonfinite.items():
                    merged[model] = merged.get(model, 0) + count
                self._out.nonfinite = tuple(merged.items())

    def _step(self, plan: Plan) -> None:
        requests = [self._requests[i] for i in plan.ids]
        now = self.clock()
        events = self._out.events
        events.extend(Started(r.id, now) for r in requests if r.state is None)
        newcomers = [r for r in requests if r.state is None]
        if newcomers:
            try:  # every newcomer's prompts in one encoder call (a failure here shows again in prepare)
                self.worker.encode_prompts([r.request for r in newcomers])
            except Exception:  # noqa: BLE001
                log.warning("batched prompt encoding failed; encoding per request", exc_info=True)
        ready: list[CoreRequest] = []
        for req in requests:  # prepare newcomers (this thread owns the device); a bad request fails alone
            if req.state is None:
                try:
                    req.state = self.worker.prepare(req.request, req.preview_every)
                    req.warnings = tuple(req.state.warnings)
                    steps = req.request.num_inference_steps
                    req.total_steps = self.worker.total_evaluations(req.state, steps)
                except Exception:
                    self._fault([req], "preparing a request failed")
                    continue
            ready.append(req)
        if not ready:
            return
        t0 = time.perf_counter()
        # Busy means the previous step's requests went on to this one (no idle wait in between).
        period = t0 - self._last_step_start if self._busy_since_step else 0.0
        self._last_step_start, self._busy_since_step = t0, True
        try:
            done = self.worker.step([r.state for r in ready])  # type: ignore[misc]
        except Exception:
            self._fault(ready, "a forward pass failed")
            return
        self.steps_run += 1
        self._record_step(ready, time.perf_counter() - t0, period)
        done_ids = [r.id for r, d in zip(ready, done, strict=True) if d]
        finished = {e.id for e in self.scheduler.update(plan, done_ids)}
        completing: list[CoreRequest] = []
        for req in ready:
            assert req.state is not None
            step = req.state.evaluations
            if req.progress:
                events.append(Progress(req.id, step, req.total_steps))
            if req.preview_every:
                if step % req.preview_every == 0 or req.id in finished:
                    self._preview(req, step)
            if req.id in finished:
                completing.append(self._requests.pop(req.id))
        if not completing:
            return
        events.extend(Sampled(r.id) for r in completing)
        try:  # one device-to-host copy for every request finishing in this step, collected when it lands
            pending = self.worker.read_images([r.state for r in completing])  # type: ignore[misc]
        except Exception:
            self._fault(completing, "reading back images failed")
            return
        for req in completing:
            req.state = None  # free device memory now
        self._reading.append((completing, pending))

    def _preview(self, req: CoreRequest, step: int) -> None:
        assert req.state is not None
        try:
            images = self.worker.preview(req.state)
        except Exception:  # noqa: BLE001 — a preview is best effort; the request goes on
            log.exception("preview failed (request=%s)", req.id)
            return
        if images is not None:
            self._out.events.append(Preview(req.id, step, req.total_steps, images))

    def _record_step(self, ready: list[CoreRequest], seconds: float, period: float) -> None:
        rows = sum(r.request.rows for r in ready)
        per_model: dict[str, int] = {}
        for r in ready:
            per_model[r.request.model] = per_model.get(r.request.model, 0) + r.request.rows
        self._out.steps.append(
            StepStats(
                forward_seconds=seconds,
                period_seconds=period,
                rows=rows,
                padded_rows=self.worker.bucket_for(rows),
                evaluations=tuple(per_model.items()),
                lora_rows=getattr(self.worker, "last_lora_rows", 0),
            )
        )

    def _fault(self, requests: list[CoreRequest], what: str, count: bool = True) -> None:
        """Fail ``requests`` with a 500 and one error id (logged with the traceback being handled)."""
        error_id = new_error_id()
        log.exception("%s (error_id=%s, requests=%s)", what, error_id, [r.id for r in requests])
        if count:
            self._out.faults += 1
        for req in requests:
            self.scheduler.remove(req.id)
            self._requests.pop(req.id, None)
            self._fail(req, 500, f"internal error while sampling (error id {error_id})", error_id)

    def _fail(self, req: CoreRequest, status: int, message: str, error_id: str | None = None) -> None:
        req.state = None
        self._out.events.append(Failed(req.id, status, message, error_id))
