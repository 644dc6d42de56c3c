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
