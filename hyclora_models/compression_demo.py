"""``python -m hyclora_models.compression_demo``: what the compressor keeps of an activation-like tensor.

Builds a residual-stream-like tensor (Gaussian channels of varied scale plus a few "massive" outlier
channels), compresses it with each setting and prints the bytes held against bf16 and the relative
L2 error of the restored tensor. Runs in seconds on a CPU.
"""

from __future__ import annotations

import argparse
import math

import torch

from . import compress

SETTINGS = [  # (bits, group_size, rotate)
    (2, "channel", False), (2, 32, False), (2, 64, False), (2, 32, True), (2, 64, True),
    (4, "channel", False), (4, 64, False), (4, 64, True), (8, 64, False), (16, 64, False),
]


def activation_like(tokens: int, channels: int, n_outliers: int = 3, seed: int = 0, dtype=torch.bfloat16,
                    device="cpu") -> torch.Tensor:
    """Gaussian channels with per-channel scales and offsets, plus planted massive channels (~500x)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, channels, generator=g) * torch.exp(torch.randn(channels, generator=g) * 0.5)
    x += torch.randn(channels, generator=g) * 0.5
    chans = torch.randperm(channels, generator=g)[:n_outliers]
    x[:, chans] = x[:, chans] * 20 + 500 * torch.sign(torch.randn(n_outliers, generator=g))
    return x.to(dtype=dtype, device=device)


def error_rows(x: torch.Tensor, outlier_ratio: float = 0.005, settings=SETTINGS, backend: str = "auto"):
    """One dict per setting: bits, group_size, rotate, bytes held, bits per element, relative L2 error
    (of the whole tensor and of the quantised channels alone)."""
    rows = []
    xf = x.float()
    for bits, group, rotate in settings:
        c = compress(x, bits=bits, outlier_ratio=outlier_ratio, group_size=group, rotate=rotate, backend=backend)
        err = c.decompress().float() - xf
        keep = torch.ones(x.shape[-1], dtype=torch.bool, device=x.device)
        if c.outlier_idx is not None:
            keep[c.outlier_idx.long()] = False
        rows.append(dict(
            bits=bits, group_size=group, rotate=rotate, nbytes=c.nbytes,
            bits_per_element=8 * c.nbytes / x.numel(),
            rel_l2=(err.norm() / xf.norm()).item(),
            rel_l2_inliers=(err[..., keep].norm() / xf[..., keep].norm()).item(),
        ))
    return rows


def format_rows(rows, ref_bytes: int) -> str:
    lines = [f"{'bits':>4} {'grouping':>9} {'hadamard':>8} {'bytes':>10} {'x smaller':>9} {'bits/el':>7}"
             f" {'rel L2':>8} {'rel L2 (inliers)':>16}"]
    for r in rows:
        grouping = "channel" if r["group_size"] == "channel" else f"g{r['group_size']}"
        lines.append(f"{r['bits']:>4} {grouping:>9} {str(r['rotate']):>8} {r['nbytes']:>10,} "
                     f"{ref_bytes / r['nbytes']:>9.1f} {r['bits_per_element']:>7.2f} {r['rel_l2']:>8.4f} "
                     f"{r['rel_l2_inliers']:>16.4f}")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--channels", type=int, default=576)
    p.add_argument("--outlier-ratio", type=float, default=0.005)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    x = activation_like(a.tokens, a.channels, n_outliers=max(1, math.ceil(a.outlier_ratio * a.channels)),
                        device=a.device)
    print(f"activation-like tensor: {a.tokens} tokens x {a.channels} channels, bf16 = "
          f"{x.numel() * 2:,} bytes, {math.ceil(a.outlier_ratio * a.channels)} outlier channel(s) kept exact")
    print(format_rows(error_rows(x, a.outlier_ratio), x.numel() * 2))


if __name__ == "__main__":
    main()
