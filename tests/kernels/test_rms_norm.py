"""RMSNorm forward/backward kernels against their torch reference and autograd (interpreted on CPU)."""

import pytest
import torch

from hyclora_models.kernels import rms_norm as K

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _inputs(shape, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(*shape, generator=g) * 3 + torch.randn(shape[-1], generator=g)).to(dtype).to(device)
    w = (1 + 0.5 * torch.randn(shape[-1], generator=g)).to(dtype).to(device)
    dy = torch.randn(*shape, generator=g).to(dtype).to(device)
    res = torch.randn(*shape, generator=g).to(dtype).to(device)
    return x, w, dy, res


def _close(a, b, dtype):
    assert a.dtype == b.dtype and a.shape == b.shape
    eps = torch.finfo(dtype).eps
    # sums over the row run in another order: results within a rounding step of the reference
    torch.testing.assert_close(a.float(), b.float(), rtol=2 * eps, atol=2 * eps * b.float().abs().max().item())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 3, 64), (5, 100), (1, 1)])
def test_forward_matches_reference(shape, dtype, device):
    x, w, _, _ = _inputs(shape, dtype, device)
    y, rstd = K.rms_norm_triton(x, w, 1e-6)
    y_ref, rstd_ref = K.rms_norm_reference(x, w, 1e-6)
    assert rstd.shape == rstd_ref.shape == (*shape[:-1], 1) and rstd.dtype == torch.float32
    torch.testing.assert_close(rstd, rstd_ref, rtol=1e-6, atol=0)
    _close(y, y_ref, dtype)
    y_kept, rstd_kept = K.rms_norm_triton(x, w, 1e-6, rstd_ref)  # from a kept rstd: the same output
    assert rstd_kept.data_ptr() == rstd_ref.data_ptr() or torch.equal(rstd_kept, rstd_ref)
    _close(y_kept, y_ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("shape", [(2, 3, 64), (5, 100)])
def test_backward_matches_reference_and_autograd(shape, dtype, residual, device):
    x, w, dy, res = _inputs(shape, dtype, device, seed=1)
    _, rstd = K.rms_norm_reference(x, w, 1e-5)
    res = res if residual else None
    dx = K.rms_norm_backward_triton(dy, x, w, rstd, res)
    _close(dx, K.rms_norm_backward_reference(dy, x, w, rstd, res), dtype)
    # the formula is the derivative: autograd through the reference forward in fp64
    x64 = x.double().requires_grad_()
    y64, _ = K.rms_norm_reference(x64, w.double(), 1e-5)
    (auto,) = torch.autograd.grad(y64, x64, dy.double())
    auto = auto + (res.double() if residual else 0)
    tol = 4 * torch.finfo(dtype).eps
    torch.testing.assert_close(dx.double(), auto, rtol=tol, atol=tol * auto.abs().max().item())


def test_mixed_dtypes(device):
    """An fp32 weight on a bf16 input (autocast training): output fp32, as transformers' norm gives."""
    x, _, dy, _ = _inputs((4, 32), torch.bfloat16, device)
    w = torch.rand(32, device=device) + 0.5
    y, _ = K.rms_norm_triton(x, w, 1e-6)
    y_ref, rstd = K.rms_norm_reference(x, w, 1e-6)
    assert y.dtype == torch.float32
    _close(y, y_ref, torch.bfloat16)
    _close(K.rms_norm_backward_triton(dy.float(), x, w, rstd), K.rms_norm_backward_reference(dy.float(), x, w, rstd),
           torch.bfloat16)
