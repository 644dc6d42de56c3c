"""The dlc command line: inspect, compile and run, in text and --json."""

import json

import numpy as np
import onnx
from typer.testing import CliRunner

from dlc.compiler.cli import app

from helpers import ROOT

runner = CliRunner()
RESNET = str(ROOT / "examples/resnet20.yaml")


def invoke(*args):
    return runner.invoke(app, list(args), catch_exceptions=False)


def test_inspect_table_and_json():
    result = invoke("inspect", RESNET)
    assert result.exit_code == 0
    assert "stage3_1/conv2" in result.stdout and "272,474" in result.stdout and "40,813,184" in result.stdout
    data = json.loads(invoke("inspect", RESNET, "--json").stdout)
    assert data["total_params"] == 272_474 and data["total_macs"] == 40_813_184
    assert data["layers"][0] == {"name": "conv1", "type": "conv", "output_shape": [16, 32, 32], "params": 432,
                                 "macs": 442_368, "rf_size": [3.0, 3.0], "rf_jump": [1.0, 1.0],
                                 "rf_start": [0.0, 0.0]}


def test_compile_then_run(tmp_path):
    result = invoke("compile", RESNET, "-o", str(tmp_path), "--skip-train")
    assert result.exit_code == 0, result.stdout
    assert "272,474 parameters" in result.stdout and "81×81 px" in result.stdout
    assert (tmp_path / "model.onnx").is_file() and (tmp_path / "report.json").is_file()
    run = json.loads(invoke("run", str(tmp_path / "model.onnx"), "--random", "--batch", "3", "--runs", "2",
                            "--json").stdout)
    assert run["provider"] == "CPUExecutionProvider"  # no GPU on the test machines
    assert run["outputs"] == {"fc": [3, 10]} and run["latency_ms"]["median_ms"] > 0


def test_compile_opset_option(tmp_path):
    assert invoke("compile", RESNET, "-o", str(tmp_path), "--opset", "13", "--skip-train").exit_code == 0
    assert onnx.load(tmp_path / "model.onnx").opset_import[0].version == 13


def test_run_with_input_file(tmp_path):
    invoke("compile", str(ROOT / "examples/lenet5.yaml"), "-o", str(tmp_path), "--skip-train")
    x = np.zeros((2, 1, 28, 28), np.float32)
    np.save(tmp_path / "x.npy", x)
    data = json.loads(invoke("run", str(tmp_path / "model.onnx"), "--input", str(tmp_path / "x.npy"), "--runs", "1",
                             "--json").stdout)
    assert data["outputs"] == {"fc3": [2, 10]}


def test_user_errors_exit_2(tmp_path):
    (tmp_path / "bad.onnx").write_bytes(b"not a model")
    result = runner.invoke(app, ["run", str(tmp_path / "bad.onnx"), "--random"])
    assert result.exit_code == 2 and "not a readable ONNX model" in result.stderr
    result = runner.invoke(app, ["run", str(tmp_path / "none.onnx"), "--random"])
    assert result.exit_code == 2 and "ONNX file not found" in result.stderr
    result = runner.invoke(app, ["run", str(tmp_path / "bad.onnx")])
    assert result.exit_code == 2 and "exactly one of --random or --input" in result.stderr


def test_help_explains_commands():
    result = invoke("--help")
    assert result.exit_code == 0
    for command in ("inspect", "compile", "run"):
        assert command in result.stdout
