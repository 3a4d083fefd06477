"""Linear + cross-entropy for a frozen LM head without the logits ever existing whole.

``linear_cross_entropy(h, weight, labels)`` is ``cross_entropy(h @ weight.T, labels)`` (mean over the
labels that are not ``ignore_index``, or a sum divided by ``num_items``, as transformers' causal-LM loss).
It runs over chunks of rows: a chunk's logits (in h's dtype, as the head's own matmul gives them) are
turned, in place, into d loss / d logits by one pass of ``cross_entropy_grad_`` (softmax minus the one-hot
label, times 1 / denominator; fp32 inside), and multiplied by the weight into d loss / d h at once. So
forward keeps only d loss / d h (the size of h) and backward scales it; no fp32 copy of the logits, no
(tokens x vocab) buffer beyond one chunk's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._triton import tl, triton, use_triton

CHUNK_ELEMENTS = 2**25  # logits a chunk: 64 MiB in bf16


def cross_entropy_grad_reference_(logits, labels, scale, ignore_index: int = -100):
    """Per-row loss (fp32; 0 where ignored); ``logits`` (rows, vocab) becomes ``scale`` (softmax - onehot)."""
    lf = logits.float()
    valid = labels != ignore_index
    target = torch.where(valid, labels, 0)
    lse = torch.logsumexp(lf, -1)
    loss = (lse - lf.gather(1, target[:, None])[:, 0]) * valid
    grad = torch.exp(lf - lse[:, None])
    grad[torch.arange(len(labels), device=labels.device), target] -= 1
    logits.copy_(grad * (valid * scale)[:, None])
    return loss


if triton is not None:

    @triton.jit
    def _grad_kernel(logits_ptr, labels_ptr, scale_ptr, loss_ptr, V, IGNORE: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        ptr = logits_ptr + row * V
        label = tl.load(labels_ptr + row)
        valid = label != IGNORE
        m = -float("inf")
        d = 0.0
        for start in range(0, V, BLOCK):  # online max and sum of exp
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(ptr + cols, mask=cols < V, other=-float("inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, 0))
            d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
            m = m_new
        lse = m + tl.log(d)
        target = tl.where(valid, label, 0)
        x_t = tl.load(ptr + target).to(tl.float32)
        tl.store(loss_ptr + row, tl.where(valid, lse - x_t, 0.0))
        scale = tl.where(valid, tl.load(scale_ptr).to(tl.float32), 0.0)
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < V
            x = tl.load(ptr + cols, mask=mask, other=0.0).to(tl.float32)
            g = (tl.exp(x - lse) - (cols == target).to(tl.float32)) * scale
            tl.store(ptr + cols, g.to(logits_ptr.dtype.element_ty), mask=mask)


def cross_entropy_grad_triton_(logits, labels, scale, ignore_index: int = -100):
    """Triton twin of ``cross_entropy_grad_reference_`` (``logits`` contiguous, ``scale`` a 1-element tensor)."""
    rows, v = logits.shape
    loss = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if rows:
        _grad_kernel[(rows,)](logits, labels, scale, loss, v, IGNORE=ignore_index,
                              BLOCK=min(4096, triton.next_power_of_2(v)), num_warps=8)
    return loss


def cross_entropy_grad_(logits, labels, scale, ignore_index: int = -100):
    fn = cross_entropy_grad_triton_ if use_triton(logits) else cross_entropy_grad_reference_
    return fn(logits, labels, scale, ignore_index)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, labels, denominator, ignore_index):
        scale = (1.0 / denominator.float()).reshape(1)
        dh = torch.empty_like(h)
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        chunk = max(1, CHUNK_ELEMENTS // weight.shape[0])
        for s in range(0, h.shape[0], chunk):
            logits = F.linear(h[s:s + chunk], weight)
            loss += cross_entropy_grad_(logits, labels[s:s + chunk], scale, ignore_index).sum()
            dh[s:s + chunk] = logits @ weight
            del logits
        ctx.save_for_backward(dh)
        return loss * scale[0]

    @staticmethod
    def backward(ctx, d_loss):
        (dh,) = ctx.saved_tensors
        return dh * d_loss.to(dh.dtype), None, None, None, None


def linear_cross_entropy(h, weight, labels, num_items=None, ignore_index: int = -100):
    """Mean cross-entropy of ``h @ weight.T`` (rows of ``h``: (..., hidden)) against ``labels`` (...,), over the
    labels that are not ``ignore_index``, or their sum divided by ``num_items`` when given. ``weight``
    (vocab, hidden) is frozen: gradients flow to ``h`` only."""
    if weight.requires_grad:
        raise ValueError("linear_cross_entropy: the head's weight must be frozen (it gets no gradient here)")
    h = h.reshape(-1, h.shape[-1]).contiguous()
    labels = labels.reshape(-1).to(h.device)
    if labels.shape[0] != h.shape[0]:
        raise ValueError(f"linear_cross_entropy: {labels.shape[0]} labels for {h.shape[0]} rows")
    bad = (labels >= weight.shape[0]) | ((labels < 0) & (labels != ignore_index))
    if bad.any():
        raise ValueError(f"labels must be in [0, {weight.shape[0]}) or ignore_index ({ignore_index}); "
                         f"got {labels[bad][0].item()}")
    denominator = (labels != ignore_index).sum() if num_items is None else torch.as_tensor(num_items, device=h.device)
    return _LinearCrossEntropy.apply(h, weight, labels, denominator, ignore_index)
