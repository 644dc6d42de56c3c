"""The training backend's executor: eval forward equals onnxruntime on every example, and whole-graph
gradients (through every op type, branches included) agree with finite differences."""

import numpy as np
import pytest

from dlc.compiler.frontend import load_model
from dlc.compiler.train.executor import Executor

from helpers import EXAMPLES, load, ort_session, random_input


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_eval_forward_matches_onnxruntime(path):
    graph = load_model(path).graph
    rng = np.random.default_rng(3)
    for node in graph.nodes():  # non-trivial BN statistics, so eval mode really uses them
        if node.op == "batchnorm":
            c = node.params["mean"].shape[0]
            node.params["mean"][...] = rng.normal(0, 0.1, c)
            node.params["var"][...] = rng.uniform(0.5, 2.0, c)
            node.params["scale"][...] = rng.uniform(0.5, 1.5, c)
            node.params["bias"][...] = rng.normal(0, 0.1, c)
    x = random_input(graph, batch=3, seed=4)
    ours = Executor(graph).forward(x)[graph.outputs[0]]
    theirs = ort_session(graph).run(None, {graph.input_names[0]: x})[0]
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5 * max(1.0, float(np.abs(theirs).max())))


EVERY_OP = """
- {name: c1, type: conv, out: 6, kernel: [3, 2], stride: [2, 1], pad: [1, 0, 0, 1]}
- {name: bn1, type: batchnorm}
- {name: a1, type: leaky_relu, slope: 0.1}
- {name: dw, type: conv, out: 6, kernel: 3, pad: 1, groups: 6, dilation: 1}
- {name: s1, type: silu}
- {name: p1, type: maxpool, kernel: 2, stride: 2, ceil_mode: true}
- {name: b1, type: conv, out: 4, kernel: 1, inputs: p1}
- {name: b2, type: avgpool, kernel: 3, stride: 1, pad: 1, inputs: p1}
- {name: b2c, type: conv, out: 4, kernel: 1}
- {name: t2, type: tanh}
- {name: cat, type: concat, inputs: [b1, t2]}
- {name: up, type: upsample, scale: 2}
- {name: sg, type: sigmoid}
- {name: c3, type: conv, out: 8, kernel: 3, pad: same, dilation: 2, inputs: sg}
- {name: r3, type: relu}
- {name: skip, type: conv, out: 8, kernel: 1, inputs: up}
- {name: add, type: add, inputs: [r3, skip, up2]}
- {name: g, type: global_avgpool}
- {name: f, type: flatten}
- {name: fc, type: linear, out: 5}
- {name: bn2, type: batchnorm}
- {name: sm, type: softmax}
"""


def _every_op_graph():
    text = EVERY_OP.replace("inputs: [r3, skip, up2]", "inputs: [r3, skip, c3]")
    return load(text, shape=(3, 11, 9)).graph


STEPS = (1e-3, 3e-4)
ATOL = 2e-3  # what float32 rounding of the loss leaves in a central difference at these steps


def _numeric(f) -> list[float]:
    """Central differences of f(eps) at two step sizes: ReLU and max-pool kinks can spoil one step, not both."""
    return [(f(eps) - f(-eps)) / (2 * eps) for eps in STEPS]


def _agrees(numeric: list[float], analytic: float, tol: float) -> bool:
    """The analytic directional derivative agrees with the finite differences at some step (a wrong gradient
    fails at every step)."""
    return any(abs(n - analytic) <= tol * abs(analytic) + ATOL for n in numeric)


def _check(numeric: list[float], analytic: float, tol: float, what) -> None:
    """Agreement, and a check that can fail: the same differences reject no gradient, the negated one and
    twice it (so the directional derivative is well above the rounding floor)."""
    assert _agrees(numeric, analytic, tol), (what, numeric, analytic)
    for wrong in (0.0, -analytic, 2 * analytic):
        assert not _agrees(numeric, wrong, tol), (what, "cannot tell", wrong, "from", analytic, numeric)


def _loss(ex, x, proj, rng_seed=0):
    out = ex.forward(x, train=True, rng=np.random.default_rng(rng_seed))
    y = next(iter(out.values()))
    return float((y.astype(np.float64) * proj).sum()), y


# Biases followed (through linear maps) by a training-mode batch norm, which removes any constant shift: their
# gradients are zero up to float32 rounding, so a finite difference cannot tell a right one from a wrong one.
SHADOWED = {("c1", "bias"), ("skip", "bias"), ("fc", "bias")}


def _check_shadowed(graph, grads) -> None:
    """Exactly the SHADOWED biases have (near-)zero gradients: at most 1e-5 of the largest gradient entry."""
    scale = max(float(np.abs(g).max()) for node in grads.values() for g in node.values())
    assert scale > 0.1
    tiny = {(n, t) for n, node in grads.items() for t, g in node.items() if np.abs(g).max() <= 1e-5 * scale}
    assert tiny == SHADOWED, tiny
    for n, t in SHADOWED:
        assert graph.node(n).params[t].shape == grads[n][t].shape


def test_whole_graph_gradients_match_finite_differences():
    graph = _every_op_graph()
    ex = Executor(graph)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 3, 11, 9)).astype(np.float32)
    _, y = _loss(ex, x, 0)
    proj = rng.standard_normal(y.shape)
    loss, _ = _loss(ex, x, proj)
    grads = ex.backward({graph.outputs[0]: proj.astype(np.float32)}, input_grads=True)
    _check_shadowed(graph, grads)
    # Directional derivative along a random direction in all parameters at once, and in the input.
    params = [(n, t) for n in graph.nodes() for t in grads.get(n.name, {})]
    assert {n.op for n, _ in params} >= {"conv", "batchnorm", "linear"}
    directions = {(n.name, t): rng.standard_normal(n.params[t].shape).astype(np.float32) for n, t in params}
    analytic = sum(float((grads[n.name][t].astype(np.float64) * directions[(n.name, t)]).sum()) for n, t in params)
    saved = {(n.name, t): n.params[t].copy() for n, t in params}

    def shifted(eps):
        for n, t in params:
            n.params[t][...] = saved[(n.name, t)] + eps * directions[(n.name, t)]
        return _loss(ex, x, proj)[0]

    _check(_numeric(shifted), analytic, 2e-2, "all parameters")
    for n, t in params:
        n.params[t][...] = saved[(n.name, t)]

    dx = ex.input_grads["input"]
    d = rng.standard_normal(x.shape).astype(np.float32)
    analytic = float((dx.astype(np.float64) * d).sum())
    _check(_numeric(lambda eps: _loss(ex, x + eps * d, proj)[0]), analytic, 2e-2, "input")


def test_per_tensor_gradients_match_finite_differences():
    """Each parameter tensor on its own, so one wrong gradient cannot hide behind the others; the biases whose
    gradients batch norm makes zero are checked to be zero instead."""
    graph = _every_op_graph()
    ex = Executor(graph)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((6, 3, 11, 9)).astype(np.float32)
    proj = rng.standard_normal((6, 5))
    _loss(ex, x, proj)
    grads = ex.backward({graph.outputs[0]: proj.astype(np.float32)})
    _check_shadowed(graph, grads)
    checked = 0
    for node in graph.nodes():
        for t, g in grads.get(node.name, {}).items():
            d = rng.standard_normal(g.shape).astype(np.float32)
            base = node.params[t].copy()

            def shifted(eps, node=node, t=t, d=d, base=base):
                node.params[t][...] = base + eps * d
                return _loss(ex, x, proj)[0]

            numeric = _numeric(shifted)
            node.params[t][...] = base
            if (node.name, t) in SHADOWED:  # the loss does not change along any direction in these either
                assert all(abs(n) <= ATOL for n in numeric), (node.name, t, numeric)
                continue
            _check(numeric, float((g.astype(np.float64) * d).sum()), 3e-2, (node.name, t))
            checked += 1
    assert checked == sum(len(v) for v in grads.values()) - len(SHADOWED) == 15


def test_dropout_train_and_eval():
    graph = load("- {name: d, type: dropout, ratio: 0.5}", shape=(2, 8, 8)).graph
    ex = Executor(graph)
    x = np.ones((4, 2, 8, 8), np.float32)
    np.testing.assert_array_equal(ex.forward(x)["d"], x)
    y = ex.forward(x, train=True, rng=np.random.default_rng(0))["d"]
    assert set(np.unique(y)) == {0.0, 2.0} and 0.4 < (y == 0).mean() < 0.6
    again = ex.forward(x, train=True, rng=np.random.default_rng(0))["d"]
    np.testing.assert_array_equal(y, again)  # the mask is a function of the generator
    ex.backward({"d": np.ones_like(y)}, input_grads=True)
    np.testing.assert_array_equal(ex.input_grads["input"], y)


def test_batchnorm_running_statistics_update():
    graph = load("- {name: bn, type: batchnorm, momentum: 0.25}", shape=(3, 4, 4)).graph
    ex = Executor(graph)
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((8, 3, 4, 4)) * 2 + 1).astype(np.float32)
    ex.forward(x, train=True)
    p = graph.node("bn").params
    mean = x.mean(axis=(0, 2, 3))
    var = x.var(axis=(0, 2, 3), ddof=1)
    np.testing.assert_allclose(p["mean"], 0.75 * 0 + 0.25 * mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(p["var"], 0.75 * 1 + 0.25 * var, rtol=1e-4)
