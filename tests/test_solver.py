"""Learning-rate policies and the solver's updates, against hand-written formulas."""

import math

import numpy as np
import pytest

from dlc.compiler.train.schedule import LRSchedule
from dlc.compiler.train.solver import Solver, SolverConfig


def test_policies():
    it = 10  # iterations per epoch
    s = LRSchedule(0.1, "step", it, 100, gamma=0.5, step_size=3)
    assert [s(i) for i in (0, 29, 30, 59, 60)] == pytest.approx([0.1, 0.1, 0.05, 0.05, 0.025])
    s = LRSchedule(0.1, "multistep", it, 100, gamma=0.1, steps=[2, 5])
    assert [s(i) for i in (19, 20, 49, 50)] == pytest.approx([0.1, 0.01, 0.01, 0.001])
    s = LRSchedule(0.1, "exp", it, 100, gamma=0.9)
    assert s(25) == pytest.approx(0.1 * 0.9 ** 2.5)
    s = LRSchedule(0.1, "poly", it, 100, power=2)
    assert s(50) == pytest.approx(0.1 * 0.25)
    s = LRSchedule(0.1, "cosine", it, 100)
    assert [s(0), s(50), s(100)] == pytest.approx([0.1, 0.05, 0.0])
    assert LRSchedule(0.1, "fixed", it, 100)(77) == 0.1


def test_linear_warmup():
    s = LRSchedule(0.1, "fixed", 10, 100, warmup_iters=20, warmup_start_factor=0.2)
    assert [s(0), s(10), s(20), s(50)] == pytest.approx([0.02, 0.06, 0.1, 0.1])


def _run(config, steps=3, lr_mult=None):
    rng = np.random.default_rng(0)
    w = rng.standard_normal(5).astype(np.float32)
    grads = [rng.standard_normal(5).astype(np.float32) for _ in range(steps)]
    params = {"l.weight": w.copy()}
    solver = Solver(params, config, lr_mult)
    for g in grads:
        solver.step({"l.weight": g}, lr=0.1)
    return w.astype(np.float64), [g.astype(np.float64) for g in grads], params["l.weight"]


def test_sgd_momentum_weight_decay_l1():
    w, grads, got = _run(SolverConfig("sgd", momentum=0.9, weight_decay=0.01, l1=0.001))
    v = np.zeros(5)
    for g in grads:
        g = g + 0.01 * w + 0.001 * np.sign(w)
        v = 0.9 * v + g
        w = w - 0.1 * v
    np.testing.assert_allclose(got, w, rtol=1e-5)


def test_nesterov():
    w, grads, got = _run(SolverConfig("sgd", momentum=0.9, nesterov=True))
    v = np.zeros(5)
    for g in grads:
        v = 0.9 * v + g
        w = w - 0.1 * (g + 0.9 * v)
    np.testing.assert_allclose(got, w, rtol=1e-5)


@pytest.mark.parametrize("kind", ["adam", "adamw"])
def test_adam(kind):
    w, grads, got = _run(SolverConfig(kind, weight_decay=0.1, betas=(0.9, 0.99), eps=1e-8))
    m = v = np.zeros(5)
    for t, g in enumerate(grads, 1):
        if kind == "adam":
            g = g + 0.1 * w
        else:
            w = w - 0.1 * 0.1 * w
        m = 0.9 * m + 0.1 * g
        v = 0.99 * v + 0.01 * g * g
        w = w - 0.1 * (m / (1 - 0.9 ** t)) / (np.sqrt(v / (1 - 0.99 ** t)) + 1e-8)
    np.testing.assert_allclose(got, w, rtol=1e-5)


def test_frozen_and_lr_mult():
    w, grads, got = _run(SolverConfig("sgd", momentum=0.0), lr_mult={"l.weight": 0.0})
    np.testing.assert_array_equal(got, w.astype(np.float32))
    w, grads, got = _run(SolverConfig("sgd", momentum=0.0), steps=1, lr_mult={"l.weight": 0.5})
    np.testing.assert_allclose(got, w - 0.05 * grads[0], rtol=1e-6)


def test_gradient_clipping():
    params = {"a.weight": np.zeros(2, np.float32)}
    solver = Solver(params, SolverConfig("sgd", momentum=0.0, clip_grad_norm=1.0))
    norm = solver.step({"a.weight": np.array([3.0, 4.0], np.float32)}, lr=1.0)
    assert norm == pytest.approx(5.0)
    np.testing.assert_allclose(params["a.weight"], [-0.6, -0.8], rtol=1e-6)
    assert math.isclose(float(np.linalg.norm(params["a.weight"])), 1.0, rel_tol=1e-6)
