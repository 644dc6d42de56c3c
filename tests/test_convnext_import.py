"""ConvNeXt's block as torch.onnx writes it: a 7×7 depthwise conv, then channels-last LayerNorm, Linear, GELU,
Linear between two Transposes, a layer scale and the residual add. It imports as NCHW layers (layernorm, 1×1
convs, gelu, affine) that compute what onnxruntime computes, trains, and exports back."""

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from dlc.compiler.errors import DlcError
from dlc.compiler.export_onnx import to_onnx
from dlc.compiler.onnx_import import import_onnx
from dlc.compiler.train.executor import Executor

C, HW = 8, 6


def convnext_block(gelu: str = "erf", opset: int = 17, extra=None):
    """x (1×C×6×6) -> dwconv 7×7 -> [NHWC: LayerNorm -> Linear(C, 4C) -> GELU -> Linear(4C, C)] -> ×gamma -> + x."""
    rng = np.random.default_rng(0)
    t = numpy_helper.from_array
    inits = [t(rng.normal(0, 0.3, (C, 1, 7, 7)).astype(np.float32), "dw.w"),
             t(rng.normal(0, 0.1, C).astype(np.float32), "dw.b"),
             t(rng.normal(1, 0.3, C).astype(np.float32), "ln.s"), t(rng.normal(0, 0.3, C).astype(np.float32), "ln.b"),
             t(rng.normal(0, 0.4, (C, 4 * C)).astype(np.float32), "fc1.w"),
             t(rng.normal(0, 0.2, 4 * C).astype(np.float32), "fc1.b"),
             t(rng.normal(0, 0.3, (4 * C, C)).astype(np.float32), "fc2.w"),
             t(rng.normal(0, 0.2, C).astype(np.float32), "fc2.b"),
             t(rng.uniform(0.5, 1.5, (C, 1, 1)).astype(np.float32), "gamma"),
             t(np.array(math.sqrt(2.0), np.float32), "sqrt2"), t(np.array(1.0, np.float32), "one"),
             t(np.array(0.5, np.float32), "half")]
    nodes = [helper.make_node("Conv", ["x", "dw.w", "dw.b"], ["dw"], group=C, kernel_shape=[7, 7], pads=[3] * 4,
                              name="/block/dwconv/Conv"),
             helper.make_node("Transpose", ["dw"], ["nhwc"], perm=[0, 2, 3, 1], name="/block/Transpose"),
             helper.make_node("LayerNormalization", ["nhwc", "ln.s", "ln.b"], ["ln"], axis=-1, epsilon=1e-6,
                              name="/block/norm/LayerNormalization"),
             helper.make_node("MatMul", ["ln", "fc1.w"], ["mm1"], name="/block/pwconv1/MatMul"),
             helper.make_node("Add", ["fc1.b", "mm1"], ["h"], name="/block/pwconv1/Add")]
    if gelu == "erf":
        nodes += [helper.make_node("Div", ["h", "sqrt2"], ["g_d"], name="/block/act/Div"),
                  helper.make_node("Erf", ["g_d"], ["g_e"], name="/block/act/Erf"),
                  helper.make_node("Add", ["g_e", "one"], ["g_a"], name="/block/act/Add"),
                  helper.make_node("Mul", ["h", "g_a"], ["g_m"], name="/block/act/Mul"),
                  helper.make_node("Mul", ["g_m", "half"], ["act"], name="/block/act/Mul_1")]
    else:
        nodes.append(helper.make_node("Gelu", ["h"], ["act"], name="/block/act/Gelu"))
    nodes += [helper.make_node("MatMul", ["act", "fc2.w"], ["mm2"], name="/block/pwconv2/MatMul"),
              helper.make_node("Add", ["mm2", "fc2.b"], ["o"], name="/block/pwconv2/Add")]
    if extra is not None:
        nodes.append(extra)
    nodes += [helper.make_node("Transpose", [nodes[-1].output[0]], ["nchw"], perm=[0, 3, 1, 2],
                               name="/block/Transpose_1"),
              helper.make_node("Mul", ["gamma", "nchw"], ["scaled"], name="/block/Mul"),
              helper.make_node("Add", ["scaled", "x"], ["y"], name="/block/Add")]
    graph = helper.make_graph(nodes, "convnext", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, C, HW, HW])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, C, HW, HW])], inits)
    return helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", opset)])


def _check(model, graph):
    x = np.random.default_rng(1).normal(0, 1, (1, C, HW, HW)).astype(np.float32)
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = Executor(graph).forward(x)[graph.outputs[0]]
    np.testing.assert_allclose(got.reshape(want.shape), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    return x, want


@pytest.mark.parametrize("gelu, opset", [("erf", 17), ("gelu_node", 20)])
def test_a_convnext_block_imports_as_nchw_layers(gelu, opset):
    model = convnext_block(gelu, opset)
    onnx.checker.check_model(model, full_check=True)
    graph = import_onnx(model)
    assert [n.op for n in graph.nodes()] == ["conv", "layernorm", "conv", "gelu", "conv", "affine", "add"]
    fc1 = next(n for n in graph.nodes() if n.op == "conv" and n.attrs["out"] == 4 * C)
    assert fc1.attrs["kernel"] == (1, 1) and fc1.params["weight"].shape == (4 * C, C, 1, 1) and "bias" in fc1.params
    x, want = _check(model, graph)
    # and it goes back out to ONNX with the same function
    exported = to_onnx(graph)
    got = ort.InferenceSession(exported.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {exported.graph.input[0].name: x})[0]
    np.testing.assert_allclose(got.reshape(want.shape), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_the_imported_block_trains():
    graph = import_onnx(convnext_block())
    x = np.random.default_rng(2).normal(0, 1, (2, C, HW, HW)).astype(np.float32)
    ex = Executor(graph)
    ex.forward(x, train=True)
    grads = ex.backward({graph.outputs[0]: np.ones((2, C, HW, HW), np.float32)})
    ln = next(n.name for n in graph.nodes() if n.op == "layernorm")
    assert np.abs(grads[ln]["scale"]).max() > 0 and all(np.isfinite(g).all() for p in grads.values()
                                                         for g in p.values())


def test_an_op_the_chain_cannot_take_is_still_named():
    """A Softmax on the channels-last map is not a per-channel op: the chain is not taken and the usual
    handlers say what they cannot import."""
    model = convnext_block(extra=helper.make_node("Sqrt", ["o"], ["sq"], name="/block/odd/Sqrt"))
    with pytest.raises(DlcError, match="unsupported ONNX ops: .*Sqrt"):
        import_onnx(model)
