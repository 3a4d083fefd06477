"""python -m hyclora_models.convert: merge (vanilla transformers loads the result, logits as PEFT's), export,
import, and the one-line errors."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

import hyclora_models as H
from hyclora_models.convert.__main__ import main
from hyclora_models.modeling_utils import hyclora_config_of

from .helpers import ARCHS, batch, eval_logits, hyc_and_peft, save_tiny

ROOT = Path(__file__).resolve().parents[1]
PEFT_FILES = {"adapter_config.json", "adapter_model.safetensors", "README.md"}


@pytest.fixture(scope="module", params=["llama", "mistral"])
def tiny(request, tmp_path_factory):
    """(arch, base dir, our adapter dir with random non-zero LoRA weights)."""
    arch, tmp = request.param, tmp_path_factory.mktemp(request.param)
    base = save_tiny(tmp / "base", arch=arch)
    return arch, base, save_adapter(base, tmp / "adapter", arch)


def save_adapter(base, directory, arch="llama"):
    hyc_and_peft(base, bits=4, arch=arch)[0].save_pretrained(directory)
    return directory


def run(*argv):
    main([str(a) for a in argv])


def peft_logits(arch, base, adapter, b, merged=False):
    from peft import PeftModel

    model = PeftModel.from_pretrained(ARCHS[arch][1].from_pretrained(base), adapter)
    return eval_logits(model.merge_and_unload() if merged else model, b)


def test_merge_matches_peft(tiny, tmp_path):
    arch, base, adapter = tiny
    run("merge", "--adapter", adapter, "--out", tmp_path / "out")  # base: the adapter's base_model_name_or_path
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"config.json", "model.safetensors",
                                                              "generation_config.json"}
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert type(merged) is ARCHS[arch][1] and merged.config.model_type == arch
    logits = eval_logits(merged, batch())
    torch.testing.assert_close(logits, peft_logits(arch, base, adapter, batch()))
    torch.testing.assert_close(logits, peft_logits(arch, base, adapter, batch(), merged=True))
    assert not torch.allclose(logits, eval_logits(ARCHS[arch][1].from_pretrained(base), batch()), atol=1e-3)


def test_merge_hyc_base_config_to_standard_and_dtype(tiny, tmp_path):
    """A base whose config.json is ours (hyc_llama...) gives the standard config; --dtype casts."""
    arch, base, adapter = tiny
    hyc_base = shutil.copytree(base, tmp_path / "hyc_base")
    ARCHS[arch][2].from_pretrained(base).config.save_pretrained(hyc_base)
    assert json.loads((hyc_base / "config.json").read_text())["model_type"] == f"hyc_{arch}"
    run("merge", "--adapter", adapter, "--base", hyc_base, "--out", tmp_path / "out", "--dtype", "bfloat16")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == arch and "hyclora_config" not in config and config["dtype"] == "bfloat16"
    assert config["architectures"] == [ARCHS[arch][1].__name__]
    assert {t.dtype for t in load_file(tmp_path / "out" / "model.safetensors").values()} == {torch.bfloat16}
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    torch.testing.assert_close(eval_logits(merged, batch()), peft_logits(arch, base, adapter, batch()),
                               rtol=0.05, atol=0.05)


def test_hyc_classes_follow_the_naming_merge_maps_back():
    for cls in (H.HyCLlamaForCausalLM, H.HyCMistralForCausalLM):
        assert cls.config_class.model_type == "hyc_" + cls.base_model_type
        assert cls.__name__ == "HyC" + cls.__bases__[-1].__name__  # HyCLlamaForCausalLM(Mixin, LlamaForCausalLM)


def test_merge_peft_patterns_rslora_into_sharded_base(tmp_path):
    """A PEFT adapter with rank_pattern / alpha_pattern / use_rslora, a sharded base with tokenizer files."""
    from peft import LoraConfig, get_peft_model

    save_tiny(tmp_path / "one")
    base = tmp_path / "base"
    vanilla = AutoModelForCausalLM.from_pretrained(tmp_path / "one")
    vanilla.save_pretrained(base, max_shard_size="40KB")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (base / name).write_text("{}")
    assert (base / "model.safetensors.index.json").is_file()
    config = LoraConfig(r=4, lora_alpha=6, target_modules=["q_proj", "v_proj", "down_proj"], use_rslora=True,
                        rank_pattern={"v_proj": 2}, alpha_pattern={r"layers\.1\.mlp\.down_proj": 13})
    peft = get_peft_model(vanilla, config)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in (p for n, p in peft.named_parameters() if "lora_" in n):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    expected = eval_logits(peft, batch())
    peft.save_pretrained(tmp_path / "adapter")

    run("merge", "--adapter", tmp_path / "adapter", "--base", base, "--out", tmp_path / "out")
    out = tmp_path / "out"
    assert {p.name for p in base.iterdir()} == {p.name for p in out.iterdir()}  # same shards, tokenizer copied
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == json.loads((base / "model.safetensors.index.json").read_text())["weight_map"]
    torch.testing.assert_close(eval_logits(AutoModelForCausalLM.from_pretrained(out), batch()), expected)


def test_merge_roberta_modules_to_save(tmp_path):
    """PEFT SEQ_CLS adapter: LoRA on query/value plus the classifier head (modules_to_save), on a vanilla
    RobertaForSequenceClassification."""
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import RobertaConfig, RobertaForSequenceClassification

    torch.manual_seed(0)
    RobertaForSequenceClassification(RobertaConfig(
        vocab_size=50, hidden_size=24, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
        max_position_embeddings=40, num_labels=3)).save_pretrained(tmp_path / "base")
    peft = get_peft_model(RobertaForSequenceClassification.from_pretrained(tmp_path / "base"),
                          LoraConfig(task_type=TaskType.SEQ_CLS, r=4, lora_alpha=8, target_modules=["query", "value"]))
    with torch.no_grad():
        for p in (p for p in peft.parameters() if p.requires_grad):  # LoRA and the classifier's trained copy
            p.add_(torch.randn_like(p) * 0.1)
    peft.save_pretrained(tmp_path / "adapter")
    keys = set(load_file(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert "base_model.model.classifier.dense.weight" in keys  # PEFT's key for a modules_to_save weight

    ids = torch.randint(3, 50, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = peft.eval()(input_ids=ids).logits

    headless = shutil.copytree(tmp_path / "base", tmp_path / "headless")  # a base without the head: merge adds it
    weights = load_file(headless / "model.safetensors")
    save_file({k: v for k, v in weights.items() if not k.startswith("classifier.")}, headless / "model.safetensors")
    for base, out in [(None, tmp_path / "out"), (headless, tmp_path / "out_headless")]:
        run("merge", "--adapter", tmp_path / "adapter", "--out", out, *(["--base", base] if base else []))
        merged = AutoModelForSequenceClassification.from_pretrained(out)
        with torch.no_grad():
            torch.testing.assert_close(merged.eval()(input_ids=ids).logits, expected)


def test_merge_fetches_a_hub_base(tiny, tmp_path, monkeypatch, capsys):
    import huggingface_hub

    arch, base, adapter = tiny
    asked = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kw: asked.append(repo_id) or str(base))
    run("merge", "--adapter", edit_config(adapter, tmp_path / "a", base_model_name_or_path="org/tiny"),
        "--out", tmp_path / "out")
    assert asked == ["org/tiny"]
    torch.testing.assert_close(eval_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "out"), batch()),
                               peft_logits(arch, base, adapter, batch()))

    def offline(repo_id, **kw):
        raise OSError("no connection\nsecond line")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    capsys.readouterr()
    with pytest.raises(SystemExit):
        run("merge", "--adapter", tmp_path / "a", "--out", tmp_path / "out2")
    assert capsys.readouterr().err == ("error: base model org/tiny: no such directory, and fetching it from the Hub "
                                       "failed (OSError: no connection)\n")


def test_export_then_import_round_trip(tiny, tmp_path):
    from peft import PeftModel

    arch, base, adapter = tiny
    run("export", "--adapter", adapter, "--out", tmp_path / "peft")
    assert {p.name for p in (tmp_path / "peft").iterdir()} == PEFT_FILES
    peft = PeftModel.from_pretrained(ARCHS[arch][1].from_pretrained(base), tmp_path / "peft")

    run("import", "--adapter", tmp_path / "peft", "--out", tmp_path / "hyc", "--bits", 8, "--outlier-ratio", 0.02,
        "--mode", "memory")
    assert {p.name for p in (tmp_path / "hyc").iterdir()} == PEFT_FILES | {"hyclora_config.json"}
    hyc = ARCHS[arch][2].from_pretrained(tmp_path / "hyc")
    settings = hyclora_config_of(hyc.config)
    assert (settings.bits, settings.outlier_ratio, settings.mode, settings.r, settings.lora_alpha) == \
        (8, 0.02, "memory", 5, 7)
    torch.testing.assert_close(eval_logits(hyc, batch()), eval_logits(peft, batch()))


def edit_config(adapter, directory, **changes):
    shutil.copytree(adapter, directory)
    config = json.loads((directory / "adapter_config.json").read_text())
    (directory / "adapter_config.json").write_text(json.dumps({**config, **changes}))
    return directory


@pytest.fixture
def broken(tmp_path):
    """Named adapter and base directories that each break one rule, built from a llama tiny adapter."""
    base = save_tiny(tmp_path / "base")
    adapter = save_adapter(base, tmp_path / "adapter")
    bin_only = shutil.copytree(adapter, tmp_path / "bin_only")
    (bin_only / "adapter_model.safetensors").rename(bin_only / "adapter_model.bin")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    lora_base = shutil.copytree(base, tmp_path / "lora_base")
    save_file({**load_file(base / "model.safetensors"), "model.layers.0.mlp.up_proj.lora_A.weight": torch.zeros(5, 60)},
              lora_base / "model.safetensors")
    half = shutil.copytree(adapter, tmp_path / "half")
    weights = load_file(half / "adapter_model.safetensors")
    save_file({k: v for k, v in weights.items() if "q_proj.lora_B" not in k}, half / "adapter_model.safetensors")
    return dict(
        tmp=tmp_path, adapter=adapter, base=base, bin_only=bin_only, full=tmp_path / "full", half=half,
        lora_base=lora_base,
        wide=save_tiny(tmp_path / "wide", hidden_size=72),
        ia3=edit_config(adapter, tmp_path / "ia3", peft_type="IA3"),
        dora=edit_config(adapter, tmp_path / "dora", use_dora=True),
        no_base=edit_config(adapter, tmp_path / "no_base", base_model_name_or_path=None))


ERRORS = [  # argv (names from ``broken``), what the one-line message says
    (["merge", "--adapter", "{tmp}/nowhere", "--out", "{tmp}/o"], "no adapter_config.json in"),
    (["merge", "--adapter", "{bin_only}", "--out", "{tmp}/o"], "convert it to safetensors"),
    (["merge", "--adapter", "{adapter}", "--base", "{wide}", "--out", "{tmp}/o"],
     r"does not fit base model .*\.weight has shape \(72, \d+\), lora_B @ lora_A gives \(60, 5\) @ .*another base"),
    (["merge", "--adapter", "{adapter}", "--base", "{tmp}/nowhere", "--out", "{tmp}/o"], "no such directory"),
    (["merge", "--adapter", "{no_base}", "--out", "{tmp}/o"], "names no base_model_name_or_path; pass --base"),
    (["merge", "--adapter", "{adapter}", "--base", "{lora_base}", "--out", "{tmp}/o"],
     r"holds LoRA weights \(model.layers.0.mlp.up_proj.lora_A.weight...\); merge needs the plain base"),
    (["merge", "--adapter", "{ia3}", "--out", "{tmp}/o"], "peft_type 'IA3'; only LORA"),
    (["merge", "--adapter", "{dora}", "--out", "{tmp}/o"], "use_dora set; merge supports plain LoRA"),
    (["merge", "--adapter", "{half}", "--out", "{tmp}/o"], "q_proj has lora_A but not its pair"),
    (["merge", "--adapter", "{adapter}", "--out", "{full}"], "exists and is not an empty directory"),
    (["export", "--adapter", "{base}", "--out", "{tmp}/o"], "not an adapter directory"),
    (["import", "--adapter", "{bin_only}", "--out", "{tmp}/o"], "only safetensors adapters are supported"),
    (["import", "--adapter", "{adapter}", "--out", "{tmp}/o", "--bits", "3"], r"bits must be one of \(2, 4, 8, 16\)"),
    (["import", "--adapter", "{ia3}", "--out", "{tmp}/o"], "peft_type 'IA3'"),
]


def test_errors_are_one_line(broken, capsys):
    import re

    for argv, message in ERRORS:
        with pytest.raises(SystemExit) as exit_:
            run(*(a.format(**broken) for a in argv))
        err = capsys.readouterr().err
        assert exit_.value.code == 1 and err.startswith("error: ") and err.count("\n") == 1, (argv, err)
        assert re.search(message, err), (argv, err)
        assert not (broken["tmp"] / "o").exists(), argv  # nothing written


def test_cli_entry_point_and_help(broken, capsys):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "hyclora_models.convert", "merge", "--adapter", str(broken["adapter"]),
                           "--base", str(broken["wide"]), "--out", str(broken["tmp"] / "o")],
                          capture_output=True, text=True, env=env, cwd=ROOT)
    assert done.returncode == 1 and done.stderr.startswith("error: adapter ") and done.stderr.count("\n") == 1
    assert "Traceback" not in done.stderr
    for command in ("merge", "export", "import"):
        with pytest.raises(SystemExit) as exit_:
            run(command, "--help")
        assert exit_.value.code == 0 and "--adapter" in capsys.readouterr().out
