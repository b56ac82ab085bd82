"""The one interface between the serving side and an engine core, and its in-process transport.

``EngineClient`` is what ``server.lifecycle.RequestManager`` talks to. Two transports implement it:

- ``InprocClient`` (here): the core runs in a thread of the server process; messages go straight into the
  core's inbox and outputs come back with one ``call_soon_threadsafe`` per loop turn.
- ``server.engine_process.ProcessClient``: the core runs in a spawned child with its own GIL; messages
  and outputs are pickled over a pipe; a child that dies is replaced.

Both deliver outputs to an ``EngineSink`` on the event loop, in the order the core produced them.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from server.messages import EngineOutputs, Shutdown, Stopped, ToCore
from server.settings import Settings

if TYPE_CHECKING:
    from server.core import EngineCore
    from server.loading import LoadInfo

log = logging.getLogger(__name__)


class EngineSink(Protocol):
    """Receives what the engine reports (called on the event loop)."""

    def on_outputs(self, out: EngineOutputs) -> None: ...

    def on_lost(self, message: str, error_id: str) -> None: ...


class EngineClient(Protocol):
    """A running engine core, seen from the event loop."""

    def load(self) -> LoadInfo:
        """Load and warm the models (blocking: call it in a thread); raises ``EngineLoadError``."""
        ...

    def start(self, loop: asyncio.AbstractEventLoop, sink: EngineSink) -> None:
        """Start serving; outputs go to ``sink`` on ``loop``."""
        ...

    def send(self, message: ToCore) -> bool:
        """Hand the core a message; False when it cannot be reached (restarting, stopped)."""
        ...

    async def stop(self) -> None:
        """Tell the core to shut down (it fails what it still holds with 503) and wait for it."""
        ...

    def kill(self) -> None:
        """Stop at once (shutdown while still loading)."""
        ...

    @property
    def serving(self) -> bool:
        """Loaded, started and reachable."""
        ...

    @property
    def failure(self) -> str | None:
        """Why the engine is down for good, else None."""
        ...


class EngineLoadError(RuntimeError):
    """The engine could not load or warm the models; the message names the underlying exception."""


class InprocClient:
    """The engine core in a thread of this process (``engine_mode=thread``)."""

    def __init__(self, settings: Settings, text_encoder_loader: Callable[..., Any] | None = None) -> None:
        self.settings = settings
        self.text_encoder_loader = text_encoder_loader
        self.core: EngineCore | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sink: EngineSink | None = None

    def load(self) -> LoadInfo:
        from server.core import EngineCore
        from server.loading import load_worker

        try:
            worker, info = load_worker(self.settings, self.text_encoder_loader)
        except Exception as exc:
            raise EngineLoadError(f"{type(exc).__name__}: {exc}") from exc
        self.core = EngineCore(worker)
        return info

    def start(self, loop: asyncio.AbstractEventLoop, sink: EngineSink) -> None:
        assert self.core is not None, "load() first"
        self._loop, self._sink = loop, sink
        self._thread = threading.Thread(
            target=self.core.run, args=(self._emit,), name="unet-engine", daemon=True
        )
        self._thread.start()

    def _emit(self, out: EngineOutputs | Stopped) -> None:
        """Core thread: one event-loop callback per loop turn (each wakes the loop and costs both threads a
        GIL hand-over, so the core batches a whole turn into one)."""
        if isinstance(out, Stopped) or self._loop is None or self._sink is None:
            return
        try:
            self._loop.call_soon_threadsafe(self._sink.on_outputs, out)
        except RuntimeError:  # loop closed during shutdown
            pass

    def send(self, message: ToCore) -> bool:
        if self.core is None or not self.serving:
            return False
        self.core.put(message)
        return True

    async def stop(self) -> None:
        if self.core is None or self._thread is None:
            return
        self.core.put(Shutdown())
        await asyncio.to_thread(self._thread.join, 30.0)

    def kill(self) -> None:
        """Nothing to kill: a thread still loading finishes on its own (the process is exiting)."""

    @property
    def serving(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def failure(self) -> str | None:
        return None
