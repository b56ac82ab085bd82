"""How far behind the event loop runs: the front end's own overload signal.

Admission (``RequestManager.submit``) sheds on the engine's load, but it only sees a request once the event
loop gets to it. When the loop itself is saturated (parsing, validating and answering more requests per
second than one interpreter can), requests wait in the socket backlog and in the loop's ready queue before
the app runs — time the client sees and admission cannot. ``LoopLag`` measures that wait as the lateness of
a short periodic timer. The request-counting middleware answers 503 at once, without reading the body,
while the lag is *sustained* (every one of the last few timers late) and many requests are in flight, so
the loop spends its time on the requests it has accepted. One stall (a large body parsed, a GC pause) is
not overload and sheds nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import threading
import traceback
from collections import deque
from collections.abc import Callable

log = logging.getLogger(__name__)

SUSTAINED_TICKS = 3  # the lag counts as sustained when this many timers in a row were late by that much


class LoopLag:
    """A timer every ``interval`` seconds on the running loop; ``current()`` is how late it is, in seconds,
    and ``sustained()`` the least lateness of the last ``SUSTAINED_TICKS`` timers (the pending one included
    once it is overdue)."""

    def __init__(self, interval: float = 0.01, observe: Callable[[float], None] | None = None) -> None:
        self.interval = interval
        self.observe = observe  # called with each timer's lateness (a histogram's observe)
        self.samples: deque[float] = deque(maxlen=SUSTAINED_TICKS)  # lateness of the last timers that fired
        self._due: float | None = None  # when the pending timer should fire (loop clock)
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        """Start measuring on the running loop (idempotent)."""
        if self._task is None or self._task.done():
            self._loop = asyncio.get_running_loop()
            self._task = self._loop.create_task(self._run(), name="loop-lag")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._due = None
        self.samples.clear()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._due = loop.time() + self.interval
            await asyncio.sleep(self.interval)
            late = max(0.0, loop.time() - self._due)
            self.samples.append(late)
            if self.observe is not None:
                self.observe(late)

    def _overdue(self) -> float | None:
        due, loop = self._due, self._loop
        if due is None or loop is None:
            return None
        return loop.time() - due  # loop.time() is the monotonic clock: any thread may ask

    def current(self) -> float:
        """The lag now: the last timer's lateness, or the pending timer's if it is already overdue (a loop
        that is behind right now cannot run the timer that would say so)."""
        overdue = self._overdue()
        if overdue is None:
            return 0.0
        return max(self.samples[-1] if self.samples else 0.0, overdue)

    def sustained(self) -> float:
        """The least lateness of the last SUSTAINED_TICKS timers, the pending one counted once overdue;
        0 until that many have fired."""
        overdue = self._overdue()
        if overdue is None:
            return 0.0
        recent = list(self.samples)
        if overdue > 0:
            recent = [*recent[1:], overdue]
        return min(recent) if len(recent) == SUSTAINED_TICKS else 0.0


class StallWatch:
    """A daemon thread that logs what the event loop's thread is running when the loop is blocked: once the
    pending ``LoopLag`` timer is more than ``threshold`` seconds overdue, one warning per stall with that
    thread's stack, and ``on_stall()`` (a counter's inc). A stall is one callback (or one loop turn) holding
    the loop; it delays every request's arrival and answer by as much, and it is not *sustained* lag, so
    the front end's lag shedding does not act on it. The stack says what to fix."""

    def __init__(self, lag: LoopLag, threshold: float, on_stall: Callable[[], None] | None = None,
                 poll: float = 0.05) -> None:  # fmt: skip
        self.lag, self.threshold, self.on_stall, self.poll = lag, threshold, on_stall, poll
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop_thread: int | None = None

    def start(self) -> None:
        """Start watching the loop this is called on (idempotent; ``threshold`` <= 0: never)."""
        if self.threshold <= 0 or (self._thread is not None and self._thread.is_alive()):
            return
        self._loop_thread = threading.get_ident()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="loop-stall-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1.0)
            self._thread = None

    def _run(self) -> None:
        in_stall = False
        while not self._stop.wait(self.poll):
            overdue = self.lag._overdue()
            if overdue is None or overdue <= self.threshold:
                in_stall = False
                continue
            if in_stall:
                continue
            in_stall = True
            frame = sys._current_frames().get(self._loop_thread or -1)
            stack = "".join(traceback.format_stack(frame, limit=12)) if frame is not None else "(unavailable)"
            if self.on_stall is not None:
                self.on_stall()
            log.warning("event loop blocked for %.2f s so far; it is running:\n%s", overdue, stack.rstrip())
