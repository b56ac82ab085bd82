"""How far behind the event loop runs: the front end's own overload signal.

Admission (``RequestManager.submit``) sheds on the engine's load, but it only sees a request once the event
loop gets to it. When the loop itself is saturated (parsing, validating and answering more requests per
second than one interpreter can), requests wait in the socket backlog and in the loop's ready queue before
the app runs — time the client sees and admission cannot. ``LoopLag`` measures that wait as the lateness of
a short periodic timer; the request-counting middleware answers 503 at once, without reading the body,
while it exceeds ``shed_loop_lag_seconds``, so the loop spends its time on the requests it has accepted.
"""

from __future__ import annotations

import asyncio
import contextlib


class LoopLag:
    """A timer every ``interval`` seconds on the running loop; ``current()`` is how late it is, in seconds."""

    def __init__(self, interval: float = 0.01) -> None:
        self.interval = interval
        self.last = 0.0  # lateness of the last timer that fired
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

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._due = loop.time() + self.interval
            await asyncio.sleep(self.interval)
            self.last = max(0.0, loop.time() - self._due)

    def current(self) -> float:
        """The lag now: the last timer's lateness, or the pending timer's if it is already overdue (a loop
        that is behind right now cannot run the timer that would say so)."""
        due, loop = self._due, self._loop
        if due is None or loop is None:
            return 0.0
        return max(self.last, loop.time() - due)  # loop.time() is the monotonic clock: any thread may ask
