"""examples/: the Trainer script trains, evaluates, saves adapter-only checkpoints and resumes from one with
the losses of an uninterrupted run; so does TRL's SFTTrainer where TRL is installed."""

import shutil
from pathlib import Path

import pytest
from safetensors import safe_open

import hyclora_models as H
from hyclora_models.lora import is_lora_name

from .helpers import load_script, save_tiny, save_tiny_tokenizer
from .test_demo import SONNET

ROOT = Path(__file__).resolve().parents[1]


def load_example(name):
    return load_script(f"examples/{name}.py")


def logged_after(trainer, key, step):
    """``key`` as logged at each step after ``step`` (a resumed run's history starts with the checkpoint's)."""
    return {h["step"]: h[key] for h in trainer.state.log_history if key in h and h["step"] > step}


def assert_resumes_like_uninterrupted(tmp_path, train):
    """``train(output_dir, resume)`` runs 6 steps, checkpointing every 3. Checkpoint 3 holds the adapter and no
    base weights; resumed from it (alone, as if interrupted), steps 4-6 log what the uninterrupted run logged."""
    full = train(tmp_path / "full", False)
    assert logged_after(full, "loss", 3)
    checkpoint = tmp_path / "full" / "checkpoint-3"
    weights = {p.name for p in checkpoint.glob("*.safetensors")}
    assert weights == {"adapter_model.safetensors", "model.safetensors"} and not list(checkpoint.glob("pytorch_model*"))
    for name in weights:
        with safe_open(checkpoint / name, "pt") as f:
            assert f.keys() and all(is_lora_name(k) for k in f.keys())

    shutil.copytree(checkpoint, tmp_path / "resumed" / "checkpoint-3")
    resumed = train(tmp_path / "resumed", True)
    for key in ("loss", "grad_norm", "eval_loss"):
        want = logged_after(full, key, 3)
        assert logged_after(resumed, key, 3) == pytest.approx(want, rel=1e-6, abs=0), key
    return full


@pytest.fixture
def tiny_with_tokenizer(tmp_path):
    return save_tiny_tokenizer(save_tiny(tmp_path / "tiny"), SONNET)


def test_trainer_script_resumes_from_an_adapter_only_checkpoint(tmp_path, tiny_with_tokenizer):
    example = load_example("finetune_causal_lm")
    (tmp_path / "data.txt").write_text(SONNET * 10)
    args = ["--model", str(tiny_with_tokenizer), "--data", str(tmp_path / "data.txt"), "--max-steps", "6",
            "--batch-size", "2", "--seq-len", "16", "--lr", "1e-2", "--save-steps", "3", "--logging-steps", "1"]
    full = assert_resumes_like_uninterrupted(
        tmp_path, lambda out, resume: example.main([*args, "--output-dir", str(out)] + ["--resume"] * resume))
    assert sorted(logged_after(full, "loss", 0)) == [1, 2, 3, 4, 5, 6] and logged_after(full, "eval_loss", 3)
    assert (tmp_path / "full" / "adapter_model.safetensors").is_file()  # save_model() at the end


def test_trl_sft_trainer_resumes_from_an_adapter_only_checkpoint(tmp_path, tiny_with_tokenizer):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from transformers import AutoTokenizer

    data = datasets.Dataset.from_dict({"text": [line for line in SONNET.splitlines() if line] * 8})

    def train(out, resume):
        model = H.HyCLlamaForCausalLM.from_pretrained(tiny_with_tokenizer, hyclora_config=dict(r=4, lora_dropout=0.1))
        args = trl.SFTConfig(output_dir=str(out), max_steps=6, per_device_train_batch_size=2, learning_rate=1e-2,
                             logging_steps=1, save_steps=3, max_length=16, bf16=False, report_to="none", seed=0)
        trainer = trl.SFTTrainer(model=model, args=args, train_dataset=data,
                                 processing_class=AutoTokenizer.from_pretrained(tiny_with_tokenizer))
        trainer.train(resume_from_checkpoint=resume or None)
        return trainer

    assert_resumes_like_uninterrupted(tmp_path, train)
