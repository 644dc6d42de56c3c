"""Native batch-norm kernels (dlc._C.batchnorm) against the numpy references, finite differences and onnxruntime."""

import numpy as np
import pytest

from dlc._C import batchnorm
from dlc._C.batchnorm_ref import (
    batchnorm_backward_ref,
    batchnorm_forward_eval_ref,
    batchnorm_forward_train_ref,
)

from helpers import numeric_grad

EPS = 1e-5
SHAPES = [
    pytest.param((4, 3, 5, 6), id="4d"),
    pytest.param((64, 16, 8, 8), id="4d-parallel"),
    pytest.param((7, 5), id="2d"),
    pytest.param((3000, 24), id="2d-parallel"),
    pytest.param((2, 4, 1, 1), id="1x1"),
    pytest.param((1, 3, 3, 5), id="batch-1"),
]


def random_case(shape, seed=0, dtype=np.float32):
    """x with per-channel offsets and scales, gamma, beta, and an upstream gradient."""
    rng = np.random.default_rng(seed)
    c = shape[1]
    per_channel = (1, c) + (1,) * (len(shape) - 2)
    x = rng.standard_normal(shape) * rng.uniform(0.5, 3, per_channel) + rng.uniform(-2, 2, per_channel)
    gamma, beta = rng.uniform(0.5, 1.5, c), rng.standard_normal(c)
    dy = rng.standard_normal(shape)
    return tuple(a.astype(dtype) for a in (x, gamma, beta, dy))


@pytest.mark.parametrize("shape", SHAPES)
def test_forward_train_matches_reference(shape):
    x, gamma, beta, _ = random_case(shape)
    y, mean, invstd = batchnorm.batchnorm_forward_train(x, gamma, beta, EPS)
    assert y.shape == shape and y.dtype == np.float32
    assert mean.shape == invstd.shape == (shape[1],) and mean.dtype == invstd.dtype == np.float32
    y_ref, mean_ref, invstd_ref = batchnorm_forward_train_ref(x, gamma, beta, EPS)
    np.testing.assert_allclose(mean, mean_ref, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(invstd, invstd_ref, rtol=1e-6)
    np.testing.assert_allclose(y, y_ref, rtol=1e-6, atol=1e-6)
    # The statistics are the textbook ones: per channel over N and space, biased variance.
    axes = (0, *range(2, len(shape)))
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(mean, x64.mean(axis=axes), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(invstd, 1 / np.sqrt(x64.var(axis=axes) + EPS), rtol=1e-6)
    if np.prod(shape) / shape[1] > 1:
        y_norm = (y - beta.reshape((1, -1) + (1,) * (len(shape) - 2))) / gamma.reshape(
            (1, -1) + (1,) * (len(shape) - 2)
        )
        np.testing.assert_allclose(y_norm.mean(axis=axes), 0, atol=1e-5)
        np.testing.assert_allclose(y_norm.var(axis=axes), 1 / (1 + EPS * invstd**2), rtol=1e-4)


def test_forward_train_statistics_survive_a_large_offset():
    # A mean 10^4 times the spread: one-pass sum-of-squares in float32 would lose the variance entirely.
    rng = np.random.default_rng(5)
    x = (1000 + 0.1 * rng.standard_normal((32, 4, 6, 6))).astype(np.float32)
    _, mean, invstd = batchnorm.batchnorm_forward_train(x, np.ones(4), np.zeros(4), 0.0)
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(mean, x64.mean(axis=(0, 2, 3)), rtol=1e-7)
    np.testing.assert_allclose(invstd, 1 / x64.std(axis=(0, 2, 3)), rtol=1e-6)


def test_forward_train_constant_channel():
    x = np.full((4, 2, 3, 3), 2.5, dtype=np.float32)
    y, mean, invstd = batchnorm.batchnorm_forward_train(x, [2.0, 3.0], [0.5, -1.0], EPS)
    np.testing.assert_array_equal(mean, 2.5)
    np.testing.assert_allclose(invstd, 1 / np.sqrt(EPS), rtol=1e-6)
    np.testing.assert_allclose(y[:, 0], 0.5, atol=1e-6)
    np.testing.assert_allclose(y[:, 1], -1.0, atol=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
def test_forward_eval_matches_reference(shape):
    x, gamma, beta, _ = random_case(shape)
    rng = np.random.default_rng(1)
    running_mean = rng.standard_normal(shape[1]).astype(np.float32)
    running_var = rng.uniform(0.1, 4, shape[1]).astype(np.float32)
    y = batchnorm.batchnorm_forward_eval(x, gamma, beta, running_mean, running_var, EPS)
    assert y.shape == shape and y.dtype == np.float32
    np.testing.assert_array_equal(
        y, batchnorm_forward_eval_ref(x, gamma, beta, running_mean, running_var, EPS)
    )
    bshape = (1, -1) + (1,) * (len(shape) - 2)
    direct = (x - running_mean.reshape(bshape)) / np.sqrt(running_var.reshape(bshape) + EPS)
    np.testing.assert_allclose(y, direct * gamma.reshape(bshape) + beta.reshape(bshape), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
def test_backward_matches_reference(shape):
    x, gamma, beta, dy = random_case(shape)
    _, mean, invstd = batchnorm.batchnorm_forward_train(x, gamma, beta, EPS)
    dx, dgamma, dbeta = batchnorm.batchnorm_backward(dy, x, gamma, mean, invstd)
    assert dx.shape == shape and dx.dtype == np.float32
    assert dgamma.shape == dbeta.shape == (shape[1],) and dgamma.dtype == dbeta.dtype == np.float32
    dx_ref, dgamma_ref, dbeta_ref = batchnorm_backward_ref(dy, x, gamma, mean, invstd)
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dgamma, dgamma_ref, rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(dbeta, dbeta_ref, rtol=1e-6, atol=1e-5)
    # Through the batch statistics the gradient has no component along 1 or along x - mean.
    axes = (0, *range(2, len(shape)))
    np.testing.assert_allclose(dx.sum(axis=axes, dtype=np.float64), 0, atol=1e-3)


@pytest.mark.parametrize("shape", [(3, 2, 3, 4), (6, 3), (1, 2, 2, 3)])
def test_reference_gradient_matches_finite_differences(shape):
    x, gamma, beta, r = random_case(shape, seed=4, dtype=np.float64)
    _, mean, invstd = batchnorm_forward_train_ref(x, gamma, beta, EPS)
    dx, dgamma, dbeta = batchnorm_backward_ref(r, x, gamma, mean, invstd)

    def loss(x_, gamma_, beta_) -> float:
        return float((batchnorm_forward_train_ref(x_, gamma_, beta_, EPS)[0] * r).sum())

    np.testing.assert_allclose(dx, numeric_grad(lambda v: loss(v, gamma, beta), x), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(dgamma, numeric_grad(lambda v: loss(x, v, beta), gamma), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(dbeta, numeric_grad(lambda v: loss(x, gamma, v), beta), rtol=1e-6, atol=1e-7)


def test_native_gradient_matches_float64_reference():
    x, gamma, beta, dy = random_case((16, 8, 6, 6), seed=6)
    _, mean, invstd = batchnorm.batchnorm_forward_train(x, gamma, beta, EPS)
    dx, dgamma, dbeta = batchnorm.batchnorm_backward(dy, x, gamma, mean, invstd)
    x64, g64, dy64 = (a.astype(np.float64) for a in (x, gamma, dy))
    _, mean64, invstd64 = batchnorm_forward_train_ref(x64, g64, beta.astype(np.float64), EPS)
    dx64, dgamma64, dbeta64 = batchnorm_backward_ref(dy64, x64, g64, mean64, invstd64)
    np.testing.assert_allclose(dx, dx64, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dgamma, dgamma64, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(dbeta, dbeta64, rtol=1e-5, atol=1e-4)


def test_accepts_other_dtypes_and_layouts():
    x, gamma, beta, _ = random_case((4, 3, 5, 6))
    expected = batchnorm.batchnorm_forward_train(x, gamma, beta, EPS)
    strided = np.asfortranarray(x.astype(np.float64))
    for got, want in zip(batchnorm.batchnorm_forward_train(strided, gamma.tolist(), beta, EPS), expected):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(
    "call, message",
    [
        (
            lambda: batchnorm.batchnorm_forward_train(np.zeros(4), np.ones(4), np.zeros(4), EPS),
            r"must be \(N, C\)",
        ),
        (
            lambda: batchnorm.batchnorm_forward_train(np.zeros((2, 3)), np.ones(4), np.zeros(3), EPS),
            r"gamma.*\(3\)",
        ),
        (
            lambda: batchnorm.batchnorm_forward_train(np.zeros((0, 3)), np.ones(3), np.zeros(3), EPS),
            r"no values",
        ),
        (
            lambda: batchnorm.batchnorm_forward_eval(
                np.zeros((2, 3)), np.ones(3), np.zeros(3), np.zeros(2), np.ones(3), EPS
            ),
            r"running_mean",
        ),
        (
            lambda: batchnorm.batchnorm_backward(
                np.zeros((2, 3)), np.zeros((2, 4)), np.ones(4), np.zeros(4), np.ones(4)
            ),
            r"dy shape",
        ),
    ],
)
def test_argument_checks(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize("shape", [(2, 3, 5, 6), (8, 16, 7, 7), (5, 4)])
def test_forward_eval_matches_onnxruntime(shape):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper

    x, gamma, beta, _ = random_case(shape, seed=2)
    rng = np.random.default_rng(3)
    running_mean = rng.standard_normal(shape[1]).astype(np.float32)
    running_var = rng.uniform(0.1, 4, shape[1]).astype(np.float32)
    names = ["x", "scale", "bias", "mean", "var"]
    graph = helper.make_graph(
        [helper.make_node("BatchNormalization", names, ["y"], epsilon=EPS)],
        "bn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))]
        + [helper.make_tensor_value_info(n, TensorProto.FLOAT, [shape[1]]) for n in names[1:]],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(shape))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    feeds = dict(zip(names, (x, gamma, beta, running_mean, running_var)))
    expected = session.run(None, feeds)[0]
    y = batchnorm.batchnorm_forward_eval(x, gamma, beta, running_mean, running_var, EPS)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
