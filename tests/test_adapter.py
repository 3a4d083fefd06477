"""Adapters in PEFT's format: HyC -> PEFT, PEFT -> HyC, HyC -> HyC, and the errors."""

import json

import pytest
import torch

from hyclora_models.modeling_utils import hyclora_config_of

from .helpers import ARCHS, batch, eval_logits, hyc_and_peft, save_tiny


@pytest.fixture(scope="module", params=["llama", "mistral"])
def tiny(request, tmp_path_factory):
    return request.param, save_tiny(tmp_path_factory.mktemp(request.param), arch=request.param)


def test_saved_adapter_loads_in_peft(tiny, tmp_path):
    from peft import PeftModel

    arch, path = tiny
    hyc, _ = hyc_and_peft(path, bits=4, arch=arch, lora_dropout=0.1)
    hyc.save_pretrained(tmp_path)
    files = {p.name for p in tmp_path.iterdir()}
    assert files == {"adapter_config.json", "adapter_model.safetensors", "hyclora_config.json", "README.md",
                     "model.safetensors"}  # the last for transformers' Trainer (test_examples.py)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["base_model_name_or_path"] == str(path) and cfg["r"] == 5
    assert str(path) in (tmp_path / "README.md").read_text()
    peft = PeftModel.from_pretrained(ARCHS[arch][1].from_pretrained(path), tmp_path)
    torch.testing.assert_close(eval_logits(peft, batch()), eval_logits(hyc, batch()))


def test_peft_adapter_loads_in_hyc(tiny, tmp_path):
    arch, path = tiny
    _, peft = hyc_and_peft(path, bits=16, arch=arch)
    peft.save_pretrained(tmp_path)
    hyc = ARCHS[arch][2].from_pretrained(tmp_path, hyclora_config=dict(r=5, lora_alpha=7, bits=2))
    torch.testing.assert_close(eval_logits(hyc, batch()), eval_logits(peft, batch()))
    assert hyclora_config_of(hyc.config).bits == 2
    assert all(p.requires_grad == (".lora_" in n) for n, p in hyc.named_parameters())  # ready to train


def test_round_trip_keeps_settings_and_weights(tiny, tmp_path):
    arch, path = tiny
    hyc, _ = hyc_and_peft(path, bits=4, arch=arch, outlier_ratio=0.02, targets=["q_proj", "down_proj"])
    hyc.save_pretrained(tmp_path)
    again = ARCHS[arch][2].from_pretrained(tmp_path)
    assert hyclora_config_of(again.config) == hyclora_config_of(hyc.config)
    assert {n: p for n, p in again.state_dict().items()}.keys() == hyc.state_dict().keys()
    for (n, p), (m, q) in zip(hyc.named_parameters(), again.named_parameters()):
        assert n == m and torch.equal(p, q), n


def test_adapter_errors(tiny, tmp_path):
    arch, path = tiny
    hyc, _ = hyc_and_peft(path, bits=4, arch=arch)
    cls = ARCHS[arch][2]
    hyc.save_pretrained(tmp_path / "a")
    (tmp_path / "a" / "adapter_model.safetensors").rename(tmp_path / "a" / "adapter_model.bin")
    with pytest.raises(FileNotFoundError, match="only safetensors"):
        cls.from_pretrained(tmp_path / "a")
    other = save_tiny(tmp_path / "wide", arch=arch, hidden_size=72)
    hyc.save_pretrained(tmp_path / "b")
    with pytest.raises(ValueError, match=r"has shape \(5, 60\), the model expects \(5, 72\) \(another base model"):
        cls.from_pretrained(tmp_path / "b", base_model=other)
    with pytest.raises(ValueError, match="does not fit .* missing"):
        cls.from_pretrained(tmp_path / "b", hyclora_config=dict(r=5, target_modules=["q_proj", "v_proj", "o_proj",
                                                                "k_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]))
    cfg = json.loads((tmp_path / "b" / "adapter_config.json").read_text())
    (tmp_path / "b" / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": None}))
    with pytest.raises(ValueError, match="pass base_model="):
        cls.from_pretrained(tmp_path / "b")
