"""The backend's forward against the test data that ships inside the onnx wheel (models exported from PyTorch,
with their inputs and expected outputs): every case made only of ops dlc has, in 2-D, must match."""

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from dlc.compiler.analysis import infer_shapes
from dlc.compiler.errors import DlcError
from dlc.compiler.graph import Graph, Node, ValueInfo
from dlc.compiler.train.executor import Executor

DATA = Path(onnx.__file__).parent / "backend/test/data"
CASES = sorted(p for d in ("pytorch-converted", "pytorch-operator") for p in (DATA / d).glob("test_*")
               if (p / "model.onnx").exists())


class Unsupported(Exception):
    pass


def _attrs(node):
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _pair(values, default):
    values = list(values) if values else [default, default]
    if len(values) != 2:
        raise Unsupported("not 2-D")
    return tuple(int(v) for v in values)


def to_graph(model: onnx.ModelProto) -> Graph:
    """A tiny ONNX -> IR translation for the ops the backend has (the full importer is another job)."""
    init = {t.name: numpy_helper.to_array(t).astype(np.float32) for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in init]
    if len(inputs) != 1:
        raise Unsupported("inputs")
    dims = [d.dim_value for d in inputs[0].type.tensor_type.shape.dim]
    graph = Graph("case", [ValueInfo(inputs[0].name, tuple(dims[1:]))])
    for i, n in enumerate(model.graph.node):
        a = _attrs(n)
        name = n.name or f"n{i}"
        if n.op_type == "Conv":
            w = init[n.input[1]]
            if w.ndim != 4:
                raise Unsupported("conv not 2-D")
            pads = tuple(int(p) for p in a.get("pads", [0, 0, 0, 0]))
            attrs = {"out": w.shape[0], "kernel": tuple(w.shape[2:]), "stride": _pair(a.get("strides"), 1),
                     "pad": pads, "dilation": _pair(a.get("dilations"), 1), "groups": int(a.get("group", 1)),
                     "bias": len(n.input) > 2}
            params = {"weight": w, **({"bias": init[n.input[2]]} if len(n.input) > 2 else {})}
            node = Node(name, "conv", [n.input[0]], [n.output[0]], attrs, params)
        elif n.op_type in ("MaxPool", "AveragePool"):
            if any(d != 1 for d in a.get("dilations", [1, 1])) or a.get("auto_pad", b"NOTSET") != b"NOTSET":
                raise Unsupported("pool dilation / auto_pad")
            kernel = _pair(a["kernel_shape"], 1)
            attrs = {"kernel": kernel, "stride": _pair(a.get("strides"), 1),
                     "pad": tuple(int(p) for p in a.get("pads", [0, 0, 0, 0])),
                     "ceil_mode": bool(a.get("ceil_mode", 0))}
            op = "maxpool" if n.op_type == "MaxPool" else "avgpool"
            if op == "avgpool":
                attrs["count_include_pad"] = bool(a.get("count_include_pad", 0))
            node = Node(name, op, [n.input[0]], [n.output[0]], attrs)
        elif n.op_type == "BatchNormalization":
            params = {k: init[v] for k, v in zip(("scale", "bias", "mean", "var"), n.input[1:])}
            node = Node(name, "batchnorm", [n.input[0]], [n.output[0]],
                        {"eps": float(a.get("epsilon", 1e-5)), "momentum": 0.1}, params)
        elif n.op_type in ("Relu", "Sigmoid", "Tanh"):
            node = Node(name, n.op_type.lower(), [n.input[0]], [n.output[0]])
        elif n.op_type == "LeakyRelu":
            node = Node(name, "leaky_relu", [n.input[0]], [n.output[0]], {"slope": float(a.get("alpha", 0.01))})
        elif n.op_type == "Softmax" and a.get("axis", 1) in (1, -1) and len(dims) == 2:
            node = Node(name, "softmax", [n.input[0]], [n.output[0]])
        elif n.op_type == "Gemm" and a.get("alpha", 1.0) == 1.0 and a.get("beta", 1.0) == 1.0 \
                and not a.get("transA", 0) and n.input[1] in init:
            w = init[n.input[1]] if a.get("transB", 0) else init[n.input[1]].T.copy()
            params = {"weight": w, **({"bias": init[n.input[2]]} if len(n.input) > 2 else {})}
            node = Node(name, "linear", [n.input[0]], [n.output[0]], {"out": w.shape[0], "bias": len(n.input) > 2},
                        params)
        elif n.op_type == "Flatten" and a.get("axis", 1) == 1:
            node = Node(name, "flatten", [n.input[0]], [n.output[0]])
        else:
            raise Unsupported(n.op_type)
        graph.add_node(node)
    graph.outputs = [o.name for o in model.graph.output]
    infer_shapes(graph)
    return graph


def _load_case(case: Path):
    model = onnx.load(case / "model.onnx")
    graph = to_graph(model)
    data = case / "test_data_set_0"
    x = numpy_helper.to_array(onnx.load_tensor(str(data / "input_0.pb")))
    y = numpy_helper.to_array(onnx.load_tensor(str(data / "output_0.pb")))
    return graph, x, y


# Every case this translation and dlc's ops take, by name: a case that starts to raise, or leaves the wheel's data,
# fails test_backend_forward_matches_onnx_test_data instead of being left out.
EXPECTED = [
    "test_AvgPool2d", "test_AvgPool2d_stride", "test_BatchNorm2d_eval", "test_BatchNorm2d_momentum_eval",
    "test_Conv2d", "test_Conv2d_depthwise", "test_Conv2d_depthwise_padded", "test_Conv2d_depthwise_strided",
    "test_Conv2d_depthwise_with_multiplier", "test_Conv2d_dilated", "test_Conv2d_groups", "test_Conv2d_groups_thnn",
    "test_Conv2d_no_bias", "test_Conv2d_padding", "test_Conv2d_strided", "test_LeakyReLU",
    "test_LeakyReLU_with_negval", "test_Linear", "test_MaxPool2d", "test_ReLU", "test_Sigmoid", "test_Softmax",
    "test_Tanh", "test_softmax_lastdim", "test_operator_conv", "test_operator_flatten", "test_operator_view",
]
# The cases dlc rejects on purpose, with the message: batch norm over 1-D sequences and 3-D volumes.
REJECTED = {
    "test_BatchNorm1d_3d_input_eval": "expects C×H×W or a flat vector, got 5×3",
    "test_BatchNorm3d_eval": "expects C×H×W or a flat vector, got 3×4×4×4",
    "test_BatchNorm3d_momentum_eval": "expects C×H×W or a flat vector, got 3×4×4×4",
}


def _outcome(case: Path) -> str:
    """'ok', 'unsupported' (an op or form the translation leaves out) or the error a case raises."""
    try:
        _load_case(case)
    except Unsupported:
        return "unsupported"
    except DlcError as exc:
        return str(exc)
    return "ok"


def test_the_cases_covered_are_the_expected_ones():
    outcomes = {c.name: _outcome(c) for c in CASES}
    assert len(CASES) >= 100  # the wheel ships its PyTorch test data
    assert sorted(n for n, o in outcomes.items() if o == "ok") == sorted(EXPECTED)
    errors = {n: o for n, o in outcomes.items() if o not in ("ok", "unsupported")}
    assert errors.keys() == REJECTED.keys(), errors
    for name, message in REJECTED.items():
        assert message in errors[name], (name, errors[name])


@pytest.mark.parametrize("name", EXPECTED)
def test_backend_forward_matches_onnx_test_data(name):
    case = next((c for c in CASES if c.name == name), None)
    assert case is not None, f"{name} is not in the onnx wheel's test data"
    graph, x, expected = _load_case(case)
    got = Executor(graph).forward(x.astype(np.float32))[graph.outputs[0]]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
