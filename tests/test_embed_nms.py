"""NMS inside the model: its detections equal dlc's own post-processing (postprocess -> filter_detections) on the
same raw outputs — the same boxes, scores and classes in the same order — at several batch sizes from one file,
at old and new opsets, per class and class agnostic, with a pre-NMS top-k, and on images with no detection."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from typer.testing import CliRunner

from dlc.compiler.cli import app
from dlc.compiler.embed_nms import NmsSettings, embed_nms
from dlc.compiler.errors import DlcError
from dlc.compiler.export_onnx import to_onnx
from dlc.compiler.frontend import load_model
from dlc.runtime.boxes import filter_detections
from dlc.runtime.detect import postprocess

from helpers import ROOT, randomize_weights


def run_cli(*args):
    return CliRunner().invoke(app, list(args))


@pytest.fixture(scope="module")
def detector():
    graph = load_model(ROOT / "examples/tiny_detector.yaml").graph
    randomize_weights(graph, seed=0, gain=1.5, bias_mean=0.0)
    return graph


def _session(model):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _images(graph, n, seed):
    return np.random.default_rng(seed).standard_normal((n, *graph.inputs[0].shape)).astype(np.float32)


def _reference(raw, s: NmsSettings):
    """dlc's post-processing, image by image (postprocess, with filter_detections' pre-NMS top-k)."""
    if s.pre_nms_top_k is None:
        return postprocess(raw, conf_threshold=s.conf_threshold, iou_threshold=s.iou_threshold,
                           max_detections=s.max_detections, class_agnostic=s.class_agnostic)
    out = []
    for r in raw:
        labels = r[:, 5:].argmax(1)
        scores = r[:, 4] * r[np.arange(len(r)), 5 + labels]
        kept = filter_detections(r[:, :4], scores, labels, iou_threshold=s.iou_threshold,
                                 score_threshold=s.conf_threshold, pre_nms_top_k=s.pre_nms_top_k,
                                 max_detections=s.max_detections, class_agnostic=s.class_agnostic)
        out.append((r[kept, :4], scores[kept], labels[kept]))
    return out


def _threshold(raw, quantile):
    scores = raw[:, :, 4] * raw[:, :, 5:].max(2)
    return float(np.quantile(scores, quantile))


def _check_equal(got_rows, got_num, ref, max_det):
    assert got_rows.shape == (len(ref), max_det, 6)
    for i, (boxes, scores, labels) in enumerate(ref):
        k = int(got_num[i])
        assert k == len(scores)
        np.testing.assert_array_equal(got_rows[i, :k, :4], boxes)
        np.testing.assert_array_equal(got_rows[i, :k, 4], scores)
        np.testing.assert_array_equal(got_rows[i, :k, 5].astype(np.int64), labels)
        assert not got_rows[i, k:].any()  # zero padding


def _rows_model(num_rows, num_classes, opset):
    """A stand-in detector whose raw output is its input: rows (N, K, 5 + C) chosen by the test."""
    from onnx import TensorProto, helper

    shape = ["batch", num_rows, 5 + num_classes]
    graph = helper.make_graph([helper.make_node("Identity", ["rows"], ["detect"])], "rows",
                              [helper.make_tensor_value_info("rows", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("detect", TensorProto.FLOAT, shape)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=7)


def _crafted_rows(n, num_rows=300, num_classes=3, seed=0):
    """Boxes in clusters (so NMS suppresses), objectness scaled per image from 0 (no detection) up, class
    probabilities of varied confidence."""
    rng = np.random.default_rng(seed)
    rows = np.zeros((n, num_rows, 5 + num_classes), np.float32)
    for i in range(n):
        centres = rng.uniform(20, 300, (6, 2))
        c = centres[rng.integers(0, 6, num_rows)] + rng.normal(0, 8, (num_rows, 2))
        wh = rng.uniform(10, 60, (num_rows, 2))
        rows[i, :, :2], rows[i, :, 2:4] = c - wh / 2, c + wh / 2
        rows[i, :, 4] = rng.uniform(0, 1, num_rows) ** 2 * (i / max(n - 1, 1))  # image 0: nothing passes
        logits = rng.normal(0, 2, (num_rows, num_classes))
        rows[i, :, 5:] = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return rows


@pytest.mark.parametrize("opset", [11, 13, 17, 21])
@pytest.mark.parametrize("class_agnostic", [False, True])
def test_equals_filter_detections_at_batch_1_2_5_and_17_from_one_file(opset, class_agnostic):
    settings = NmsSettings(max_detections=25, iou_threshold=0.45, conf_threshold=0.1,
                           class_agnostic=class_agnostic)
    embedded = embed_nms(_rows_model(300, 3, opset), settings)
    onnx.checker.check_model(embedded, full_check=True)
    session = _session(embedded)
    counts, suppressed = set(), 0
    for n in (1, 2, 5, 17):
        raw = _crafted_rows(n, seed=n)
        rows, num = session.run(None, {"rows": raw})
        ref = _reference(raw, settings)
        _check_equal(rows, num, ref, settings.max_detections)
        counts |= {len(r[1]) for r in ref}
        above = (raw[:, :, 4] * raw[:, :, 5:].max(2) > settings.conf_threshold).sum(1)
        suppressed += int((above - num).sum())
    assert 0 in counts and settings.max_detections in counts and len(counts) >= 3  # empty, capped and between
    assert suppressed > 100  # NMS really removed boxes


@pytest.mark.parametrize("opset", [11, 17])
def test_equals_dlc_postprocess_on_the_example_detector(detector, opset):
    model = to_onnx(detector, opset=opset)
    raw_session = _session(model)
    probe = raw_session.run(None, {detector.input_names[0]: _images(detector, 5, 99)})[0]
    settings = NmsSettings(max_detections=6, iou_threshold=0.5, conf_threshold=_threshold(probe, 0.95))
    session = _session(embed_nms(model, settings))
    for n in (1, 2, 5):
        x = _images(detector, n, n)
        raw = raw_session.run(None, {detector.input_names[0]: x})[0]
        rows, num = session.run(None, {detector.input_names[0]: x})
        _check_equal(rows, num, _reference(raw, settings), settings.max_detections)


def test_images_with_no_detection_give_zero_rows(detector):
    model = to_onnx(detector, opset=17)
    x = _images(detector, 5, 3)
    raw = _session(model).run(None, {detector.input_names[0]: x})[0]
    scores = raw[:, :, 4] * raw[:, :, 5:].max(2)
    per_image_best = scores.max(1)
    # strictly above the median image's best score: about half the images keep nothing
    settings = NmsSettings(max_detections=10, conf_threshold=float(np.median(per_image_best)))
    rows, num = _session(embed_nms(model, settings)).run(None, {detector.input_names[0]: x})
    ref = _reference(raw, settings)
    _check_equal(rows, num, ref, 10)
    assert 0 in num and num.max() > 0
    # and a threshold no score passes: every image is empty
    rows, num = _session(embed_nms(model, NmsSettings(conf_threshold=1.0))).run(None, {detector.input_names[0]: x})
    assert num.tolist() == [0] * 5 and not rows.any()


@pytest.mark.parametrize("opset", [11, 17])
def test_pre_nms_top_k_equals_filter_detections(opset):
    raw = _crafted_rows(5, seed=7)
    settings = NmsSettings(max_detections=50, conf_threshold=0.05, iou_threshold=0.3, pre_nms_top_k=40)
    rows, num = _session(embed_nms(_rows_model(300, 3, opset), settings)).run(None, {"rows": raw})
    ref = _reference(raw, settings)
    _check_equal(rows, num, ref, 50)
    unlimited = _reference(raw, NmsSettings(max_detections=50, conf_threshold=settings.conf_threshold,
                                            iou_threshold=0.3))
    assert [len(r[1]) for r in ref] != [len(r[1]) for r in unlimited]  # the top-k changed the answer


def test_efficient_nms_layout_holds_the_same_detections(detector):
    model = to_onnx(detector, opset=17)
    x = _images(detector, 3, 11)
    raw = _session(model).run(None, {detector.input_names[0]: x})[0]
    settings = NmsSettings(max_detections=20, conf_threshold=_threshold(raw, 0.5), layout="efficient_nms")
    embedded = embed_nms(model, settings)
    session = _session(embedded)
    assert [o.name for o in session.get_outputs()] == ["num_detections", "detection_boxes", "detection_scores",
                                                       "detection_classes"]
    num, boxes, scores, classes = session.run(None, {detector.input_names[0]: x})
    assert num.dtype == np.int32 and num.shape == (3, 1) and classes.dtype == np.int32
    rows = np.concatenate([boxes, scores[..., None], classes[..., None].astype(np.float32)], axis=2)
    _check_equal(rows, num[:, 0], _reference(raw, settings), 20)


def test_refuses_a_classifier_and_bad_settings():
    graph = load_model(ROOT / "examples/lenet5.yaml").graph
    with pytest.raises(DlcError, match="detector"):
        embed_nms(to_onnx(graph, opset=17), NmsSettings())
    det = to_onnx(load_model(ROOT / "examples/tiny_detector.yaml").graph, opset=17)
    with pytest.raises(DlcError, match="max_detections"):
        embed_nms(det, NmsSettings(max_detections=0))
    with pytest.raises(DlcError, match="layout"):
        embed_nms(det, NmsSettings(layout="trt"))


def test_dlc_export_embeds_nms_with_the_detect_layers_settings(tmp_path):
    from dlc.compiler.train.checkpoint import save_checkpoint

    graph = load_model(ROOT / "examples/tiny_detector.yaml").graph
    randomize_weights(graph, seed=5, gain=1.5, bias_mean=0.0)
    ckpt = tmp_path / "det.safetensors"
    save_checkpoint(ckpt, graph)
    out = tmp_path / "det_nms.onnx"
    result = run_cli("export", str(ROOT / "examples/tiny_detector.yaml"), "--weights", str(ckpt), "--opset", "17",
                     "--embed-nms", "--max-detections", "7", "-o", str(out))
    assert result.exit_code == 0, result.output
    model = onnx.load(str(out))
    meta = json.loads(next(p.value for p in model.metadata_props if p.key == "dlc"))
    nms = meta["embedded_nms"]
    assert nms["max_detections"] == 7 and nms["conf_threshold"] == meta["postprocess"]["conf_threshold"]
    assert [c["name"] for c in meta["output_convention"]] == ["detections", "num_detections"]
    x = _images(graph, 4, 1)
    raw = _session(to_onnx(graph, opset=17)).run(None, {graph.input_names[0]: x})[0]
    rows, num = _session(model).run(None, {graph.input_names[0]: x})
    settings = NmsSettings(max_detections=7, conf_threshold=nms["conf_threshold"],
                           iou_threshold=nms["iou_threshold"], class_agnostic=nms["class_agnostic"])
    _check_equal(rows, num, _reference(raw, settings), 7)
    bad = run_cli("export", str(ROOT / "examples/tiny_detector.yaml"), "--weights", str(ckpt), "--opset", "17",
                  "--layout", "padded", "-o", str(tmp_path / "x.onnx"))
    assert bad.exit_code == 2 and "--embed-nms" in bad.output


def test_predict_and_eval_take_an_embedded_nms_model_and_agree_with_dlc_nms(tmp_path):
    from PIL import Image

    from dlc.compiler.frontend import load_model as load
    from dlc.compiler.metadata import update_metadata
    from dlc.compiler.pipeline import artifact_metadata
    from dlc.runtime.predict import predict

    loaded = load(ROOT / "examples/tiny_detector.yaml")
    randomize_weights(loaded.graph, seed=2, gain=1.5, bias_mean=0.0)
    raw_model = to_onnx(loaded.graph, opset=17, metadata=artifact_metadata(loaded, None))
    raw = _session(raw_model).run(None, {loaded.graph.input_names[0]: _images(loaded.graph, 8, 4)})[0]
    conf = _threshold(raw, 0.9)
    post = {**json.loads(next(p.value for p in raw_model.metadata_props if p.key == "dlc"))["postprocess"],
            "conf_threshold": conf}
    update_metadata(raw_model, postprocess=post)
    embedded = embed_nms(raw_model, NmsSettings(max_detections=post["max_detections"], conf_threshold=conf,
                                                iou_threshold=post["iou_threshold"]))
    onnx.save(raw_model, str(tmp_path / "raw.onnx"))
    onnx.save(embedded, str(tmp_path / "nms.onnx"))
    rng = np.random.default_rng(0)
    images = []
    for i in range(5):  # varied sizes: boxes are scaled back to each original image
        path = tmp_path / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (40 + 9 * i, 70 - 5 * i, 3), dtype=np.uint8)).save(path)
        images.append(path)
    want, _ = predict(tmp_path / "raw.onnx", images, device="cpu", batch=3)
    got, summary = predict(tmp_path / "nms.onnx", images, device="cpu", batch=3)
    assert [r.detections for r in got] == [r.detections for r in want]
    assert sum(len(r.detections) for r in got) > 0
    stricter, _ = predict(tmp_path / "nms.onnx", images, device="cpu", conf_threshold=conf + 0.02)
    ref, _ = predict(tmp_path / "raw.onnx", images, device="cpu", conf_threshold=conf + 0.02)
    assert [r.detections for r in stricter] == [r.detections for r in ref]
    with pytest.raises(DlcError, match="NMS is inside this model"):
        predict(tmp_path / "nms.onnx", images, device="cpu", iou_threshold=0.3)
    # dlc eval --model: the validation split through the embedded NMS equals dlc's NMS at the same threshold
    from dlc.runtime.evaluate import detect_validation, read_data_spec
    from dlc.runtime.session import Session

    spec = read_data_spec(ROOT / "examples/tiny_detector.yaml")
    _, want_preds, _ = detect_validation(Session(tmp_path / "raw.onnx", device="cpu"), spec, conf_threshold=conf)
    _, got_preds, _ = detect_validation(Session(tmp_path / "nms.onnx", device="cpu"), spec)
    assert len(got_preds) == len(want_preds) and sum(len(p[1]) for p in got_preds) > 0
    for (gb, gs, gl), (wb, ws, wl) in zip(got_preds, want_preds):
        np.testing.assert_array_equal(gb, wb)
        np.testing.assert_array_equal(gs, ws)
        np.testing.assert_array_equal(gl, wl)


def test_bench_times_a_raw_detector_with_dlc_nms_against_the_embedded_one(tmp_path):
    from dlc.compiler.frontend import load_model as load
    from dlc.compiler.pipeline import artifact_metadata
    from dlc.runtime.bench import bench

    loaded = load(ROOT / "examples/tiny_detector.yaml")
    raw = to_onnx(loaded.graph, opset=17, metadata=artifact_metadata(loaded, None))
    onnx.save(raw, str(tmp_path / "raw.onnx"))
    onnx.save(embed_nms(raw, NmsSettings(conf_threshold=0.01)), str(tmp_path / "nms.onnx"))
    calls = []
    import dlc.runtime.detect as detect

    real = detect.postprocess

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    detect.postprocess = counting
    try:
        result = bench([tmp_path / "raw.onnx", tmp_path / "nms.onnx"], batches=(1, 8), device="cpu",
                       min_time_s=0.0, warmup=1, postprocess=True)
    finally:
        detect.postprocess = real
    assert {(r.model, r.batch) for r in result.rows} == {("raw.onnx", 1), ("raw.onnx", 8), ("nms.onnx", 1),
                                                         ("nms.onnx", 8)}
    runs_raw = sum(r.runs for r in result.rows if r.model == "raw.onnx")
    assert len(calls) >= runs_raw  # every timed run of the raw model included dlc's NMS (plus warm-ups)
    assert any("raw.onnx" in n for n in result.notes) and not any("nms.onnx" in n for n in result.notes)
