"""Typed messages between the serving side and the engine core, in-process or across a process boundary.

The message's type is its tag: a transport hands these objects over unchanged (a thread) or pickles them
(a pipe to the engine process). ``PROTOCOL_VERSION`` is checked at the process handshake (``Ready``), so
a server and an engine process from different code refuse to talk instead of misreading fields. No web
and no torch imports: both sides import this module.

Serving side -> core: ``AddRequest``, ``CancelRequest``, ``Shutdown``.
Core -> serving side: ``EngineOutputs`` once per engine-loop turn that has something to say, holding the
turn's events (``Started``, ``Progress``, ``Preview``, ``Sampled``, ``Finished``, ``Failed``), its
``StepStats`` and the device memory in use; ``Stopped`` last.
Engine process -> server, once at start: ``Ready`` or ``LoadFailed``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from server.request import ResolvedRequest

PROTOCOL_VERSION = 2


# -- serving side -> core -------------------------------------------------------------------------


@dataclass(frozen=True)
class AddRequest:
    """Admit a request (already validated and within the queue bound)."""

    request_id: str
    request: ResolvedRequest
    created: float  # time.monotonic() at arrival (system-wide on Linux, so valid in the engine process)
    timeout: float  # seconds from ``created``; past it the request fails with 504
    progress: bool = False  # emit Progress after every denoiser evaluation (jobs: someone may watch)
    preview_every: int = 0  # > 0: a Preview event every this many denoiser evaluations


@dataclass(frozen=True)
class CancelRequest:
    """Drop a request: it leaves before the next forward pass is planned."""

    request_id: str


@dataclass(frozen=True)
class Shutdown:
    """Stop: fail what is still admitted with 503, finish the read-backs in flight, emit ``Stopped``."""

    message: str = "server is shutting down"


# -- core -> serving side -------------------------------------------------------------------------


@dataclass(frozen=True)
class Started:
    """The request's first forward pass is about to run (it left the queue)."""

    request_id: str
    at: float  # monotonic


@dataclass(frozen=True)
class Progress:
    """The request took a denoiser evaluation (for requests that asked for progress: jobs)."""

    request_id: str
    step: int
    total_steps: int  # denoiser evaluations the request takes (Heun: about twice its steps)


@dataclass(frozen=True)
class Preview:
    """A small uint8 preview of the request's current x0 estimate, (n, h, w, C)."""

    request_id: str
    step: int
    total_steps: int
    images: Any  # numpy uint8 (n, h, w, C)


@dataclass(frozen=True)
class Sampled:
    """Sampling finished; the images are on their way to host memory (too late to cancel)."""

    request_id: str


@dataclass(frozen=True)
class Finished:
    """The request's final images, uint8 (n, H, W, C)."""

    request_id: str
    images: Any  # numpy uint8
    warnings: tuple[str, ...] = ()  # for the response, e.g. a prompt truncated to the encoder's length


@dataclass(frozen=True)
class Failed:
    """The request failed; ``status`` is the HTTP status it maps to (500 faults carry an ``error_id``)."""

    request_id: str
    status: int
    message: str
    error_id: str | None = None


Event = Started | Progress | Preview | Sampled | Finished | Failed


@dataclass(frozen=True)
class StepStats:
    """One forward pass: what the serving side's metrics and retry-after estimate are made of."""

    forward_seconds: float  # host time of the step (on CUDA: launch + the bounded run-ahead wait)
    period_seconds: float  # from the previous step's start to this one's while busy; 0 after an idle spell
    rows: int  # real rows in the pass
    padded_rows: int  # rows after padding to the batch bucket
    evaluations: tuple[tuple[str, int], ...]  # (model, rows) per model in the pass
    lora_rows: int = 0  # rows of the pass that carried at least one LoRA adapter


@dataclass
class EngineOutputs:
    """Everything one engine-loop turn has to report, sent as one message."""

    events: list[Event] = field(default_factory=list)
    steps: list[StepStats] = field(default_factory=list)
    faults: int = 0  # engine steps / read-backs that raised (their requests failed with 500)
    nonfinite: tuple[tuple[str, int], ...] = ()  # (model, requests) whose output was NaN/inf
    prompt_cache_hits: int = 0  # prompt encodings served from the cache this turn
    prompt_cache_misses: int = 0  # prompts the text encoder ran on this turn
    gpu_bytes: float | None = None  # device memory allocated, when the core measured it this turn
    lora_loads: int = 0  # LoRA adapters copied into device pages this turn
    lora_evictions: int = 0  # LoRA adapters evicted from device pages this turn
    lora_resident: int | None = None  # LoRA adapters in device pages now, when it changed this turn

    def __bool__(self) -> bool:
        counts = self.faults or self.prompt_cache_hits or self.prompt_cache_misses
        counts = counts or self.lora_loads or self.lora_evictions or self.lora_resident is not None
        return bool(self.events or self.steps or counts or self.nonfinite or self.gpu_bytes is not None)


@dataclass(frozen=True)
class Stopped:
    """The core has stopped; nothing follows."""


# -- engine process -> server, at start -----------------------------------------------------------


@dataclass(frozen=True)
class Ready:
    """The engine process loaded and warmed its models."""

    protocol_version: int
    info: Any  # server.loading.LoadInfo


@dataclass(frozen=True)
class LoadFailed:
    """The engine process could not load or warm its models; ``message`` names the exception."""

    message: str


ToCore = AddRequest | CancelRequest | Shutdown
