"""`dlc import` of detectors dlc exported: the decode subgraph becomes one detect layer again, with the anchors,
strides, post-processing and loss settings of the ONNX metadata; the imported model gives the original's decoded
rows and detections and fine-tunes on new classes. A decode without dlc's metadata is an error that says where to
cut. Strides left out of a detect layer are bound when the graph is built, so the backend and `dlc time` run it."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from typer.testing import CliRunner

from dlc.compiler.cli import app
from dlc.compiler.errors import DlcError
from dlc.compiler.export_onnx import read_metadata, to_onnx
from dlc.compiler.frontend import load_model, load_model_text
from dlc.compiler.onnx_import import import_onnx
from dlc.compiler.pipeline import artifact_metadata, compile_model
from dlc.compiler.train.checkpoint import read_checkpoint, save_checkpoint
from dlc.compiler.train.executor import Executor
from dlc.compiler.train.trainer import Trainer
from dlc.compiler.yaml_writer import graph_to_yaml
from dlc.runtime import postprocess

from helpers import TORCH_FIXTURES, errors_of, model_yaml, random_input, torch_fixture, torch_nets

runner = CliRunner()

DETECTOR = """
model:
  name: micro_detector
  input: {name: image, shape: [3, 32, 32], mean: 0.3, std: 0.3}
  layers:
    - {name: conv1, type: conv, out: 8, kernel: 3, stride: 2, pad: 1, bias: false}
    - {name: bn1, type: batchnorm}
    - {name: relu1, type: relu}
    - {name: conv2, type: conv, out: 16, kernel: 3, stride: 2, pad: 1, bias: false}
    - {name: bn2, type: batchnorm}
    - {name: relu2, type: relu}
    - {name: head4, type: conv, out: 14, kernel: 1}
    - {name: conv3, type: conv, out: 16, kernel: 3, stride: 2, pad: 1, inputs: relu2}
    - {name: relu3, type: relu}
    - {name: head8, type: conv, out: 14, kernel: 1}
    - name: detect
      type: detect
      inputs: [head4, head8]
      classes: 2
      anchors: auto
      anchors_per_scale: 2
      box_loss: giou
      obj_loss: focal
      focal_gamma: 2.0
      cls_gain: 0.7
      anchor_t: 3.0
      obj_target: one
      conf_threshold: 0.05
      iou_threshold: 0.6
      max_detections: 20
      class_agnostic: true
data: {dataset: synthetic_detection, samples: 64, num_classes: 2, val_fraction: 0.25}
train: {solver: adam, base_lr: 0.01, batch_size: 16, epochs: 1, seed: 0}
"""


def run_ort(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """A detector trained for one epoch (anchors: auto found by k-means, strides left out), compiled to ONNX and
    imported with `dlc import`."""
    folder = tmp_path_factory.mktemp("detimport")
    (folder / "det.yaml").write_text(DETECTOR)
    result = compile_model(folder / "det.yaml", folder / "out")
    result_json = runner.invoke(app, ["import", str(result.onnx_path), "-o", str(folder / "imp"), "--json"])
    assert result_json.exit_code == 0, result_json.output
    return folder, onnx.load(result.onnx_path), json.loads(result_json.stdout)


def test_import_keeps_the_trained_detector(imported):
    folder, original, summary = imported
    meta = read_metadata(original)
    assert summary["layer_types"] == {"conv": 5, "batchnorm": 2, "relu": 3, "detect": 1}
    assert summary["output_shapes"] == {"detect": [2 * 8 * 8 + 2 * 4 * 4, 7]}
    assert summary["verification"]["max_abs_diff"] < 1e-4
    text = (folder / "imp/model.yaml").read_text()
    assert "strides: [4, 8], box_loss: giou, obj_loss: focal, focal_gamma: 2.0, cls_gain: 0.7, anchor_t: 3.0" in text
    assert "obj_target: one, conf_threshold: 0.05, iou_threshold: 0.6, max_detections: 20, class_agnostic: true, " \
           "inputs: [head4, head8]}" in text

    reloaded = load_model(folder / "imp/model.yaml")
    assert reloaded.graph.meta["weights"]["initialised"] == []
    node = reloaded.graph.node("detect")
    anchors = meta["detection"]["anchors"]  # what k-means found at training start
    assert len(anchors) == 2 and all(len(a) == 2 for a in anchors)
    np.testing.assert_allclose(np.array(node.attrs["anchors"]), np.array(anchors), rtol=1e-12)
    assert node.inputs == ["head4", "head8"] and node.attrs["strides"] == [(4, 4), (8, 8)]
    # Exported again, the model describes itself as the original did: the same anchors, strides, grids,
    # post-processing and loss settings (box_loss: giou ... obj_target: one; the rest at their defaults).
    again = artifact_metadata(reloaded)
    assert again["postprocess"] == meta["postprocess"] == {"conf_threshold": 0.05, "iou_threshold": 0.6,
                                                           "max_detections": 20, "class_agnostic": True}
    assert again["detection"] == meta["detection"]
    assert meta["detection"]["loss"] == {
        "box_loss": "giou", "obj_loss": "focal", "focal_gamma": 2.0, "focal_alpha": 0.25, "class_weights": None,
        "box_gain": 0.05, "obj_gain": 1.0, "cls_gain": 0.7, "anchor_t": 3.0, "neighbor_cells": True,
        "obj_target": "one"}

    # The same decoded rows and the same detections, on the backend and through onnxruntime.
    x = random_input(reloaded.graph, batch=3, seed=5)
    want = run_ort(original, x)
    np.testing.assert_allclose(Executor(reloaded.graph).forward(x)["detect"], want, rtol=1e-4, atol=1e-4)
    got = run_ort(to_onnx(reloaded.graph), x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    theirs, ours = postprocess(want, **meta["postprocess"]), postprocess(got, **meta["postprocess"])
    assert sum(len(s) for _, s, _ in theirs) > 0
    for (b1, s1, l1), (b2, s2, l2) in zip(theirs, ours):
        np.testing.assert_array_equal(l1, l2)
        np.testing.assert_allclose(b1, b2, atol=1e-4)
        np.testing.assert_allclose(s1, s2, atol=1e-5)


def test_imported_detector_fine_tunes_on_new_classes(imported, tmp_path):
    """Transfer learning: three classes instead of two, so the head convs start afresh and the backbone keeps
    the imported weights; one epoch of training runs."""
    folder, _, _ = imported
    params, _, _, _ = read_checkpoint(folder / "imp/weights.safetensors")
    text = (folder / "imp/model.yaml").read_text()
    for head in ("head4", "head8"):
        text = text.replace(f"{{name: {head}, type: conv, out: 14, kernel: 1", f"{{name: {head}, type: conv, "
                            "out: 16, kernel: 1")
    assert text.count("out: 16, kernel: 1") == 2 and "classes: 2, " in text
    text = text.replace("classes: 2, ", "classes: 3, ")
    assert "  classes: [disc, square]\n" in text  # model.classes names the outputs: a third class needs a name
    text = text.replace("  classes: [disc, square]\n", "  classes: [disc, square, triangle]\n")
    text += ("data: {dataset: synthetic_detection, samples: 32, num_classes: 3, val_fraction: 0.25}\n"
             "train: {solver: adam, base_lr: 0.005, batch_size: 12, epochs: 1, seed: 1}\n")
    path = folder / "imp/three.yaml"
    path.write_text(text)
    loaded = load_model(path)
    weights = loaded.graph.meta["weights"]
    assert weights["initialised"] == ["head4", "head8"] and weights["loaded"] == weights["tensors"] - 4
    np.testing.assert_array_equal(loaded.graph.node("conv2").params["weight"], params["conv2.weight"])
    before = loaded.graph.node("conv2").params["weight"].copy()
    result = Trainer(loaded, tmp_path / "run", progress=False).run()
    assert result.stopped == "completed" and np.isfinite(result.history[-1]["train_loss"])
    assert not np.array_equal(loaded.graph.node("conv2").params["weight"], before)  # the backbone fine-tuned
    assert loaded.graph.shapes["detect"] == (2 * 8 * 8 + 2 * 4 * 4, 8)


def test_a_foreign_decode_says_where_to_cut(tmp_path):
    """Without dlc's metadata (as from another tool), the decode's Slice and Pow are unsupported, and the message
    names the head maps to cut at; cutting there as it says imports the backbone and heads."""
    loaded = load_model_text(DETECTOR.replace("anchors: auto", "anchors: [[[4, 5], [8, 8]], [[12, 10], [20, 18]]]"),
                             "det.yaml")
    path = tmp_path / "foreign.onnx"
    onnx.save(to_onnx(loaded.graph), path)
    with pytest.raises(DlcError) as info:
        import_onnx(onnx.load(path), source="foreign.onnx")
    message = str(info.value)
    assert message.startswith("foreign.onnx: unsupported ONNX ops: Slice ×6 (detect/s0/slice_xy")
    assert "cut it off at the head maps ('head4', 'head8')" in message
    assert "extract_model('foreign.onnx', 'heads.onnx', ['image'], ['head4', 'head8'])" in message
    onnx.utils.extract_model(str(path), str(tmp_path / "heads.onnx"), ["image"], ["head4", "head8"])
    graph = import_onnx(onnx.load(tmp_path / "heads.onnx"))
    assert graph.outputs == ["head4", "head8"] and "detect" not in [n.op for n in graph.nodes()]


def test_metadata_that_does_not_fit_the_decode_is_reported():
    loaded = load_model_text(DETECTOR.replace("anchors: auto", "anchors: [[[4, 5], [8, 8]], [[12, 10], [20, 18]]]"),
                             "det.yaml")
    meta = artifact_metadata(loaded)
    model = to_onnx(loaded.graph, metadata=meta)
    assert [n.op for n in import_onnx(model).nodes()][-1] == "detect"
    del meta["detection"]["strides"]  # without them, the head maps give them
    assert import_onnx(to_onnx(loaded.graph, metadata=meta)).node("detect").attrs["strides"] == [(4, 4), (8, 8)]
    for change, message in [
        (lambda m: m["detection"].update(decode="yolov8 dfl"), "this dlc imports the yolov5 decode"),
        (lambda m: m["detection"].update(anchors=m["detection"]["anchors"][:1]),
         r"not one head map for each of its 1 scale\(s\)"),
        (lambda m: m["detection"].update(num_classes=3), "the detection metadata does not fit the head maps: "
                                                         "input 0 has 14 channels"),
        (lambda m: m["detection"].update(grids=[[8, 8], [2, 2]]), r"the detection metadata says \[\[8, 8\], "
                                                                  r"\[2, 2\]\]"),
    ]:
        bad = json.loads(json.dumps(meta))
        change(bad)
        with pytest.raises(DlcError, match=message):
            import_onnx(to_onnx(loaded.graph, metadata=bad))


NO_STRIDES = """
- {name: c1, type: conv, out: 8, kernel: 3, stride: 2, pad: 1}
- {name: h1, type: conv, out: 16, kernel: 1}
- {name: c2, type: conv, out: 8, kernel: 3, stride: 2, pad: 1}
- {name: h2, type: conv, out: 8, kernel: 1}
- {name: det, type: detect, inputs: [h1, h2], classes: 3, anchors: [[[3, 4], [6, 5]], [[9, 8]]]STRIDES}
"""


def test_strides_left_out_are_bound_at_build(tmp_path):
    """No `strides:`: the graph build binds them from the input size, so the backend runs the layer (as it does
    with the strides written out) and `dlc time` times it."""
    path = tmp_path / "det.yaml"
    path.write_text(model_yaml(NO_STRIDES.replace("STRIDES", ""), shape=(3, 16, 12)))
    graph = load_model(path).graph
    assert graph.node("det").attrs["strides"] == [(2, 2), (4, 4)]
    given = load_model_text(model_yaml(NO_STRIDES.replace("STRIDES", ", strides: [2, 4]"), shape=(3, 16, 12)),
                            "m.yaml").graph
    x = random_input(graph, batch=2, seed=3)
    rows = Executor(graph).forward(x)["det"]
    np.testing.assert_array_equal(rows, Executor(given).forward(x)["det"])
    with pytest.raises(DlcError, match=r"m.yaml:\d+: detect layer 'det': strides \[\[4, 4\], \[8, 8\]\] do not "
                                       r"match the head maps \(8×6, 4×3 on a 16×12 input\)"):
        load_model_text(model_yaml(NO_STRIDES.replace("STRIDES", ", strides: [4, 8]"), shape=(3, 16, 12)), "m.yaml")
    result = runner.invoke(app, ["time", str(path), "--batch", "2", "--iterations", "1", "--json"])
    assert result.exit_code == 0, result.output
    timings = json.loads(result.stdout)
    assert [row["name"] for row in timings["layers"]][-1] == "det"


def test_strides_that_are_not_whole_are_reported_at_load():
    text = model_yaml("""
- {name: h1, type: conv, out: 16, kernel: 3, stride: 4, pad: 1}
- {name: det, type: detect, classes: 3, anchors: [[[3, 4], [6, 5]]]}
""", shape=(3, 10, 10))
    [error] = errors_of(text)
    assert error.startswith("m.yaml:6: detect layer 'det': input 0 is 3×3 for a 10×10 image, not a whole stride; "
                            "give strides: [...] on the layer")
    # a stride-4 conv gives ceil(10 / 4) = 3 cells: given strides need only fit the map, not divide the input
    given = load_model_text(text.replace("[6, 5]]]}", "[6, 5]]], strides: [4]}"), "m.yaml").graph
    assert given.node("det").attrs["strides"] == [(4, 4)]
    assert any("strides [[3, 3]] do not match the head maps (3×3 on a 10×10 input)" in e
               for e in errors_of(text.replace("[6, 5]]]}", "[6, 5]]], strides: [3]}")))


ANCHORS, STRIDES = [[[4.0, 5.0], [8.0, 8.0]], [[12.0, 10.0], [20.0, 18.0]]], [4, 8]


def _check_yolov5_cut(path, tmp_path, x, want):
    """A YOLOv5-style Detect head exported by PyTorch (tests/fixtures/make_torch_fixtures.py): the error names its
    head convs; cut there, imported, and given a detect layer with its anchors and strides, dlc gives the same
    boxes (as x1, y1, x2, y2), objectness and class probabilities as torch."""
    with pytest.raises(DlcError) as info:
        import_onnx(onnx.load(path), source="yolo.onnx")
    heads = ["/m.0/Conv_output_0", "/m.1/Conv_output_0"]
    assert "Split ×2" in str(info.value) and "Pow ×2" in str(info.value)
    assert f"extract_model('yolo.onnx', 'heads.onnx', ['images'], ['{heads[0]}', '{heads[1]}'])" in str(info.value)

    onnx.utils.extract_model(str(path), str(tmp_path / "heads.onnx"), ["images"], heads)
    graph = import_onnx(onnx.load(tmp_path / "heads.onnx"), name="yolo")
    assert graph.outputs == ["m_0", "m_1"]
    save_checkpoint(tmp_path / "weights.safetensors", graph)
    text = graph_to_yaml(graph, "weights.safetensors").replace("  outputs: [m_0, m_1]\n", "")
    text += (f"    - {{name: detect, type: detect, inputs: [m_0, m_1], classes: 2, anchors: {ANCHORS}, "
             f"strides: {STRIDES}}}\n")
    (tmp_path / "model.yaml").write_text(text)
    loaded = load_model(tmp_path / "model.yaml")
    assert loaded.graph.meta["weights"]["initialised"] == []
    assert want.shape == (x.shape[0], 2 * (x.shape[2] // 4) * (x.shape[3] // 4) + 2 * (x.shape[2] // 8) ** 2, 7)
    xyxy = np.concatenate([want[..., :2] - want[..., 2:4] / 2, want[..., :2] + want[..., 2:4] / 2, want[..., 4:]], -1)
    np.testing.assert_allclose(Executor(loaded.graph).forward(x)["detect"], xyxy, rtol=1e-4, atol=1e-4)


def test_a_yolov5_export_cut_as_the_message_says_imports_with_a_detect_layer(tmp_path):
    """The committed export, against torch's decoded rows stored beside it (no torch needed)."""
    _, ref = torch_fixture("yolo")
    _check_yolov5_cut(TORCH_FIXTURES / "yolo.onnx", tmp_path, ref["x"], ref["want"])


def test_a_yolov5_export_by_the_installed_torch(tmp_path):
    """The same net exported now by the installed torch (skipped without it)."""
    nets = torch_nets()
    assert (nets.YOLO_ANCHORS, nets.YOLO_STRIDES) == (ANCHORS, STRIDES)
    model, x = nets.build("yolo")
    (tmp_path / "yolo.onnx").write_bytes(nets.export("yolo", model))
    _check_yolov5_cut(tmp_path / "yolo.onnx", tmp_path, x, nets.reference(model, x))


def test_the_yaml_written_for_a_detector_reads_back():
    graph = load_model_text(DETECTOR, "det.yaml").graph
    text = graph_to_yaml(graph, None)
    assert ("- {name: detect, type: detect, classes: 2, anchors: auto, anchors_per_scale: 2, strides: [4, 8], "
            "box_loss: giou") in text
    assert load_model_text(text, "again.yaml").graph.node("detect").attrs == graph.node("detect").attrs
