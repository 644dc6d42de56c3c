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


def _supported():
    out = []
    for case in CASES:
        try:
            _load_case(case)
        except (Unsupported, KeyError, ValueError, DlcError):  # DlcError: a shape dlc's ops do not take
            continue
        out.append(case)
    return out


SUPPORTED = _supported()


def test_enough_cases_are_covered():
    names = {c.name for c in SUPPORTED}
    assert len(SUPPORTED) >= 15, names
    for must in ("test_Conv2d_depthwise_with_multiplier", "test_Conv2d_dilated", "test_MaxPool2d",
                 "test_BatchNorm2d_eval", "test_AvgPool2d_stride", "test_Linear"):
        assert must in names


@pytest.mark.parametrize("case", SUPPORTED, ids=lambda c: c.name)
def test_backend_forward_matches_onnx_test_data(case):
    graph, x, expected = _load_case(case)
    got = Executor(graph).forward(x.astype(np.float32))[graph.outputs[0]]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
