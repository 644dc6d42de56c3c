"""Native pooling kernels (dlc._C.pool) against the numpy references, finite differences and onnxruntime."""

import math

import numpy as np
import pytest

from dlc._C import pool
from dlc._C.pool_ref import (
    avgpool_backward_ref,
    avgpool_forward_ref,
    global_avgpool_backward_ref,
    global_avgpool_forward_ref,
    maxpool_backward_ref,
    maxpool_forward_ref,
)

from helpers import numeric_grad


def out_size(n: int, k: int, s: int, p0: int, p1: int, ceil: bool) -> int:
    """Pooling output length; in ceil mode the last window must start inside the input or the top padding."""
    if not ceil:
        return (n + p0 + p1 - k) // s + 1
    out = math.ceil((n + p0 + p1 - k) / s) + 1
    if (out - 1) * s >= n + p0:
        out -= 1
    return out


def out_hw(shape, kernel, stride, pads, ceil) -> tuple[int, int]:
    h, w = shape[-2:]
    return (
        out_size(h, kernel[0], stride[0], pads[0], pads[2], ceil),
        out_size(w, kernel[1], stride[1], pads[1], pads[3], ceil),
    )


# (N, C, H, W), kernel, stride, pads (top, left, bottom, right), ceil_mode
CASES = [
    pytest.param((2, 3, 8, 8), (2, 2), (2, 2), (0, 0, 0, 0), False, id="2x2s2"),
    pytest.param((2, 3, 7, 9), (3, 2), (2, 3), (1, 0, 0, 1), False, id="nonsquare-asym-pads"),
    pytest.param((2, 2, 7, 9), (3, 2), (2, 3), (1, 0, 0, 1), True, id="nonsquare-asym-pads-ceil"),
    pytest.param((1, 3, 10, 7), (2, 3), (3, 2), (0, 1, 1, 0), True, id="stride-not-dividing-ceil"),
    pytest.param((2, 2, 5, 6), (3, 3), (1, 1), (1, 1, 1, 1), False, id="3x3s1-same"),
    pytest.param((1, 2, 11, 6), (3, 1), (2, 2), (1, 0, 1, 0), True, id="3x1-ceil"),
    pytest.param((3, 2, 6, 5), (1, 1), (2, 2), (0, 0, 0, 0), True, id="1x1s2-ceil"),
    pytest.param((2, 2, 9, 9), (3, 3), (2, 2), (1, 1, 1, 1), True, id="3x3s2-pad1-ceil"),
    pytest.param((1, 2, 4, 5), (4, 4), (3, 3), (2, 2, 3, 3), True, id="big-pads-empty-windows"),
]
PARALLEL_CASE = ((8, 16, 32, 32), (3, 3), (2, 2), (1, 1, 1, 1), True)


def random_input(shape, seed=0, dtype=np.float32) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def distinct_input(shape, seed=0) -> np.ndarray:
    """Values 0.1 apart (no near-ties), half of them negative so padding could not win by being 0."""
    size = math.prod(shape)
    return (np.random.default_rng(seed).permutation(size) - size / 2).reshape(shape) * 0.1


# ---------------------------------------------------------------------------------------------------------
# Max pooling


@pytest.mark.parametrize(
    "shape, kernel, stride, pads, ceil", [*CASES, pytest.param(*PARALLEL_CASE, id="big")]
)
def test_maxpool_matches_reference(shape, kernel, stride, pads, ceil):
    x = random_input(shape)
    x[..., ::3, 1::2] = np.round(x[..., ::3, 1::2])  # some exact ties
    hw = out_hw(shape, kernel, stride, pads, ceil)
    y, argmax = pool.maxpool_forward(x, kernel, stride, pads, hw)
    y_ref, argmax_ref = maxpool_forward_ref(x, kernel, stride, pads, hw)
    assert y.dtype == np.float32 and argmax.dtype == np.int32 and y.shape == (*shape[:2], *hw)
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(argmax, argmax_ref)
    dy = random_input(y.shape, seed=1)
    dx = pool.maxpool_backward(dy, argmax, shape[2:])
    assert dx.dtype == np.float32 and dx.shape == shape
    np.testing.assert_allclose(dx, maxpool_backward_ref(dy, argmax_ref, shape[2:]), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape, kernel, stride, pads, ceil", CASES)
def test_maxpool_reference_gradient_matches_finite_differences(shape, kernel, stride, pads, ceil):
    x = distinct_input(shape)
    hw = out_hw(shape, kernel, stride, pads, ceil)
    r = np.random.default_rng(2).standard_normal((*shape[:2], *hw))
    _, argmax = maxpool_forward_ref(x, kernel, stride, pads, hw)
    analytic = maxpool_backward_ref(r, argmax, shape[2:])
    numeric = numeric_grad(
        lambda v: float((maxpool_forward_ref(v, kernel, stride, pads, hw)[0] * r).sum()), x
    )
    np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-8)


def test_maxpool_ties_go_to_the_first_element():
    # All-zero input: every window is a tie, won by its first real element in row-major order.
    shape, kernel, stride, pads = (2, 3, 6, 7), (3, 2), (2, 2), (1, 1, 1, 0)
    hw = out_hw(shape, kernel, stride, pads, True)
    x = np.zeros(shape, dtype=np.float32)
    y, argmax = pool.maxpool_forward(x, kernel, stride, pads, hw)
    first = np.array(
        [[max(oh * 2 - 1, 0) * 7 + max(ow * 2 - 1, 0) for ow in range(hw[1])] for oh in range(hw[0])]
    )
    np.testing.assert_array_equal(argmax, np.broadcast_to(first, argmax.shape))
    np.testing.assert_array_equal(y, 0)
    # The gradient of each window reaches exactly one element, the first.
    dx = pool.maxpool_backward(np.ones_like(y), argmax, shape[2:])
    expected = np.zeros(shape[2:], dtype=np.float32)
    np.add.at(expected.reshape(-1), first.reshape(-1), 1)
    np.testing.assert_array_equal(dx, np.broadcast_to(expected, shape))
    assert dx.sum() == y.size
    # Tied maxima after a smaller first element; -inf windows still pick a real element.
    x = np.array([[[[0, 2, 5], [2, 1, 5], [-np.inf, -np.inf, 1]]]], dtype=np.float32)
    y, argmax = pool.maxpool_forward(x, (2, 2), (1, 1), (0, 0, 0, 0), (2, 2))
    np.testing.assert_array_equal(argmax[0, 0], [[1, 2], [3, 5]])
    x[0, 0, 2, 2] = -np.inf
    x[0, 0, 1, :2] = -np.inf
    y, argmax = pool.maxpool_forward(x[..., 1:, :2], (2, 2), (1, 1), (0, 0, 0, 0), (1, 1))
    assert y[0, 0, 0, 0] == -np.inf and argmax[0, 0, 0, 0] == 0
    geometry = ((2, 2), (1, 1), (0, 0, 0, 0), (2, 2))
    for got, want in zip(pool.maxpool_forward(x, *geometry), maxpool_forward_ref(x, *geometry)):
        np.testing.assert_array_equal(got, want)


def test_maxpool_padding_never_wins():
    x = np.full((1, 1, 3, 3), -5.0, dtype=np.float32)
    x[0, 0, 2, 2] = -1.0
    y, argmax = pool.maxpool_forward(x, (3, 3), (2, 2), (1, 1, 1, 1), (2, 2))
    np.testing.assert_array_equal(y[0, 0], [[-5, -5], [-5, -1]])
    np.testing.assert_array_equal(argmax[0, 0], [[0, 1], [3, 8]])


def test_maxpool_nan_propagates():
    x = np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4)
    x[0, 0, 0, 1] = np.nan
    x[0, 0, 1, 0] = np.nan  # second NaN in the same window: the first keeps it
    x[0, 0, 3, 3] = np.nan
    y, argmax = pool.maxpool_forward(x, (2, 2), (2, 2), (0, 0, 0, 0), (2, 2))
    assert np.isnan(y[0, 0, 0, 0]) and np.isnan(y[0, 0, 1, 1])
    np.testing.assert_array_equal(y[0, 0, 0, 1], 7)
    np.testing.assert_array_equal(argmax[0, 0], [[1, 7], [13, 15]])
    y_ref, argmax_ref = maxpool_forward_ref(x, (2, 2), (2, 2), (0, 0, 0, 0), (2, 2))
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(argmax, argmax_ref)
    dx = pool.maxpool_backward(np.ones_like(y), argmax, (4, 4))
    assert dx.reshape(-1)[[1, 7, 13, 15]].tolist() == [1, 1, 1, 1] and dx.sum() == 4


def test_windows_without_real_elements():
    x = np.arange(1, 5, dtype=np.float32).reshape(1, 1, 2, 2)
    pads = (2, 1, 2, 1)  # more padding than half a 1x1 kernel: the border windows see only padding
    y, argmax = pool.maxpool_forward(x, (1, 1), (1, 1), pads, (6, 4))
    expected = np.zeros((6, 4), dtype=np.float32)
    expected[2:4, 1:3] = [[1, 2], [3, 4]]
    np.testing.assert_array_equal(y[0, 0], expected)
    assert (argmax[0, 0][expected == 0] == -1).all()
    dx = pool.maxpool_backward(np.ones_like(y), argmax, (2, 2))
    np.testing.assert_array_equal(dx, 1)
    for cip in (False, True):
        avg = pool.avgpool_forward(x, (1, 1), (1, 1), pads, (6, 4), cip)
        np.testing.assert_array_equal(avg[0, 0], expected)
        np.testing.assert_array_equal(avg, avgpool_forward_ref(x, (1, 1), (1, 1), pads, (6, 4), cip))
        dx = pool.avgpool_backward(np.ones_like(avg), (2, 2), (1, 1), (1, 1), pads, cip)
        np.testing.assert_array_equal(dx, 1)
    # An output larger than the geometry allows: the extra windows are empty too.
    y, argmax = pool.maxpool_forward(x, (2, 2), (2, 2), (0, 0, 0, 0), (2, 3))
    np.testing.assert_array_equal(y[0, 0], [[4, 0, 0], [0, 0, 0]])
    np.testing.assert_array_equal(argmax[0, 0], [[3, -1, -1], [-1, -1, -1]])


# ---------------------------------------------------------------------------------------------------------
# Average pooling


@pytest.mark.parametrize("count_include_pad", [False, True])
@pytest.mark.parametrize(
    "shape, kernel, stride, pads, ceil", [*CASES, pytest.param(*PARALLEL_CASE, id="big")]
)
def test_avgpool_matches_reference(shape, kernel, stride, pads, ceil, count_include_pad):
    x = random_input(shape)
    hw = out_hw(shape, kernel, stride, pads, ceil)
    y = pool.avgpool_forward(x, kernel, stride, pads, hw, count_include_pad)
    assert y.dtype == np.float32 and y.shape == (*shape[:2], *hw)
    # Same float32 additions in the same order, same division: equal to the last bit.
    np.testing.assert_array_equal(y, avgpool_forward_ref(x, kernel, stride, pads, hw, count_include_pad))
    dy = random_input(y.shape, seed=1)
    dx = pool.avgpool_backward(dy, shape[2:], kernel, stride, pads, count_include_pad)
    assert dx.dtype == np.float32 and dx.shape == shape
    dx_ref = avgpool_backward_ref(dy, shape[2:], kernel, stride, pads, count_include_pad)
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("count_include_pad", [False, True])
@pytest.mark.parametrize("shape, kernel, stride, pads, ceil", CASES)
def test_avgpool_reference_gradient_matches_finite_differences(
    shape, kernel, stride, pads, ceil, count_include_pad
):
    x = random_input(shape, dtype=np.float64)
    hw = out_hw(shape, kernel, stride, pads, ceil)
    r = np.random.default_rng(2).standard_normal((*shape[:2], *hw))
    analytic = avgpool_backward_ref(r, shape[2:], kernel, stride, pads, count_include_pad)
    numeric = numeric_grad(
        lambda v: float((avgpool_forward_ref(v, kernel, stride, pads, hw, count_include_pad) * r).sum()), x
    )
    np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-8)


def test_avgpool_divisors_by_hand():
    # 4x4 ones, 3x3 kernel, stride 2, pad 1, ceil mode: 3x3 outputs; the last row/column of windows runs
    # one past the bottom/right padding (clipped: 2 rows of padded extent, 1 real).
    x = np.ones((1, 1, 4, 4), dtype=np.float32)
    hw = out_hw(x.shape, (3, 3), (2, 2), (1, 1, 1, 1), True)
    assert hw == (3, 3)
    y = pool.avgpool_forward(x, (3, 3), (2, 2), (1, 1, 1, 1), hw, False)
    np.testing.assert_array_equal(y, 1)
    y = pool.avgpool_forward(x, (3, 3), (2, 2), (1, 1, 1, 1), hw, True)
    real = np.array([2, 3, 1], dtype=np.float32)
    area = np.array([3, 3, 2], dtype=np.float32)
    np.testing.assert_allclose(y[0, 0], np.outer(real, real) / np.outer(area, area), rtol=1e-7)
    # Asymmetric pads: the area counts only the padding that exists on each side.
    y = pool.avgpool_forward(x, (2, 2), (2, 2), (1, 0, 0, 0), (2, 2), True)
    np.testing.assert_allclose(y[0, 0], [[0.5, 0.5], [1, 1]])


# ---------------------------------------------------------------------------------------------------------
# Global average pooling


@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (64, 64, 8, 8), (1, 2, 1, 1), (2, 1, 3, 0)])
def test_global_avgpool(shape):
    x = random_input(shape)
    y = pool.global_avgpool_forward(x)
    assert y.shape == (*shape[:2], 1, 1) and y.dtype == np.float32
    np.testing.assert_allclose(y, global_avgpool_forward_ref(x), rtol=1e-6, atol=1e-7)
    if shape[2] * shape[3]:
        np.testing.assert_allclose(y, x.mean(axis=(2, 3), keepdims=True), rtol=1e-5, atol=1e-6)
    dy = random_input(y.shape, seed=1)
    dx = pool.global_avgpool_backward(dy, shape[2:])
    assert dx.shape == shape and dx.dtype == np.float32
    np.testing.assert_array_equal(dx, global_avgpool_backward_ref(dy, shape[2:]))


def test_global_avgpool_reference_gradient_matches_finite_differences():
    x = random_input((2, 3, 4, 5), dtype=np.float64)
    r = np.random.default_rng(2).standard_normal((2, 3, 1, 1))
    numeric = numeric_grad(lambda v: float((global_avgpool_forward_ref(v) * r).sum()), x)
    np.testing.assert_allclose(global_avgpool_backward_ref(r, (4, 5)), numeric, rtol=1e-6, atol=1e-8)


# ---------------------------------------------------------------------------------------------------------
# Inputs and arguments


def test_accepts_other_dtypes_and_layouts():
    x64 = random_input((2, 3, 6, 8), dtype=np.float64)
    strided = np.asfortranarray(x64)[:, :, :, ::2]
    expected = pool.maxpool_forward(
        np.ascontiguousarray(strided, dtype=np.float32), (2, 2), (2, 2), (0,) * 4, (3, 2)
    )
    for got, want in zip(pool.maxpool_forward(strided, [2, 2], (2, 2), [0] * 4, (3, 2)), expected):
        np.testing.assert_array_equal(got, want)
    assert pool.maxpool_forward(np.zeros((0, 3, 4, 4)), (2, 2), (2, 2), (0,) * 4, (2, 2))[0].shape == (
        0,
        3,
        2,
        2,
    )


@pytest.mark.parametrize(
    "call, message",
    [
        (
            lambda: pool.maxpool_forward(np.zeros((2, 4, 4)), (2, 2), (2, 2), (0,) * 4, (2, 2)),
            r"x must be 4-D",
        ),
        (lambda: pool.maxpool_forward(np.zeros((1, 1, 4, 4)), (0, 2), (2, 2), (0,) * 4, (2, 2)), r"kernel"),
        (
            lambda: pool.avgpool_forward(np.zeros((1, 1, 4, 4)), (2, 2), (2,), (0,) * 4, (2, 2), False),
            r"stride",
        ),
        (
            lambda: pool.avgpool_forward(np.zeros((1, 1, 4, 4)), (2, 2), (2, 2), (0, 0), (2, 2), False),
            r"pads",
        ),
        (
            lambda: pool.maxpool_forward(np.zeros((1, 1, 4, 4)), (2, 2), (2, 2), (0, 0, -1, 0), (2, 2)),
            r"pads",
        ),
        (
            lambda: pool.maxpool_backward(np.zeros((1, 1, 2, 2)), np.zeros((1, 1, 2, 3)), (4, 4)),
            r"argmax shape",
        ),
        (lambda: pool.global_avgpool_backward(np.zeros((1, 1, 2, 2)), (4, 4)), r"\(N, C, 1, 1\)"),
    ],
)
def test_argument_checks(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_maxpool_backward_ignores_out_of_range_indices():
    dy = np.ones((1, 1, 1, 3), dtype=np.float32)
    argmax = np.array([[[[-7, 3, 99]]]], dtype=np.int32)
    dx = pool.maxpool_backward(dy, argmax, (2, 2))
    np.testing.assert_array_equal(dx.reshape(-1), [0, 0, 0, 1])


# ---------------------------------------------------------------------------------------------------------
# Against onnxruntime's MaxPool and AveragePool


def ort_pool(op: str, x: np.ndarray, kernel, stride, pads, ceil: bool, **attrs) -> np.ndarray:
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper

    node = helper.make_node(
        op,
        ["x"],
        ["y"],
        kernel_shape=list(kernel),
        strides=list(stride),
        pads=list(pads),
        ceil_mode=int(ceil),
        **attrs,
    )
    graph = helper.make_graph(
        [node],
        op.lower(),
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None] * 4)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


# onnxruntime wants every pad smaller than the kernel.
ORT_CASES = [c for c in CASES if all(p < k for p, k in zip(c.values[3], c.values[1] * 2))]


@pytest.mark.parametrize("shape, kernel, stride, pads, ceil", ORT_CASES)
def test_maxpool_matches_onnxruntime(shape, kernel, stride, pads, ceil):
    x = random_input(shape, seed=3)
    expected = ort_pool("MaxPool", x, kernel, stride, pads, ceil)
    y, _ = pool.maxpool_forward(x, kernel, stride, pads, out_hw(shape, kernel, stride, pads, ceil))
    np.testing.assert_array_equal(y, expected)


@pytest.mark.parametrize("count_include_pad", [False, True])
@pytest.mark.parametrize("shape, kernel, stride, pads, ceil", ORT_CASES)
def test_avgpool_matches_onnxruntime(shape, kernel, stride, pads, ceil, count_include_pad):
    x = random_input(shape, seed=3)
    expected = ort_pool(
        "AveragePool", x, kernel, stride, pads, ceil, count_include_pad=int(count_include_pad)
    )
    hw = out_hw(shape, kernel, stride, pads, ceil)
    y = pool.avgpool_forward(x, kernel, stride, pads, hw, count_include_pad)
    assert y.shape == expected.shape
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-6)


def test_global_avgpool_matches_onnxruntime():
    x = random_input((3, 5, 7, 6), seed=3)
    expected = ort_pool("AveragePool", x, (7, 6), (1, 1), (0,) * 4, False)
    np.testing.assert_allclose(pool.global_avgpool_forward(x), expected, rtol=1e-5, atol=1e-6)
