"""SwiGLU's product m = silu(gate) * up and its backward, each one pass over the (tokens, intermediate)
tensors instead of torch's three (silu, product; autograd's silu, two products, silu's backward).

    m = round(silu(g)) * u
    d_up = dm * round(silu(g)),   d_gate = round(dm * u) * sig(g) (1 + g (1 - sig(g)))

(round: to the tensors' dtype, where torch's ops store their results.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._triton import tl, triton, use_triton

if triton is not None:
    from ._triton import rounded, to_dtype


def swiglu_reference(gate, up):
    return F.silu(gate) * up


def swiglu_backward_reference(gate, up, dm, inplace: bool = False):
    """(d_gate, d_up); with ``inplace`` they overwrite ``gate`` and ``up`` (no longer needed)."""
    s = F.silu(gate)
    d_s = dm * up
    d_up = torch.mul(dm, s, out=up if inplace else None)
    g = gate.float()
    sig = torch.sigmoid(g)
    d_gate = d_s.float() * sig * (1 + g * (1 - sig))
    return (gate.copy_(d_gate) if inplace else d_gate.to(gate.dtype)), d_up


if triton is not None:

    @triton.jit
    def _silu(g, DT: tl.constexpr):
        sig = 1.0 / (1.0 + tl.exp(-g))
        return rounded(g * sig, DT), sig

    @triton.jit
    def _forward_kernel(g_ptr, u_ptr, m_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        dt = g_ptr.dtype.element_ty
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        s, _ = _silu(g, dt)
        tl.store(m_ptr + offs, to_dtype(s * u, dt), mask=mask)

    @triton.jit
    def _backward_kernel(g_ptr, u_ptr, dm_ptr, dg_ptr, du_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        dt = g_ptr.dtype.element_ty
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dm = tl.load(dm_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        s, sig = _silu(g, dt)
        d_s = rounded(dm * u, dt)
        tl.store(du_ptr + offs, to_dtype(dm * s, dt), mask=mask)
        tl.store(dg_ptr + offs, to_dtype(d_s * sig * (1.0 + g * (1.0 - sig)), dt), mask=mask)


BLOCK = 1024


def _check(*ts):
    if len({(t.shape, t.dtype) for t in ts}) != 1:
        raise ValueError(f"swiglu: gate, up (and dm) must share shape and dtype, got "
                         f"{[(tuple(t.shape), t.dtype) for t in ts]}")
    return [t.contiguous() for t in ts]


def swiglu_triton(gate, up):
    gate, up = _check(gate, up)
    m = torch.empty_like(gate)
    if m.numel():
        _forward_kernel[(triton.cdiv(m.numel(), BLOCK),)](gate, up, m, m.numel(), BLOCK=BLOCK, num_warps=4)
    return m


def swiglu_backward_triton(gate, up, dm, inplace: bool = False):
    inplace = inplace and gate.is_contiguous() and up.is_contiguous()
    gate, up, dm = _check(gate, up, dm)
    d_gate, d_up = (gate, up) if inplace else (torch.empty_like(gate), torch.empty_like(up))
    if gate.numel():  # each element is read before it is written, by the same program: in place is safe
        _backward_kernel[(triton.cdiv(gate.numel(), BLOCK),)](gate, up, dm, d_gate, d_up, gate.numel(),
                                                              BLOCK=BLOCK, num_warps=4)
    return d_gate, d_up


def swiglu(gate, up):
    """silu(gate) * up, in one Triton kernel on CUDA tensors."""
    return (swiglu_triton if use_triton(gate) else swiglu_reference)(gate, up)


def swiglu_backward(gate, up, dm, inplace: bool = False):
    """(dL/d gate, dL/d up) of m = silu(gate) * up; ``inplace``: written over gate and up."""
    return (swiglu_backward_triton if use_triton(gate) else swiglu_backward_reference)(gate, up, dm, inplace)
