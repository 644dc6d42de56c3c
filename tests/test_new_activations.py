"""clip (relu6), hard_sigmoid, hard_swish and prelu end to end: shapes, ONNX export at opsets 13 and 17 against
a numpy formula and the executor, whole-graph gradients against finite differences, and ONNX import of
hand-built models and of a MobileNetV3-style PyTorch export."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from dlc.compiler.errors import DlcError
from dlc.compiler.export_onnx import check, to_onnx
from dlc.compiler.onnx_import import import_onnx, verify_import
from dlc.compiler.train.executor import Executor
from dlc.compiler.yaml_writer import graph_to_yaml

from helpers import errors_of, load, model_yaml, onnx_model, torch_fixture, torch_nets


def _ort(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def _hsig(x, alpha, beta):
    return np.clip(alpha * x.astype(np.float64) + beta, 0, 1)


SLOPE = np.array([0.25, -0.5, 0.1], np.float32)
# (layer YAML, numpy formula of the layer's output, ONNX op types at opset 13, at opset 17)
CASES = {
    "relu6": ("{name: a, type: clip}", lambda x: np.clip(x, 0, 6), ["Clip"], ["Clip"]),
    "clip": (
        "{name: a, type: clip, min: -0.5, max: 1.5}",
        lambda x: np.clip(x, -0.5, 1.5),
        ["Clip"],
        ["Clip"],
    ),
    "hard_sigmoid": (
        "{name: a, type: hard_sigmoid}",
        lambda x: _hsig(x, 0.2, 0.5),
        ["HardSigmoid"],
        ["HardSigmoid"],
    ),
    "hard_sigmoid_torch": (
        "{name: a, type: hard_sigmoid, alpha: 0.16666667}",
        lambda x: np.clip(x + 3, 0, 6) / 6,
        ["HardSigmoid"],
        ["HardSigmoid"],
    ),
    "hard_swish": (
        "{name: a, type: hard_swish}",
        lambda x: x * np.clip(x + 3, 0, 6) / 6,
        ["HardSigmoid", "Mul"],
        ["HardSwish"],
    ),
    "prelu": (
        "{name: a, type: prelu}",
        lambda x: np.where(x > 0, x, SLOPE.reshape(1, -1, 1, 1) * x),
        ["PRelu"],
        ["PRelu"],
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_export_matches_formula_and_executor(case):
    layer, formula, types13, types17 = CASES[case]
    graph = load(f"- {layer}", shape=(3, 6, 5)).graph
    assert graph.shapes["a"] == (3, 6, 5)
    node = graph.node("a")
    if node.op == "prelu":
        np.testing.assert_array_equal(node.params["slope"], [0.25] * 3)  # the default filler
        node.params["slope"][...] = SLOPE
    x = (np.random.default_rng(0).standard_normal((4, 3, 6, 5)) * 4).astype(np.float32)
    x.reshape(-1)[:6] = [-3, 0, 3, 6, -0.5, 1.5]  # the kinks
    want = formula(x)
    ours = Executor(graph).forward(x)["a"]
    np.testing.assert_allclose(ours, want, rtol=1e-6, atol=1e-6)
    for opset, types in ((13, types13), (17, types17)):
        model = to_onnx(graph, opset=opset)
        check(model)
        assert [n.op_type for n in model.graph.node] == types
        np.testing.assert_allclose(_ort(model, x), ours, rtol=1e-6, atol=1e-6, err_msg=f"opset {opset}")


def test_prelu_on_flat_vectors_and_yaml():
    text = """
    - {name: g, type: global_avgpool}
    - {name: f, type: flatten}
    - {name: p, type: prelu, slope_filler: {type: constant, value: 0.1}}
    """
    graph = load(text, shape=(3, 4, 4)).graph
    assert graph.shapes["p"] == (3,)
    x = -np.abs(np.random.default_rng(1).standard_normal((2, 3, 4, 4))).astype(np.float32)
    model = to_onnx(graph, opset=13)
    check(model)
    slope = next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == "p.slope")
    assert slope.shape == (3,)
    want = 0.1 * x.mean(axis=(2, 3))
    np.testing.assert_allclose(_ort(model, x), want, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(Executor(graph).forward(x)["p"], want, rtol=1e-5, atol=1e-7)
    assert "{name: p, type: prelu, slope_filler: {type: constant, value: 0.1}}" in graph_to_yaml(graph)


def test_parameter_errors():
    assert any("'min'" in e for e in errors_of(model_yaml("- {name: a, type: clip, min: 2, max: 1}")))
    assert any("alpha" in e for e in errors_of(model_yaml("- {name: a, type: hard_sigmoid, alpha: fast}")))
    assert errors_of(model_yaml("- {name: a, type: prelu, slope: 0.3}"))  # slope is a tensor, not a parameter


# ---------------------------------------------------------------------------------------------------------
# Whole-graph gradients


GRAD_MODEL = """
- {name: c1, type: conv, out: 6, kernel: 3, pad: 1}
- {name: bn1, type: batchnorm}
- {name: p1, type: prelu}
- {name: dw, type: conv, out: 6, kernel: 3, pad: 1, groups: 6}
- {name: r6, type: clip, min: -1.0, max: 1.0}
- {name: c2, type: conv, out: 5, kernel: 1}
- {name: hs, type: hard_swish}
- {name: hg, type: hard_sigmoid, alpha: 0.3, beta: 0.4}
- {name: g, type: global_avgpool}
- {name: f, type: flatten}
- {name: fc, type: linear, out: 4}
- {name: p2, type: prelu, slope_filler: {type: uniform, low: -0.5, high: 0.5}}
"""


def _agrees(f, analytic: float, tol: float) -> bool:
    """Central differences at two step sizes: a kink can spoil one step, not both (a wrong gradient fails both)."""
    for eps in (1e-3, 3e-4):
        numeric = (f(eps) - f(-eps)) / (2 * eps)
        if abs(numeric - analytic) <= tol * abs(analytic) + 2e-3:
            return True
    return False


def _loss(ex, x, proj):
    y = ex.forward(x, train=True, rng=np.random.default_rng(0))["p2"]
    return float((y.astype(np.float64) * proj).sum())


def test_whole_graph_gradients_match_finite_differences():
    graph = load(GRAD_MODEL, shape=(3, 7, 6)).graph
    ex = Executor(graph)
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((4, 3, 7, 6)) * 2).astype(np.float32)
    proj = rng.standard_normal((4, 4))
    _loss(ex, x, proj)
    grads = ex.backward({"p2": proj.astype(np.float32)}, input_grads=True)
    assert set(grads["p1"]) == {"slope"} and set(grads["p2"]) == {"slope"}
    params = [(n, t) for n in graph.nodes() for t in grads.get(n.name, {})]
    for node, t in params:  # each tensor on its own, so one wrong gradient cannot hide behind the others
        d = rng.standard_normal(node.params[t].shape).astype(np.float32)
        base = node.params[t].copy()

        def shifted(eps, node=node, t=t, d=d, base=base):
            node.params[t][...] = base + eps * d
            return _loss(ex, x, proj)

        analytic = float((grads[node.name][t].astype(np.float64) * d).sum())
        assert _agrees(shifted, analytic, 3e-2), (node.name, t)
        node.params[t][...] = base
    d = rng.standard_normal(x.shape).astype(np.float32)
    analytic = float((ex.input_grads["input"].astype(np.float64) * d).sum())
    assert _agrees(lambda eps: _loss(ex, x + eps * d, proj), analytic, 3e-2)


# ---------------------------------------------------------------------------------------------------------
# ONNX import


_model = onnx_model


def _check_import(model, types):
    graph = import_onnx(model)
    assert [n.op for n in graph.nodes()] == types
    verify_import(model, graph, runs=2, rtol=1e-5, atol=1e-6)
    x = (np.random.default_rng(2).standard_normal((3, 4, 6, 6)) * 4).astype(np.float32)
    np.testing.assert_allclose(
        Executor(graph).forward(x)[graph.outputs[0]], _ort(model, x), rtol=1e-5, atol=1e-6
    )
    return graph


def test_import_hand_built_opset17():
    nodes = [
        helper.make_node("Clip", ["x", "zero", "six"], ["a"], name="relu6"),
        helper.make_node("PRelu", ["a", "slope_c"], ["b"], name="prelu_c"),
        helper.make_node("Clip", ["b", "", "one"], ["c"], name="clip_max"),  # no min: open below
        helper.make_node("HardSwish", ["c"], ["d"], name="hswish"),
        helper.make_node("PRelu", ["d", "slope_1"], ["e"], name="prelu_1"),
        helper.make_node("HardSigmoid", ["e"], ["f"], name="hsig", alpha=0.3, beta=0.6),
        helper.make_node("HardSigmoid", ["f"], ["g"], name="hsig_default"),
    ]
    slope_c = np.array([0.1, -0.2, 0.3, 0.25], np.float32).reshape(4, 1, 1)
    inits = [("zero", 0.0), ("six", 6.0), ("one", 1.0), ("slope_c", slope_c), ("slope_1", [0.5])]
    types = ["clip", "prelu", "clip", "hard_swish", "prelu", "hard_sigmoid", "hard_sigmoid"]
    graph = _check_import(_model(nodes, inits), types)
    layers = {n.name: n for n in graph.nodes()}
    assert layers["relu6"].attrs == {"min": 0.0, "max": 6.0}
    assert layers["clip_max"].attrs["max"] == 1.0 and layers["clip_max"].attrs["min"] < -1e38
    np.testing.assert_array_equal(layers["prelu_c"].params["slope"], slope_c.reshape(-1))
    np.testing.assert_array_equal(layers["prelu_1"].params["slope"], [0.5] * 4)  # a scalar slope, broadcast
    assert layers["hsig"].attrs == {"alpha": 0.3, "beta": 0.6}
    assert layers["hsig_default"].attrs == {"alpha": 0.2, "beta": 0.5}
    assert "type: clip" in graph_to_yaml(graph)


def test_import_clip_attributes_before_opset_11():
    nodes = [
        helper.make_node("Clip", ["x"], ["a"], name="relu6", min=0.0, max=6.0),
        helper.make_node("Clip", ["a"], ["b"], name="low", min=0.5),
    ]
    graph = _check_import(_model(nodes, opset=10), ["clip", "clip"])
    assert next(n for n in graph.nodes() if n.name == "relu6").attrs == {"min": 0.0, "max": 6.0}


def test_import_reports_runtime_bounds_and_slopes():
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        helper.make_node("ReduceMin", ["r"], ["lo"], name="lo", keepdims=0),
        helper.make_node("Clip", ["x", "lo"], ["a"], name="clip"),
        helper.make_node("PRelu", ["x", "s"], ["b"], name="prelu_w"),
        helper.make_node("Add", ["a", "b"], ["y"], name="add"),
    ]
    with pytest.raises(DlcError) as info:
        import_onnx(_model(nodes, [("s", np.full((6,), 0.1))]))
    message = str(info.value)
    assert "Clip ×1 (clip) [its min or max is computed at run time]" in message
    assert "PRelu ×1 (prelu_w) [its slope of shape [6] is not per channel or a scalar]" in message
    assert "Add" not in message.split("(dlc imports")[0]  # it only reads the two that failed


@pytest.mark.parametrize("live", [False, True], ids=["fixture", "live_torch"])
def test_import_mobilenet_v3_style_pytorch_export(live):
    """MobileNetV3's inverted residuals with ReLU6, Hardswish, Hardsigmoid and two PReLUs, batch norm kept
    (tests/fixtures/make_torch_fixtures.py): the committed export against torch's outputs stored beside it, or one
    the installed torch exports now (skipped without torch)."""
    if live:
        nets = torch_nets()
        model, x = nets.build("mobilenet_v3")
        original, want = onnx.load_from_string(nets.export("mobilenet_v3", model)), nets.reference(model, x)
    else:
        original, ref = torch_fixture("mobilenet_v3")
        x, want = ref["x"], ref["want"]
    graph = import_onnx(original, source="mbv3.onnx")
    ops = [n.op for n in graph.nodes()]
    assert {"clip", "hard_swish", "hard_sigmoid", "prelu", "batchnorm"} <= set(ops)
    assert ops.count("prelu") == 2 and ops.count("hard_swish") == 3 and ops.count("clip") == 2
    verify_import(original, graph, runs=2, rtol=1e-4, atol=1e-5)
    got = Executor(graph).forward(x)[graph.outputs[0]]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    # and it trains: one backward pass reaches every PReLU slope
    ex = Executor(graph)
    out = ex.forward(x, train=True, rng=np.random.default_rng(0))[graph.outputs[0]]
    grads = ex.backward({graph.outputs[0]: np.ones_like(out)})
    slopes = [grads[n.name]["slope"] for n in graph.nodes() if n.op == "prelu"]
    assert len(slopes) == 2 and all(np.isfinite(g).all() for g in slopes)
    assert np.abs(slopes[0]).max() > 0  # the second sees only the hard sigmoid's outputs, never below 0
