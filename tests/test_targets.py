"""Target runtimes: the onnxruntime table, the probe of the installed runtime, and the opset plan."""

from __future__ import annotations

import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from dlc.compiler.artifact import plan_opset
from dlc.compiler.errors import DlcError
from dlc.compiler.export_config import ExportConfig, TargetSpec
from dlc.compiler.frontend import load_model_text
from dlc.compiler.targets import (
    ORT_TABLE,
    installed_runtime_note,
    ir_for_opset,
    known_versions,
    min_runtime_for,
    parse_version,
    probe_installed,
    resolve_target,
)

from helpers import model_yaml

LENET = """
- {name: c1, type: conv, out: 4, kernel: 3}
- {name: r1, type: relu}
- {name: flat, type: flatten}
- {name: fc1, type: linear, out: 3}
"""


@pytest.mark.parametrize("version, opset, ir", [("1.10", 15, 8), ("1.12", 17, 8), ("1.14", 18, 8), ("1.16", 19, 9),
                                                ("1.17", 20, 9), ("1.18", 21, 10), ("1.20", 21, 10)])
def test_table_follows_onnxruntimes_published_rows(version, opset, ir):
    t = resolve_target("onnxruntime", version, "cpu")
    assert (t.opset, t.ir_version, t.from_table) == (opset, ir, True)


def test_the_table_never_goes_backwards_and_every_row_holds_its_opset():
    rows = [ORT_TABLE[k] for k in sorted(ORT_TABLE)]
    assert all(a[0] <= b[0] and a[1] <= b[1] for a, b in zip(rows, rows[1:]))
    assert all(ir_for_opset(opset) <= ir for opset, ir in rows)


def test_ir_for_opset_is_the_lowest_ir_that_holds_it():
    assert [ir_for_opset(o) for o in (11, 12, 13, 15, 18, 19, 21)] == [6, 7, 7, 8, 8, 9, 10]
    with pytest.raises(DlcError):
        ir_for_opset(10)


def test_min_runtime_is_the_oldest_row_that_loads_the_file():
    assert min_runtime_for(11, 6) == "1.10"
    assert min_runtime_for(17, 8) == "1.12"
    assert min_runtime_for(18, 8) == "1.14"
    assert min_runtime_for(21, 10) == "1.18"
    assert min_runtime_for(17, 10) == "1.18"  # the IR version decides, not only the opset
    assert min_runtime_for(99, 99) is None


def test_unknown_version_lists_the_known_ones():
    with pytest.raises(DlcError) as info:
        resolve_target("onnxruntime", "1.9", "cpu")
    text = str(info.value)
    assert "1.9" in text and all(v in text for v in known_versions())
    with pytest.raises(DlcError, match="not an onnxruntime version"):
        resolve_target("onnxruntime", "fourteen", "cpu")
    assert parse_version("1.14.1+cu118") == (1, 14)


def _loads(opset: int, ir: int) -> bool:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir)
    try:
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception:  # noqa: BLE001
        return False
    return True


def test_probe_of_the_installed_runtime_is_its_true_limit():
    opset, ir = probe_installed()
    assert _loads(opset, ir)
    if ir < onnx.IR_VERSION:
        assert not _loads(opset, ir + 1)  # the probe found the limit, not a point below it
    if opset < onnx.defs.onnx_opset_version():
        assert not _loads(opset + 1, ir_for_opset(opset + 1))
    t = resolve_target()  # no version: the installed runtime
    assert t.version == ort.__version__ and not t.from_table and (t.opset, t.ir_version) == (min(opset, 99), ir)


def test_installed_newer_than_the_target_is_said_plainly():
    note = installed_runtime_note(resolve_target("onnxruntime", "1.14", "cpu"))
    assert note and ort.__version__ in note and "1.14" in note and "proves" in note
    assert installed_runtime_note(resolve_target()) is None


def test_plan_takes_the_targets_highest_and_refuses_an_opset_above_it():
    plan = plan_opset(ExportConfig(target=TargetSpec("onnxruntime", "1.14", "cpu")))
    assert (plan.opset, plan.ir_version) == (18, 8) and "1.14" in plan.reason
    low = plan_opset(ExportConfig(opset=13, target=TargetSpec("onnxruntime", "1.14", "cpu")))
    assert (low.opset, low.ir_version) == (13, 7)
    with pytest.raises(DlcError, match="newer than onnxruntime 1.10"):
        plan_opset(ExportConfig(target=TargetSpec("onnxruntime", "1.10", "cpu")), opset_override=17)
    assert plan_opset(ExportConfig()).opset == 17


def test_yaml_opset_above_the_target_names_the_line():
    text = model_yaml(LENET, shape=(1, 8, 8), extra='export: {target: "onnxruntime@1.10", opset: 17}\n')
    with pytest.raises(DlcError) as info:
        load_model_text(text, "m.yaml")
    (d,) = info.value.diagnostics
    assert d.line is not None and "1.10" in d.message and "15" in d.message


def test_yaml_unknown_target_version_is_one_message_with_the_known_list():
    text = model_yaml(LENET, shape=(1, 8, 8), extra='export: {target: {version: "2.0"}}\n')
    with pytest.raises(DlcError) as info:
        load_model_text(text, "m.yaml")
    (d,) = info.value.diagnostics
    assert "2.0" in d.format() and "1.14" in d.format() and d.line is not None
