"""The affine layer (y = x * scale[c] + shift[c]): shapes, ONNX export against onnxruntime, the executor and
numpy, gradients against finite differences, the YAML round trip, and the import of Mul, Div, Add and Sub by a
scalar or per-channel constant (input normalisation) that no Conv took."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from dlc.compiler.errors import DlcError
from dlc.compiler.export_onnx import check, to_onnx
from dlc.compiler.frontend import load_model, load_model_text
from dlc.compiler.onnx_import import import_onnx, verify_import
from dlc.compiler.train.checkpoint import save_checkpoint
from dlc.compiler.train.executor import Executor
from dlc.compiler.yaml_writer import graph_to_yaml

from helpers import errors_of, load, model_yaml

FEATURES = """
- {name: a, type: affine, scale_filler: {type: uniform, low: 0.5, high: 2.0}, shift_filler: {type: gaussian, std: 1.0}}
- {name: r, type: relu}
"""
FLAT = """
- {name: g, type: global_avgpool}
- {name: f, type: flatten}
- {name: a, type: affine, scale_filler: {type: gaussian, std: 1.0}, shift_filler: {type: constant, value: 0.5}}
"""


def _ort(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def _rand(shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def test_shapes_and_parameters():
    graph = load(FEATURES, shape=(3, 5, 4)).graph
    node = graph.node("a")
    assert graph.shapes["a"] == (3, 5, 4)
    assert {k: v.shape for k, v in node.params.items()} == {"scale": (3,), "shift": (3,)}
    flat = load(FLAT, shape=(6, 4, 4)).graph
    assert flat.shapes["a"] == (6,)
    assert {k: v.shape for k, v in flat.node("a").params.items()} == {"scale": (6,), "shift": (6,)}
    defaults = load("- {name: a, type: affine}", shape=(2, 3, 3)).graph.node("a").params
    np.testing.assert_array_equal(defaults["scale"], np.ones(2, np.float32))
    np.testing.assert_array_equal(defaults["shift"], np.zeros(2, np.float32))
    assert errors_of(
        model_yaml("- {name: a, type: affine, scale: 2.0}")
    )  # scale is a tensor, not a parameter


@pytest.mark.parametrize("opset", [13, 17])
@pytest.mark.parametrize("layers, shape", [(FEATURES, (3, 5, 4)), (FLAT, (6, 4, 4))], ids=["chw", "flat"])
def test_export_matches_executor_and_numpy(layers, shape, opset):
    graph = load(layers, shape=shape).graph
    p = graph.node("a").params
    x = _rand((2, *shape), 1)
    if len(graph.shapes["a"]) == 3:
        want = np.maximum(x * p["scale"][:, None, None] + p["shift"][:, None, None], 0)
    else:
        want = x.mean(axis=(2, 3)) * p["scale"] + p["shift"]
    model = to_onnx(graph, opset=opset)
    check(model)
    onnx.checker.check_model(model, full_check=True)
    assert [n.op_type for n in model.graph.node if n.name.startswith("a")] == ["Mul", "Add"]
    np.testing.assert_allclose(_ort(model, x), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(Executor(graph).forward(x)[graph.outputs[0]], want, rtol=1e-5, atol=1e-6)


def _agrees(f, analytic: float, tol: float = 1e-2) -> bool:
    """Central differences of f(eps) at two step sizes (a ReLU kink can spoil one step, not both)."""
    for eps in (1e-3, 3e-4):
        numeric = (f(eps) - f(-eps)) / (2 * eps)
        if abs(numeric - analytic) <= tol * abs(analytic) + 2e-3:
            return True
    return False


@pytest.mark.parametrize("layers, shape", [(FEATURES, (3, 5, 4)), (FLAT, (6, 4, 4))], ids=["chw", "flat"])
def test_gradients_match_finite_differences(layers, shape):
    graph = load(layers, shape=shape).graph
    ex = Executor(graph)
    rng = np.random.default_rng(2)
    x = _rand((3, *shape), 3)
    out = graph.outputs[0]
    proj = rng.standard_normal((3, *graph.shapes[out]))

    def loss(xx) -> float:
        y = ex.forward(xx, train=True)[out]
        return float((y.astype(np.float64) * proj).sum())

    loss(x)
    grads = ex.backward({out: proj.astype(np.float32)}, input_grads=True)
    params = graph.node("a").params
    base = {k: v.copy() for k, v in params.items()}
    dx = rng.standard_normal(x.shape).astype(np.float32)
    dinput = ex.input_grads[graph.input_names[0]]
    assert _agrees(lambda e: loss(x + e * dx), float((dinput * dx).sum()))
    for name in ("scale", "shift"):
        d = rng.standard_normal(base[name].shape).astype(np.float32)
        analytic = float((grads["a"][name] * d).sum())

        def f(e, name=name, d=d):
            params[name][...] = base[name] + e * d
            try:
                return loss(x)
            finally:
                params[name][...] = base[name]

        assert _agrees(f, analytic), name


# ---------------------------------------------------------------------------------------------------------
# import


def _model(nodes, consts, shape=(1, 3, 8, 8), out_shape=None) -> onnx.ModelProto:
    inits = [
        helper.make_tensor(k, TensorProto.FLOAT, v.shape, np.asarray(v, np.float32).ravel())
        for k, v in consts
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
        [helper.make_tensor_value_info(nodes[-1].output[0], TensorProto.FLOAT, list(out_shape or shape))],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _import(model: onnx.ModelProto):
    graph = import_onnx(model)
    verify_import(model, graph)
    return graph


def test_import_input_normalisation_before_conv():
    rng = np.random.default_rng(4)
    mean = np.array([0.485, 0.456, 0.406]).reshape(1, 3, 1, 1)
    std = np.array([0.229, 0.224, 0.225]).reshape(1, 3, 1, 1)
    consts = [
        ("mean", mean),
        ("std", std),
        ("w", rng.standard_normal((4, 3, 3, 3))),
        ("b", rng.standard_normal(4)),
    ]
    nodes = [
        helper.make_node("Sub", ["x", "mean"], ["centred"], name="centre"),
        helper.make_node("Div", ["centred", "std"], ["normed"], name="scale"),
        helper.make_node("Conv", ["normed", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["y"], name="relu"),
    ]
    model = _model(nodes, consts, out_shape=(1, 4, 8, 8))
    graph = _import(model)
    ops = [n.op for n in graph.nodes()]
    assert "affine" in ops and ops[-2:] == ["conv", "relu"], ops
    x = _rand((1, 3, 8, 8), 5)
    want = _ort(model, x)
    np.testing.assert_allclose(Executor(graph).forward(x)[graph.outputs[0]], want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(_ort(to_onnx(graph), x), want, rtol=1e-4, atol=1e-4)


def test_import_scalar_mul_and_constant_minus_x():
    shift = np.array([1.0, -2.0, 0.5]).reshape(3, 1, 1)
    nodes = [
        helper.make_node(
            "Mul", ["k", "x"], ["scaled"], name="times"
        ),  # the constant first: a product commutes
        helper.make_node("Sub", ["c", "scaled"], ["flipped"], name="flip"),
        helper.make_node("Add", ["flipped", "half"], ["shifted"], name="plus"),
        helper.make_node("Div", ["shifted", "two"], ["y"], name="halve"),
    ]
    consts = [
        ("k", np.array(3.0)),
        ("c", shift),
        ("half", np.array([0.5])),
        ("two", np.full((1, 3, 1, 1), 2.0)),
    ]
    model = _model(nodes, consts)
    graph = _import(model)
    ops = [n.op for n in graph.nodes()]
    assert set(ops) == {"affine"}, ops
    x = _rand((1, 3, 8, 8), 6)
    want = (shift - 3.0 * x + 0.5) / 2.0
    np.testing.assert_allclose(_ort(model, x), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(Executor(graph).forward(x)[graph.outputs[0]], want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(graph.node("times").params["scale"], [3.0, 3.0, 3.0])
    np.testing.assert_allclose(graph.node("flip").params["scale"], [-1.0, -1.0, -1.0])
    np.testing.assert_allclose(graph.node("flip").params["shift"], shift.ravel())


def test_import_flat_per_channel_constant():
    nodes = [
        helper.make_node("GlobalAveragePool", ["x"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flat"),
        helper.make_node("Sub", ["f", "m"], ["y"], name="centre"),
    ]
    graph = _import(_model(nodes, [("m", np.array([1.0, 2.0, 3.0]))], out_shape=(1, 3)))
    assert graph.node("centre").op == "affine"
    np.testing.assert_allclose(graph.node("centre").params["shift"], [-1.0, -2.0, -3.0])


def test_yaml_round_trip(tmp_path):
    nodes = [
        helper.make_node("Sub", ["x", "mean"], ["c"], name="centre"),
        helper.make_node("Div", ["c", "std"], ["y"], name="scale"),
    ]
    consts = [
        ("mean", np.array([0.1, 0.2, 0.3]).reshape(1, 3, 1, 1)),
        ("std", np.array([0.5, 0.25, 2.0]).reshape(3, 1, 1)),
    ]
    graph = _import(_model(nodes, consts))
    text = graph_to_yaml(graph, None)
    assert "type: affine" in text
    bare = load_model_text(text, "m.yaml").graph
    assert [n.op for n in bare.nodes()] == [n.op for n in graph.nodes()]
    assert {n.name: n.params["scale"].shape for n in bare.nodes()} == {n.name: (3,) for n in graph.nodes()}
    save_checkpoint(tmp_path / "weights.safetensors", graph)
    (tmp_path / "model.yaml").write_text(graph_to_yaml(graph, "weights.safetensors"))
    loaded = load_model(tmp_path / "model.yaml").graph
    x = _rand((2, 3, 8, 8), 7)
    np.testing.assert_allclose(
        Executor(loaded).forward(x)[loaded.outputs[0]],
        Executor(graph).forward(x)[graph.outputs[0]],
        rtol=1e-6,
    )


@pytest.mark.parametrize(
    "op, shape, message",
    [
        ("Mul", (1, 1, 8, 1), "multiplies by a constant"),
        ("Add", (1, 1, 1, 8), "adds a constant"),
        ("Sub", (3, 8, 8), "subtracts a constant"),
        ("Div", (1, 1, 8, 1), "divides by a constant"),
    ],
)
def test_non_channel_constant_rejected(op, shape, message):
    model = _model([helper.make_node(op, ["x", "k"], ["y"], name="odd")], [("k", np.full(shape, 2.0))])
    with pytest.raises(DlcError, match=message):
        import_onnx(model)


def test_constant_divided_by_tensor_rejected():
    model = _model([helper.make_node("Div", ["k", "x"], ["y"], name="inv")], [("k", np.array(1.0))])
    with pytest.raises(DlcError, match="divides a constant by a tensor"):
        import_onnx(model)
