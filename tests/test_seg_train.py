"""Training a U-Net on the synthetic segmentation set: the loss falls, mIoU is recorded and monitored, the
exported ONNX gives the backend's per-pixel scores, and wrong wiring ends in one clear message."""

import json
import re

import numpy as np
import onnxruntime as ort
import pytest

from dlc.compiler.data.segmentation import load_segmentation_dataset
from dlc.compiler.errors import DlcError
from dlc.compiler.export_onnx import read_metadata
from dlc.compiler.frontend import load_model
from dlc.compiler.pipeline import compile_model
from dlc.compiler.train.executor import Executor
from dlc.compiler.train.trainer import Trainer
from dlc.runtime.segmentation_metrics import confusion_matrix, segmentation_metrics

UNET = """
model:
  name: micro_unet
  input: {name: image, shape: [3, 32, 32], mean: 0.3, std: 0.3}
  layers:
    - {name: enc1, type: conv, out: 8, kernel: 3, pad: 1, bias: false}
    - {name: bn1, type: batchnorm}
    - {name: relu1, type: relu}
    - {name: pool1, type: maxpool, kernel: 2, stride: 2}
    - {name: enc2, type: conv, out: 16, kernel: 3, pad: 1, bias: false}
    - {name: bn2, type: batchnorm}
    - {name: relu2, type: relu}
    - {name: up, type: conv_transpose, out: 8, kernel: 2, stride: 2}
    - {name: cat, type: concat, inputs: [up, relu1]}
    - {name: dec, type: conv, out: 8, kernel: 3, pad: 1}
    - {name: relu3, type: relu}
    - {name: HEAD}
data:
  dataset: synthetic_segmentation
  samples: 200
  num_classes: 3
  val_fraction: 0.2
  augment: {mirror: true, crop: 2}
train:
  solver: adam
  base_lr: 0.01
  batch_size: 20
  epochs: 4
  seed: 0
  loss: LOSS
  early_stopping: {monitor: val_miou, patience: 4}
"""
HEAD = "head, type: conv, out: 3, kernel: 1"


def _yaml(folder, loss="ce_dice", head=HEAD, extra=""):
    path = folder / "unet.yaml"
    path.write_text(UNET.replace("name: HEAD", f"name: {head}").replace("LOSS", loss) + extra)
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("seg")
    path = _yaml(folder)
    loaded = load_model(path)
    trainer = Trainer(loaded, folder / "run", progress=False)
    losses = []
    first = trainer.loss

    def recording(logits, labels, weighted=True):
        loss, grad = first(logits, labels, weighted)
        losses.append(loss)
        return loss, grad

    trainer.loss = recording
    result = trainer.run()
    return path, folder / "run", loaded, result, losses


def test_training_lowers_the_loss_and_records_miou(trained):
    path, run, loaded, result, losses = trained
    train_losses = losses[:8]  # first epoch: 8 training steps (160 / 20)
    assert np.mean(losses[-4:]) < 0.8 * np.mean(train_losses[:2])
    hist = result.history
    assert [h["epoch"] for h in hist] == [1, 2, 3, 4]
    assert hist[-1]["val_miou"] > hist[0]["val_miou"] and hist[-1]["val_miou"] > 0.4
    for key in ("val_pixel_accuracy", "val_mean_accuracy", "val_fwiou", "val_mdice"):
        assert 0 < hist[-1][key] <= 1
    assert result.best_epoch == int(np.argmax([h["val_miou"] for h in hist])) + 1
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["task"] == "segmentation" and metrics["classes"] == ["background", "disc", "square"]
    assert (run / "curves.png").stat().st_size > 0


def test_recorded_miou_is_the_metric_of_the_backends_predictions(trained):
    path, run, loaded, result, _ = trained
    _, val = load_segmentation_dataset({"dataset": "synthetic_segmentation", "samples": 200, "num_classes": 3,
                                        "val_fraction": 0.2}, (3, 32, 32), path.parent)
    x = ((val.images - 0.3) / 0.3).astype(np.float32)
    logits = Executor(loaded.graph).forward(x)["head"]
    m = segmentation_metrics(confusion_matrix(logits.argmax(1), val.masks, 3))
    # the graph holds the best epoch's weights (restore_best)
    best = result.history[result.best_epoch - 1]
    assert m["miou"] == pytest.approx(best["val_miou"], abs=1e-9)
    assert m["pixel_accuracy"] == pytest.approx(best["val_pixel_accuracy"], abs=1e-9)


def test_onnx_gives_the_backends_pixel_scores(trained, tmp_path):
    path, run, loaded, _, _ = trained
    result = compile_model(path, tmp_path, weights=run / "checkpoint.safetensors")
    model_bytes = result.onnx_path.read_bytes()
    import onnx

    meta = read_metadata(onnx.load_from_string(model_bytes))
    assert meta["task"] == "segmentation" and meta["output_convention"][0]["axes"] == [
        "batch", "channel", "height", "width"]
    x = np.random.default_rng(0).normal(0, 1, (4, 3, 32, 32)).astype(np.float32)
    backend = Executor(loaded.graph).forward(x)["head"]
    out = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"]).run(None, {"image": x})[0]
    assert out.shape == (4, 3, 32, 32)
    np.testing.assert_allclose(out, backend, rtol=1e-4, atol=1e-4 * np.abs(backend).max())


@pytest.mark.parametrize("loss", ["cross_entropy", "focal", "dice"])
def test_every_loss_trains(tmp_path, loss):
    path = _yaml(tmp_path, loss, extra="").read_text().replace("epochs: 4", "epochs: 1")
    (tmp_path / "unet.yaml").write_text(path + "  class_weights: balanced\n")
    result = Trainer(load_model(tmp_path / "unet.yaml"), tmp_path / "run", progress=False).run()
    assert np.isfinite(result.history[0]["val_loss"]) and 0 <= result.history[0]["val_miou"] <= 1


def test_wrong_wiring_ends_in_one_message(tmp_path):
    small = "pool_out, type: maxpool, kernel: 2, stride: 2}\n    - {name: head, type: conv, out: 3, kernel: 1"
    with pytest.raises(DlcError) as info:  # found by validation, before any work, with the layer's line
        load_model(_yaml(tmp_path, head=small))
    assert re.search(r"unet.yaml:\d+: .*layer 'head'.*the data is a segmentation set, so the output must be "
                     r"classes×32×32 .* but 'head' is 3×16×16", str(info.value)), str(info.value)
    # validation already compares the classes with the output's channels, before any work
    with pytest.raises(DlcError, match=r"unet.yaml:\d+: the synthetic_segmentation set has 3 classes .* but the "
                                       r"model predicts 5 classes \(layer 'head' has out: 5\)"):
        load_model(_yaml(tmp_path, head="head, type: conv, out: 5, kernel: 1"))


def test_dice_loss_on_a_classifier_is_refused(tmp_path):
    from helpers import tiny_training_yaml

    path = tiny_training_yaml(tmp_path, 1)
    path.write_text(path.read_text().replace("seed: 5}", "seed: 5, loss: dice}"))
    assert "loss: dice" in path.read_text()
    with pytest.raises(DlcError, match="dice is a segmentation loss"):
        Trainer(load_model(path), tmp_path / "run", progress=False)


@pytest.fixture(scope="module")
def compiled(trained, tmp_path_factory):
    path, run, loaded, result, _ = trained
    out = tmp_path_factory.mktemp("seg_onnx")
    return compile_model(path, out, weights=run / "checkpoint.safetensors").onnx_path


def test_eval_model_gives_the_metrics_of_the_onnx_predictions(trained, compiled):
    from dlc.runtime import Session
    from dlc.runtime.evaluate import Evaluator, read_data_spec

    path, _, loaded, result, _ = trained
    evaluation = Evaluator(read_data_spec(path)).evaluate(Session(compiled, device="cpu"))
    assert evaluation.task == "segmentation" and evaluation.metric == "mIoU"
    best = result.history[result.best_epoch - 1]
    # onnxruntime's scores differ from the backend's by float32 rounding: an argmax may flip on a near-tie
    assert evaluation.accuracy == pytest.approx(best["val_miou"], abs=2e-3)
    assert evaluation.details["pixel_accuracy"] == pytest.approx(best["val_pixel_accuracy"], abs=1e-3)
    assert evaluation.total == 40 * 32 * 32  # no ignored pixels in the synthetic set


def test_eval_refuses_a_task_mismatch(compiled, tmp_path):
    from dlc.runtime import Session
    from dlc.runtime.evaluate import Evaluator, read_data_spec

    other = tmp_path / "det.yaml"
    other.write_text("data: {dataset: synthetic_detection, samples: 40, num_classes: 2}\n")
    with pytest.raises(DlcError, match=r"is a segmentation model but --data .*det.yaml holds a detection data set"):
        Evaluator(read_data_spec(other)).evaluate(Session(compiled, device="cpu"))


def test_predict_writes_masks_at_the_original_size(trained, compiled, tmp_path):
    from PIL import Image

    from dlc.compiler.data.datasets import resize
    from dlc.runtime.predict import predict, write_outputs

    _, _, loaded, _, _ = trained
    scene = load_segmentation_dataset({"dataset": "synthetic_segmentation", "samples": 2, "num_classes": 3,
                                         "val_fraction": 0.5, "seed": 4}, (3, 45, 38), tmp_path)[0]
    pixels = (scene.images[0].transpose(1, 2, 0) * 255).round().astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "scene.png")
    results, summary = predict(compiled, [tmp_path / "scene.png"], device="cpu")
    write_outputs(results, summary, tmp_path / "out")
    assert summary["task"] == "segmentation"
    mask = np.asarray(Image.open(tmp_path / "out" / "scene_mask.png"))
    assert mask.shape == (45, 38)
    # the reference: the backend's scores at the input size, resized bilinearly to 45×38, then argmax
    x = resize(np.asarray(pixels, np.float32).transpose(2, 0, 1)[None] / 255, 32, 32)
    scores = Executor(loaded.graph).forward(((x - 0.3) / 0.3).astype(np.float32))["head"]
    want = resize(scores, 45, 38)[0].argmax(0)
    assert (mask == want).mean() > 0.995
    record = json.loads((tmp_path / "out" / "predictions.json").read_text())["results"][0]
    assert sum(record["segmentation"]["pixels"].values()) == 45 * 38
    overlay = np.asarray(Image.open(record["segmentation"]["overlay"]))
    assert overlay.shape == (45, 38, 3)
    np.testing.assert_array_equal(overlay[mask == 0], pixels[mask == 0])  # background left as it was
    assert (overlay[mask > 0] != pixels[mask > 0]).any()


def test_structured_pruning_couples_the_skips_and_reports_miou(trained, tmp_path):
    """dlc prune on the U-Net: the decoder's inputs follow the encoder's pruned channels through the skip
    concatenation, the head keeps its classes, and the score is mIoU (equal to the training record before)."""
    from typer.testing import CliRunner

    from dlc.compiler.cli import app
    from dlc.compiler.prune.structured import channel_groups
    path, run, loaded, result, _ = trained
    groups = {g.producers[0]: g for g in channel_groups(loaded.graph)}
    assert groups["enc1"].prunable and "dec" in groups["enc1"].members  # the skip couples enc1 and dec's input
    assert not groups["head"].prunable  # the classes
    out = tmp_path / "pruned.onnx"
    res = CliRunner().invoke(app, ["prune", str(path), "--weights", str(run / "checkpoint.safetensors"), "-o",
                                   str(out), "--ratio", "0.5", "--fine-tune-epochs", "1", "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["metric"] == "mIoU" and report["fine_tuned"]
    before, after = report["before"], report["after"]
    assert after["macs"] < 0.5 * before["macs"] and 0 <= after["val_accuracy"] <= 1
    best = result.history[result.best_epoch - 1]
    assert before["val_accuracy"] == pytest.approx(best["val_miou"], abs=1e-9)
    import onnx

    model = onnx.load(out)
    shapes = {i.name: list(i.dims) for i in model.graph.initializer}
    assert shapes["dec.weight"][1] == shapes["up.weight"][1] + shapes["enc1.weight"][0] < 16
    assert shapes["head.weight"][0] == 3
    x = np.random.default_rng(2).normal(0, 1, (2, 3, 32, 32)).astype(np.float32)
    y = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"image": x})[0]
    assert y.shape == (2, 3, 32, 32) and np.isfinite(y).all()


@pytest.mark.parametrize("dtype", ["uint8", "int64"])
def test_embed_argmax_outputs_the_class_map(trained, compiled, tmp_path, dtype):
    import onnx

    path, run, _, _, _ = trained
    argmax_yaml = tmp_path / "unet.yaml"
    argmax_yaml.write_text(path.read_text() + f"export: {{embed_argmax: {'true' if dtype == 'uint8' else dtype}}}\n")
    result = compile_model(argmax_yaml, tmp_path / "out", weights=run / "checkpoint.safetensors")
    model = onnx.load(result.onnx_path)
    meta = read_metadata(model)
    assert meta["embedded_argmax"]["dtype"] == dtype and meta["output_convention"][0]["kind"] == "class_map"
    x = np.random.default_rng(7).normal(0, 1, (3, 3, 32, 32)).astype(np.float32)
    scores = ort.InferenceSession(str(compiled), providers=["CPUExecutionProvider"]).run(None, {"image": x})[0]
    labels = ort.InferenceSession(str(result.onnx_path), providers=["CPUExecutionProvider"]).run(
        None, {"image": x})[0]
    assert labels.dtype == np.dtype(dtype) and labels.shape == (3, 32, 32)
    np.testing.assert_array_equal(labels, scores.argmax(1))
    assert len(np.unique(labels)) > 1


def test_embed_argmax_is_for_segmentation_models(tmp_path):
    from helpers import tiny_training_yaml

    path = tiny_training_yaml(tmp_path, 1, "export: {embed_argmax: true}\n")
    with pytest.raises(DlcError, match="embed_argmax applies to segmentation models"):
        compile_model(path, tmp_path / "out", skip_train=True)
    bad = tmp_path / "bad.yaml"
    bad.write_text(path.read_text().replace("embed_argmax: true", "embed_argmax: float16"))
    with pytest.raises(DlcError, match="'export.embed_argmax' is true .* got 'float16'"):
        load_model(bad)


def test_dynamic_height_and_width_export(trained, tmp_path):
    """--dynamic batch,height,width: the U-Net runs at other sizes (multiples of its total stride, 2 here) and
    gives a class score map of the same size; at the trained size it equals the fixed export."""
    from typer.testing import CliRunner

    from dlc.compiler.cli import app

    path, run, loaded, _, _ = trained
    out = tmp_path / "dyn.onnx"
    res = CliRunner().invoke(app, ["export", str(path), "-o", str(out), "--weights", str(run / "checkpoint.safetensors"),
                                   "--dynamic", "batch,height,width", "--json"])
    assert res.exit_code == 0, res.output
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(3).normal(0, 1, (2, 3, 48, 40)).astype(np.float32)
    assert session.run(None, {"image": x})[0].shape == (2, 3, 48, 40)
    x = x[:, :, :32, :32].copy()
    backend = Executor(loaded.graph).forward(x)["head"]
    np.testing.assert_allclose(session.run(None, {"image": x})[0], backend, rtol=1e-4,
                               atol=1e-4 * np.abs(backend).max())


def test_prune_section_compiles_a_pruned_unet(tmp_path):
    """`dlc compile` with a prune: section trains, prunes and fine-tunes the U-Net and exports the pruned one."""
    import onnx

    text = _yaml(tmp_path).read_text().replace("epochs: 4", "epochs: 2")
    path = tmp_path / "unet.yaml"
    path.write_text(text + "prune: {method: structured, amount: 0.5, fine_tune: {epochs: 1}}\n")
    result = compile_model(path, tmp_path / "out")
    report = json.loads(result.report_path.read_text())
    pruning = report["pruning"]
    assert pruning["metric"] == "mIoU" and pruning["fine_tuned"]
    assert pruning["after"]["macs"] < 0.5 * pruning["before"]["macs"]
    assert 0 <= pruning["after"]["val_accuracy"] <= 1
    model = onnx.load(result.onnx_path)
    assert read_metadata(model)["task"] == "segmentation"
    assert [d.dim_value for d in model.graph.output[0].type.tensor_type.shape.dim][1:] == [3, 32, 32]
