"""What recomputing attention in backward costs: HyC's fused layer runs the attention forward once more
in backward (from the rebuilt q/k/v) instead of keeping the output and logsumexp for the kernel's own
backward. Times SDPA forward and forward+backward (bf16, causal, Llama-2-7B heads) per layer and per
32-layer step, for the shapes of the memory/throughput benchmark.

    python benchmarks/attention_recompute.py [--out DIR]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, write_records  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    env, records = environment(), []
    heads, head_dim, layers = 32, 128, 32
    print("| batch x seq | attention fwd ms/layer | fwd+bwd ms/layer | extra fwd per step ms |")
    print("|---|---|---|---|")
    for batch, seq in ((4, 1024), (8, 2048), (1, 8192)):
        q, k, v = (torch.randn(batch, heads, seq, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))
        fwd = triton.testing.do_bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
                                      return_mode="median")
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        grad = torch.randn_like(out)

        def fwd_bwd():
            torch.autograd.grad(F.scaled_dot_product_attention(q, k, v, is_causal=True), (q, k, v), grad)

        both = triton.testing.do_bench(fwd_bwd, return_mode="median")
        records.append(dict(suite="attention_recompute", batch=batch, seq=seq, heads=heads, head_dim=head_dim,
                            fwd_ms=fwd, fwd_bwd_ms=both, extra_ms_per_step=fwd * layers, **env))
        print(f"| {batch} x {seq} | {fwd:.3f} | {both:.3f} | {fwd * layers:.1f} |")
    print("wrote", write_records("attention_recompute", records, args.out))


if __name__ == "__main__":
    main()
