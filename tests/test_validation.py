"""Validation reports every problem at once, each with file:line, layer and a hint; the CLI exits 2."""

import subprocess
import sys

import pytest

from dlc.compiler.errors import DlcError
from dlc.compiler.frontend import load_model_text

from helpers import errors_of, model_yaml


def test_all_errors_reported_at_once_with_lines():
    text = model_yaml("""
        - {name: c1, type: conv, out: 8, kernal: 3}
        - {name: c2, type: convv, out: 8, kernel: 3}
        - {name: c3, type: conv, out: 8, kernel: 3, inputs: c9}
        - {name: c2, type: relu}
    """)
    errs = errors_of(text)
    assert "m.yaml:5: layer 'c1': unknown key 'kernal' in conv layer (did you mean 'kernel'?)" in errs
    assert any(e.startswith("m.yaml:6: layer 'c2': unknown layer type 'convv' (did you mean 'conv'?)") for e in errs)
    assert any(e.startswith("m.yaml:7: layer 'c3': input 'c9' is not defined") for e in errs)
    assert "m.yaml:8: layer 'c2': duplicate layer name 'c2' (first used at line 6)" in errs


def test_shape_errors_carry_computed_shapes():
    errs = errors_of(model_yaml("""
        - {name: a, type: conv, out: 4, kernel: 3}
        - {name: b, type: conv, out: 4, kernel: 5, inputs: input}
        - {name: s, type: add, inputs: [a, b]}
        - {name: cat, type: concat, inputs: [a, b]}
        - {name: p, type: maxpool, kernel: 17, inputs: input}
        - {name: big, type: conv, out: 4, kernel: [3, 20], pad: 1, inputs: input}
    """))
    assert "m.yaml:7: layer 's': inputs must have the same shape, got 4×14×14, 4×12×12" in errs
    assert "m.yaml:8: layer 'cat': inputs must have the same spatial size, got 4×14×14, 4×12×12" in errs
    assert any("layer 'p': window 17×17 is larger than the padded input height: input 3×16×16, padded height 16"
               in e for e in errs)
    assert any("layer 'big': kernel 3×20 is larger than the padded input width" in e and "padded width 18" in e
               for e in errs)


def test_downstream_of_broken_layer_is_not_reported_twice():
    errs = errors_of(model_yaml("""
        - {name: a, type: conv, out: 4, kernel: 99}
        - {name: b, type: relu}
        - {name: c, type: add, inputs: [a, b]}
    """))
    assert len(errs) == 1 and "layer 'a'" in errs[0]


def test_negative_and_wrong_types():
    errs = errors_of(model_yaml("""
        - {type: conv, out: -2, kernel: 3, stride: 0, pad: -1, bias: maybe}
    """))
    joined = "\n".join(errs)
    assert "'out' must be >= 1, got -2" in joined
    assert "'stride' must be >= 1, got 0" in joined
    assert "'pad' must not be negative" in joined
    assert "'bias' must be true or false" in joined
    errs = errors_of("model:\n  input: {shape: [3, -1, 8]}\n  layers:\n    - {type: relu}\n")
    assert errs == ["m.yaml:2: 'model.input.shape' sizes must be positive, got [3, -1, 8]"]


def test_forward_reference_is_explained():
    errs = errors_of(model_yaml("""
        - {name: a, type: relu, inputs: b}
        - {name: b, type: relu, inputs: input}
    """))
    assert errs == ["m.yaml:5: layer 'a': input 'b' is defined later (line 6): a layer can only read layers above it"]


def test_did_you_mean_for_inputs_and_sections():
    errs = errors_of(model_yaml("""
        - {name: conv1, type: conv, out: 4, kernel: 3}
        - {name: r, type: relu, inputs: conv_1}
    """, extra="trian: {}\n"))
    assert any("input 'conv_1' is not defined (did you mean 'conv1'?)" in e for e in errs)
    assert any("unknown section 'trian' (did you mean 'train'?)" in e for e in errs)


def test_sections_are_validated_key_by_key():
    errs = errors_of(model_yaml("- {type: relu}", extra="train:\n  base_lr: 0.1\n  epoch: 3\nprune: {amont: 0.5}\n"))
    assert any("unknown key 'epoch' in 'train' (did you mean 'epochs'?)" in e for e in errs)
    assert any("unknown key 'amont' in 'prune' (did you mean 'amount'?)" in e for e in errs)
    assert not any("not supported yet" in e for e in errs)
    assert any("a 'train:' section needs a 'data:' section" in e for e in errs)
    assert not any("section 'train' is not supported" in e for e in errs)


def test_export_section_is_supported():
    m = load_model_text(model_yaml("- {type: relu}", extra="export: {opset: 15}\n"), "m.yaml")
    assert m.spec.export == {"opset": 15}
    errs = errors_of(model_yaml("- {type: relu}", extra="export: {opset: fifteen}\n"))
    assert errs == ["m.yaml:6: 'export.opset' must be an integer, got 'fifteen'"]


def test_yaml_syntax_error_has_line():
    errs = errors_of("model:\n  name: x\n  layers: [\n")
    assert len(errs) == 1 and errs[0].startswith("m.yaml:4: YAML syntax error")


def test_arity_and_block_errors():
    text = """
model:
  input: {shape: [3, 8, 8]}
  blocks:
    res:
      params: {out: null}
      layers:
        - {name: conv, type: conv, out: $out, kernel: 3, pad: 1}
        - {name: add, type: add, inputs: [conv, inptu]}
  layers:
    - {name: s, type: add}
    - {name: b1, block: res, out: 3, channels: 4}
    - {name: b2, block: rse, out: 3}
    - {name: b3, block: res}
"""
    errs = errors_of(text)
    joined = "\n".join(errs)
    assert "m.yaml:11: layer 's': add takes 2 or more input(s), got 1" in joined
    assert "m.yaml:12: layer 'b1': block 'res' has no parameter 'channels'" in joined
    assert "input 'inptu' is not defined (did you mean 'input'?) [in block 'res' used by 'b1' at line 12]" in joined
    assert "m.yaml:13: layer 'b2': unknown block 'rse' (did you mean 'res'?)" in joined
    assert "m.yaml:14: layer 'b3': block 'res' needs parameter 'out'" in joined


def test_error_is_a_dlc_error_not_a_crash_for_odd_documents():
    for text in ["", "42", "model: 3", "model:\n  input: {shape: [3, 8, 8]}\n  layers: {a: 1}\n",
                 "model:\n  input: {shape: [3, 8, 8]}\n  layers: [3, null, [1]]\n",
                 "model:\n  input: {shape: [3, 8, 8]}\n  layers:\n    - {type: conv, out: 4, kernel: [1, 2, 3]}\n"]:
        with pytest.raises(DlcError):
            load_model_text(text, "m.yaml")


def test_cli_exit_code_2_and_no_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(model_yaml("- {type: conv, out: 8, kernal: 3}"))
    for args in (["inspect", str(bad)], ["compile", str(bad), "-o", str(tmp_path / "o")],
                 ["inspect", str(tmp_path / "missing.yaml")]):
        proc = subprocess.run([sys.executable, "-m", "dlc.compiler.cli", *args], capture_output=True, text=True)
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr and "error:" in proc.stderr
    assert not (tmp_path / "o").exists()
