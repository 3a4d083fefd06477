"""Quantise + pack and unpack + dequantise: the two passes of the activation compressor.

Layout of a compressed 2-D tensor x of shape (N tokens, C channels), bits b, P = 8 // b codes a byte:

* ``codes``  uint8 (N, ceil(C / P)); channel c of a row sits in byte c // P at bits (c % P) * b.
* ``scale``, ``zero``: per-token groups of G contiguous channels -> (N, ceil(C / G)); per channel
  (statistics over the tokens) -> (C,). Stored in the input's dtype. ``x ~ q * scale + zero``.
* outlier channels: ``pos`` int32 (C,) is -1 for a quantised channel, else the column of the channel
  in ``slab`` (N, K), which holds those channels exactly in the input's dtype. They are zeroed
  before the statistics are taken, so they do not widen any group's range.
* optional block Hadamard rotation (per-token groups only): each group is multiplied by the
  orthonormal Sylvester matrix H_G before quantising and by H_G again (its own inverse) after.

Clipping: with ``clip`` < 1 the range quantised is ``clip`` times the group's (or channel's) [min, max],
about its midpoint, and elements beyond it are clamped to its ends: fewer, finer steps where most of the
data lies (at 2 bits, a Hadamard-rotated group is close to Gaussian and 0.6 cuts the squared error by
about 40%; see ``compression.AUTO_CLIP``). Rounding of the statistics to the storage dtype is directed so
that the range they describe always covers the (clipped) range: |x - x_hat| <= scale / 2 for every
quantised element inside it with nearest rounding. A group (or channel) holding NaN or inf gets a NaN
scale, so non-finite input never decompresses finite.

Each direction has a Triton kernel and a plain-torch reference of the same maths
(``quantize_reference`` / ``dequantize_reference``); they agree code for code.
"""

from __future__ import annotations

import functools
import math
import os

import torch

from ._triton import tl, triton

if triton is not None:
    from ._triton import to_dtype as _to_dtype

# Statistics are widened by this factor when rounding would shrink the range they cover.
_SLACK = 2.0**-7


def hadamard(size: int, device=None) -> torch.Tensor:
    """Orthonormal Sylvester-Hadamard matrix of a power-of-two size (symmetric, its own inverse)."""
    h = torch.ones(1, 1)
    while h.shape[0] < size:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / math.sqrt(size)).to(device)


@functools.lru_cache(maxsize=None)
def _hadamard_cached(size: int, device: torch.device) -> torch.Tensor:
    return hadamard(size, device)


@functools.lru_cache(maxsize=None)
def _hadamard_sign(size: int, device: torch.device) -> torch.Tensor:
    """The unnormalised +-1 matrix in bf16 (exact), as the kernels use it."""
    return (hadamard(size) * math.sqrt(size)).round().to(torch.bfloat16).to(device)


def clipped(mn, mx, clip: float):
    """[mn, mx] narrowed to ``clip`` of its width about its midpoint (clip 1: unchanged, bit for bit)."""
    if clip == 1:
        return mn, mx
    mid, half = (mn + mx) * 0.5, (mx - mn) * (0.5 * clip)
    return mid - half, mid + half


def store_stats(mn: torch.Tensor, mx: torch.Tensor, bits: int, dtype: torch.dtype, clip: float = 1.0):
    """fp32 min/max -> (zero, scale) in ``dtype``, rounded so that [zero, zero + qmax*scale] covers [mn, mx]
    (narrowed by ``clip`` first)."""
    qmax = (1 << bits) - 1
    mn, mx = clipped(mn, mx, clip)
    zero = mn.to(dtype)
    zero = torch.where(zero.float() <= mn, zero, (mn - mn.abs() * _SLACK).to(dtype))
    s = (mx - zero.float()) * (1.0 / qmax)  # a multiply, as the kernel does (and as CUDA torch does a scalar divide)
    scale = s.to(dtype)
    scale = torch.where(scale.float() >= s, scale, (s * (1 + _SLACK)).to(dtype))
    bad = ~(torch.isfinite(mn) & torch.isfinite(mx))
    return zero, scale.masked_fill(bad, float("nan"))


def code_width(c: int, group_size: int | None, rotate: bool) -> int:
    """Codes kept a row: every channel; with rotation, whole groups (rotated pads carry signal)."""
    return -(-c // group_size) * group_size if rotate else c


# --------------------------------------------------------------------------- torch reference


def _pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """(N, C) int codes -> (N, ceil(C / P)) uint8."""
    per = 8 // bits
    n, c = q.shape
    q = torch.nn.functional.pad(q.to(torch.int32), (0, -c % per))
    shifts = torch.arange(per, device=q.device, dtype=torch.int32) * bits
    return (q.view(n, -1, per) << shifts).sum(-1).to(torch.uint8)


def _unpack(codes: torch.Tensor, bits: int, c: int) -> torch.Tensor:
    per = 8 // bits
    shifts = torch.arange(per, device=codes.device, dtype=torch.int32) * bits
    q = (codes.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return q.flatten(1)[:, :c]


def column_stats_reference(x):
    """Per-channel (min, max) over the tokens in fp32; a channel holding NaN gets (-inf, +inf)."""
    mn, mx = torch.aminmax(x, dim=0)
    mn, mx = mn.float(), mx.float()
    nan = torch.isnan(mn) | torch.isnan(mx)
    return mn.masked_fill(nan, float("-inf")), mx.masked_fill(nan, float("inf"))


def quantize_reference(x, pos, k, bits, group_size, rotate, seed, chan_zero=None, chan_scale=None, clip=1.0):
    """Plain-torch twin of the Triton quantise kernel. ``group_size`` is an int, or None for per-channel
    statistics (then ``chan_zero``/``chan_scale`` (C,) are given, already clipped). ``clip``: the groups'
    range narrowing (``clipped``). Returns codes, scale, zero, slab."""
    n, c = x.shape
    out = pos >= 0
    slab = x[:, out] if k else x.new_empty(n, 0)  # pos is increasing over the outlier channels
    xf = x.float().masked_fill(out, 0.0)
    if group_size is None:
        zero, scale = chan_zero, chan_scale
        t = _divide(xf - zero.float(), scale.float())
    else:
        g = group_size
        ng = -(-c // g)
        xp = torch.nn.functional.pad(xf, (0, ng * g - c)).view(n, ng, g)
        valid = torch.nn.functional.pad(torch.ones(c, dtype=torch.bool, device=x.device), (0, ng * g - c))
        bad = torch.nn.functional.pad(~torch.isfinite(xf), (0, ng * g - c)).view(n, ng, g).any(-1)
        if rotate:
            xp = xp @ _hadamard_cached(g, x.device)
            mn, mx = xp.amin(-1), xp.amax(-1)
        else:
            v = valid.view(ng, g)
            mn = xp.masked_fill(~v, float("inf")).amin(-1)
            mx = xp.masked_fill(~v, float("-inf")).amax(-1)
        mn = mn.masked_fill(bad, float("nan"))
        zero, scale = store_stats(mn, mx, bits, x.dtype, clip)
        t = _divide(xp - zero.float().unsqueeze(-1), scale.float().unsqueeze(-1)).flatten(1)
    if seed is None:
        q = torch.floor(t + 0.5)
    else:
        gen = torch.Generator(device=x.device).manual_seed(seed)
        q = torch.floor(t + torch.rand(t.shape, generator=gen, device=x.device))
    q = q.clamp(0, (1 << bits) - 1)
    return _pack(q[:, :code_width(c, group_size, rotate)], bits), scale, zero, slab


def _divide(num, den):
    """num / den where den > 0, else 0 (constant groups and non-finite groups)."""
    return torch.where(den > 0, num / den, torch.zeros((), device=num.device))


def dequantize_reference(codes, scale, zero, slab, pos, shape_2d, bits, group_size, rotate, dtype):
    n, c = shape_2d
    w = code_width(c, group_size, rotate)
    q = _unpack(codes, bits, w).float()
    if group_size is None:
        x = q * scale.float() + zero.float()
    else:
        g = group_size
        ng = scale.shape[1]
        qp = torch.nn.functional.pad(q, (0, ng * g - w)).view(n, ng, g)
        xp = qp * scale.float().unsqueeze(-1) + zero.float().unsqueeze(-1)
        if rotate:
            xp = xp @ _hadamard_cached(g, codes.device)
        x = xp.flatten(1)[:, :c]
    x = x.to(dtype)
    if slab.shape[1]:
        x[:, pos >= 0] = slab
    return x


# --------------------------------------------------------------------------- Triton kernels

if triton is not None:

    @triton.jit
    def _round_stats(mn, mx, bad, QMAX: tl.constexpr, SLACK: tl.constexpr, ST: tl.constexpr, CLIP: tl.constexpr):
        if CLIP != 1.0:  # ``clipped``, the same fp32 operations
            mid = (mn + mx) * 0.5
            half = (mx - mn) * (0.5 * CLIP)
            mn = mid - half
            mx = mid + half
        zero = _to_dtype(mn, ST).to(tl.float32)
        zero = tl.where(zero <= mn, zero, _to_dtype(mn - tl.abs(mn) * SLACK, ST).to(tl.float32))
        s = (mx - zero) * (1.0 / QMAX)
        scale = _to_dtype(s, ST).to(tl.float32)
        scale = tl.where(scale >= s, scale, _to_dtype(s * (1 + SLACK), ST).to(tl.float32))
        scale = tl.where(bad, float("nan"), scale)
        return zero, scale

    @triton.jit
    def _rotate(x, h_ptr, G: tl.constexpr, EXACT_FP32: tl.constexpr):
        """x (M, G) fp32 @ H_G (orthonormal). H is stored as +-1 in bf16: tensor-core dots of an exact
        hi + lo bf16 split of x give ~16 mantissa bits, the precision of a bf16/fp16 activation."""
        offs = tl.arange(0, G)[:, None] * G + tl.arange(0, G)[None, :]
        h = tl.load(h_ptr + offs)
        if EXACT_FP32:
            y = tl.dot(x, h.to(tl.float32), input_precision="ieee")
        else:
            hi = x.to(tl.bfloat16)
            lo = (x - hi.to(tl.float32)).to(tl.bfloat16)
            y = tl.dot(hi, h) + tl.dot(lo, h)
        return y * (1.0 / tl.sqrt(G * 1.0))

    @triton.jit
    def _column_stats_kernel(x_ptr, mn_ptr, mx_ptr, N, C, ROWS_PER_PROG,
                             BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = cols < C
        lo = tl.full((BLOCK_R, BLOCK_C), float("inf"), tl.float32)
        hi = tl.full((BLOCK_R, BLOCK_C), float("-inf"), tl.float32)
        start = tl.program_id(0) * ROWS_PER_PROG
        for r in range(start, tl.minimum(start + ROWS_PER_PROG, N), BLOCK_R):  # element-wise; reduce once
            rows = r + tl.arange(0, BLOCK_R)
            mask = (rows < N)[:, None] & cmask[None, :]
            x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * C + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            nan = x != x
            lo = tl.minimum(lo, tl.where(nan, float("-inf"), tl.where(mask, x, float("inf"))))
            hi = tl.maximum(hi, tl.where(nan, float("inf"), tl.where(mask, x, float("-inf"))))
        tl.atomic_min(mn_ptr + cols, tl.min(lo, axis=0), mask=cmask)
        tl.atomic_max(mx_ptr + cols, tl.max(hi, axis=0), mask=cmask)

    @triton.jit
    def _quantize_kernel(
        x_ptr, pos_ptr, slab_ptr, codes_ptr, scale_ptr, zero_ptr, h_ptr,
        N, C, W, K, ROW_BYTES, N_GROUPS, seed,
        BITS: tl.constexpr, G: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
        PER_CHANNEL: tl.constexpr, ROTATE: tl.constexpr, STOCHASTIC: tl.constexpr,
        HAS_OUTLIERS: tl.constexpr, SLACK: tl.constexpr, EXACT_FP32: tl.constexpr, CLIP: tl.constexpr,
    ):
        P: tl.constexpr = 8 // BITS
        QMAX: tl.constexpr = (1 << BITS) - 1
        NG: tl.constexpr = BLOCK_C // G
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        rmask = rows < N
        cmask = cols < C
        mask = rmask[:, None] & cmask[None, :]
        rows64 = rows.to(tl.int64)
        raw = tl.load(x_ptr + rows64[:, None] * C + cols[None, :], mask=mask, other=0.0)
        x = raw.to(tl.float32)
        if HAS_OUTLIERS:
            pos = tl.load(pos_ptr + cols, mask=cmask, other=-1)
            is_out = pos >= 0
            tl.store(slab_ptr + rows64[:, None] * K + pos[None, :], raw, mask=mask & is_out[None, :])
            x = tl.where(is_out[None, :], 0.0, x)
        ST: tl.constexpr = x_ptr.dtype.element_ty
        if PER_CHANNEL:
            zero = tl.load(zero_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
            scale = tl.load(scale_ptr + cols, mask=cmask, other=1.0).to(tl.float32)[None, :]
            t = tl.where(scale > 0, tl.div_rn(x - zero, tl.where(scale > 0, scale, 1.0)), 0.0)
        else:
            nonfinite = (x != x) | (tl.abs(x) == float("inf"))
            bad = tl.max(tl.reshape(nonfinite.to(tl.int32), (BLOCK_R, NG, G)), axis=2) > 0
            if ROTATE:
                x = tl.reshape(_rotate(tl.reshape(x, (BLOCK_R * NG, G)), h_ptr, G, EXACT_FP32),
                               (BLOCK_R, BLOCK_C))
                x3 = tl.reshape(x, (BLOCK_R, NG, G))
                mn = tl.min(x3, axis=2)
                mx = tl.max(x3, axis=2)
            else:
                x3 = tl.reshape(x, (BLOCK_R, NG, G))
                valid = tl.reshape(tl.broadcast_to(cmask[None, :], (BLOCK_R, BLOCK_C)), (BLOCK_R, NG, G))
                mn = tl.min(tl.where(valid, x3, float("inf")), axis=2)
                mx = tl.max(tl.where(valid, x3, float("-inf")), axis=2)
                empty = mn > mx  # a group wholly past the row's end
                mn = tl.where(empty, 0.0, mn)
                mx = tl.where(empty, 0.0, mx)
            zero, scale = _round_stats(mn, mx, bad, QMAX, SLACK, ST, CLIP)
            gcols = tl.program_id(1) * NG + tl.arange(0, NG)
            gmask = rmask[:, None] & (gcols < N_GROUPS)[None, :]
            goffs = rows64[:, None] * N_GROUPS + gcols[None, :]
            tl.store(scale_ptr + goffs, _to_dtype(scale, ST), mask=gmask)
            tl.store(zero_ptr + goffs, _to_dtype(zero, ST), mask=gmask)
            safe = tl.where(scale > 0, scale, 1.0)
            t3 = tl.where(scale[:, :, None] > 0, tl.div_rn(x3 - zero[:, :, None], safe[:, :, None]), 0.0)
            t = tl.reshape(t3, (BLOCK_R, BLOCK_C))
        if STOCHASTIC:
            elem = rows[:, None] * C + cols[None, :]
            q = tl.floor(t + tl.rand(seed, elem))
        else:
            q = tl.floor(t + 0.5)
        q = tl.minimum(tl.maximum(q, 0.0), QMAX).to(tl.int32)
        q = tl.where((cols < W)[None, :], q, 0)
        bcols = tl.program_id(1) * (BLOCK_C // P) + tl.arange(0, BLOCK_C // P)
        if P == 1:
            packed = q
        else:
            shifts = tl.arange(0, P) * BITS
            packed = tl.sum(tl.reshape(q, (BLOCK_R, BLOCK_C // P, P)) << shifts[None, None, :], axis=2)
        bmask = rmask[:, None] & (bcols < ROW_BYTES)[None, :]
        tl.store(codes_ptr + rows64[:, None] * ROW_BYTES + bcols[None, :], packed.to(tl.uint8), mask=bmask)

    @triton.jit
    def _dequantize_kernel(
        codes_ptr, scale_ptr, zero_ptr, slab_ptr, pos_ptr, h_ptr, out_ptr,
        N, C, K, ROW_BYTES, N_GROUPS,
        BITS: tl.constexpr, G: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
        PER_CHANNEL: tl.constexpr, ROTATE: tl.constexpr, HAS_OUTLIERS: tl.constexpr, EXACT_FP32: tl.constexpr,
    ):
        P: tl.constexpr = 8 // BITS
        QMAX: tl.constexpr = (1 << BITS) - 1
        NG: tl.constexpr = BLOCK_C // G
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        rmask = rows < N
        cmask = cols < C
        rows64 = rows.to(tl.int64)
        bcols = tl.program_id(1) * (BLOCK_C // P) + tl.arange(0, BLOCK_C // P)
        bmask = rmask[:, None] & (bcols < ROW_BYTES)[None, :]
        b = tl.load(codes_ptr + rows64[:, None] * ROW_BYTES + bcols[None, :], mask=bmask, other=0).to(tl.int32)
        if P == 1:
            q = b.to(tl.float32)
        else:
            shifts = tl.arange(0, P) * BITS
            q = tl.reshape((b[:, :, None] >> shifts[None, None, :]) & QMAX, (BLOCK_R, BLOCK_C)).to(tl.float32)
        if PER_CHANNEL:
            scale = tl.load(scale_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
            zero = tl.load(zero_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
            x = q * scale[None, :] + zero[None, :]
        else:
            gcols = tl.program_id(1) * NG + tl.arange(0, NG)
            gmask = rmask[:, None] & (gcols < N_GROUPS)[None, :]
            goffs = rows64[:, None] * N_GROUPS + gcols[None, :]
            scale = tl.load(scale_ptr + goffs, mask=gmask, other=0.0).to(tl.float32)
            zero = tl.load(zero_ptr + goffs, mask=gmask, other=0.0).to(tl.float32)
            x3 = tl.reshape(q, (BLOCK_R, NG, G)) * scale[:, :, None] + zero[:, :, None]
            if ROTATE:
                x3 = _rotate(tl.reshape(x3, (BLOCK_R * NG, G)), h_ptr, G, EXACT_FP32)
            x = tl.reshape(x3, (BLOCK_R, BLOCK_C))
        mask = rmask[:, None] & cmask[None, :]
        x = _to_dtype(x, out_ptr.dtype.element_ty)
        if HAS_OUTLIERS:
            pos = tl.load(pos_ptr + cols, mask=cmask, other=-1)
            is_out = (pos >= 0)[None, :]
            exact = tl.load(slab_ptr + rows64[:, None] * K + pos[None, :], mask=mask & is_out, other=0.0)
            x = tl.where(is_out, exact, x)
        tl.store(out_ptr + rows64[:, None] * C + cols[None, :], x, mask=mask)


# Elements a program and warps, per kernel; set from the GPU sweep in benchmarks/compress_bandwidth.py.
TUNING = {"quantize": (4096, 4), "dequantize": (4096, 4), "stats": (4096, 8)}


def _tiles(c: int, group_size: int | None, rotate: bool, kernel: str):
    """(BLOCK_R, BLOCK_C, G, num_warps) for a row length c; BLOCK_C a multiple of G."""
    elements, warps = TUNING[kernel]
    g = group_size or 1
    block_c = max(g, 16, min(1024, triton.next_power_of_2(c)))
    block_r = max(1, elements // block_c)
    if rotate:  # tl.dot needs at least 16 rows
        block_r = max(block_r, 16 * g // block_c)
    return block_r, block_c, (group_size or block_c), warps


def _exact_rotation(dtype) -> bool:
    """fp32 data, or Triton's interpreter (whose bf16 tl.dot is wrong): rotate with an fp32 dot."""
    return dtype == torch.float32 or os.environ.get("TRITON_INTERPRET") == "1"


def column_stats_triton(x):
    """Triton twin of ``column_stats_reference``: one read of x, partial results merged with atomics."""
    n, c = x.shape
    mn = torch.full((c,), float("inf"), device=x.device)
    mx = torch.full((c,), float("-inf"), device=x.device)
    elements, warps = TUNING["stats"]
    block_c = max(16, min(256, triton.next_power_of_2(c)))
    block_r = max(1, elements // block_c)
    col_blocks = triton.cdiv(c, block_c)
    target = 4 * (torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 1)
    splits = max(1, min(triton.cdiv(n, block_r), target // col_blocks))
    rows_per = triton.cdiv(triton.cdiv(n, splits), block_r) * block_r
    _column_stats_kernel[(triton.cdiv(n, rows_per), col_blocks)](x, mn, mx, n, c, rows_per, BLOCK_R=block_r,
                                                                 BLOCK_C=block_c, num_warps=warps)
    return mn, mx


def quantize_triton(x, pos, k, bits, group_size, rotate, seed, chan_zero=None, chan_scale=None, clip=1.0):
    """Triton twin of ``quantize_reference`` (same arguments, same results)."""
    n, c = x.shape
    per = 8 // bits
    w = code_width(c, group_size, rotate)
    codes = torch.empty(n, -(-w // per), dtype=torch.uint8, device=x.device)
    slab = torch.empty(n, k, dtype=x.dtype, device=x.device)
    if group_size is None:
        zero, scale, n_groups = chan_zero, chan_scale, 0
    else:
        n_groups = -(-c // group_size)
        scale = torch.empty(n, n_groups, dtype=x.dtype, device=x.device)
        zero = torch.empty_like(scale)
    if x.numel():
        block_r, block_c, g, warps = _tiles(c, group_size, rotate, "quantize")
        h = _hadamard_sign(group_size, x.device) if rotate else x
        grid = (triton.cdiv(n, block_r), triton.cdiv(c, block_c))
        _quantize_kernel[grid](
            x, pos, slab, codes, scale, zero, h,
            n, c, w, k, codes.shape[1], n_groups, seed if seed is not None else 0,
            BITS=bits, G=g, BLOCK_R=block_r, BLOCK_C=block_c, PER_CHANNEL=group_size is None,
            ROTATE=rotate, STOCHASTIC=seed is not None, HAS_OUTLIERS=k > 0, SLACK=_SLACK,
            EXACT_FP32=_exact_rotation(x.dtype), CLIP=float(clip), num_warps=warps,
        )
    return codes, scale, zero, slab


def dequantize_triton(codes, scale, zero, slab, pos, shape_2d, bits, group_size, rotate, dtype):
    n, c = shape_2d
    out = torch.empty(n, c, dtype=dtype, device=codes.device)
    if out.numel():
        block_r, block_c, g, warps = _tiles(c, group_size, rotate, "dequantize")
        h = _hadamard_sign(group_size, codes.device) if rotate else out
        grid = (triton.cdiv(n, block_r), triton.cdiv(c, block_c))
        _dequantize_kernel[grid](
            codes, scale, zero, slab, pos, h, out,
            n, c, slab.shape[1], codes.shape[1], scale.shape[1] if group_size else 0,
            BITS=bits, G=g, BLOCK_R=block_r, BLOCK_C=block_c, PER_CHANNEL=group_size is None,
            ROTATE=rotate, HAS_OUTLIERS=slab.shape[1] > 0, EXACT_FP32=_exact_rotation(dtype), num_warps=warps,
        )
    return out
