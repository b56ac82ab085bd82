"""The engine core in its own process: ``ProcessClient`` (server side) and ``child_main`` (engine side).

Why: in one process the HTTP event loop and the engine thread share one GIL. Under load (hundreds of
requests per second) the loop's parsing, validation and responses delay every engine step: on an H100 the
shipped fashion-class model's graphed forward takes ~4.4 ms, but inside the one-process server a step came
only every ~6.5 ms (bench/RESULTS.md, run 6). With the core in a child process each interpreter has its
own GIL and the two exchange one message per request and one per engine-loop turn.

The child imports no web framework (a test checks ``sys.modules``): ``child_main`` loads the models
(``server.loading``), sends ``Ready`` (with ``PROTOCOL_VERSION``) or ``LoadFailed``, then runs an
``EngineCore`` whose outputs it writes to the pipe, and feeds it the ``AddRequest`` / ``CancelRequest`` /
``Shutdown`` messages it receives. Messages are the dataclasses of ``server.messages``, pickled.

The child ignores SIGINT and SIGTERM: a signal sent to the whole process group (Ctrl-C in a terminal,
systemd's default KillMode) must not kill the engine before the server has drained; the server stops it
with ``Shutdown``, and a child whose parent vanished sees its pipe close and stops.

If the child dies (a device fault, the OOM killer), every request in flight fails with a 500 and an error
id, ``serving`` turns false (new requests get 503 "restarting") and a new child is started; after
``MAX_RESTARTS`` unexpected exits within ``RESTART_WINDOW_S`` it is not, ``failure`` says why, and
/health/ready answers 503 "failed" until the orchestrator restarts the server.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from server.client import EngineLoadError, EngineSink
from server.messages import (
    PROTOCOL_VERSION,
    AddRequest,
    CancelRequest,
    EngineOutputs,
    LoadFailed,
    Ready,
    Shutdown,
    Stopped,
    ToCore,
)
from server.settings import GIL_SWITCH_INTERVAL_S, Settings

if TYPE_CHECKING:
    from server.loading import LoadInfo

log = logging.getLogger(__name__)

# An engine process that exits unexpectedly is started again, unless it did so this often within the window
# (then it stays down: /health/ready reports the failure and the orchestrator restarts the server).
MAX_RESTARTS, RESTART_WINDOW_S = 3, 600.0


def child_main(conn: Any, settings: Settings, text_encoder_loader: Callable[..., Any] | None) -> None:
    """The engine process: load and warm, report, then feed the core until ``Shutdown`` (or until the
    parent goes away: its end of the pipe closes)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from server.logconfig import configure_logging

    configure_logging(settings.log_level, settings.log_format, process="engine")
    from server.core import EngineCore
    from server.heap import freeze_startup_heap
    from server.loading import load_worker

    try:
        worker, info = load_worker(settings, text_encoder_loader)
    except Exception as exc:  # noqa: BLE001 — reported to the parent (/health/ready), logged here
        log.exception("model loading failed")
        conn.send(LoadFailed(f"{type(exc).__name__}: {exc}"))
        return
    core = EngineCore(worker)
    send_lock = threading.Lock()

    def emit(out: EngineOutputs | Stopped) -> None:
        try:
            with send_lock:
                conn.send(out)
        except (BrokenPipeError, OSError):  # the parent is gone; the receive loop below notices too
            pass

    freeze_startup_heap()  # the sampling loop does not stall on full GC collections of the models' heap
    conn.send(Ready(PROTOCOL_VERSION, info))
    thread = threading.Thread(target=core.run, args=(emit,), name="unet-engine", daemon=True)
    thread.start()
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):  # the parent is gone: nobody to answer
            message = Shutdown()
        if not isinstance(message, (AddRequest, CancelRequest, Shutdown)):
            log.error("ignoring an unknown message %s", type(message).__name__)
            continue
        core.put(message)
        if isinstance(message, Shutdown):
            break
    thread.join(60.0)


class ProcessClient:
    """``EngineClient`` over a spawned engine process (``engine_mode=process``)."""

    def __init__(self, settings: Settings, text_encoder_loader: Callable[..., Any] | None = None) -> None:
        self.settings = settings
        self.text_encoder_loader = text_encoder_loader
        self._proc: Any = None
        self._conn: Any = None
        self._send_lock = threading.Lock()
        self._receiver: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sink: EngineSink | None = None
        self._alive = False
        self._stopping = False
        self._failure: str | None = None
        self._exits: list[float] = []  # monotonic times of unexpected exits (restart budget)
        self._restart: asyncio.Future | None = None

    # -- EngineClient -------------------------------------------------------------------------

    def load(self) -> LoadInfo:
        """Spawn the child and wait until it has loaded and warmed the models (blocking)."""
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
        if isinstance(message, LoadFailed):
            self._proc.join(10.0)
            raise EngineLoadError(message.message)
        if not isinstance(message, Ready) or message.protocol_version != PROTOCOL_VERSION:
            self.kill()
            raise EngineLoadError(f"the engine process speaks another protocol ({message!r:.80})")
        self._conn = conn
        return message.info

    def start(self, loop: asyncio.AbstractEventLoop, sink: EngineSink) -> None:
        # The receiver thread wants the GIL for every message while the event loop holds it.
        sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
        self._loop, self._sink = loop, sink
        self._alive = True
        self._receiver = threading.Thread(target=self._receive, name="unet-engine-receiver", daemon=True)
        self._receiver.start()

    def send(self, message: ToCore) -> bool:
        if self._conn is None or not self._alive:
            return False
        try:
            with self._send_lock:
                self._conn.send(message)
        except (BrokenPipeError, OSError):
            return False
        return True

    async def stop(self) -> None:
        self._stopping = True
        if self._alive:
            self.send(Shutdown())
        if self._receiver is not None:
            await asyncio.to_thread(self._receiver.join, 70.0)
        if self._restart is not None and not self._restart.done():
            self._restart.cancel()  # a child still loading is terminated below
        if self._proc is not None:
            await asyncio.to_thread(self._proc.join, 10.0)
            if self._proc.is_alive():
                log.warning("engine process did not exit; terminating it")
                self._proc.terminate()
                await asyncio.to_thread(self._proc.join, 5.0)
        if self._conn is not None:
            self._conn.close()

    def kill(self) -> None:
        self._stopping = True
        if self._proc is not None and self._proc.is_alive():
            self._proc.terminate()
            self._proc.join(5.0)

    @property
    def serving(self) -> bool:
        return self._alive

    @property
    def failure(self) -> str | None:
        return self._failure

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    # -- plumbing -----------------------------------------------------------------------------

    def _receive(self) -> None:
        """Receiver thread: hand each of the child's outputs to the event loop, in order."""
        assert self._loop is not None and self._sink is not None
        loop, sink = self._loop, self._sink
        try:
            while True:
                message = self._conn.recv()
                if isinstance(message, EngineOutputs):
                    loop.call_soon_threadsafe(sink.on_outputs, message)
                elif isinstance(message, Stopped):
                    break
                else:
                    log.error("ignoring an unknown message %s from the engine", type(message).__name__)
        except (EOFError, OSError):
            pass
        except Exception:  # noqa: BLE001 — a message we cannot read: treat the child as gone
            log.exception("reading from the engine process failed")
        try:
            loop.call_soon_threadsafe(self._child_gone)
        except RuntimeError:  # loop closed
            pass

    def _child_gone(self) -> None:
        """The child's pipe closed (event-loop thread): fail what is in flight, restart within budget."""
        self._alive = False
        if self._stopping:
            return
        error_id = uuid.uuid4().hex[:12]
        code = self._proc.exitcode if self._proc is not None else None
        log.error("the engine process exited unexpectedly (exit code %s, error_id=%s)", code, error_id)
        assert self._sink is not None
        self._sink.on_lost("the engine process exited", error_id)
        now = time.monotonic()
        self._exits = [t for t in self._exits if now - t < RESTART_WINDOW_S] + [now]
        if len(self._exits) > MAX_RESTARTS:
            self._failure = (
                f"the engine process exited {len(self._exits)} times within {RESTART_WINDOW_S:.0f} s "
                f"(last exit code {code}); not restarting it"
            )
            log.error("%s", self._failure)
            return
        log.warning("starting a new engine process")
        self._restart = asyncio.ensure_future(self._relaunch())

    async def _relaunch(self) -> None:
        """Start a new child after an unexpected exit; requests get 503 until it is ready."""
        old = self._proc
        try:
            if old is not None:
                await asyncio.to_thread(old.join, 10.0)
            if self._conn is not None:
                self._conn.close()
            await asyncio.to_thread(self.load)
        except asyncio.CancelledError:
            self.kill()
            raise
        except Exception as exc:  # noqa: BLE001 — it stays down; readiness says why
            self._failure = f"restarting the engine process failed: {exc}"
            log.exception("restarting the engine process failed")
            return
        if self._stopping:
            self.kill()
            return
        log.info("the new engine process is ready")
        assert self._loop is not None and self._sink is not None
        self.start(self._loop, self._sink)
