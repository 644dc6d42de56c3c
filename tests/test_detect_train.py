"""Detection training end to end on a very small detector: anchors: auto found by k-means and carried by the
checkpoint, the loss going down, val_map reported, and the exported ONNX + dlc's NMS giving the same detections
as the training backend."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from dlc.compiler.export_onnx import read_metadata
from dlc.compiler.frontend import load_model
from dlc.compiler.pipeline import compile_model
from dlc.compiler.train.checkpoint import read_checkpoint
from dlc.compiler.train.executor import Executor
from dlc.compiler.train.trainer import Trainer, train_model
from dlc.runtime import postprocess

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
    - {name: conv3, type: conv, out: 16, kernel: 3, stride: 2, pad: 1}
    - {name: relu3, type: relu}
    - {name: head, type: conv, out: 21, kernel: 1}
    - {name: detect, type: detect, classes: 2, anchors: auto, anchors_per_scale: 3, obj_loss: OBJ}
data:
  dataset: synthetic_detection
  samples: 240
  num_classes: 2
  val_fraction: 0.25
  augment: {mirror: true}
train:
  solver: adam
  base_lr: 0.01
  batch_size: 30
  epochs: 3
  seed: 0
  early_stopping: {monitor: val_map, patience: 3}
"""


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("det")
    path = folder / "det.yaml"
    path.write_text(DETECTOR.replace("OBJ", "bce"))
    loaded = load_model(path)
    trainer = Trainer(loaded, folder / "run", progress=False)
    losses = []
    first = trainer.detection_loss  # record every training-step loss

    def recording(maps, targets):
        loss, grads = first(maps, targets)
        losses.append(loss)
        return loss, grads

    trainer.detection_loss = recording
    result = trainer.run()
    return path, folder / "run", loaded, result, losses


def test_training_lowers_the_loss_and_reports_map(trained):
    path, run, loaded, result, losses = trained
    # each epoch: 6 training steps (180 images / 30), then 2 validation batches (60 images)
    assert len(losses) == 3 * 8
    train_losses = [loss for i, loss in enumerate(losses) if i % 8 < 6]
    assert np.mean(train_losses[-3:]) < 0.7 * np.mean(train_losses[:3])
    assert [h["epoch"] for h in result.history] == [1, 2, 3]
    assert result.history[-1]["val_loss"] < result.history[0]["val_loss"]
    maps = [h["val_map"] for h in result.history]
    assert 0.0 <= maps[-1] <= 1.0 and 0.0 <= result.history[-1]["val_map50_95"] <= maps[-1]
    assert result.best_epoch == int(np.argmax(maps)) + 1  # early stopping on val_map keeps the highest
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["task"] == "detection" and 0.3 < metrics["anchor_fit"]["mean_best_iou"] <= 1.0
    assert (run / "curves.png").stat().st_size > 0


def test_auto_anchors_are_stored_and_restored(trained):
    path, run, loaded, _, _ = trained
    anchors = loaded.graph.node("detect").attrs["anchors"]
    assert len(anchors) == 1 and len(anchors[0]) == 3
    areas = [w * h for w, h in anchors[0]]
    assert areas == sorted(areas) and all(w > 1 and h > 1 for w, h in anchors[0])
    _, _, _, info = read_checkpoint(run / "checkpoint.safetensors")
    assert info["anchors"] == {"detect": anchors}
    fresh = load_model(path)  # anchors: auto again, until a checkpoint gives them back
    assert fresh.graph.node("detect").attrs["anchors"] is None
    Trainer(fresh, run, progress=False).run(resume=True)  # all epochs done: restores and re-saves only
    assert fresh.graph.node("detect").attrs["anchors"] == anchors


def test_onnx_and_nms_give_the_backend_detections(trained, tmp_path):
    path, run, loaded, _, _ = trained
    result = compile_model(path, tmp_path, weights=run / "checkpoint.safetensors")
    model = onnx.load(result.onnx_path)
    meta = read_metadata(model)
    det = meta["detection"]
    assert meta["task"] == "detection" and det["strides"] == [[8, 8]]
    assert det["anchors"] == loaded.graph.node("detect").attrs["anchors"]
    from dlc.compiler.data.detection import load_detection_dataset

    _, val = load_detection_dataset({"dataset": "synthetic_detection", "samples": 240, "num_classes": 2,
                                     "val_fraction": 0.25}, (3, 32, 32), tmp_path)
    x = ((val.images[:16] - 0.3) / 0.3).astype(np.float32)
    backend = Executor(loaded.graph).forward(x)["detect"]
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    exported = session.run(None, {"image": x})[0]
    np.testing.assert_allclose(exported, backend, rtol=1e-5, atol=1e-5)
    ours = postprocess(backend, **meta["postprocess"])
    theirs = postprocess(exported, **meta["postprocess"])
    assert sum(len(s) for _, s, _ in ours) > 0
    for (b1, s1, l1), (b2, s2, l2) in zip(ours, theirs):
        np.testing.assert_array_equal(l1, l2)
        np.testing.assert_allclose(b1, b2, atol=1e-4)
        np.testing.assert_allclose(s1, s2, atol=1e-5)


def test_focal_objectness_trains_too(tmp_path):
    path = tmp_path / "det.yaml"
    path.write_text(DETECTOR.replace("OBJ", "focal").replace("epochs: 3", "epochs: 1"))
    result = train_model(load_model(path), tmp_path / "run", progress=False)
    assert np.isfinite(result.history[0]["train_loss"]) and np.isfinite(result.history[0]["val_loss"])


def test_train_settings_for_classifiers_are_refused_with_the_place_to_put_them(tmp_path):
    from dlc.compiler.errors import DlcError

    path = tmp_path / "det.yaml"
    path.write_text(DETECTOR.replace("OBJ", "bce").replace("monitor: val_map", "monitor: val_accuracy"))
    with pytest.raises(DlcError, match="early_stopping.monitor is val_accuracy, which a detector does not report"):
        Trainer(load_model(path), tmp_path / "run", progress=False)
    path.write_text(DETECTOR.replace("OBJ", "bce").replace("  seed: 0", "  seed: 0\n  loss: focal"))
    with pytest.raises(DlcError, match="loss settings live on its detect layer 'detect'"):
        Trainer(load_model(path), tmp_path / "run", progress=False)
    path.write_text(DETECTOR.replace("OBJ", "bce").replace("num_classes: 2", "num_classes: 3"))
    with pytest.raises(DlcError, match=r"the synthetic_detection set has 3 classes \[disc, square, triangle\] but "
                                       r"the model predicts 2 classes \(detect layer 'detect' has classes: 2\)"):
        Trainer(load_model(path), tmp_path / "run", progress=False)  # refused when the YAML is loaded


def test_eval_model_end_to_end_matches_pycocotools_and_bench(trained, tmp_path):
    """`dlc eval --model --data`: the detector runs on the validation split through onnxruntime + dlc's NMS; its
    COCO statistics equal pycocotools' on the saved files, and its VOC mAP equals `dlc bench --data`'s."""
    import contextlib
    import io

    from typer.testing import CliRunner

    from dlc.compiler.cli import app
    from dlc.runtime import Session
    from dlc.runtime.evaluate import Evaluator

    path, run, _, _, _ = trained
    onnx_path = compile_model(path, tmp_path / "c", weights=run / "checkpoint.safetensors").onnx_path
    result = CliRunner().invoke(app, ["eval", "--model", str(onnx_path), "--data", str(path), "--json",
                                      "--save", str(tmp_path / "files")])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    bench = Evaluator(str(path)).evaluate(Session(onnx_path, device="cpu"))
    assert report["voc"]["map"] == pytest.approx(bench.accuracy, abs=1e-9)
    instances = json.loads((tmp_path / "files" / "instances.json").read_text())
    detections = json.loads((tmp_path / "files" / "detections.json").read_text())
    assert len(instances["images"]) == 60 and len(detections) > 0
    coco = pytest.importorskip("pycocotools.coco")
    cocoeval = pytest.importorskip("pycocotools.cocoeval")
    with contextlib.redirect_stdout(io.StringIO()):
        gt = coco.COCO(str(tmp_path / "files" / "instances.json"))
        ev = cocoeval.COCOeval(gt, gt.loadRes(str(tmp_path / "files" / "detections.json")), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    np.testing.assert_allclose(list(report["coco"]["stats"].values()), ev.stats, atol=1e-4)


def test_eval_model_needs_both_model_and_data(trained):
    from typer.testing import CliRunner

    from dlc.compiler.cli import app

    path, _, _, _, _ = trained
    result = CliRunner().invoke(app, ["eval", "--data", str(path)])
    assert result.exit_code == 2 and "--model model.onnx --data model.yaml" in result.output


def test_predict_draws_the_detections_in_original_pixels(trained, tmp_path):
    from PIL import Image
    from typer.testing import CliRunner

    from dlc.compiler.cli import app
    from dlc.compiler.data.datasets import read_image
    from dlc.runtime import Session

    path, run, loaded, _, _ = trained
    onnx_path = compile_model(path, tmp_path / "c", weights=run / "checkpoint.safetensors").onnx_path
    images = []
    for k in range(3):  # a red block on noise, 48×64: not the model's 32×32 input size
        rng = np.random.default_rng(k)
        pixels = (rng.random((64, 48, 3)) * 255).astype(np.uint8)
        pixels[10:40, 8:30] = [250, 30, 30]
        Image.fromarray(pixels).save(tmp_path / f"im{k}.png")
        images.append(tmp_path / f"im{k}.png")
    result = CliRunner().invoke(app, ["predict", str(onnx_path), *map(str, images), "-o", str(tmp_path / "p"),
                                      "--conf", "0.01", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "p" / "predictions.json").read_text())["results"]
    session = Session(onnx_path, device="cpu")
    meta = session.metadata
    for row, image in zip(rows, images):
        x, (w0, h0) = read_image(image, 3, 32, 32)
        decoded = session.run(((x[None] - 0.3) / 0.3).astype(np.float32))["detect"]
        settings = {**meta["postprocess"], "conf_threshold": 0.01}
        [(boxes, scores, labels)] = postprocess(decoded, **settings)
        assert [d["class_id"] for d in row["detections"]] == labels.tolist()
        scale = np.array([w0 / 32, h0 / 32, w0 / 32, h0 / 32])
        expected = np.clip(boxes * scale, 0, [w0, h0, w0, h0])
        np.testing.assert_allclose([d["box"] for d in row["detections"]], expected.reshape(-1, 4), atol=0.006)
        np.testing.assert_allclose([d["score"] for d in row["detections"]], scores, atol=6e-6)
        with Image.open(row["drawn"]) as im:
            assert im.size == (48, 64)
    assert sum(len(r["detections"]) for r in rows) > 0


def test_pruning_a_detector_reports_map_and_fine_tunes(trained, tmp_path):
    """dlc prune on a detector: the detect layer and its heads stay whole, the backbone shrinks, and the
    validation score is mAP@0.5 of the backend before and after (equal to a direct computation)."""
    from typer.testing import CliRunner

    from dlc.compiler.cli import app
    from dlc.compiler.prune.pipeline import DetectionValData
    from dlc.compiler.train.checkpoint import load_params_into
    from dlc.compiler.train.trainer import restore_anchors

    path, run, _, _, _ = trained
    out = tmp_path / "pruned.onnx"
    result = CliRunner().invoke(app, ["prune", str(path), "--weights", str(run / "checkpoint.safetensors"), "-o",
                                      str(out), "--ratio", "0.5", "--fine-tune-epochs", "1", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["metric"] == "mAP@0.5" and report["fine_tuned"]
    before, after = report["before"], report["after"]
    assert after["params"] < before["params"] and 0.0 <= after["val_accuracy"] <= 1.0
    loaded = load_model(path)
    params, _, _, info = read_checkpoint(run / "checkpoint.safetensors")
    load_params_into(loaded.graph, params, "ckpt")
    restore_anchors(loaded.graph, info)
    assert before["val_accuracy"] == pytest.approx(DetectionValData.from_spec(loaded.spec, loaded.graph)
                                                   .accuracy(loaded.graph), abs=1e-12)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    meta = json.loads(session.get_modelmeta().custom_metadata_map["dlc"])
    assert meta["task"] == "detection" and session.get_outputs()[0].shape[1:] == [48, 7]  # 4×4 cells × 3 anchors, 5 + 2 classes
