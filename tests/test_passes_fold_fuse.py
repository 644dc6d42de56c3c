"""fold_bn, fold_scale, fuse_bias and fuse_pad: each fires where it is exact (proven through onnxruntime) and
leaves the graph alone where it is not."""

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from dlc.compiler.passes import optimize, verify

from helpers import torch_fixture, torch_nets

RNG = np.random.default_rng(7)
F = TensorProto.FLOAT


def _w(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def _model(nodes, inputs, outputs, inits, opset=17):
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(i[0], i[2] if len(i) > 2 else F, i[1]) for i in inputs],
        [
            helper.make_tensor_value_info(*((n, F, None) if isinstance(n, str) else (n[0], F, n[1])))
            for n in outputs
        ],
        initializer=[numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    inferred = onnx.shape_inference.infer_shapes(model).graph.output  # the checker wants output shapes
    for out, known in zip(model.graph.output, inferred):
        if known.type.tensor_type.HasField("shape"):
            out.CopyFrom(known)
    onnx.checker.check_model(model, full_check=True)
    return model


def _bn(x, y, c, prefix="bn", **attrs):
    """A BatchNormalization node with random non-trivial statistics and its initializers."""
    names = [f"{prefix}_{k}" for k in ("scale", "B", "mean", "var")]
    values = [
        RNG.uniform(0.5, 2.0, c) * RNG.choice([-1, 1], c),
        RNG.standard_normal(c),
        RNG.standard_normal(c),
        RNG.uniform(0.2, 3.0, c),
    ]
    inits = {k: v.astype(np.float32) for k, v in zip(names, values)}
    return helper.make_node("BatchNormalization", [x, *names], [y], epsilon=1e-3, **attrs), inits


def _run(model, name, rewrites):
    """Run one pass; check the count, the ONNX checker and the numbers; return the op types after."""
    after, reports = optimize(model, [name])
    assert reports[0].rewrites == rewrites
    onnx.checker.check_model(after, full_check=True)
    verify(model, after, rtol=1e-4, atol=1e-4)
    assert [o.name for o in after.graph.output] == [o.name for o in model.graph.output]
    assert [i.name for i in after.graph.input] == [i.name for i in model.graph.input]
    return [n.op_type for n in after.graph.node], after


def _unchanged(model, name):
    after, reports = optimize(model, [name])
    assert reports[0].rewrites == 0
    key = sorted(n.SerializeToString() for n in model.graph.node)
    assert sorted(n.SerializeToString() for n in after.graph.node) == key
    assert {t.name for t in after.graph.initializer} == {t.name for t in model.graph.initializer}


# --- fold_bn ------------------------------------------------------------------------------------------------
def _conv_bn(cin=4, cout=6, group=1, bias=True, op="Conv"):
    wshape = (cout, cin // group, 3, 3) if op == "Conv" else (cin, cout // group, 3, 3)
    inits = {"W": _w(*wshape)}
    if bias:
        inits["b"] = _w(cout)
    conv = helper.make_node(op, ["x", "W"] + (["b"] if bias else []), ["c"], group=group, pads=[1, 1, 1, 1])
    bn, bn_inits = _bn("c", "y", cout)
    relu = helper.make_node("Relu", ["y"], ["z"])
    return _model([conv, bn, relu], [("x", [2, cin, 7, 7])], ["z"], {**inits, **bn_inits})


@pytest.mark.parametrize(
    "cin, cout, group, bias",
    [(4, 6, 1, True), (4, 6, 1, False), (4, 6, 2, True), (4, 4, 4, False), (4, 8, 4, True)],
    ids=["conv", "conv-no-bias", "grouped", "depthwise", "depthwise-x2"],
)
def test_fold_bn_into_conv(cin, cout, group, bias):
    ops, after = _run(_conv_bn(cin, cout, group, bias), "fold_bn", 1)
    assert ops == ["Conv", "Relu"]
    assert len(after.graph.node[0].input) == 3  # a bias was added where there was none


@pytest.mark.parametrize("group, bias", [(1, True), (2, False), (2, True)])
def test_fold_bn_into_conv_transpose(group, bias):
    ops, _ = _run(_conv_bn(4, 6, group, bias, op="ConvTranspose"), "fold_bn", 1)
    assert ops == ["ConvTranspose", "Relu"]


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("c_shape", [None, (5,), (1, 5), (3, 1), ()], ids=["noC", "N", "1N", "M1", "scalar"])
def test_fold_bn_into_gemm(trans_b, c_shape):
    inits = {"B": _w(5, 4) if trans_b else _w(4, 5)}
    inputs = ["a", "B"]
    if c_shape is not None:
        inits["C"] = _w(*c_shape)
        inputs.append("C")
    gemm = helper.make_node("Gemm", inputs, ["g"], transB=trans_b, alpha=0.7, beta=1.3)
    bn, bn_inits = _bn("g", "y", 5)
    model = _model([gemm, bn], [("a", [3, 4])], ["y"], {**inits, **bn_inits})
    ops, after = _run(model, "fold_bn", 1)
    assert ops == ["Gemm"]
    assert {a.name: helper.get_attribute_value(a) for a in after.graph.node[0].attribute}["alpha"] == 1.0


def test_fold_bn_into_matmul_adds_the_bias():
    mm = helper.make_node("MatMul", ["a", "W"], ["m"])
    bn, bn_inits = _bn("m", "y", 5)
    model = _model([mm, bn], [("a", [3, 4])], ["y"], {"W": _w(4, 5), **bn_inits})
    ops, _ = _run(model, "fold_bn", 1)
    assert ops == ["MatMul", "Add"]


def test_fold_bn_statistics_from_constant_nodes():
    conv = helper.make_node("Conv", ["x", "W"], ["c"])
    bn, bn_inits = _bn("c", "y", 6)
    consts = [
        helper.make_node("Constant", [], [k], value=numpy_helper.from_array(v, k))
        for k, v in bn_inits.items()
    ]
    model = _model([*consts, conv, bn], [("x", [2, 4, 5, 5])], ["y"], {"W": _w(6, 4, 1, 1)})
    ops, _ = _run(model, "fold_bn", 1)
    assert ops == ["Conv"]  # the Constant nodes the BN read are gone too


def test_fold_bn_does_not_fire_where_it_must_not():
    # the conv output has a second reader
    conv = helper.make_node("Conv", ["x", "W", "b"], ["c"])
    bn, bn_inits = _bn("c", "y", 6)
    relu = helper.make_node("Relu", ["c"], ["r"])
    inits = {"W": _w(6, 4, 3, 3), "b": _w(6), **bn_inits}
    _unchanged(_model([conv, bn, relu], [("x", [2, 4, 7, 7])], ["y", "r"], inits), "fold_bn")
    # the conv output is a graph output
    _unchanged(_model([conv, bn], [("x", [2, 4, 7, 7])], ["y", "c"], inits), "fold_bn")
    # the mean is a graph input: statistics that are not constants
    stats = {k: v for k, v in inits.items() if k != "bn_mean"}
    _unchanged(_model([conv, bn], [("x", [2, 4, 7, 7]), ("bn_mean", [6])], ["y"], stats), "fold_bn")
    # the conv weight is a graph input
    conv_dyn = helper.make_node("Conv", ["x", "Wx"], ["c"])
    stats = {k: v for k, v in inits.items() if k.startswith("bn")}
    _unchanged(_model([conv_dyn, bn], [("x", [2, 4, 7, 7]), ("Wx", [6, 4, 3, 3])], ["y"], stats), "fold_bn")
    # MatMul of rank 3: BN's channels (axis 1) are not the MatMul's features (last axis), even when they agree
    mm = helper.make_node("MatMul", ["a", "W"], ["m"])
    bn5, bn5_inits = _bn("m", "y", 5)
    _unchanged(_model([mm, bn5], [("a", [2, 5, 4])], ["y"], {"W": _w(4, 5), **bn5_inits}), "fold_bn")


@pytest.mark.parametrize("live", [False, True], ids=["fixture", "live_torch"])
def test_fold_bn_from_pytorch(live):
    """Conv + BN, depthwise conv + BN and Linear + BatchNorm1d exported by PyTorch without constant folding (which
    would fold the convs' BNs itself), randomised statistics (tests/fixtures/make_torch_fixtures.py): the
    committed export against torch's outputs, or one the installed torch exports now."""
    if live:
        nets = torch_nets()
        net, x = nets.build("fold_bn_net")
        model, want = onnx.load_from_string(nets.export("fold_bn_net", net)), nets.reference(net, x)
    else:
        model, ref = torch_fixture("fold_bn_net")
        x, want = ref["x"], ref["want"]
    assert [n.op_type for n in model.graph.node].count("BatchNormalization") == 3
    after, reports = optimize(model, ["fold_bn"])
    assert reports[0].rewrites == 3
    assert "BatchNormalization" not in [n.op_type for n in after.graph.node]
    onnx.checker.check_model(after, full_check=True)
    verify(model, after)
    session = ort.InferenceSession(after.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"x": x})[0], want, rtol=1e-4, atol=1e-5)


# --- fold_scale ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bias", [True, False])
def test_fold_scale_conv_mul_add(bias):
    conv = helper.make_node("Conv", ["x", "W", "b"] if bias else ["x", "W"], ["c"])
    mul = helper.make_node("Mul", ["s", "c"], ["m"])
    add = helper.make_node("Add", ["m", "t"], ["y"])
    sub = helper.make_node("Sub", ["y", "u"], ["z"])
    inits = {"W": _w(6, 4, 3, 3), "b": _w(6), "s": _w(1, 6, 1, 1), "t": _w(6, 1, 1), "u": _w(1)}
    if not bias:
        del inits["b"]
    ops, _ = _run(_model([conv, mul, add, sub], [("x", [2, 4, 7, 7])], ["z"], inits), "fold_scale", 3)
    assert ops == ["Conv"]


def test_fold_scale_conv_transpose_grouped():
    deconv = helper.make_node("ConvTranspose", ["x", "W"], ["c"], group=2, strides=[2, 2])
    mul = helper.make_node("Mul", ["c", "s"], ["m"])
    add = helper.make_node("Add", ["m", "t"], ["y"])
    inits = {"W": _w(4, 3, 3, 3), "s": _w(6, 1, 1), "t": _w(1, 6, 1, 1)}
    ops, _ = _run(_model([deconv, mul, add], [("x", [2, 4, 5, 5])], ["y"], inits), "fold_scale", 2)
    assert ops == ["ConvTranspose"]


def test_fold_scale_gemm():
    gemm = helper.make_node("Gemm", ["a", "B", "C"], ["g"], transB=1, alpha=0.5, beta=2.0)
    mul = helper.make_node("Mul", ["g", "s"], ["m"])
    add = helper.make_node("Add", ["t", "m"], ["y"])
    inits = {"B": _w(5, 4), "C": _w(5), "s": _w(5), "t": _w(1, 5)}
    ops, _ = _run(_model([gemm, mul, add], [("a", [3, 4])], ["y"], inits), "fold_scale", 2)
    assert ops == ["Gemm"]


def test_fold_scale_does_not_fire_where_it_must_not():
    conv = helper.make_node("Conv", ["x", "W", "b"], ["c"])
    mul = helper.make_node("Mul", ["c", "s"], ["y"])
    base = {"W": _w(6, 4, 3, 3), "b": _w(6)}
    # the last axis (as long as the channels), all of H x W, the batch, a rank that grows the output
    for shape in [(6,), (1, 1, 1, 6), (1, 6, 6, 6), (2, 6, 1, 1), (1, 1, 6, 1, 1)]:
        model = _model([conv, mul], [("x", [2, 4, 8, 8])], ["y"], {**base, "s": _w(*shape)})
        _unchanged(model, "fold_scale")
    # the conv output has another reader
    relu = helper.make_node("Relu", ["c"], ["r"])
    model = _model([conv, mul, relu], [("x", [2, 4, 7, 7])], ["y", "r"], {**base, "s": _w(1, 6, 1, 1)})
    _unchanged(model, "fold_scale")
    # the scale is not a constant
    model = _model([conv, mul], [("x", [2, 4, 7, 7]), ("s", [1, 6, 1, 1])], ["y"], base)
    _unchanged(model, "fold_scale")


# --- fuse_bias ----------------------------------------------------------------------------------------------
def test_fuse_bias_conv_add():
    conv = helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1])
    add = helper.make_node("Add", ["c", "t"], ["y"])
    model = _model([conv, add], [("x", [2, 4, 7, 7])], ["y"], {"W": _w(6, 4, 3, 3), "t": _w(1, 6, 1, 1)})
    ops, after = _run(model, "fuse_bias", 1)
    assert ops == ["Conv"] and len(after.graph.node[0].input) == 3


@pytest.mark.parametrize("c_shape", [(5,), (1, 5)])
def test_fuse_bias_matmul_add_becomes_gemm(c_shape):
    mm = helper.make_node("MatMul", ["a", "W"], ["m"])
    add = helper.make_node("Add", ["t", "m"], ["y"])
    model = _model([mm, add], [("a", [3, 4])], ["y"], {"W": _w(4, 5), "t": _w(*c_shape)})
    ops, _ = _run(model, "fuse_bias", 1)
    assert ops == ["Gemm"]


def test_fuse_bias_does_not_fire_where_it_must_not():
    mm = helper.make_node("MatMul", ["a", "W"], ["m"])
    add = helper.make_node("Add", ["m", "t"], ["y"])
    inits = {"W": _w(4, 5), "t": _w(5)}
    _unchanged(_model([mm, add], [("a", [2, 3, 4])], ["y"], inits), "fuse_bias")  # rank 3
    reshape = helper.make_node("Reshape", ["x", "shape"], ["a"])  # a shape of unknown length: rank unknown
    inputs = [("x", [3, 4]), ("shape", ["n"], TensorProto.INT64)]
    unknown = _model([reshape, mm, add], inputs, [("y", [3, 5])], inits)
    _unchanged(unknown, "fuse_bias")
    _unchanged(_model([mm, add], [("a", [3, 4])], ["y", "m"], inits), "fuse_bias")  # m is a graph output
    _unchanged(_model([mm, add], [("a", [3, 4])], ["y"], {**inits, "t": _w(3, 5)}), "fuse_bias")  # (M, N)
    conv = helper.make_node("Conv", ["x", "W", "b"], ["c"])  # already has a bias: fold_scale's job
    add = helper.make_node("Add", ["c", "t"], ["y"])
    model = _model(
        [conv, add], [("x", [2, 4, 7, 7])], ["y"], {"W": _w(6, 4, 3, 3), "b": _w(6), "t": _w(6, 1, 1)}
    )
    _unchanged(model, "fuse_bias")


# --- fuse_pad -----------------------------------------------------------------------------------------------
def _pad_model(consumer, pad_pads, value=None, opset=17, mode="constant", **attrs):
    inits = {}
    if opset >= 11:
        inits["pads"] = np.array(pad_pads, np.int64)
        inputs = ["x", "pads"]
        if value is not None:
            inits["v"] = np.array(value, np.float32)
            inputs.append("v")
        pad = helper.make_node("Pad", inputs, ["p"], mode=mode)
    else:
        pad = helper.make_node("Pad", ["x"], ["p"], mode=mode, pads=pad_pads, value=value or 0.0)
    if consumer == "Conv":
        inits["W"] = _w(6, 4, 3, 3)
        node = helper.make_node("Conv", ["p", "W"], ["y"], **attrs)
    else:
        node = helper.make_node(consumer, ["p"], ["y"], kernel_shape=[3, 3], **attrs)
    return _model([pad, node], [("x", [2, 4, 7, 7])], ["y"], inits, opset=opset)


def _attrs(node):
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def test_fuse_pad_into_conv():
    ops, after = _run(
        _pad_model("Conv", [0, 0, 1, 2, 0, 0, 2, 1], pads=[1, 0, 0, 1], strides=[2, 1]), "fuse_pad", 1
    )
    assert ops == ["Conv"] and _attrs(after.graph.node[0])["pads"] == [2, 2, 2, 2]
    ops, _ = _run(_pad_model("Conv", [0, 0, 1, 1, 0, 0, 1, 1], value=0.0), "fuse_pad", 1)
    assert ops == ["Conv"]


def test_fuse_pad_attribute_form_opset10():
    ops, after = _run(_pad_model("Conv", [0, 0, 1, 1, 0, 0, 2, 2], opset=10), "fuse_pad", 1)
    assert ops == ["Conv"] and _attrs(after.graph.node[0])["pads"] == [1, 1, 2, 2]


def test_fuse_pad_axes_input_opset18():
    pads = np.array([1, 2, 1, 0], np.int64)
    pad = helper.make_node("Pad", ["x", "pads", "", "axes"], ["p"])
    conv = helper.make_node("Conv", ["p", "W"], ["y"])
    inits = {"pads": pads, "axes": np.array([-2, 3], np.int64), "W": _w(6, 4, 3, 3)}
    ops, after = _run(_model([pad, conv], [("x", [2, 4, 7, 7])], ["y"], inits, opset=18), "fuse_pad", 1)
    assert ops == ["Conv"] and _attrs(after.graph.node[0])["pads"] == [1, 2, 1, 0]


def test_fuse_pad_into_pools():
    ops, after = _run(_pad_model("AveragePool", [0, 0, 1, 1, 0, 0, 1, 1]), "fuse_pad", 1)
    assert ops == ["AveragePool"] and _attrs(after.graph.node[0])["count_include_pad"] == 1
    ops, _ = _run(_pad_model("MaxPool", [0, 0, 1, 0, 0, 0, 0, 1], value=-math.inf), "fuse_pad", 1)
    assert ops == ["MaxPool"]


def test_fuse_pad_does_not_fire_where_it_must_not():
    _unchanged(_pad_model("Conv", [0, 0, 1, 1, 0, 0, 1, 1], value=0.5), "fuse_pad")  # nonzero value
    _unchanged(_pad_model("Conv", [0, 1, 1, 1, 0, 0, 1, 1]), "fuse_pad")  # the channel axis
    _unchanged(_pad_model("Conv", [0, 0, 1, 1, 0, 0, 1, 1], mode="reflect"), "fuse_pad")
    _unchanged(_pad_model("Conv", [0, 0, 1, 1, 0, 0, 1, 1], auto_pad="SAME_UPPER"), "fuse_pad")
    _unchanged(_pad_model("MaxPool", [0, 0, 1, 1, 0, 0, 1, 1]), "fuse_pad")  # zero, not -inf
    _unchanged(_pad_model("AveragePool", [0, 0, 1, 1, 0, 0, 1, 1], pads=[1, 1, 1, 1]), "fuse_pad")
    _unchanged(_pad_model("AveragePool", [0, 0, 3, 0, 0, 0, 0, 0]), "fuse_pad")  # pad >= kernel
