"""`dlc optimize` and the `optimize:` section: passes run on dlc's own exports, are proven through
onnxruntime, and bad input ends in one clear message."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from dlc.compiler.cli import app
from dlc.compiler.errors import DlcError
from dlc.compiler.onnx_io import load_onnx
from dlc.compiler.pipeline import compile_model

from helpers import ROOT

runner = CliRunner()


@pytest.fixture(scope="module")
def resnet(tmp_path_factory):
    """resnet20 compiled untrained, then every batch norm given random statistics and affine parameters (an
    untrained one is the identity, which a wrong fold would leave unnoticed)."""
    out = tmp_path_factory.mktemp("resnet")
    path = compile_model(ROOT / "examples/resnet20.yaml", out, skip_train=True).onnx_path
    model = onnx.load(path)
    inits = {t.name: t for t in model.graph.initializer}
    rng = np.random.default_rng(11)
    bns = [n for n in model.graph.node if n.op_type == "BatchNormalization"]
    for node in bns:
        c = numpy_helper.to_array(inits[node.input[1]]).shape
        for name, value in zip(node.input[1:5], (rng.uniform(0.5, 1.5, c), rng.normal(0, 0.2, c),
                                                 rng.normal(0, 0.5, c), rng.uniform(0.5, 2.0, c))):
            inits[name].CopyFrom(numpy_helper.from_array(value.astype(np.float32), name))
    assert len(bns) == 21
    onnx.save(model, out / "random_bn.onnx")
    x = np.random.default_rng(1).standard_normal((2, 3, 32, 32)).astype(np.float32)
    identity, randomised = _run(path, x), _run(out / "random_bn.onnx", x)
    assert np.abs(identity - randomised).max() > 0.1 * np.abs(identity).max()
    return out / "random_bn.onnx"


def _run(path, x):
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x})[0]


def test_optimize_folds_batchnorm_and_proves_it(resnet, tmp_path):
    out = tmp_path / "opt.onnx"
    result = runner.invoke(app, ["optimize", str(resnet), "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    ops = [n.op_type for n in onnx.load(out).graph.node]
    assert "BatchNormalization" not in ops and report["nodes_after"] < report["nodes_before"]
    assert report["verification"]["runs"] == 3 and report["verification"]["max_abs_diff"] < 1e-3
    fold = next(r for r in report["passes"] if r["name"] == "fold_bn")
    assert fold["rewrites"] == 21  # 19 conv+BN pairs in the blocks, the stem, and two projections
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    np.testing.assert_allclose(_run(out, x), _run(resnet, x), rtol=1e-3, atol=1e-4)


def test_optimize_bad_inputs(tmp_path, resnet):
    (tmp_path / "bad.onnx").write_bytes(b"\x08\x07garbage")
    result = runner.invoke(app, ["optimize", str(tmp_path / "bad.onnx"), "-o", str(tmp_path / "o.onnx")])
    assert result.exit_code == 2 and "not a readable ONNX model" in result.stderr
    result = runner.invoke(app, ["optimize", str(resnet), "-o", str(tmp_path / "o.onnx"), "--passes", "fold_nb"])
    assert result.exit_code == 2 and "unknown pass 'fold_nb'" in result.stderr and "fold_bn" in result.stderr
    assert not (tmp_path / "o.onnx").exists()


def test_external_data_may_not_escape_the_folder(tmp_path):
    weight = numpy_helper.from_array(np.ones((2, 2), np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    (tmp_path / "m").mkdir()
    onnx.save(model, tmp_path / "m/model.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
              location="weights.bin", size_threshold=0)
    assert load_onnx(tmp_path / "m/model.onnx").graph.initializer[0].name == "w"
    evil = onnx.load(tmp_path / "m/model.onnx", load_external_data=False)
    for entry in evil.graph.initializer[0].external_data:
        if entry.key == "location":
            entry.value = "../secret.bin"
    (tmp_path / "secret.bin").write_bytes(b"\0" * 16)
    onnx.save(evil, tmp_path / "m/evil.onnx")
    with pytest.raises(DlcError, match="outside the model's folder"):
        load_onnx(tmp_path / "m/evil.onnx")


def test_compile_with_optimize_section(tmp_path):
    text = (ROOT / "examples/mobilenet_small.yaml").read_text() + "optimize: {passes: [fold_bn, eliminate, dce], check: 2}\n"
    (tmp_path / "m.yaml").write_text(text)
    result = compile_model(tmp_path / "m.yaml", tmp_path / "out")
    opt = result.report["optimization"]
    assert opt["nodes_after"] < opt["nodes_before"] and opt["verification"]["runs"] == 2
    assert "BatchNormalization" not in [n.op_type for n in onnx.load(result.onnx_path).graph.node]
    (tmp_path / "bad.yaml").write_text(text.replace("fold_bn,", "fold_bnn,"))
    with pytest.raises(DlcError, match=r"bad.yaml:\d+: unknown pass 'fold_bnn' in 'optimize.passes' \(did you mean"):
        compile_model(tmp_path / "bad.yaml", tmp_path / "out2")


def test_an_input_that_fails_the_checker_is_blamed_not_the_passes(tmp_path):
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])  # no shape: invalid
    src = tmp_path / "bad.onnx"
    onnx.save(helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 17)]), src)
    result = CliRunner().invoke(app, ["optimize", str(src), "-o", str(tmp_path / "o.onnx")])
    assert result.exit_code == 2
    assert "bad.onnx: fails onnx's checker already, before any pass" in result.output
    assert not (tmp_path / "o.onnx").exists()


# --- large models: streamed writes, weightless checks, verification relative to each output's scale ---------
def _wide_model(seed=0, scale=1.0):
    """Conv + BN + Gemm with weights well above the weightless() limit and a shape-like int64 initializer."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for n, a in (
        ("w", rng.standard_normal((32, 8, 3, 3)) * scale), ("s", rng.uniform(0.5, 1.5, 32)),
        ("b", rng.normal(0, 0.2, 32)), ("m", rng.normal(0, 0.5, 32)), ("v", rng.uniform(0.5, 2, 32)),
        ("fc", rng.standard_normal((10, 32 * 6 * 6)) * scale), ("fcb", rng.standard_normal(10)))]
    inits.append(numpy_helper.from_array(np.array([0, -1], np.int64), "target"))
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[3, 3]),
             helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["n"]),
             helper.make_node("Relu", ["n"], ["r"]),
             helper.make_node("Reshape", ["r", "target"], ["f"]),
             helper.make_node("Gemm", ["f", "fc", "fcb"], ["y"], transB=1)]
    graph = helper.make_graph(nodes, "wide", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 10])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_save_onnx_streams_initializers_and_reads_back_the_same_model(tmp_path):
    from dlc.compiler.onnx_io import save_onnx, serialized_chunks

    model = _wide_model()
    model.metadata_props.add(key="k", value="v")  # a field after the graph's: order of the pieces is no matter
    chunks = list(serialized_chunks(model))
    assert len(chunks) == 1 + 2 * len(model.graph.initializer)
    assert [len(c) for c in chunks[2::2]] == [len(t.SerializeToString()) for t in model.graph.initializer]
    assert max(len(c) for c in chunks[1::2]) < 16  # each tensor behind its few framing bytes
    save_onnx(model, tmp_path / "m.onnx")
    back = onnx.load(tmp_path / "m.onnx")
    assert back.SerializeToString() == model.SerializeToString()
    x = np.random.default_rng(3).standard_normal((2, 8, 8, 8)).astype(np.float32)
    np.testing.assert_array_equal(_run(tmp_path / "m.onnx", x), ort.InferenceSession(
        model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0])
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]  # no temporary file left


def test_weightless_model_checks_and_infers_shapes_like_the_full_one():
    from dlc.compiler.onnx_io import weightless

    model = _wide_model()
    light = weightless(model)
    assert {t.name for t in light.graph.initializer} == {"s", "b", "m", "v", "fcb", "target"}  # small or int
    assert {"w", "fc"} <= {i.name for i in light.graph.input}
    onnx.checker.check_model(light, full_check=True)
    shapes = {}
    for m in (model, light):
        inferred = onnx.shape_inference.infer_shapes(m, data_prop=True)
        shapes[id(m)] = {v.name: str(v.type) for v in inferred.graph.value_info}
    assert shapes[id(model)] == shapes[id(light)] and "f" in shapes[id(light)]
    broken = _wide_model()
    broken.graph.node[4].input[1] = "nowhere"
    with pytest.raises(onnx.checker.ValidationError):
        onnx.checker.check_model(weightless(broken), full_check=True)


def test_optimize_graph_does_not_view_into_the_input_model():
    from dlc.compiler.passes import OnnxGraph

    model = _wide_model()
    g = OnnxGraph(model)
    model.graph.input[0].name = "renamed"
    model.graph.output[0].name = "renamed_too"
    model.graph.ClearField("initializer")
    assert g.inputs[0].name == "x" and g.outputs[0].name == "y" and "fc" in g.inits
    assert not g.model.graph.node and not g.model.graph.initializer  # only the model's other fields are kept


def test_verification_is_relative_to_each_outputs_scale():
    from dlc.compiler.passes.verify import compare

    rng = np.random.default_rng(5)
    x = (rng.standard_normal(1000) * 500).astype(np.float32)
    x[7] = 1e-3  # a near-zero logit among ones in the hundreds
    rounding = x + (rng.standard_normal(1000) * 500 * 2e-6).astype(np.float32)  # float32 sums reordered
    assert compare(x, rounding, 1e-3, 1e-4)[2]
    assert not np.allclose(rounding, x, rtol=1e-3, atol=1e-4)  # what an elementwise rtol would have said
    wrong = x.copy()
    wrong[11] += 0.01 * 500  # one element off by 1 % of the scale: a real error
    assert not compare(x, wrong, 1e-3, 1e-4)[2]
    nan = x.copy()
    nan[3] = np.nan
    assert not compare(x, nan, 1e-3, 1e-4)[2] and compare(nan, nan.copy(), 1e-3, 1e-4)[2]


def test_optimize_a_large_magnitude_model_verifies_and_reports_phases(tmp_path):
    src = tmp_path / "big.onnx"
    onnx.save(_wide_model(scale=40.0), src)  # outputs in the thousands
    out = tmp_path / "o.onnx"
    result = runner.invoke(app, ["optimize", str(src), "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert set(report["seconds"]) == {"load", "passes", "check", "write", "verify"}
    assert report["nodes_after"] == 4 and report["verification"]["max_rel_diff"] < 1e-5
    x = np.random.default_rng(0).standard_normal((2, 8, 8, 8)).astype(np.float32)
    ref = _run(src, x)
    assert np.abs(ref).max() > 1000
    np.testing.assert_allclose(_run(out, x), ref, rtol=1e-4, atol=1e-3 * np.abs(ref).max())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "o.onnx"]


def test_optimize_writes_nothing_when_verification_fails(tmp_path, monkeypatch, resnet):
    from dlc.compiler.passes import PASSES

    def corrupt(g):  # a wrong "pass": doubles the first conv's weights
        conv = next(n for n in g.nodes if n.op_type == "Conv")
        g.inits[conv.input[1]] = g.inits[conv.input[1]] * 2
        return 1

    monkeypatch.setitem(PASSES, "corrupt", corrupt)
    out = tmp_path / "o.onnx"
    out.write_bytes(b"earlier result")
    result = runner.invoke(app, ["optimize", str(resnet), "-o", str(out), "--passes", "corrupt"])
    assert result.exit_code == 2 and "differs from the original" in result.stderr
    assert out.read_bytes() == b"earlier result" and [p.name for p in tmp_path.iterdir()] == ["o.onnx"]
