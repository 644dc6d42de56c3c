"""Rough edges of the command line: prune refuses untrained weights, predict skips unreadable images (and never
blocks on a FIFO), optimize --list needs no model, and a file of the wrong kind gets one line saying what to do."""

import json
import os
import threading

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from dlc.compiler.cli import app
from dlc.compiler.data.datasets import read_image
from dlc.compiler.errors import DlcError
from dlc.compiler.pipeline import compile_model
from dlc.runtime import Session

from helpers import ROOT, model_yaml
from helpers import SMALL_CLASSIFIER_LAYERS as LAYERS

runner = CliRunner()



@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    root = tmp_path_factory.mktemp("edges")
    text = model_yaml(LAYERS, shape=(3, 12, 12)).replace("  layers:", "  classes: [cat, dog, bird]\n  layers:")
    (root / "m.yaml").write_text(text)
    onnx_path = compile_model(root / "m.yaml", root / "out").onnx_path
    folder = root / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for k in range(4):
        Image.fromarray(rng.integers(0, 256, (10 + k, 12, 3), dtype=np.uint8)).save(folder / f"good{k}.png")
    (folder / "bad_a.png").write_bytes(b"not a png at all")
    (folder / "bad_b.jpg").write_bytes(b"\xff\xd8\xff truncated")
    return root, onnx_path, folder


def test_predict_skips_unreadable_images_and_names_each(classifier, tmp_path):
    root, onnx_path, folder = classifier
    result = runner.invoke(app, ["predict", str(onnx_path), str(folder), "-o", str(tmp_path / "p"), "--no-draw",
                                 "--batch", "2"])
    assert result.exit_code == 0, result.output
    lines = result.stderr.splitlines()
    warned = [line for line in lines if line.startswith("warning: skipped")]
    assert len(warned) == 2 and "bad_a.png: cannot read image" in warned[0] and "bad_b.jpg" in warned[1]
    assert "2 of 6 images could not be read" in result.stderr
    report = json.loads((tmp_path / "p" / "predictions.json").read_text())
    assert [r["image"].rsplit("/", 1)[1] for r in report["results"]] == [f"good{k}.png" for k in range(4)]
    assert [s["image"].rsplit("/", 1)[1] for s in report["skipped"]] == ["bad_a.png", "bad_b.jpg"]
    # the good images' scores are those of a direct run: skipping did not shift rows within a batch
    session = Session(onnx_path, device="cpu")
    for row in report["results"]:
        x, _ = read_image(row["image"], 3, 12, 12)
        logits = session.run(x[None].astype(np.float32))["fc"][0].astype(np.float64)
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        assert row["top"][0]["class_id"] == int(np.argmax(probs))
        assert abs(row["top"][0]["score"] - probs.max()) < 1e-5


def test_predict_on_error_stop_writes_nothing(classifier, tmp_path):
    _, onnx_path, folder = classifier
    result = runner.invoke(app, ["predict", str(onnx_path), str(folder), "-o", str(tmp_path / "p"),
                                 "--on-error", "stop"])
    assert result.exit_code == 2 and "bad_a.png" in result.stderr and "cannot read image" in result.stderr
    assert not (tmp_path / "p" / "predictions.json").exists()
    result = runner.invoke(app, ["predict", str(onnx_path), str(folder), "-o", str(tmp_path / "p"),
                                 "--on-error", "maybe"])
    assert result.exit_code == 2 and "--on-error must be one of skip, stop, got 'maybe'" in result.stderr
    # every image bad: exit 2 even when skipping, each named
    result = runner.invoke(app, ["predict", str(onnx_path), str(folder / "bad_a.png"), str(folder / "bad_b.jpg"),
                                 "-o", str(tmp_path / "q")])
    assert result.exit_code == 2 and "none of the 2 image(s) could be read" in result.stderr
    assert "bad_a.png" in result.stderr and "bad_b.jpg" in result.stderr
    assert not (tmp_path / "q" / "predictions.json").exists()


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this system")
def test_a_fifo_named_like_an_image_does_not_block(classifier, tmp_path):
    _, onnx_path, folder = classifier
    fifo = tmp_path / "x.png"
    os.mkfifo(fifo)
    with pytest.raises(DlcError, match="it is a FIFO, not a regular file"):
        read_image(fifo, 3, 8, 8)
    done = {}

    def run():
        done["result"] = runner.invoke(app, ["predict", str(onnx_path), str(fifo), str(folder / "good0.png"),
                                             "-o", str(tmp_path / "p"), "--no-draw"])

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout=60)
    if thread.is_alive():  # unblock the reader so the test process can end, then fail
        with open(fifo, "wb"):
            pass
        pytest.fail("dlc predict blocked on a FIFO")
    result = done["result"]
    assert result.exit_code == 0, result.output
    assert "x.png: cannot read image: it is a FIFO, not a regular file" in result.stderr
    with pytest.raises(DlcError, match="it is a folder, not a regular file"):
        read_image(tmp_path, 3, 8, 8)


def test_prune_refuses_untrained_weights(tmp_path):
    text = (ROOT / "examples/lenet5.yaml").read_text()
    (tmp_path / "lenet5.yaml").write_text(text[:text.index("\ndata:")] + "\n")
    result = runner.invoke(app, ["prune", str(tmp_path / "lenet5.yaml"), "-o", str(tmp_path / "p.onnx")])
    assert result.exit_code == 2, result.output
    assert ("no trained weights, so this would prune the random initial weights: pass --weights "
            "build/lenet5/checkpoint.safetensors (from dlc train) or prune the trained build/lenet5/model.onnx, or "
            "--allow-untrained") in result.stderr
    assert not (tmp_path / "p.onnx").exists()
    result = runner.invoke(app, ["prune", str(tmp_path / "lenet5.yaml"), "-o", str(tmp_path / "p.onnx"),
                                 "--allow-untrained", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["after"]["params"] < report["before"]["params"]


def test_optimize_list_needs_no_model_and_yaml_is_refused(tmp_path):
    result = runner.invoke(app, ["optimize", "--list"])
    assert result.exit_code == 0, result.output
    assert "passes: " in result.stdout and "default order: " in result.stdout
    result = runner.invoke(app, ["optimize", str(ROOT / "examples/lenet5.yaml"), "-o", str(tmp_path / "o.onnx")])
    assert result.exit_code == 2
    (line,) = [x for x in result.stderr.splitlines() if x.strip()]
    assert "lenet5.yaml: is a model YAML; dlc optimize works on ONNX files: run `dlc compile" in line
    result = runner.invoke(app, ["optimize"])
    assert result.exit_code == 2 and "give the ONNX model to optimize" in result.stderr


def test_inspect_of_an_onnx_file_points_to_info_and_import(classifier):
    _, onnx_path, _ = classifier
    result = runner.invoke(app, ["inspect", str(onnx_path)])
    assert result.exit_code == 2
    (line,) = [x for x in result.stderr.splitlines() if x.strip()]
    assert f"is an ONNX file; dlc inspect reads model YAML: `dlc info {onnx_path}`" in line
    assert f"`dlc import {onnx_path} -o DIR`" in line
