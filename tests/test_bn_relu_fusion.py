"""Batch norm fused with the ReLU after it: the kernels against the unfused pair and the numpy references, and
the executor's training steps and inference through fused pairs against the same graph run unfused."""

import numpy as np
import pytest

import dlc._C as native
from dlc._C import activation, batchnorm
from dlc._C.batchnorm_ref import (
    batchnorm_backward_ref,
    batchnorm_forward_eval_ref,
    batchnorm_forward_train_ref,
)
from dlc.compiler.train.executor import Executor

from helpers import load

# The baseline build sums exactly as the unfused pair does; the ISA builds may reassociate batch norm's float64
# sums (setup.py), which the float32 results almost never show.
EXACT = native.ISA == "baseline"


def _same(got, want):
    if EXACT:
        np.testing.assert_array_equal(got, want)
    else:
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * max(1.0, float(np.abs(want).max())))


@pytest.mark.parametrize("shape", [(8, 5, 7, 9), (3, 4), (2, 16, 33, 1), (64, 3, 12, 12)])
def test_fused_kernels_equal_batchnorm_then_relu(shape):
    rng = np.random.default_rng(sum(shape))
    x = (rng.standard_normal(shape) * 3 + 0.5).astype(np.float32)
    gamma = rng.uniform(0.5, 1.5, shape[1]).astype(np.float32)
    beta = rng.normal(0, 0.5, shape[1]).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    y, mean, invstd = batchnorm.batchnorm_forward_train(x, gamma, beta, 1e-5)
    yr, mean_r, invstd_r = batchnorm.batchnorm_forward_train(x, gamma, beta, 1e-5, relu=True)
    np.testing.assert_array_equal(yr, activation.relu_forward(y))
    assert 0.2 < (yr > 0).mean() < 0.8  # both sides of the kink are exercised
    np.testing.assert_array_equal(mean_r, mean)
    np.testing.assert_array_equal(invstd_r, invstd)
    unfused = batchnorm.batchnorm_backward(activation.relu_backward(dy, yr), x, gamma, mean, invstd)
    fused = batchnorm.batchnorm_backward(dy, x, gamma, mean, invstd, yr)
    for got, want in zip(fused, unfused):
        _same(got, want)
    ref_y, ref_mean, ref_invstd = batchnorm_forward_train_ref(x, gamma, beta, 1e-5, relu=True)
    np.testing.assert_allclose(yr, ref_y, rtol=1e-5, atol=1e-5)
    for got, want in zip(fused, batchnorm_backward_ref(dy, x, gamma, mean, invstd, yr)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(want).max())))
    running = rng.normal(0, 0.3, shape[1]).astype(np.float32), rng.uniform(0.5, 2, shape[1]).astype(np.float32)
    ye = batchnorm.batchnorm_forward_eval(x, gamma, beta, *running, 1e-5, relu=True)
    np.testing.assert_array_equal(ye, activation.relu_forward(batchnorm.batchnorm_forward_eval(x, gamma, beta, *running,
                                                                                              1e-5)))
    np.testing.assert_array_equal(ye, batchnorm_forward_eval_ref(x, gamma, beta, *running, 1e-5, relu=True))


def test_fused_kernels_keep_nan_and_check_shapes():
    x = np.ones((2, 3, 4), np.float32)
    x[0, 1, 2] = np.nan
    y, mean, invstd = batchnorm.batchnorm_forward_train(x, np.ones(3, np.float32), np.zeros(3, np.float32), 1e-5,
                                                        relu=True)
    assert np.isnan(y[:, 1]).all() and not np.isnan(y[:, 0]).any()  # NaN passes ReLU, as relu_forward's does
    with pytest.raises(ValueError, match="y shape"):
        batchnorm.batchnorm_backward(x, x, np.ones(3, np.float32), mean, invstd, np.ones((2, 3, 5), np.float32))


LAYERS = """
- {name: c1, type: conv, out: 6, kernel: 3, pad: 1, inputs: [input]}
- {name: bn1, type: batchnorm, inputs: [c1]}
- {name: r1, type: relu, inputs: [bn1]}
- {name: c2, type: conv, out: 6, kernel: 3, pad: 1, inputs: [r1]}
- {name: bn2, type: batchnorm, inputs: [c2]}
- {name: r2, type: relu, inputs: [bn2]}
- {name: bn3, type: batchnorm, inputs: [r2]}
- {name: r3, type: relu, inputs: [bn3]}
- {name: skip, type: add, inputs: [r3, bn3]}
- {name: pool, type: global_avgpool, inputs: [skip]}
- {name: flat, type: flatten, inputs: [pool]}
- {name: fc, type: linear, out: 4, inputs: [flat]}
"""


def _executor(fuse: bool) -> Executor:
    graph = load(LAYERS, shape=(3, 10, 10)).graph
    rng = np.random.default_rng(2)
    for node in graph.nodes():
        for name, value in node.params.items():
            if name in ("mean", "var"):
                continue
            value[...] = rng.standard_normal(value.shape).astype(np.float32) * (0.4 if name == "weight" else 0.2)
            if name == "scale":
                value += 1.0
    ex = Executor(graph)
    if not fuse:
        ex._relu_after = {}
    return ex


def test_executor_fuses_only_a_batchnorm_its_relu_alone_reads():
    ex = _executor(True)
    assert {ex.nodes[i].name: ex.nodes[j].name for i, j in ex._relu_after.items()} == {"bn1": "r1", "bn2": "r2"}


def _train(ex: Executor, xs: list[np.ndarray]) -> list:
    """Three SGD steps; what each produced (logits, parameter and input gradients, running statistics), then an
    inference forward."""
    record = []
    for step, x in enumerate(xs):
        logits = ex.forward(x, train=True)["fc"]
        seed = np.random.default_rng(step).standard_normal(logits.shape).astype(np.float32)
        grads = ex.backward({"fc": seed}, input_grads=True)
        record.append(logits)
        record += [grads[layer][tensor] for layer in sorted(grads) for tensor in sorted(grads[layer])]
        record.append(ex.input_grads["input"])
        record += [n.params[s].copy() for n in ex.graph.nodes() if n.op == "batchnorm" for s in ("mean", "var")]
        for node in ex.graph.nodes():  # the weights move between steps
            for tensor, g in grads.get(node.name, {}).items():
                node.params[tensor] -= 0.05 * g
    record.append(ex.forward(xs[0])["fc"])
    return record


def test_training_steps_through_fused_pairs_equal_the_unfused_graph():
    rng = np.random.default_rng(3)
    xs = [rng.standard_normal((8, 3, 10, 10)).astype(np.float32) for _ in range(3)]
    fused, unfused = _train(_executor(True), xs), _train(_executor(False), xs)
    assert len(fused) == len(unfused) > 3 * 14
    for a, b in zip(fused, unfused):
        _same(a, b)


def test_a_requested_batchnorm_output_is_not_fused_away():
    ex = _executor(True)
    x = np.random.default_rng(0).standard_normal((2, 3, 10, 10)).astype(np.float32)
    out = ex.forward(x, outputs=["bn1", "fc"])
    assert out["bn1"].min() < 0  # batch norm's own output, before its ReLU
    np.testing.assert_array_equal(out["fc"], _executor(False).forward(x)["fc"])
