"""HyC LoRA on several GPUs with torch DDP (and a try of FSDP2), against the same run on one GPU.

A random-weight Llama (bf16, SDPA), LoRA r16 on all 7 projections, 2 bits, AdamW (lr 1e-3); a fixed
sequence of global batches of random tokens from a 512-token subset of the vocabulary (learnable: the loss
falls from ~10.6 as the adapters learn the subset), split evenly over the ranks, so the DDP run sees what the single-GPU run
sees (gradients all-reduced = the full batch's mean). Records per run: the loss curve, tokens/s and peak
GiB per GPU; the DDP record adds loss_gap_vs_single (relative difference of the final losses).

Then the Trainer example (examples/finetune_causal_lm.py) on a tiny Llama: one GPU with batch 8, two with
4 each (same global batch), and the two-GPU run resumed from its step-6 checkpoint alone.

    python benchmarks/multi_gpu.py [--gpus 2] [--steps 30] [--out DIR]     # launches torchrun itself
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, write_records  # noqa: E402

SHAPE = dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
             num_key_value_heads=16, max_position_embeddings=2048)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def worker(args) -> None:
    """One rank (torchrun's environment): train, print a JSON line (rank 0)."""
    import torch.distributed as dist

    import hyclora_models as H

    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    torch.cuda.set_device(device)
    torch.manual_seed(0)  # same weights and adapters on every rank
    config = H.HyCLlamaConfig(**SHAPE, hyclora_config=H.HyCLoRAConfig(r=16, lora_alpha=32, target_modules=TARGETS,
                                                                     bits=2).to_dict())
    torch.set_default_dtype(torch.bfloat16)
    with device:
        model = H.HyCLlamaForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    model.config._attn_implementation = "sdpa"
    model.train()
    if args.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model, device_ids=[device.index])
    elif args.strategy == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    g = torch.Generator().manual_seed(1)
    per_rank = args.batch // world
    torch.cuda.reset_peak_memory_stats(device)
    losses, times = [], []
    for _ in range(args.steps):
        ids = torch.randint(0, 512, (args.batch, args.seq), generator=g) * (SHAPE["vocab_size"] // 512)
        mine = ids[rank * per_rank:(rank + 1) * per_rank].to(device)
        t0 = time.perf_counter()
        loss = model(input_ids=mine, labels=mine, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
        mean = loss.detach().float()
        dist.all_reduce(mean)
        losses.append(mean.item() / world)
    peak = torch.tensor(torch.cuda.max_memory_allocated(device) / 2**30, device=device)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    if rank == 0:
        out = args.adapter_dir
        if args.strategy != "fsdp2":  # sharded adapters would need gathering first: not done here
            (model.module if hasattr(model, "module") else model).save_pretrained(out)  # once, by rank 0
        step_s = statistics.median(times[2:])
        print(json.dumps(dict(world_size=world, strategy=args.strategy, steps=args.steps, losses=losses,
                              tokens_per_s_per_gpu=per_rank * args.seq / step_s, peak_gib_per_gpu=peak.item(),
                              adapter_files=sorted(p.name for p in Path(out).iterdir()))))
    dist.destroy_process_group()


def launch(gpus: int, strategy: str, args) -> dict:
    adapter = tempfile.mkdtemp()
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={gpus}", __file__, "--worker",
           "--strategy", strategy, "--steps", str(args.steps), "--batch", str(args.batch), "--seq", str(args.seq),
           "--adapter-dir", adapter]
    run = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "NCCL_NVLS_ENABLE": "0"})
    if run.returncode:
        tail = "\n".join(line for line in run.stderr.splitlines() if "Error" in line or "error" in line)[-1500:]
        return dict(world_size=gpus, strategy=strategy, error=tail or run.stderr[-1500:])
    return json.loads(run.stdout.strip().splitlines()[-1])


def trainer_runs(gpus: int) -> dict:
    """The Trainer example under torchrun: per-step losses on 1 and ``gpus`` GPUs, and resumed."""
    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root))
    from tests.helpers import save_tiny, save_tiny_tokenizer
    from tests.test_demo import SONNET

    work = Path(tempfile.mkdtemp())
    model = save_tiny_tokenizer(save_tiny(work / "tiny"), SONNET)
    (work / "data.txt").write_text(SONNET * 40)

    def run(n, batch, out, resume=False):
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={n}",
               str(root / "examples" / "finetune_causal_lm.py"), "--model", str(model), "--data", str(work / "data.txt"),
               "--output-dir", str(out), "--max-steps", "12", "--save-steps", "6", "--logging-steps", "1",
               "--seq-len", "32", "--batch-size", str(batch)] + (["--resume"] if resume else [])
        done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "NCCL_NVLS_ENABLE": "0"})
        if done.returncode:
            raise RuntimeError(done.stderr[-2000:])
        state = json.loads((out / "checkpoint-12" / "trainer_state.json").read_text())
        return {h["step"]: h["loss"] for h in state["log_history"] if "loss" in h}

    single = run(1, 8, work / "single")
    ddp = run(gpus, 8 // gpus, work / "ddp")
    import shutil

    shutil.copytree(work / "ddp" / "checkpoint-6", work / "resumed" / "checkpoint-6")
    resumed = run(gpus, 8 // gpus, work / "resumed", resume=True)
    gap = {s: abs(ddp[s] - single[s]) / single[s] for s in single}
    return dict(single_losses=single, ddp_losses=ddp, resumed_losses=resumed, loss_gap_vs_single=gap[12],
                max_step_gap_vs_single=max(gap.values()),
                resumed_max_gap=max(abs(resumed[s] - ddp[s]) / ddp[s] for s in resumed if s > 6),
                checkpoint_files=sorted(p.name for p in (work / "ddp" / "checkpoint-6").iterdir()))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=8, help="global batch (sequences), split over the GPUs")
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--out", default=None)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--strategy", default="ddp", help=argparse.SUPPRESS)
    ap.add_argument("--adapter-dir", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    env = environment()
    single = launch(1, "single", args)
    runs = [single, launch(args.gpus, "ddp", args), launch(args.gpus, "fsdp2", args)]
    records = []
    print(f"{env['gpu']}, Llama shape {SHAPE['hidden_size']}x{SHAPE['num_hidden_layers']}, global batch "
          f"{args.batch} x {args.seq}, {args.steps} steps")
    print("| strategy | GPUs | final loss | gap vs 1 GPU | tokens/s per GPU | peak GiB per GPU |")
    print("|---|---|---|---|---|---|")
    for r in runs:
        if "error" in r:
            print(f"| {r['strategy']} | {r['world_size']} | failed: {r['error'].splitlines()[-1][:120]} | | | |")
        else:
            r["loss_gap_vs_single"] = abs(r["losses"][-1] - single["losses"][-1]) / single["losses"][-1]
            print(f"| {r['strategy']} | {r['world_size']} | {r['losses'][-1]:.4f} | {r['loss_gap_vs_single']:.2e} | "
                  f"{r['tokens_per_s_per_gpu']:,.0f} | {r['peak_gib_per_gpu']:.2f} |")
        records.append(dict(suite="multi_gpu", method="hyc-speed", bits=2, batch=args.batch, seq=args.seq,
                            model="random llama, hidden 1024, 8 layers, bf16", **r, **env))
    try:
        t = trainer_runs(args.gpus)
        print(f"Trainer example, tiny Llama, 12 steps of global batch 8 x 32: final loss gap 1 vs {args.gpus} GPUs "
              f"{t['loss_gap_vs_single']:.2e} (largest per step {t['max_step_gap_vs_single']:.2e}); resumed from step 6 "
              f"vs uninterrupted: largest gap {t['resumed_max_gap']:.2e}; checkpoint: {t['checkpoint_files']}")
        records.append(dict(suite="multi_gpu", method="hyc-speed", strategy="ddp (Trainer)", world_size=args.gpus,
                            model="tiny llama (tests.helpers)", steps=12, bits=2, **t, **env))
    except RuntimeError as e:
        print("Trainer example under torchrun failed:", str(e)[-800:])
    print("wrote", write_records(f"multi_gpu_{args.gpus}gpu", records, args.out))


if __name__ == "__main__":
    main()
