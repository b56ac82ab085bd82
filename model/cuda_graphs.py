"""CUDA graphs per batch bucket for a U-Net or a whole denoiser call.

A small U-Net at batch 1 is bound by kernel launches: hundreds of tiny kernels, each costing several
microseconds of CPU time to launch. A CUDA graph records the launches once and replays them with one call.
Graphs need static shapes and static addresses, so we capture one graph per batch-size *bucket*; a call
with B rows copies its inputs into the first B rows of the bucket's static buffers, replays, and returns
a view of the first B output rows. Rows never interact inside a U-Net (GroupNorm, attention and convs are
per sample), so the padding rows cannot change the real ones; the tests check exactly that.

On CPU (or with ``use_graphs=False``) the same object runs the function eagerly on the padded bucket, so
code written against it (the server's worker) exercises the same packing path everywhere.

Contract for the wrapped function ``fn(**inputs)``:
- every input is a tensor with the batch in dim 0, None, or a list/tuple/dict/dataclass of such tensors
  (e.g. ``ControlResiduals``); the output is a tensor (or such a structure) with the batch in dim 0;
- no host syncs (``.item()``, ``.cpu()``, data-dependent Python branches) and no allocation of new
  parameters inside ``fn``: it must be capturable;
- rows are independent (no batch statistics).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from model.controlnet import ControlResiduals
    from model.denoiser import Denoiser

log = logging.getLogger(__name__)

DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


def default_buckets(max_batch: int) -> tuple[int, ...]:
    """Powers of two up to ``max_batch`` (always including ``max_batch`` itself)."""
    out, b = [], 1
    while b < max_batch:
        out.append(b)
        b *= 2
    out.append(max_batch)
    return tuple(out)


# --- a tiny pytree: tensors, None, list/tuple/dict/dataclass -------------------------------------------


def _flatten(value: Any) -> tuple[list[torch.Tensor], Any]:
    """Split a nested value into its tensors and a hashable structure description."""
    if value is None:
        return [], None
    if isinstance(value, torch.Tensor):
        # The structure keeps the per-row shape (a different one needs its own graph) but not the dtype:
        # inputs are cast into the static buffers' dtype, fixed by the example given to warmup().
        return [value], ("T", tuple(value.shape[1:]))
    if isinstance(value, (list, tuple)):
        leaves, specs = [], []
        for v in value:
            lv, sv = _flatten(v)
            leaves += lv
            specs.append(sv)
        return leaves, (type(value), tuple(specs))
    if isinstance(value, dict):
        keys = tuple(sorted(value))
        leaves, specs = [], []
        for k in keys:
            lv, sv = _flatten(value[k])
            leaves += lv
            specs.append(sv)
        return leaves, (dict, keys, tuple(specs))
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        names = tuple(f.name for f in dataclasses.fields(value))
        leaves, spec = _flatten([getattr(value, n) for n in names])
        return leaves, (type(value), names, spec)
    raise TypeError(f"cannot pass {type(value).__name__} through a graphed call (tensors, None, containers)")


def _unflatten(leaves: Iterable[torch.Tensor], spec: Any) -> Any:
    it = iter(leaves)

    def build(s: Any) -> Any:
        if s is None:
            return None
        if s[0] == "T":
            return next(it)
        if s[0] is dict:
            return {k: build(sub) for k, sub in zip(s[1], s[2], strict=True)}
        if s[0] in (list, tuple):
            items = [build(sub) for sub in s[1]]
            return s[0](items)
        cls, names, sub = s
        return cls(**dict(zip(names, build(sub), strict=True)))

    return build(spec)


# --- one captured (or eager) program per bucket ---------------------------------------------------------


class _Bucket:
    """Static input slices, and (on CUDA) the captured graph with its static output, for one batch size."""

    def __init__(self, size: int, inputs: list[torch.Tensor]):
        self.size = size
        self.inputs = inputs  # views of the shared max-bucket buffers, first `size` rows
        self.graph: torch.cuda.CUDAGraph | None = None
        self.outputs: list[torch.Tensor] = []
        self.out_spec: Any = None


class _Signature:
    """Everything captured for one input structure (which inputs are present, their per-row shapes)."""

    def __init__(self, spec: Any, buffers: list[torch.Tensor]):
        self.spec = spec  # structure of the keyword inputs (see _flatten)
        self.buffers = buffers  # one (max_bucket, ...) tensor per input leaf
        self.buckets: dict[int, _Bucket] = {}


class GraphedCallable:
    """Run ``fn(**inputs)`` through per-bucket CUDA graphs (eager on CPU), padding rows up to the bucket.

    >>> g = GraphedCallable(lambda x, t: unet(x, t), buckets=(1, 2, 4, 8), device="cuda")
    >>> g.warmup(x=torch.randn(1, 4, 64, 64, device="cuda"), t=torch.ones(1, device="cuda"))
    >>> out = g(x=x, t=t)   # x (B, 4, 64, 64) with B <= 8 -> out (B, 4, 64, 64)

    The returned tensor is a view into static memory: it stays valid only until the next call of this
    object (any bucket). Copy or ``.clone()`` it if you keep it longer (``clone_outputs=True`` does that).
    """

    def __init__(
        self,
        fn: Callable[..., Any],
        buckets: Sequence[int] = DEFAULT_BUCKETS,
        device: torch.device | str | None = None,
        use_graphs: bool | None = None,
        warmup_iters: int = 2,
        clone_outputs: bool = False,
    ):
        self.fn = fn
        self.buckets = tuple(sorted(set(int(b) for b in buckets)))
        if not self.buckets or self.buckets[0] < 1:
            raise ValueError(f"buckets must be positive batch sizes, got {buckets!r}")
        self.device = torch.device(device) if device is not None else None
        self._use_graphs = use_graphs
        self.warmup_iters = warmup_iters
        self.clone_outputs = clone_outputs
        self._signatures: dict[Any, _Signature] = {}
        # one private memory pool shared by every graph of this object
        self._pool: torch.cuda._POOL_HANDLE | None = None

    @property
    def max_batch(self) -> int:
        return self.buckets[-1]

    def bucket_for(self, rows: int) -> int:
        """The smallest bucket holding ``rows`` rows."""
        for b in self.buckets:
            if b >= rows:
                return b
        raise ValueError(f"{rows} rows exceed the largest bucket ({self.max_batch}); split the batch")

    def uses_graphs(self, device: torch.device) -> bool:
        if self._use_graphs is not None:
            return self._use_graphs and device.type == "cuda"
        return device.type == "cuda"

    # -- public API --

    @torch.no_grad()
    def warmup(self, buckets: Iterable[int] | None = None, **example: Any) -> None:
        """Build (and on CUDA capture) every bucket for the structure of ``example``, largest first.

        ``example`` holds the same keyword inputs as a call, with any batch size >= 1, on the target
        device and in the dtypes the function wants (later inputs are cast to them); its rows are repeated
        to fill the static buffers so that padding rows always hold valid, finite inputs.
        """
        sig = self._signature(*_flatten(example))
        for size in sorted(buckets or self.buckets, reverse=True):
            self._bucket(sig, size)

    @torch.no_grad()
    def __call__(self, **inputs: Any) -> Any:
        """Run on B rows (B = dim 0 of the tensor inputs); returns the first B output rows."""
        leaves, spec = _flatten(inputs)
        if not leaves:
            raise ValueError("a graphed call needs at least one tensor input")
        rows = leaves[0].shape[0]
        if any(t.shape[0] != rows for t in leaves):
            raise ValueError(f"all inputs need the same number of rows; got {[t.shape[0] for t in leaves]}")
        sig = self._signature(leaves, spec)
        size = self.bucket_for(rows)
        if size not in sig.buckets and self.uses_graphs(sig.buffers[0].device):
            log.warning("capturing a CUDA graph for bucket %d on first use; call warmup() first", size)
        bucket = self._bucket(sig, size)
        for static, value in zip(bucket.inputs, leaves, strict=True):
            static[:rows].copy_(value)  # padding rows keep earlier (finite) contents: rows never mix
        if bucket.graph is not None:
            bucket.graph.replay()
            outputs = bucket.outputs
        else:
            # Eager: copy into static outputs too, so a caller that keeps a result across calls breaks on
            # CPU exactly as it would on CUDA (where the next replay overwrites it).
            fresh, bucket.out_spec = _flatten(self.fn(**_unflatten(bucket.inputs, sig.spec)))
            if len(bucket.outputs) != len(fresh):
                bucket.outputs = [o.clone() for o in fresh]
            else:
                for static, o in zip(bucket.outputs, fresh, strict=True):
                    static.copy_(o)
            outputs = bucket.outputs
        result = [o[:rows] for o in outputs]
        if self.clone_outputs:
            result = [o.clone() for o in result]
        return _unflatten(result, bucket.out_spec)

    def captured(self) -> list[int]:
        """Bucket sizes that hold a captured CUDA graph (any structure)."""
        return sorted({b.size for s in self._signatures.values() for b in s.buckets.values() if b.graph})

    # -- internals --

    def _signature(self, leaves: list[torch.Tensor], spec: Any) -> _Signature:
        if not leaves:
            raise ValueError("a graphed call needs at least one tensor input")
        device = self.device or leaves[0].device
        key = (spec, device)
        sig = self._signatures.get(key)
        if sig is None:
            # Static buffers sized for the largest bucket; smaller buckets use their first rows. The
            # example rows are tiled so that padding rows hold valid inputs from the start.
            buffers = []
            for t in leaves:
                reps = -(-self.max_batch // t.shape[0])
                tiled = t.to(device).repeat(reps, *([1] * (t.dim() - 1)))[: self.max_batch]
                buffers.append(tiled.contiguous(memory_format=_memory_format(t)))
            sig = self._signatures[key] = _Signature(spec, buffers)
        return sig

    def _bucket(self, sig: _Signature, size: int) -> _Bucket:
        bucket = sig.buckets.get(size)
        if bucket is not None:
            return bucket
        bucket = _Bucket(size, [buf[:size] for buf in sig.buffers])
        device = sig.buffers[0].device
        kwargs = _unflatten(bucket.inputs, sig.spec)
        if self.uses_graphs(device):
            self._capture(bucket, kwargs, device)
        else:
            _, bucket.out_spec = _flatten(self.fn(**kwargs))
        sig.buckets[size] = bucket
        return bucket

    def _capture(self, bucket: _Bucket, kwargs: dict[str, Any], device: torch.device) -> None:
        # Warm up on a side stream (cuDNN/cuBLAS handles, autotuning, lazy init) before recording.
        with torch.cuda.device(device):
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(self.warmup_iters):
                    self.fn(**kwargs)
            torch.cuda.current_stream().wait_stream(stream)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            # thread_local: other threads (e.g. PNG encoding) may touch CUDA while we capture.
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                out = self.fn(**kwargs)
            bucket.outputs, bucket.out_spec = _flatten(out)
            bucket.graph = graph
        log.debug("captured CUDA graph for bucket %d", bucket.size)


def _memory_format(t: torch.Tensor) -> torch.memory_format:
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


class GraphedUNet(GraphedCallable):
    """A U-Net behind per-bucket CUDA graphs, with the U-Net's own call signature.

    ``unet(x, t, class_labels=None, context=None, control=None, added_cond=None)`` as in model.unet.UNet.
    ``control`` is a ``ControlResiduals`` (or None); with and without control are separate graphs (captured
    on first use or by ``warmup``). ``added_cond`` (SDXL) is a dict of (B, ...) tensors, padded like x.
    """

    def __init__(self, unet: torch.nn.Module, buckets: Sequence[int] = DEFAULT_BUCKETS, **kwargs: Any):
        self.unet = unet
        kwargs.setdefault("device", _module_device(unet))
        super().__init__(self._forward, buckets, **kwargs)

    # The attributes callers such as model.denoiser.Denoiser read off a U-Net.
    @property
    def dtype(self) -> torch.dtype:
        return getattr(self.unet, "dtype", next(self.unet.parameters()).dtype)

    @property
    def config(self) -> Any:
        return getattr(self.unet, "config", None)

    def _forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        control: ControlResiduals | None = None,
        added_cond: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        extra = {} if added_cond is None else {"added_cond": added_cond}  # plain U-Nets never see the key
        return self.unet(x, t, class_labels=class_labels, context=context, control=control, **extra)

    # The U-Net's own signature instead of GraphedCallable's **inputs: a deliberate narrowing.
    def __call__(  # type: ignore[override]
        self,
        x: torch.Tensor,
        t: torch.Tensor | float,
        class_labels: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        control: ControlResiduals | None = None,
        added_cond: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """x (B, C, H, W), t (B,) -> (B, C, H, W); a view valid until the next call (see class docs)."""
        if not torch.is_tensor(t) or t.dim() == 0:
            t = torch.as_tensor(t, device=x.device, dtype=torch.float32).expand(x.shape[0])
        return super().__call__(
            x=x, t=t, class_labels=class_labels, context=context, control=control, added_cond=added_cond
        )

    def warmup(self, buckets: Iterable[int] | None = None, **example: Any) -> None:
        example = {k: v for k, v in example.items() if v is not None}
        defaults = {"class_labels": None, "context": None, "control": None, "added_cond": None}
        super().warmup(buckets, **{**defaults, **example})


def _module_device(module: torch.nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


class GraphedDenoiser(GraphedCallable):
    """A ``model.denoiser.Denoiser`` call (σ→t, c_in, ControlNet, U-Net, x0 conversion) behind graphs.

    Same call as ``Denoiser.__call__``, so the worker can swap it in. Differences, all for static shapes
    and no host syncs:
    - ``control_mask`` is folded into ``control_scale`` (rows outside the mask get scale 0, i.e. exactly
      zero residuals) instead of running the ControlNet on a subset of rows;
    - with and without control are separate graphs (warm both up if both occur);
    - outputs are cloned by default: a sampler keeps the x0 estimate of a step (DPM++2M's history), so a
      view into the static output would be overwritten by the next replay.
    """

    def __init__(self, denoiser: Denoiser, buckets: Sequence[int] = DEFAULT_BUCKETS, **kwargs: Any):
        self.denoiser = denoiser
        kwargs.setdefault("device", _module_device(denoiser.unet) if hasattr(denoiser, "unet") else None)
        kwargs.setdefault("clone_outputs", True)
        super().__init__(self._forward, buckets, **kwargs)

    def _forward(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        control_cond: torch.Tensor | None = None,
        control_scale: torch.Tensor | None = None,
        added_cond: dict[str, torch.Tensor] | None = None,
        x_concat: torch.Tensor | None = None,
    ) -> torch.Tensor:
        extra: dict[str, Any] = {} if added_cond is None else {"added_cond": added_cond}  # SDXL only
        if x_concat is not None:
            extra["x_concat"] = x_concat  # inpainting U-Nets only
        return self.denoiser(
            x,
            sigma,
            class_labels=class_labels,
            context=context,
            control_cond=control_cond,
            control_scale=control_scale,
            **extra,
        )

    @staticmethod
    def _canonical(
        x: torch.Tensor,
        sigma: torch.Tensor | Sequence[float],
        control_cond: torch.Tensor | None,
        control_scale: torch.Tensor | float | None,
        control_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """sigma as a (B,) tensor; control_scale (B,) with the mask folded in (None without control)."""
        rows = x.shape[0]
        if not torch.is_tensor(sigma):
            sigma = torch.tensor(list(sigma), dtype=torch.float64)
        if sigma.dim() == 0:
            sigma = sigma.expand(rows)
        if control_cond is None:
            return sigma, None
        if control_scale is None:
            control_scale = 1.0
        if not torch.is_tensor(control_scale) or control_scale.dim() == 0:
            control_scale = torch.as_tensor(control_scale, dtype=torch.float32, device=x.device).expand(rows)
        if control_mask is not None:
            mask = control_mask.to(device=control_scale.device, dtype=control_scale.dtype)
            # (B,) or, for a MultiControlNet's (B, K) scales, (B, 1): a masked-out row is off for every net
            control_scale = control_scale * mask.reshape(-1, *([1] * (control_scale.dim() - 1)))
        return sigma, control_scale

    # Denoiser.__call__'s signature instead of GraphedCallable's **inputs: a deliberate narrowing.
    def __call__(  # type: ignore[override]
        self,
        x: torch.Tensor,
        sigma: torch.Tensor | Sequence[float],
        class_labels: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        control_cond: torch.Tensor | None = None,
        control_scale: torch.Tensor | float | None = None,
        control_mask: torch.Tensor | None = None,
        added_cond: dict[str, torch.Tensor] | None = None,
        x_concat: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, C, H, W), sigma (B,) -> x0 (B, C, H, W) fp32, B <= the largest bucket. added_cond (SDXL):
        {"text_embeds": (B, P), "time_ids": (B, 6)}, padded into static buffers like every other input;
        x_concat (B, C', H, W): an inpainting U-Net's extra input channels (see Denoiser)."""
        sigma, control_scale = self._canonical(x, sigma, control_cond, control_scale, control_mask)
        return super().__call__(
            x=x,
            sigma=sigma,
            class_labels=class_labels,
            context=context,
            control_cond=control_cond,
            control_scale=control_scale,
            added_cond=added_cond,
            x_concat=x_concat,
        )

    # The call's named inputs instead of GraphedCallable's **example: a deliberate narrowing.
    def warmup(  # type: ignore[override]
        self,
        buckets: Iterable[int] | None = None,
        *,
        x: torch.Tensor,
        sigma: torch.Tensor | Sequence[float],
        class_labels: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        control_cond: torch.Tensor | None = None,
        control_scale: torch.Tensor | float | None = None,
        control_mask: torch.Tensor | None = None,
        added_cond: dict[str, torch.Tensor] | None = None,
        x_concat: torch.Tensor | None = None,
    ) -> None:
        """Capture every bucket for this input structure (x fp32 and sigma float64 fix the buffer dtypes)."""
        sigma, control_scale = self._canonical(x, sigma, control_cond, control_scale, control_mask)
        super().warmup(
            buckets,
            x=x,
            sigma=sigma,
            class_labels=class_labels,
            context=context,
            control_cond=control_cond,
            control_scale=control_scale,
            added_cond=added_cond,
            x_concat=x_concat,
        )
