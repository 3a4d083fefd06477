"""Peak GPU memory and tokens/s of a LoRA training step: HyC (speed and memory mode) against PEFT LoRA
(with and without gradient checkpointing, with and without Liger-Kernel's patches: RoPE, RMSNorm, SwiGLU
and the fused linear + cross-entropy), same shapes, same attention backend (SDPA), random bf16
weights, LoRA r16 / alpha 32 on all 7 projections of the decoders (Llama, Mistral: causal LM) or on
query/key/value/dense of RoBERTa (sequence classification, 2 labels, the classifier trained; default
dropout 0.1), AdamW on what trains.

Each method runs in its own process (a clean peak). Peak memory is reset after the model is built;
activation_gib = peak - memory held after the build (weights). tokens/s from the median step after
warm-up. saved_kib_per_token_layer: bytes the decoder layers keep for backward (saved_tensors_hooks),
per token and layer, from one more step.

    python benchmarks/memory_throughput.py [--shapes llama-2-7b,mistral-7b --sizes 4x1024,8x2048,1x8192
                                            --bits 2,4 --methods ...] [--out DIR]

One results file per shape and size: results/memory_throughput_<shape>_<B>x<T>[_<tag>].json. A method
whose package is missing (Liger-Kernel) gets a record with ``not_installed``; one that runs out of
memory a record with ``oom``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, write_records  # noqa: E402

# architecture: (transformers name, task class suffix, LoRA targets)
ARCHS = {
    "llama": ("Llama", "ForCausalLM", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    "mistral": ("Mistral", "ForCausalLM", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    "roberta": ("Roberta", "ForSequenceClassification", ["query", "key", "value", "dense"]),
}
SHAPES = {  # (architecture, config)
    "llama-2-7b": ("llama", dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                 num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=8192)),
    "mistral-7b": ("mistral", dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                   num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768,
                                   sliding_window=4096)),
    "roberta-base": ("roberta", dict(vocab_size=50265, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                     num_attention_heads=12, max_position_embeddings=514, type_vocab_size=1,
                                     num_labels=2)),
}
METHODS = ("peft", "peft+gc", "peft+liger", "peft+liger+gc", "hyc-speed", "hyc-memory",
           "hyc-speed-kernel-attn")  # the last: attention_backward="kernel"
DEFAULT_METHODS = METHODS[:6]


def apply_liger(arch: str) -> None:
    """Liger-Kernel's transformers patches for ``arch`` (before the model is built)."""
    from liger_kernel.transformers import monkey_patch

    getattr(monkey_patch, f"apply_liger_kernel_to_{arch}")()


def build(method: str, arch: str, shape: dict, bits: int):
    import transformers

    import hyclora_models as H

    name, task, targets = ARCHS[arch]
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            if method.startswith("hyc"):
                hyc = H.HyCLoRAConfig(r=16, lora_alpha=32, target_modules=targets, bits=bits,
                                      attention_backward="kernel" if method.endswith("kernel-attn") else "recompute")
                config = getattr(H, f"HyC{name}Config")(**shape, hyclora_config=hyc.to_dict())
                model = getattr(H, f"HyC{name}{task}")(config)
            else:
                from peft import LoraConfig, get_peft_model

                if "+liger" in method:
                    apply_liger(arch)
                vanilla = getattr(transformers, f"{name}{task}")(getattr(transformers, f"{name}Config")(**shape))
                model = get_peft_model(vanilla, LoraConfig(r=16, lora_alpha=32, target_modules=targets, lora_dropout=0.0,
                                                           task_type="SEQ_CLS" if arch == "roberta" else None))
    finally:
        torch.set_default_dtype(torch.float32)
    model.config._attn_implementation = "sdpa"
    if method.endswith("gc") or method == "hyc-memory":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def measure(method: str, bits: int, shape_name: str, batch: int, seq: int, args) -> dict:
    from hyclora_models.memory import saved_bytes_for_backward

    arch, shape = SHAPES[shape_name]
    shape = dict(shape, **({"num_hidden_layers": args.layers} if args.layers else {}))
    model = build(method, arch, shape, bits)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    ids = torch.randint(3, shape["vocab_size"], (batch, seq), device="cuda")
    labels = torch.randint(0, 2, (batch,), device="cuda") if arch == "roberta" else ids
    kwargs = {} if arch == "roberta" else dict(use_cache=False)

    def step():
        loss = model(input_ids=ids, labels=labels, **kwargs).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    built = torch.cuda.memory_allocated()
    times = []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated()
    if f"{method}:{bits}" in args.profile.split(",") and args.out:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30)
        cpu = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
        Path(args.out, f"profile_{shape_name}_{batch}x{seq}_{method}_{bits}.txt").write_text(table + "\n\nby self CPU time:\n" + cpu)
    layers = [m for m in model.modules() if type(m).__name__.endswith(("DecoderLayer", "RobertaLayer"))]
    # torch's checkpoint keeps its inputs through its own saved-tensor hooks, out of reach of ours
    saved = None if method.endswith("+gc") else saved_bytes_for_backward(step, layers)
    step_s = statistics.median(times[args.warmup:])
    gib = 2**30
    return dict(method=method, bits=bits, peak_gib=peak / gib,
                activation_gib=(peak - built) / gib, weights_gib=built / gib, step_s=step_s,
                tokens_per_s=batch * seq / step_s,
                saved_kib_per_token_layer=saved and saved / (batch * seq * len(layers)) / 2**10)


def run_one(method: str, bits: str, shape: str, size: str) -> dict:
    """``measure`` in a fresh process (a clean peak); a record for a missing package or an OOM too."""
    run = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--one", f"{method}:{bits}:{shape}:{size}"],
                         capture_output=True, text=True)
    if run.returncode:
        sys.stderr.write(run.stderr[-3000:])
        raise SystemExit(f"{method} bits {bits} {shape} {size} failed")
    return json.loads(run.stdout.strip().splitlines()[-1])


def table(records: list[dict]) -> str:
    base = next((r for r in records if r["method"] == "peft" and "peak_gib" in r), None)
    rows = ["| method | bits | peak GiB | activations GiB | saved KiB/token/layer | tok/s | vs PEFT activations "
            "| vs PEFT tok/s |", "|---|---|---|---|---|---|---|---|"]
    for r in records:
        if "peak_gib" not in r:
            rows.append(f"| {r['method']} | {r['bits']} | {'OOM' if r.get('oom') else 'not installed'} | | | | | |")
            continue
        ratio = (f"{r['activation_gib'] / base['activation_gib']:.3f} | {r['tokens_per_s'] / base['tokens_per_s']:.2f}"
                 if base else " | ")
        saved = r["saved_kib_per_token_layer"]
        rows.append(f"| {r['method']} | {r['bits']} | {r['peak_gib']:.1f} | {r['activation_gib']:.2f} | "
                    f"{'' if saved is None else f'{saved:.1f}'} | {r['tokens_per_s']:,.0f} | {ratio} |")
    return "\n".join(rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="llama-2-7b", help=f"comma-separated, of {sorted(SHAPES)}")
    ap.add_argument("--sizes", default="4x1024", help="batch x sequence length, comma-separated (e.g. 4x1024,8x2048)")
    ap.add_argument("--layers", type=int, default=0, help="fewer layers (smoke runs)")
    ap.add_argument("--bits", default="2", help="HyC bits, comma-separated (e.g. 2,4)")
    ap.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=f"comma-separated, of {METHODS}")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--out", default=None, help="also copy the JSON here")
    ap.add_argument("--tag", default="", help="suffix of the results file name (runs of other method sets)")
    ap.add_argument("--profile", default="", help="method:bits list to profile one step of (table into --out)")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: method:bits:shape:size -> JSON
    args = ap.parse_args()
    if args.one:
        method, bits, shape, size = args.one.split(":")
        batch, seq = map(int, size.split("x"))
        try:
            if "+liger" in method:
                import liger_kernel  # noqa: F401
            rec = measure(method, int(bits), shape, batch, seq, args)
        except ImportError as e:
            rec = dict(method=method, bits=int(bits), not_installed=str(e))
        except torch.cuda.OutOfMemoryError as e:
            rec = dict(method=method, bits=int(bits), oom=str(e).split("\n")[0][:300])
        print(json.dumps(rec))
        return
    env = environment()
    shapes, sizes = args.shapes.split(","), args.sizes.split(",")
    for name in shapes:
        if name not in SHAPES:
            raise SystemExit(f"unknown shape {name!r}; choose from {sorted(SHAPES)}")
    runs = []
    for method in args.methods.split(","):
        if method not in METHODS:
            raise SystemExit(f"unknown method {method!r}; choose from {METHODS}")
        runs += [(method, b) for b in (args.bits.split(",") if method.startswith("hyc") else ["16"])]
    summary = []
    for shape in shapes:
        for size in sizes:
            batch, seq = map(int, size.split("x"))
            records = [dict(suite="memory_throughput", model=f"{shape}-shape random bf16", attn="sdpa", r=16,
                            batch=batch, seq=seq, layers=args.layers or SHAPES[shape][1]["num_hidden_layers"],
                            **run_one(method, bits, shape, size), **env) for method, bits in runs]
            text = f"{env['gpu']}, {shape} shape, {batch} x {seq}\n{table(records)}"
            print(text, flush=True)
            summary.append(text)
            name = f"memory_throughput_{shape}_{batch}x{seq}{'_' + args.tag if args.tag else ''}"
            print("wrote", write_records(name, records, args.out))
    print("\n\n".join(summary))


if __name__ == "__main__":
    main()
