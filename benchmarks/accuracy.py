"""Accuracy of HyC's compressed backward on a real model (SmolLM2-135M-Instruct, Shakespeare): issue 7's
first slice. Runs on CPU (the torch reference path) or a GPU.

    # LoRA gradient cosine of each compression setting vs bits 16 (= PEFT) on one batch of real text
    python benchmarks/accuracy.py --grad-cosine [--batch-size 4 --seq-len 256]
    # same-seed, same-data-order fine-tunes; held-out loss on The Tempest
    python benchmarks/accuracy.py --finetune [--bits 16 4 2 --steps 40 --batch-size 8 --seq-len 128]

Model and text as ``python -m hyclora_models.demo`` (``smollm2_checkpoint``, ``shakespeare_texts``); the
fine-tune is the demo's ``finetune`` (LoRA r16 alpha 32 on all 7 projections, AdamW, linear decay).
Records: results/accuracy_grad_cosine_<model>.json, results/accuracy_finetune_<model>.json (suite "accuracy").
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from unittest.mock import patch

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

from hyclora_models import HyCLlamaForCausalLM, HyCLoRAConfig  # noqa: E402
from hyclora_models.demo import LORA, finetune  # noqa: E402

MODEL = "SmolLM2-135M-Instruct"
COMPRESSION_KEYS = ("outlier_ratio", "group_size", "rotate", "rounding", "mode", "nonlinear_bits")
# (name, HyCLoRAConfig entries): the library defaults except where named
GRAD_CONFIGS = [
    ("bits8", dict(bits=8)),
    ("bits4", dict(bits=4)),
    ("bits4 channel", dict(bits=4, group_size="channel", rotate=False)),
    ("bits4 no-rotate", dict(bits=4, rotate=False)),
    ("bits2", dict(bits=2)),
    ("bits2 channel", dict(bits=2, group_size="channel", rotate=False)),
    ("bits2 g32", dict(bits=2, group_size=32)),
    ("bits2 no-rotate", dict(bits=2, rotate=False)),
    ("bits2 stochastic", dict(bits=2, rounding="stochastic")),
    ("bits2 outliers 0", dict(bits=2, outlier_ratio=0.0)),
    ("bits2 outliers 0.02", dict(bits=2, outlier_ratio=0.02)),
    ("bits2 memory", dict(bits=2, mode="memory")),
    # which kept tensor's quantisation costs the gradient: 2 bits but the named ones at 8 or 4 bits
    ("bits2, q+k at 8", dict(bits=2, tensor_bits=dict(q=8, k=8))),
    ("bits2, gate+up at 8", dict(bits=2, tensor_bits=dict(gate=8, up=8))),
    ("bits2, x+x_mid+v+attn_out at 8", dict(bits=2, tensor_bits=dict(x=8, x_mid=8, v=8, attn_out=8))),
    ("bits2, q+k+gate+up at 8", dict(bits=2, tensor_bits=dict(q=8, k=8, gate=8, up=8))),
    ("bits2, q+k+gate+up at 4", dict(bits=2, tensor_bits=dict(q=4, k=4, gate=4, up=4))),
    # the library option that does the above (HyCLoRAConfig.nonlinear_bits)
    ("bits2 nonlinear8", dict(bits=2, nonlinear_bits=8)),
    ("bits2 nonlinear4", dict(bits=2, nonlinear_bits=4)),
    ("bits4 nonlinear8", dict(bits=4, nonlinear_bits=8)),
]


def options_of(config: HyCLoRAConfig) -> dict:
    return {k: getattr(config, k) for k in COMPRESSION_KEYS}


def train_windows(ids: torch.Tensor, n: int, seq_len: int, seed: int) -> torch.Tensor:
    """``n`` random ``seq_len``-token windows of ``ids`` (seeded)."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - seq_len, (n,), generator=g)
    return ids[starts[:, None] + torch.arange(seq_len)]


def fixed_lora_state(model, seed: int, b_std: float = 0.01) -> dict[str, torch.Tensor]:
    """A fixed non-zero adapter state: A ~ N(0, 1/in_features), B ~ N(0, b_std^2) (B non-zero so that A's
    gradient is too)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            std = p.shape[1] ** -0.5 if ".lora_A." in name else b_std
            state[name] = torch.randn(p.shape, generator=g) * std
    return state


# what a decoder layer compresses in speed mode, in the order it does (hyclora_models.decoder._Step.forward)
KEPT = ("x", "q", "k", "v", "attn_out", "x_mid", "gate", "up")


@contextmanager
def tensor_bits(bits: dict | None):
    """Within the block, the decoder layers keep the tensors named in ``bits`` (names of KEPT) at those bits
    instead of the config's: a diagnostic (speed mode only), not a library option."""
    if not bits:
        yield
        return
    from hyclora_models import compression, decoder, fused

    calls = [0]

    def compress(x, **kw):
        name = KEPT[calls[0] % len(KEPT)]
        calls[0] += 1
        return compression.compress(x, **{**kw, "bits": bits.get(name, kw["bits"])})

    with patch.object(decoder, "compress", compress), patch.object(fused, "compress", compress):
        yield


def lora_gradients(model_dir, ids: torch.Tensor, state: dict, seed: int, tensor_bits_=None,
                   **config) -> tuple[float, dict]:
    """Loss and LoRA gradients of HyCLlamaForCausalLM (LORA's r/alpha/targets plus ``config``) on ``ids``
    with the adapter set to ``state`` (and ``tensor_bits_``: see ``tensor_bits``)."""
    model = HyCLlamaForCausalLM.from_pretrained(model_dir, hyclora_config=HyCLoRAConfig(**LORA, **config),
                                                dtype=torch.float32).train()
    params = dict(model.named_parameters())
    assert set(state) == {n for n, p in params.items() if p.requires_grad}
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)
    torch.manual_seed(seed)  # stochastic rounding's draws
    with tensor_bits(tensor_bits_):
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    return loss.item(), {n: params[n].grad.detach().clone() for n in state}


def _layer_of(name: str) -> int:
    return int(name.split(".layers.")[1].split(".")[0])


def _projection_of(name: str) -> str:
    return name.split(".lora_")[0].rpartition(".")[2] + "." + name.split(".lora_")[1][0]  # e.g. "q_proj.A"


def cosine_summary(grads: dict, ref: dict) -> dict:
    cos = {n: torch.nn.functional.cosine_similarity(grads[n].flatten().double(), ref[n].flatten().double(),
                                                    0).item() for n in ref}
    layers = sorted({_layer_of(n) for n in cos})
    projs = sorted({_projection_of(n) for n in cos})
    worst = min(cos, key=cos.get)
    return dict(cosine_median=statistics.median(cos.values()), cosine_worst=cos[worst], worst_parameter=worst,
                cosine_mean=statistics.fmean(cos.values()), n_parameters=len(cos),
                per_layer_median=[statistics.median(c for n, c in cos.items() if _layer_of(n) == i) for i in layers],
                per_layer_worst=[min(c for n, c in cos.items() if _layer_of(n) == i) for i in layers],
                per_projection_median={p: statistics.median(c for n, c in cos.items() if _projection_of(n) == p)
                                       for p in projs})


def grad_cosine_records(model_dir, text: str, *, configs=None, batch_size: int = 4, seq_len: int = 256,
                        seed: int = 0, model: str = MODEL, log=print) -> list[dict]:
    """One batch of ``batch_size`` x ``seq_len`` random windows of ``text``; for each config the LoRA
    gradients' cosine to bits 16's (which equals PEFT's), per parameter, summarised overall, by layer and by
    projection."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = train_windows(torch.tensor(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]),
                        batch_size, seq_len, seed)
    t0 = time.perf_counter()
    state = _state(model_dir, seed)
    ref_loss, ref = lora_gradients(model_dir, ids, state, seed, bits=16)
    log(f"bits16 (reference): loss {ref_loss:.4f}, {len(ref)} LoRA parameters, {time.perf_counter() - t0:.0f} s")
    records = []
    for name, entries in GRAD_CONFIGS if configs is None else configs:
        t0 = time.perf_counter()
        entries = dict(entries)
        per_tensor = entries.pop("tensor_bits", None)
        config = HyCLoRAConfig(**LORA, **entries)
        loss, grads = lora_gradients(model_dir, ids, state, seed, tensor_bits_=per_tensor, **entries)
        s = cosine_summary(grads, ref)
        log(f"{name:22s} median {s['cosine_median']:.4f}  worst {s['cosine_worst']:.4f} ({s['worst_parameter']})"
            f"  layer medians min {min(s['per_layer_median']):.4f}  {time.perf_counter() - t0:.0f} s")
        records.append(dict(suite="accuracy", model=model, task="grad_cosine", method="hyc", name=name,
                            bits=config.bits, options={**options_of(config), "tensor_bits": per_tensor},
                            eval_loss=None, accuracy=None, steps=0,
                            seed=seed, batch_size=batch_size, seq_len=seq_len, text="shakespeare (training plays)",
                            loss=loss, loss_bits16=ref_loss, reference="hyc bits 16 (= peft lora)",
                            lora=dict(r=LORA["r"], lora_alpha=LORA["lora_alpha"], targets="all 7 projections"),
                            lora_state="A ~ N(0, 1/in), B ~ N(0, 0.01^2)", **s))
    return records


_STATES: dict = {}


def _state(model_dir, seed):
    key = (str(model_dir), seed)
    if key not in _STATES:
        model = HyCLlamaForCausalLM.from_pretrained(model_dir, hyclora_config=HyCLoRAConfig(**LORA, bits=16))
        _STATES[key] = fixed_lora_state(model, seed)
    return _STATES[key]


def finetune_records(model_dir, train_text: str, eval_text: str, *, bits=(16, 4, 2), steps: int = 40,
                     batch_size: int = 8, seq_len: int = 128, lr: float = 1e-3, eval_windows: int = 64,
                     seed: int = 0, nonlinear_bits=None, model: str = MODEL, log=print,
                     on_record=None) -> list[dict]:
    """The demo's fine-tune at each of ``bits`` (library defaults otherwise; ``nonlinear_bits`` for the
    compressed ones), same seed and data order; held-out loss on the first ``eval_windows`` windows of
    ``eval_text``. ``on_record(records)`` after each."""
    records = []
    for b in bits:
        t0 = time.perf_counter()
        nl = nonlinear_bits if b != 16 else None
        with tempfile.TemporaryDirectory() as out:
            r = finetune(model_dir, train_text, eval_text, out, steps=steps, batch_size=batch_size, seq_len=seq_len,
                         lr=lr, eval_windows=eval_windows, bits=b, nonlinear_bits=nl, new_tokens=1, seed=seed,
                         log=lambda s: None)
        seconds = time.perf_counter() - t0
        config = HyCLoRAConfig(**LORA, bits=b, nonlinear_bits=nl)
        records.append(dict(suite="accuracy", model=model, task="shakespeare_lm (held out: The Tempest)",
                            method="lora (peft-equal)" if b == 16 else "hyc", bits=b, options=options_of(config),
                            eval_loss=r["held_out_after"], eval_loss_before=r["held_out_before"], accuracy=None,
                            steps=steps, seed=seed, batch_size=batch_size, seq_len=seq_len, lr=lr,
                            eval_windows=eval_windows, train_losses=r["train_losses"], seconds=seconds,
                            lora=dict(r=LORA["r"], lora_alpha=LORA["lora_alpha"], targets="all 7 projections")))
        ref = next((x["eval_loss"] for x in records if x["bits"] == 16), None)
        for x in records:
            x["eval_loss_rel_gap_vs_bits16"] = None if ref is None else x["eval_loss"] / ref - 1
        log(f"bits {b:2d}{f' (nonlinear {nl})' if nl else ''}: held-out loss {r['held_out_before']:.4f} -> {r['held_out_after']:.4f}"
            f"  train loss {r['train_losses'][0]:.3f} -> {r['train_losses'][-1]:.3f}  {seconds:.0f} s")
        if on_record:
            on_record(records)
    return records


def _slug(model: str) -> str:
    return model.lower().replace("-instruct", "")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grad-cosine", action="store_true")
    p.add_argument("--finetune", action="store_true")
    p.add_argument("--model-dir", default=None, help="a Llama checkpoint with its tokenizer (default: SmolLM2)")
    p.add_argument("--model", default=MODEL, help="the model's name in the records")
    p.add_argument("--bits", type=int, nargs="+", default=[16, 4, 2], help="--finetune's bits")
    p.add_argument("--nonlinear-bits", type=int, default=None, help="--finetune's nonlinear_bits (not for bits 16)")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=None, help="default 4 (--grad-cosine), 8 (--finetune)")
    p.add_argument("--seq-len", type=int, default=None, help="default 256 (--grad-cosine), 128 (--finetune)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval-windows", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tag", default="", help="appended to the records' file names (e.g. _seed1)")
    p.add_argument("--out", default=None, help="also write the JSON here")
    a = p.parse_args(argv)
    if not (a.grad_cosine or a.finetune):
        p.error("say --grad-cosine and/or --finetune")
    from transformers.utils import logging

    from hyclora_models.demo import shakespeare_texts, smollm2_checkpoint

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    t0 = time.perf_counter()

    def log(s):
        print(f"[{time.perf_counter() - t0:5.0f} s] {s}", flush=True)

    model_dir = a.model_dir or smollm2_checkpoint(log=log)
    train, held_out, _ = shakespeare_texts()
    env = _common.environment()
    slug = _slug(a.model) + a.tag
    if a.grad_cosine:
        records = grad_cosine_records(model_dir, train, batch_size=a.batch_size or 4, seq_len=a.seq_len or 256,
                                      seed=a.seed, model=a.model, log=log)
        log(f"wrote {_common.write_records(f'accuracy_grad_cosine_{slug}', [{**r, **env} for r in records], a.out)}")
    if a.finetune:
        def save(records):
            log(f"wrote {_common.write_records(f'accuracy_finetune_{slug}', [{**r, **env} for r in records], a.out)}")

        finetune_records(model_dir, train, held_out, bits=a.bits, steps=a.steps, batch_size=a.batch_size or 8,
                         seq_len=a.seq_len or 128, lr=a.lr, eval_windows=a.eval_windows, seed=a.seed,
                         nonlinear_bits=a.nonlinear_bits,
                         model=a.model, log=log, on_record=save)
    log("done")


if __name__ == "__main__":
    main()
