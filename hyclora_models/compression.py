"""The activation compressor: ``compress(x, ...)`` -> ``CompressedTensor`` -> ``.decompress()``.

See METHOD.md, "Quantiser": asymmetric low-bit codes with a scale and zero-point per group, the few
channels of largest magnitude kept exactly, statistics taken from the tensor itself on every call.
The maths lives in ``kernels/compress.py`` (a Triton kernel each way and a torch reference).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

import torch

from .kernels import compress as K
from .kernels._triton import use_triton

ALLOWED_BITS = (2, 4, 8, 16)
ALLOWED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ROUNDINGS = ("nearest", "stochastic")
BACKENDS = ("auto", "triton", "torch")

# Defaults chosen by the fine-tunes and gradients measured on SmolLM2 (README, Accuracy).
DEFAULT_GROUP_SIZE = 64
DEFAULT_ROTATE = True
# clip="auto": the range kept per bits, as a fraction of each group's [min, max] (kernels/compress.py,
# ``clipped``). 0.6 at 2 bits is near the optimum for a Gaussian group of 64 (levels at +-1.5 sigma against
# extremes near +-2.4 sigma) and measured best on SmolLM2's LoRA gradients (README, Accuracy: median cosine
# 0.59 against 0.23 unclipped); at 4 and 8 bits the extremes are the better range.
AUTO_CLIP = {2: 0.6, 4: 1.0, 8: 1.0, 16: 1.0}


def check_bits(bits, name: str = "bits") -> int:
    if isinstance(bits, bool) or bits not in ALLOWED_BITS:
        raise ValueError(f"{name} must be one of {ALLOWED_BITS} (16 stores exactly), got {bits!r}")
    return int(bits)


def check_options(bits=2, outlier_ratio=0.005, group_size=DEFAULT_GROUP_SIZE, rotate=DEFAULT_ROTATE,
                  rounding="nearest", clip="auto"):
    """Validate compression settings; raises ValueError naming the bad one. Shared by compress() and configs."""
    check_bits(bits)
    if not isinstance(outlier_ratio, (int, float)) or isinstance(outlier_ratio, bool) or not 0 <= outlier_ratio <= 1:
        raise ValueError(f"outlier_ratio must be a number in [0, 1], got {outlier_ratio!r}")
    if group_size != "channel":
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 16 \
                or group_size > 1024 or group_size & (group_size - 1):
            raise ValueError(f"group_size must be 'channel' or a power of two in [16, 1024], got {group_size!r}")
    if rotate not in (True, False):
        raise ValueError(f"rotate must be True or False, got {rotate!r}")
    if rotate and group_size == "channel":
        raise ValueError("rotate=True needs per-token groups (an int group_size), not group_size='channel'")
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    if clip != "auto" and (isinstance(clip, bool) or not isinstance(clip, (int, float)) or not 0 < clip <= 1):
        raise ValueError(f"clip must be 'auto' or a number in (0, 1], got {clip!r}")


def clip_of(clip, bits: int, rounding: str = "nearest") -> float:
    """The range fraction ``clip`` means at ``bits`` ('auto': AUTO_CLIP with nearest rounding; 1 with
    stochastic rounding, which is there to be unbiased and clamping is not)."""
    if clip == "auto":
        return AUTO_CLIP[bits] if rounding == "nearest" else 1.0
    return float(clip)


_TENSOR_FIELDS = ("data", "codes", "scale", "zero", "outliers", "outlier_idx")


@dataclass(eq=False)
class CompressedTensor:
    """What ``compress`` keeps. ``nbytes`` counts every tensor held; ``decompress()`` rebuilds x."""

    shape: torch.Size
    dtype: torch.dtype
    bits: int
    group_size: int | None = None  # None: per-channel statistics
    rotate: bool = False
    backend: str = "torch"
    data: torch.Tensor | None = None  # bits == 16: the tensor itself
    codes: torch.Tensor | None = None
    scale: torch.Tensor | None = None
    zero: torch.Tensor | None = None
    outliers: torch.Tensor | None = None  # (tokens, k) exact values of the outlier channels
    outlier_idx: torch.Tensor | None = None  # (k,) int32 channel indices, increasing

    def tensors(self):
        return [t for t in (getattr(self, f) for f in _TENSOR_FIELDS) if t is not None]

    def split(self):
        """(tensors, rest): the tensors (None where absent) for ``ctx.save_for_backward``, and this object
        without them. ``rest.join(tensors)`` puts them back."""
        return [getattr(self, f) for f in _TENSOR_FIELDS], dataclasses.replace(self, **dict.fromkeys(_TENSOR_FIELDS))

    def join(self, tensors) -> CompressedTensor:
        return dataclasses.replace(self, **dict(zip(_TENSOR_FIELDS, tensors)))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def decompress(self) -> torch.Tensor:
        if self.data is not None:
            return self.data
        c = self.shape[-1] if len(self.shape) else 1
        n = math.prod(self.shape) // c if c else 0
        pos = _positions(self.outlier_idx, c, self.codes.device)
        fn = K.dequantize_triton if self.backend == "triton" else K.dequantize_reference
        out = fn(self.codes, self.scale, self.zero, self.outliers, pos, (n, c), self.bits, self.group_size,
                 self.rotate, self.dtype)
        return out.view(self.shape)


def _positions(idx: torch.Tensor, c: int, device) -> torch.Tensor:
    """(C,) int32: -1 for quantised channels, else the channel's column among the outliers (read-only)."""
    if not idx.numel():
        return _no_outliers(c, device)
    pos = torch.full((c,), -1, dtype=torch.int32, device=device)
    pos[idx.long()] = torch.arange(idx.numel(), dtype=torch.int32, device=device)
    return pos


@functools.lru_cache(maxsize=64)
def _no_outliers(c: int, device) -> torch.Tensor:
    """All -1: built once per width and device (most tensors are compressed without outlier channels)."""
    return torch.full((c,), -1, dtype=torch.int32, device=device)


def _resolve_backend(backend: str, x: torch.Tensor) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if use_triton(x) else "torch"
    if backend == "triton" and K.triton is None:
        raise RuntimeError("backend='triton' needs the triton package (pip install triton)")
    return backend


def compress(x: torch.Tensor, bits: int = 2, outlier_ratio: float = 0.005, group_size=DEFAULT_GROUP_SIZE,
             rotate: bool = DEFAULT_ROTATE, rounding: str = "nearest", clip="auto",
             backend: str = "auto") -> CompressedTensor:
    """Compress ``x`` (any shape; channels are the last dimension) for later ``decompress()``.

    bits: 2, 4 or 8 (quantised) or 16 (kept exactly).
    outlier_ratio: k = ceil(ratio * channels) channels of largest max |x| are kept exactly.
    group_size: 'channel' (statistics per channel over the tokens) or G, statistics per token per G
        contiguous channels (a power of two, 16..1024).
    rotate: block Hadamard rotation of each group before quantising (per-token groups only).
    rounding: 'nearest' or 'stochastic' (unbiased).
    clip: 'auto' (AUTO_CLIP: 0.6 at 2 bits, 1 at 4 and 8; 1 with stochastic rounding) or a number in
        (0, 1]: the range quantised is that fraction of each group's (or channel's) [min, max] about its
        midpoint; elements beyond it are clamped to its ends.
    backend: 'auto' (Triton on CUDA tensors, torch elsewhere), 'triton' or 'torch'.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"compress expects a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in ALLOWED_DTYPES:
        raise ValueError(f"compress supports float32, bfloat16 and float16 tensors, got {x.dtype}")
    check_options(bits, outlier_ratio, group_size, rotate, rounding, clip)
    clip = clip_of(clip, bits, rounding)
    backend = _resolve_backend(backend, x)
    if bits == 16 or x.numel() == 0:  # exact; an empty tensor holds no bytes either way
        return CompressedTensor(x.shape, x.dtype, bits, data=x, backend=backend)
    shape = x.shape
    c = shape[-1] if x.dim() else 1
    x2 = x.reshape(-1, c).contiguous()
    k = min(c, math.ceil(outlier_ratio * c))
    per_channel = group_size == "channel"
    chan_zero = chan_scale = None
    idx = torch.empty(0, dtype=torch.int32, device=x.device)
    if k or per_channel:
        mn, mx = (K.column_stats_triton if backend == "triton" else K.column_stats_reference)(x2)
        if k:
            absmax = torch.maximum(-mn, mx)
            # a full sort of C values: on a GPU far cheaper than topk for C in the thousands (4 vs 31 us)
            idx = absmax.sort(descending=True, stable=True).indices[:k].sort().values.to(torch.int32)
        if per_channel:
            chan_zero, chan_scale = K.store_stats(mn, mx, bits, x.dtype, clip)
    pos = _positions(idx, c, x.device)
    seed = int(torch.randint(0, 2**31 - 1, ())) if rounding == "stochastic" else None
    fn = K.quantize_triton if backend == "triton" else K.quantize_reference
    codes, scale, zero, slab = fn(x2, pos, idx.numel(), bits, None if per_channel else group_size,
                                  rotate, seed, chan_zero, chan_scale, clip)
    return CompressedTensor(shape, x.dtype, bits, None if per_channel else group_size, rotate, backend,
                            codes=codes, scale=scale, zero=zero, outliers=slab, outlier_idx=idx)
