"""`dlc prune`: a YAML model or an ONNX file in, a physically smaller ONNX file out that runs."""

import json

import numpy as np
import onnxruntime as ort
from typer.testing import CliRunner

from dlc.compiler.cli import app
from dlc.compiler.pipeline import compile_model

from helpers import ROOT

runner = CliRunner()


def _run(path, x):
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x})[0]


def test_prune_yaml_and_onnx(tmp_path):
    result = runner.invoke(app, ["prune", str(ROOT / "examples/resnet20.yaml"), "-o", str(tmp_path / "p.onnx"),
                                 "--ratio", "0.5", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["params"][1] < report["params"][0] / 2 and report["macs"][1] < report["macs"][0] / 2
    assert report["fine_tuned"] is False
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    assert _run(tmp_path / "p.onnx", x).shape == (2, 10)

    base = compile_model(ROOT / "examples/mobilenet_small.yaml", tmp_path / "mb", skip_train=True).onnx_path
    result = runner.invoke(app, ["prune", str(base), "-o", str(tmp_path / "mb.onnx"), "--method", "bn_scale",
                                 "--round-to", "8", "--skip", "stem"])
    assert result.exit_code == 0, result.output
    assert "not fine-tuned" in result.stdout
    assert (tmp_path / "mb.onnx").stat().st_size < base.stat().st_size / 2
    assert _run(tmp_path / "mb.onnx", x).shape == (2, 10)


def test_prune_bad_input(tmp_path):
    result = runner.invoke(app, ["prune", str(ROOT / "examples/resnet20.yaml"), "-o", str(tmp_path / "p.onnx"),
                                 "--method", "magic"])
    assert result.exit_code == 2 and "unknown importance method 'magic'" in result.stderr
    (tmp_path / "bad.onnx").write_bytes(b"nope")
    result = runner.invoke(app, ["prune", str(tmp_path / "bad.onnx"), "-o", str(tmp_path / "p.onnx")])
    assert result.exit_code == 2 and not (tmp_path / "p.onnx").exists()
