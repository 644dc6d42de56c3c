"""layernorm over channels (ConvNeXt's LayerNorm2d): the native kernel against its numpy reference and finite
differences, training through it, ONNX export (LayerNormalization from opset 17, the ReduceMean form before) and
import of both PyTorch forms: a flat LayerNorm and Transpose -> LayerNormalization -> Transpose."""

import sys

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from dlc._C import layernorm as _k
from dlc.compiler.errors import DlcError
from dlc.compiler.export_onnx import to_onnx
from dlc.compiler.onnx_import import import_onnx
from dlc.compiler.train.executor import Executor

from helpers import ROOT, check_param_grad, load, numeric_grad, randomize_weights

sys.path.insert(0, str(ROOT / "csrc"))
from layernorm_ref import layernorm_backward_ref, layernorm_forward_ref  # noqa: E402


def _data(shape, seed):
    rng = np.random.default_rng(seed)
    # positions of very different scale and offset: a wrong axis or a missing mean shows
    x = rng.normal(0, 1, shape) * rng.uniform(0.05, 8, (shape[0], 1, *shape[2:])) + rng.normal(0, 3, shape[1:2] +
                                                                                               (1,) * (len(shape) - 2))
    c = shape[1]
    return x.astype(np.float32), rng.normal(1, 0.4, c).astype(np.float32), rng.normal(0, 0.5, c).astype(np.float32)


@pytest.mark.parametrize("shape", [(3, 7, 5, 4), (6, 9), (1, 1, 3, 3), (2, 64, 12, 12)])
def test_kernel_matches_the_reference(shape):
    x, g, b = _data(shape, 0)
    y, mean, invstd = _k.layernorm_forward(x, g, b, 1e-6)
    yr, mr, ir = layernorm_forward_ref(x, g, b, 1e-6)
    np.testing.assert_allclose(y, yr, rtol=1e-6, atol=1e-6 * np.abs(yr).max())
    np.testing.assert_allclose(invstd, ir, rtol=1e-6)
    # each position has mean 0 and variance 1 over the channels before the affine
    xhat = (y - b.reshape((1, -1) + (1,) * (len(shape) - 2))) / g.reshape((1, -1) + (1,) * (len(shape) - 2))
    if shape[1] > 1:
        np.testing.assert_allclose(xhat.mean(axis=1), 0, atol=1e-4)
        np.testing.assert_allclose(xhat.var(axis=1), 1, rtol=1e-3)
    dy = np.random.default_rng(1).normal(0, 1, shape).astype(np.float32)
    dx, dg, db = _k.layernorm_backward(dy, x, g, mean, invstd)
    dxr, dgr, dbr = layernorm_backward_ref(dy, x, g, mean, invstd)
    for got, want in ((dx, dxr), (dg, dgr), (db, dbr)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_reference_gradients_match_finite_differences():
    x, g, b = (a.astype(np.float64) for a in _data((2, 5, 3, 2), 2))
    dy = np.random.default_rng(3).normal(0, 1, x.shape)

    def loss(xv, gv, bv):
        return float((layernorm_forward_ref(xv, gv, bv, 1e-5)[0] * dy).sum())

    _, mean, invstd = layernorm_forward_ref(x, g, b, 1e-5)
    dx, dg, db = layernorm_backward_ref(dy, x, g, mean, invstd)
    np.testing.assert_allclose(dx, numeric_grad(lambda v: loss(v, g, b), x.copy()), rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(dg, numeric_grad(lambda v: loss(x, v, b), g.copy()), rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(db, numeric_grad(lambda v: loss(x, g, v), b.copy()), rtol=1e-5, atol=1e-8)


LAYERS = """
- {name: conv, type: conv, out: 6, kernel: 3, pad: 1}
- {name: ln, type: layernorm}
- {name: pool, type: global_avgpool}
- {name: flat, type: flatten}
- {name: ln_flat, type: layernorm, eps: 1e-5}
- {name: fc, type: linear, out: 3}
"""


def _graph():
    graph = load(LAYERS, shape=(2, 6, 6)).graph
    randomize_weights(graph, seed=4, gain=2.0)
    for name in ("ln", "ln_flat"):
        node = graph.node(name)
        rng = np.random.default_rng(len(name))
        node.params["scale"][...] = rng.normal(1, 0.4, node.params["scale"].shape)
        node.params["bias"][...] = rng.normal(0, 0.5, node.params["bias"].shape)
    return graph


def test_training_gradients_through_layernorm_match_finite_differences():
    graph = _graph()
    x = np.random.default_rng(5).normal(0, 1, (3, 2, 6, 6)).astype(np.float32)
    seed = np.random.default_rng(6).normal(0, 1, (3, 3)).astype(np.float32)
    ex = Executor(graph)
    ex.forward(x, train=True)
    grads = ex.backward({"fc": seed})
    for layer, tensor in (("conv", "weight"), ("ln", "scale"), ("ln_flat", "bias")):
        check_param_grad(ex, x, "fc", seed, layer, tensor, grads[layer][tensor])


@pytest.mark.parametrize("opset, ops", [(13, {"ReduceMean", "Sqrt"}), (17, {"LayerNormalization", "Transpose"})])
def test_export_runs_on_onnxruntime(opset, ops):
    graph = _graph()
    x = np.random.default_rng(7).normal(0, 2, (2, 2, 6, 6)).astype(np.float32)
    want = Executor(graph).forward(x)["fc"]
    model = to_onnx(graph, opset=opset)
    assert ops <= {n.op_type for n in model.graph.node}
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {model.graph.input[0].name: x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    if opset >= 17:  # both forms PyTorch writes import back as the same layers
        back = import_onnx(model)
        assert [n.op for n in back.nodes()] == ["conv", "layernorm", "global_avgpool", "flatten", "layernorm",
                                                "linear"]
        np.testing.assert_allclose(Executor(back).forward(x)[back.outputs[0]], want, rtol=1e-5,
                                   atol=1e-5 * np.abs(want).max())


def test_layernorm_over_more_than_the_channels_is_named_unsupported():
    """LayerNormalization(axis=1) of an NCHW map normalises C, H and W together (GroupNorm(1)): not ours."""
    rng = np.random.default_rng(8)
    inits = [numpy_helper.from_array(rng.normal(1, 0.1, (3, 4, 4)).astype(np.float32), "s"),
             numpy_helper.from_array(np.zeros((3, 4, 4), np.float32), "b")]
    node = helper.make_node("LayerNormalization", ["x", "s", "b"], ["y"], axis=1, name="ln")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 4, 4])], inits)
    model = helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(DlcError, match=r"LayerNormalization ×1 \(ln\) \[it normalises more than the channel axis"):
        import_onnx(model)
