"""Class labels that match the data: model.classes against the data set's classes (names, count, order) and the
model's output width; errors name the YAML line, the folders and what to do."""

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from dlc.compiler.cli import app
from dlc.compiler.errors import DlcError
from dlc.compiler.frontend import load_model

runner = CliRunner()

MODEL = """model:
  name: t
  input: {{shape: [3, 8, 8], mean: 0.5, std: 0.25}}
{classes}  layers:
    - {{name: conv, type: conv, out: 4, kernel: 3, pad: 1}}
    - {{name: relu, type: relu}}
    - {{name: pool, type: global_avgpool}}
    - {{name: flat, type: flatten}}
    - {{name: fc, type: linear, out: {out}}}
    - {{name: prob, type: softmax}}
data:
{data}
"""


def image_folder(root, names, per_class=4, size=(8, 8)):
    """root/<name>/k.png for each class: a colour per class, so a classifier can tell them apart."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(names):
        (root / name).mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            pixels = np.full((size[1], size[0], 3), 40, np.uint8)
            pixels[..., c % 3] = 200
            pixels = np.clip(pixels + rng.integers(-20, 20, pixels.shape), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{k}.png")
    return root


def write(tmp_path, classes=None, out=3, data="  dataset: imagefolder\n  root: shapes"):
    line = f"  classes: [{', '.join(classes)}]\n" if classes is not None else ""
    path = tmp_path / "m.yaml"
    path.write_text(MODEL.format(classes=line, out=out, data=data))
    return path


def errors(path):
    with pytest.raises(DlcError) as info:
        load_model(path)
    return [d.format() for d in info.value.diagnostics]


def test_matching_classes_load(tmp_path):
    image_folder(tmp_path / "shapes", ["circle", "square", "triangle"])
    assert load_model(write(tmp_path, ["circle", "square", "triangle"])).spec.classes == ["circle", "square",
                                                                                             "triangle"]
    assert load_model(write(tmp_path)).spec.classes is None  # the names then come from the folders


def test_wrong_names_name_the_mismatch(tmp_path):
    image_folder(tmp_path / "shapes", ["circle", "square", "triangle"])
    path = write(tmp_path, ["square", "circle", "dog"])
    assert errors(path) == [
        f"{path}:4: 'model.classes' [square, circle, dog] does not match the class folders of data.root 'shapes', "
        "[circle, square, triangle]: dog is not among them; triangle is missing from model.classes (write "
        "model.classes: [circle, square, triangle], or remove it to use the data's names)"]


def test_same_names_in_another_order_are_refused(tmp_path):
    image_folder(tmp_path / "shapes", ["circle", "square", "triangle"])
    (message,) = errors(write(tmp_path, ["square", "circle", "triangle"]))
    assert ":4: 'model.classes' [square, circle, triangle] lists the class folders of data.root 'shapes' in another " \
           "order: the data numbers them [circle, square, triangle] (sorted folder order)" in message
    assert "write model.classes: [circle, square, triangle]; dlc does not reorder classes" in message


def test_two_folders_for_three_outputs(tmp_path):
    image_folder(tmp_path / "shapes", ["circle", "square"])
    path = write(tmp_path)
    assert errors(path) == [
        f"{path}:13: data.root 'shapes' has 2 class folders [circle, square] but the model predicts 3 classes "
        "(layer 'fc' has out: 3) (give data.root 3 class folders, or set 'out: 2' on layer 'fc')"]
    # train/ and val/ splits: the class folders are train's
    image_folder(tmp_path / "split" / "train", ["a", "b"])
    image_folder(tmp_path / "split" / "val", ["a", "b"])
    (message,) = errors(write(tmp_path, data="  dataset: imagefolder\n  root: split"))
    assert "data.root 'split/train' has 2 class folders [a, b] but the model predicts 3" in message


def test_model_classes_against_the_output_width(tmp_path):
    path = write(tmp_path, ["a", "b"], out=3, data="  dataset: synthetic\n  num_classes: 3")
    msgs = errors(path)
    assert msgs[0] == (f"{path}:4: 'model.classes' names 2 classes but the model predicts 3 (layer 'fc' has out: 3) "
                       "(list 3 names, or set 'out: 2' on layer 'fc')")
    path = write(tmp_path, ["a", "a", "b"], out=3, data="  dataset: digits")
    assert any("'model.classes' repeats a" in m for m in errors(path))


def test_builtin_sets_have_named_classes(tmp_path):
    msgs = errors(write(tmp_path, out=4, data="  dataset: synthetic\n  num_classes: 3\n  samples: 60"))
    assert msgs == [f"{tmp_path / 'm.yaml'}:13: the synthetic set has 3 classes [disc, square, triangle] but the "
                    "model predicts 4 classes (layer 'fc' has out: 4) (set data.num_classes to 4, or 'out: 3' on "
                    "layer 'fc')"]
    (message,) = errors(write(tmp_path, ["a", "b", "c"], out=3, data="  dataset: synthetic"))
    assert "does not match the classes of the synthetic set, [disc, square, triangle]" in message
    assert load_model(write(tmp_path, ["disc", "square", "triangle"], data="  dataset: synthetic")).spec.classes
    (message,) = errors(write(tmp_path, out=3, data="  dataset: digits"))
    assert "the digits set has 10 classes [0, 1, 2, 3, 4, 5, 6, 7, 8, 9] but the model predicts 3" in message


def test_keys_the_dataset_does_not_read_are_refused(tmp_path):
    image_folder(tmp_path / "shapes", ["circle", "square", "triangle"])
    msgs = errors(write(tmp_path, data="  dataset: imagefolder\n  root: shapes\n  samples: 50\n"
                                      "  classes: [a, b, c]\n  image_size: 32"))
    assert any(":14: 'data.samples' is only read by dataset synthetic / synthetic_detection / synthetic_segmentation, not 'imagefolder'" in m
               for m in msgs)
    assert any(":16: 'data.image_size' is not a dlc setting (images are always made at, or resized to, "
               "model.input's shape" in m for m in msgs)
    (message,) = errors(write(tmp_path, data="  dataset: imagefolder\n  root: shapes\n  classes: [a, b, c]"))
    assert ":14: 'data.classes' is only read by datasets yolo and segmentation" in message


def test_a_missing_root_is_left_to_the_loader(tmp_path):
    """Without the data on this machine the YAML still loads (compile --weights, inspect); training says so."""
    loaded = load_model(write(tmp_path, ["x", "y", "z"], data="  dataset: imagefolder\n  root: elsewhere"))
    assert loaded.spec.classes == ["x", "y", "z"]


def test_detector_classes_against_the_detect_layer(tmp_path):
    text = """model:
  name: det
  input: {shape: [3, 16, 16]}
  classes: [disc, square]
  layers:
    - {name: c1, type: conv, out: 8, kernel: 3, stride: 2, pad: 1}
    - {name: head, type: conv, out: 16, kernel: 1}
    - {name: detect, type: detect, classes: 3, anchors: [[[3, 4], [6, 5]]]}
data: {dataset: synthetic_detection, num_classes: 3, samples: 40}
"""
    (tmp_path / "d.yaml").write_text(text)
    (message,) = errors(tmp_path / "d.yaml")
    assert message.startswith(f"{tmp_path / 'd.yaml'}:4: 'model.classes' names 2 classes but the model predicts 3 "
                              "(detect layer 'detect' has classes: 3)")
    (tmp_path / "d.yaml").write_text(text.replace("[disc, square]", "[disc, square, triangle]")
                                     .replace("num_classes: 3", "num_classes: 2"))
    (message,) = errors(tmp_path / "d.yaml")
    assert "the synthetic_detection set has 2 classes [disc, square] but the model predicts 3" in message


def test_trained_imagefolder_model_predicts_the_folder_names(tmp_path):
    """End to end: the names in predictions.json are the folder names, in the order the data numbered them."""
    image_folder(tmp_path / "shapes", ["blue_ish", "green_ish", "red_ish"][::-1], per_class=6)
    path = write(tmp_path, ["red_ish", "green_ish", "blue_ish"])
    assert "sorted folder order" in errors(path)[0]
    path = write(tmp_path, ["blue_ish", "green_ish", "red_ish"])
    (tmp_path / "m.yaml").write_text(path.read_text() + "  val_fraction: 0.34\ntrain: {base_lr: 0.1, batch_size: 6, "
                                     "epochs: 30, seed: 0}\n")
    result = runner.invoke(app, ["compile", str(path), "-o", str(tmp_path / "build"), "--json"])
    assert result.exit_code == 0, result.output
    # red_ish was drawn with channel 0 high (c = 0 in image_folder's reversed list): predict it
    probe = tmp_path / "probe.png"
    Image.open(tmp_path / "shapes" / "red_ish" / "0.png").save(probe)
    result = runner.invoke(app, ["predict", str(tmp_path / "build" / "model.onnx"), str(probe), "-o",
                                 str(tmp_path / "pred"), "--no-draw"])
    assert result.exit_code == 0, result.output
    top = json.loads((tmp_path / "pred" / "predictions.json").read_text())["results"][0]["top"]
    assert top[0]["label"] == "red_ish"
