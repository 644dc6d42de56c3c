"""`dlc bench`: interleaved side-by-side runs, robust statistics, params and MACs against dlc's analysis."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dlc.compiler.analysis import summarize
from dlc.compiler.cli import app
from dlc.compiler.errors import DlcError
from dlc.compiler.frontend import load_model
from dlc.compiler.pipeline import compile_model
from dlc.runtime.bench import MIN_RUNS, bench, latency_stats

from helpers import ROOT

runner = CliRunner()
LENET = ROOT / "examples/lenet5.yaml"


@pytest.fixture(scope="module")
def lenets(tmp_path_factory):
    """LeNet-5 and a half-width LeNet-5, compiled without training: (yaml, onnx) pairs."""
    tmp = tmp_path_factory.mktemp("bench")
    half_yaml = tmp / "half.yaml"
    text = LENET.read_text()
    for old, new in (("out: 6,", "out: 3,"), ("out: 16,", "out: 8,"), ("out: 120}", "out: 60}")):
        assert old in text
        text = text.replace(old, new)
    half_yaml.write_text(text)
    full = compile_model(LENET, tmp / "full", skip_train=True).onnx_path
    half = compile_model(half_yaml, tmp / "half", skip_train=True).onnx_path
    return (LENET, full), (half_yaml, half)


def test_bench_two_lenets(lenets):
    (full_yaml, full), (half_yaml, half) = lenets
    order = []
    result = bench(
        [full, half],
        [1, 4],
        device="cpu",
        min_time_s=0.05,
        warmup=2,
        on_run=lambda i, b: order.append((i, b)),
    )
    assert [(r.model, r.batch) for r in result.rows] == [
        ("full/model.onnx", 1),
        ("half/model.onnx", 1),
        ("full/model.onnx", 4),
        ("half/model.onnx", 4),
    ]
    for batch in (1, 4):
        seq = [i for i, b in order if b == batch]
        assert seq == [0, 1] * (len(seq) // 2) and len(seq) % 2 == 0  # strictly interleaved A, B, A, B
        assert len(seq) // 2 >= MIN_RUNS
    for r in result.rows:
        assert r.provider == "CPUExecutionProvider"
        assert r.runs >= MIN_RUNS and 0 <= r.clipped < r.runs
        assert 0 < r.min_ms <= r.p50_ms <= r.p90_ms <= r.p99_ms
        assert r.throughput == pytest.approx(r.batch / (r.p50_ms / 1e3))
        assert r.file_bytes == Path(r.path).stat().st_size
    first, second = result.rows[0], result.rows[1]
    assert first.speedup == 1.0 and first.median_ratio == 1.0
    assert second.speedup == pytest.approx(first.min_ms / second.min_ms)
    assert second.median_ratio == pytest.approx(first.p50_ms / second.p50_ms)
    for yaml_path, row in ((full_yaml, first), (half_yaml, second)):
        s = summarize(load_model(yaml_path).graph)  # LeNet has no batch norm: ONNX initializers == dlc params
        assert (row.params, row.macs) == (s.total_params, s.total_macs)
    assert second.macs < first.macs and second.params < first.params
    assert result.input_shape == [[1, 28, 28]]


def test_latency_stats_clips_outliers():
    times = [1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7, 50.0, 80.0]
    st = latency_stats(times)
    # Q1 = 1.225, Q3 = 1.675 (numpy's linear interpolation): the limit Q3 + 3·IQR = 3.025 drops 50 and 80.
    assert (st.runs, st.clipped) == (10, 2)
    assert st.p50_ms == pytest.approx(1.35) and st.min_ms == 1.0 and st.mean_ms == pytest.approx(1.35)
    assert st.p99_ms <= 1.7
    steady = latency_stats([2.0] * 30)
    assert steady.clipped == 0 and steady.p50_ms == steady.p99_ms == steady.min_ms == 2.0


def test_mismatched_input_shapes(lenets, tmp_path):
    (_, full), _ = lenets
    other = compile_model(ROOT / "examples/resnet20.yaml", tmp_path, skip_train=True).onnx_path
    with pytest.raises(DlcError) as info:
        bench([full, other], [1], device="cpu", min_time_s=0.0)
    assert str(full) in str(info.value) and str(other) in str(info.value)


def test_slower_model_warns(lenets):
    (_, full), (_, half) = lenets
    result = bench([half, full], [32], device="cpu", min_time_s=0.0, warmup=1)
    assert result.rows[0].speedup == 1.0
    # No timing assertion (machines are noisy): a warning appears exactly when the robust speed-up is < 1.
    assert bool(result.warnings) == (result.rows[1].speedup < 1.0)


def test_cli_json_and_plot(lenets, tmp_path):
    (_, full), (_, half) = lenets
    png = tmp_path / "plot.png"
    res = runner.invoke(
        app,
        [
            "bench",
            str(full),
            str(half),
            "--batch",
            "1,2",
            "--device",
            "cpu",
            "--min-time",
            "0.05",
            "--json",
            "--plot",
            str(png),
        ],
        catch_exceptions=False,
    )
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert len(data["rows"]) == 4 and data["rows"][0]["speedup"] == 1.0
    assert {
        "p50_ms",
        "p90_ms",
        "p99_ms",
        "min_ms",
        "throughput",
        "params",
        "macs",
        "median_ratio",
        "clipped",
    } <= set(data["rows"][0])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = runner.invoke(app, ["bench", str(full), str(half), "--device", "cpu", "--min-time", "0"])
    assert table.exit_code == 0 and "speed-up" in table.stdout and "61,706" in table.stdout


def test_cli_errors(lenets, tmp_path):
    (_, full), _ = lenets
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"not an onnx model at all")
    res = runner.invoke(app, ["bench", str(full), str(corrupt), "--min-time", "0"])
    assert res.exit_code == 2 and "corrupt.onnx" in res.output and "Traceback" not in res.output
    res = runner.invoke(app, ["bench", str(full), "--batch", "1,x"])
    assert res.exit_code == 2 and "--batch" in res.output
    res = runner.invoke(app, ["bench", str(tmp_path / "missing.onnx")])
    assert res.exit_code == 2 and "not found" in res.output
