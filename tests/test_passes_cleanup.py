"""The clean-up passes (eliminate, dce, constant_folding, cse): each where it must fire, proven by running the graph
before and after through onnxruntime, and where it must not."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from dlc.compiler.passes import DEFAULT_PASSES, PASSES, OnnxGraph, optimize, verify
from dlc.compiler.passes import rewrites as _rewrites  # noqa: F401  (registers every pass)

from helpers import torch_fixture, torch_nets

OWNED = ["constant_folding", "eliminate", "cse", "dce"]
F = TensorProto.FLOAT


def vi(name: str, shape, elem=F):
    return helper.make_tensor_value_info(name, elem, shape)


def i64(*values) -> np.ndarray:
    return np.array(values, np.int64)


def const(name: str, value: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(value), name))


def model(nodes, inputs, outputs, inits: dict | None = None) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "t",
        inputs,
        outputs,
        initializer=[numpy_helper.from_array(v, k) for k, v in (inits or {}).items()],
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(m, full_check=True)
    return m


def run(m: onnx.ModelProto, name: str, check: bool = True) -> tuple[onnx.ModelProto, int]:
    """Run one pass; the result must be a valid model that computes what `m` computes."""
    after, reports = optimize(m, [name])
    onnx.checker.check_model(after, full_check=True)
    assert [o.name for o in after.graph.output] == [o.name for o in m.graph.output]
    assert [i.name for i in after.graph.input] == [i.name for i in m.graph.input]
    if check:
        verify(m, after)
    return after, reports[0].rewrites


def ops(m: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in m.graph.node]


def outputs_at(m: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(m.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(
        None, feeds
    )


# --- eliminate --------------------------------------------------------------------------------------------------
def test_identity_inside_and_as_graph_output():
    m = model(
        [
            helper.make_node("Relu", ["x"], ["a"]),
            helper.make_node("Identity", ["a"], ["b"]),
            helper.make_node("Sigmoid", ["b"], ["c"]),
            helper.make_node("Identity", ["c"], ["y"]),
        ],
        [vi("x", [2, 3])],
        [vi("y", [2, 3])],
    )
    after, count = run(m, "eliminate")
    assert count == 2 and ops(after) == ["Relu", "Sigmoid"]
    assert after.graph.node[-1].output[0] == "y"


def test_identity_between_graph_input_and_output_stays():
    m = model([helper.make_node("Identity", ["x"], ["y"])], [vi("x", [2])], [vi("y", [2])])
    after, count = run(m, "eliminate")
    assert count == 0 and ops(after) == ["Identity"]


def test_inference_dropout_goes_training_dropout_and_used_mask_stay():
    nodes = [
        helper.make_node("Dropout", ["x", "r"], ["a"]),
        helper.make_node("Relu", ["a"], ["b"]),
        helper.make_node("Dropout", ["b", "r", "off"], ["y", "unused_mask"]),
    ]
    m = model(
        nodes, [vi("x", [2, 3])], [vi("y", [2, 3])], {"r": np.array(0.5, np.float32), "off": np.array(False)}
    )
    after, count = run(m, "eliminate")
    assert count == 2 and ops(after) == ["Relu"]

    train = model(
        [helper.make_node("Dropout", ["x", "r", "on"], ["y"])],
        [vi("x", [2, 3])],
        [vi("y", [2, 3])],
        {"r": np.array(0.5, np.float32), "on": np.array(True)},
    )
    assert run(train, "eliminate", check=False)[1] == 0
    mask = model(
        [helper.make_node("Dropout", ["x"], ["y", "mask"])],
        [vi("x", [2, 3])],
        [vi("y", [2, 3]), vi("mask", [2, 3], TensorProto.BOOL)],
    )
    after, count = run(mask, "eliminate")
    assert count == 0 and ops(after) == ["Dropout"]


def test_reshape_to_same_shape_goes_and_real_reshape_stays():
    nodes = [
        helper.make_node("Reshape", ["x", "same"], ["a"]),
        helper.make_node("Relu", ["a"], ["b"]),
        helper.make_node("Reshape", ["b", "copy"], ["c"]),
        helper.make_node("Reshape", ["c", "other"], ["y"]),
    ]
    m = model(
        nodes,
        [vi("x", ["N", 3, 4])],
        [vi("y", ["N", 12])],
        {"same": i64(0, 3, 4), "copy": i64(0, -1, 4), "other": i64(0, 12)},
    )
    after, count = run(m, "eliminate")
    assert count == 2 and ops(after) == ["Relu", "Reshape"]


def test_transposes_identity_pairs_and_composition():
    nodes = [
        helper.make_node("Transpose", ["x"], ["a"], perm=[0, 1, 2]),
        helper.make_node("Transpose", ["a"], ["b"], perm=[0, 2, 1]),
        helper.make_node("Transpose", ["b"], ["c"], perm=[0, 2, 1]),
        helper.make_node("Relu", ["c"], ["d"]),
        helper.make_node("Transpose", ["d"], ["e"], perm=[1, 0, 2]),
        helper.make_node("Transpose", ["e"], ["y"], perm=[0, 2, 1]),
    ]
    m = model(nodes, [vi("x", [2, 3, 4])], [vi("y", [3, 4, 2])])
    after, count = run(m, "eliminate")
    assert ops(after) == ["Relu", "Transpose"] and count == 3
    assert list(after.graph.node[1].attribute[0].ints) == [1, 2, 0]


def test_transpose_not_identity_or_feeding_a_graph_output_stays():
    nodes = [
        helper.make_node("Transpose", ["x"], ["y1"], perm=[1, 0]),
        helper.make_node("Transpose", ["y1"], ["y2"], perm=[1, 0]),
    ]
    m = model(nodes, [vi("x", [2, 3])], [vi("y1", [3, 2]), vi("y2", [2, 3])])
    after, count = run(m, "eliminate")
    assert count == 0 and ops(after) == ["Transpose", "Transpose"]


def test_flatten_of_2d_goes_of_4d_stays():
    nodes = [
        helper.make_node("Flatten", ["x"], ["a"], axis=1),
        helper.make_node("Relu", ["a"], ["b"]),
        helper.make_node("Flatten", ["z"], ["y2"], axis=1),
        helper.make_node("Identity", ["b"], ["y"]),
    ]
    m = model(nodes, [vi("x", ["N", 6]), vi("z", [2, 3, 2, 2])], [vi("y", ["N", 6]), vi("y2", [2, 12])])
    after, count = run(m, "eliminate")
    assert count == 2 and sorted(ops(after)) == ["Flatten", "Relu"]


def test_reshape_chains_collapse_unless_the_second_copies_dims():
    nodes = [helper.make_node("Reshape", ["x", "s1"], ["a"]), helper.make_node("Reshape", ["a", "s2"], ["y"])]
    m = model(nodes, [vi("x", [2, 3, 4])], [vi("y", [4, 6])], {"s1": i64(6, 4), "s2": i64(4, -1)})
    after, count = run(m, "eliminate")
    assert count == 1 and ops(after) == ["Reshape"]

    copies = model(
        nodes, [vi("x", ["N", 3, 4])], [vi("y", ["N", 3, 4])], {"s1": i64(0, 12), "s2": i64(0, 3, 4)}
    )
    after, count = run(copies, "eliminate")
    assert count == 0 and ops(after) == ["Reshape", "Reshape"]


def test_an_in_order_gather_of_a_flattened_tensor_is_a_reshape():
    """torch.export writes a contiguous as_strided as Gather(Reshape(x, [-1]), arange(n) shaped S): a Reshape of
    x to S, which here keeps x's shape and goes. A shuffled or partial index is a real gather and stays."""
    nodes = [helper.make_node("Reshape", ["x", "flat"], ["f"]), helper.make_node("Gather", ["f", "idx"], ["y"], axis=0)]
    idx = np.arange(2 * 6).reshape(1, 2, 6, 1).astype(np.int64)
    m = model(nodes, [vi("x", [1, 2, 6, 1])], [vi("y", [1, 2, 6, 1])], {"flat": i64(-1), "idx": idx})
    after, count = run(m, "eliminate")
    assert count == 2 and ops(after) == ["Identity"]  # (a graph output keeps a producer)
    shuffled = np.random.default_rng(0).permutation(12).reshape(1, 2, 6, 1).astype(np.int64)
    for other in (shuffled, idx[:, :, :3]):
        out_shape = list(other.shape)
        m2 = model(nodes, [vi("x", [1, 2, 6, 1])], [vi("y", out_shape)], {"flat": i64(-1), "idx": other})
        after, count = run(m2, "eliminate")
        assert ops(after) == ["Reshape", "Gather"]


def test_squeeze_unsqueeze_pairs():
    nodes = [
        helper.make_node("Squeeze", ["x", "ax"], ["a"]),
        helper.make_node("Unsqueeze", ["a", "neg"], ["b"]),
        helper.make_node("Unsqueeze", ["b", "ax0"], ["c"]),
        helper.make_node("Squeeze", ["c", "ax0"], ["d"]),
        helper.make_node("Squeeze", ["d", "ax"], ["e"]),
        helper.make_node("Unsqueeze", ["e", "ax2"], ["y"]),
    ]
    m = model(
        nodes,
        [vi("x", [2, 1, 3])],
        [vi("y", [2, 3, 1])],
        {"ax": i64(1), "neg": i64(-2), "ax0": i64(0), "ax2": i64(2)},
    )
    after, count = run(m, "eliminate")
    assert count == 2 and ops(after) == ["Squeeze", "Unsqueeze"]


# --- dce --------------------------------------------------------------------------------------------------------
def test_dce_removes_dead_branches_constants_and_initializers():
    nodes = [
        helper.make_node("Relu", ["x"], ["y"]),
        helper.make_node("Sigmoid", ["x"], ["dead1"]),
        helper.make_node("Mul", ["dead1", "w"], ["dead2"]),
        const("unused", np.ones(3, np.float32)),
        helper.make_node("Split", ["x", "halves"], ["s1", "s2"], axis=1),
        helper.make_node("Add", ["s1", "s1"], ["y2"]),
    ]
    m = model(
        nodes,
        [vi("x", [2, 4])],
        [vi("y", [2, 4]), vi("y2", [2, 2])],
        {"w": np.ones(4, np.float32), "spare": np.zeros(2, np.float32), "halves": i64(2, 2)},
    )
    g = OnnxGraph(m)
    assert PASSES["dce"](g) == 4 + 1  # three dead nodes and the constant; "spare" (w is read by a dead node)
    assert sorted(n.op_type for n in g.nodes) == ["Add", "Relu", "Split"] and "w" not in g.inits
    after, count = run(m, "dce")
    assert count == 5 and sorted(ops(after)) == ["Add", "Relu", "Split"]
    assert run(after, "dce")[1] == 0


# --- constant_folding -------------------------------------------------------------------------------------------
def test_constant_chain_folds_to_one_initializer():
    fill = numpy_helper.from_array(np.array([1.5], np.float32), "fill")
    nodes = [
        const("shape", i64(2, 3)),
        helper.make_node("ConstantOfShape", ["shape"], ["ones"], value=fill),
        helper.make_node("Add", ["ones", "b"], ["c"]),
        helper.make_node("Mul", ["x", "c"], ["y"]),
    ]
    m = model(
        nodes, [vi("x", [2, 3])], [vi("y", [2, 3])], {"b": np.arange(6, dtype=np.float32).reshape(2, 3)}
    )
    after, count = run(m, "constant_folding")
    assert count == 3 and ops(after) == ["Mul"] and len(after.graph.initializer) == 1
    np.testing.assert_array_equal(
        numpy_helper.to_array(after.graph.initializer[0]), 1.5 + np.arange(6, dtype=np.float32).reshape(2, 3)
    )


def test_folded_graph_output_stays_produced_by_a_node():
    nodes = [helper.make_node("Add", ["a", "b"], ["y2"]), helper.make_node("Relu", ["x"], ["y"])]
    m = model(
        nodes,
        [vi("x", [2])],
        [vi("y", [2]), vi("y2", [2])],
        {"a": np.ones(2, np.float32), "b": np.ones(2, np.float32)},
    )
    after, count = run(m, "constant_folding")
    assert count == 1 and sorted(ops(after)) == ["Constant", "Relu"]


def flatten_chain(picked: list[int]) -> list[onnx.NodeProto]:
    """PyTorch's x.view(...) with the sizes it reads from x: Shape -> Gather -> Unsqueeze -> Concat -> Reshape."""
    nodes = [helper.make_node("Shape", ["x"], ["shape"]), const("minus1", i64(-1)), const("ax0", i64(0))]
    pieces = []
    for k in picked:
        nodes += [
            const(f"i{k}", np.array(k, np.int64)),
            helper.make_node("Gather", ["shape", f"i{k}"], [f"d{k}"]),
        ]
    if picked == [0]:
        nodes.append(helper.make_node("Unsqueeze", ["d0", "ax0"], ["u0"]))
        pieces = ["u0", "minus1"]
    else:  # -1 then the product of the static dims
        nodes.append(helper.make_node("Mul", [f"d{picked[0]}", f"d{picked[1]}"], ["p"]))
        nodes.append(helper.make_node("Mul", ["p", f"d{picked[2]}"], ["q"]))
        nodes.append(helper.make_node("Unsqueeze", ["q", "ax0"], ["uq"]))
        pieces = ["minus1", "uq"]
    nodes += [
        helper.make_node("Concat", pieces, ["target"], axis=0),
        helper.make_node("Reshape", ["x", "target"], ["flat"]),
        helper.make_node("Relu", ["flat"], ["y"]),
    ]
    return nodes


@pytest.mark.parametrize("picked, target", [([1, 2, 3], [-1, 60]), ([0], [0, -1])])
def test_shape_arithmetic_of_a_flatten_folds_with_a_dynamic_batch(picked, target):
    m = model(flatten_chain(picked), [vi("x", ["N", 3, 4, 5])], [vi("y", ["N", 60])])
    after, count = run(m, "constant_folding")
    assert ops(after) == ["Reshape", "Relu"] and count > 0
    shape = next(t for t in after.graph.initializer if t.name == after.graph.node[0].input[1])
    assert numpy_helper.to_array(shape).tolist() == target
    for batch in (2, 5):
        x = np.random.default_rng(batch).standard_normal((batch, 3, 4, 5)).astype(np.float32)
        (want,), (got,) = outputs_at(m, {"x": x}), outputs_at(after, {"x": x})
        assert got.shape == (batch, 60)
        np.testing.assert_array_equal(got, want)


def test_shape_of_a_dynamic_batch_does_not_fold_but_static_dims_do():
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("ConstantOfShape", ["s"], ["z"]),
        helper.make_node("Add", ["x", "z"], ["y"]),
        helper.make_node("Shape", ["x"], ["tail"], start=1),
        helper.make_node("Cast", ["tail"], ["t"], to=F),
        helper.make_node("Add", ["x", "t"], ["y2"]),
    ]
    m = model(nodes, [vi("x", ["N", 3])], [vi("y", ["N", 3]), vi("y2", ["N", 3])])
    after, count = run(m, "constant_folding")
    assert count == 2 and sorted(ops(after)) == ["Add", "Add", "ConstantOfShape", "Shape"]


def test_random_ops_do_not_fold():
    nodes = [
        helper.make_node("RandomNormal", [], ["r"], shape=[2, 3], dtype=F),
        helper.make_node("Add", ["x", "r"], ["y"]),
    ]
    m = model(nodes, [vi("x", [2, 3])], [vi("y", [2, 3])])
    after, count = run(m, "constant_folding", check=False)
    assert count == 0 and ops(after) == ["RandomNormal", "Add"]


# --- cse --------------------------------------------------------------------------------------------------------
def test_cse_merges_equal_initializers_and_nodes():
    nodes = [
        helper.make_node("Mul", ["x", "w1"], ["a"]),
        helper.make_node("Mul", ["x", "w2"], ["b"]),
        helper.make_node("Relu", ["a"], ["ra"]),
        helper.make_node("Relu", ["b"], ["rb"]),
        helper.make_node("Add", ["ra", "rb"], ["y"]),
    ]
    w = np.array([1.0, -2.0, 3.0], np.float32)
    m = model(nodes, [vi("x", [2, 3])], [vi("y", [2, 3])], {"w1": w, "w2": w.copy()})
    after, count = run(m, "cse")
    assert count == 3 and ops(after) == ["Mul", "Relu", "Add"] and len(after.graph.initializer) == 1


def test_cse_keeps_different_attributes_values_and_graph_outputs():
    nodes = [
        helper.make_node("Softmax", ["x"], ["a"], axis=0),
        helper.make_node("Softmax", ["x"], ["b"], axis=1),
        helper.make_node("Add", ["a", "b"], ["y"]),
        helper.make_node("Mul", ["x", "w1"], ["y2"]),
        helper.make_node("Mul", ["x", "w2"], ["c"]),
        helper.make_node("Relu", ["c"], ["y3"]),
        helper.make_node("Relu", ["c"], ["y4"]),
    ]
    m = model(
        nodes,
        [vi("x", [2, 3])],
        [vi("y", [2, 3]), vi("y2", [2, 3]), vi("y3", [2, 3]), vi("y4", [2, 3])],
        {"w1": np.ones(3, np.float32), "w2": np.full(3, 2, np.float32)},
    )
    after, count = run(m, "cse")
    assert count == 0 and len(after.graph.node) == 7


def test_values_read_inside_subgraphs_survive():
    def branch(op: str) -> onnx.GraphProto:
        return helper.make_graph(
            [helper.make_node(op, ["h", "w"], [f"{op}_out"])], op, [], [vi(f"{op}_out", [2])]
        )

    nodes = [
        helper.make_node("Relu", ["x"], ["h"]),
        helper.make_node("Identity", ["h"], ["unused"]),
        helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
        helper.make_node("Greater", ["s", "zero"], ["c"]),
        helper.make_node("If", ["c"], ["y"], then_branch=branch("Add"), else_branch=branch("Sub")),
    ]
    m = model(
        nodes, [vi("x", [2])], [vi("y", [2])], {"w": np.ones(2, np.float32), "zero": np.array(0, np.float32)}
    )
    for name in OWNED:
        g = OnnxGraph(m)
        PASSES[name](g)
        g.topo_sort()
        after = g.to_model()
        onnx.checker.check_model(after, full_check=True)
        verify(m, after)
        assert "If" in ops(after) and "Relu" in ops(after)


# --- the default pipeline ---------------------------------------------------------------------------------------
def optimize_default(m: onnx.ModelProto):
    """optimize() with the default list where every pass in it is written; else with the passes this file covers,
    in the default order."""
    if all(p in PASSES for p in DEFAULT_PASSES):
        return optimize(m)
    return optimize(m, [p for p in DEFAULT_PASSES if p in OWNED])


def test_default_pipeline_on_a_mixed_graph():
    nodes = [
        helper.make_node("Identity", ["x"], ["xi"]),
        *[n for n in flatten_chain([0]) if n.op_type != "Relu"],
        helper.make_node("Transpose", ["flat"], ["t1"], perm=[1, 0]),
        helper.make_node("Transpose", ["t1"], ["t2"], perm=[1, 0]),
        helper.make_node("Dropout", ["t2"], ["d"]),
        helper.make_node("Relu", ["d"], ["r1"]),
        helper.make_node("Relu", ["d"], ["r2"]),
        helper.make_node("Add", ["r1", "r2"], ["y"]),
        helper.make_node("Exp", ["xi"], ["dead"]),
    ]
    for n in nodes:
        if n.op_type == "Shape":
            n.input[0] = "xi"
    m = model(nodes, [vi("x", ["N", 3, 4, 5])], [vi("y", ["N", 60])])
    after, reports = optimize_default(m)
    onnx.checker.check_model(after, full_check=True)
    verify(m, after)
    assert sorted(ops(after)) == ["Add", "Relu", "Reshape"]
    assert sum(r.rewrites for r in reports) > 0 and reports[-1].nodes_after == 3


@pytest.mark.parametrize("live", [False, True], ids=["fixture", "live_torch"])
def test_torch_cnn_export_cleans_up(live):
    """A conv, batch norm, x.view(x.size(0), -1), linear and dropout exported by PyTorch without constant folding
    (tests/fixtures/make_torch_fixtures.py): the committed export, or one the installed torch exports now."""
    if live:
        nets = torch_nets()
        net, x = nets.build("cleanup_cnn")
        m, want = onnx.load_from_string(nets.export("cleanup_cnn", net)), nets.reference(net, x)
    else:
        m, ref = torch_fixture("cleanup_cnn")
        x, want = ref["x"], ref["want"]
    assert {"Shape", "Gather", "Concat", "Unsqueeze"} <= set(ops(m))
    np.testing.assert_allclose(outputs_at(m, {"x": x})[0], want, rtol=1e-4, atol=1e-5)
    after, _ = optimize_default(m)
    onnx.checker.check_model(after, full_check=True)
    verify(m, after)
    left = set(ops(after))
    assert not left & {"Identity", "Dropout", "Shape", "Gather", "Constant", "Concat", "Unsqueeze"}
    assert len(after.graph.node) < len(m.graph.node)
    np.testing.assert_allclose(outputs_at(after, {"x": x})[0], want, rtol=1e-4, atol=1e-5)


def _long_chain(n: int) -> onnx.ModelProto:
    """x -> n blocks of [Identity, Transpose, Transpose back, Add(random constant), Relu] -> y, so every block
    leaves one Add and one Relu after the passes."""
    rng = np.random.default_rng(3)
    nodes, inits, v = [], {}, "x"
    for k in range(n):
        nodes += [
            helper.make_node("Identity", [v], [f"i{k}"]),
            helper.make_node("Transpose", [f"i{k}"], [f"t{k}"], perm=[0, 1, 3, 2]),
            helper.make_node("Transpose", [f"t{k}"], [f"u{k}"], perm=[0, 1, 3, 2]),
            helper.make_node("Add", [f"u{k}", f"c{k}"], [f"a{k}"]),
            helper.make_node("Relu", [f"a{k}"], [f"r{k}"]),
        ]
        inits[f"c{k}"] = rng.normal(0, 0.1, (1, 3, 1, 1)).astype(np.float32)
        v = f"r{k}"
    nodes.append(helper.make_node("Identity", [v], ["y"]))
    return model(nodes, [vi("x", [2, 3, 4, 5])], [vi("y", [2, 3, 4, 5])], inits)


def test_long_chains_are_rewritten_with_a_bounded_number_of_graph_scans(monkeypatch):
    """The passes keep their producer/consumer indexes current edit by edit (or rebuild them only after a rewrite),
    so the whole-graph scans do not grow with the graph: rebuilding them per node made a 5,000-node chain take
    minutes. Counted, not timed; and the chain must still compute what it did."""
    scans = {"n": 0}
    original = {name: getattr(OnnxGraph, name) for name in ("producers", "consumers")}
    for name, fn in original.items():
        monkeypatch.setattr(OnnxGraph, name, lambda self, fn=fn: (scans.__setitem__("n", scans["n"] + 1), fn(self))[1])
    counts = []
    for n in (40, 400):
        scans["n"] = 0
        m = _long_chain(n)
        after, _ = optimize(m)
        verify(m, after)
        assert ops(after).count("Add") == n and ops(after).count("Relu") == n
        assert "Transpose" not in ops(after) and ops(after).count("Identity") <= 1
        counts.append(scans["n"])
    assert counts[1] == counts[0] and counts[0] < 60, counts
