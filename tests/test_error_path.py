"""One error path: whatever escapes a command becomes one `error:` line, exit 2 for the user's input or
machine, exit 1 (and "please report") for a bug in dlc, with the traceback only under --debug."""

import errno

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from typer.testing import CliRunner

from dlc.compiler import frontend
from dlc.compiler.cli import app
from dlc.compiler.errors import Diagnostic, DlcError, shorten
from dlc.compiler.failures import classify

from helpers import ROOT

runner = CliRunner()
LENET = str(ROOT / "examples/lenet5.yaml")


def invoke(*args):
    return runner.invoke(app, list(args), catch_exceptions=False)


def _raise(exc):
    def fail(*_args, **_kwargs):
        raise exc
    return fail


@pytest.mark.parametrize("exc, code, words", [
    (OSError(errno.ENOSPC, "No space left on device", "build/x/model.onnx"), 2, ["build/x/model.onnx", "space"]),
    (PermissionError(errno.EACCES, "Permission denied", "/root/x"), 2, ["/root/x", "permission"]),
    (IsADirectoryError(errno.EISDIR, "Is a directory", "data"), 2, ["data", "folder"]),
    (FileExistsError(errno.EEXIST, "File exists", "out"), 2, ["out", "exists"]),
    (MemoryError(), 2, ["out of memory"]),
    (RecursionError("maximum recursion depth exceeded"), 2, ["nested too deeply"]),
    (onnx.checker.ValidationError("Node (x) has input size 3 not in range"), 2, ["onnx refused", "input size 3"]),
    (ZeroDivisionError("float division by zero"), 1, ["internal error", "ZeroDivisionError", "please report"]),
])
def test_every_exception_is_one_line(monkeypatch, exc, code, words):
    monkeypatch.setattr(frontend, "load_model", _raise(exc))
    result = invoke("inspect", LENET)
    assert result.exit_code == code
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output
    for word in words:
        assert word.lower() in lines[0].lower()


def test_debug_shows_the_traceback_of_a_bug(monkeypatch):
    monkeypatch.setattr(frontend, "load_model", _raise(ZeroDivisionError("float division by zero")))
    quiet = invoke("inspect", LENET)
    loud = invoke("--debug", "inspect", LENET)
    assert quiet.exit_code == loud.exit_code == 1
    assert "Traceback" not in quiet.output and "Traceback" in loud.output and "ZeroDivisionError" in loud.output


def test_pil_decompression_bomb_is_a_user_error():
    from PIL import Image
    failure = classify(Image.DecompressionBombError("Image size (200000000 pixels) exceeds limit"))
    assert failure.code == 2 and "image too large" in failure.lines[0] and "200000000" in failure.lines[0]


def test_onnxruntime_inference_error_is_one_line(tmp_path):
    # a model onnxruntime loads but cannot run: Reshape to a shape that does not fit the input
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    shape = helper.make_tensor("shape", TensorProto.INT64, [2], [3, 3])
    graph = helper.make_graph([helper.make_node("Reshape", ["x", "shape"], ["y"])], "g", [x], [y], [shape])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "reshape.onnx"
    onnx.save(model, path)
    np.save(tmp_path / "x.npy", np.ones((2, 4), np.float32))
    result = invoke("run", str(path), "--input", str(tmp_path / "x.npy"))
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output


def test_long_values_are_cut():
    name = "n" * 100_000
    text = DlcError(Diagnostic(f"unknown layer '{name}'", file="m.yaml", line=3)).diagnostics[0].format()
    assert len(text) < 400 and "99,862 chars" in text and text.startswith("m.yaml:3: unknown layer 'nnn")
    assert shorten("short words stay") == "short words stay"
    assert len(shorten("word " * 10_000)) <= 2000


def test_hundred_thousand_character_layer_name(tmp_path):
    name = "x" * 100_000
    (tmp_path / "m.yaml").write_text(
        "model:\n  name: m\n  input: [1, 8, 8]\n  layers:\n"
        f"    - {{name: c, type: conv, bottom: {name}, num_output: 2, kernel: 3}}\n")
    result = invoke("inspect", str(tmp_path / "m.yaml"))
    assert result.exit_code == 2 and len(result.output) < 2_000, len(result.output)
    assert "error:" in result.output and "Traceback" not in result.output


def test_ctrl_c_is_one_line(monkeypatch):
    monkeypatch.setattr(frontend, "load_model", _raise(KeyboardInterrupt()))
    import signal
    previous = signal.getsignal(signal.SIGINT)
    try:
        result = invoke("inspect", LENET)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert result.exit_code == 130 and result.output.strip() == "interrupted"
