"""RMSNorm forward (output and per-token rstd, or the output from a kept rstd) and its backward with
respect to the input, the weight frozen, optionally adding the residual stream's gradient.

    y = w * round(x * rstd),   rstd = 1 / sqrt(mean(x^2) + eps)    (x in fp32; round: to x's dtype)
    dx = rstd * (g - n * mean(g * n)),   g = dy * w,   n = x * rstd  (+ d_residual)

transformers' Llama/Mistral RMSNorm computes exactly the forward above; the torch references do what
the fused decoder layer did op by op, and a Triton kernel does each in one pass, one program a token.
"""

from __future__ import annotations

import torch

from ._triton import tl, triton, use_triton

if triton is not None:
    from ._triton import rounded, to_dtype


def rms_norm_reference(x, weight, eps: float, rstd=None):
    """(y, rstd) with rstd (..., 1) fp32; a given ``rstd`` is used, not recomputed."""
    x32 = x.float()
    if rstd is None:
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * (x32 * rstd).to(x.dtype), rstd


def rms_norm_backward_reference(dy, x, weight, rstd, residual=None):
    """dL/dx (+ ``residual``, the gradient reaching x another way) of y = rms_norm(x)."""
    g = (dy * weight).float()
    n = x.float() * rstd
    dx = (rstd * (g - n * (g * n).mean(-1, keepdim=True))).to(x.dtype)
    return dx if residual is None else residual + dx


if triton is not None:

    @triton.jit
    def _forward_kernel(x_ptr, w_ptr, y_ptr, rstd_ptr, C, eps, KEPT_RSTD: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < C
        x = tl.load(x_ptr + row * C + cols, mask=mask, other=0.0).to(tl.float32)
        if KEPT_RSTD:
            rstd = tl.load(rstd_ptr + row)
        else:
            rstd = 1.0 / tl.sqrt(tl.sum(x * x, 0) / C + eps)
            tl.store(rstd_ptr + row, rstd)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        y = w * rounded(x * rstd, x_ptr.dtype.element_ty)
        tl.store(y_ptr + row * C + cols, to_dtype(y, y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _backward_kernel(dy_ptr, x_ptr, w_ptr, rstd_ptr, res_ptr, dx_ptr, C, HAS_RESIDUAL: tl.constexpr,
                         G_DTYPE: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < C
        dy = tl.load(dy_ptr + row * C + cols, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + row * C + cols, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row)
        g = rounded(dy * w, G_DTYPE)
        n = x * rstd
        dx = rounded(rstd * (g - n * (tl.sum(g * n, 0) / C)), x_ptr.dtype.element_ty)
        if HAS_RESIDUAL:
            dx += tl.load(res_ptr + row * C + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(dx_ptr + row * C + cols, to_dtype(dx, dx_ptr.dtype.element_ty), mask=mask)


def _launch(c: int):
    block = triton.next_power_of_2(c)
    return dict(BLOCK=block, num_warps=min(16, max(1, block // 512)))


def _tl_dtype(dtype: torch.dtype):
    return {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype]


def rms_norm_triton(x, weight, eps: float, rstd=None):
    """Triton twin of ``rms_norm_reference``."""
    c = x.shape[-1]
    x2 = x.reshape(-1, c).contiguous()
    y = torch.empty(x2.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    kept = rstd is not None
    rstd = rstd.reshape(-1).contiguous() if kept else torch.empty(x2.shape[0], dtype=torch.float32, device=x.device)
    if x2.numel():
        _forward_kernel[(x2.shape[0],)](x2, weight, y, rstd, c, eps, KEPT_RSTD=kept, **_launch(c))
    return y.view(*x.shape[:-1], c), rstd.view(*x.shape[:-1], 1)


def rms_norm_backward_triton(dy, x, weight, rstd, residual=None):
    """Triton twin of ``rms_norm_backward_reference``."""
    c = x.shape[-1]
    dy2, x2 = dy.reshape(-1, c).contiguous(), x.reshape(-1, c).contiguous()
    res = residual.reshape(-1, c).contiguous() if residual is not None else None
    out_dtype = x.dtype if residual is None else torch.promote_types(residual.dtype, x.dtype)
    dx = torch.empty(x2.shape, dtype=out_dtype, device=x.device)
    if x2.numel():
        _backward_kernel[(x2.shape[0],)](dy2, x2, weight, rstd.reshape(-1).contiguous(), res if res is not None else dx,
                                         dx, c, HAS_RESIDUAL=res is not None,
                                         G_DTYPE=_tl_dtype(torch.promote_types(dy.dtype, weight.dtype)), **_launch(c))
    return dx.view(x.shape)


def rms_norm(x, weight, eps: float, rstd=None):
    """``rms_norm_reference``, in one Triton kernel on CUDA tensors."""
    return (rms_norm_triton if use_triton(x) else rms_norm_reference)(x, weight, eps, rstd)


def rms_norm_backward(dy, x, weight, rstd, residual=None):
    """``rms_norm_backward_reference``, in one Triton kernel on CUDA tensors."""
    return (rms_norm_backward_triton if use_triton(x) else rms_norm_backward_reference)(dy, x, weight, rstd, residual)
