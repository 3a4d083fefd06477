"""SwiGLU forward/backward kernels against their torch reference and autograd (interpreted on CPU)."""

import pytest
import torch

from hyclora_models.kernels import swiglu as K


def _inputs(shape, dtype, device):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(*shape, generator=g) * 3).to(dtype).to(device) for _ in range(3)]


def _close(a, b, dtype, steps=1):
    assert a.dtype == b.dtype and a.shape == b.shape
    tol = steps * torch.finfo(dtype).eps  # exp differs by an ulp between libraries: a rounding step at most
    torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol * b.float().abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(2, 3, 100), (1, 1), (5000,)])
def test_matches_reference_and_autograd(shape, dtype, device):
    gate, up, dm = _inputs(shape, dtype, device)
    _close(K.swiglu_triton(gate, up), K.swiglu_reference(gate, up), dtype)
    g_leaf, u_leaf = gate.clone().requires_grad_(), up.clone().requires_grad_()
    auto = torch.autograd.grad(K.swiglu_reference(g_leaf, u_leaf), (g_leaf, u_leaf), dm)
    for inplace in (False, True):
        g, u = gate.clone(), up.clone()
        for fn in (K.swiglu_backward_triton, K.swiglu_backward_reference):
            got = fn(g.clone(), u.clone(), dm, inplace=inplace)
            for a, b in zip(got, auto):
                _close(a, b, dtype, steps=2)
        d_gate, d_up = K.swiglu_backward_triton(g, u, dm, inplace=inplace)
        assert (d_gate.data_ptr() == g.data_ptr()) == inplace and (d_up.data_ptr() == u.data_ptr()) == inplace


def test_mismatched_inputs_error(device):
    gate, up, _ = _inputs((4, 8), torch.float32, device)
    with pytest.raises(ValueError, match="share shape and dtype"):
        K.swiglu_triton(gate, up[:, :4])
