"""benchmarks/plot_accuracy.py on made-up records: labels, the seed-paired summary, the curves; the PNG where
matplotlib is installed."""

import importlib.util
import json

import pytest

from .helpers import load_script


@pytest.fixture(scope="module")
def plot():
    return load_script("benchmarks/plot_accuracy.py")


def record(bits, seed, eval_loss, accuracy=None, task="t (a note)", **options):
    base = dict(outlier_ratio=0.005, group_size=64, rotate=True, rounding="nearest", clip="auto", mode="speed")
    return dict(suite="accuracy", task=task, model="m", bits=bits, options={**base, **options}, seed=seed, steps=3,
                batch_size=2, lr=1e-3, eval_loss=eval_loss, accuracy=accuracy,
                train_losses=[3.0 + seed, 2.0 + bits / 100, 1.0])


@pytest.fixture
def results(tmp_path):
    a = [record(16, 0, 2.0, 0.5), record(2, 0, 2.2, 0.4), record(2, 0, 2.1, 0.5, nonlinear_bits=8)]
    b = [record(16, 1, 4.0, 0.7), record(2, 1, 4.0, 0.8), record(16, 0, 2.0, 0.5),  # seed 0's bits 16 again
         record(2, 0, 2.3, 0.3, group_size="channel", rotate=False)]
    (tmp_path / "accuracy_x.json").write_text(json.dumps(a))
    (tmp_path / "accuracy_y.json").write_text(json.dumps(b))
    (tmp_path / "accuracy_grad_cosine_m.json").write_text(json.dumps([dict(suite="accuracy", task="grad_cosine")]))
    return tmp_path


def test_labels_and_summary(plot, results):
    records = plot.load(results)
    assert len(records) == 6  # seed 0's bits 16 once; no grad-cosine record
    assert {r["label"] for r in records} == {"bits 16 (LoRA)", "bits 2", "bits 2, nonlinear_bits 8",
                                             "bits 2, group_size channel, rotate False"}
    rows = {r["method"]: r for r in plot.summary(records)}
    assert rows["bits 16 (LoRA)"]["seeds"] == [0, 1] and rows["bits 16 (LoRA)"]["eval_loss"][0] == pytest.approx(3.0)
    two = rows["bits 2"]
    assert two["seeds"] == [0, 1] and two["eval_loss"][0] == pytest.approx(3.1)
    # gaps paired by seed: +10% and 0% -> mean 5%; accuracy -10 and +10 points -> mean 0
    assert two["gap"] == (pytest.approx(0.05), pytest.approx(0.1 / 2 ** 0.5))  # sample sd of 0.1 and 0
    assert two["accuracy_gap"][0] == pytest.approx(0.0, abs=1e-12)
    assert rows["bits 2, nonlinear_bits 8"]["gap"] == (pytest.approx(0.05), None)
    table = plot.markdown(plot.summary(records))
    assert "| t | m | bits 2 | 0,1 | 3.1000 ± 1.2728 | +5.00% ± 7.07 | 60.0% ± 28.3 | +0.0 ± 14.1 |" in table


def test_curves_compare_common_seeds(plot, results):
    (seeds, lines), = plot.curves(plot.load(results)).values()
    assert seeds == [0]  # the only seed every method has
    assert lines["bits 2"] == [3.0, 2.02, 1.0] and lines["bits 16 (LoRA)"] == [3.0, 2.16, 1.0]
    assert plot.smooth([1.0, 3.0, 5.0], 2) == [1.0, 2.0, 4.0]


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="pip install matplotlib")
def test_png(plot, results, tmp_path):
    out = plot.plot(plot.load(results), tmp_path / "curves.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_clip_labels(plot):
    """clip is named where it is not what 'auto' means at the bits; records from before the option (no clip)
    were unclipped."""
    def old(bits, **options):
        r = record(bits, 0, 1.0, **options)
        del r["options"]["clip"]
        return r

    assert plot.label(old(2)) == "bits 2, clip 1" and plot.label(record(2, 0, 1.0)) == "bits 2"
    assert plot.label(old(4)) == plot.label(record(4, 0, 1.0)) == "bits 4"
    assert plot.label(old(2, rounding="stochastic")) == "bits 2, rounding stochastic"
    assert plot.label(record(2, 0, 1.0, clip=0.7, nonlinear_bits=8)) == "bits 2, nonlinear_bits 8, clip 0.7"
