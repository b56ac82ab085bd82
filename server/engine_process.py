"""The engine in its own process: HTTP and PNG encoding here, the device loop in a spawned child.

Why: in one process the HTTP event loop and the engine thread share one GIL. Under load (hundreds of
requests per second) the loop's parsing, validation and responses delay every engine step: on an H100 the
shipped fashion-class model's graphed forward takes ~4.4 ms, but inside the one-process server a step came
only every ~6.5 ms (bench/RESULTS.md, run 6). With the engine in a child process each interpreter has its
own GIL and the two exchange one message per request and one per engine step.

Parent (``EngineProcess``, the interface routes use, like ``server.engine.Engine``): owns the ``Task``
objects, admission (queue bound, 429), jobs, cancellation, deadlines of waiting routes, PNG encoding and the
Prometheus registry. Child (``child_main``): loads the models, warms every bucket, then runs an ordinary
``Engine`` whose events go into a pipe (``PipeEvents``) and whose metric calls are recorded
(``MetricRecorder``) and replayed on the parent's registry.

Messages (pickled tuples over one duplex ``multiprocessing`` pipe):

- parent → child: ``("submit", id, request, endpoint, is_job, created, timeout)``, ``("cancel", id)``,
  ``("stop",)``.
- child → parent: ``("ready", LoadInfo)`` or ``("load_error", message)`` once; then
  ``("events", events, metric_ops, gauges, gpu_bytes)`` at most once per engine-loop iteration, where an
  event is ``("started", id, t)``, ``("progress", id, step, total)``, ``("sampled", id)``,
  ``("completed", id, uint8 images)`` or ``("failed", id, status, message, error_id)``; ``("stopped",)``
  last.

If the child dies (a device fault, the OOM killer), every request in flight fails with a 500 and an error
id, ``running`` turns false (/health/ready answers 503 "loading") and a new child is started; after
``MAX_RESTARTS`` unexpected exits within ``RESTART_WINDOW_S`` it is not, ``failure`` says why, and
/health/ready answers 503 "failed" until the orchestrator restarts the server.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import sys
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from server.engine import (
    GIL_SWITCH_INTERVAL_S,
    Engine,
    EngineStopped,
    QueueFull,
    Task,
    complete_task,
    fail_task,
    new_task,
)
from server.metrics import Metrics
from server.schemas import ResolvedRequest
from server.settings import Settings

log = logging.getLogger(__name__)

GPU_MEMORY_REPORT_S = 1.0  # how often the child reports torch.cuda.memory_allocated with its events
# An engine process that exits unexpectedly is started again, unless it did so this often within the window
# (then it stays down: /health/ready reports the failure and the orchestrator restarts the server).
MAX_RESTARTS, RESTART_WINDOW_S = 3, 600.0
SHUTTING_DOWN = "server is shutting down"


class EngineLoadError(RuntimeError):
    """The engine process could not load or warm the models (message: the child's exception)."""


class _Metric:
    """One metric (optionally with label values) of a ``MetricRecorder``."""

    __slots__ = ("_rec", "_name", "_labels")

    def __init__(self, rec: MetricRecorder, name: str, labels: tuple[str, ...]) -> None:
        self._rec, self._name, self._labels = rec, name, labels

    def labels(self, *values: str) -> _Metric:
        return _Metric(self._rec, self._name, tuple(values))

    def observe(self, value: float) -> None:
        self._rec.add(self._name, self._labels, "observe", value)

    def inc(self, value: float = 1.0) -> None:
        self._rec.add(self._name, self._labels, "inc", value)

    def set(self, value: float) -> None:
        with self._rec.lock:  # a gauge: only its last value matters
            self._rec.gauges[(self._name, self._labels)] = value


class MetricRecorder:
    """Stands in for ``server.metrics.Metrics`` in the child: records observe/inc/set calls by metric name;
    ``replay`` applies them to the parent's real registry."""

    def __init__(self, lock: threading.Lock) -> None:
        self.lock = lock
        self.ops: list[tuple[str, tuple[str, ...], str, float]] = []
        self.gauges: dict[tuple[str, tuple[str, ...]], float] = {}

    def __getattr__(self, name: str) -> _Metric:
        if name.startswith("_"):
            raise AttributeError(name)
        return _Metric(self, name, ())

    def add(self, name: str, labels: tuple[str, ...], method: str, value: float) -> None:
        with self.lock:
            self.ops.append((name, labels, method, value))


def replay(metrics: Metrics, ops: list, gauges: dict) -> None:
    """Apply a child's recorded metric calls to ``metrics`` (parent)."""
    for name, labels, method, value in ops:
        m = getattr(metrics, name)
        getattr(m.labels(*labels) if labels else m, method)(value)
    for (name, labels), value in gauges.items():
        m = getattr(metrics, name)
        (m.labels(*labels) if labels else m).set(value)


class PipeEvents:
    """``server.engine.EngineEvents`` for the child: buffers events (engine and receiver threads) and
    sends them, with the recorded metric calls, in one message per ``flush``."""

    def __init__(self, conn: Any, send_lock: threading.Lock, gpu_bytes: Callable[[], float] | None) -> None:
        self.conn = conn
        self.send_lock = send_lock
        self.lock = threading.Lock()
        self.metrics = MetricRecorder(self.lock)
        self.events: list[tuple] = []
        self.gpu_bytes = gpu_bytes
        self._gpu_reported = 0.0

    def _add(self, event: tuple) -> None:
        with self.lock:
            self.events.append(event)

    def started(self, tasks: list[Task]) -> None:
        with self.lock:
            self.events.extend(("started", t.id, t.started) for t in tasks)

    def progress(self, tasks: list[Task]) -> None:
        with self.lock:
            self.events.extend(("progress", t.id, t.step, t.total_steps) for t in tasks)

    def sampled(self, tasks: list[Task]) -> None:
        with self.lock:
            self.events.extend(("sampled", t.id) for t in tasks)

    def completed(self, finished: list[tuple[Task, Any]]) -> None:
        with self.lock:
            self.events.extend(("completed", t.id, images) for t, images in finished)

    def failed(self, task: Task, status: int, message: str, error_id: str | None) -> None:
        self._add(("failed", task.id, status, message, error_id))

    def flush(self) -> None:
        gpu = None
        now = time.monotonic()
        if self.gpu_bytes is not None and now - self._gpu_reported >= GPU_MEMORY_REPORT_S:
            self._gpu_reported, gpu = now, self.gpu_bytes()
        with self.lock:
            if not self.events and not self.metrics.ops and not self.metrics.gauges and gpu is None:
                return
            message = ("events", self.events, self.metrics.ops, self.metrics.gauges, gpu)
            self.events, self.metrics.ops, self.metrics.gauges = [], [], {}
        with self.send_lock:
            self.conn.send(message)


def child_main(conn: Any, settings: Settings, text_encoder_loader: Callable[..., Any] | None) -> None:
    """The engine process: load and warm, report, then serve submit/cancel/stop messages until stopped
    (or until the parent goes away: its end of the pipe closes)."""
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s [engine process] %(name)s: %(message)s",
    )
    from server.app import load_worker

    send_lock = threading.Lock()
    try:
        worker, info = load_worker(settings, text_encoder_loader)
    except Exception as exc:  # noqa: BLE001 — reported to the parent (/health/ready), logged here
        log.exception("model loading failed")
        conn.send(("load_error", f"{type(exc).__name__}: {exc}"))
        return
    gpu_bytes = None
    if worker.device.type == "cuda":
        import torch

        device = worker.device
        gpu_bytes = lambda: float(torch.cuda.memory_allocated(device))  # noqa: E731
    events = PipeEvents(conn, send_lock, gpu_bytes)
    # Admission is bounded in the parent; the child's bound only guards against a runaway parent.
    bound = 4 * settings.max_queue_size + 1024
    engine = Engine(worker, bound, events.metrics, events=events)  # type: ignore[arg-type]
    conn.send(("ready", info))
    engine.start(None)
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):  # the parent is gone: nobody to answer
            message = ("stop",)
        kind = message[0]
        if kind == "submit":
            _, task_id, request, endpoint, is_job, created, timeout = message
            task = new_task(request, endpoint, is_job, task_id=task_id, created=created)
            try:
                engine.admit(task, timeout)
            except QueueFull:
                events.failed(task, 429, "the request queue is full; retry later", None)
                events.flush()
            except Exception:  # noqa: BLE001 — this request only
                error_id = uuid.uuid4().hex[:12]
                log.exception("admitting a request failed (error_id=%s, request=%s)", error_id, task_id)
                events.failed(task, 500, f"internal error while admitting (error id {error_id})", error_id)
                events.flush()
        elif kind == "cancel":
            engine.withdraw(message[1])
        elif kind == "stop":
            for task in engine.halt():
                events.failed(task, 503, SHUTTING_DOWN, None)
            if engine._thread is not None:
                engine._thread.join(30.0)
            try:
                events.flush()
                with send_lock:
                    conn.send(("stopped",))
            except (BrokenPipeError, OSError):
                pass
            return


class EngineProcess:
    """The parent's side of an engine running in a child process; same interface as ``Engine`` for routes."""

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        text_encoder_loader: Callable[..., Any] | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.text_encoder_loader = text_encoder_loader
        self.jobs: OrderedDict[str, Task] = OrderedDict()
        self.max_finished_jobs = settings.max_finished_jobs
        self._live: dict[str, Task] = {}  # submitted and not terminal here
        self._queued: dict[str, Task] = {}  # not started yet, in arrival order (admission, queue positions)
        self._forward_ewma = 0.05
        self._accepting = False
        self._alive = False
        self._stopping = False
        self._proc: Any = None
        self._conn: Any = None
        self._send_lock = threading.Lock()
        self._receiver: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.gpu_bytes = 0.0
        self.failure: str | None = None  # set when the engine process is down for good
        self._exits: list[float] = []  # monotonic times of unexpected exits (restart budget)
        self._restart: asyncio.Future | None = None

    # -- lifecycle ----------------------------------------------------------------------------

    def launch(self) -> Any:
        """Spawn the child and wait until it has loaded and warmed the models (blocking: call it in a
        thread). Returns its ``server.app.LoadInfo``; raises EngineLoadError with the child's reason."""
        ctx = multiprocessing.get_context("spawn")
        conn, child_conn = ctx.Pipe()
        # Not a daemon: torch.compile starts worker processes, which a daemonic process may not have. The
        # child exits when the parent's end of the pipe closes.
        self._proc = ctx.Process(
            target=child_main,
            args=(child_conn, self.settings, self.text_encoder_loader),
            name="unet-engine",
        )
        self._proc.start()
        child_conn.close()
        self._conn = None
        try:
            message = conn.recv()
        except (EOFError, OSError):
            self._proc.join(10.0)
            code = self._proc.exitcode
            raise EngineLoadError(f"the engine process exited while loading (exit code {code})") from None
        if message[0] != "ready":
            self._proc.join(10.0)
            raise EngineLoadError(message[1])
        self._conn = conn
        return message[1]

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        # The receiver thread wants the GIL for every message (each step's events, each completion) while
        # the event loop holds it: with the default 5 ms switch interval a completion could wait that long.
        sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
        self._loop = loop
        self._accepting = self._alive = True
        self._receiver = threading.Thread(target=self._receive, name="unet-engine-receiver", daemon=True)
        self._receiver.start()

    async def stop(self, drain_timeout: float = 30.0) -> None:
        """Stop admitting, let running requests finish (up to ``drain_timeout``), fail the rest with 503,
        stop the child and wait for it to exit."""
        self._accepting = False
        self._stopping = True
        deadline = time.monotonic() + drain_timeout
        while self._alive and self._live and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self._alive:
            self._send(("stop",))
        if self._receiver is not None:
            await asyncio.to_thread(self._receiver.join, 40.0)
        if self._restart is not None and not self._restart.done():
            self._restart.cancel()  # a child still loading is terminated below
        await asyncio.sleep(0)  # let the receiver's last callbacks run
        for task in list(self._live.values()):
            self._forget(task)
            fail_task(task, 503, SHUTTING_DOWN)
        if self._proc is not None:
            await asyncio.to_thread(self._proc.join, 10.0)
            if self._proc.is_alive():
                log.warning("engine process did not exit; terminating it")
                self._proc.terminate()
                await asyncio.to_thread(self._proc.join, 5.0)
        if self._conn is not None:
            self._conn.close()

    def kill(self) -> None:
        """Terminate the child at once (shutdown while it was still loading)."""
        self._stopping = True
        if self._proc is not None and self._proc.is_alive():
            self._proc.terminate()
            self._proc.join(5.0)

    @property
    def running(self) -> bool:
        return self._alive

    # -- API for routes (event-loop thread) ---------------------------------------------------

    def submit(self, request: ResolvedRequest, endpoint: str, timeout: float, is_job: bool = False) -> Task:
        """Admit a request; raises QueueFull (429) or EngineStopped (503)."""
        if not self._accepting:
            if self._stopping:
                raise EngineStopped(SHUTTING_DOWN)
            if self.failure:
                raise EngineStopped(f"the engine is down: {self.failure}")
            raise EngineStopped("the engine is restarting; retry shortly")
        if len(self._queued) >= self.settings.max_queue_size:
            limit = self.settings.max_queue_size
            raise QueueFull(f"{len(self._queued)} requests are waiting (max_queue_size={limit})")
        task = new_task(request, endpoint, is_job)
        if not self._send(("submit", task.id, request, endpoint, is_job, task.created, timeout)):
            raise EngineStopped("the engine is restarting; retry shortly")
        self._live[task.id] = task
        self._queued[task.id] = task
        if is_job:
            self.jobs[task.id] = task
            self._trim_jobs()
        task._publish("queued")
        return task

    def cancel(self, task_id: str) -> bool:
        """Cancel a queued or running request. False once it is terminal or its sampling has finished."""
        task = self._live.get(task_id)
        if task is None or task.done or task.sampling_done:
            return False
        self._send(("cancel", task_id))
        self._forget(task)
        task.status = "cancelled"
        task.finished = time.monotonic()
        task._publish("cancelled")
        return True

    def queue_position(self, task_id: str) -> int | None:
        """How many waiting requests arrived before this one (as far as the child has reported starts)."""
        return list(self._queued).index(task_id) if task_id in self._queued else None

    def retry_after(self) -> int:
        return max(1, min(60, int(len(self._queued) * self._forward_ewma) + 1))

    def _trim_jobs(self) -> None:
        finished = [k for k, t in self.jobs.items() if t.done]
        for k in finished[: max(0, len(finished) - self.max_finished_jobs)]:
            del self.jobs[k]

    # -- plumbing -----------------------------------------------------------------------------

    def _send(self, message: tuple) -> bool:
        if self._conn is None:
            return False
        try:
            with self._send_lock:
                self._conn.send(message)
        except (BrokenPipeError, OSError):
            return False
        return True

    def _forget(self, task: Task) -> None:
        self._live.pop(task.id, None)
        self._queued.pop(task.id, None)

    def _receive(self) -> None:
        """Receiver thread: hand each message of the child to the event loop."""
        assert self._loop is not None
        loop = self._loop
        try:
            while True:
                message = self._conn.recv()
                if message[0] == "events":
                    loop.call_soon_threadsafe(self._apply, *message[1:])
                elif message[0] == "stopped":
                    break
        except (EOFError, OSError):
            pass
        except Exception:  # noqa: BLE001 — a message we cannot read: treat the child as gone
            log.exception("reading from the engine process failed")
        try:
            loop.call_soon_threadsafe(self._child_gone)
        except RuntimeError:  # loop closed
            pass

    def _apply(self, events: list[tuple], ops: list, gauges: dict, gpu: float | None) -> None:
        """Apply one batch of the child's events and metrics (event-loop thread)."""
        replay(self.metrics, ops, gauges)
        for name, _, method, value in ops:
            if name == "forward_duration_seconds" and method == "observe":
                self._forward_ewma = 0.9 * self._forward_ewma + 0.1 * value
        if gpu is not None:
            self.gpu_bytes = gpu
        for event in events:
            kind, task = event[0], self._live.get(event[1])
            if task is None:  # cancelled here, or already failed
                continue
            if kind == "started":
                self._queued.pop(task.id, None)
                task.started, task.status = event[2], "running"
                task._publish("started")
            elif kind == "progress":
                task.step, task.total_steps = event[2], event[3]
                task._publish("progress", task._event_data())
            elif kind == "sampled":
                task.sampling_done = True
            elif kind == "completed":
                self._forget(task)
                complete_task(task, event[2], self.metrics, self._after_complete)
            elif kind == "failed":
                self._forget(task)
                fail_task(task, *event[2:])

    def _after_complete(self, task: Task) -> None:
        if task.is_job:
            self._trim_jobs()

    def _child_gone(self) -> None:
        """The child's pipe closed (event-loop thread): fail whatever is still in flight."""
        self._alive = False
        self._accepting = False
        if self._stopping:
            return
        error_id = uuid.uuid4().hex[:12]
        code = self._proc.exitcode if self._proc is not None else None
        log.error("the engine process exited unexpectedly (exit code %s, error_id=%s)", code, error_id)
        self.metrics.engine_errors_total.inc()
        for task in list(self._live.values()):
            self._forget(task)
            fail_task(task, 500, f"internal error: the engine process exited (error id {error_id})", error_id)
        now = time.monotonic()
        self._exits = [t for t in self._exits if now - t < RESTART_WINDOW_S] + [now]
        if len(self._exits) > MAX_RESTARTS:
            self.failure = (
                f"the engine process exited {len(self._exits)} times within {RESTART_WINDOW_S:.0f} s "
                f"(last exit code {code}); not restarting it"
            )
            log.error("%s", self.failure)
            return
        log.warning("starting a new engine process")
        self._restart = asyncio.ensure_future(self._relaunch())

    async def _relaunch(self) -> None:
        """Start a new child after an unexpected exit (event loop); requests get 503 until it is ready."""
        old = self._proc
        try:
            if old is not None:
                await asyncio.to_thread(old.join, 10.0)
            if self._conn is not None:
                self._conn.close()
            await asyncio.to_thread(self.launch)
        except asyncio.CancelledError:
            self.kill()
            raise
        except Exception as exc:  # noqa: BLE001 — it stays down; readiness says why
            self.failure = f"restarting the engine process failed: {exc}"
            log.exception("restarting the engine process failed")
            return
        if self._stopping:
            self.kill()
            return
        log.info("the new engine process is ready")
        self.start(self._loop)  # type: ignore[arg-type]
