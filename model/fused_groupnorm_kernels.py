# mypy: disable-error-code="no-untyped-def"
# (Triton types a kernel's arguments when it compiles it: pointers, ints, constexprs)
"""The Triton kernels of model.fused_groupnorm (imported only when they run: this module imports triton).

Layout-generic: a tensor element (row, pixel, channel) is at row * sb + pixel * sp + channel * sc, so one
kernel serves channels_last (sc = 1, coalesced along channels) and contiguous NCHW inputs.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def partial_stats(
    x_ptr, t_ptr, mean_ptr, m2_ptr, hw, c, sb, sp, sc, chunk, n_chunks,
    HAS_ADD: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """Per channel of this block, over pixels [s * chunk, (s + 1) * chunk): mean and M2."""
    row, s, cb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    cs = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cs < c
    if HAS_ADD:
        t = tl.load(t_ptr + row * c + cs, mask=cmask, other=0.0)
    n = tl.zeros([BLOCK_C], dtype=tl.float32)
    mean = tl.zeros([BLOCK_C], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    start = s * chunk
    for p0 in range(start, start + chunk, BLOCK_HW):
        ps = p0 + tl.arange(0, BLOCK_HW)
        pmask = ps < hw
        mask = pmask[:, None] & cmask[None, :]
        offs = row * sb + ps[:, None] * sp + cs[None, :] * sc
        v = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)  # (BLOCK_HW, BLOCK_C)
        if HAS_ADD:
            v = v + t[None, :]
        k = tl.sum(pmask.to(tl.float32), axis=0)  # pixels in this tile (same for every channel)
        tile_mean = tl.sum(tl.where(mask, v, 0.0), axis=0) / tl.maximum(k, 1.0)
        d = tl.where(mask, v - tile_mean[None, :], 0.0)
        tile_m2 = tl.sum(d * d, axis=0)
        # Chan et al.: combine (n, mean, m2) with the tile's (k, tile_mean, tile_m2)
        total = n + k
        delta = tile_mean - mean
        frac = tl.where(total > 0, k / tl.maximum(total, 1.0), 0.0)
        mean = mean + delta * frac
        m2 = m2 + tile_m2 + delta * delta * n * frac
        n = total
    out = (row * n_chunks + s) * c + cs
    tl.store(mean_ptr + out, mean, mask=cmask)
    tl.store(m2_ptr + out, m2, mask=cmask)


@triton.jit
def group_stats(
    mean_ptr, m2_ptr, gmean_ptr, grstd_ptr, hw, c, cg, chunk, n_chunks, eps,
    BLOCK_S: tl.constexpr, BLOCK_CG: tl.constexpr,
):  # fmt: skip
    """Per (row, group): the partials of its channels and chunks combined -> mean, 1/sqrt(var + eps)."""
    row, g = tl.program_id(0), tl.program_id(1)
    ss = tl.arange(0, BLOCK_S)
    js = tl.arange(0, BLOCK_CG)
    mask = (ss < n_chunks)[:, None] & (js < cg)[None, :]
    offs = (row * n_chunks + ss[:, None]) * c + g * cg + js[None, :]
    means = tl.load(mean_ptr + offs, mask=mask, other=0.0)
    m2s = tl.load(m2_ptr + offs, mask=mask, other=0.0)
    counts = tl.minimum(hw - ss * chunk, chunk).to(tl.float32)  # pixels in each chunk
    w = tl.where(mask, counts[:, None], 0.0)
    total = tl.sum(tl.sum(w, axis=1), axis=0)
    mean = tl.sum(tl.sum(w * means, axis=1), axis=0) / total
    d = tl.where(mask, means - mean, 0.0)
    m2 = tl.sum(tl.sum(m2s + w * d * d, axis=1), axis=0)
    tl.store(gmean_ptr + row * tl.num_programs(1) + g, mean)
    tl.store(grstd_ptr + row * tl.num_programs(1) + g, 1.0 / tl.sqrt(m2 / total + eps))


@triton.jit
def apply(
    x_ptr, t_ptr, y_ptr, gmean_ptr, grstd_ptr, w_ptr, b_ptr, hw, c, cg, sb, sp, sc,
    HAS_ADD: tl.constexpr, SILU: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """y = (x + t - mean) * rstd * weight + bias, then SiLU, over one (pixels x channels) tile."""
    row, pb, cb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    ps = pb * BLOCK_HW + tl.arange(0, BLOCK_HW)
    cs = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cs < c
    mask = (ps < hw)[:, None] & cmask[None, :]
    groups = c // cg
    gs = cs // cg
    mean = tl.load(gmean_ptr + row * groups + gs, mask=cmask, other=0.0)
    rstd = tl.load(grstd_ptr + row * groups + gs, mask=cmask, other=0.0)
    scale = rstd * tl.load(w_ptr + cs, mask=cmask, other=0.0)
    shift = tl.load(b_ptr + cs, mask=cmask, other=0.0) - mean * scale
    if HAS_ADD:
        shift = shift + tl.load(t_ptr + row * c + cs, mask=cmask, other=0.0) * scale
    offs = row * sb + ps[:, None] * sp + cs[None, :] * sc
    v = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = v * scale[None, :] + shift[None, :]
    if SILU:
        y = y * tl.sigmoid(y)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
