"""Triton quantise/dequantise kernels against their torch reference (interpreted on CPU, compiled on GPU)."""

import pytest
import torch

from hyclora_models.compression import _positions
from hyclora_models.kernels import compress as K

MODES = [(64, True), (32, False), (16, True), (None, False)]  # group size (None: per channel), rotate


def _planted(n, c, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, generator=g) + 0.3 * torch.randn(c, generator=g)  # non-centred channels
    x[:, c // 3] *= 80.0
    x[:, -1] += 40.0
    return x.to(dtype).to(device)


def _run(fn_q, fn_d, x, bits, group, rotate, k, clip=1.0):
    n, c = x.shape
    idx = x.float().abs().amax(0).topk(k).indices.sort().values.to(torch.int32) if k else \
        torch.empty(0, dtype=torch.int32, device=x.device)
    pos = _positions(idx, c, x.device)
    cz = cs = None
    if group is None:
        mn, mx = torch.aminmax(x.float(), dim=0)
        cz, cs = K.store_stats(mn, mx, bits, x.dtype, clip)
    codes, scale, zero, slab = fn_q(x, pos, k, bits, group, rotate, None, cz, cs, clip)
    out = fn_d(codes, scale, zero, slab, pos, (n, c), bits, group, rotate, x.dtype)
    return codes, scale, zero, slab, out


@pytest.mark.parametrize("bits,clip", [(2, 1.0), (4, 1.0), (8, 1.0), (2, 0.6)])
@pytest.mark.parametrize("group,rotate", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kernel_matches_reference(bits, clip, group, rotate, dtype, device):
    x = _planted(37, 201, dtype, device, seed=bits)
    ref = _run(K.quantize_reference, K.dequantize_reference, x, bits, group, rotate, k=2, clip=clip)
    tri = _run(K.quantize_triton, K.dequantize_triton, x, bits, group, rotate, k=2, clip=clip)
    assert torch.equal(ref[3], tri[3])  # outliers: bit-exact copies
    # the same fp32 operations in the same order: identical codes and statistics (a compiled kernel may fuse
    # clipping's multiply-add, which moves the statistics by an ulp)
    if not rotate and (clip == 1 or device == "cpu"):
        for name, a, b in zip(("codes", "scale", "zero"), ref[:3], tri[:3]):
            assert torch.equal(a, b), name
        tol = 0 if device == "cpu" else 2 * torch.finfo(dtype).eps  # GPU may fuse q * scale + zero
    else:  # sums in another order (rotation) or fused: statistics within an ulp, codes within one step
        eps = max(torch.finfo(dtype).eps, 1e-5)
        torch.testing.assert_close(tri[1], ref[1], rtol=eps, atol=0)
        torch.testing.assert_close(tri[2], ref[2], rtol=eps, atol=eps * ref[1].float().abs().max().item())
        qa, qb = (K._unpack(t[0], bits, 256).float() for t in (ref, tri))
        assert (qa - qb).abs().max() <= 1 and (qa != qb).float().mean() < 0.01
        tol = 2.0 / (1 << bits)  # one code flip moves an element by a step (a fraction of the range)
    torch.testing.assert_close(tri[4].float(), ref[4].float(), rtol=tol, atol=tol * x.float().abs().max().item())


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (130, 7), (2, 1000)])
def test_kernel_odd_shapes(shape, device):
    x = torch.randn(*shape, device=device)
    for group, rotate in MODES:
        ref = _run(K.quantize_reference, K.dequantize_reference, x, 2, group, rotate, k=1)
        tri = _run(K.quantize_triton, K.dequantize_triton, x, 2, group, rotate, k=1)
        assert torch.equal(ref[0], tri[0]) or rotate
        torch.testing.assert_close(tri[4], ref[4], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape", [(1, 3), (300, 70), (1000, 513)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_column_stats_kernel(shape, dtype, device):
    x = (torch.randn(*shape) * 10).to(dtype).to(device)
    x[0, 0] = float("nan")
    x[-1, -1] = float("inf")
    mn_r, mx_r = K.column_stats_reference(x)
    mn_t, mx_t = K.column_stats_triton(x)
    assert torch.equal(mn_r, mn_t) and torch.equal(mx_r, mx_t)
    assert mn_t[0] == float("-inf") and mx_t[0] == float("inf")


def test_stats_cover_the_range():
    """Rounded statistics never shrink the covered range (so nearest rounding errs at most half a step)."""
    torch.manual_seed(0)
    mn = torch.randn(10000) * 100
    mx = mn + torch.rand(10000) * 3
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for bits in (2, 4, 8):
            zero, scale = K.store_stats(mn, mx, bits, dtype)
            assert (zero.float() <= mn).all()
            top = zero.double() + ((1 << bits) - 1) * scale.double()  # exact; the bound holds to fp32 rounding
            assert (top >= mx.double() - 1e-6 * (mx - mn).double()).all()


def test_hadamard_is_orthonormal():
    for g in (16, 64, 256):
        h = K.hadamard(g)
        torch.testing.assert_close(h @ h, torch.eye(g), atol=1e-6, rtol=0)
        assert torch.equal(h, h.T)
