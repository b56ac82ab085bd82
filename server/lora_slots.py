"""The engine's LoRA adapters: host copies, device pages with LRU eviction, the rows of a forward pass.

One ``model.lora_batched.LoraBank`` per distinct U-Net (hooked into it and, for Stable Diffusion folders,
into its CLIP text encoder: the same pages serve both). An adapter a request names is

1. read and parsed on a background thread as soon as the request is admitted (``prefetch``, called from
   ``Worker.batch_key``), into host memory (pinned on CUDA) — the engine thread only waits when a request
   reaches its first step before its file has been read (counted: ``wait_seconds``);
2. copied into free device pages when a pass needs it (``begin``: a host-to-device copy, no disk);
3. evicted, least recently used first, when a pass needs pages that are taken — back to its host copy
   (still parsed, so bringing it back is a copy again). Host copies are dropped LRU past
   ``host_cache_bytes``.

The rows of one pass get (page indices, scales) per row in the bank's persistent buffers (``begin``), read
by the hooked layers inside ``bank.rows()`` — by the CUDA graph captured there, on CUDA. A pass whose
adapters need more pages than there are is run as several passes over consecutive requests (``segments``).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from model.lora import (
    LayerSpec,
    LoraAdapter,
    LoraError,
    layer_specs,
    model_family,
    parse_lora,
    read_safetensors,
)
from model.lora_batched import LoraBank
from server.loras import LoraSettings

if TYPE_CHECKING:
    from model.pipeline import Pipeline
    from server.request import ResolvedRequest

log = logging.getLogger(__name__)

Key = tuple[str, str]  # (adapter name, file sha256)
Refs = tuple[tuple[Key, float], ...]  # a request's adapters with their scales, in order


def text_encoder_module(p: Pipeline) -> torch.nn.Module | None:
    """The CLIP text model of a Stable Diffusion pipeline (LoRA-able), None for other encoders."""
    model = getattr(p.text_encoder, "model", None)
    return model if p.pipeline_class and isinstance(model, torch.nn.Module) else None


@dataclass(eq=False)
class BankState:
    """One bank and its page bookkeeping."""

    bank: LoraBank
    pipeline: Pipeline  # the first model on this U-Net (named in errors)
    specs: dict[str, dict[str, LayerSpec]]
    family: str | None
    free: list[int]
    convs: bool  # LoCon tables (3x3 convolutions) in this bank
    resident: OrderedDict[Key, list[int]] = field(default_factory=OrderedDict)  # LRU order, oldest first


@dataclass
class LoraStats:
    """Counters (monotonic) and gauges the core reports."""

    loads: int = 0  # adapters copied into device pages
    evictions: int = 0  # adapters evicted from device pages (to their host copy)
    file_reads: int = 0  # adapter files read and parsed
    rows_with_adapter: int = 0  # rows of forward passes that carried at least one adapter
    rows: int = 0  # rows of forward passes, all
    mixed_passes: int = 0  # passes whose rows carried different adapter sets (none counts as a set)
    wait_seconds: float = 0.0  # the engine thread waited for a file read (the request came before its file)
    resident: int = 0  # adapters in device pages now (all banks)
    host_bytes: int = 0  # host copies now


class LoraTextEncoder:
    """A text encoder with a fixed set of adapters applied (prompt encoding of requests naming them).

    Its identity is what the worker's prompt cache keys on, so prompts encoded with and without adapters
    never share an entry."""

    def __init__(self, base: Any, slots: LoraSlots, bs: BankState, refs: tuple[tuple[Key, float], ...]):
        self.base, self.slots, self.bs, self.refs = base, slots, bs, refs

    def __getattr__(self, name: str) -> Any:  # max_length, device, … of the base encoder
        return getattr(self.base, name)

    @contextmanager
    def _applied(self, rows: int) -> Iterator[None]:
        pages = self.slots.ensure(self.bs, [k for k, _ in self.refs])
        spec = [(pages[k], s) for k, s in self.refs]
        index, scale = self.bs.bank.row_tensors([spec] * rows, self.bs.bank.index_buf.device)
        with self.bs.bank.rows(index, scale):
            yield

    def encode_with_info(self, prompts: list[str]) -> Any:
        with self._applied(len(prompts)):
            return self.base.encode_with_info(prompts)

    def encode(self, prompts: list[str]) -> torch.Tensor:
        with self._applied(len(prompts)):
            return self.base.encode(prompts)


class LoraSlots:
    """See the module docstring. Engine thread only, except the file reads it hands to its loader thread."""

    def __init__(
        self,
        pipelines: dict[str, Pipeline],
        max_rows: int,
        root: Path,
        settings: LoraSettings | None = None,
    ) -> None:
        self.settings = s = settings or LoraSettings()
        self.root = Path(root)
        self.stats = LoraStats()
        self._banks: dict[int, BankState] = {}  # id(unet) -> its bank
        for p in pipelines.values():
            if id(p.unet) in self._banks:
                continue
            te = text_encoder_module(p)
            modules = {"unet": p.unet, "text_encoder": te}
            convs = s.convs_for(sum(q.numel() for q in p.unet.parameters()))
            bank = LoraBank(modules, s.pages + 1, s.page_rank, s.row_pages, max_rows=max_rows, convs=convs)
            specs = layer_specs(modules)
            free = list(range(1, s.pages + 1))
            self._banks[id(p.unet)] = BankState(bank, p, specs, model_family(p.unet.config), free, convs)
        self._host: OrderedDict[tuple[int, Key], LoraAdapter] = OrderedDict()  # (id(unet), key) -> adapter
        self._host_bytes = 0
        self._futures: dict[tuple[int, Key], Future[LoraAdapter]] = {}
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lora-load")
        self._encoders: OrderedDict[tuple[int, tuple[tuple[Key, float], ...]], LoraTextEncoder] = (
            OrderedDict()
        )
        self._pin = any(b.bank.index_buf.device.type == "cuda" for b in self._banks.values())

    @classmethod
    def create(
        cls, pipelines: dict[str, Pipeline], max_rows: int, root: Path | None = None
    ) -> LoraSlots | None:
        """Slots per ``LoraSettings`` (env), None when LoRA is disabled. ``root``: the adapter folder
        (default: UNET_SERVER_LORA_DIR, else ``loras/`` beside the first model folder)."""
        from server.loras import lora_dir

        settings = LoraSettings()
        if not settings.enabled:
            return None
        if root is None:
            root = lora_dir(next(iter(pipelines.values())).path.parent, settings)
        return cls(pipelines, max_rows, root, settings)

    # -- admission: read files in the background ---------------------------------------------------------

    def bank_for(self, p: Pipeline) -> BankState:
        bs = self._banks.get(id(p.unet))
        if bs is None:
            raise LoraError(f"model {p.name!r} takes no LoRA adapters")
        return bs

    def prefetch(self, p: Pipeline, req: ResolvedRequest) -> None:
        """Start reading the request's adapter files (no wait); errors surface at ``adapter``."""
        bs = self._banks.get(id(p.unet))
        if bs is None:
            return
        for ref in req.loras:
            self._future(p, bs, (ref.name, ref.sha256))

    def _future(self, p: Pipeline, bs: BankState, key: Key) -> Future[LoraAdapter] | None:
        hk = (id(p.unet), key)
        with self._lock:
            if hk in self._host:
                return None
            fut = self._futures.get(hk)
            if fut is None:
                fut = self._futures[hk] = self._executor.submit(self._read, p.name, bs, key)
        return fut

    def _read(self, model: str, bs: BankState, key: Key) -> LoraAdapter:
        """Loader thread: read, verify the digest, parse against the model, make the host copy."""
        name, sha = key
        data = (self.root / f"{name}.safetensors").read_bytes()
        if hashlib.sha256(data).hexdigest() != sha:
            raise LoraError(f"adapter {name!r} changed on disk since the request was admitted")
        tensors, meta = read_safetensors(data)
        adapter = parse_lora(tensors, bs.specs, meta, bs.family, f"model {model!r}", bs.convs)
        bs.bank.pages_for(adapter)  # fits a row and the bank's layers, or says why
        self.stats.file_reads += 1
        return bs.bank.host_copy(adapter, pin=self._pin)

    def adapter(self, p: Pipeline, key: Key) -> LoraAdapter:
        """The host copy of adapter ``key`` for ``p``'s U-Net (waits for its read if still running)."""
        bs = self.bank_for(p)
        hk = (id(p.unet), key)
        with self._lock:
            found = self._host.get(hk)
            if found is not None:
                self._host.move_to_end(hk)
                return found
        fut = self._future(p, bs, key)
        if fut is None:
            return self.adapter(p, key)
        if not fut.done():
            t0 = time.perf_counter()
            fut.exception()  # wait
            self.stats.wait_seconds += time.perf_counter() - t0
        with self._lock:
            self._futures.pop(hk, None)
        adapter = fut.result()  # raises the read's error (the request fails with it)
        with self._lock:
            self._host[hk] = adapter
            self._host_bytes += adapter.nbytes
            self._trim_host()
        return adapter

    def _trim_host(self) -> None:
        """Drop host copies (oldest first) past the byte budget; those resident in pages stay."""
        resident = {(bid, k) for bid, bs in self._banks.items() for k in bs.resident}
        for hk in list(self._host):
            if self._host_bytes <= self.settings.host_cache_bytes:
                break
            if hk in resident:
                continue
            self._host_bytes -= self._host.pop(hk).nbytes

    def resolve(self, p: Pipeline, req: ResolvedRequest) -> tuple[tuple[Key, float], ...]:
        """The request's (adapter key, scale) list, each adapter read and checked (LoraError if not)."""
        refs = tuple(((ref.name, ref.sha256), float(ref.scale)) for ref in req.loras)
        pages = 0
        bs = self.bank_for(p)
        for key, _ in refs:
            pages += bs.bank.pages_for(self.adapter(p, key))
        if pages > bs.bank.row_pages:
            budget = bs.bank.row_pages * bs.bank.page_rank
            raise LoraError(f"the request's adapters together exceed the per-row rank budget of {budget}")
        return refs

    def text_encoder(self, p: Pipeline, req: ResolvedRequest) -> Any:
        """The encoder for the request's prompts: the model's own, or one with its text-encoder adapters."""
        if not req.loras or text_encoder_module(p) is None:
            return p.text_encoder
        refs = tuple(
            ((ref.name, ref.sha256), float(ref.scale))
            for ref in req.loras
            if "text_encoder" in self.adapter(p, (ref.name, ref.sha256)).layers
        )
        if not refs:
            return p.text_encoder
        key = (id(p.unet), refs)
        enc = self._encoders.get(key)
        if enc is None:
            enc = self._encoders[key] = LoraTextEncoder(p.text_encoder, self, self.bank_for(p), refs)
        return enc

    # -- device pages ------------------------------------------------------------------------------------

    def ensure(self, bs: BankState, keys: Sequence[Key]) -> dict[Key, list[int]]:
        """Pages of each adapter in ``keys``, copying in those not resident (evicting others, LRU)."""
        out: dict[Key, list[int]] = {}
        for key in keys:
            if key in out:
                continue
            pages = bs.resident.get(key)
            if pages is not None:
                bs.resident.move_to_end(key)
                out[key] = pages
                continue
            adapter = self.adapter(bs.pipeline, key)  # its host copy (read again if it was dropped)
            need = bs.bank.pages_for(adapter)
            while len(bs.free) < need:
                victim = next((k for k in bs.resident if k not in keys), None)
                if victim is None:
                    raise LoraError(
                        f"the adapters of one pass need more than the {bs.bank.pages - 1} device pages"
                    )
                bs.free.extend(bs.resident.pop(victim))
                self.stats.evictions += 1
            pages = sorted(bs.free[:need])
            del bs.free[:need]
            bs.bank.write(pages, adapter)
            bs.resident[key] = pages
            self.stats.loads += 1
            out[key] = pages
        return out

    def segments(self, requests: Sequence[Any]) -> list[tuple[int, int]]:
        """Consecutive request ranges [i, j) whose adapters fit the pages together (one range, usually)."""
        if not requests:
            return []
        bs = self._banks.get(id(requests[0].pipeline.unet))
        if bs is None:
            return [(0, len(requests))]
        capacity = bs.bank.pages - 1
        out: list[tuple[int, int]] = []
        start, used, seen = 0, 0, set[Key]()
        for i, r in enumerate(requests):
            mine = {k for k, _ in getattr(r, "loras", ())} - seen
            need = sum(self._pages_of(bs, r.pipeline, k) for k in mine)
            if used + need > capacity and i > start:
                out.append((start, i))
                start, used, seen = i, 0, set()
                mine = {k for k, _ in getattr(r, "loras", ())}
                need = sum(self._pages_of(bs, r.pipeline, k) for k in mine)
            used += need
            seen |= mine
        out.append((start, len(requests)))
        return out

    def _pages_of(self, bs: BankState, p: Pipeline, key: Key) -> int:
        return bs.bank.pages_for(self.adapter(p, key))

    def begin(self, requests: Sequence[Any]) -> BankState | None:
        """Make the requests' adapters resident and fill the bank's row buffers for one pass over their rows
        (request order, ``r.rows`` rows each); None when no row carries an adapter (the plain model runs)."""
        rows = sum(r.rows for r in requests)
        self.stats.rows += rows
        if not any(getattr(r, "loras", ()) for r in requests):
            return None
        bs = self.bank_for(requests[0].pipeline)
        keys = [k for r in requests for k, _ in r.loras]
        pages = self.ensure(bs, keys)
        spec: list[list[tuple[list[int], float]]] = []
        for r in requests:
            row = [(pages[k], s) for k, s in r.loras]
            spec.extend([row] * r.rows)
            if r.loras:
                self.stats.rows_with_adapter += r.rows
        if len({r.loras for r in requests}) > 1:
            self.stats.mixed_passes += 1
        index, scale = bs.bank.row_tensors(spec)  # host (B, n)
        dev = bs.bank.index_buf.device
        if dev.type == "cuda":
            index, scale = index.pin_memory(), scale.pin_memory()
        bs.bank.fill(index.to(dev, non_blocking=True), scale.to(dev, non_blocking=True))
        return bs

    def banks(self) -> list[BankState]:
        return list(self._banks.values())

    def snapshot(self) -> LoraStats:
        """The stats with the gauges filled in now."""
        self.stats.resident = sum(len(bs.resident) for bs in self._banks.values())
        self.stats.host_bytes = self._host_bytes
        return LoraStats(**vars(self.stats))

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
