"""Peak memory against tokens/s per method, one panel per shape and size, from the records that
``memory_throughput.py`` wrote (needs matplotlib: ``pip install -e ".[bench]"``).

    python benchmarks/plot_memory_throughput.py [--shapes llama-2-7b,mistral-7b --sizes 4x1024,8x2048,1x8192]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS  # noqa: E402


def label(r: dict) -> str:
    return f"{r['method']} {r['bits']}b" if r["method"].startswith("hyc") else r["method"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="llama-2-7b,mistral-7b")
    p.add_argument("--sizes", default="4x1024,8x2048,1x8192")
    p.add_argument("--out", default=str(RESULTS / "memory_throughput.png"))
    a = p.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes, sizes = a.shapes.split(","), a.sizes.split(",")
    files = {(i, j): RESULTS / f"memory_throughput_{s}_{z}.json" for i, s in enumerate(shapes) for j, z in enumerate(sizes)}
    panels = {ij: json.loads(f.read_text()) for ij, f in files.items() if f.exists()}
    if not panels:
        raise SystemExit(f"no memory_throughput records for {a.shapes} x {a.sizes} in {RESULTS}")
    methods = sorted({label(r) for recs in panels.values() for r in recs})
    colours = {m: plt.cm.tab10(i % 10) for i, m in enumerate(methods)}
    fig, axes = plt.subplots(len(shapes), len(sizes), figsize=(4.6 * len(sizes), 4 * len(shapes)), squeeze=False)
    for (i, j), ax in ((ij, axes[ij]) for ij in files):
        if (i, j) not in panels:
            ax.set_axis_off()
            continue
        shape, size, recs = shapes[i], sizes[j], panels[i, j]
        for r in recs:
            if "peak_gib" in r:
                ax.scatter(r["peak_gib"], r["tokens_per_s"], color=colours[label(r)], s=40, label=label(r))
                ax.annotate(label(r), (r["peak_gib"], r["tokens_per_s"]), fontsize=7, xytext=(4, 2),
                            textcoords="offset points")
        missing = [f"{label(r)}: {'OOM' if r.get('oom') else 'not installed'}" for r in recs if "peak_gib" not in r]
        if missing:
            ax.text(0.02, 0.02, "\n".join(missing), transform=ax.transAxes, fontsize=7, va="bottom")
        gpu = recs[0]["gpu"].replace("NVIDIA ", "")
        ax.set_title(f"{shape}, {size.replace('x', ' x ')} ({gpu})", fontsize=9)
        ax.set_xlabel("peak GiB (lower is better)")
        ax.set_ylabel("tokens/s (higher is better)")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(a.out, dpi=110)
    print("wrote", a.out)


if __name__ == "__main__":
    main()
