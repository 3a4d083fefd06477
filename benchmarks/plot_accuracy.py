"""The accuracy fine-tunes' records (results/accuracy_*.json, benchmarks/accuracy.py) as a plot of training loss
against step, one panel per task, one line per method (mean over the seeds that every method of the panel has,
moving average), and as a Markdown
summary table (mean and sample standard deviation over seeds of held-out loss, its gap to bits 16 paired by
seed, and accuracy).

    pip install matplotlib   # a benchmark-only dependency (the `bench` extra)
    python benchmarks/plot_accuracy.py [--out results/accuracy_loss_curves.png] [--table]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
# the compression settings a method's label leaves out (the library's defaults); clip is named where it is not
# what clip="auto" means at the record's bits (records from before the option have none: unclipped)
BASE = dict(outlier_ratio=0.005, group_size=64, rotate=True, rounding="nearest", mode="speed", nonlinear_bits=None)


def label(record: dict) -> str:
    """"bits 2, nonlinear_bits 8, rounding stochastic": bits and the options that differ from BASE."""
    if record["bits"] == 16:
        return "bits 16 (LoRA)"
    from hyclora_models.compression import clip_of

    options = {**BASE, **record["options"]}
    names = [f"{k} {v}" for k, v in options.items() if k in BASE and v != BASE[k]]
    clip = clip_of(options.get("clip", 1.0), record["bits"], options["rounding"])
    if clip != clip_of("auto", record["bits"], options["rounding"]):
        names.append(f"clip {clip:g}")
    return ", ".join([f"bits {record['bits']}"] + names)


def load(results: Path = RESULTS) -> list[dict]:
    """The fine-tune records (those with a training-loss curve) of every results/accuracy_*.json, each run
    once (the same run in two files, e.g. a bits-16 reference repeated, counts once)."""
    seen, out = set(), []
    for path in sorted(results.glob("accuracy_*.json")):
        for r in json.loads(path.read_text()):
            if r.get("suite") != "accuracy" or not r.get("train_losses"):
                continue
            key = (r["task"], r["model"], label(r), r["seed"], r["steps"], r.get("batch_size"), r.get("lr"))
            if key not in seen:
                seen.add(key)
                out.append({**r, "label": label(r), "file": path.name})
    return out


def _setting(r: dict) -> tuple:
    return r["task"], r["model"], r["steps"], r.get("batch_size"), r.get("lr")


def summary(records: list[dict]) -> list[dict]:
    """One row per (task, model, training setting, method): seeds, mean / sd of eval loss, of its relative gap
    to bits 16 of the same seed, of accuracy and of its gap in points."""
    ref = {(_setting(r), r["seed"]): r for r in records if r["bits"] == 16}
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((_setting(r), r["label"]), []).append(r)

    def stats(values):
        values = [v for v in values if v is not None]
        if not values:
            return None, None
        return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None

    rows = []
    for (setting, name), rs in groups.items():
        refs = [ref.get((setting, r["seed"])) for r in rs]
        rows.append(dict(task=setting[0], model=setting[1], steps=setting[2], method=name, bits=rs[0]["bits"],
                         seeds=sorted(r["seed"] for r in rs),
                         eval_loss=stats([r["eval_loss"] for r in rs]),
                         gap=stats([r["eval_loss"] / f["eval_loss"] - 1 if f else None for r, f in zip(rs, refs)]),
                         accuracy=stats([r.get("accuracy") for r in rs]),
                         accuracy_gap=stats([r["accuracy"] - f["accuracy"] if f and r.get("accuracy") is not None
                                             else None for r, f in zip(rs, refs)])))
    order = lambda row: (row["task"], row["model"], row["steps"], -row["bits"], row["method"])  # noqa: E731
    return sorted(rows, key=order)


def _fmt(stat, scale=1.0, digits=4, sign=False, unit=""):
    mean, sd = stat
    if mean is None:
        return ""
    s = f"{mean * scale:{'+' if sign else ''}.{digits}f}{unit}"
    return s + (f" ± {sd * scale:.{digits}f}" if sd is not None else "")


def markdown(rows: list[dict]) -> str:
    """The summary as a Markdown table (task and model names up to their first parenthesis)."""
    lines = ["| task | model | method | seeds | held-out loss | vs bits 16 | accuracy | vs bits 16 (points) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['task'].split(' (')[0]} | {r['model'].split(' (')[0]} | {r['method']} | {','.join(map(str, r['seeds']))} | "
                     f"{_fmt(r['eval_loss'])} | {_fmt(r['gap'], 100, 2, True, '%') if r['bits'] != 16 else ''} | "
                     f"{_fmt(r['accuracy'], 100, 1, unit='%')} | "
                     f"{_fmt(r['accuracy_gap'], 100, 1, True) if r['bits'] != 16 else ''} |")
    return "\n".join(lines)


def curves(records: list[dict]) -> dict:
    """{(task, model): (seeds, {label: mean training loss per step over seeds})}: within a panel, the seeds that
    every line has (same data order: the lines compare step by step), and runs of its most common step count."""
    panels: dict[tuple, list[dict]] = {}
    for r in records:
        panels.setdefault((r["task"], r["model"]), []).append(r)
    out = {}
    for key, rs in panels.items():
        lengths = [len(r["train_losses"]) for r in rs]
        rs = [r for r in rs if len(r["train_losses"]) == max(set(lengths), key=lengths.count)]
        names = {r["label"] for r in rs}
        seeds = set.intersection(*({r["seed"] for r in rs if r["label"] == n} for n in names))
        out[key] = (sorted(seeds), {n: [statistics.fmean(step) for step in zip(
            *[r["train_losses"] for r in rs if r["label"] == n and r["seed"] in seeds])] for n in names})
    return out


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average (shorter at the start)."""
    return [statistics.fmean(values[max(0, i - window + 1):i + 1]) for i in range(len(values))]


def plot(records: list[dict], out: Path, window: int = 5) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = curves(records)
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 5), squeeze=False)
    for ax, ((task, model), (seeds, lines)) in zip(axes[0], sorted(panels.items())):
        ax.set_prop_cycle(color=plt.get_cmap("tab20").colors)
        for name, losses in sorted(lines.items(), key=lambda kv: (not kv[0].startswith("bits 16"), kv[0])):
            ax.plot(range(1, len(losses) + 1), smooth(losses, window), label=name,
                    **(dict(lw=2.5, color="black") if name.startswith("bits 16") else dict(lw=1.2)))
        ax.set_title(f"{model}, {task}\nseed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}"
                     f"{' (mean)' if len(seeds) > 1 else ''}", fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel(f"training loss ({window}-step moving average)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6.5)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default=str(RESULTS))
    p.add_argument("--out", default=str(RESULTS / "accuracy_loss_curves.png"))
    p.add_argument("--window", type=int, default=5, help="moving-average window (steps)")
    p.add_argument("--table", action="store_true", help="print the Markdown summary table")
    a = p.parse_args(argv)
    records = load(Path(a.results))
    if not records:
        raise SystemExit(f"no accuracy fine-tune records in {a.results}")
    if a.table:
        print(markdown(summary(records)))
    print(f"wrote {plot(records, Path(a.out), a.window)}")


if __name__ == "__main__":
    main()
