"""Compress / decompress bandwidth against a device-to-device copy, in the same run (GPU).

Bandwidth = (bytes read + bytes written) / median time: compress reads the bf16 input and writes what
compress() keeps (codes, scales, zeros, outliers, indices); decompress the reverse. The copy moves the
bf16 tensor (read + write). The outlier search is one extra read of the input (the statistics must see
every token before any channel is zeroed), which this figure counts as cost, not as bytes.

    python benchmarks/compress_bandwidth.py [--out DIR]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, write_records  # noqa: E402

import hyclora_models as H  # noqa: E402
from hyclora_models.compression import _positions  # noqa: E402
from hyclora_models.kernels import compress as K  # noqa: E402

SETTINGS = [  # bits, group_size, rotate, outlier_ratio
    (2, 64, True, 0.005), (2, 64, True, 0.0), (2, 32, False, 0.005), (2, "channel", False, 0.005),
    (4, 64, True, 0.005), (4, 64, True, 0.0), (4, 32, False, 0.005), (4, "channel", False, 0.005),
]


def bench(fn):
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def sweep(x):
    """Time each kernel alone for tile configs (elements a program, warps); prints, returns the best."""
    n, c = x.shape
    mn, mx = K.column_stats_triton(x)
    idx = torch.maximum(-mn, mx).topk(max(1, c // 200)).indices.sort().values.to(torch.int32)
    pos = _positions(idx, c, x.device)
    best = {}
    for kernel in ("stats", "quantize", "dequantize"):
        for group, rotate in ((64, True), (32, False)):
            times = {}
            for elements in (2048, 4096, 8192, 16384):
                for warps in (4, 8):
                    K.TUNING[kernel] = (elements, warps)
                    q = K.quantize_triton(x, pos, idx.numel(), 2, group, rotate, None)
                    fn = {"stats": lambda: K.column_stats_triton(x),
                          "quantize": lambda: K.quantize_triton(x, pos, idx.numel(), 2, group, rotate, None),
                          "dequantize": lambda: K.dequantize_triton(*q, pos, (n, c), 2, group, rotate, x.dtype)}[kernel]
                    times[(elements, warps)] = bench(fn)
            cfg = min(times, key=times.get)
            print(f"sweep {kernel:>10} g{group} rot={rotate}: " +
                  " ".join(f"{e}/{w}={t * 1e3:.0f}us" for (e, w), t in times.items()) + f"  best {cfg}")
            best.setdefault(kernel, cfg)
            K.TUNING[kernel] = best[kernel]
            if kernel == "stats":
                break
    return best


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=None, help="also write the JSON here")
    p.add_argument("--channels", type=int, default=4096)
    p.add_argument("--sizes", default="16,64,256", help="millions of elements")
    p.add_argument("--sweep", action="store_true", help="first pick tile configs on a 64M-element tensor")
    a = p.parse_args(argv)
    env = environment()
    records = []
    if a.sweep:
        print("tile configs:", sweep(torch.randn(2**26 // a.channels, a.channels, device="cuda",
                                                  dtype=torch.bfloat16)))
    for m in (int(s) for s in a.sizes.split(",")):
        n = m * 2**20 // a.channels
        x = torch.randn(n, a.channels, device="cuda", dtype=torch.bfloat16)
        x[:, 7] *= 300  # a massive channel, as on a real residual stream
        in_bytes = x.numel() * x.element_size()
        dst = torch.empty_like(x)
        copy_ms = bench(lambda: dst.copy_(x))
        copy_gbps = 2 * in_bytes / copy_ms / 1e6
        del dst
        for bits, group, rotate, ratio in SETTINGS:
            kw = dict(bits=bits, group_size=group, rotate=rotate, outlier_ratio=ratio)
            c = H.compress(x, **kw)
            moved = in_bytes + c.nbytes
            ops = [("compress", lambda: H.compress(x, **kw)), ("decompress", c.decompress)]
            if ratio:  # the outlier search alone: one read of x
                ops.append(("column_stats", lambda: K.column_stats_triton(x)))
            for op, fn in ops:
                ms = bench(fn)
                gbps = (in_bytes if op == "column_stats" else moved) / ms / 1e6
                records.append(dict(suite="compress_bandwidth", op=op, bits=bits, group_size=group, rotate=rotate,
                                    outlier_ratio=ratio, elements=x.numel(), shape=list(x.shape), dtype="bfloat16",
                                    time_ms=ms, gb_per_s=gbps, copy_gb_per_s=copy_gbps,
                                    ratio_to_copy=gbps / copy_gbps, **env))
            del c
        del x
        torch.cuda.empty_cache()
    write_records("compress_bandwidth", records, a.out)
    print(f"{'op':>10} {'bits':>4} {'group':>7} {'rot':>5} {'outl':>6} {'Melem':>6} {'ms':>8} {'GB/s':>7} "
          f"{'copy GB/s':>9} {'of copy':>7}")
    for r in records:
        print(f"{r['op']:>10} {r['bits']:>4} {str(r['group_size']):>7} {str(r['rotate']):>5} {r['outlier_ratio']:>6} "
              f"{r['elements'] / 2**20:>6.0f} {r['time_ms']:>8.3f} {r['gb_per_s']:>7.0f} {r['copy_gb_per_s']:>9.0f} "
              f"{r['ratio_to_copy']:>7.0%}")


if __name__ == "__main__":
    main()
