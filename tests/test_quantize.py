"""INT8 quantization (compiler/quantize): calibration data, format choice by (injected) measurement, layer
exclusion, refusals, the CLI, and param/MAC counting of quantized graphs (runtime/cost.py)."""

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from dlc.compiler.cli import app
from dlc.compiler.errors import DlcError
from dlc.compiler.pipeline import compile_model
from dlc.compiler.quantize import (
    Candidate,
    QuantOptions,
    QuantRefused,
    Timing,
    cpu_int8_dot_product,
    quantize_int8,
)
from dlc.compiler.quantize.api import preprocess
from dlc.compiler.quantize.calibration import calibrate, calibration_set, data_spec
from dlc.compiler.quantize.dynamic import dynamic_policy
from dlc.compiler.quantize.formats import candidates, quantize_candidate
from dlc.compiler.quantize.precheck import float_tail
from dlc.compiler.quantize.sensitivity import layer_errors
from dlc.runtime.cost import count_macs, count_params, model_cost

from helpers import ROOT

runner = CliRunner()

SMALL = """\
model:
  name: small
  input: {name: image, shape: [3, 16, 16], mean: 0.4, std: 0.25}
  layers:
    - {name: conv1, type: conv, out: 8, kernel: 3, pad: 1, bias: false}
    - {name: bn1, type: batchnorm}
    - {name: relu1, type: relu}
    - {name: conv2, type: conv, out: 16, kernel: 3, stride: 2, pad: 1, bias: false}
    - {name: bn2, type: batchnorm}
    - {name: relu2, type: relu}
    - {name: conv3, type: conv, out: 16, kernel: 3, pad: 1}
    - {name: relu3, type: relu}
    - {name: pool, type: global_avgpool}
    - {name: flatten, type: flatten}
    - {name: fc, type: linear, out: 4}
data: {dataset: synthetic, num_classes: 4, samples: 400, seed: 0}
train: {solver: adam, base_lr: 0.01, batch_size: 32, epochs: 10, seed: 0}
"""
MLP = """\
model:
  name: mlp
  input: {name: image, shape: [1, 8, 8], mean: 0.4, std: 0.25}
  layers:
    - {name: flatten, type: flatten}
    - {name: fc1, type: linear, out: 96}
    - {name: relu1, type: relu}
    - {name: fc2, type: linear, out: 96}
    - {name: relu2, type: relu}
    - {name: fc3, type: linear, out: 4}
data: {dataset: synthetic, num_classes: 4, samples: 200, seed: 0}
"""


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A small conv net trained briefly (about a second): (yaml, onnx path, model)."""
    tmp = tmp_path_factory.mktemp("quant")
    yaml = tmp / "small.yaml"
    yaml.write_text(SMALL)
    path = compile_model(yaml, tmp / "build").onnx_path
    return yaml, path, onnx.load(str(path))


def fake_measure(ms: dict[str, float], default: float):
    """Timing without timing: fp32 takes 1 ms per image; a candidate file whose name holds a key of `ms` takes
    that, any other `default`. Lets a test decide which candidate is fastest and whether any beats fp32."""
    def measure(paths, batches, min_time_s):
        out = []
        for i, p in enumerate(paths):
            t = 1.0 if i == 0 else next((v for k, v in ms.items() if k in Path(p).name), default)
            out.append({b: Timing(t * b, 1.1 * t * b) for b in batches})
        return out
    return measure


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x})[0]


def ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


# --- the result equals fp32 within the output's scale ---------------------------------------------------------


def test_int8_matches_fp32_within_output_scale(small):
    yaml, _, model = small
    result = quantize_int8(model, yaml, QuantOptions(samples=64), measure=fake_measure({}, 0.5))
    q = result.model
    assert result.chosen is not None and result.chosen.within and not result.forced
    x = calibration_set(model, data_spec(yaml, "t"), 64).images  # calibration-like: training images, normalised
    f, z = run(model, x), run(q, x)
    assert f.std() > 0.5  # logits, not saturated probabilities
    assert np.linalg.norm(z - f) / np.linalg.norm(f) < 0.05
    assert np.abs(z - f).max() < 0.15 * f.std()
    assert (z.argmax(1) == f.argmax(1)).mean() > 0.9
    # the artifact as shipped: int8 ops, dlc metadata stamped, no opset domains it does not use
    assert any(op in ("QLinearConv", "QuantizeLinear") for op in ops(q))
    meta = json.loads(next(p.value for p in q.metadata_props if p.key == "dlc"))
    assert meta["precision"] == "int8" and meta["quantization"]["format"] == result.chosen.candidate.format
    assert {o.domain for o in q.opset_import} <= {"", "com.microsoft"}
    assert result.to_dict()["size"]["ratio"] > 2.0  # a 4k-parameter net: names and scales weigh in
    # the tolerance above can fail: ranges clipped to the 51st percentile break the model
    bad = quantize_int8(model, yaml, QuantOptions(samples=64, method="percentile", percentile=51,
                                                  max_accuracy_drop=100, formats=("qoperator",)),
                        measure=fake_measure({}, 0.5)).model
    zb = run(bad, x)
    assert np.linalg.norm(zb - f) / np.linalg.norm(f) > 0.3


def test_calibration_reads_training_split_with_training_preprocessing(small):
    from dlc.compiler.data import BatchLoader, load_dataset

    yaml, _, model = small
    cal = calibration_set(model, data_spec(yaml, "t"), 50)
    train, val = load_dataset({"dataset": "synthetic", "num_classes": 4, "samples": 400, "seed": 0}, (3, 16, 16), 4,
                              yaml.parent)
    ref, _ = BatchLoader(train, len(train), [0.4] * 3, [0.25] * 3, shuffle=False, drop_last=False).make_batch(
        0, 0, np.arange(len(train)))
    assert cal.images.shape == (50, 3, 16, 16) and cal.normalization == "onnx metadata"
    flat_ref = ref.reshape(len(ref), -1)
    idx = [int(np.flatnonzero((flat_ref == img.reshape(-1)).all(1))[0]) for img in cal.images]
    assert len(set(idx)) == 50  # 50 distinct training images, exactly as the training loader normalises them
    val_norm = ((val.images - 0.4) / 0.25).reshape(len(val), -1)
    assert not any((val_norm == img.reshape(-1)).all(1).any() for img in cal.images)


# --- choice by measurement, and force ------------------------------------------------------------------------


def test_choice_follows_measurement(small):
    yaml, _, model = small
    opts = QuantOptions(samples=32, max_accuracy_drop=100)
    r = quantize_int8(model, yaml, opts, measure=fake_measure({"qdq_s8s8_pt": 0.2}, 0.6))
    assert r.chosen.candidate.key == "qdq_s8s8_pt"
    assert len(r.candidates) == 8  # QOperator/QDQ × U8S8/S8S8 × per-channel/per-tensor (VNNI or not: see below)
    r = quantize_int8(model, yaml, opts, measure=fake_measure({"qoperator_u8s8_pc": 0.3}, 0.6))
    assert r.chosen.candidate.key == "qoperator_u8s8_pc"
    row = r.latency()[0]
    assert row["batch"] == 1 and row["min_ratio"] == pytest.approx(1 / 0.3)
    assert row["median_ratio"] == pytest.approx(1 / 0.3)


def test_refuses_when_nothing_is_faster_unless_forced(small):
    yaml, _, model = small
    slower = fake_measure({"qoperator_u8s8_pt": 1.2}, 1.6)  # every candidate slower than fp32's 1 ms
    opts = QuantOptions(samples=32, max_accuracy_drop=100, formats=("qoperator",))
    with pytest.raises(QuantRefused) as info:
        quantize_int8(model, yaml, opts, measure=slower)
    assert "no INT8 candidate is faster than fp32" in str(info.value) and "force" in str(info.value)
    assert info.value.result.model is None and not any(c.faster for c in info.value.result.candidates)
    forced = quantize_int8(model, yaml, QuantOptions(samples=32, max_accuracy_drop=100, formats=("qoperator",),
                                                     force=True), measure=slower)
    assert forced.forced and forced.model is not None
    assert forced.chosen.candidate.key == "qoperator_u8s8_pt"  # the least slow
    assert any("force" in n for n in forced.notes)


# --- layer exclusion -------------------------------------------------------------------------------------------


def test_exclusion_keeps_layers_float_and_lowers_their_error(small, tmp_path):
    yaml, _, model = small
    pre = preprocess(model, tmp_path / "pre.onnx", "t")
    cal = calibration_set(model, data_spec(yaml, "t"), 32)
    calibrate(tmp_path / "pre.onnx", cal, "minmax", 99.999, tmp_path / "ranges.json", tmp_path)

    def quantized(fmt: str, exclude=()) -> onnx.ModelProto:
        out = tmp_path / f"{fmt}_{len(exclude)}.onnx"
        quantize_candidate(tmp_path / "pre.onnx", out, Candidate(fmt, "u8"), tmp_path / "ranges.json", "minmax",
                           exclude)
        return onnx.load(str(out))

    qop = quantized("qoperator", ["conv1"])
    conv1 = next(n for n in qop.graph.node if n.name == "conv1")
    float_inits = {t.name for t in qop.graph.initializer if t.data_type == TensorProto.FLOAT}
    assert conv1.op_type == "Conv" and conv1.input[1] in float_inits  # float conv, float weights
    assert ops(qop).count("QLinearConv") == 2  # conv2 and conv3 stay int8
    plain, kept = quantized("qdq"), quantized("qdq", ["conv1", "relu1"])
    dq = {n.output[0] for n in kept.graph.node if n.op_type == "DequantizeLinear"}
    conv1 = next(n for n in kept.graph.node if n.name == "conv1")
    assert conv1.input[0] not in dq and conv1.input[1] not in dq  # no rounding in front of conv1
    before = {e.node: e for e in layer_errors(pre, plain, cal.images, cal.input_name, 16)}
    after = {e.node: e for e in layer_errors(pre, kept, cal.images, cal.input_name, 16)}
    assert before["conv1"].added > 1e-3 and after["conv1"].added < 1e-6
    assert after["conv1"].error < 1e-6 < before["conv1"].error
    assert before["conv2"].added > 1e-3  # the others are still rounded


def test_greedy_exclusion_meets_the_bound(small):
    yaml, _, model = small
    # ranges clipped at the 70th percentile lose about 56 points; keeping the costliest layers float wins them back
    opts = QuantOptions(samples=64, method="percentile", percentile=70, max_accuracy_drop=5, formats=("qoperator",),
                        max_excluded=4, exclusion_tries=1)
    r = quantize_int8(model, yaml, opts, measure=fake_measure({}, 0.5))
    first = next(c for c in r.candidates if c.candidate == r.chosen.candidate and not c.excluded)
    assert first.drop > 5 and r.chosen.drop <= 5
    assert r.exclusion and r.excluded == [m for s in r.exclusion for m in s.layer.members]
    costs = [s.layer.output_error for s in r.exclusion]
    assert costs == sorted(costs, reverse=True)  # costliest first
    float_nodes = {(n.name, n.op_type) for n in r.model.graph.node}  # QOperator renames what it quantizes
    assert all((s.layer.node, s.layer.op) in float_nodes for s in r.exclusion)
    assert ops(r.model).count("QLinearConv") == 3 - sum(s.layer.op == "Conv" for s in r.exclusion)
    assert r.to_dict()["excluded_layers"] == r.excluded


# --- refusals --------------------------------------------------------------------------------------------------


def test_already_quantized_and_missing_data_are_refused(small, tmp_path):
    yaml, _, model = small
    q = quantize_int8(model, yaml, QuantOptions(samples=16, formats=("qdq",), max_accuracy_drop=100),
                      measure=fake_measure({}, 0.5)).model
    with pytest.raises(DlcError, match="already quantized.*(DequantizeLinear|QLinearConv)"):
        quantize_int8(q, yaml, source="q.onnx")
    int8_init = onnx.ModelProto.FromString(model.SerializeToString())
    int8_init.graph.initializer.append(numpy_helper.from_array(np.zeros(4, np.int8), "w_int8"))
    with pytest.raises(DlcError, match="already quantized.*int8/uint8 initializers"):
        quantize_int8(int8_init, yaml)
    with pytest.raises(DlcError, match="needs calibration images.*--data"):
        quantize_int8(model, None, source="m.onnx")
    no_data = tmp_path / "nodata.yaml"
    no_data.write_text(SMALL.split("data:")[0])
    with pytest.raises(DlcError, match="no 'data:' section"):
        quantize_int8(model, no_data)
    with pytest.raises(DlcError, match="calibration method"):
        quantize_int8(model, yaml, QuantOptions(method="kl"))
    fixed = onnx.ModelProto.FromString(model.SerializeToString())
    dim = fixed.graph.input[0].type.tensor_type.shape.dim[0]
    dim.Clear()
    dim.dim_value = 1
    with pytest.raises(DlcError, match="fixed batch size of 1.*dynamic: \\[batch\\]"):
        quantize_int8(fixed, yaml)


def test_dynamic_refused_for_conv_nets_offered_for_linear_nets(small, tmp_path):
    yaml, _, model = small
    policy = dynamic_policy(preprocess(model, tmp_path / "pre.onnx", "t"))
    assert not policy.allowed and "ConvInteger" in policy.reason and policy.linear_share < 0.05
    with pytest.raises(DlcError, match="dynamic INT8 refused.*ConvInteger"):
        quantize_int8(model, yaml, QuantOptions(formats=("dynamic",)), measure=fake_measure({}, 0.5))
    mlp_yaml = tmp_path / "mlp.yaml"
    mlp_yaml.write_text(MLP)
    mlp = onnx.load(str(compile_model(mlp_yaml, tmp_path / "mlp", skip_train=True).onnx_path))
    assert dynamic_policy(mlp).allowed and dynamic_policy(mlp).linear_share == 1.0
    r = quantize_int8(mlp, mlp_yaml, QuantOptions(samples=16, formats=("dynamic",), max_accuracy_drop=100),
                      measure=fake_measure({}, 0.5))
    assert r.chosen.candidate.format == "dynamic"
    assert "MatMulInteger" in ops(r.model) and "DynamicQuantizeLinear" in ops(r.model)
    x = calibration_set(mlp, data_spec(mlp_yaml, "t"), 32).images
    f, z = run(mlp, x), run(r.model, x)
    assert np.linalg.norm(z - f) / np.linalg.norm(f) < 0.05


def test_candidates_follow_cpu_and_target():
    assert cpu_int8_dot_product("flags\t\t: fpu sse2 avx2 avx512f avx512_vnni\n") is True
    assert cpu_int8_dot_product("flags\t\t: fpu sse2 avx2\n") is False
    assert cpu_int8_dot_product("Features\t: fp asimd asimddp\n") is True
    assert cpu_int8_dot_product("processor : 0\n") is None
    with_vnni, _ = candidates("cpu", ("qoperator", "qdq"), True)
    without, notes = candidates("cpu", ("qoperator", "qdq"), False)
    assert len(with_vnni) == 8 and not any(c.reduce_range for c in with_vnni)
    assert len(without) == 8 and all(c.reduce_range for c in without) and any("VNNI" in n for n in notes)
    trt, _ = candidates("tensorrt")
    assert {(c.format, c.activations, c.symmetric_activations) for c in trt} == {("qdq", "s8", True)}
    with pytest.raises(DlcError, match="none of the formats qoperator runs on a tensorrt target"):
        candidates("tensorrt", ("qoperator",))


def test_float_tail_of_a_detector_stays_float(tmp_path):
    det = onnx.load(str(compile_model(ROOT / "examples/tiny_detector.yaml", tmp_path, skip_train=True).onnx_path))
    tail = set(float_tail(det))
    decode = {n.name for n in det.graph.node if n.name.startswith("detect")}
    assert tail == decode  # everything after the head convs, nothing before
    assert not tail & {n.name for n in det.graph.node if n.op_type in ("Conv", "BatchNormalization", "Relu")}


# --- params and MACs of quantized graphs (runtime/cost.py) -----------------------------------------------------


class _Reader:
    def __init__(self, shape, n=4):
        rng = np.random.default_rng(0)
        self.data = [{"image": rng.standard_normal((2, *shape)).astype(np.float32)} for _ in range(n)]

    def get_next(self):
        return self.data.pop() if self.data else None


def test_quantized_resnet20_counts_like_fp32(tmp_path):
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    from dlc.compiler.analysis import summarize
    from dlc.compiler.frontend import load_model

    yaml = ROOT / "examples/resnet20.yaml"
    fp32_path = compile_model(yaml, tmp_path, skip_train=True).onnx_path
    fp32 = onnx.load(str(fp32_path))
    pre = preprocess(fp32, tmp_path / "pre.onnx", "t")  # BN folded into the convs, as before quantizing
    counts = {}
    for fmt in (QuantFormat.QOperator, QuantFormat.QDQ):
        out = tmp_path / f"{fmt}.onnx"
        quantize_static(str(tmp_path / "pre.onnx"), str(out), _Reader((3, 32, 32)), quant_format=fmt,
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        counts[fmt] = model_cost(out)
    graph = load_model(yaml).graph
    summary = summarize(graph)
    bn_channels = sum(graph.shapes[n.outputs[0]][0] for n in graph.nodes() if n.op == "batchnorm")
    assert count_params(fp32) == 274_042  # conv weights + fc + 4 values per BN channel
    # folding replaces each BN's 4 values per channel by one conv bias per channel
    assert count_params(pre) == count_params(fp32) - 3 * bn_channels == 271_690
    assert count_macs(fp32) == count_macs(pre) == summary.total_macs == 40_813_184
    for cost in counts.values():
        assert cost.params == count_params(pre)  # int8 weights + int32 biases; scales and zero points not
        assert cost.macs == summary.total_macs and cost.int8_macs == cost.macs
    assert model_cost(fp32_path).int8_macs == 0


def test_cost_of_integer_ops_by_hand():
    w = np.random.default_rng(0).integers(-5, 5, (6, 4, 3, 3)).astype(np.int8)
    nodes = [helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"]),
             helper.make_node("ConvInteger", ["xq", "w", "xz"], ["y"], name="c", pads=[1, 1, 1, 1])]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.INT32, None)
    g = helper.make_graph(nodes, "g", [x], [y], initializer=[numpy_helper.from_array(w, "w")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    assert count_params(m) == w.size and count_macs(m) == 6 * 8 * 8 * 4 * 3 * 3


# --- the command line ------------------------------------------------------------------------------------------


def test_cli_quantize_writes_model_and_report_and_exit_codes(small, tmp_path):
    yaml, path, _ = small
    out = tmp_path / "int8.onnx"
    res = runner.invoke(app, ["quantize", str(path), "-o", str(out), "--data", str(yaml), "--samples", "16",
                              "--formats", "qoperator", "--min-time", "0", "--force", "--json"],
                        catch_exceptions=False)
    assert res.exit_code == 0, res.stdout
    report = json.loads(res.stdout)
    assert out.is_file() and json.loads(out.with_suffix(".json").read_text())["chosen"] == report["chosen"]
    assert report["metric"] == "accuracy" and {r["batch"] for r in report["latency"]} == {1, 32}
    assert report["size"]["int8_bytes"] == out.stat().st_size
    text = runner.invoke(app, ["quantize", str(path), "-o", str(tmp_path / "b.onnx"), "--data", str(yaml),
                               "--samples", "16", "--formats", "qoperator", "--min-time", "0", "--force"],
                         catch_exceptions=False)
    assert text.exit_code == 0 and "INT8 candidates" in text.stdout and "latency" in text.stdout
    for args, message in (([], "needs calibration images"),
                          (["--data", str(yaml), "--method", "kl"], "calibration method"),
                          (["--data", str(yaml), "--formats", "dynamic"], "ConvInteger")):
        res = runner.invoke(app, ["quantize", str(path), "-o", str(tmp_path / "x.onnx"), *args])
        assert res.exit_code == 2 and message in res.output and "Traceback" not in res.output
    res = runner.invoke(app, ["quantize", str(out), "-o", str(tmp_path / "y.onnx"), "--data", str(yaml)])
    assert res.exit_code == 2 and "already quantized" in res.output
    assert not (tmp_path / "x.onnx").exists() and not (tmp_path / "y.onnx").exists()



def test_timing_runs_on_one_shared_pool_in_its_own_process(small):
    """Candidates are timed with runtime/bench_isolated: a child process whose sessions share one thread pool
    (a pool per session lets the last session's spinning threads slow the next). This process stays free to
    make sessions with their own threads afterwards (onnxruntime refuses them once a shared pool exists)."""
    from dlc.runtime.bench_isolated import bench_isolated
    from dlc.runtime.session import Session

    _, path, _ = small
    result = bench_isolated([path, path], [1, 3], device="cpu", min_time_s=0, warmup=1, threads=2)
    assert [(r.batch, r.runs >= 20) for r in result.rows] == [(1, True), (1, True), (3, True), (3, True)]
    assert result.threads == 2 and result.rows[0].params == count_params(onnx.load(str(path)))
    assert Session(path, device="cpu", threads=3).thread_pool == "own"
    with pytest.raises(DlcError, match=r"missing.onnx: ONNX file not found \(check the path\)"):  # dlc's own words
        bench_isolated([path.with_name("missing.onnx")], [1], min_time_s=0)
