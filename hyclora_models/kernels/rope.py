"""Rotary position embedding (the rotate-half form of Llama and Mistral) on (B, T, heads, D) tensors,
forward and backward each one pass, instead of torch's slices, negation, concatenation, two products
and a sum (and as many ops again in autograd's backward).

    y = x * cos + rotate_half(x) * sin,   rotate_half(x) = (-x2, x1)  (halves of the head dimension)
    dx1 = dy1 * cos1 + dy2 * sin2,   dx2 = dy2 * cos2 - dy1 * sin1

Each product and the sum are rounded to x's dtype, as torch's ops store them. ``cos``/``sin``: (B or 1, T, D),
what transformers' rotary embedding gives the layers.
"""

from __future__ import annotations

import torch

from ._triton import tl, triton, use_triton

if triton is not None:
    from ._triton import rounded, to_dtype


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_reference(x, cos, sin):
    """x (B, T, heads, D); differentiable by autograd."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    return x * cos + _rotate_half(x) * sin


if triton is not None:

    @triton.jit
    def _rope_kernel(x_ptr, cos_ptr, sin_ptr, y_ptr, T, H, HALF, cs_batch_stride, BACKWARD: tl.constexpr,
                     BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr):
        """One program a token: every head, both halves of the head dimension."""
        tok = tl.program_id(0).to(tl.int64)
        b = tok // T
        t = tok % T
        d = tl.arange(0, BLOCK_D)
        h = tl.arange(0, BLOCK_H)
        dmask = d < HALF
        cs = b * cs_batch_stride + t * (2 * HALF)
        c1 = tl.load(cos_ptr + cs + d, mask=dmask, other=0.0).to(tl.float32)[None, :]
        c2 = tl.load(cos_ptr + cs + HALF + d, mask=dmask, other=0.0).to(tl.float32)[None, :]
        s1 = tl.load(sin_ptr + cs + d, mask=dmask, other=0.0).to(tl.float32)[None, :]
        s2 = tl.load(sin_ptr + cs + HALF + d, mask=dmask, other=0.0).to(tl.float32)[None, :]
        offs = tok * H * 2 * HALF + h[:, None] * (2 * HALF) + d[None, :]
        mask = (h < H)[:, None] & dmask[None, :]
        x1 = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_ptr + offs + HALF, mask=mask, other=0.0).to(tl.float32)
        dt = x_ptr.dtype.element_ty
        if BACKWARD:
            y1 = rounded(x1 * c1, dt) + rounded(x2 * s2, dt)
            y2 = rounded(x2 * c2, dt) - rounded(x1 * s1, dt)
        else:
            y1 = rounded(x1 * c1, dt) - rounded(x2 * s1, dt)
            y2 = rounded(x2 * c2, dt) + rounded(x1 * s2, dt)
        tl.store(y_ptr + offs, to_dtype(y1, dt), mask=mask)
        tl.store(y_ptr + offs + HALF, to_dtype(y2, dt), mask=mask)


def _rope_triton(x, cos, sin, backward: bool):
    b, t, h, d = x.shape
    if d % 2 or cos.shape[-2:] != (t, d) or cos.shape[0] not in (1, b) or sin.shape != cos.shape:
        raise ValueError(f"rope: x (B, T, heads, D) with D even and cos/sin (B or 1, T, D); got "
                         f"{tuple(x.shape)}, {tuple(cos.shape)}, {tuple(sin.shape)}")
    x = x.contiguous()
    cos, sin = cos.to(x.dtype).contiguous(), sin.to(x.dtype).contiguous()
    y = torch.empty_like(x)
    if x.numel():
        _rope_kernel[(b * t,)](x, cos, sin, y, t, h, d // 2, 0 if cos.shape[0] == 1 else t * d, BACKWARD=backward,
                               BLOCK_D=triton.next_power_of_2(d // 2), BLOCK_H=triton.next_power_of_2(h), num_warps=4)
    return y


def rope_triton(x, cos, sin):
    return _rope_triton(x, cos, sin, backward=False)


def rope_backward_triton(dy, cos, sin):
    return _rope_triton(dy, cos, sin, backward=True)


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return rope_triton(x, cos, sin)

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        return rope_backward_triton(dy, cos, sin), None, None


def rope(x, cos, sin):
    """``rope_reference`` (differentiable in x), in one Triton kernel each way on CUDA tensors of one dtype
    (mixed dtypes, as under autocast with fp32 tables, promote in torch: the reference keeps that)."""
    same = x.dtype == cos.dtype == sin.dtype
    return _Rope.apply(x, cos, sin) if use_triton(x) and same else rope_reference(x, cos, sin)
