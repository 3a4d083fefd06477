"""Accuracy of the two attention backwards of the fused layer, attention_backward="recompute" (attention
run again from the restored q/k/v) and "kernel" (cuDNN's own backward from the kept logsumexp, which
reads the restored, quantised attention output): LoRA gradient cosine to PEFT LoRA on the same weights,
per bits, on a small random Llama (bf16, CUDA, no padding so the kernel path applies). Speed: see
memory_throughput.py's hyc-speed-kernel-attn method.

    python benchmarks/attention_backward.py [--out DIR]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import environment, write_records  # noqa: E402

from tests.helpers import TARGETS, cosines, hyc_and_peft, loss_and_grads, save_tiny  # noqa: E402

SHAPE = dict(vocab_size=1000, hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=8, max_position_embeddings=512)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    env, records = environment(), []
    path = save_tiny(tempfile.mkdtemp(), **SHAPE)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, SHAPE["vocab_size"], (4, 256), generator=g).cuda()
    b = dict(input_ids=ids, labels=ids)
    print("| bits | recompute: median / worst cosine to PEFT | kernel: median / worst |")
    print("|---|---|---|")
    for bits in (16, 8, 4, 2):
        row = {}
        for how in ("recompute", "kernel"):
            hyc, peft = hyc_and_peft(path, bits=bits, r=16, alpha=32, targets=TARGETS, device="cuda",
                                     attention_backward=how)
            hyc.to(torch.bfloat16)
            peft.to(torch.bfloat16)
            cos = cosines(loss_and_grads(hyc, b)[1], loss_and_grads(peft, b)[1]).float()
            row[how] = cos
            records.append(dict(suite="attention_backward", method=f"hyc-{how}", bits=bits, batch=4, seq=256,
                                model="random llama, hidden 512, 4 layers, bf16", cos_median=cos.median().item(),
                                cos_worst=cos.min().item(), **env))
        print(f"| {bits} | {row['recompute'].median():.4f} / {row['recompute'].min():.4f} | "
              f"{row['kernel'].median():.4f} / {row['kernel'].min():.4f} |")
    print("wrote", write_records("attention_backward", records, args.out))


if __name__ == "__main__":
    main()
