"""Relative L2 error of compress -> decompress by bits and grouping, on Gaussian data with planted
outlier channels (hyclora_models.compression_demo.activation_like). Runs on CPU or GPU.

    python benchmarks/compression_error.py [--tokens 4096 --channels 4096]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, write_records  # noqa: E402

from hyclora_models.compression_demo import SETTINGS, activation_like, error_rows, format_rows  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--channels", type=int, default=4096)
    p.add_argument("--outlier-ratio", type=float, default=0.005)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    x = activation_like(a.tokens, a.channels, n_outliers=max(1, round(a.outlier_ratio * a.channels)))
    rows = error_rows(x, a.outlier_ratio, SETTINGS + [(2, 16, True), (2, 128, True), (4, 32, True)])
    env = environment()
    write_records("compression_error", [dict(suite="compression_error", tokens=a.tokens, channels=a.channels,
                                             outlier_ratio=a.outlier_ratio, data="gaussian+planted outliers",
                                             **r, **env) for r in rows], a.out)
    print(format_rows(rows, x.numel() * 2))


if __name__ == "__main__":
    main()
