"""gelu: the native kernel against its numpy reference and finite differences, training through it, ONNX export
in both forms (Gelu from opset 20, the erf chain before) and import of both, including PyTorch's erf chain."""

import math
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from dlc._C import activation as _k
from dlc.compiler.errors import DlcError
from dlc.compiler.export_onnx import to_onnx
from dlc.compiler.onnx_import import import_onnx
from dlc.compiler.train.executor import Executor

from helpers import ROOT, check_param_grad, load, numeric_grad, randomize_weights

sys.path.insert(0, str(ROOT / "csrc"))
from activation_ref import gelu_backward_ref, gelu_forward_ref  # noqa: E402


def _inputs(n=5000, seed=0):
    rng = np.random.default_rng(seed)
    # magnitudes from 1e-3 to 10, both signs: the tails (y -> x, y -> 0) and the curved middle
    return (rng.choice([-1, 1], n) * 10 ** rng.uniform(-3, 1, n)).astype(np.float32)


def test_kernel_matches_the_reference():
    x = _inputs()
    dy = np.random.default_rng(1).normal(0, 1, x.shape).astype(np.float32)
    y, ref = _k.gelu_forward(x), gelu_forward_ref(x)
    np.testing.assert_allclose(y, ref, rtol=2e-6, atol=1e-7)
    np.testing.assert_allclose(_k.gelu_backward(dy, x), gelu_backward_ref(dy, x), rtol=2e-6, atol=1e-7)
    # known values: gelu(1) = Phi(1) = 0.841344746..., gelu(-1) = -(1 - Phi(1))
    np.testing.assert_allclose(_k.gelu_forward(np.array([1.0, -1.0, 0.0], np.float32)),
                               [0.8413447, -0.1586553, 0.0], rtol=1e-6, atol=1e-7)
    out = np.empty_like(x)  # in place into `out` gives the same result
    assert _k.gelu_forward(x, out=out) is out and np.array_equal(out, y)


def test_reference_gradient_matches_finite_differences():
    x = _inputs(200, seed=2).astype(np.float64)
    dy = np.random.default_rng(3).normal(0, 1, x.shape)

    def f(v):
        return float((gelu_forward_ref(v) * dy).sum())

    np.testing.assert_allclose(gelu_backward_ref(dy, x), numeric_grad(f, x.copy(), h=1e-6), rtol=1e-5, atol=1e-8)


LAYERS = """
- {name: conv, type: conv, out: 4, kernel: 3, pad: 1}
- {name: act, type: gelu}
- {name: pool, type: global_avgpool}
- {name: flat, type: flatten}
- {name: fc, type: linear, out: 3}
"""


def _graph():
    graph = load(LAYERS, shape=(2, 6, 6)).graph
    randomize_weights(graph, seed=4, gain=2.0)
    return graph


def test_training_gradient_through_gelu_matches_finite_differences():
    graph = _graph()
    x = np.random.default_rng(5).normal(0, 1, (3, 2, 6, 6)).astype(np.float32)
    seed = np.random.default_rng(6).normal(0, 1, (3, 3)).astype(np.float32)
    ex = Executor(graph)
    ex.forward(x, train=True)
    check_param_grad(ex, x, "fc", seed, "conv", "weight", ex.backward({"fc": seed})["conv"]["weight"])


@pytest.mark.parametrize("opset, ops", [(17, {"Div", "Erf", "Add", "Mul"}), (20, {"Gelu"})])
def test_export_runs_on_onnxruntime_and_imports_back(opset, ops):
    graph = _graph()
    x = np.random.default_rng(7).normal(0, 2, (2, 2, 6, 6)).astype(np.float32)
    want = Executor(graph).forward(x)["fc"]
    model = to_onnx(graph, opset=opset)
    assert ops <= {n.op_type for n in model.graph.node}
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {model.graph.input[0].name: x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    back = import_onnx(model)
    assert [n.op for n in back.nodes()] == ["conv", "gelu", "global_avgpool", "flatten", "linear"]
    np.testing.assert_allclose(Executor(back).forward(x)[back.outputs[0]], want, rtol=1e-5,
                               atol=1e-5 * np.abs(want).max())


def _torch_style(order_swapped=False, approximate=None):
    """Conv, then GELU as torch.onnx writes it before opset 20 (or a Gelu node when `approximate` is given)."""
    rng = np.random.default_rng(8)
    w = numpy_helper.from_array(rng.normal(0, 0.7, (3, 2, 3, 3)).astype(np.float32), "w")
    consts = [numpy_helper.from_array(np.array(v, np.float32), n) for n, v in
              (("sqrt2", math.sqrt(2.0)), ("one", 1.0), ("half", 0.5))]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="/conv/Conv")]
    if approximate is not None:
        nodes.append(helper.make_node("Gelu", ["c"], ["y"], approximate=approximate, name="/act/Gelu"))
        opset = 20
    else:
        nodes += [helper.make_node("Div", ["c", "sqrt2"], ["d"], name="/act/Div"),
                  helper.make_node("Erf", ["d"], ["e"], name="/act/Erf"),
                  helper.make_node("Add", ["one", "e"] if order_swapped else ["e", "one"], ["a"], name="/act/Add"),
                  helper.make_node("Mul", ["a", "c"] if order_swapped else ["c", "a"], ["m"], name="/act/Mul"),
                  helper.make_node("Mul", ["m", "half"], ["y"], name="/act/Mul_1")]
        opset = 17
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 5, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 5, 5])], [w, *consts])
    return helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", opset)])


@pytest.mark.parametrize("kind", ["erf_chain", "erf_chain_swapped", "gelu_node"])
def test_pytorch_style_gelu_imports_as_one_layer(kind):
    model = _torch_style(order_swapped=kind == "erf_chain_swapped",
                         approximate="none" if kind == "gelu_node" else None)
    graph = import_onnx(model)
    assert [n.op for n in graph.nodes()] == ["conv", "gelu"]
    x = np.random.default_rng(9).normal(0, 1.5, (1, 2, 5, 5)).astype(np.float32)
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = Executor(graph).forward(x)[graph.outputs[0]]
    np.testing.assert_allclose(got.reshape(want.shape), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_tanh_approximation_is_named_as_unsupported():
    with pytest.raises(DlcError, match=r"Gelu ×1 \(/act/Gelu\) \[approximate='tanh'"):
        import_onnx(_torch_style(approximate="tanh"))


def test_a_partial_erf_chain_is_not_taken_for_gelu():
    """x * (1 + erf(x / sqrt 2)) without the final 0.5 is not GELU: it stays an unsupported Erf."""
    model = _torch_style()
    model.graph.node[-1].input[1] = "one"  # * 1 instead of * 0.5
    with pytest.raises(DlcError, match="unsupported ONNX ops: Erf"):
        import_onnx(model)
    onnx.checker.check_model(model)
