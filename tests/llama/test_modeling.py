"""HyCLlamaForCausalLM against PEFT LoRA on the same vanilla Llama weights."""

import importlib

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, BertConfig, BertModel, LlamaForCausalLM

import hyclora_models as H

from ..helpers import (TARGETS, TINY, assert_eval_and_generate_match_peft, assert_gradient_matches_finite_difference,
                       assert_matches_peft, batch, cosines, hyc_and_peft, layer_saved_bytes, lora_grads, loss_and_grads,
                       model_layers, save_tiny_llama)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_bits16_equals_peft(tiny, attn):
    hyc, peft = hyc_and_peft(tiny, bits=16, attn=attn)
    assert len([p for p in hyc.parameters() if p.requires_grad]) == 2 * len(TARGETS) * TINY["num_hidden_layers"]
    assert_matches_peft(hyc, peft, batch())


@pytest.mark.parametrize("act,kernel", [("silu", True), ("gelu_pytorch_tanh", False)])
def test_activation_equals_peft(tmp_path, monkeypatch, act, kernel):
    """SiLU runs through the SwiGLU kernels; another activation through its act_fn module and autograd."""
    from hyclora_models import decoder

    calls = []
    for name in ("swiglu", "swiglu_backward"):
        fn = getattr(decoder, name)
        monkeypatch.setattr(decoder, name, lambda *a, _fn=fn, _name=name, **k: calls.append(_name) or _fn(*a, **k))
    hyc, peft = hyc_and_peft(save_tiny_llama(tmp_path, hidden_act=act), bits=16)
    assert_matches_peft(hyc, peft, batch())
    n = TINY["num_hidden_layers"]
    assert calls == (["swiglu"] * n + ["swiglu", "swiglu_backward"] * n if kernel else [])


# median / worst gradient cosine to PEFT, measured on this model (CPU): speed mode 8 bits 1.0000/1.0000,
# 4 bits 0.9975/0.9908, 2 bits 0.943/0.822; memory mode 8 bits 1.0000/0.9999, 4 bits 0.990/0.978,
# 2 bits 0.829/0.644 (hidden 60: one group of 64 a token, the worst case for the quantiser)
@pytest.mark.parametrize("mode,bits,median,worst", [
    ("speed", 8, 0.9999, 0.999), ("speed", 4, 0.995, 0.98), ("speed", 2, 0.92, 0.78),
    ("memory", 8, 0.9995, 0.999), ("memory", 4, 0.985, 0.96), ("memory", 2, 0.78, 0.58)])
def test_compressed_gradients_close_to_peft(tiny, device, mode, bits, median, worst):
    hyc, peft = hyc_and_peft(tiny, bits=bits, mode=mode, device=device)
    lh, gh = loss_and_grads(hyc, batch())
    lp, gp = loss_and_grads(peft, batch())
    torch.testing.assert_close(lh, lp, rtol=1e-5, atol=0)  # compression touches only what backward reads
    cos = cosines(gh, gp)
    assert cos.median() >= median and cos.min() >= worst, cos


def test_training_runs_the_fused_layer(tiny, monkeypatch):
    """Training goes through the fused op (keeping the compressed set); eval and no-grad do not."""
    from hyclora_models import decoder

    calls = []
    forward = decoder._Step.forward
    monkeypatch.setattr(decoder._Step, "forward", lambda self, x, keep: calls.append(keep) or forward(self, x, keep))
    hyc, _ = hyc_and_peft(tiny, bits=2)
    loss_and_grads(hyc, batch())
    assert calls == [True] * TINY["num_hidden_layers"]
    calls.clear()
    with torch.no_grad():
        hyc(**batch())
    hyc.eval()(**batch()).loss.backward()
    assert calls == []


def test_gradient_checkpointing_selects_memory_mode(tiny):
    hyc, peft = hyc_and_peft(tiny, bits=16)
    hyc.gradient_checkpointing_enable()
    assert hyc.is_activation_checkpointing if hasattr(hyc, "is_activation_checkpointing") else hyc.is_gradient_checkpointing
    assert all(layer.memory_mode for layer in model_layers(hyc))
    assert_matches_peft(hyc, peft, batch())
    # the layers keep only their input (x, exact at 16 bits): nothing also checkpointed
    b = batch()
    x_bytes = b["input_ids"].numel() * TINY["hidden_size"] * 4
    assert layer_saved_bytes(hyc, b) == TINY["num_hidden_layers"] * x_bytes
    hyc.gradient_checkpointing_disable()
    assert not any(layer.memory_mode for layer in model_layers(hyc))


def test_packed_sequences_equal_peft(tiny):
    """Two sequences packed in one row, told apart by position_ids (transformers' packing kwargs)."""
    hyc, peft = hyc_and_peft(tiny, bits=16)
    ids = torch.randint(1, TINY["vocab_size"], (1, 12), generator=torch.Generator().manual_seed(0))
    b = dict(input_ids=ids, labels=ids, position_ids=torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6]]))
    lh = assert_matches_peft(hyc, peft, b)
    unpacked = dict(input_ids=ids, labels=ids)
    assert not torch.allclose(loss_and_grads(hyc, unpacked)[0], lh)  # the packing did change attention


@pytest.mark.parametrize("mode", ["speed", "memory"])
def test_backward_matches_forward_with_dropout(tiny, mode):
    """With LoRA dropout and attention dropout on, the gradient along a random direction equals the
    finite difference of the loss, each forward replaying the same masks (same seed): the regenerated
    masks in backward are the forward's."""
    hyc, _ = hyc_and_peft(tiny, bits=16, lora_dropout=0.3, mode=mode)
    for layer in model_layers(hyc):
        layer.self_attn.attention_dropout = 0.2
    assert_gradient_matches_finite_difference(hyc, batch())


@pytest.mark.parametrize("loss_kwargs", [{}, {"num_items_in_batch": 17}, {"shift_labels": "given"}])
def test_fused_cross_entropy_equals_the_heads_loss(tiny, loss_kwargs):
    """Training with labels: the chunked head + loss (no logits) gives transformers' loss and gradients, with
    padding labels, Trainer's num_items_in_batch and pre-shifted labels."""
    hyc, _ = hyc_and_peft(tiny, bits=16)
    b = batch()
    if loss_kwargs.get("shift_labels"):
        loss_kwargs = {"shift_labels": torch.roll(b["labels"], 2, dims=1)}
    results = []
    for fused in (True, False):
        hyc.config.hyclora_config = {**hyc.config.hyclora_config, "fused_cross_entropy": fused}
        hyc.zero_grad()
        out = hyc(**b, **loss_kwargs)
        assert (out.logits is None) == fused
        out.loss.backward()
        results.append((out.loss.detach(), lora_grads(hyc)))
    (fused_loss, fused_grads), (loss, grads) = results
    torch.testing.assert_close(fused_loss, loss, rtol=1e-6, atol=0)
    for k in grads:
        torch.testing.assert_close(fused_grads[k], grads[k], rtol=1e-5, atol=1e-7)
    with torch.no_grad():  # evaluation keeps the logits
        assert hyc(**b).logits.shape == (*b["input_ids"].shape, TINY["vocab_size"])
    hyc.config.hyclora_config = {**hyc.config.hyclora_config, "fused_cross_entropy": True}
    b["labels"][0, 3] = TINY["vocab_size"]
    with pytest.raises(ValueError, match="labels must be in"):
        hyc(**b)


def test_subset_of_targets_and_rslora(tiny):
    hyc, peft = hyc_and_peft(tiny, bits=16, targets=["v_proj", "down_proj"])
    assert {n.split(".")[-3] for n, p in hyc.named_parameters() if p.requires_grad} == {"v_proj", "down_proj"}
    cfg = H.HyCLoRAConfig(r=4, lora_alpha=8, use_rslora=True)
    assert cfg.scaling == 4.0


def test_eval_and_generate_match_peft(tiny):
    hyc, peft = hyc_and_peft(tiny, bits=2)
    assert_eval_and_generate_match_peft(hyc, peft, batch(), new_tokens=5)


def test_loading_a_standard_checkpoint(tiny):
    hyc = H.HyCLlamaForCausalLM.from_pretrained(tiny, hyclora_config=H.HyCLoRAConfig(r=5))
    vanilla = LlamaForCausalLM.from_pretrained(tiny)
    assert hyc.config.model_type == "hyc_llama"
    params = dict(hyc.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    assert trainable == {n for n in params if ".lora_" in n}
    assert "model.layers.1.mlp.down_proj.lora_A.weight" in trainable  # PEFT's names
    torch.testing.assert_close(params["model.layers.0.mlp.up_proj.weight"], vanilla.model.layers[0].mlp.up_proj.weight)
    a, b = params["model.layers.0.self_attn.q_proj.lora_A.weight"], params["model.layers.0.self_attn.q_proj.lora_B.weight"]
    assert torch.count_nonzero(b) == 0  # standard init: B = 0, so the model starts as the base model
    bound = 1 / TINY["hidden_size"] ** 0.5  # kaiming_uniform(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert a.abs().max() <= bound and a.std() > 0.8 * bound / 3**0.5


def test_registration_is_idempotent():
    importlib.reload(H)
    importlib.reload(H)
    cfg = AutoConfig.for_model("hyc_llama", **{k: v for k, v in TINY.items()})
    assert isinstance(cfg, H.HyCLlamaConfig)
    assert type(AutoModelForCausalLM.from_config(cfg)).__name__ == "HyCLlamaForCausalLM"


@pytest.mark.parametrize("kwargs,match", [
    (dict(target_modules=["q_proj", "qkv_proj"]), r"\['qkv_proj'\] match no module"),
    (dict(r=0), "r must be a positive integer"),
    (dict(bits=3), r"bits must be one of"),
    (dict(lora_dropout=1.0), "lora_dropout"),
    (dict(mode="fast"), "mode"),
    (dict(attention_backward="flash"), "attention_backward must be one of"),
    (dict(nonlinear_bits=3), "nonlinear_bits must be one of"),
    (dict(clip=1.2), r"clip must be 'auto' or a number in \(0, 1\]"),
])
def test_bad_settings_rejected(tiny, kwargs, match):
    with pytest.raises(ValueError, match=match):
        H.HyCLlamaForCausalLM.from_pretrained(tiny, hyclora_config=dict(kwargs))


def test_non_llama_checkpoint_rejected(tmp_path):
    BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=20)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="loads 'llama' checkpoints.*model_type 'bert'"):
        H.HyCLlamaForCausalLM.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="loads 'llama' checkpoints.*model_type 'bert'"):
        H.HyCLlamaForCausalLM.from_pretrained(tmp_path, config=BertConfig.from_pretrained(tmp_path))


def test_lora_dropout_seeded_and_not_stored(tiny):
    hyc, _ = hyc_and_peft(tiny, bits=16, lora_dropout=0.3)
    runs = []
    for _ in range(2):
        torch.manual_seed(123)
        runs.append(loss_and_grads(hyc, batch()))
    assert torch.equal(runs[0][0], runs[1][0])
    assert all(torch.equal(runs[0][1][k], runs[1][1][k]) for k in runs[0][1])
    hyc0, _ = hyc_and_peft(tiny, bits=16)
    assert not torch.equal(loss_and_grads(hyc0, batch())[0], runs[0][0])  # dropout did act


def test_dropout_backward_matches_autograd():
    """The hand-written backward with a regenerated mask equals autograd through the same maths."""
    from hyclora_models.lora import LoRALinear, seeded_dropout

    torch.manual_seed(0)
    lin = LoRALinear.from_linear(torch.nn.Linear(13, 9), H.HyCLoRAConfig(r=3, lora_alpha=5, lora_dropout=0.4, bits=16,
                                                                        target_modules=["x"]))
    lin.weight.requires_grad_(False)
    lin.bias.requires_grad_(False)
    torch.nn.init.normal_(lin.lora_B.weight)
    x = torch.randn(2, 4, 13, requires_grad=True)
    torch.manual_seed(7)
    seed = int(torch.randint(0, 2**62, ()))  # the seed the layer will draw
    torch.manual_seed(7)
    y = lin.train()(x)
    (y * torch.arange(9.0)).sum().backward()
    got = (x.grad.clone(), lin.lora_A.weight.grad.clone(), lin.lora_B.weight.grad.clone())
    x.grad = lin.lora_A.weight.grad = lin.lora_B.weight.grad = None
    ref = torch.nn.functional.linear(x, lin.weight, lin.bias) + \
        lin.lora_B(lin.lora_A(seeded_dropout(x, 0.4, seed))) * lin.scaling
    (ref * torch.arange(9.0)).sum().backward()
    torch.testing.assert_close(y, ref)
    for a, b in zip(got, (x.grad, lin.lora_A.weight.grad, lin.lora_B.weight.grad)):
        torch.testing.assert_close(a, b)


SIZES = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2)


@pytest.mark.parametrize("bits", [2, 4, 8, 16])
@pytest.mark.parametrize("mode", ["speed", "memory"])
def test_saved_bytes_follow_method(tmp_path, bits, mode):
    """Bytes the decoder layers keep for backward (saved_tensors_hooks) equal METHOD.md's table, and are a
    fraction of PEFT's on the same model and batch."""
    from hyclora_models.decoder import predicted_saved_bytes

    path = save_tiny_llama(tmp_path, **SIZES)
    hyc, peft = hyc_and_peft(path, bits=bits, mode=mode)
    b = batch(n=4, length=32)
    per_token_layer = b["input_ids"].numel() * TINY["num_hidden_layers"]
    got = layer_saved_bytes(hyc, b) / per_token_layer
    want = predicted_saved_bytes(hyc.config, H.modeling_utils.hyclora_config_of(hyc.config), torch.float32)
    assert abs(got - want) <= 0.01 * want, (got, want)
    ratio = layer_saved_bytes(peft, b) / per_token_layer / got
    print(f"{mode} bits {bits}: {got:.0f} B/token/layer, PEFT / HyC = {ratio:.1f}")
    # measured here (fp32, hidden 128, 4 x 32 tokens): speed 1.7 / 5.7 / 9.4 / 14.0 at 16 / 8 / 4 / 2 bits,
    # memory 16 / 56 / 98 / 159
    floor = {"speed": {16: 1.5, 8: 5.0, 4: 8.5, 2: 12.5}, "memory": {16: 14, 8: 50, 4: 88, 2: 140}}[mode][bits]
    assert ratio > floor


def test_kernel_attention_backward_falls_back_where_not_covered(tiny):
    """fp32 (and, on CPU, no cuDNN) and padding masks: attention_backward="kernel" recomputes as by default."""
    hyc, peft = hyc_and_peft(tiny, bits=16, attention_backward="kernel")
    assert_matches_peft(hyc, peft, batch())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="cuDNN attention is CUDA-only")
def test_kernel_attention_backward(tmp_path):
    """attention_backward="kernel" (cuDNN's own backward from the kept logsumexp) gives the recompute path's
    gradients at 16 bits (bf16), and keeps the logsumexp: heads x 4 bytes a token a layer more."""
    path = save_tiny_llama(tmp_path, **SIZES)  # head_dim 32: cuDNN wants a multiple of 8
    b = {k: v.cuda() for k, v in batch().items()}
    b.pop("attention_mask")  # no padding: the causal case the kernel covers
    runs = {}
    for how in ("recompute", "kernel"):
        hyc, _ = hyc_and_peft(path, bits=16, attention_backward=how, device="cuda")
        hyc.to(torch.bfloat16)
        runs[how] = loss_and_grads(hyc, b), layer_saved_bytes(hyc, b)
    (l_r, g_r), bytes_r = runs["recompute"]
    (l_k, g_k), bytes_k = runs["kernel"]
    assert torch.equal(l_r, l_k)
    cos = cosines(g_k, g_r).float()
    assert cos.median() > 0.999 and cos.min() > 0.99  # bf16 (each path is 0.9961 worst to PEFT's)
    tokens = b["input_ids"].numel()
    assert bytes_k - bytes_r == TINY["num_hidden_layers"] * tokens * SIZES["num_attention_heads"] * 4


def test_nonlinear_bits(tmp_path):
    """nonlinear_bits keeps q, k, gate and up (the inputs of the recomputed softmax and SwiGLU) at their own
    bits: the bytes follow the formula, and the gradients move towards PEFT's."""
    from hyclora_models.decoder import predicted_saved_bytes

    path = save_tiny_llama(tmp_path, **SIZES)
    b = batch(n=4, length=32)
    per_token_layer = b["input_ids"].numel() * TINY["num_hidden_layers"]
    medians = {}
    for nl in (None, 8):
        hyc, peft = hyc_and_peft(path, bits=2, nonlinear_bits=nl)
        got = layer_saved_bytes(hyc, b) / per_token_layer
        want = predicted_saved_bytes(hyc.config, H.modeling_utils.hyclora_config_of(hyc.config), torch.float32)
        assert abs(got - want) <= 0.01 * want, (nl, got, want)
        medians[nl] = cosines(loss_and_grads(hyc, b)[1], loss_and_grads(peft, b)[1]).median()
        medians[(nl, "bytes")] = got
    assert medians[(8, "bytes")] > medians[(None, "bytes")]
    # measured here (hidden 128, CPU): median cosine 0.915 at 2 bits, 0.961 with q/k/gate/up at 8
    assert medians[8] > medians[None] + 0.02, medians
