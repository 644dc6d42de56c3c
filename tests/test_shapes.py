"""Shape inference against the formula and against what onnxruntime actually computes."""

import itertools
import math

import numpy as np
import pytest

from helpers import load, ort_session, random_input


def formula(size, k, s, p_begin, p_end, d=1, ceil=False):
    """N = (W − F + 2P) / S + 1 with dilation (F = (k − 1)·d + 1)."""
    f = (k - 1) * d + 1
    span = size + p_begin + p_end - f
    return (math.ceil(span / s) if ceil else span // s) + 1


CONV_CASES = [
    # (input HxW, kernel, stride, pad, dilation, groups)
    ((16, 16), 3, 1, 1, 1, 1),
    ((17, 13), [3, 5], [2, 3], [1, 2], 1, 1),  # non-square kernel, strides that do not divide
    ((15, 15), 3, 2, "same", 1, 1),
    ((16, 15), [4, 2], [3, 1], "same", 1, 1),  # even kernel: asymmetric SAME padding
    ((20, 20), 3, 1, 2, 2, 1),  # dilation
    ((12, 12), [1, 7], 1, [0, 3], 1, 3),  # groups
    ((16, 16), 3, 2, [0, 1, 2, 0], [1, 2], 1),  # explicit asymmetric pads
    ((9, 9), 9, 1, "valid", 1, 3),
]


@pytest.mark.parametrize("hw,kernel,stride,pad,dilation,groups", CONV_CASES)
def test_conv_shape_matches_formula_and_onnxruntime(hw, kernel, stride, pad, dilation, groups):
    pad_yaml = pad if isinstance(pad, str) else pad
    m = load(f"- {{name: c, type: conv, out: 6, kernel: {kernel}, stride: {stride}, pad: {pad_yaml}, "
             f"dilation: {dilation}, groups: {groups}}}", shape=(3, *hw))
    out = m.graph.shapes["c"]
    attrs = m.graph.node("c").attrs
    kh, kw = attrs["kernel"]
    sh, sw = attrs["stride"]
    t, left, b, r = attrs["pads"]
    dh, dw = attrs["dilation"]
    assert out == (6, formula(hw[0], kh, sh, t, b, dh), formula(hw[1], kw, sw, left, r, dw))
    if pad == "same":
        assert out[1:] == (math.ceil(hw[0] / sh), math.ceil(hw[1] / sw))
    y = ort_session(m.graph).run(None, {"input": random_input(m.graph)})[0]
    assert y.shape == (2, *out)


@pytest.mark.parametrize("op,hw,kernel,stride,pad,ceil", [
    (op, hw, k, s, p, c)
    for op, (hw, k, s, p), c in itertools.product(
        ["maxpool", "avgpool"],
        [((16, 16), 2, None, 0), ((17, 15), 3, 2, 1), ((7, 9), [3, 2], [2, 1], 0), ((13, 13), 3, 2, "same")],
        [False, True])
])
def test_pool_shape_matches_onnxruntime(op, hw, kernel, stride, pad, ceil):
    stride_yaml = f", stride: {stride}" if stride is not None else ""
    m = load(f"- {{name: p, type: {op}, kernel: {kernel}{stride_yaml}, pad: {pad}, ceil_mode: {str(ceil).lower()}}}",
             shape=(2, *hw))
    y = ort_session(m.graph).run(None, {"input": random_input(m.graph)})[0]
    assert y.shape == (2, *m.graph.shapes["p"])


def test_other_ops_shapes():
    m = load("""
        - {name: up, type: upsample, scale: [2, 3]}
        - {name: g, type: global_avgpool}
        - {name: f, type: flatten}
        - {name: fc, type: linear, out: 7}
        - {name: sm, type: softmax}
    """, shape=(4, 5, 6))
    assert m.graph.shapes["up"] == (4, 10, 18)
    assert m.graph.shapes["g"] == (4, 1, 1)
    assert m.graph.shapes["f"] == (4,)
    assert m.graph.shapes["sm"] == (7,)
    y = ort_session(m.graph).run(None, {"input": random_input(m.graph)})[0]
    assert y.shape == (2, 7)
    np.testing.assert_allclose(y.sum(axis=1), 1.0, rtol=1e-5)
