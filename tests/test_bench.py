"""`dlc bench`: interleaved side-by-side runs, robust statistics, params and MACs against dlc's analysis."""

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from dlc.compiler.analysis import summarize
from dlc.compiler.cli import app
from dlc.compiler.errors import DlcError
from dlc.compiler.frontend import load_model
from dlc.compiler.pipeline import compile_model
from dlc.runtime.bench import MIN_RUNS, WIDEN_MAX, bench, latency_stats, speedup_stability

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
    slower = [w for w in result.warnings if "not faster" in w]
    assert bool(slower) == (result.rows[1].speedup < 1.0)


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


# --- accuracy beside latency (--data) ---------------------------------------------------------------------

DIGITS_SHAPE = (1, 8, 8)
MEAN, STD = 0.5, 0.25


def _linear_onnx(path: Path, w: np.ndarray, b: np.ndarray, meta: dict | None) -> Path:
    """Flatten + Gemm over 1×8×8 images, with dlc metadata when `meta` is given."""
    from onnx import helper

    from helpers import onnx_model

    nodes = [helper.make_node("Flatten", ["x"], ["f"]), helper.make_node("Gemm", ["f", "w", "b"], ["logits"])]
    model = onnx_model(nodes, [("w", w), ("b", b)], shape=DIGITS_SHAPE)
    if meta is not None:
        helper.set_model_props(model, {"dlc": json.dumps(meta)})
    path.write_bytes(model.SerializeToString())
    return path


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """A least-squares linear classifier on digits (≈90 % accurate), the same with its class columns rotated
    (predicts the wrong class), the good one without metadata, and data specs."""
    from dlc.compiler.data import load_dataset

    tmp = tmp_path_factory.mktemp("digits")
    cfg = {"dataset": "digits", "val_fraction": 0.2, "seed": 0}
    train, val = load_dataset(cfg, DIGITS_SHAPE, 10, tmp)
    x = ((train.images - MEAN) / STD).reshape(len(train), -1)
    x1 = np.hstack([x, np.ones((len(x), 1), np.float32)])
    coef = np.linalg.lstsq(x1, np.eye(10, dtype=np.float32)[train.labels], rcond=None)[0]
    w, b = coef[:-1], coef[-1]
    meta = {"model": "lin", "input": {"name": "x", "shape": list(DIGITS_SHAPE), "mean": [MEAN], "std": [STD]},
            "classes": [str(k) for k in range(10)]}
    good = _linear_onnx(tmp / "good.onnx", w, b, meta)
    bad = _linear_onnx(tmp / "bad.onnx", np.roll(w, 1, axis=1), np.roll(b, 1), meta)
    bare = _linear_onnx(tmp / "bare.onnx", w, b, None)
    perm = np.random.default_rng(1).permutation(10)  # output k is class perm[k], and the metadata says so
    permuted = _linear_onnx(tmp / "permuted.onnx", w[:, perm], b[perm],
                            {**meta, "classes": [str(k) for k in perm]})
    spec = tmp / "data.yaml"
    spec.write_text("data: {dataset: digits, val_fraction: 0.2}\n")
    spec_norm = tmp / "model.yaml"
    spec_norm.write_text(f"model:\n  input: {{shape: [1, 8, 8], mean: {MEAN}, std: {STD}}}\n"
                         "data: {dataset: digits, val_fraction: 0.2}\n")
    return {"good": good, "bad": bad, "bare": bare, "permuted": permuted, "spec": spec, "spec_norm": spec_norm,
            "val": val}


def _direct(path: Path, val, mean: float, std: float) -> np.ndarray:
    """Predictions of the ONNX file run by onnxruntime directly, on the validation images, in one batch."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": ((val.images - mean) / std).astype(np.float32)})[0].argmax(axis=1)


def test_data_accuracy_matches_direct_run(digits):
    from sklearn.metrics import f1_score

    val = digits["val"]
    result = bench([digits["good"], digits["bad"], digits["bare"]], [1], device="cpu", min_time_s=0.0, warmup=0,
                   data=digits["spec_norm"])
    assert result.data == str(digits["spec_norm"])
    for path, ev in zip(("good", "bad", "bare"), result.evaluations):
        preds = _direct(digits[path], val, MEAN, STD)
        assert ev["total"] == len(val) == 359
        assert ev["correct"] == int((preds == val.labels).sum())
        assert ev["macro_f1"] == pytest.approx(f1_score(val.labels, preds, average="macro"))
        import onnxruntime as ort
        from sklearn.metrics import log_loss

        sess = ort.InferenceSession(str(digits[path]), providers=["CPUExecutionProvider"])
        logits = sess.run(None, {"x": ((val.images - MEAN) / STD).astype(np.float32)})[0].astype(np.float64)
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        assert ev["loss"] == pytest.approx(log_loss(val.labels, probs, labels=range(10)), rel=1e-6)
    good, bad, bare = result.evaluations
    assert bad["loss"] > good["loss"] + 0.5
    assert good["accuracy"] > 0.85 and bad["accuracy"] < 0.2  # the rotated classifier names the wrong digit
    assert good["normalization"] == "onnx metadata" and bare["normalization"] == "yaml model.input"
    assert bare["correct"] == good["correct"]
    assert any("bare.onnx" in n and "no dlc metadata" in n for n in result.notes)
    rows = result.rows
    assert [r.accuracy for r in rows] == [e["accuracy"] for e in result.evaluations]
    assert rows[1].accuracy_delta == pytest.approx(bad["accuracy"] - good["accuracy"]) and rows[0].accuracy_delta == 0
    drop = [w for w in result.warnings if "less accurate" in w]
    assert len(drop) == 1 and "bad.onnx" in drop[0]  # the bare copy is exactly as accurate: no warning


def test_data_labels_follow_the_metadata_class_names(digits):
    result = bench([digits["good"], digits["permuted"]], [1], device="cpu", min_time_s=0.0, warmup=0,
                   data=digits["spec"])
    good, permuted = result.evaluations
    assert permuted["correct"] == good["correct"] and permuted["macro_f1"] == pytest.approx(good["macro_f1"])


def test_data_without_normalisation_says_so(digits):
    val = digits["val"]
    result = bench([digits["bare"]], [1], device="cpu", min_time_s=0.0, warmup=0, data=digits["spec"])
    (ev,) = result.evaluations
    assert ev["normalization"] == "none" and ev["mean"] == [0.0] and ev["std"] == [1.0]
    assert ev["correct"] == int((_direct(digits["bare"], val, 0.0, 1.0) == val.labels).sum())
    assert "fed unnormalised" in result.notes[0]


def test_no_drop_warning_when_more_accurate(digits):
    result = bench([digits["bad"], digits["good"]], [1], device="cpu", min_time_s=0.0, warmup=0,
                   data=digits["spec"])
    assert not [w for w in result.warnings if "less accurate" in w]
    assert result.rows[1].accuracy_delta > 0.6


def test_provider_mismatch_warns(digits, monkeypatch):
    import dlc.runtime.bench as bench_module

    class FallbackSession(bench_module.Session):
        """The second model 'runs' on CUDA: as if the first had fallen back to the CPU."""

        def __init__(self, path, **kw):
            super().__init__(path, **kw)
            if Path(path).name == "bad.onnx":
                self.provider = "CUDAExecutionProvider"

    monkeypatch.setattr(bench_module, "Session", FallbackSession)
    result = bench([digits["good"], digits["bad"]], [1], device="cpu", min_time_s=0.0, warmup=0)
    (warning,) = [w for w in result.warnings if "execution providers" in w]
    assert "good.onnx on CPU" in warning and "bad.onnx on CUDA" in warning and "NOT like for like" in warning
    same = bench([digits["good"], digits["good"]], [1], device="cpu", min_time_s=0.0, warmup=0)
    assert not [w for w in same.warnings if "execution providers" in w]


def test_cli_data_table_json_and_accuracy_plot(digits, tmp_path):
    png = tmp_path / "acc.png"
    args = ["bench", str(digits["good"]), str(digits["bad"]), "--device", "cpu", "--min-time", "0", "--data",
            str(digits["spec"]), "--threads", "2"]
    res = runner.invoke(app, [*args, "--json", "--plot", str(png)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["threads"] == 2 and len(data["evaluations"]) == 2
    assert data["thread_pool"] == "shared"  # timed in a child process whose sessions share one pool
    assert data["rows"][0]["accuracy"] == data["evaluations"][0]["accuracy"] > 0.85
    assert any("less accurate" in w for w in data["warnings"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = runner.invoke(app, args)
    assert table.exit_code == 0, table.output
    good = data["evaluations"][0]
    assert "accuracy on the validation split" in table.stdout and f"{100 * good['accuracy']:.2f}" in table.stdout
    assert f"{good['correct']} / 359" in table.stdout and "paired ×" in table.stdout
    assert "less accurate" in table.output


def test_data_errors(digits, tmp_path):
    no_data = tmp_path / "nodata.yaml"
    no_data.write_text("model:\n  input: {shape: [1, 8, 8]}\n")
    res = runner.invoke(app, ["bench", str(digits["good"]), "--min-time", "0", "--data", str(no_data)])
    assert res.exit_code == 2 and "nodata.yaml" in res.output and "no 'data:' section" in res.output
    assert "Traceback" not in res.output
    bad_data = tmp_path / "baddata.yaml"
    bad_data.write_text("data: {dataset: imagenet}\n")
    res = runner.invoke(app, ["bench", str(digits["good"]), "--min-time", "0", "--data", str(bad_data)])
    assert res.exit_code == 2 and "baddata.yaml:1" in res.output and "imagenet" in res.output
    res = runner.invoke(app, ["bench", str(digits["good"]), "--min-time", "0", "--data", str(tmp_path / "no.yaml")])
    assert res.exit_code == 2 and "no.yaml" in res.output and "not found" in res.output


def _detector(tmp_path: Path) -> Path:
    """A stand-in detector: a 3×32×32 input, dlc metadata saying task: detection (tests replace its run)."""
    from onnx import helper

    from helpers import onnx_model

    model = onnx_model([helper.make_node("GlobalAveragePool", ["x"], ["y"])], shape=(3, 32, 32))
    meta = {"model": "det", "task": "detection", "input": {"shape": [3, 32, 32], "mean": [0.0] * 3, "std": [1.0] * 3},
            "classes": ["disc", "square", "triangle"], "postprocess": {"iou_threshold": 0.45}}
    helper.set_model_props(model, {"dlc": json.dumps(meta)})
    path = tmp_path / "det.onnx"
    path.write_bytes(model.SerializeToString())
    return path


def test_detection_map_through_evaluate_detections(tmp_path):
    """mAP@0.5 wiring: decoded rows from a stand-in run (the ground truth itself, then shifted boxes, then half
    the images without detections) against evaluate_detections on the same predictions."""
    from dlc.compiler.data.detection import load_detection_dataset
    from dlc.runtime.evaluate import Evaluator
    from dlc.runtime.metrics import evaluate_detections
    from dlc.runtime.session import Session

    spec = tmp_path / "det.yaml"
    spec.write_text("data: {dataset: synthetic_detection, num_classes: 3, samples: 40, val_fraction: 0.5}\n")
    val = load_detection_dataset({"dataset": "synthetic_detection", "num_classes": 3, "samples": 40,
                                  "val_fraction": 0.5}, (3, 32, 32), tmp_path)[1]
    session = Session(_detector(tmp_path), device="cpu")
    seen = []

    def rows_for(shift: float, keep):
        def run(x):
            start = sum(len(b) for b in seen)
            seen.append(x)
            assert np.allclose(x, val.images[start:start + len(x)])  # images in order, normalised by metadata
            out = np.zeros((len(x), 8, 8), np.float32)
            for k in range(len(x)):
                i = start + k
                if not keep(i):
                    continue
                for j, (box, label) in enumerate(zip(val.boxes[i], val.labels[i])):
                    out[k, j, :4] = box + shift
                    out[k, j, 4] = 1.0
                    out[k, j, 5 + label] = 0.9
            return {"rows": out}
        return run

    evaluator = Evaluator(spec)
    n_gt = sum(len(b) for b in val.boxes)
    session.run = rows_for(0.0, lambda i: True)
    perfect = evaluator.evaluate(session)
    assert (perfect.task, perfect.metric, perfect.accuracy) == ("detection", "mAP@0.5", 1.0)
    assert perfect.correct == perfect.total == n_gt
    seen.clear()
    session.run = rows_for(40.0, lambda i: True)  # every box moved off its object
    assert evaluator.evaluate(session).accuracy == 0.0
    seen.clear()
    session.run = rows_for(0.0, lambda i: i % 2 == 0)
    half = evaluator.evaluate(session)
    gt = [(b, lab) for b, lab in zip(val.boxes, val.labels)]
    preds = [(b, np.full(len(b), 0.9, np.float32), lab) if i % 2 == 0 else
             (np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64))
             for i, (b, lab) in enumerate(gt)]
    direct = evaluate_detections(gt, preds, 3, iou_threshold=0.5)
    assert 0 < half.accuracy < 1 and half.accuracy == pytest.approx(direct["map"])
    assert half.correct == direct["tp"]


def test_detection_needs_detection_data(digits, tmp_path):
    with pytest.raises(DlcError) as info:
        bench([_detector(tmp_path)], [1], device="cpu", min_time_s=0.0, data=digits["spec"])
    assert "det.onnx is a detection model but --data" in str(info.value)
    assert "holds a classification data set ('digits')" in str(info.value)


def test_ratios_under_changing_load(lenets, monkeypatch):
    """A fake clock: model A takes 2 ms and B 1 ms times a load factor that changes every round, and B never
    runs in a quiet round. The paired ratio recovers 2 exactly; the ratio of minima does not."""
    import types

    import dlc.runtime.bench as bench_module

    (_, full), (_, half) = lenets
    clock = types.SimpleNamespace(now=0.0, calls=0)
    cost = {str(full): 2e-3, str(half): 1e-3}
    loads = [1.0, 3.0, 1.5, 2.0, 4.0]  # per round; only A ever sees the quiet factor 1.0

    class FakeSession:
        provider = "CPUExecutionProvider"
        metadata = None

        def __init__(self, path, **kw):
            self.path, self.inputs = str(path), [types.SimpleNamespace(name="x", shape=["n", 1, 28, 28])]

        def random_inputs(self, batch, seed=0):
            return {}

        def run(self, feeds):
            load = loads[clock.calls // 2 % len(loads)]
            if self.path == str(half) and load == 1.0:
                load = 1.2
            clock.calls += 1
            clock.now += cost[self.path] * load

    monkeypatch.setattr(bench_module, "Session", FakeSession)
    monkeypatch.setattr(bench_module, "time", types.SimpleNamespace(perf_counter=lambda: clock.now))
    result = bench([full, half], [1], min_time_s=0.0, warmup=0)
    a, b = result.rows
    assert b.runs == a.runs == MIN_RUNS
    assert b.speedup == pytest.approx(2.0 / 1.2)  # A's quiet round against B's quietest
    ratios = [2.0 * f / (1.0 * (1.2 if f == 1.0 else f)) for f in loads]
    assert b.paired_ratio == pytest.approx(sorted(ratios)[2]) == pytest.approx(2.0)
    assert a.paired_ratio == 1.0


# --- unstable measurements: minima vs medians, block vs block, widening ----------------------------------


def test_stability_flags_minima_far_from_medians():
    """The reported case: two identical models, 2.94× apart by minima (one quiet run of B), 1.05× by medians."""
    rng = np.random.default_rng(0)
    a = 1.05 + 0.02 * rng.random(40)
    b = 1.0 + 0.02 * rng.random(40)
    b[7] = a.min() / 2.94
    st = speedup_stability(a, b)
    assert st.speedup == pytest.approx(2.94) and st.median_ratio == pytest.approx(1.05, rel=0.03)
    assert st.unstable and "2.94× by minima but 1.05× by medians" in st.reasons[0]
    assert st.blocks == 5 and st.high == pytest.approx(2.94, rel=0.01) and st.low == pytest.approx(1.05, rel=0.03)
    steady = speedup_stability(a, 1.0 + 0.02 * rng.random(40))
    assert not steady.unstable and not steady.reasons
    assert steady.low <= steady.speedup <= steady.high and steady.high / steady.low < 1.05


def test_stability_flags_blocks_that_disagree():
    """Minima and medians agree (1.0×) but the last block's speed-up is 1.3×: flagged by the blocks alone."""
    a = np.ones(40)
    a[32:] = 1.3
    b = np.ones(40)
    st = speedup_stability(a, b)
    assert st.speedup == st.median_ratio == 1.0
    assert st.unstable and st.reasons == ["1.00×–1.30× across 5 blocks of rounds"]
    assert (st.low, st.high) == (1.0, pytest.approx(1.3))
    assert not speedup_stability(a, b, tolerance=0.35).unstable
    few = speedup_stability(a[:9], b[:9])  # at least 4 rounds a block: 2 blocks
    assert few.blocks == 2 and not speedup_stability(a[:3], b[:3]).unstable  # one block: no spread to judge


def _fake_bench(monkeypatch, cost_ms: float, quiet_run: int | None):
    """Sessions on a fake clock: every run takes cost_ms, except B's run number `quiet_run` (a third of it)."""
    import types

    import dlc.runtime.bench as bench_module

    clock = types.SimpleNamespace(now=0.0, b_runs=0)

    class FakeSession:
        provider = "CPUExecutionProvider"
        metadata = None

        def __init__(self, path, **kw):
            self.path, self.inputs = Path(path), [types.SimpleNamespace(name="x", shape=["n", 1, 28, 28])]

        def random_inputs(self, batch, seed=0):
            return {}

        def run(self, feeds):
            t = cost_ms
            if self.path.name == "b.onnx":
                clock.b_runs += 1
                if clock.b_runs == quiet_run:
                    t = cost_ms / 3
            clock.now += t / 1e3

    monkeypatch.setattr(bench_module, "Session", FakeSession)
    monkeypatch.setattr(bench_module, "model_cost", lambda p: types.SimpleNamespace(file_bytes=0, params=0, macs=0))
    monkeypatch.setattr(bench_module, "time", types.SimpleNamespace(perf_counter=lambda: clock.now))
    return lambda: bench(["a.onnx", "b.onnx"], [4], min_time_s=0.0, warmup=0)


def test_unstable_measurement_is_widened_then_flagged(monkeypatch):
    result = _fake_bench(monkeypatch, cost_ms=1.0, quiet_run=3)()
    a, b = result.rows
    assert a.runs == b.runs == MIN_RUNS * 2 ** WIDEN_MAX  # doubled twice, then still unstable
    assert b.speedup == pytest.approx(3.0) and b.median_ratio == 1.0 and b.unstable and not a.unstable
    assert b.speedup_interval == [pytest.approx(1.0), pytest.approx(3.0)] and a.speedup_interval == [1.0, 1.0]
    (warning,) = [w for w in result.warnings if "unstable" in w]
    assert "b.onnx vs a.onnx at batch 4" in warning and "1.00×–3.00×" in warning and "\n" not in warning
    data = json.loads(json.dumps(result.to_dict()))
    assert data["rows"][1]["unstable"] is True and data["rows"][1]["speedup_interval"] == pytest.approx([1.0, 3.0])


def test_steady_measurement_is_not_widened(monkeypatch):
    result = _fake_bench(monkeypatch, cost_ms=1.0, quiet_run=None)()
    assert [r.runs for r in result.rows] == [MIN_RUNS, MIN_RUNS]
    assert not result.rows[1].unstable and result.rows[1].speedup_interval == [1.0, 1.0]
    assert not result.warnings


def test_widening_stays_within_the_time_budget(monkeypatch):
    """20 runs of 50 ms are 1 s per model: doubling would pass 4 × 0.25 s, so the pair is flagged unwidened."""
    result = _fake_bench(monkeypatch, cost_ms=50.0, quiet_run=3)()
    assert [r.runs for r in result.rows] == [MIN_RUNS, MIN_RUNS]
    assert result.rows[1].unstable and any("unstable timing of b.onnx" in w for w in result.warnings)


def test_identical_models_under_load(lenets, tmp_path):
    """One ONNX file against a copy of itself while another process burns CPU in bursts: the speed-up's
    interval over blocks holds 1 (to 10 %: a few per cent of order bias is not instability), or the bench says
    the timing is unstable. No assertion on the times themselves."""
    import shutil
    import subprocess
    import sys

    (_, full), _ = lenets
    copy = shutil.copy(full, tmp_path / "copy.onnx")
    burner = subprocess.Popen([sys.executable, "-c", "import time\nwhile True:\n    t = time.perf_counter()\n"
                               "    while time.perf_counter() - t < 0.03: pass\n    time.sleep(0.03)"])
    try:
        result = bench([full, copy], [1], device="cpu", min_time_s=0.3, warmup=2)
    finally:
        burner.kill()
        burner.wait()
    a, b = result.rows
    lo, hi = b.speedup_interval
    assert lo <= b.speedup <= hi and a.speedup_interval == [1.0, 1.0]
    flagged = [w for w in result.warnings if "unstable timing of copy.onnx" in w]
    assert bool(flagged) == b.unstable
    assert b.unstable or lo / 1.1 <= 1.0 <= hi * 1.1, (lo, hi, b.median_ratio)


def test_table_shows_the_interval(monkeypatch):
    from rich.console import Console

    from dlc.runtime.bench import bench_table

    result = _fake_bench(monkeypatch, cost_ms=1.0, quiet_run=3)()
    console = Console(width=250, record=True)
    console.print(bench_table(result))
    text = console.export_text()
    assert "blocks ×" in text and "1.00–3.00" in text and "3.00×?" in text
