"""benchmarks/accuracy.py's functions and CLI on a tiny Llama and a sonnet (no SmolLM2, no network), so the
script cannot rot."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from .helpers import save_tiny, save_tiny_tokenizer
from .test_demo import SONNET

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def accuracy():
    spec = importlib.util.spec_from_file_location("bench_accuracy", BENCH / "accuracy.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = save_tiny(tmp_path_factory.mktemp("tiny") / "llama")
    return save_tiny_tokenizer(path, SONNET)


def test_grad_cosine_records(accuracy, tiny):
    configs = [("bits8", dict(bits=8)), ("bits2", dict(bits=2)),
               ("bits2 channel", dict(bits=2, group_size="channel", rotate=False)),
               ("bits2 memory", dict(bits=2, mode="memory")),
               ("bits2, all kept at 16", dict(bits=2, tensor_bits={name: 16 for name in accuracy.KEPT}))]
    records = accuracy.grad_cosine_records(tiny, SONNET * 8, configs=configs, batch_size=2, seq_len=16,
                                           log=lambda s: None)
    assert [r["name"] for r in records] == [n for n, _ in configs]
    by = {r["name"]: r for r in records}
    for r in records:
        assert r["suite"] == "accuracy" and r["task"] == "grad_cosine" and r["eval_loss"] is None
        assert r["n_parameters"] == 2 * 7 * 2  # 2 layers, 7 projections, A and B
        assert len(r["per_layer_median"]) == 2 and len(r["per_projection_median"]) == 14
        assert -1 <= r["cosine_worst"] <= r["cosine_median"] <= 1 + 1e-9
        assert r["loss"] == pytest.approx(r["loss_bits16"], rel=1e-6)  # compression touches only backward
    assert by["bits8"]["cosine_median"] > 0.999 and by["bits8"]["options"]["group_size"] == 64
    assert by["bits8"]["cosine_median"] > by["bits2"]["cosine_median"] > 0.5
    assert by["bits2 channel"]["options"] == dict(outlier_ratio=0.005, group_size="channel", rotate=False,
                                                  rounding="nearest", mode="speed", nonlinear_bits=None,
                                                  tensor_bits=None)
    # every tensor a layer keeps, named in call order, at 16 bits: the reference's gradients exactly
    assert by["bits2, all kept at 16"]["cosine_worst"] > 0.99999


def test_bits16_gradients_equal_peft(accuracy, tiny):
    """The reference, HyC at bits 16, is PEFT's LoRA: same gradients on the same fixed adapter state."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    ids = torch.randint(1, 101, (2, 12), generator=torch.Generator().manual_seed(0))
    state = accuracy._state(tiny, 0)
    _, grads = accuracy.lora_gradients(tiny, ids, state, 0, bits=16)
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny), LoraConfig(**accuracy.LORA))
    params = dict(peft.named_parameters())
    name = lambda n: "base_model.model." + n.replace(".weight", ".default.weight")  # noqa: E731
    with torch.no_grad():
        for n, v in state.items():
            params[name(n)].copy_(v)
    peft(input_ids=ids, labels=ids).loss.backward()
    for n, g in grads.items():
        assert (params[name(n)].grad - g).norm() <= 1e-4 * g.norm(), n


def test_finetune_records_and_cli(accuracy, tiny, tmp_path, monkeypatch):
    records = accuracy.finetune_records(tiny, SONNET * 8, SONNET, bits=(16, 2), steps=2, batch_size=2, seq_len=16,
                                        eval_windows=4, log=lambda s: None)
    assert [r["bits"] for r in records] == [16, 2] and records[0]["method"] == "lora (peft-equal)"
    for r in records:
        assert r["suite"] == "accuracy" and r["accuracy"] is None and r["steps"] == 2 and len(r["train_losses"]) == 2
        assert r["eval_loss"] > 0 and r["eval_loss_rel_gap_vs_bits16"] == pytest.approx(
            r["eval_loss"] / records[0]["eval_loss"] - 1)
    # same seed, same data: the first training loss (before any update) is the same at every bits
    assert records[0]["train_losses"][0] == pytest.approx(records[1]["train_losses"][0], rel=1e-6)

    # the CLI writes both record files (into a temporary results folder), Shakespeare swapped for the sonnet
    import hyclora_models.demo as demo

    monkeypatch.setattr(accuracy._common, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(demo, "shakespeare_texts", lambda: (SONNET * 8, SONNET, 1))
    monkeypatch.setattr(accuracy, "GRAD_CONFIGS", [("bits4", dict(bits=4))])
    accuracy.main(["--grad-cosine", "--finetune", "--model-dir", str(tiny), "--model", "tiny-llama", "--bits", "2",
                   "--steps", "1", "--batch-size", "2", "--seq-len", "16", "--eval-windows", "2"])
    grad = json.loads((tmp_path / "results" / "accuracy_grad_cosine_tiny-llama.json").read_text())
    ft = json.loads((tmp_path / "results" / "accuracy_finetune_tiny-llama.json").read_text())
    assert [r["name"] for r in grad] == ["bits4"] and grad[0]["model"] == "tiny-llama" and "commit" in grad[0]
    assert [r["bits"] for r in ft] == [2] and ft[0]["eval_loss_rel_gap_vs_bits16"] is None
