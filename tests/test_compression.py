"""The public compress() contract (issue: foundation)."""

import math

import pytest
import torch

import hyclora_models as H
from hyclora_models.kernels.compress import hadamard

BACKENDS = ["torch", "triton"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def planted(shape, dtype=torch.float32, device="cpu", seed=0, outliers=(3, -2)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g) * (1 + torch.rand(shape[-1], generator=g))
    for i, ch in enumerate(outliers):
        x[..., ch] = x[..., ch] * 50 + 300 * (-1) ** i
    return x.to(dtype).to(device)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("group,rotate", [(32, False), (64, True), ("channel", False)])
def test_error_within_half_a_step(backend, dtype, bits, group, rotate, device):
    """Unclipped (clip=1), every quantised element is within half a step of its code."""
    x = planted((4, 9, 150), dtype, device, seed=bits)
    c = H.compress(x, bits=bits, outlier_ratio=0.01, group_size=group, rotate=rotate, clip=1.0, backend=backend)
    y = c.decompress()
    assert y.shape == x.shape and y.dtype == x.dtype
    err = (y.float() - x.float()).reshape(-1, 150)
    xf = x.float().reshape(-1, 150)
    out = c.outlier_idx.long()
    assert out.tolist() == [3, 148]
    assert torch.equal(y.reshape(-1, 150)[:, out], x.reshape(-1, 150)[:, out])  # outliers bit-exact
    keep = torch.ones(150, dtype=torch.bool, device=device)
    keep[out] = False
    ulp = torch.finfo(dtype).eps * xf.abs()  # the final cast to dtype rounds by half an ulp
    if group == "channel":
        half = c.scale.float()[None, :] / 2
        assert (err.abs() <= half * 1.0001 + ulp)[:, keep].all()
    elif not rotate:
        half = c.scale.float().repeat_interleave(group, 1)[:, :150] / 2
        assert (err.abs() <= half * 1.0001 + ulp)[:, keep].all()
    else:  # error is bounded per group in the rotated (orthonormal) basis: L2 <= sqrt(G) * scale / 2
        ng = c.scale.shape[1]
        e = torch.nn.functional.pad(err * keep, (0, ng * group - 150)).reshape(-1, ng, group)
        bound = math.sqrt(group) * c.scale.float() / 2 * 1.0001 + \
            torch.finfo(dtype).eps * xf.abs().amax(1, keepdim=True) * math.sqrt(group)
        assert (e.norm(dim=-1) <= bound).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_bits16_is_exact(backend, dtype, device):
    x = planted((3, 33), dtype, device)
    c = H.compress(x, bits=16, backend=backend)
    assert torch.equal(c.decompress(), x)
    assert c.nbytes == x.numel() * x.element_size()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(1,), (7,), (2, 3, 5), (1, 1, 1), (33, 31), (0, 8), (4, 0), (), (2, 1000)])
def test_any_shape(backend, shape, device):
    x = torch.randn(shape, device=device)
    for group, rotate in [(32, False), (64, True), ("channel", False)]:
        c = H.compress(x, bits=2, group_size=group, rotate=rotate, backend=backend)
        y = c.decompress()
        assert y.shape == x.shape and y.dtype == x.dtype
        if x.numel():
            assert (y - x).abs().max() <= x.abs().max() * 2 + 1e-6  # sane, finite reconstruction


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [3, 0, 1, 1.5, 32, True, "2", None])
def test_bad_bits_rejected(backend, bad):
    with pytest.raises(ValueError, match=r"bits must be one of \(2, 4, 8, 16\)"):
        H.compress(torch.randn(4, 8), bits=bad, backend=backend)


@pytest.mark.parametrize("kwargs,match", [
    (dict(outlier_ratio=-0.1), "outlier_ratio"), (dict(outlier_ratio=2), "outlier_ratio"),
    (dict(group_size=48), "group_size"), (dict(group_size=8), "group_size"),
    (dict(group_size="channel", rotate=True), "rotate=True"), (dict(rounding="up"), "rounding"),
    (dict(backend="cuda"), "backend"), (dict(clip=0), "clip"), (dict(clip=1.5), "clip"), (dict(clip=True), "clip"),
    (dict(clip="max"), "clip"),
])
def test_bad_options_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        H.compress(torch.randn(4, 64), **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", [32, "channel"])
def test_clip_narrows_the_range_and_clamps(backend, dtype, group, device):
    """clip=0.5: each group's range is half its [min, max] about the midpoint; elements inside it are within
    half a step, elements beyond it decompress to its nearer end."""
    x = planted((64, 150), dtype, device, outliers=())
    c = H.compress(x, bits=2, outlier_ratio=0, group_size=group, rotate=False, clip=0.5, backend=backend)
    xf, y = x.float(), c.decompress().float()
    if group == "channel":
        mn, mx = xf.aminmax(dim=0)
        lo, step = c.zero.float()[None, :], c.scale.float()[None, :]
    else:
        xp = torch.nn.functional.pad(xf, (0, 10)).view(64, 5, 32)  # 150 channels: 5 groups of 32
        valid = torch.arange(160, device=device).view(5, 32) < 150
        mn = xp.masked_fill(~valid, float("inf")).amin(-1)
        mx = xp.masked_fill(~valid, float("-inf")).amax(-1)
        lo = c.zero.float().repeat_interleave(32, 1)[:, :150]
        step = c.scale.float().repeat_interleave(32, 1)[:, :150]
    # the stored range is the narrowed one, rounded outwards to the storage dtype (the scale by up to 2^-7
    # of itself, the zero by an ulp)
    excess = 3 * c.scale.float() - 0.5 * (mx - mn)
    assert (excess >= -1e-6 * (mx - mn)).all()
    assert (excess <= 0.01 * (mx - mn) + 2 * torch.finfo(dtype).eps * (mn.abs() + mx.abs())).all()
    hi = lo + 3 * step
    ulp = torch.finfo(dtype).eps * xf.abs()
    inside = (xf >= lo) & (xf <= hi)
    assert inside.float().mean() < 0.97 and inside.any()  # some elements were clipped
    assert ((y - xf).abs() <= step / 2 * 1.0001 + ulp)[inside].all()
    assert ((y - xf.clamp(lo, hi)).abs() <= ulp + 1e-6 * step)[~inside].all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_auto_clip(backend, device):
    """'auto' clips 2-bit codes (less squared error on Gaussian groups than the full range) and leaves 4 and
    8 bits as unclipped, bit for bit."""
    x = torch.randn(256, 512, device=device)
    err = {clip: (H.compress(x, bits=2, clip=clip, backend=backend).decompress() - x).norm().item()
           for clip in ("auto", 1.0)}
    assert err["auto"] < 0.85 * err[1.0]
    assert H.AUTO_CLIP[2] < 1 == H.AUTO_CLIP[4] == H.AUTO_CLIP[8]
    for bits in (4, 8):
        a, b = (H.compress(x, bits=bits, clip=clip, backend=backend) for clip in ("auto", 1.0))
        assert torch.equal(a.codes, b.codes) and torch.equal(a.scale, b.scale)


def test_bad_input_rejected():
    with pytest.raises(ValueError, match="float32, bfloat16 and float16"):
        H.compress(torch.arange(8))
    with pytest.raises(TypeError):
        H.compress([1.0, 2.0])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("group,rotate", [(32, False), (64, True), ("channel", False)])
@pytest.mark.parametrize("ratio", [0.0, 0.05])
def test_nonfinite_stays_nonfinite(backend, group, rotate, ratio, device):
    x = torch.randn(6, 80, device=device)
    x[1, 7] = float("nan")
    x[4, 50] = float("inf")
    x[2, 70] = float("-inf")
    y = H.compress(x, bits=2, outlier_ratio=ratio, group_size=group, rotate=rotate, backend=backend).decompress()
    for r, ch in ((1, 7), (4, 50), (2, 70)):
        assert not torch.isfinite(y[r, ch])
    assert torch.isfinite(y[0]).all() or group == "channel"  # per-channel: only the damaged channels


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("group,rotate", [(32, False), (64, True), ("channel", False)])
def test_nbytes_is_real_storage(backend, bits, group, rotate, device):
    x = planted((5, 13, 100), torch.bfloat16, device)
    c = H.compress(x, bits=bits, group_size=group, rotate=rotate, backend=backend)
    held = c.tensors()
    assert c.nbytes == sum(t.untyped_storage().nbytes() for t in held)
    assert len({t.untyped_storage().data_ptr() for t in held if t.numel()}) == sum(t.numel() > 0 for t in held)
    codes_bits = 8 * c.codes.numel() / x.numel()
    assert bits <= codes_bits <= bits * 1.3  # packed 8 / bits codes a byte (plus padding of the last group)


@pytest.mark.parametrize("backend", BACKENDS)
def test_stochastic_rounding_is_unbiased(backend, device):
    torch.manual_seed(0)
    x = torch.randn(8, 64, device=device)
    recon = torch.stack([H.compress(x, bits=2, outlier_ratio=0, group_size=32, rotate=False,
                                    rounding="stochastic", backend=backend).decompress() for _ in range(300)])
    c = H.compress(x, bits=2, outlier_ratio=0, group_size=32, rotate=False, clip=1.0, backend=backend)
    step = c.scale.float().repeat_interleave(32, 1)
    assert ((recon - x).abs() <= step * 1.0001).all()  # never more than one step away
    bias = (recon.mean(0) - x).abs() / step
    assert bias.mean() < 0.03  # round-to-nearest's mean bias is ~0.25 of a step here
    near = (c.decompress() - x).abs() / step
    assert near.mean() > 0.15


def test_statistics_follow_the_data():
    """Statistics come from the tensor of each call: scaling the input scales the stored scales."""
    x = planted((16, 64))
    a = H.compress(x, bits=4, outlier_ratio=0, backend="torch")
    b = H.compress(x * 4, bits=4, outlier_ratio=0, backend="torch")
    torch.testing.assert_close(b.scale.float(), 4 * a.scale.float(), rtol=1e-2, atol=0)
    assert a.scale.float().std(0).mean() > 0  # every token has its own statistics


def test_outliers_chosen_by_magnitude_each_call():
    x = torch.randn(20, 200)
    x[:, 11] *= 1000
    assert H.compress(x, bits=2, outlier_ratio=0.005).outlier_idx.tolist() == [11]
    x[:, 150] *= 1e6
    assert H.compress(x, bits=2, outlier_ratio=0.005).outlier_idx.tolist() == [150]
    assert H.compress(x, bits=2, outlier_ratio=0.01).outlier_idx.tolist() == [11, 150]


def test_rotation_helps_on_gaussian_groups():
    x = planted((64, 256))
    kw = dict(bits=2, outlier_ratio=0.01, group_size=64, backend="torch")
    err = {r: ((H.compress(x, rotate=r, **kw).decompress() - x).norm() / x.norm()).item() for r in (False, True)}
    assert hadamard(64).shape == (64, 64)
    assert err[True] < err[False]
