"""sub, div, reshape and transpose end to end: shape inference and its errors, ONNX export against onnxruntime,
the executor and numpy, gradients against finite differences, and ONNX import of hand-built models (the
ShuffleNet channel shuffle among them) and of a PyTorch export."""

import re

import numpy as np
import pytest
from onnx import helper, numpy_helper
from test_more_ops import _check_gradients, _check_import, _export_matches, _model, _rand, _torch_import

from dlc.compiler.analysis import summarize
from dlc.compiler.errors import DlcError
from dlc.compiler.frontend import load_model_text
from dlc.compiler.onnx_import import import_onnx
from dlc.compiler.train.executor import Executor
from dlc.compiler.yaml_writer import graph_to_yaml

from helpers import errors_of, load, model_yaml

# ---------------------------------------------------------------------------------------------------------
# sub and div

GATED = """
- {name: c, type: conv, out: 3, kernel: 3, pad: 1}
- {name: g, type: global_avgpool}
- {name: s, type: sigmoid}
- {name: o, type: OP, inputs: [c, s]}
"""


@pytest.mark.parametrize("op", ["sub", "div"])
def test_sub_div_shapes_and_errors(op):
    graph = load(GATED.replace("OP", op), shape=(3, 6, 5)).graph
    assert graph.shapes["o"] == (3, 6, 5)
    bad = f"- {{name: g, type: global_avgpool}}\n- {{name: m, type: {op}, inputs: [g, input]}}"
    messages = errors_of(model_yaml(bad, shape=(3, 4, 4)))
    assert any("3×1×1, 3×4×4" in e for e in messages), messages


def test_sub_div_export_and_formula():
    x = _rand((2, 3, 4, 5))
    graph = load(
        "- {name: g, type: global_avgpool}\n- {name: m, type: sub, inputs: [input, g]}", shape=(3, 4, 5)
    )
    model = _export_matches(graph.graph, x, x - x.mean(axis=(2, 3), keepdims=True))
    assert [n.op_type for n in model.graph.node] == ["GlobalAveragePool", "Sub"]
    graph = load("- {name: a, type: sigmoid}\n- {name: m, type: div, inputs: [input, a]}", shape=(3, 4, 5))
    model = _export_matches(graph.graph, x, x / (1 / (1 + np.exp(-x))))
    assert [n.op_type for n in model.graph.node] == ["Sigmoid", "Div"]
    graph = load("- {name: a, type: tanh}\n- {name: m, type: sub, inputs: [a, input]}", shape=(3, 4, 5))
    _export_matches(graph.graph, x, np.tanh(x) - x)


@pytest.mark.parametrize("op", ["sub", "div"])
def test_sub_div_gradients(op):
    _check_gradients(load(GATED.replace("OP", op), shape=(3, 6, 5)).graph, _rand((3, 3, 6, 5), 1, 2.0))
    same = f"- {{name: a, type: sigmoid}}\n- {{name: m, type: {op}, inputs: [input, a]}}"
    _check_gradients(load(same, shape=(3, 5, 5)).graph, _rand((2, 3, 5, 5), 2))


def test_sub_div_import_hand_built():
    nodes = [
        helper.make_node("GlobalAveragePool", ["x"], ["g"], name="gap"),
        helper.make_node("Sub", ["x", "g"], ["c"], name="centre"),
        helper.make_node("Sigmoid", ["c"], ["s"], name="sig"),
        helper.make_node("Div", ["c", "s"], ["y"], name="quot"),
    ]
    graph = _check_import(_model(nodes), ["global_avgpool", "sub", "sigmoid", "div"])
    assert graph.node("centre").inputs == [graph.inputs[0].name, "gap"]
    with pytest.raises(DlcError, match=r"Sub ×1 \(back\) \[broadcasts 4×1×1 with 4×6×6"):
        import_onnx(_model([*nodes[:1], helper.make_node("Sub", ["g", "x"], ["y"], name="back")]))
    with pytest.raises(DlcError, match="divides by a constant"):
        import_onnx(
            _model([helper.make_node("Div", ["x", "k"], ["y"], name="k")], [("k", np.full((4, 6, 6), 2.0))])
        )


# ---------------------------------------------------------------------------------------------------------
# reshape and transpose

SHUFFLE = """
- {name: c, type: conv, out: 6, kernel: 3, pad: 1}
- {name: r1, type: reshape, shape: [2, 3, 5, 4]}
- {name: t, type: transpose, perm: [1, 0, 2, 3]}
- {name: r2, type: reshape, shape: [-1, 5, 4]}
- {name: o, type: conv, out: 4, kernel: 1}
"""


def _shuffle_ref(x, groups):
    n, c, h, w = x.shape
    return x.reshape(n, groups, c // groups, h, w).transpose(0, 2, 1, 3, 4).reshape(n, c, h, w)


def test_reshape_transpose_shapes_and_errors():
    graph = load(SHUFFLE, shape=(3, 5, 4)).graph
    assert graph.shapes["r1"] == (2, 3, 5, 4)
    assert graph.shapes["t"] == (3, 2, 5, 4)
    assert graph.shapes["r2"] == (6, 5, 4)
    graph = load(
        "- {name: r, type: reshape, shape: [-1]}\n- {name: t, type: transpose, perm: [0]}", (2, 3, 4)
    ).graph
    assert graph.shapes["t"] == (24,)
    graph = load("- {name: t, type: transpose, perm: [2, 0, 1]}", shape=(2, 3, 4)).graph
    assert graph.shapes["t"] == (4, 2, 3)
    cases = {
        "- {name: r, type: reshape, shape: [5, 5]}": "cannot reshape 2×3×4 (24 elements) to 5×5 (25 elements)",
        "- {name: r, type: reshape, shape: [-1, 5]}": "24 is not a multiple of 5",
        "- {name: r, type: reshape, shape: [-1, -1]}": "one -1 entry",
        "- {name: r, type: reshape, shape: [0, 24]}": "positive or -1",
        "- {name: r, type: reshape, shape: 24}": "list of integers",
        "- {name: r, type: reshape}": "missing required parameter 'shape'",
        "- {name: t, type: transpose, perm: [0, 2, 2]}": "permutation of 0..2",
        "- {name: t, type: transpose, perm: [1, 0]}": "perm [1, 0] has 2 axes; the input 2×3×4 has 3",
        "- {name: t, type: transpose, perm: [1, 0]}\n- {name: c, type: conv, out: 2, kernel: 1}": "t",
    }
    for layers, want in cases.items():
        messages = errors_of(model_yaml(layers, shape=(2, 3, 4)))
        assert any(want in m for m in messages), (layers, messages)
    # A conv after a rank-4 value says what it got.
    bad = "- {name: r, type: reshape, shape: [2, 1, 3, 4]}\n- {name: c, type: conv, out: 2, kernel: 1}"
    assert errors_of(model_yaml(bad, shape=(2, 3, 4)))


def test_reshape_transpose_export_and_formula():
    x = _rand((2, 3, 5, 4))
    graph = load(
        "- {name: r1, type: reshape, shape: [3, 1, 20]}\n- {name: t, type: transpose, perm: [2, 0, 1]}",
        shape=(3, 5, 4),
    ).graph
    model = _export_matches(graph, x, x.reshape(2, 3, 1, 20).transpose(0, 3, 1, 2))
    assert [n.op_type for n in model.graph.node] == ["Reshape", "Transpose"]
    shuffle = """
- {name: r1, type: reshape, shape: [3, 2, 5, 4]}
- {name: t, type: transpose, perm: [1, 0, 2, 3]}
- {name: r2, type: reshape, shape: [6, -1, 4]}
"""
    x = _rand((3, 6, 5, 4), 1)
    _export_matches(load(shuffle, shape=(6, 5, 4)).graph, x, _shuffle_ref(x, 3))
    graph = load("- {name: t, type: transpose, perm: [0, 2, 1]}\n- {name: f, type: flatten}", (3, 5, 4)).graph
    x = _rand((2, 3, 5, 4), 2)
    _export_matches(graph, x, x.transpose(0, 1, 3, 2).reshape(2, -1))


def test_reshape_transpose_gradients():
    _check_gradients(load(SHUFFLE, shape=(3, 5, 4)).graph, _rand((2, 3, 5, 4), 3))
    layers = """
- {name: c, type: conv, out: 4, kernel: 3, pad: 1}
- {name: t, type: transpose, perm: [2, 0, 1]}
- {name: r, type: reshape, shape: [16, -1]}
- {name: s, type: tanh}
- {name: f, type: flatten}
- {name: l, type: linear, out: 3}
"""
    _check_gradients(load(layers, shape=(2, 4, 4)).graph, _rand((3, 2, 4, 4), 4))


def test_reshape_transpose_analysis():
    """The channel shuffle keeps H and W in place: the receptive field passes through it unchanged."""
    graph = load(SHUFFLE, shape=(3, 5, 4)).graph
    layers = {layer.name: layer for layer in summarize(graph).layers}
    assert layers["r2"].rf_size == layers["t"].rf_size == layers["c"].rf_size == [3.0, 3.0]
    graph = load(
        "- {name: c, type: conv, out: 2, kernel: 3}\n- {name: t, type: transpose, perm: [0, 2, 1]}", (1, 5, 6)
    ).graph
    layers = {layer.name: layer for layer in summarize(graph).layers}
    assert layers["t"].rf_size == [5.0, 6.0]  # H and W swapped: every feature may see the whole 3×4 map


# ---------------------------------------------------------------------------------------------------------
# import: Reshape, Squeeze, Unsqueeze and Transpose


def _ints(name, values):
    return (name, np.asarray(values, np.int64))


def _model_i64(nodes, ints, shape):
    """_model with int64 initializers (shapes and axes)."""
    model = _model(nodes, shape=shape)
    model.graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in ints)
    return model


def test_channel_shuffle_import_hand_built():
    w = _rand((6, 6, 1, 1), 5, 0.5)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
        helper.make_node("Reshape", ["c", "s1"], ["r1"], name="split"),
        helper.make_node("Transpose", ["r1"], ["t"], name="shuffle", perm=[0, 2, 1, 3, 4]),
        helper.make_node("Reshape", ["t", "s2"], ["r2"], name="join"),
        helper.make_node("Relu", ["r2"], ["y"], name="relu"),
    ]
    model = _model_i64(nodes, [_ints("s1", [0, 2, 3, 5, 4]), _ints("s2", [-1, 6, 5, 4])], (6, 5, 4))
    model.graph.initializer.append(numpy_helper.from_array(w, "w"))
    graph = _check_import(model, ["conv", "reshape", "transpose", "reshape", "relu"], shape=(6, 5, 4))
    assert graph.node("split").attrs["shape"] == (2, 3, 5, 4)
    assert graph.node("shuffle").attrs["perm"] == (1, 0, 2, 3)
    assert graph.node("join").attrs["shape"] == (6, 5, 4)
    x = _rand((2, 6, 5, 4), 6)
    conv = np.einsum("nchw,oc->nohw", x, w[:, :, 0, 0])
    got = Executor(graph).forward(x)[graph.outputs[0]]
    np.testing.assert_allclose(got, np.maximum(_shuffle_ref(conv, 2), 0), rtol=1e-5, atol=1e-5)
    # The YAML writer writes the new parameters, and the YAML loads back to the same graph.
    text = graph_to_yaml(graph, None)
    assert "shape: [2, 3, 5, 4]" in text and "perm: [1, 0, 2, 3]" in text
    again = load_model_text(text, "m.yaml").graph
    assert [(n.op, n.attrs) for n in again.nodes()] == [(n.op, n.attrs) for n in graph.nodes()]


def test_squeeze_unsqueeze_transpose_import():
    nodes = [
        helper.make_node("Unsqueeze", ["x", "a1"], ["u"], name="unsq"),  # 4×6×6 -> 4×1×6×6
        helper.make_node("Transpose", ["u"], ["t"], name="tr", perm=[0, 3, 2, 1, 4]),  # -> 6×1×4×6
        helper.make_node("Squeeze", ["t", "a2"], ["q"], name="sq"),  # -> 6×4×6
        helper.make_node("Transpose", ["q"], ["y"], name="same", perm=[0, 1, 2, 3]),  # the identity: left out
    ]
    model = _model_i64(nodes, [_ints("a1", [-3]), _ints("a2", [2])], (4, 6, 6))
    graph = _check_import(model, ["reshape", "transpose", "reshape"])
    assert graph.node("unsq").attrs["shape"] == (4, 1, 6, 6)
    assert graph.shapes[graph.outputs[0]] == (6, 4, 6)
    # Opset 11: axes are attributes; a C×1×1 squeeze is still flatten, and Reshape [N, -1] is still flatten.
    nodes = [
        helper.make_node("GlobalAveragePool", ["x"], ["g"], name="gap"),
        helper.make_node("Squeeze", ["g"], ["v"], name="sq", axes=[2, 3]),
        helper.make_node("Unsqueeze", ["v"], ["u"], name="unsq", axes=[1]),
        helper.make_node("Reshape", ["u", "s"], ["y"], name="flat"),
    ]
    model = _model_i64(nodes, [_ints("s", [0, -1])], (4, 6, 6))
    model.opset_import[0].version = 11
    _check_import(model, ["global_avgpool", "flatten", "reshape", "flatten"])


def test_reshape_transpose_import_errors():
    cases = [
        (
            [helper.make_node("Transpose", ["x"], ["y"], name="t", perm=[1, 0, 2, 3])],
            [],
            "batch axis stays first",
        ),
        ([helper.make_node("Transpose", ["x"], ["y"], name="t")], [], "perm [3, 2, 1, 0]"),
        ([helper.make_node("Reshape", ["x", "s"], ["y"], name="r")], [_ints("s", [2, -1])], "batch axis"),
        ([helper.make_node("Reshape", ["x", "s"], ["y"], name="r")], [_ints("s", [-1, 4, 6])], "batch axis"),
        (
            [helper.make_node("Reshape", ["x", "s"], ["y"], name="r")],
            [_ints("s", [0, 5, -1])],
            "144 elements",
        ),
        ([helper.make_node("Squeeze", ["x", "a"], ["y"], name="q")], [_ints("a", [0])], "not the batch"),
        ([helper.make_node("Squeeze", ["x", "a"], ["y"], name="q")], [_ints("a", [1])], "of size 1"),
        ([helper.make_node("Squeeze", ["x"], ["y"], name="q")], [], "axes None"),
        ([helper.make_node("Unsqueeze", ["x", "a"], ["y"], name="u")], [_ints("a", [0])], "before the batch"),
    ]
    for nodes, ints, want in cases:
        with pytest.raises(DlcError, match=re.escape(want)):
            import_onnx(_model_i64(nodes, ints, (4, 6, 6)))
    # A batch-preserving Reshape with the batch written out, and -1 first with the rest static, both import.
    for s in ([-1, 4, 36], [-1, 2, 2, 6, 6]):
        nodes = [helper.make_node("Reshape", ["x", "s"], ["y"], name="r")]
        _check_import(_model_i64(nodes, [_ints("s", s)], (4, 6, 6)), ["reshape"])


@pytest.mark.parametrize("live", [False, True], ids=["fixture", "live_torch"])
def test_shufflenet_unit_import_pytorch(live):
    """A ShuffleNet (v1) unit: grouped 1×1 conv, channel shuffle by x.view(n, g, c // g, h, w) and
    transpose(1, 2), depthwise 3×3, grouped 1×1 conv, residual add; then a tail of unsqueeze, squeeze, permute and
    x.reshape(n, -1), whose batch size PyTorch computes with Shape and Gather (tests/fixtures/make_torch_fixtures.py:
    the committed export, or live one by the installed torch)."""
    graph = _torch_import("shufflenet", live)
    ops = [n.op for n in graph.nodes()]
    assert "transpose" in ops and "reshape" in ops, ops
