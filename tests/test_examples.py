"""examples/: the Trainer script trains, evaluates, saves adapter-only checkpoints and resumes from one with
the losses of an uninterrupted run."""

import importlib.util
import shutil
from pathlib import Path

import pytest
from safetensors import safe_open

from hyclora_models.lora import is_lora_name

from .helpers import save_tiny, save_tiny_tokenizer
from .test_demo import SONNET

ROOT = Path(__file__).resolve().parents[1]


def load_example(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def logged_after(trainer, key, step):
    """``key`` as logged at each step after ``step`` (a resumed run's history starts with the checkpoint's)."""
    return {h["step"]: h[key] for h in trainer.state.log_history if key in h and h["step"] > step}


def test_trainer_resumes_from_an_adapter_only_checkpoint(tmp_path):
    example = load_example("finetune_causal_lm")
    model = save_tiny_tokenizer(save_tiny(tmp_path / "tiny"), SONNET)
    (tmp_path / "data.txt").write_text(SONNET * 10)
    args = ["--model", str(model), "--data", str(tmp_path / "data.txt"), "--max-steps", "6", "--batch-size", "2",
            "--seq-len", "16", "--lr", "1e-2", "--save-steps", "3", "--logging-steps", "1"]
    full = example.main([*args, "--output-dir", str(tmp_path / "full")])

    checkpoint = tmp_path / "full" / "checkpoint-3"
    weights = {p.name for p in checkpoint.glob("*.safetensors")}
    assert weights == {"adapter_model.safetensors", "model.safetensors"} and not list(checkpoint.glob("pytorch_model*"))
    for name in weights:  # the adapter only
        with safe_open(checkpoint / name, "pt") as f:
            assert f.keys() and all(is_lora_name(k) for k in f.keys())

    shutil.copytree(checkpoint, tmp_path / "resumed" / "checkpoint-3")  # as if interrupted after step 3
    resumed = example.main([*args, "--output-dir", str(tmp_path / "resumed"), "--resume"])
    for key in ("loss", "grad_norm", "eval_loss"):
        want = logged_after(full, key, 3)
        assert want and logged_after(resumed, key, 3) == pytest.approx(want, rel=1e-6, abs=0), key
