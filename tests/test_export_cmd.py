"""`dlc export` and `dlc compile` with an export: section: target opsets, conversion of foreign ONNX files,
precision, and the one-message errors."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from dlc.compiler.cli import app
from dlc.compiler.export_onnx import to_onnx
from dlc.compiler.frontend import load_model
from dlc.compiler.metadata import read_metadata
from dlc.compiler.targets import ir_for_opset
from dlc.compiler.train.checkpoint import save_checkpoint
from dlc.compiler.train.executor import Executor

from helpers import ROOT

runner = CliRunner()
LENET = ROOT / "examples" / "lenet5.yaml"


def _run(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert "Traceback" not in result.output
    return result


def _session(path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _opset(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


@pytest.fixture(scope="module")
def lenet(tmp_path_factory):
    """The LeNet example with random (filler) weights in a checkpoint, and its graph."""
    folder = tmp_path_factory.mktemp("lenet")
    loaded = load_model(LENET)
    ckpt = save_checkpoint(folder / "ckpt.safetensors", loaded.graph)
    return folder, ckpt, loaded.graph


def test_yaml_export_for_a_target_picks_its_opset_and_equals_the_backend(lenet, tmp_path):
    _, ckpt, graph = lenet
    out = tmp_path / "m.onnx"
    result = _run("export", LENET, "--weights", ckpt, "-o", out, "--target", "onnxruntime@1.14", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    model = onnx.load(out)
    onnx.checker.check_model(model, full_check=True)
    assert (_opset(model), model.ir_version) == (18, 8) == (report["opset"], report["ir_version"])
    assert any("1.14" in n and ort.__version__ in n for n in report["notes"])
    meta = read_metadata(model)
    assert (meta["opset"], meta["ir_version"], meta["min_onnxruntime"], meta["precision"]) == (18, 8, "1.14", "fp32")
    x = np.random.default_rng(1).standard_normal((3, *graph.inputs[0].shape)).astype(np.float32)
    got = _session(out).run(None, {graph.input_names[0]: x})[0]
    want = Executor(graph).forward(x)[graph.outputs[0]]
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
    assert np.abs(want).max() > 0.05  # real logits, not a constant


@pytest.mark.parametrize("args, opset", [(("--opset", "11"), 11), (("--opset", "13"), 13),
                                         (("--target", "onnxruntime@1.18"), 21), (("--target", "1.10"), 15)])
def test_onnx_file_is_converted_and_proven_equal_to_the_source(lenet, tmp_path, args, opset):
    _, _, graph = lenet
    src = tmp_path / "src.onnx"
    src.write_bytes(to_onnx(graph, opset=17).SerializeToString())
    out = tmp_path / "out.onnx"
    result = _run("export", src, "-o", out, *args, "--json")
    assert result.exit_code == 0, result.output
    model = onnx.load(out)
    onnx.checker.check_model(model, full_check=True)
    assert (_opset(model), model.ir_version) == (opset, ir_for_opset(opset))
    x = np.random.default_rng(2).standard_normal((2, *graph.inputs[0].shape)).astype(np.float32)
    name = graph.input_names[0]
    want, got = _session(src).run(None, {name: x})[0], _session(out).run(None, {name: x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())
    report = json.loads(result.stdout)
    assert report["conversion"]["source_opset"] == 17 and report["conversion"]["verification"]["runs"] == 3


def _gelu_model(opset: int = 20) -> onnx.ModelProto:
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 4)).astype(np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Gelu", ["h"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_for_opset(opset))


def test_a_model_whose_ops_the_older_opset_lacks_is_one_clear_error(tmp_path):
    src = tmp_path / "gelu.onnx"
    src.write_bytes(_gelu_model().SerializeToString())
    out = tmp_path / "out.onnx"
    result = _run("export", src, "-o", out, "--opset", "17")
    assert result.exit_code == 2
    errors = [r for r in result.stderr.splitlines() if r.startswith("error:")]
    assert len(errors) == 1 and "opset 17" in errors[0] and str(src) in errors[0]
    assert not out.exists()
    assert _run("export", src, "-o", out, "--opset", "21").exit_code == 0  # upward works


@pytest.mark.parametrize("args, needle", [
    (("--target", "onnxruntime@1.9"), "known versions: 1.10"),
    (("--opset", "10"), "out of range"),
    (("--precision", "int8", "--opset", "17"), "calibration data"),
    (("--dynamic", "batch,height,width", "--opset", "17"), "--dynamic applies to a YAML model"),
    ((), "--target onnxruntime@1.14 or --opset N"),
    (("--target", "onnxruntime@1.14:gpu"), "device"),
    (("--precision", "fp8", "--opset", "17"), "--precision"),
])
def test_bad_requests_end_in_one_message_and_exit_2(lenet, tmp_path, args, needle):
    _, _, graph = lenet
    src = tmp_path / "src.onnx"
    src.write_bytes(to_onnx(graph).SerializeToString())
    out = tmp_path / "out.onnx"
    result = _run("export", src, "-o", out, *args)
    assert result.exit_code == 2, result.output
    assert needle in result.stderr and not out.exists()


def test_yaml_without_weights_is_refused_with_what_to_do(tmp_path):
    result = _run("export", LENET, "-o", tmp_path / "m.onnx")
    assert result.exit_code == 2 and "--weights" in result.stderr


def test_fp16_export_keeps_fp32_io_and_stays_within_1e2_of_fp32(lenet, tmp_path):
    _, ckpt, graph = lenet
    out32, out16 = tmp_path / "a.onnx", tmp_path / "b.onnx"
    assert _run("export", LENET, "--weights", ckpt, "-o", out32).exit_code == 0
    result = _run("export", LENET, "--weights", ckpt, "-o", out16, "--precision", "fp16", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["precision"] == "fp16" and report["precision_check"]["rtol"] == 1e-2
    assert any("CPU" in n for n in report["notes"])  # the cpu-target warning
    s16 = _session(out16)
    assert s16.get_inputs()[0].type == "tensor(float)" and s16.get_outputs()[0].type == "tensor(float)"
    x = np.random.default_rng(3).standard_normal((4, *graph.inputs[0].shape)).astype(np.float32)
    a = _session(out32).run(None, {graph.input_names[0]: x})[0]
    b = s16.run(None, {graph.input_names[0]: x})[0]
    assert 0 < np.abs(a - b).max() <= 1e-2 * np.abs(a).max()  # really fp16 (not equal), and close
    assert out16.stat().st_size < 0.6 * out32.stat().st_size


def test_compile_follows_the_yaml_target(tmp_path):
    assert "export:" not in LENET.read_text()  # else the appended section would clash with the example's
    path = tmp_path / "lenet.yaml"
    path.write_text(LENET.read_text() + '\nexport:\n  target: "onnxruntime@1.16"\n')
    result = _run("compile", path, "-o", tmp_path / "out", "--skip-train", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["onnx"]["opset"] == 19 and report["onnx"]["ir_version"] == 9
    assert report["target"]["target"]["version"] == "1.16"
    model = onnx.load(tmp_path / "out" / "model.onnx")
    assert (_opset(model), model.ir_version) == (19, 9)
    assert read_metadata(model)["min_onnxruntime"] == "1.15"
