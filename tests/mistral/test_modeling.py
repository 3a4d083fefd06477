"""HyCMistralForCausalLM against PEFT LoRA on the same vanilla Mistral weights (sliding window 4, shorter
than the sequences; GQA; odd sizes)."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, MistralForCausalLM

import hyclora_models as H
from hyclora_models.decoder import predicted_saved_bytes
from hyclora_models.modeling_utils import hyclora_config_of

from ..helpers import (TINY, assert_eval_and_generate_match_peft, assert_matches_peft, batch, cosines, hyc_and_peft,
                       layer_saved_bytes, loss_and_grads, save_tiny)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny_mistral"), arch="mistral")


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("mode", ["speed", "memory"])
def test_bits16_equals_peft(tiny, attn, mode):
    hyc, peft = hyc_and_peft(tiny, bits=16, attn=attn, arch="mistral", mode=mode)
    assert_matches_peft(hyc, peft, batch(length=13))


def test_sliding_window_is_honoured(tiny):
    hyc, _ = hyc_and_peft(tiny, bits=16, arch="mistral")
    windowed = loss_and_grads(hyc, batch(length=13))[0]
    hyc.config.sliding_window = None
    assert not torch.allclose(loss_and_grads(hyc, batch(length=13))[0], windowed)


# measured (CPU): 4 bits median 0.9974 / worst 0.9906, 2 bits 0.936 / 0.813
@pytest.mark.parametrize("bits,median,worst", [(4, 0.993, 0.975), (2, 0.91, 0.77)])
def test_compressed_gradients_close_to_peft(tiny, device, bits, median, worst):
    hyc, peft = hyc_and_peft(tiny, bits=bits, arch="mistral", device=device)
    lh, gh = loss_and_grads(hyc, batch(length=13))
    lp, gp = loss_and_grads(peft, batch(length=13))
    torch.testing.assert_close(lh, lp, rtol=1e-5, atol=0)
    cos = cosines(gh, gp)
    print(f"mistral {bits} bits: gradient cosine median {cos.median():.4f} worst {cos.min():.4f}")
    assert cos.median() >= median and cos.min() >= worst, cos


def test_saved_bytes_follow_method(tmp_path):
    path = save_tiny(tmp_path, arch="mistral", hidden_size=128, intermediate_size=256, num_attention_heads=4,
                     num_key_value_heads=2)
    hyc, peft = hyc_and_peft(path, bits=2, arch="mistral")
    b = batch(n=4, length=32)
    got = layer_saved_bytes(hyc, b) / (b["input_ids"].numel() * TINY["num_hidden_layers"])
    want = predicted_saved_bytes(hyc.config, hyclora_config_of(hyc.config), torch.float32)
    assert abs(got - want) <= 0.01 * want, (got, want)
    assert layer_saved_bytes(peft, b) > 12 * layer_saved_bytes(hyc, b)


def test_eval_and_generate_match_peft(tiny):
    hyc, peft = hyc_and_peft(tiny, bits=2, arch="mistral")
    assert_eval_and_generate_match_peft(hyc, peft, batch(length=13), new_tokens=6)


def test_loading_registration_and_wrong_checkpoint(tiny, tmp_path):
    hyc = H.HyCMistralForCausalLM.from_pretrained(tiny, hyclora_config=H.HyCLoRAConfig(r=4))
    assert hyc.config.model_type == "hyc_mistral" and hyc.config.sliding_window == 4
    vanilla = MistralForCausalLM.from_pretrained(tiny)
    torch.testing.assert_close(hyc.model.layers[1].mlp.down_proj.weight, vanilla.model.layers[1].mlp.down_proj.weight)
    assert torch.count_nonzero(hyc.model.layers[0].self_attn.q_proj.lora_B.weight) == 0
    cfg = AutoConfig.for_model("hyc_mistral", **TINY)
    assert type(AutoModelForCausalLM.from_config(cfg)).__name__ == "HyCMistralForCausalLM"
    llama = save_tiny(tmp_path, arch="llama")
    with pytest.raises(ValueError, match="loads 'mistral' checkpoints.*model_type 'llama'"):
        H.HyCMistralForCausalLM.from_pretrained(llama)
