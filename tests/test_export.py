"""ONNX export: checker, IR/opset, metadata, dynamic batch, and outputs equal onnx's reference evaluator."""

import json

import numpy as np
import onnx
import pytest
from onnx.reference import ReferenceEvaluator

from dlc.compiler.errors import DlcError
from dlc.compiler.export_onnx import read_metadata, to_onnx
from dlc.compiler.frontend import load_model
from dlc.compiler.pipeline import compile_model, verify_on_runtime

from helpers import EXAMPLES, load, ort_session, random_input


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_examples_compile_check_and_match_reference(path, tmp_path):
    result = compile_model(path, tmp_path, skip_train=True)
    model = onnx.load(result.onnx_path)
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version == 8 and model.opset_import[0].version == 17
    graph = load_model(path).graph
    x = random_input(graph, batch=2, seed=1)
    y_ort = ort_session(graph).run(None, {graph.input_names[0]: x})[0]
    y_ref = ReferenceEvaluator(model).run(None, {graph.input_names[0]: x})[0]
    assert y_ort.shape == (2, *graph.shapes[graph.outputs[0]])
    np.testing.assert_allclose(y_ort, y_ref, rtol=1e-4, atol=1e-5 * max(1.0, float(np.abs(y_ref).max())))
    report = json.loads(result.report_path.read_text())
    assert report["verification"]["matches_inferred"] is True and report["verification"]["mismatches"] == {}
    assert report["verification"]["output_shapes"] == {o: [2, *graph.shapes[o]] for o in graph.outputs}
    assert report["summary"]["total_params"] > 0


def test_runtime_shapes_are_compared_with_inference(monkeypatch):
    """verify_on_runtime compares onnxruntime's output shapes with inference: a wrong inferred shape (patched
    in here) reads matches_inferred False with the shapes that differ."""
    graph = load("- {name: c, type: conv, out: 4, kernel: 3}\n- {name: g, type: global_avgpool}\n"
                 "- {name: f, type: flatten}\n- {name: fc, type: linear, out: 5}", shape=(3, 8, 8)).graph
    data = to_onnx(graph).SerializeToString()
    right = verify_on_runtime(data, graph, batch=3)
    assert right["matches_inferred"] is True and right["mismatches"] == {} and right["output_shapes"] == {"fc": [3, 5]}
    monkeypatch.setitem(graph.shapes, "fc", (6,))
    wrong = verify_on_runtime(data, graph, batch=3)
    assert wrong["matches_inferred"] is False
    assert wrong["mismatches"] == {"fc": {"runtime": [3, 5], "inferred": [3, 6]}}


def test_runtime_shapes_of_an_embedded_nms_are_compared_with_its_declared_ones(tmp_path):
    """The outputs the embedded NMS adds are not dlc's graph tensors: their declared shapes are the reference."""
    text = """
model:
  name: det
  input: {shape: [3, 16, 16]}
  layers:
    - {name: c1, type: conv, out: 8, kernel: 3, stride: 2, pad: 1}
    - {name: h1, type: conv, out: 14, kernel: 1}
    - {name: c2, type: conv, out: 8, kernel: 3, stride: 2, pad: 1}
    - {name: h2, type: conv, out: 14, kernel: 1}
    - {name: det, type: detect, inputs: [h1, h2], classes: 2, anchors: [[[3, 4], [6, 5]], [[9, 8], [12, 10]]]}
export: {embed_nms: true, max_detections: 7}
"""
    (tmp_path / "det.yaml").write_text(text)
    result = compile_model(tmp_path / "det.yaml", tmp_path / "out", skip_train=True)
    verification = json.loads(result.report_path.read_text())["verification"]
    assert verification["output_shapes"] == {"detections": [2, 7, 6], "num_detections": [2]}
    assert verification["matches_inferred"] is True and verification["mismatches"] == {}


def test_metadata_and_dynamic_batch(tmp_path):
    path = EXAMPLES[[p.stem for p in EXAMPLES].index("lenet5")]
    result = compile_model(path, tmp_path, skip_train=True)
    model = onnx.load(result.onnx_path)
    meta = read_metadata(model)
    import hashlib
    assert meta["model"] == "lenet5"
    assert meta["input"]["shape"] == [1, 28, 28] and meta["input"]["name"] == "image"
    assert meta["input"]["mean"] == [0.5] and meta["input"]["std"] == [0.5]
    assert meta["classes"] == [str(i) for i in range(10)]
    assert meta["yaml_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert meta["dlc_version"]
    dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert dim.dim_param == "batch"
    from dlc.runtime import Session
    s = Session(result.onnx_path, device="cpu")
    for batch in (1, 5):
        assert s.run(s.random_inputs(batch))["fc3"].shape == (batch, 10)
    assert s.metadata == meta
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == []  # atomic writes leave no temporary files behind


def _run(m, x):
    return ort_session(m.graph).run(None, {"input": x})[0]


def test_ops_against_numpy():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 4, 6)).astype(np.float32)
    m = load("- {type: upsample, scale: [2, 3]}", shape=(3, 4, 6))
    np.testing.assert_array_equal(_run(m, x), x.repeat(2, axis=2).repeat(3, axis=3))
    m = load("- {type: silu}", shape=(3, 4, 6))
    np.testing.assert_allclose(_run(m, x), x / (1 + np.exp(-x)), rtol=1e-5, atol=1e-6)
    m = load("- {type: leaky_relu, slope: 0.2}", shape=(3, 4, 6))
    np.testing.assert_allclose(_run(m, x), np.where(x > 0, x, 0.2 * x), rtol=1e-6)
    m = load("- {type: dropout, ratio: 0.9}", shape=(3, 4, 6))
    np.testing.assert_array_equal(_run(m, x), x)
    m = load("- {type: avgpool, kernel: 3, stride: 2, pad: 1}", shape=(3, 4, 6))
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    ones = np.pad(np.ones_like(x), ((0, 0), (0, 0), (1, 1), (1, 1)))
    want = np.zeros((2, 3, 2, 3), np.float32)
    for i in range(2):
        for j in range(3):
            win = (slice(None), slice(None), slice(2 * i, 2 * i + 3), slice(2 * j, 2 * j + 3))
            want[:, :, i, j] = padded[win].sum(axis=(2, 3)) / ones[win].sum(axis=(2, 3))
    np.testing.assert_allclose(_run(m, x), want, rtol=1e-5)  # padding is left out of the average


def test_batchnorm_linear_flatten_against_numpy():
    m = load("""
        - {name: bn, type: batchnorm, eps: 0.001}
        - {name: f, type: flatten}
        - {name: fc, type: linear, out: 5}
    """, shape=(3, 2, 2))
    rng = np.random.default_rng(1)
    bn = m.graph.node("bn")
    bn.params = {k: rng.uniform(0.5, 2, 3).astype(np.float32) for k in ("scale", "bias", "mean", "var")}
    x = rng.standard_normal((4, 3, 2, 2)).astype(np.float32)
    p = bn.params
    r = lambda v: v[None, :, None, None]  # noqa: E731
    z = (x - r(p["mean"])) / np.sqrt(r(p["var"]) + 1e-3) * r(p["scale"]) + r(p["bias"])
    fc = m.graph.node("fc").params
    want = z.reshape(4, -1) @ fc["weight"].T + fc["bias"]
    np.testing.assert_allclose(_run(m, x), want, rtol=1e-4, atol=1e-5)


def test_conv_same_padding_against_numpy():
    m = load("- {name: c, type: conv, out: 2, kernel: [2, 3], stride: 2, pad: same}", shape=(1, 5, 6))
    x = np.random.default_rng(2).standard_normal((1, 1, 5, 6)).astype(np.float32)
    w, b = m.graph.node("c").params["weight"], m.graph.node("c").params["bias"]
    t, left, bottom, right = m.graph.node("c").attrs["pads"]
    assert (t, left, bottom, right) == (0, 0, 1, 1)  # SAME_UPPER: the odd pixel of padding goes at the end
    xp = np.pad(x, ((0, 0), (0, 0), (t, bottom), (left, right)))
    want = np.zeros((1, 2, 3, 3), np.float32)
    for o in range(2):
        for i in range(3):
            for j in range(3):
                want[0, o, i, j] = (xp[0, :, 2 * i:2 * i + 2, 2 * j:2 * j + 3] * w[o]).sum() + b[o]
    np.testing.assert_allclose(_run(m, x), want, rtol=1e-5, atol=1e-6)


def test_opset_range_and_older_opsets(tmp_path):
    m = load("- {type: conv, out: 2, kernel: 3}\n- {type: upsample}\n- {type: silu}")
    for opset in (11, 13, 15, 21):
        model = to_onnx(m.graph, opset=opset)
        onnx.checker.check_model(model, full_check=True)
    with pytest.raises(DlcError, match="opset 10 is not supported"):
        to_onnx(m.graph, opset=10)


def test_export_filename_cannot_escape(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text("model:\n  input: {shape: [1, 4, 4]}\n  layers: [{type: relu}]\nexport: {filename: ../x.onnx}\n")
    with pytest.raises(DlcError, match="plain file name"):
        compile_model(path, tmp_path / "out")
