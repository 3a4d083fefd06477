"""Mixed precision (torch.autocast, what Trainer's bf16=True turns on) on fp32 weights: the fused layers'
backward runs under the forward's autocast state, and matches PEFT's under the same autocast."""

import pytest
import torch

from .helpers import batch, cosines, hyc_and_peft, lora_grads, save_tiny


def _step(model, b):
    """Forward under autocast, backward outside it, as Trainer does."""
    model.zero_grad()
    with torch.autocast(next(model.parameters()).device.type, dtype=torch.bfloat16):
        loss = model(**{k: v.to(next(model.parameters()).device) for k, v in b.items()}).loss
    loss.backward()
    return loss.detach(), lora_grads(model)


@pytest.mark.parametrize("arch", ["llama", "roberta-cls"])
@pytest.mark.parametrize("mode", ["speed", "memory"])
def test_autocast_bf16_matches_peft(tmp_path, device, arch, mode):
    hyc, peft = hyc_and_peft(save_tiny(tmp_path, arch=arch), bits=16, arch=arch, mode=mode, device=device)
    b = batch(arch=arch)
    (lh, gh), (lp, gp) = _step(hyc, b), _step(peft, b)
    # within half a bf16 step: the fused LoRA add (one addmm) rounds once where PEFT's three ops round thrice
    torch.testing.assert_close(lh, lp, rtol=4e-3, atol=0)
    assert all(g.dtype == torch.float32 for g in gh.values())  # gradients in the parameters' dtype
    assert cosines(gh, gp).min() > 0.999  # measured on CPU: 0.99994 (llama), 0.99992 (roberta)


def test_autocast_lora_outside_the_fused_layers(tmp_path):
    """A LoRA linear outside the fused layers (the bare RoBERTa's pooler, hit by target "dense") runs its own
    autograd op: its backward too replays autocast; its gradients match the fp32 run's."""
    import hyclora_models as H

    path = save_tiny(tmp_path, arch="roberta-cls")
    model = H.HyCRobertaModel.from_pretrained(path, hyclora_config=dict(target_modules=["query", "dense"], bits=16))
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.1)  # B != 0: every adapter weight has a gradient
    ids = batch()["input_ids"]
    grads = []
    for enabled in (False, True):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            out = model.train()(input_ids=ids).pooler_output
        out.float().square().mean().backward()
        grads.append(lora_grads(model))
    assert any(k.startswith("pooler.dense.lora_") for k in grads[0])
    assert cosines(grads[1], grads[0]).min() > 0.99
