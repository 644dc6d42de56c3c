"""The export: section: every value checked with its YAML line, defaults, and the CLI's shorthand forms."""

import pytest

from dlc.compiler.errors import DlcError
from dlc.compiler.export_config import ExportConfig, parse_dynamic, parse_target
from dlc.compiler.frontend import load_model_text

MODEL = """\
model:
  name: m
  input: {shape: [1, 8, 8]}
  layers:
    - {name: c, type: conv, out: 2, kernel: 3}
"""


def test_defaults_without_section():
    loaded = load_model_text(MODEL)
    assert loaded.export == ExportConfig()
    assert loaded.export.dynamic == ("batch",) and loaded.export.precision == "fp32"


def test_full_section_parses():
    text = MODEL + """\
export:
  opset: 15
  dynamic: [width, batch, height]
  precision: int8
  calibration: {samples: 64, method: entropy}
  max_accuracy_drop: 0.5
  filename: net.onnx
"""
    cfg = load_model_text(text).export
    assert cfg.opset == 15 and cfg.dynamic == ("batch", "height", "width")  # canonical order
    assert cfg.precision == "int8" and cfg.calibration.samples == 64 and cfg.calibration.method == "entropy"
    assert cfg.max_accuracy_drop == 0.5 and cfg.filename == "net.onnx"


def test_dynamic_batch_false_is_fully_static():
    assert load_model_text(MODEL + "export: {dynamic_batch: false}\n").export.dynamic == ()


def test_every_problem_reported_with_its_line():
    text = MODEL + """\
export:
  precision: int4
  dynamic: [batch, hieght]
  calibration: {method: mse}
  max_accuracy_drop: -1
"""
    with pytest.raises(DlcError) as exc:
        load_model_text(text, "m.yaml")
    lines = [d.format() for d in exc.value.diagnostics]
    assert any("m.yaml:7:" in m and "int4" in m and "int8" in m for m in lines), lines
    assert any("m.yaml:8:" in m and "hieght" in m and "did you mean 'height'" in m for m in lines), lines
    assert any("m.yaml:9:" in m and "mse" in m for m in lines), lines  # calibration without int8, bad method
    assert any("m.yaml:10:" in m and "max_accuracy_drop" in m for m in lines), lines


def test_unquoted_version_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="as a string"):
        parse_target({"version": 1.10})


def test_target_shorthand():
    t = parse_target("onnxruntime@1.14:tensorrt")
    assert (t.runtime, t.version, t.device) == ("onnxruntime", "1.14", "tensorrt")
    assert parse_target("1.16").device == "cpu"
    with pytest.raises(ValueError, match="device"):
        parse_target("1.16:gpu")


def test_dynamic_shorthand_and_pairs():
    assert parse_dynamic("batch,height,width") == ("batch", "height", "width")
    assert parse_dynamic([]) == ()
    with pytest.raises(ValueError, match="together"):
        parse_dynamic(["height"])
