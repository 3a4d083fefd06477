"""Chunked linear + cross-entropy against torch's cross_entropy on full logits (interpreted on CPU)."""

import pytest
import torch
import torch.nn.functional as F

from hyclora_models.kernels import cross_entropy as K


def _inputs(rows, hidden, vocab, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, hidden, generator=g).to(dtype).to(device)
    w = (torch.randn(vocab, hidden, generator=g) / hidden**0.5 * 4).to(dtype).to(device)
    labels = torch.randint(0, vocab, (rows,), generator=g).to(device)
    labels[::3] = -100
    return h, w, labels


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab", [7, 300])
def test_grad_kernel_matches_reference(vocab, dtype, device):
    h, w, labels = _inputs(9, 16, vocab, dtype, device)
    logits = F.linear(h, w)
    scale = torch.tensor([0.25], device=device)
    a, b = logits.clone(), logits.clone()
    loss_t = K.cross_entropy_grad_triton_(a, labels, scale)
    loss_r = K.cross_entropy_grad_reference_(b, labels, scale)
    torch.testing.assert_close(loss_t, loss_r, rtol=1e-5, atol=1e-5)
    tol = 2 * torch.finfo(dtype).eps
    torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol * 0.25)
    assert (loss_t[::3] == 0).all() and (a[::3] == 0).all()  # ignored rows: no loss, no gradient


@pytest.mark.parametrize("num_items", [None, 11])
@pytest.mark.parametrize("chunk_rows", [1, 4, 1000])
def test_matches_cross_entropy_on_full_logits(num_items, chunk_rows, device, monkeypatch):
    vocab = 50
    monkeypatch.setattr(K, "CHUNK_ELEMENTS", chunk_rows * vocab)
    h, w, labels = _inputs(13, 24, vocab, torch.float32, device, seed=1)
    h1 = h.clone().requires_grad_()
    loss = K.linear_cross_entropy(h1, w, labels, num_items=num_items)
    loss.backward(torch.tensor(2.0, device=device))
    h2 = h.clone().requires_grad_()
    ref = F.cross_entropy(F.linear(h2, w), labels, reduction="mean" if num_items is None else "sum")
    ref = ref if num_items is None else ref / num_items
    (2 * ref).backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-5, atol=1e-6)


def test_bf16_matches_upcast_cross_entropy(device):
    """As transformers computes the loss: bf16 logits, upcast to fp32."""
    h, w, labels = _inputs(32, 64, 1000, torch.bfloat16, device, seed=2)
    h1, h2 = h.clone().requires_grad_(), h.clone().requires_grad_()
    loss = K.linear_cross_entropy(h1, w, labels)
    loss.backward()
    ref = F.cross_entropy(F.linear(h2, w).float(), labels)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h1.grad.float(), h2.grad.float(), rtol=0.02, atol=0.02 * h2.grad.float().abs().max().item())


def test_bad_input_errors(device):
    h, w, labels = _inputs(4, 8, 10, torch.float32, device)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 10\).*got 10"):
        K.linear_cross_entropy(h, w, torch.tensor([1, 2, 3, 10], device=device))
    with pytest.raises(ValueError, match="3 labels for 4 rows"):
        K.linear_cross_entropy(h, w, labels[:3])
    with pytest.raises(ValueError, match="must be frozen"):
        K.linear_cross_entropy(h, w.clone().requires_grad_(), labels)
