"""The detect layer: native decode against its numpy reference, the documented row layout, the layer's checks,
its ONNX export against the backend, decode's gradient, post-processing and the detector's ONNX metadata."""

import sys

import numpy as np
import onnx
import pytest

from dlc._C import detect as native
from dlc.compiler.errors import DlcError
from dlc.compiler.export_onnx import read_metadata
from dlc.compiler.frontend import load_model_text
from dlc.compiler.ops import REGISTRY
from dlc.compiler.ops.base import RunContext
from dlc.compiler.ops.detect import bind_strides
from dlc.compiler.pipeline import compile_model
from dlc.compiler.train.executor import Executor
from dlc.runtime import decode, postprocess

from helpers import ROOT, errors_of, load, model_yaml, numeric_grad, ort_session, random_input

sys.path.insert(0, str(ROOT / "csrc"))
from detect_ref import decode_ref  # noqa: E402

ANCHORS = [[[3, 4], [6, 5]], [[10, 12]]]
TWO_HEADS = """
- {name: c1, type: conv, out: 8, kernel: 3, stride: 2, pad: 1}
- {name: r1, type: relu}
- {name: h1, type: conv, out: 16, kernel: 1}
- {name: c2, type: conv, out: 8, kernel: 3, stride: 2, pad: 1, inputs: r1}
- {name: h2, type: conv, out: 8, kernel: 1}
- {name: det, type: detect, classes: 3, anchors: [[[3, 4], [6, 5]], [[10, 12]]], inputs: [h1, h2]STRIDES}
"""


def _maps(rng, batch=3):
    return [rng.normal(0, 2, (batch, 2 * 8, 5, 6)).astype(np.float32),
            rng.normal(0, 2, (batch, 1 * 8, 3, 2)).astype(np.float32)]


def test_native_decode_matches_reference_and_layout():
    rng = np.random.default_rng(0)
    maps = _maps(rng)
    strides = [(4, 3.5), (8, 10.0)]  # non-square strides keep x and y apart
    ours = native.decode(maps, ANCHORS, strides, 3)
    ref = decode_ref(maps, ANCHORS, strides, 3)
    assert ours.shape == (3, 2 * 5 * 6 + 3 * 2, 8) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-5)
    # the row of scale 0, anchor 1, cell (y=2, x=4): k = (a*H + y)*W + x, formulas written out by hand
    b, a, y, x = 1, 1, 2, 4
    row = ours[b, (a * 5 + y) * 6 + x]
    s = 1 / (1 + np.exp(-maps[0][b, a * 8:(a + 1) * 8, y, x].astype(np.float64)))
    cx, cy = (2 * s[0] - 0.5 + x) * 3.5, (2 * s[1] - 0.5 + y) * 4
    w, h = (2 * s[2]) ** 2 * 6, (2 * s[3]) ** 2 * 5
    np.testing.assert_allclose(row, [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2, *s[4:]], rtol=1e-5)
    # scale 1 starts after scale 0's A*H*W rows
    s1 = 1 / (1 + np.exp(-maps[1][2, :, 1, 0].astype(np.float64)))
    np.testing.assert_allclose(ours[2, 60 + 1 * 2 + 0, 4:], s1[4:], rtol=1e-6)
    # the runtime wrapper is the same kernel, and takes plain integer strides
    np.testing.assert_array_equal(decode(maps, ANCHORS, [(4, 4), (8, 8)], 3), native.decode(maps, ANCHORS,
                                                                                              [(4, 4), (8, 8)], 3))
    np.testing.assert_array_equal(decode(maps, ANCHORS, [4, 8], 3), decode(maps, ANCHORS, [(4, 4), (8, 8)], 3))


def test_decode_rejects_a_map_of_the_wrong_size():
    with pytest.raises(ValueError, match="map 1 must be"):
        native.decode([np.zeros((1, 16, 2, 2), np.float32), np.zeros((1, 9, 2, 2), np.float32)], ANCHORS,
                      [(1, 1), (2, 2)], 3)


@pytest.mark.parametrize("strides", ["", ", strides: [2, 4]"])
def test_layer_matches_onnxruntime_with_dynamic_batch(strides):
    graph = load(TWO_HEADS.replace("STRIDES", strides), shape=(3, 16, 12)).graph
    assert graph.shapes["det"] == (2 * 8 * 6 + 1 * 4 * 3, 8)
    bind_strides(graph)  # without strides: given, bound from the 16×12 input (export does it by itself)
    assert graph.node("det").attrs["strides"] == [(2, 2), (4, 4)]
    session = ort_session(graph)
    for batch in (1, 3):
        x = random_input(graph, batch=batch, seed=batch)
        ours = Executor(graph).forward(x)["det"]
        theirs = session.run(None, {graph.input_names[0]: x})[0]
        np.testing.assert_allclose(theirs, ours, rtol=1e-5, atol=1e-5)


def test_decode_gradient_matches_finite_differences():
    graph = load(TWO_HEADS.replace("STRIDES", ", strides: [2, 4]"), shape=(3, 8, 8)).graph
    node, op = graph.node("det"), REGISTRY["detect"]
    rng = np.random.default_rng(1)
    maps = [rng.normal(0, 1, (2, 16, 4, 4)).astype(np.float32), rng.normal(0, 1, (2, 8, 2, 2)).astype(np.float32)]
    y, saved = op.forward(node, maps, RunContext(train=True))
    proj = rng.normal(0, 1, y.shape)
    grads, _ = op.backward(node, saved, proj.astype(np.float32), RunContext())
    for i in range(2):
        def f(q, i=i):
            mm = [m.astype(np.float64) for m in maps]
            mm[i] = q
            return float((decode_ref(mm, ANCHORS, [(2, 2), (4, 4)], 3) * proj).sum())

        want = numeric_grad(f, maps[i].astype(np.float64))
        np.testing.assert_allclose(grads[i], want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def _det_layer(extra: str, out1: int = 16) -> str:
    return model_yaml(f"""
- {{name: h1, type: conv, out: {out1}, kernel: 1, stride: 2}}
- {{name: det, type: detect, classes: 3, {extra}}}
""", shape=(3, 8, 8))


def test_layer_checks_say_what_to_set():
    errors = errors_of(_det_layer("anchors: [[[3, 4], [6, 5]]]", out1=15))
    assert any("needs 2×(5+3) = 16: set out: 16 on the 1×1 head conv" in e for e in errors), errors
    assert any("anchors_per_scale" in e for e in errors_of(_det_layer("anchors: auto")))
    assert any("one list of [w, h] pairs per scale" in e for e in errors_of(_det_layer("anchors: [3, 4]")))
    assert any("class_weights has 2 values for 3 classes" in e
               for e in errors_of(_det_layer("anchors: [[[3, 4], [6, 5]]], class_weights: [1, 2]")))
    assert any("anchors are given for 2 scale(s)" in e
               for e in errors_of(_det_layer("anchors: [[[3, 4], [6, 5]], [[1, 2], [3, 3]]]")))
    with pytest.raises(DlcError, match=r"m.yaml:\d+: .*strides \[\[4, 4\]\] do not match the head maps "
                                       r"\(4×4 on a 8×8 input\)"):
        load_model_text(_det_layer("anchors: [[[3, 4], [6, 5]]], strides: [4]"), "m.yaml")
    auto = load_model_text(_det_layer("anchors: auto, anchors_per_scale: 2, strides: [2]"), "m.yaml").graph
    with pytest.raises(DlcError, match="anchors: auto are computed from the training boxes"):
        Executor(auto).forward(random_input(auto))


def _rows(boxes, obj, cls):
    return np.concatenate([np.asarray(boxes, np.float32), np.asarray(obj, np.float32)[:, None],
                           np.asarray(cls, np.float32)], axis=1)[None]


def test_postprocess_scores_thresholds_and_nms():
    boxes = [[0, 0, 10, 10], [1, 1, 11, 11], [0, 0, 10, 10], [50, 50, 60, 60], [20, 20, 30, 30]]
    obj = [0.9, 0.8, 0.7, 0.5, 0.9]
    cls = [[0.9, 0.1], [0.8, 0.2], [0.1, 0.9], [0.6, 0.4], [0.2, 0.2]]
    (b, s, lab), = postprocess(_rows(boxes, obj, cls), conf_threshold=0.25, iou_threshold=0.45)
    # box 1 overlaps box 0 (same class, IoU 0.68): suppressed; box 2 is another class: kept; box 4 scores 0.18
    np.testing.assert_allclose(s, [0.81, 0.63, 0.3], rtol=1e-6)
    np.testing.assert_array_equal(lab, [0, 1, 0])
    np.testing.assert_array_equal(b, np.asarray(boxes, np.float32)[[0, 2, 3]])
    assert s.dtype == np.float32 and lab.dtype == np.int64
    (b, s, lab), = postprocess(_rows(boxes, obj, cls), 0.25, 0.45, class_agnostic=True)
    np.testing.assert_array_equal(lab, [0, 0])  # the class-1 duplicate of box 0 goes too
    (b, s, lab), = postprocess(_rows(boxes, obj, cls), 0.25, 0.45, max_detections=1)
    assert len(s) == 1 and s[0] == pytest.approx(0.81)
    (b, s, lab), = postprocess(_rows(boxes, obj, cls), conf_threshold=0.9)
    assert b.shape == (0, 4) and s.shape == (0,) and lab.shape == (0,)


def test_detector_onnx_metadata_carries_what_predict_needs(tmp_path):
    text = model_yaml("""
- {name: h1, type: conv, out: 16, kernel: 3, stride: 4, pad: 1}
- {name: det, type: detect, classes: 3, anchors: [[[3, 4], [6, 5]]], conf_threshold: 0.3, max_detections: 7}
""", shape=(3, 16, 16), extra="  classes: [disc, square, triangle]\n")
    path = tmp_path / "det.yaml"
    path.write_text(text)
    result = compile_model(path, tmp_path / "out")
    meta = read_metadata(onnx.load(result.onnx_path))
    assert meta["task"] == "detection" and meta["classes"] == ["disc", "square", "triangle"]
    det = meta["detection"]
    assert det["anchors"] == [[[3.0, 4.0], [6.0, 5.0]]] and det["strides"] == [[4, 4]] and det["grids"] == [[4, 4]]
    assert det["num_classes"] == 3 and "anchor-major" in det["layout"]
    assert meta["postprocess"] == {"conf_threshold": 0.3, "iou_threshold": 0.45, "max_detections": 7,
                                   "class_agnostic": False}
    assert meta["outputs"] == {"det": [32, 8]}
