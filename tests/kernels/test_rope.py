"""RoPE kernels against the rotate-half reference (and transformers' own) (interpreted on CPU)."""

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from hyclora_models.kernels import rope as K


def _inputs(b, t, h, d, dtype, device, cos_batch):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, t, h, d, generator=g).to(dtype).to(device)
    angle = torch.rand(cos_batch, t, d // 2, generator=g) * 6
    angle = torch.cat([angle, angle * 0.7], -1)  # unequal halves: the formula must not assume equal ones
    return x, angle.cos().to(dtype).to(device), angle.sin().to(dtype).to(device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b,t,h,d,cos_batch", [(2, 5, 3, 16, 1), (2, 4, 4, 8, 2), (1, 1, 1, 2, 1), (1, 3, 6, 10, 1)])
def test_matches_reference_and_autograd(b, t, h, d, cos_batch, dtype, device):
    x, cos, sin = _inputs(b, t, h, d, dtype, device, cos_batch)
    ref = K.rope_reference(x, cos, sin)
    q_hf, _ = apply_rotary_pos_emb(x.transpose(1, 2), x.transpose(1, 2), cos, sin)  # transformers' layout
    assert torch.equal(ref, q_hf.transpose(1, 2))
    # the same roundings in the same order (bit-equal in bf16; fp32 products may fuse into an FMA on a GPU)
    same = torch.equal if dtype == torch.bfloat16 else lambda a, b: torch.allclose(a, b, rtol=1e-6, atol=1e-6)
    assert same(K.rope_triton(x, cos, sin), ref)
    dy = torch.randn_like(x)
    leaf = x.clone().requires_grad_()
    (auto,) = torch.autograd.grad(K.rope_reference(leaf, cos, sin), leaf, dy)
    assert same(K.rope_backward_triton(dy, cos, sin), auto)


def test_bad_shapes_error(device):
    x, cos, sin = _inputs(1, 4, 2, 8, torch.float32, device, 1)
    with pytest.raises(ValueError, match="rope: x"):
        K.rope_triton(x, cos[:, :3], sin[:, :3])
