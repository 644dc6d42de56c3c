"""mul, conv_transpose, pad and lrn end to end: shape inference, ONNX export against onnxruntime, the executor
and a numpy formula, gradients against finite differences, and ONNX import of hand-built models and of PyTorch
exports."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from dlc.compiler.errors import DlcError
from dlc.compiler.export_onnx import check, to_onnx
from dlc.compiler.onnx_import import import_onnx, verify_import
from dlc.compiler.train.executor import Executor

from helpers import TORCH_FIXTURES, errors_of, load, model_yaml, onnx_model, torch_fixture, torch_nets


def _ort(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def _export_matches(graph, x, want, rtol=1e-5, atol=1e-5):
    """Executor eval forward == numpy formula == onnxruntime on the opset-17 export (full check)."""
    out = graph.outputs[0]
    ours = Executor(graph).forward(x)[out]
    np.testing.assert_allclose(ours, want, rtol=rtol, atol=atol)
    model = to_onnx(graph, opset=17)
    check(model)
    np.testing.assert_allclose(_ort(model, x), ours, rtol=rtol, atol=atol)
    return model


def _agrees(f, analytic: float, tol: float) -> bool:
    """Central differences at two step sizes: a kink can spoil one step, not both (a wrong gradient fails both)."""
    for eps in (1e-3, 3e-4):
        numeric = (f(eps) - f(-eps)) / (2 * eps)
        if abs(numeric - analytic) <= tol * abs(analytic) + 2e-3:
            return True
    return False


def _check_gradients(graph, x, seed=5, expect=()):
    """Directional finite differences of every parameter tensor (one at a time) and of the input."""
    ex = Executor(graph)
    rng = np.random.default_rng(seed)
    out = graph.outputs[0]

    def loss(inp, proj):
        y = ex.forward(inp, train=True, rng=np.random.default_rng(0))[out]
        return float((y.astype(np.float64) * proj).sum()), y

    _, y = loss(x, 0)
    proj = rng.standard_normal(y.shape)
    loss(x, proj)
    grads = ex.backward({out: proj.astype(np.float32)}, input_grads=True)
    for name in expect:
        assert name in grads, name
    for node in graph.nodes():
        for t in grads.get(node.name, {}):
            d = rng.standard_normal(node.params[t].shape).astype(np.float32)
            base = node.params[t].copy()

            def shifted(eps, node=node, t=t, d=d, base=base):
                node.params[t][...] = base + eps * d
                return loss(x, proj)[0]

            analytic = float((grads[node.name][t].astype(np.float64) * d).sum())
            assert _agrees(shifted, analytic, 3e-2), (node.name, t)
            node.params[t][...] = base
    d = rng.standard_normal(x.shape).astype(np.float32)
    analytic = float((ex.input_grads["input"].astype(np.float64) * d).sum())
    assert _agrees(lambda eps: loss(x + eps * d, proj)[0], analytic, 3e-2)


_model = onnx_model


def _check_import(model, types, shape=(4, 6, 6)):
    graph = import_onnx(model)
    assert [n.op for n in graph.nodes()] == types
    verify_import(model, graph, runs=2, rtol=1e-5, atol=1e-5)
    x = (np.random.default_rng(2).standard_normal((3, *shape)) * 2).astype(np.float32)
    np.testing.assert_allclose(
        Executor(graph).forward(x)[graph.outputs[0]], _ort(model, x), rtol=1e-5, atol=1e-5
    )
    return graph


def _torch_import(name, live=False):
    """Import the PyTorch export `name` (tests/fixtures/make_torch_fixtures.py): the committed one, checked against
    torch's outputs stored beside it, or (live) one the installed torch exports now (skipped without torch). The
    import reruns through onnxruntime as the original does, and the executor gives torch's numbers."""
    if live:
        nets = torch_nets()
        model, x = nets.build(name)
        original, want = onnx.load_from_string(nets.export(name, model)), nets.reference(model, x)
    else:
        original, ref = torch_fixture(name)
        x, want = ref["x"], ref["want"]
    graph = import_onnx(original)
    verify_import(original, graph, runs=2, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(Executor(graph).forward(x)[graph.outputs[0]], want, rtol=1e-4, atol=1e-5)
    return graph


LIVE = pytest.mark.parametrize("live", [False, True], ids=["fixture", "live_torch"])


def _rand(shape, seed=0, scale=1.0):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------
# mul

SE = """
- {name: c, type: conv, out: 4, kernel: 3, pad: 1}
- {name: g, type: global_avgpool}
- {name: s1, type: conv, out: 2, kernel: 1}
- {name: r, type: relu}
- {name: s2, type: conv, out: 4, kernel: 1}
- {name: h, type: hard_sigmoid, alpha: 0.16666667}
- {name: m, type: mul, inputs: [c, h]}
"""


def test_mul_shapes_and_errors():
    graph = load(SE, shape=(3, 6, 5)).graph
    assert graph.shapes["m"] == (4, 6, 5)
    graph = load("- {name: a, type: relu}\n- {name: m, type: mul, inputs: [a, input]}", shape=(3, 4, 4)).graph
    assert graph.shapes["m"] == (3, 4, 4)
    bad = "- {name: g, type: global_avgpool}\n- {name: m, type: mul, inputs: [g, input]}"
    messages = errors_of(model_yaml(bad, shape=(3, 4, 4)))
    assert any("3×1×1, 3×4×4" in e for e in messages), messages


def test_mul_export_and_formula():
    graph = load(
        "- {name: g, type: global_avgpool}\n- {name: m, type: mul, inputs: [input, g]}", shape=(3, 4, 5)
    ).graph
    x = _rand((2, 3, 4, 5))
    model = _export_matches(graph, x, x * x.mean(axis=(2, 3), keepdims=True))
    assert [n.op_type for n in model.graph.node] == ["GlobalAveragePool", "Mul"]
    graph = load("- {name: a, type: tanh}\n- {name: m, type: mul, inputs: [a, input]}", shape=(3, 4, 5)).graph
    _export_matches(graph, x, np.tanh(x) * x)


def test_mul_gradients():
    _check_gradients(load(SE, shape=(3, 6, 5)).graph, _rand((3, 3, 6, 5), 1, 2.0))
    same = "- {name: a, type: conv, out: 3, kernel: 3, pad: 1}\n- {name: m, type: mul, inputs: [a, input]}"
    _check_gradients(load(same, shape=(3, 5, 5)).graph, _rand((2, 3, 5, 5), 2))


def test_mul_import_hand_built():
    nodes = [
        helper.make_node("GlobalAveragePool", ["x"], ["g"], name="gap"),
        helper.make_node("Sigmoid", ["g"], ["s"], name="sig"),
        helper.make_node("Mul", ["s", "x"], ["y"], name="gate"),  # the gate first: imported with it second
        helper.make_node("Mul", ["y", "x"], ["z"], name="square"),
    ]
    graph = _check_import(_model(nodes), ["global_avgpool", "sigmoid", "mul", "mul"])
    assert graph.node("gate").inputs == [graph.inputs[0].name, "sig"]
    with pytest.raises(DlcError, match="multiplies by a constant"):
        import_onnx(
            _model([helper.make_node("Mul", ["x", "k"], ["y"], name="k")], [("k", np.ones((4, 6, 6)))])
        )


@LIVE
def test_mul_import_squeeze_excite_pytorch(live):
    graph = _torch_import("squeeze_excite", live)
    assert [n.op for n in graph.nodes()].count("mul") == 1


# ---------------------------------------------------------------------------------------------------------
# conv_transpose


def _conv_transpose_ref(x, w, b, stride, pads, output_padding, dilation, groups):
    """Scatter each input pixel through the kernel (a loop over kernel taps only), then crop the pads."""
    n, c, h, wd = x.shape
    og = w.shape[1]
    kh, kw = w.shape[2:]
    (sh, sw), (dh, dw), (oph, opw) = stride, dilation, output_padding
    full = np.zeros(
        (n, og * groups, (h - 1) * sh + (kh - 1) * dh + 1 + oph, (wd - 1) * sw + (kw - 1) * dw + 1 + opw)
    )
    cg = c // groups
    for g in range(groups):
        xg = x[:, g * cg : (g + 1) * cg].astype(np.float64)
        for i in range(kh):
            for j in range(kw):
                contrib = np.einsum("nchw,co->nohw", xg, w[g * cg : (g + 1) * cg, :, i, j])
                full[
                    :,
                    g * og : (g + 1) * og,
                    i * dh : i * dh + (h - 1) * sh + 1 : sh,
                    j * dw : j * dw + (wd - 1) * sw + 1 : sw,
                ] += contrib
    t, left, bottom, right = pads
    y = full[:, :, t : full.shape[2] - bottom, left : full.shape[3] - right]
    return y + (0 if b is None else b.reshape(1, -1, 1, 1))


CT_CASES = {
    "plain": ("{name: t, type: conv_transpose, out: 5, kernel: 3}", (5, 6, 7)),
    "stride2": ("{name: t, type: conv_transpose, out: 4, kernel: 4, stride: 2, pad: 1}", (4, 8, 10)),
    "output_padding": (
        "{name: t, type: conv_transpose, out: 2, kernel: 3, stride: 2, pad: 1, output_padding: 1, bias: false}",
        (2, 8, 10),
    ),
    "asym_dil_groups": (
        "{name: t, type: conv_transpose, out: 6, kernel: [2, 3], stride: [2, 1], pad: [0, 1, 1, 0], "
        "dilation: [1, 2], groups: 2}",
        (6, 7, 8),
    ),
}


def _ct_case(case, x=None, weight=None):
    layer, shape = CT_CASES[case]
    graph = load(f"- {layer}", shape=(4, 4, 5)).graph
    assert graph.shapes["t"] == shape
    node = graph.node("t")
    a = node.attrs
    rng = np.random.default_rng(3)
    for t in node.params:
        node.params[t][...] = rng.standard_normal(node.params[t].shape)
    if weight is not None:
        node.params["weight"][...] = weight
    x = _rand((2, 4, 4, 5)) if x is None else x
    want = _conv_transpose_ref(
        x,
        node.params["weight"],
        node.params.get("bias"),
        a["stride"],
        a["pads"],
        a["output_padding"],
        a["dilation"],
        a["groups"],
    )
    return graph, x, want


@pytest.mark.parametrize("case", list(CT_CASES))
def test_conv_transpose_shapes_export_and_formula(case):
    graph, x, want = _ct_case(case)
    model = _export_matches(graph, x, want, rtol=1e-4, atol=1e-4)
    assert [n.op_type for n in model.graph.node] == ["ConvTranspose"]


@pytest.fixture(scope="module")
def torch_functional():
    """torch's conv_transpose2d, pad and local_response_norm on fixed inputs (make_torch_fixtures.py)."""
    with np.load(TORCH_FIXTURES / "torch_functional.npz", allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


@pytest.mark.parametrize("case", list(CT_CASES))
def test_conv_transpose_formula_matches_torch(case, torch_functional):
    """The numpy formula (which the executor and onnxruntime match) gives torch's conv_transpose2d: torch takes
    symmetric pads only, so its unpadded output is cropped (and output-padded) here."""
    r = {k[len(f"ct_{case}_"):]: v for k, v in torch_functional.items() if k.startswith(f"ct_{case}_")}
    graph, x, want = _ct_case(case, r["x"], r["weight"])
    node, shape = graph.node("t"), graph.shapes["t"]
    a = node.attrs
    assert list(r["attrs"]) == [*a["stride"], *a["dilation"], a["groups"]]
    full = np.pad(r["full"], [(0, 0), (0, 0), (0, a["output_padding"][0]), (0, a["output_padding"][1])])
    t, left = a["pads"][:2]
    crop = full[:, :, t : t + shape[1], left : left + shape[2]]
    if "bias" in node.params:
        crop = crop + node.params["bias"].reshape(1, -1, 1, 1)
    np.testing.assert_allclose(crop, want, rtol=1e-6, atol=1e-6)


def test_conv_transpose_errors_and_macs():
    messages = errors_of(
        model_yaml("- {name: t, type: conv_transpose, out: 3, kernel: 3, stride: 2, output_padding: 2}")
    )
    assert any("output_padding" in e for e in messages), messages
    messages = errors_of(
        model_yaml("- {name: t, type: conv_transpose, out: 3, kernel: 1, pad: 1}", shape=(3, 1, 1))
    )
    assert any("output height would be -1 for input 3×1×1" in e for e in messages), messages
    assert any(
        "explicit" in e
        for e in errors_of(model_yaml("- {name: t, type: conv_transpose, out: 3, kernel: 3, pad: same}"))
    )
    graph = load(
        "- {name: t, type: conv_transpose, out: 6, kernel: 3, stride: 2, groups: 3}", shape=(3, 4, 4)
    ).graph
    assert graph.node("t").params["weight"].shape == (3, 2, 3, 3)
    from dlc.compiler.ops import get_op

    op = get_op("conv_transpose")
    assert op.macs(graph.node("t").attrs, [(3, 4, 4)], graph.shapes["t"]) == 3 * 16 * 2 * 9


def test_conv_transpose_gradients():
    text = """
    - {name: c, type: conv, out: 4, kernel: 3, stride: 2, pad: 1}
    - {name: t, type: conv_transpose, out: 6, kernel: 3, stride: 2, pad: [1, 0, 1, 1], output_padding: 1, groups: 2}
    - {name: t2, type: conv_transpose, out: 3, kernel: [2, 3], dilation: [1, 2], bias: false}
    """
    graph = load(text, shape=(3, 7, 6)).graph
    _check_gradients(graph, _rand((2, 3, 7, 6), 4), expect=("t", "t2"))


def test_conv_transpose_import_hand_built():
    rng = np.random.default_rng(6)
    w1 = rng.standard_normal((4, 3, 3, 3))
    b1 = rng.standard_normal(3)
    w2 = rng.standard_normal((3, 2, 2, 2))
    nodes = [
        helper.make_node(
            "ConvTranspose",
            ["x", "w1", "b1"],
            ["a"],
            name="up1",
            strides=[2, 2],
            pads=[1, 0, 0, 1],
            output_padding=[1, 1],
        ),
        helper.make_node(
            "ConvTranspose", ["a", "w2"], ["y"], name="up2", strides=[2, 2], output_shape=[24, 24]
        ),
    ]
    graph = _check_import(
        _model(nodes, [("w1", w1), ("b1", b1), ("w2", w2)]), ["conv_transpose", "conv_transpose"]
    )
    assert graph.shapes[graph.outputs[0]] == (2, 24, 24)
    bad = helper.make_node(
        "ConvTranspose",
        ["x", "w1"],
        ["y"],
        name="bad",
        strides=[2, 2],
        pads=[0, 0, 0, 0],
        output_shape=[12, 12],
    )
    with pytest.raises(DlcError, match="output_shape"):
        import_onnx(_model([bad], [("w1", w1)]))


@LIVE
def test_conv_transpose_import_pytorch_decoder(live):
    graph = _torch_import("decoder", live)
    assert [n.op for n in graph.nodes()].count("conv_transpose") == 2


# ---------------------------------------------------------------------------------------------------------
# pad

PAD_CASES = {
    "constant": ("{name: p, type: pad, pads: [1, 2, 0, 3], value: -1.5}", (3, 5, 10)),
    "zero": ("{name: p, type: pad, pads: 1}", (3, 6, 7)),
    "reflect": ("{name: p, type: pad, pads: [2, 1], mode: reflect}", (3, 8, 7)),
    "edge": ("{name: p, type: pad, pads: [0, 3, 2, 1], mode: edge}", (3, 6, 9)),
}


def _pad_case(case, x=None):
    layer, shape = PAD_CASES[case]
    graph = load(f"- {layer}", shape=(3, 4, 5)).graph
    assert graph.shapes["p"] == shape
    a = graph.node("p").attrs
    t, left, b, r = a["pads"]
    x = _rand((2, 3, 4, 5)) if x is None else x
    widths = ((0, 0), (0, 0), (t, b), (left, r))
    if a["mode"] == "constant":
        want = np.pad(x, widths, constant_values=a["value"])
    else:
        want = np.pad(x, widths, mode=a["mode"])
    return graph, x, want


@pytest.mark.parametrize("case", list(PAD_CASES))
def test_pad_shapes_export_and_formula(case):
    graph, x, want = _pad_case(case)
    model = _export_matches(graph, x, want, rtol=0, atol=0)
    assert [n.op_type for n in model.graph.node] == ["Pad"]


@pytest.mark.parametrize("case", list(PAD_CASES))
def test_pad_formula_matches_torch(case, torch_functional):
    graph, x, want = _pad_case(case, torch_functional[f"pad_{case}_x"])
    a = graph.node("p").attrs
    assert list(torch_functional[f"pad_{case}_attrs"]) == [*a["pads"], a["value"] if a["mode"] == "constant" else 0]
    np.testing.assert_array_equal(torch_functional[f"pad_{case}_y"], want)


def test_pad_errors():
    messages = errors_of(model_yaml("- {name: p, type: pad, pads: 4, mode: reflect}", shape=(3, 4, 8)))
    assert any("smaller than the input's height and width: input 3×4×8" in e for e in messages), messages
    assert errors_of(model_yaml("- {name: p, type: pad, pads: 1, mode: wrap}"))
    assert errors_of(model_yaml("- {name: p, type: pad, pads: same}"))
    assert errors_of(model_yaml("- {name: p, type: pad}"))  # pads is required
    messages = errors_of(
        model_yaml(
            "- {name: g, type: global_avgpool}\n- {name: f, type: flatten}\n- {name: p, type: pad, pads: 1}"
        )
    )
    assert any("C×H×W" in e for e in messages), messages


def test_pad_gradients():
    text = """
    - {name: c, type: conv, out: 4, kernel: 3}
    - {name: p1, type: pad, pads: [2, 1, 1, 2], mode: reflect}
    - {name: p2, type: pad, pads: [1, 0, 2, 3], mode: edge}
    - {name: c2, type: conv, out: 3, kernel: 3}
    - {name: p3, type: pad, pads: 1, value: 0.5}
    - {name: c3, type: conv, out: 2, kernel: 2, stride: 2}
    """
    graph = load(text, shape=(3, 7, 6)).graph
    _check_gradients(graph, _rand((2, 3, 7, 6), 7), expect=("c", "c2", "c3"))


def test_pad_import_hand_built():
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        helper.make_node("Pad", ["r", "pads1"], ["a"], name="reflect", mode="reflect"),
        helper.make_node("Pad", ["a", "pads2", "v"], ["b"], name="const"),
        helper.make_node("Pad", ["b", "pads3", "", "axes"], ["y"], name="edge", mode="edge"),
    ]
    inits = [
        ("pads1", np.array([0, 0, 1, 2, 0, 0, 2, 1])),
        ("pads2", np.array([0, 0, 0, 1, 0, 0, 1, 0])),
        ("v", np.array(0.25)),
        ("axes", np.array([3])),
        ("pads3", np.array([2, 1])),
    ]
    model = _model(nodes, [])
    model.graph.initializer.extend(
        numpy_helper.from_array(np.asarray(v, np.float32 if k == "v" else np.int64), k) for k, v in inits
    )
    model.opset_import[0].version = 18  # axes input
    graph = _check_import(model, ["relu", "pad", "pad", "pad"])
    layers = {n.name: n for n in graph.nodes()}
    assert layers["reflect"].attrs["pads"] == (1, 2, 2, 1) and layers["reflect"].attrs["mode"] == "reflect"
    assert layers["const"].attrs["value"] == 0.25
    assert layers["edge"].attrs["pads"] == (0, 2, 0, 1)
    bad = helper.make_node("Pad", ["x", "p"], ["y"], name="chan")
    with pytest.raises(DlcError, match="channel axis"):
        m = _model([bad])
        m.graph.initializer.append(numpy_helper.from_array(np.array([0, 1, 0, 0, 0, 0, 0, 0], np.int64), "p"))
        import_onnx(m)


@LIVE
def test_pad_import_pytorch(live):
    graph = _torch_import("pads", live)
    assert [n.attrs["mode"] for n in graph.nodes() if n.op == "pad"] == ["reflect", "edge", "constant"]


# ---------------------------------------------------------------------------------------------------------
# lrn


def _lrn_ref(x, size, alpha, beta, bias):
    """ONNX's definition, channel by channel."""
    x = x.astype(np.float64)
    c = x.shape[1]
    sq = np.zeros_like(x)
    for i in range(c):
        lo, hi = max(0, i - (size - 1) // 2), min(c - 1, i + int(np.ceil((size - 1) / 2)))
        sq[:, i] = (x[:, lo : hi + 1] ** 2).sum(axis=1)
    return x / (bias + alpha / size * sq) ** beta


LRN_CASES = {
    "default": "{name: n, type: lrn}",
    "alexnet": "{name: n, type: lrn, size: 3, alpha: 0.01, beta: 0.75, bias: 2.0}",
    "wide": "{name: n, type: lrn, size: 9, alpha: 0.5, beta: 0.5, bias: 1.5}",
    "one": "{name: n, type: lrn, size: 1, alpha: 0.3}",
}


def _lrn_case(case, x=None):
    graph = load(f"- {LRN_CASES[case]}", shape=(6, 4, 5)).graph
    assert graph.shapes["n"] == (6, 4, 5)
    a = graph.node("n").attrs
    x = _rand((2, 6, 4, 5), 0, 3.0) if x is None else x
    return graph, a, x, _lrn_ref(x, a["size"], a["alpha"], a["beta"], a["bias"])


@pytest.mark.parametrize("case", list(LRN_CASES))
def test_lrn_shapes_export_and_formula(case):
    graph, _, x, want = _lrn_case(case)
    model = _export_matches(graph, x, want, rtol=1e-5, atol=1e-6)
    assert [n.op_type for n in model.graph.node] == ["LRN"]


@pytest.mark.parametrize("case", list(LRN_CASES))
def test_lrn_formula_matches_torch(case, torch_functional):
    _, a, x, want = _lrn_case(case, torch_functional[f"lrn_{case}_x"])
    np.testing.assert_allclose(torch_functional[f"lrn_{case}_attrs"], [a["size"], a["alpha"], a["beta"], a["bias"]],
                               rtol=1e-12)
    np.testing.assert_allclose(torch_functional[f"lrn_{case}_y"], want, rtol=1e-6, atol=1e-7)


def test_lrn_even_size_follows_onnx():
    """ONNX defines an even window (one more channel above the centre); onnxruntime's CPU kernel takes odd
    sizes only, so the executor is checked against the definition alone."""
    graph = load("- {name: n, type: lrn, size: 4, alpha: 0.2, bias: 2.0}", shape=(6, 3, 3)).graph
    x = _rand((2, 6, 3, 3), 1, 2.0)
    want = _lrn_ref(x, 4, 0.2, 0.75, 2.0)
    np.testing.assert_allclose(Executor(graph).forward(x)["n"], want, rtol=1e-5, atol=1e-6)
    check(to_onnx(graph, opset=17))


def test_lrn_errors():
    assert any(
        "C×H×W" in e for e in errors_of(model_yaml("- {name: f, type: flatten}\n- {name: n, type: lrn}"))
    )
    assert errors_of(model_yaml("- {name: n, type: lrn, size: 0}"))


def test_lrn_gradients():
    text = """
    - {name: c, type: conv, out: 6, kernel: 3}
    - {name: n, type: lrn, size: 3, alpha: 0.5, beta: 0.75, bias: 1.0}
    - {name: c2, type: conv, out: 5, kernel: 1}
    - {name: n2, type: lrn, size: 4, alpha: 0.2, beta: 0.5, bias: 2.0}
    """
    graph = load(text, shape=(3, 6, 5)).graph
    _check_gradients(graph, _rand((2, 3, 6, 5), 8, 2.0), expect=("c", "c2"))


def test_lrn_import_hand_built():
    nodes = [
        helper.make_node("LRN", ["x"], ["a"], name="lrn_a", size=3),
        helper.make_node("LRN", ["a"], ["y"], name="lrn_b", size=5, alpha=0.01, beta=0.5, bias=2.0),
    ]
    graph = _check_import(_model(nodes), ["lrn", "lrn"])
    layers = {n.name: n for n in graph.nodes()}
    assert layers["lrn_a"].attrs == {"size": 3, "alpha": 1e-4, "beta": 0.75, "bias": 1.0}
    assert layers["lrn_b"].attrs == {"size": 5, "alpha": 0.01, "beta": 0.5, "bias": 2.0}


def test_receptive_fields_and_macs_through_the_new_ops():
    from dlc.compiler.analysis import summarize

    text = """
    - {name: p, type: pad, pads: [1, 2, 0, 1], mode: reflect}
    - {name: c, type: conv, out: 4, kernel: 3, stride: 2}
    - {name: g, type: global_avgpool}
    - {name: m, type: mul, inputs: [c, g]}
    - {name: n, type: lrn, size: 3}
    - {name: t, type: conv_transpose, out: 3, kernel: 4, stride: 2, pad: 1}
    """
    layers = {s.name: s for s in summarize(load(text, shape=(3, 16, 16)).graph).layers}
    assert layers["p"].rf_start == [-1.0, -2.0] and layers["p"].rf_size == [1.0, 1.0]
    assert layers["m"].rf_jump == [2.0, 2.0] and layers["m"].rf_size == [17.0, 19.0]
    assert layers["t"].rf_jump == [1.0, 1.0] and layers["t"].output_shape == [3, 16, 18]
    assert layers["t"].macs == 4 * 8 * 9 * 3 * 16 and layers["t"].params == 4 * 3 * 16 + 3
