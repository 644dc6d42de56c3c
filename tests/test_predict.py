"""`dlc predict` on a classifier: results equal a direct onnxruntime run; files and errors."""

import json

import numpy as np
import onnx
import pytest
from PIL import Image
from typer.testing import CliRunner

from dlc.compiler.cli import app
from dlc.compiler.data.datasets import read_image
from dlc.compiler.pipeline import compile_model
from dlc.runtime import Session

from helpers import SMALL_CLASSIFIER_LAYERS as LAYERS
from helpers import model_yaml

runner = CliRunner()



@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    text = model_yaml(LAYERS, shape=(3, 12, 12)).replace(
        "input: {shape: [3, 12, 12]}", "input: {shape: [3, 12, 12], mean: [0.5, 0.5, 0.5], std: [0.25, 0.25, 0.25]}\n"
        "  classes: [cat, dog, bird]")
    (root / "m.yaml").write_text(text)
    onnx_path = compile_model(root / "m.yaml", root / "out").onnx_path
    rng = np.random.default_rng(0)
    images = []
    for k, size in enumerate([(12, 12), (30, 20), (7, 9)]):
        path = root / f"img{k}.png"
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
        images.append(path)
    return onnx_path, images, root


def test_classifier_scores_equal_a_direct_run(classifier, tmp_path):
    onnx_path, images, _ = classifier
    result = runner.invoke(app, ["predict", str(onnx_path), *map(str, images), "-o", str(tmp_path), "--json",
                                 "--top-k", "3", "--batch", "2"])
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "predictions.json").read_text())["results"]
    session = Session(onnx_path, device="cpu")
    for row, path in zip(rows, images):
        x, size = read_image(path, 3, 12, 12)
        logits = session.run(((x[None] - 0.5) / 0.25).astype(np.float32))["fc"][0].astype(np.float64)
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        order = np.argsort(-probs)
        assert [t["class_id"] for t in row["top"]] == order.tolist()
        assert [t["label"] for t in row["top"]] == [["cat", "dog", "bird"][j] for j in order]
        np.testing.assert_allclose([t["score"] for t in row["top"]], probs[order], atol=1e-5)
        assert (row["width"], row["height"]) == size
        with Image.open(row["drawn"]) as im:
            assert im.size == size


def test_folder_input_and_unique_png_names(classifier, tmp_path):
    onnx_path, images, root = classifier
    result = runner.invoke(app, ["predict", str(onnx_path), str(images[0]), str(images[0]), "-o", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["img0.png", "img0_2.png"]
    result = runner.invoke(app, ["predict", str(onnx_path), str(root), "-o", str(tmp_path / "all"), "--no-draw"])
    assert result.exit_code == 0, result.output
    assert len(json.loads((tmp_path / "all" / "predictions.json").read_text())["results"]) == 3
    assert not list((tmp_path / "all").glob("*.png"))


def test_errors_are_one_clear_line(classifier, tmp_path):
    onnx_path, images, root = classifier
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png at all")
    result = runner.invoke(app, ["predict", str(onnx_path), str(bad), "-o", str(tmp_path / "o")])
    assert result.exit_code == 2 and "broken.png" in result.output and "cannot read image" in result.output
    result = runner.invoke(app, ["predict", str(onnx_path), str(tmp_path / "missing.png")])
    assert result.exit_code == 2 and "no such image file" in result.output
    bare = onnx.load(onnx_path)
    del bare.metadata_props[:]
    onnx.save(bare, tmp_path / "bare.onnx")
    result = runner.invoke(app, ["predict", str(tmp_path / "bare.onnx"), str(images[0]), "-o", str(tmp_path / "o")])
    assert result.exit_code == 2 and "no dlc metadata" in result.output
    assert "Traceback" not in result.output


def test_eval_model_on_a_classifier_reports_accuracy(tmp_path):
    from dlc.runtime.evaluate import Evaluator

    text = model_yaml(LAYERS.replace("out: 3}", "out: 4}"), shape=(3, 12, 12),
                      extra="data: {dataset: synthetic, samples: 80, num_classes: 4, val_fraction: 0.5}\n")
    (tmp_path / "m.yaml").write_text(text)
    onnx_path = compile_model(tmp_path / "m.yaml", tmp_path / "out").onnx_path
    result = runner.invoke(app, ["eval", "--model", str(onnx_path), "--data", str(tmp_path / "m.yaml"), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    direct = Evaluator(tmp_path / "m.yaml").evaluate(Session(onnx_path, device="cpu"))
    assert report["total"] == 40 and report["correct"] == direct.correct
    assert report["accuracy"] == direct.accuracy == direct.correct / 40
