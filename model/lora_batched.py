"""Many LoRA adapters in one forward pass: base layer once for all rows, plus each row's low-rank terms.

This is Punica's / S-LoRA's batched gather-matmul (Chen et al. 2023, Sheng et al. 2023) with static shapes,
so that CUDA graphs capture it unchanged. Adapter weights live in fixed *pages* of ``page_rank`` rank
columns (S-LoRA's unified paging): per adapted layer, down weights ``A (pages, page_rank, in·kh·kw)`` and
scaled, transposed up weights ``Bt (pages, page_rank, out)``. Page 0 is all zeros. An adapter of rank r
takes ceil(r / page_rank) pages. A forward pass gets, per row, ``row_pages`` page indices ``index (B, n)``
(the pages of each of its adapters, then page 0) and a user scale per page ``scale (B, n)``. For a linear
layer, with x (B, L, in)::

    h = bmm(x, A[index].view(B, n·c, in)ᵀ) · scale     # (B, L, n·c)
    y = base(x) + bmm(h, Bt[index].view(B, n·c, out))  # (B, L, out)

A convolution gathers its down kernels the same way and runs them as one grouped convolution (groups = B),
then the 1x1 up projection as a bmm. Several adapters on one row are simply more pages in its index row.

The bank hooks the layers (forward hooks: module names and state_dict keys stay as they were). Inside
``bank.rows()`` the hooks add the low-rank terms; outside it they return the base output untouched, so a
batch without adapters runs the plain model (and, on CUDA, its own graph). Rows with no adapter point
at page 0 only: their gathered weights are zeros (no other per-row work; the bmm is batched over all rows).
``write`` copies an adapter into pages with ``index_copy_`` (same addresses: captured graphs stay valid).
The per-row index and scale live in persistent buffers (``index_buf``, ``scale_buf``) that the caller
fills (``fill``, a copy_) before each pass; a graph captured inside ``bank.rows()`` reads them on replay.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from model.lora import LoraAdapter, LoraError, adaptable_layers

Tensor = torch.Tensor

_BANK_ATTR = "_lora_bank"


@dataclass(eq=False)
class _Table:
    """One hooked layer's pages."""

    component: str
    name: str
    layer: nn.Module
    a: Tensor  # (pages, c, in·kh·kw)
    bt: Tensor  # (pages, c, out)
    conv: bool  # a convolution with a kernel > 1x1 (or strided): grouped convolution
    pointwise: bool = False  # a 1x1, stride-1 convolution: per-pixel linear, bmm over (B, C, H·W)


class LoraBank:
    """Page tables and hooks over the adaptable layers of a model's components.

    Args:
        modules: component -> module, e.g. ``{"unet": unet, "text_encoder": clip_text_model}``.
        pages: pages per layer, page 0 (the zero page) included.
        page_rank: rank columns per page (c).
        row_pages: pages one row may use (n): the rank budget of a row is n·c, over all its adapters.
        max_rows: rows of the persistent index/scale buffers (the largest batch bucket).
        convs: also adapt the U-Net's convolutions with kernels > 1x1 (LoCon); their pages cost in·kh·kw per
            rank column. 1x1 convolutions (SD 1.x attention projections) are always adapted, as linears.
        device, dtype: where the tables live (default: each module's own).
    """

    def __init__(
        self,
        modules: Mapping[str, nn.Module | None],
        pages: int,
        page_rank: int,
        row_pages: int,
        max_rows: int = 64,
        convs: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if pages < 2 or page_rank < 1 or row_pages < 1:
            raise ValueError(
                "a bank needs pages >= 2 (page 0 is the zero page), page_rank >= 1, row_pages >= 1"
            )
        self.pages, self.page_rank, self.row_pages = pages, page_rank, row_pages
        self.tables: dict[tuple[str, str], _Table] = {}
        # Hooks are registered only inside rows(): a hooked module takes nn.Module's slow call path, which on
        # small U-Nets costs more than the pass itself (measured: +68% CPU time on the shipped models' passes
        # without adapters), and passes without adapters run outside rows(). A graph captured inside rows()
        # replays the adapters' kernels without any Python.
        self._hooks: list[tuple[nn.Module, Any]] = []
        self._handles: list[Any] = []
        self._depth = 0
        self._index: Tensor | None = None  # (>= B, n) long, set inside rows()
        self._scale: Tensor | None = None  # (>= B, n·c) in the layer dtype
        self.device = torch.device(device) if device is not None else None
        self.max_rows = max_rows
        for comp, module in modules.items():
            if module is None:
                continue
            p = next(module.parameters())
            dev, dt = self.device or p.device, dtype or p.dtype
            for name, layer in adaptable_layers(module, comp).items():
                conv = isinstance(layer, nn.Conv2d)
                pointwise = isinstance(layer, nn.Conv2d) and _pointwise(layer)
                if conv and not pointwise and not convs:
                    continue
                w = layer.weight
                assert isinstance(w, torch.Tensor)
                fan_in = w[0].numel()  # in (linear) or in·kh·kw (conv)
                a = torch.zeros(pages, page_rank, fan_in, device=dev, dtype=dt)
                bt = torch.zeros(pages, page_rank, w.shape[0], device=dev, dtype=dt)
                table = _Table(comp, name, layer, a, bt, conv and not pointwise, pointwise)
                self.tables[(comp, name)] = table
                self._hooks.append((layer, self._hook(table)))
            setattr(module, _BANK_ATTR, self)
        first = next(iter(self.tables.values()), None)
        dev0 = first.a.device if first is not None else (self.device or torch.device("cpu"))
        self.dtype = first.a.dtype if first is not None else (dtype or torch.float32)
        # The persistent per-row inputs a captured graph reads (``fill`` copies each pass's rows in).
        self.index_buf = torch.zeros(max_rows, row_pages, dtype=torch.long, device=dev0)  # (max_rows, n)
        self.scale_buf = torch.zeros(max_rows, row_pages * page_rank, dtype=self.dtype, device=dev0)

    # -- adapters in and out of pages --------------------------------------------------------------

    def pages_for(self, adapter: LoraAdapter) -> int:
        """Pages ``adapter`` takes (ceil(rank / page_rank)); LoraError when it does not fit a row or a
        layer it adapts is not in this bank."""
        need = -(-adapter.rank // self.page_rank)
        if need > self.row_pages:
            raise LoraError(
                f"rank {adapter.rank} exceeds the per-row rank budget {self.row_pages * self.page_rank}"
            )
        missing = [
            f"{c}.{n}" for c, layers in adapter.layers.items() for n in layers if (c, n) not in self.tables
        ]
        if missing:
            raise LoraError(
                "layers not covered by this server's LoRA tables (convolutions need LoCon enabled): "
                f"{', '.join(missing[:5])}{' …' if len(missing) > 5 else ''}"
            )
        return need

    @torch.no_grad()
    def write(self, pages: Sequence[int], adapter: LoraAdapter) -> None:
        """Copy ``adapter`` into ``pages`` (len = ``pages_for(adapter)``) of every table; layers it does not
        adapt get zeros there. Host tensors may be pinned: the copies do not block the host."""
        if 0 in pages:
            raise ValueError("page 0 is the zero page")
        k, c = len(pages), self.page_rank
        width = k * c
        for (comp, name), t in self.tables.items():
            idx = torch.tensor(list(pages), device=t.a.device)
            layer = adapter.layers.get(comp, {}).get(name)
            if layer is None:
                t.a.index_fill_(0, idx, 0.0)
                t.bt.index_fill_(0, idx, 0.0)
                continue
            r = layer.rank
            down = layer.down.reshape(r, -1)  # (r, in·kh·kw)
            up_t = (layer.up * layer.scale).t()  # (r, out): alpha/r folded into the up weights
            a = down.new_zeros(width, down.shape[1])
            a[:r] = down
            b = up_t.new_zeros(width, up_t.shape[1])
            b[:r] = up_t
            t.a.index_copy_(0, idx, a.view(k, c, -1).to(t.a.device, t.a.dtype, non_blocking=True))
            t.bt.index_copy_(0, idx, b.view(k, c, -1).to(t.bt.device, t.bt.dtype, non_blocking=True))

    def host_copy(self, adapter: LoraAdapter, pin: bool) -> LoraAdapter:
        """The adapter's tensors in this bank's dtype on the host (pinned when ``pin``), for fast
        ``write``s."""
        dtype = next(iter(self.tables.values())).a.dtype if self.tables else torch.float32
        layers: dict[str, dict[str, Any]] = {}
        for comp, ls in adapter.layers.items():
            for name, ly in ls.items():
                down, up = ly.down.to(dtype), ly.up.to(torch.float32)
                if pin:
                    down = down.pin_memory()
                layers.setdefault(comp, {})[name] = type(ly)(down, up, ly.scale)
        return LoraAdapter(layers, adapter.format, adapter.metadata)

    # -- per-row application -----------------------------------------------------------------------

    @torch.no_grad()
    def fill(self, index: Tensor, scale: Tensor) -> None:
        """Copy one pass's rows into the persistent buffers (rows past B get page 0, scale 0).
        index (B, n) long, scale (B, n) per page."""
        b = index.shape[0]
        if b > self.max_rows or index.shape != scale.shape or index.shape[1] != self.row_pages:
            raise ValueError(f"index and scale must both be (B <= {self.max_rows}, {self.row_pages})")
        self.index_buf[:b].copy_(index, non_blocking=True)
        self.index_buf[b:].zero_()
        self.scale_buf[:b].copy_(scale.repeat_interleave(self.page_rank, dim=1), non_blocking=True)
        self.scale_buf[b:].zero_()

    @contextmanager
    def rows(self, index: Tensor | None = None, scale: Tensor | None = None) -> Iterator[None]:
        """Within: hooked layers add each row's adapters, row i of a call reading index row i.

        No arguments: the persistent buffers ``fill`` writes (what CUDA graphs capture). Or explicit
        index (B, n) long page indices and scale (B, n) per page (eager calls, e.g. prompt encoding)."""
        if index is None:
            index, cols = self.index_buf, self.scale_buf
        else:
            if scale is None or index.shape != scale.shape or index.shape[1] != self.row_pages:
                raise ValueError(f"index and scale must both be (B, {self.row_pages})")
            cols = scale.to(self.dtype).repeat_interleave(self.page_rank, dim=1)  # (B, n·c)
        prev = self._index, self._scale
        self._index, self._scale = index, cols
        if self._depth == 0:
            self._handles = [layer.register_forward_hook(hook) for layer, hook in self._hooks]
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            if self._depth == 0:
                for h in self._handles:
                    h.remove()
                self._handles.clear()
            self._index, self._scale = prev

    def row_tensors(
        self, rows: Sequence[Sequence[tuple[Sequence[int], float]]], device: torch.device | str | None = None
    ) -> tuple[Tensor, Tensor]:
        """Host lists -> (index (B, n) long, scale (B, n) fp32): per row its adapters' (pages, scale)."""
        n = self.row_pages
        index = torch.zeros(len(rows), n, dtype=torch.long)
        scale = torch.zeros(len(rows), n, dtype=torch.float32)
        for i, adapters in enumerate(rows):
            j = 0
            for pages, s in adapters:
                if j + len(pages) > n:
                    raise LoraError(
                        f"adapters of one request need more than {n * self.page_rank} rank columns"
                    )
                index[i, j : j + len(pages)] = torch.tensor(list(pages), dtype=torch.long)
                scale[i, j : j + len(pages)] = float(s)
                j += len(pages)
        return index.to(device or "cpu"), scale.to(device or "cpu")

    def _hook(self, t: _Table) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], out: Tensor) -> Tensor:
            index, scale = self._index, self._scale
            if index is None or scale is None:
                return out
            x = args[0]
            b = x.shape[0]
            index, scale = index[:b], scale[:b]  # views: static addresses under graph capture
            if t.conv:
                return out + _conv_delta(module, x, t, index, scale)  # type: ignore[arg-type]
            if t.pointwise:
                return out + _pointwise_delta(x, t, index, scale)
            return _linear_plus_delta(out, x, t, index, scale)

        return hook

    def remove(self) -> None:
        """Unhook every layer for good (the model is as before; rows() adds nothing any more)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._hooks.clear()


def _linear_plus_delta(out: Tensor, x: Tensor, t: _Table, index: Tensor, scale: Tensor) -> Tensor:
    """``out`` + each row's low-rank term. The up projection accumulates onto ``out`` in the GEMM itself
    (baddbmm), so no full-size delta is written and read back."""
    b = index.shape[0]
    xf = x.reshape(b, -1, x.shape[-1])  # (B, L, in)
    a = t.a[index].flatten(1, 2)  # (B, n·c, in)
    h = torch.bmm(xf, a.transpose(1, 2)) * scale[:, None, :]  # (B, L, n·c)
    y = torch.baddbmm(out.reshape(b, -1, out.shape[-1]), h, t.bt[index].flatten(1, 2))  # (B, L, out)
    return y.reshape(out.shape)


def _pointwise(layer: nn.Conv2d) -> bool:
    unit = tuple(layer.kernel_size) == (1, 1) and tuple(layer.stride) == (1, 1)
    return unit and layer.padding in ((0, 0), 0)


def _pointwise_delta(x: Tensor, t: _Table, index: Tensor, scale: Tensor) -> Tensor:
    b, cin, h, w = x.shape
    xf = x.reshape(b, cin, h * w)  # (B, in, HW)
    h_ = torch.bmm(t.a[index].flatten(1, 2), xf) * scale[:, :, None]  # (B, n·c, HW)
    delta = torch.bmm(t.bt[index].flatten(1, 2).transpose(1, 2), h_)  # (B, out, HW)
    return delta.view(b, -1, h, w)


def _conv_delta(layer: nn.Conv2d, x: Tensor, t: _Table, index: Tensor, scale: Tensor) -> Tensor:
    b, cin = x.shape[:2]
    a = t.a[index].flatten(0, 2).view(-1, cin, *layer.kernel_size)  # (B·n·c, in, kh, kw)
    h = F.conv2d(
        x.reshape(1, b * cin, *x.shape[2:]), a, None, layer.stride, layer.padding, layer.dilation, groups=b
    )  # (1, B·n·c, H', W')
    hw = h.shape[2:]
    h = h.view(b, -1, hw[0] * hw[1]) * scale[:, :, None]  # (B, n·c, H'W')
    delta = torch.bmm(t.bt[index].flatten(1, 2).transpose(1, 2), h)  # (B, out, H'W')
    return delta.view(b, -1, *hw)


def bank_of(module: Any) -> LoraBank | None:
    """The bank hooked into ``module`` (a U-Net or text encoder; a compiled wrapper forwards), if any."""
    return getattr(module, _BANK_ATTR, None)
