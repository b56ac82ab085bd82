"""Which devices the engine cores run on: ``UNET_SERVER_DEVICES`` resolved to one device string per engine.

Decided in the server process without importing torch or initialising CUDA (the engine processes own their
devices; a parent that initialised CUDA would hold a context on every card). Visible GPUs are counted from
``CUDA_VISIBLE_DEVICES`` when it is set, else from the NVIDIA device nodes (the same test
``server.app.use_engine_process`` makes).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from server.settings import Settings

_DEVICE = re.compile(r"^(cpu|cuda(:[0-9]+)?)$")


class DevicesError(ValueError):
    """``UNET_SERVER_DEVICES`` names something that cannot be served (the message says what)."""


def visible_gpus() -> int:
    """How many CUDA devices this process may use, without initialising CUDA."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        entries = [e.strip() for e in env.split(",") if e.strip()]
        # CUDA stops at the first invalid entry ("-1" hides every device)
        count = 0
        for entry in entries:
            if entry.startswith("-"):
                break
            count += 1
        return count
    return sum(1 for p in Path("/dev").glob("nvidia[0-9]*") if p.name[6:].isdigit())


def _base_device(settings: Settings, gpus: int) -> str:
    """The device kind engines use when ``devices`` gives only a count: "cuda" or "cpu"."""
    if settings.device == "auto":
        return "cuda" if gpus > 0 else "cpu"
    return "cuda" if settings.device.startswith("cuda") else "cpu"


def engine_devices(settings: Settings, gpus: int | None = None) -> list[str]:
    """One device string per engine core ("cuda:0", "cpu", ...), from ``settings.devices``.

    "auto": one engine per visible GPU when the device is (or resolves to) CUDA, else one on the CPU; a
    ``device`` pinned to "cuda:N" keeps that single GPU. "all": every visible GPU (an error without one).
    A count "N": N engines, over the visible GPUs round-robin on CUDA (more engines than GPUs share cards),
    or N on the CPU. A list: exactly those devices; repeats are allowed (engines sharing a device).
    """
    gpus = visible_gpus() if gpus is None else gpus
    spec = settings.devices.strip().lower()
    base = _base_device(settings, gpus)
    if spec == "auto":
        if base == "cpu":
            return ["cpu"]
        if ":" in settings.device:
            return [settings.device]
        return [f"cuda:{i}" for i in range(max(1, gpus))]
    if spec == "all":
        if gpus == 0:
            raise DevicesError("UNET_SERVER_DEVICES=all but no GPU is visible")
        return [f"cuda:{i}" for i in range(gpus)]
    if spec.isdigit():
        count = int(spec)
        if count < 1:
            raise DevicesError("UNET_SERVER_DEVICES must name at least one engine")
        if base == "cpu":
            return ["cpu"] * count
        if gpus == 0:
            raise DevicesError(f"UNET_SERVER_DEVICES={count} on CUDA but no GPU is visible")
        return [f"cuda:{i % gpus}" for i in range(count)]
    devices = [d.strip() for d in spec.split(",") if d.strip()]
    if not devices:
        raise DevicesError("UNET_SERVER_DEVICES is empty")
    for d in devices:
        if not _DEVICE.match(d):
            raise DevicesError(f"UNET_SERVER_DEVICES: {d!r} is not a device (cpu, cuda or cuda:N)")
        if d.startswith("cuda"):
            index = int(d.split(":")[1]) if ":" in d else 0
            if index >= gpus:
                raise DevicesError(f"UNET_SERVER_DEVICES: {d} does not exist ({gpus} GPU(s) visible)")
    return [d if d != "cuda" else "cuda:0" for d in devices]


def engine_settings(settings: Settings, device: str) -> Settings:
    """The settings one engine core loads with: the same, pinned to ``device``."""
    return settings.model_copy(update={"device": device})
