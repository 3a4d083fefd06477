"""Each fused kernel against the torch ops it replaces and against a device copy of the same bytes, at
Llama-2-7B shapes, 4 x 1024 tokens (GPU, one run).

Bandwidth = (bytes the op must read + write) / median time; "of copy" divides by the bandwidth of a
``torch.Tensor.copy_`` moving as many bytes in the same run (the memory-bound ceiling). The cross-entropy
gradient pass is also shown next to the LM head matmul it follows (matmul TFLOP/s in the same run).

    python benchmarks/kernels_micro.py [--tokens 4096 --hidden 4096 --intermediate 11008 --vocab 32000]
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

from hyclora_models.kernels import cross_entropy as CE  # noqa: E402
from hyclora_models.kernels import rms_norm as RN  # noqa: E402
from hyclora_models.kernels import swiglu as SG  # noqa: E402


def bench(fn) -> float:
    """Median seconds."""
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e-3


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=11008)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    n, d, f, v = a.tokens, a.hidden, a.intermediate, a.vocab
    bf = dict(device="cuda", dtype=torch.bfloat16)
    x, dy, res = (torch.randn(n, d, **bf) for _ in range(3))
    w = torch.rand(d, **bf) + 0.5
    g, u, dm = (torch.randn(n, f, **bf) for _ in range(3))
    _, rstd = RN.rms_norm_reference(x, w, 1e-6)
    head = torch.randn(v, d, **bf) / d**0.5
    logits = torch.randn(n, v, **bf)
    labels = torch.randint(0, v, (n,), device="cuda")
    scale = torch.tensor([1.0 / n], device="cuda")
    e = 2  # bytes an element
    # (op, bytes it must move, Triton, torch reference)
    cases = [
        ("rms_norm forward", 2 * n * d * e + 4 * n, lambda: RN.rms_norm_triton(x, w, 1e-6),
         lambda: RN.rms_norm_reference(x, w, 1e-6)),
        ("rms_norm from kept rstd", 2 * n * d * e + 4 * n, lambda: RN.rms_norm_triton(x, w, 1e-6, rstd),
         lambda: RN.rms_norm_reference(x, w, 1e-6, rstd)),
        ("rms_norm backward + residual", 4 * n * d * e + 4 * n, lambda: RN.rms_norm_backward_triton(dy, x, w, rstd, res),
         lambda: RN.rms_norm_backward_reference(dy, x, w, rstd, res)),
        ("swiglu forward", 3 * n * f * e, lambda: SG.swiglu_triton(g, u), lambda: SG.swiglu_reference(g, u)),
        ("swiglu backward", 5 * n * f * e, lambda: SG.swiglu_backward_triton(g, u, dm),
         lambda: SG.swiglu_backward_reference(g, u, dm)),
        ("cross-entropy gradient (in place)", 3 * n * v * e, lambda: CE.cross_entropy_grad_triton_(logits, labels, scale),
         lambda: CE.cross_entropy_grad_reference_(logits, labels, scale)),
    ]
    env = environment()
    records, rows = [], []
    for name, nbytes, tri, ref in cases:
        src, dst = (torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda") for _ in range(2))
        copy_bw = nbytes / bench(lambda: dst.copy_(src))  # the copy reads and writes nbytes in all
        t_tri, t_ref = bench(tri), bench(ref)
        rec = dict(suite="kernels_micro", op=name, tokens=n, bytes=nbytes, triton_s=t_tri, torch_s=t_ref,
                   triton_gbps=nbytes / t_tri / 1e9, copy_gbps=copy_bw / 1e9, of_copy=nbytes / t_tri / copy_bw,
                   speedup_vs_torch=t_ref / t_tri, **env)
        records.append(rec)
        rows.append(f"| {name} | {t_tri * 1e6:,.0f} | {t_ref * 1e6:,.0f} | {rec['speedup_vs_torch']:.1f}x | "
                    f"{rec['triton_gbps']:,.0f} | {rec['of_copy']:.0%} |")
    mm_s = bench(lambda: F.linear(x, head))
    tflops = 2 * n * d * v / mm_s / 1e12
    print(f"{env['gpu']}; {n} tokens, hidden {d}, intermediate {f}, vocab {v}")
    print("| op | Triton us | torch us | speed-up | Triton GB/s | of copy |\n|---|---|---|---|---|---|")
    print("\n".join(rows))
    print(f"LM head matmul ({n} x {d} x {v}): {mm_s * 1e6:,.0f} us, {tflops:,.0f} TFLOP/s; cross-entropy gradient pass "
          f"= {records[-1]['triton_s'] / mm_s:.0%} of it")
    records.append(dict(suite="kernels_micro", op="lm head matmul", tokens=n, seconds=mm_s, tflops=tflops, **env))
    print("wrote", write_records("kernels_micro", records, a.out))


if __name__ == "__main__":
    main()
