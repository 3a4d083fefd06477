"""What the Triton kernels share: the optional import and round-to-nearest conversions."""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = tl = None


def use_triton(x: torch.Tensor) -> bool:
    """The kernels' default: Triton for CUDA tensors (where it is installed), the torch reference elsewhere."""
    return x.is_cuda and triton is not None


if triton is not None:

    @triton.jit
    def to_dtype(x, ST: tl.constexpr):
        """fp32 -> ST with round-to-nearest-even, as torch does (the interpreter truncates to bf16)."""
        if ST == tl.bfloat16:
            b = x.to(tl.uint32, bitcast=True)
            b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
            x = b.to(tl.float32, bitcast=True)
        return x.to(ST)

    @triton.jit
    def rounded(x, ST: tl.constexpr):
        """fp32 x rounded to ST and back: the value torch holds after an op whose result is stored in ST."""
        return to_dtype(x, ST).to(tl.float32)
