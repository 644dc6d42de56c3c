"""What the plots show, read off the matplotlib Figures: dlc bench's panels and axis limits, the training
curves' metric name, the sensitivity plot's evenly spaced ratios."""

import math

import numpy as np
import pytest

from dlc.compiler.prune.sensitivity import Sensitivity, plot_sensitivity, sensitivity_figure
from dlc.compiler.train.metrics import plot_curves
from dlc.runtime.bench import BenchResult, BenchRow, plot_bench

PNG = b"\x89PNG\r\n\x1a\n"
MODELS = [("base.onnx", 1.0, 1.0), ("pruned.onnx", 0.97, 0.998), ("int8.onnx", 0.55, 0.995)]


def _result(accuracy: bool = True) -> BenchResult:
    """Three models (the first 100 % accurate) at batches 1 and 8; pruned's batch-1 timing unstable."""
    rows = []
    for batch, base_ms in ((1, 0.8), (8, 5.0)):
        for j, (model, factor, acc) in enumerate(MODELS):
            p50 = base_ms * factor
            unstable = j == 1 and batch == 1
            rows.append(BenchRow(
                model=model, path=model, batch=batch, provider="CPUExecutionProvider", runs=40, clipped=0,
                p50_ms=p50, p90_ms=1.1 * p50, p99_ms=1.2 * p50, min_ms=0.9 * p50, mean_ms=p50,
                throughput=batch / p50 * 1e3, file_bytes=1, params=1, macs=1, speedup=1 / factor,
                median_ratio=1 / factor, speedup_interval=[0.8, 1.4] if unstable else [1 / factor] * 2,
                unstable=unstable, accuracy=acc if accuracy else None))
    evaluations = [{"metric": "accuracy", "accuracy": acc} for _, _, acc in MODELS] if accuracy else []
    return BenchResult(device="cpu", min_time_s=1.0, warmup=1, input_shape=[[3, 8, 8]], rows=rows,
                       evaluations=evaluations)


def test_bench_accuracy_plot_has_every_batch_and_stops_at_100(tmp_path):
    fig = plot_bench(_result(), tmp_path / "acc.png")
    assert (tmp_path / "acc.png").read_bytes()[:8] == PNG
    panels = [ax for ax in fig.axes if ax.get_title().startswith("batch")]
    assert [ax.get_title() for ax in panels] == ["batch 1", "batch 8"]
    for ax, batch in zip(panels, (1, 8)):
        assert ax.get_ylim()[1] <= 100.0 and ax.get_ylim()[0] < 99.5
        assert f"batch {batch}" in ax.get_xlabel()
        points = sorted((float(line.get_xdata()[0]), float(line.get_ydata()[0])) for line in ax.lines
                        if len(line.get_xdata()) == 1 and line.get_marker() not in ("", "None", "|"))
        base = 0.8 if batch == 1 else 5.0
        expected = sorted((base * f, 100 * a) for _, f, a in MODELS)
        assert np.allclose(points, expected), (points, expected)
    (legend,) = fig.legends  # the labels live in one legend below the panels, never on top of the points
    texts = [t.get_text() for t in legend.get_texts()]
    assert texts[0].startswith("base.onnx: 100.0 %") and len(texts) == 3
    assert "1.03×? (0.80–1.40) / 1.03×" in texts[1] and "1.82× / 1.82×" in texts[2]
    assert "batch 1 / 8" in legend.get_title().get_text()
    assert not [c for ax in panels for c in ax.get_children() if type(c).__name__ == "Annotation"]


def test_bench_latency_plot_has_a_bar_per_model_and_batch(tmp_path):
    fig = plot_bench(_result(accuracy=False), tmp_path / "lat.png")
    (ax,) = fig.axes
    assert [t.get_text() for t in ax.get_xticklabels()] == ["batch 1", "batch 8"]
    heights = [round(p.get_height(), 6) for p in ax.patches]
    assert sorted(heights) == sorted(round(b * f, 6) for b in (0.8, 5.0) for _, f, _ in MODELS)


def _history(n: int = 4, detector: bool = False) -> list[dict]:
    return [{"epoch": e, "train_loss": 1.0 / e, "val_loss": 1.1 / e,
             "train_accuracy": float("nan") if detector else 0.2 * e, "val_accuracy": 0.15 * e}
            for e in range(1, n + 1)]


def test_curves_name_the_metric(tmp_path):
    det = plot_curves(_history(detector=True), tmp_path / "det.png", "det: training curves", metric="mAP@0.5")
    assert (tmp_path / "det.png").read_bytes()[:8] == PNG
    assert det.axes[1].get_ylabel() == "mAP@0.5" and "accuracy" not in det.axes[1].get_title()
    (val,) = det.axes[1].lines  # no training mAP: only the validation line
    assert list(val.get_ydata()) == pytest.approx([0.15, 0.3, 0.45, 0.6])
    cls = plot_curves(_history(), tmp_path / "cls.png", "cls: training curves")
    assert cls.axes[1].get_ylabel() == "accuracy" and len(cls.axes[1].lines) == 2


def _sensitivity(ratios, rows: int = 12) -> Sensitivity:
    rng = np.random.default_rng(0)
    s = Sensitivity("unstructured", list(ratios), 0.99)
    for k in range(rows):
        knee = rng.uniform(0.8, 0.99)
        s.rows.append({"name": f"layer{k}", "size": 100 * (k + 1),
                       "accuracy": [0.99 if r < knee else 0.1 + 0.5 * rng.random() for r in ratios]})
    return s


def test_sensitivity_ratios_evenly_spaced(tmp_path):
    ratios = [0.0, 0.5, 0.9, 0.95, 0.98, 0.99]
    s = _sensitivity(ratios)
    fig = sensitivity_figure(s, "sens")
    (ax,) = fig.axes
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "0.5", "0.9", "0.95", "0.98", "0.99"]
    lines = [line for line in ax.lines if line.get_label().startswith("layer")]
    assert len(lines) == 12
    for line, row in zip(lines, s.rows):
        assert list(line.get_xdata()) == list(range(6))  # 0.98 and 0.99 as far apart as 0 and 0.5
        assert list(line.get_ydata()) == row["accuracy"]
    assert len({(line.get_color(), line.get_linestyle()) for line in lines}) == 12  # colours repeat, styles don't
    assert ax.get_ylim()[1] <= 1.0 and "not to scale" in ax.get_xlabel()
    even = sensitivity_figure(_sensitivity([0.1, 0.2, 0.3], rows=2)).axes[0]
    assert "not to scale" not in even.get_xlabel()
    assert plot_sensitivity(s, tmp_path / "s.png").read_bytes()[:8] == PNG
    assert not math.isnan(ax.get_ylim()[0])
