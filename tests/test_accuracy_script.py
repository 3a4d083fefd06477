"""benchmarks/accuracy.py's functions and CLI on a tiny Llama and a sonnet (no SmolLM2, no network), so the
script cannot rot."""

import importlib
import importlib.util
import json

import pytest
import torch

from .helpers import load_script, save_tiny, save_tiny_tokenizer
from .test_demo import SONNET


@pytest.fixture(scope="module")
def accuracy():
    return load_script("benchmarks/accuracy.py", "bench_accuracy")


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
                                                  rounding="nearest", clip="auto", mode="speed", nonlinear_bits=None,
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


# --- bigbench arithmetic ----------------------------------------------------------------------------------

def _fake_bigbench(root, n=30):
    """An extracted-sdist layout with the two arithmetic task files (n examples each)."""
    g = torch.Generator().manual_seed(0)
    for sub, word, op in (("2_digit_addition", "plus", int.__add__), ("2_digit_subtraction", "minus", int.__sub__)):
        pairs = torch.randint(0, 100, (n, 2), generator=g).tolist()
        examples = [dict(input=f"What is {a} {word} {b}?", target=str(op(a, b))) for a, b in pairs]
        d = root / "bigbench-1.0.0" / "bigbench" / "benchmark_tasks" / "arithmetic" / sub
        d.mkdir(parents=True)
        (d / "task.json").write_text(json.dumps(dict(name=sub, examples=examples)))
    return root


def test_bigbench_task_found_or_named(accuracy, tmp_path):
    root = _fake_bigbench(tmp_path / "bb")
    for where in (root, root / "bigbench-1.0.0", root / "bigbench-1.0.0" / "bigbench" / "benchmark_tasks"):
        assert len(accuracy.bigbench_task("arithmetic/2_digit_addition", where)["examples"]) == 30
    with pytest.raises(SystemExit, match="pip download --no-deps bigbench"):
        accuracy.bigbench_task("arithmetic/2_digit_addition", tmp_path / "nowhere")
    train, held_out = accuracy.arithmetic_split(root, n_eval=10)
    assert len(train) == 50 and len(held_out) == 10 and not set(train) & set(held_out)
    prompt, answer = held_out[0]
    assert prompt.startswith("Q: What is ") and prompt.endswith("?\nA:") and answer.startswith(" ")
    assert answer.endswith("\n") and int(answer) == eval(prompt[11:-4].replace("plus", "+").replace("minus", "-"))
    assert accuracy.arithmetic_split(root, n_eval=10) == (train, held_out)  # a fixed split


def test_qa_batch_labels_only_answers(accuracy):
    ids, labels = accuracy.qa_batch([([5, 6, 7], [8, 9]), ([5], [3])], pad_id=0)
    assert ids.tolist() == [[5, 6, 7, 8, 9], [5, 3, 0, 0, 0]]
    assert labels.tolist() == [[-100, -100, -100, 8, 9], [-100, 3, -100, -100, -100]]


class _Scripted(torch.nn.Module):
    """Greedily 'decodes' the scripted continuation of each known prompt (one-hot logits)."""

    def __init__(self, script, vocab):
        super().__init__()
        self.script, self.vocab = {tuple(p): c for p, c in script}, vocab

    def forward(self, input_ids, use_cache=False, logits_to_keep=0):
        logits = torch.zeros(*input_ids.shape, self.vocab)
        for i, row in enumerate(input_ids.tolist()):
            prompt = next(p for p in self.script if tuple(row[:len(p)]) == p)
            logits[i, -1, self.script[prompt][len(row) - len(prompt)]] = 1
        return type("Out", (), dict(logits=logits))


def test_exact_match_greedy(accuracy, tiny):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny)
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    nl = enc("a\nb")[1:-1] or enc("\n")
    prompts = [enc("Shall I"), enc("Thou art more"), enc("Rough winds")]  # lengths differ: decoded apart
    said = [enc("compare") + nl + enc("x" * 6), enc("summer") * 3, enc("do") + nl * 6]  # 6 tokens are decoded
    pairs = [(p, None) for p in prompts]
    model = _Scripted(list(zip(prompts, said)), len(tok))
    got = accuracy.greedy_answers(model, tok, prompts, batch_size=2)
    assert got == ["compare", "summer summer summer", "do"]
    assert accuracy.exact_match(model, tok, pairs, [" compare\n", " summer\n", " do\n"], 2) == pytest.approx(2 / 3)


def test_arithmetic_records_and_cli(accuracy, tmp_path, monkeypatch):
    root = _fake_bigbench(tmp_path / "bb")
    train, held_out = accuracy.arithmetic_split(root, n_eval=8)
    path = save_tiny(tmp_path / "llama")
    save_tiny_tokenizer(path, "".join(p + a for p, a in train) * 4)
    configs = accuracy.method_configs([16, 2], nonlinear_bits=8, options=dict(rounding="stochastic"))
    assert [(c.bits, c.nonlinear_bits, c.rounding) for c in configs] == [(16, None, "nearest"), (2, 8, "stochastic")]
    records = accuracy.arithmetic_records(path, train, held_out, configs=configs, steps=3, batch_size=4,
                                          log=lambda s: None)
    assert [r["bits"] for r in records] == [16, 2]
    for r in records:
        assert r["suite"] == "accuracy" and r["task"] == accuracy.ARITHMETIC_TASK and r["steps"] == 3
        assert 0 <= r["accuracy"] <= 1 and r["eval_loss"] > 0 and len(r["train_losses"]) == 3
        assert r["n_train"] == 52 and r["n_eval"] == 8 and r["eval_loss"] != r["eval_loss_before"]
    assert records[1]["options"]["rounding"] == "stochastic" and records[1]["options"]["nonlinear_bits"] == 8
    assert records[1]["accuracy_gap_vs_bits16"] == pytest.approx(records[1]["accuracy"] - records[0]["accuracy"])
    # same seed, same data order, same initial adapter: the same first training loss at every bits
    assert records[0]["train_losses"][0] == pytest.approx(records[1]["train_losses"][0], rel=1e-6)

    import hyclora_models.demo as demo

    monkeypatch.setattr(accuracy._common, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(demo, "shakespeare_texts", lambda: (SONNET * 8, SONNET, 1))
    accuracy.main(["--task", "arithmetic", "--bigbench-dir", str(root), "--model-dir", str(path), "--model", "tiny",
                   "--bits", "4", "--option", "group_size=channel", "--option", "rotate=False", "--steps", "1",
                   "--batch-size", "4", "--n-eval", "4", "--tag", "_x"])
    out = json.loads((tmp_path / "results" / "accuracy_arithmetic_tiny_x.json").read_text())
    assert [r["bits"] for r in out] == [4] and out[0]["n_eval"] == 4 and "commit" in out[0]
    assert out[0]["options"]["group_size"] == "channel" and out[0]["options"]["rotate"] is False
    with pytest.raises(SystemExit):
        accuracy.main(["--task", "arithmetic", "--option", "bits=2"])
    with pytest.raises(SystemExit, match="bigbench"):
        accuracy.main(["--task", "arithmetic", "--bigbench-dir", str(tmp_path / "none"), "--model-dir", str(path)])


# --- an encoder on a bigbench classification task -------------------------------------------------------

def test_classification_records_and_cli(accuracy, tmp_path, monkeypatch):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    from .test_minilm_roberta import tiny_bert

    words = "Amelia Joseph knows assumes thinks that a dog cat runs sleeps".split()
    g = torch.Generator().manual_seed(0)
    examples = []
    for i in range(40):
        w = [words[j] for j in torch.randint(0, len(words), (6,), generator=g).tolist()]
        examples.append(dict(input=f"Premise: {' '.join(w[:4])}. Hypothesis: {' '.join(w[4:])}.",
                             target_scores={"entailment": i % 2, "non-entailment": 1 - i % 2}))
    d = tmp_path / "bb" / "benchmark_tasks" / "toy_entailment"
    d.mkdir(parents=True)
    (d / "task.json").write_text(json.dumps(dict(examples=examples)))
    train, held_out, names = accuracy.classification_split("toy_entailment", tmp_path / "bb", n_eval=8)
    assert names == ["entailment", "non-entailment"] and len(train) == 32 and len(held_out) == 8
    assert all(p is not None and not t.startswith("Premise") for t, p, _ in train)

    # a tiny BERT with a word-level tokenizer, converted as all-MiniLM-L6-v2 is
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", ".", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()])
    tok.post_processor = TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
                                            special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    path = tmp_path / "enc"
    importlib.import_module("minilm_roberta").bert_to_roberta(tiny_bert()).save_pretrained(path)
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]").save_pretrained(path)

    configs = accuracy.method_configs([16, 2], options=dict(group_size="channel", rotate=False),
                                      lora=accuracy.ENCODER_LORA)
    records = accuracy.classification_records(path, train, held_out, 2, task="toy_entailment", configs=configs,
                                              steps=3, batch_size=8, log=lambda s: None)
    assert [r["bits"] for r in records] == [16, 2] and records[1]["options"]["group_size"] == "channel"
    for r in records:
        assert r["task"] == "bigbench toy_entailment" and 0 <= r["accuracy"] <= 1 and len(r["train_losses"]) == 3
        assert r["accuracy"] in {k / 8 for k in range(9)} and r["eval_loss"] != r["eval_loss_before"]
    # same head and adapter initialisation, same data order: the same first loss
    assert records[0]["train_losses"][0] == pytest.approx(records[1]["train_losses"][0], rel=1e-6)

    monkeypatch.setattr(accuracy._common, "RESULTS", tmp_path / "results")
    accuracy.main(["--task", "toy_entailment", "--bigbench-dir", str(tmp_path / "bb"), "--model-dir", str(path),
                   "--bits", "4", "--steps", "1", "--batch-size", "8", "--n-eval", "8"])
    out = json.loads((tmp_path / "results" / "accuracy_toy_entailment_all-minilm-l6-v2.json").read_text())
    assert [r["bits"] for r in out] == [4] and out[0]["model"] == accuracy.ENCODER
