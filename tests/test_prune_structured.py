"""Structured channel pruning with dependency groups (compiler/prune)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from dlc.compiler.analysis import summarize
from dlc.compiler.export_onnx import to_onnx
from dlc.compiler.frontend import load_model
from dlc.compiler.prune import channel_groups, importance, prune, prune_channels
from dlc.compiler.prune.structured import _Analysis, group_sizes
from dlc.compiler.train.executor import Executor

from helpers import ROOT, load, ort_session, random_input, randomize_weights

EXAMPLES = ["resnet20", "inception_small", "mobilenet_small"]


def example(name):
    return load_model(ROOT / "examples" / f"{name}.yaml").graph


def randomize_norms(graph, seed=1):
    rng = np.random.default_rng(seed)
    for node in graph.nodes():
        if node.op == "batchnorm":
            c = node.params["scale"].shape[0]
            node.params["scale"] = rng.uniform(0.5, 1.5, c).astype(np.float32)
            node.params["bias"] = rng.standard_normal(c).astype(np.float32)
            node.params["mean"] = rng.standard_normal(c).astype(np.float32) * 0.1
            node.params["var"] = rng.uniform(0.5, 2.0, c).astype(np.float32)
        elif node.op in ("conv", "linear") and "bias" in node.params:
            node.params["bias"] = rng.standard_normal(node.params["bias"].shape).astype(np.float32) * 0.1


def zero_channels(graph, group, indices):
    """Make the group's `indices` exactly zero after every producer / BN / depthwise conv of the group."""
    an = _Analysis(graph)
    root = an.root_of(group)
    for b in an.bindings:
        node = graph.node(b.node)
        consumer_side = (
            (node.op == "conv" and node.attrs["groups"] == 1 and b.axis == 1)
            or (node.op == "linear" and b.axis == 1)
            or (node.op == "batchnorm" and b.param in ("mean", "var"))
        )
        if consumer_side:
            continue
        spaces, idx = an.labels[b.value]
        sel = (an.roots(spaces) == root) & np.isin(idx, indices)
        p = node.params[b.param]
        slicer = [slice(None)] * p.ndim
        slicer[b.axis] = np.flatnonzero(sel)
        p[tuple(slicer)] = 0.0


def group_of(graph, producer):
    return next(g for g in channel_groups(graph) if producer in g.producers)


def check_zero_pruning(graph, spec):
    """spec: producer -> indices to zero and prune. Outputs before and after must agree exactly."""
    randomize_norms(graph)
    for producer, indices in spec.items():
        zero_channels(graph, group_of(graph, producer), indices)
    x = random_input(graph, batch=3)
    before = Executor(graph).forward(x)[graph.outputs[0]]
    for producer, indices in spec.items():
        group = group_of(graph, producer)
        assert group.prunable
        assert np.all(importance(graph, group, "l1")[indices] == 0)
        prune_channels(graph, group, [i for i in range(group.size) if i not in indices])
        assert group_of(graph, producer).size == group.size - len(indices)
    after = Executor(graph).forward(x)[graph.outputs[0]]
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-6)
    return graph


def test_zero_channels_residual_block():
    g = load(
        """
        - {name: c0, type: conv, out: 8, kernel: 3, pad: 1}
        - {name: b0, type: batchnorm}
        - {name: r0, type: relu}
        - {name: c1, type: conv, out: 8, kernel: 3, pad: 1}
        - {name: b1, type: batchnorm}
        - {name: add, type: add, inputs: [b1, r0]}
        - {name: r1, type: relu}
        - {name: c2, type: conv, out: 4, kernel: 1}
        - {name: gap, type: global_avgpool}
        - {name: flat, type: flatten}
        - {name: fc, type: linear, out: 3}
    """,
        shape=(3, 8, 8),
    ).graph
    assert group_of(g, "c0").producers == ["c0", "c1"]
    check_zero_pruning(g, {"c0": [1, 4, 6]})
    assert g.node("c0").params["weight"].shape == (5, 3, 3, 3)
    assert g.node("c1").params["weight"].shape == (5, 5, 3, 3)
    assert g.node("c2").params["weight"].shape == (4, 5, 1, 1)
    assert g.shapes["add"] == (5, 8, 8)


def test_zero_channels_resnet20_stage_group():
    g = example("resnet20")
    check_zero_pruning(g, {"conv1": [0, 5, 15], "stage2_down/proj": [3, 31], "stage1_1/conv1": [2]})
    assert g.shapes["stage1_2/add"] == (13, 32, 32)


def test_zero_channels_concat():
    g = load(
        """
        - {name: a, type: conv, out: 4, kernel: 3, pad: 1, inputs: input}
        - {name: ra, type: relu}
        - {name: b, type: conv, out: 6, kernel: 1, inputs: input}
        - {name: bb, type: batchnorm}
        - {name: rb, type: relu}
        - {name: cat, type: concat, inputs: [ra, rb]}
        - {name: pool, type: maxpool, kernel: 2, stride: 2}
        - {name: c, type: conv, out: 5, kernel: 3, pad: 1}
        - {name: gap, type: global_avgpool}
        - {name: flat, type: flatten}
        - {name: fc, type: linear, out: 3}
    """,
        shape=(3, 8, 8),
    ).graph
    check_zero_pruning(g, {"a": [2], "b": [0, 3, 5]})
    assert g.shapes["cat"] == (6, 8, 8)
    assert g.node("c").params["weight"].shape == (5, 6, 3, 3)


def test_zero_channels_inception():
    g = example("inception_small")
    check_zero_pruning(g, {"inc1/b3": [0, 7], "inc1/pool_proj": [1], "inc3/b5b": [4, 5], "stem": [9]})


def test_zero_channels_depthwise():
    g = load(
        """
        - {name: c0, type: conv, out: 8, kernel: 3, pad: 1}
        - {name: b0, type: batchnorm}
        - {name: r0, type: relu}
        - {name: dw, type: conv, out: 8, kernel: 3, pad: 1, groups: 8}
        - {name: b1, type: batchnorm}
        - {name: r1, type: relu}
        - {name: pw, type: conv, out: 6, kernel: 1}
        - {name: gap, type: global_avgpool}
        - {name: flat, type: flatten}
        - {name: fc, type: linear, out: 3}
    """,
        shape=(3, 8, 8),
    ).graph
    group = group_of(g, "c0")
    assert {"dw", "b1", "pw"} <= set(group.members)
    check_zero_pruning(g, {"c0": [0, 7]})
    dw = g.node("dw")
    assert dw.attrs["out"] == dw.attrs["groups"] == 6
    assert dw.params["weight"].shape == (6, 1, 3, 3) and dw.params["bias"].shape == (6,)


def test_zero_channels_mobilenet():
    check_zero_pruning(example("mobilenet_small"), {"stem": [1, 2], "sep3/pw": [0, 100]})


def test_zero_channels_conv_flatten_linear():
    g = load(
        """
        - {name: c0, type: conv, out: 4, kernel: 3}
        - {name: r0, type: relu}
        - {name: pool, type: maxpool, kernel: 2, stride: 2}
        - {name: flat, type: flatten}
        - {name: fc1, type: linear, out: 6}
        - {name: r1, type: relu}
        - {name: fc2, type: linear, out: 3}
    """,
        shape=(3, 6, 6),
    ).graph
    assert not group_of(g, "fc2").prunable
    assert group_of(g, "fc1").prunable
    check_zero_pruning(g, {"c0": [1, 3], "fc1": [0, 4]})
    assert g.node("fc1").params["weight"].shape == (4, 8)  # 2 channels × 2×2 positions
    assert g.node("fc2").params["weight"].shape == (3, 4)


def test_barriers_make_groups_fixed():
    g = load(
        """
        - {name: c0, type: conv, out: 8, kernel: 3, pad: 1}
        - {name: n0, type: lrn, size: 3}
        - {name: c1, type: conv, out: 8, kernel: 3, pad: 1, groups: 2}
        - {name: c2, type: conv, out: 4, kernel: 1}
    """,
        shape=(3, 8, 8),
    ).graph
    assert not group_of(g, "c0").prunable  # lrn
    assert group_of(g, "c1").prunable and group_of(g, "c1").blocks == 2  # grouped conv: its outputs, by group
    assert not group_of(g, "c2").prunable  # graph output


def test_resnet20_groups():
    groups = channel_groups(example("resnet20"))
    stage1 = group_of_list(groups, "conv1")
    assert stage1.producers == ["conv1", "stage1_0/conv2", "stage1_1/conv2", "stage1_2/conv2"]
    stage3 = group_of_list(groups, "stage3_down/proj")
    assert set(stage3.producers) == {
        "stage3_down/conv2",
        "stage3_down/proj",
        "stage3_0/conv2",
        "stage3_1/conv2",
    }
    assert "fc" in stage3.members
    fc = group_of_list(groups, "fc")
    assert not fc.prunable
    assert sum(g.prunable for g in groups) == 12


def group_of_list(groups, producer):
    return next(g for g in groups if producer in g.producers)


def run_ort(graph, x):
    model = to_onnx(graph)
    onnx.checker.check_model(model)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return sess.run(None, {graph.input_names[0]: x})[0]


@pytest.mark.parametrize("name", EXAMPLES)
def test_prune_half(name):
    g = example(name)
    before = summarize(g)
    report = prune(g, 0.5)
    after = summarize(g)
    assert after.total_macs < 0.5 * before.total_macs
    assert after.total_params < 0.5 * before.total_params
    assert report and all(1 <= r["after"] <= r["before"] for r in report)
    assert all(r["after"] == -(-r["before"] // 2) for r in report)
    for node in g.nodes():
        if node.op == "conv":
            assert node.attrs["out"] >= 1
    assert g.node("fc").attrs["out"] == 10
    x = random_input(g, batch=2)
    y = run_ort(g, x)
    assert y.shape == (2, 10)
    np.testing.assert_allclose(y, Executor(g).forward(x)[g.outputs[0]], rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("method", ["l1", "l2", "bn_scale", "random"])
def test_prune_methods_round_to_and_skip(method):
    g = example("resnet20")
    prune(g, 0.6, method=method, round_to=8, skip=("stage2_0/conv1",))
    for node in g.nodes():
        if node.op == "conv":
            assert node.attrs["out"] % 8 == 0, node.name
    assert g.node("stage2_0/conv1").attrs["out"] == 32  # skipped
    assert g.node("stage3_0/conv1").attrs["out"] == 32  # ceil(0.4 * 64) = 26 -> 32
    assert g.node("conv1").attrs["out"] == 8
    assert run_ort(g, random_input(g)).shape == (2, 10)


def test_importance_prefers_large_filters():
    g = example("resnet20")
    group = group_of(g, "stage1_0/conv1")
    g.node("stage1_0/conv1").params["weight"][3] *= 100.0
    g.node("stage1_0/bn1").params["scale"][5] = 50.0
    assert np.argmax(importance(g, group, "l1")) == 3
    assert np.argmax(importance(g, group, "l2")) == 3
    assert np.argmax(importance(g, group, "bn_scale")) == 5
    prune(g, 0.9, min_channels=2)
    assert g.node("stage1_0/conv1").attrs["out"] == 2


def test_min_channels_never_zero():
    g = example("mobilenet_small")
    prune(g, 0.99)
    assert min(n.attrs["out"] for n in g.nodes() if n.op == "conv") >= 1
    assert run_ort(g, random_input(g)).shape == (2, 10)


def test_per_layer_overrides_exclude_and_round_to():
    g = example("resnet20")
    report = prune(g, 0.5, round_to=8, overrides={"stage3_*": 0.7, "stage1_0/conv1": 0.0},
                   skip=("stage2_1/conv1",))
    assert g.node("stage1_0/conv1").attrs["out"] == 16  # override 0: kept whole
    assert g.node("stage1_1/conv1").attrs["out"] == 8  # global 0.5
    assert g.node("stage2_1/conv1").attrs["out"] == 32  # excluded
    assert g.node("stage2_0/conv1").attrs["out"] == 16
    assert g.node("stage3_0/conv1").attrs["out"] == 24  # ceil(0.3 * 64) = 20 -> 24 (round_to 8)
    assert g.node("stage3_down/conv1").attrs["out"] == 24
    rows = {r["producers"][0]: r for r in report}
    assert rows["stage3_0/conv1"]["ratio"] == 0.7 and rows["stage1_1/conv1"]["ratio"] == 0.5
    assert "stage2_1/conv1" not in rows
    assert run_ort(g, random_input(g)).shape == (2, 10)


def test_steps_on_original_sizes_match_one_shot():
    one = example("resnet20")
    prune(one, 0.6, round_to=2)
    steps = example("resnet20")
    sizes = group_sizes(steps)
    for amount in (0.3, 0.45, 0.6):
        prune(steps, amount, round_to=2, original_sizes=sizes)
    assert [n.attrs.get("out") for n in steps.nodes()] == [n.attrs.get("out") for n in one.nodes()]
    assert summarize(steps).total_params == summarize(one).total_params


GLOBAL_NET = """
- {name: a, type: conv, out: 16, kernel: 3, pad: 1, bias: false}
- {name: ra, type: relu}
- {name: b, type: conv, out: 16, kernel: 3, pad: 1, bias: false}
- {name: rb, type: relu}
- {name: c, type: conv, out: 8, kernel: 3, pad: 1}
"""


def test_global_scope_ranks_channels_across_layers():
    """Layer a has 8 dead (zero) filters, b none: a global 25 % cut takes all 8 from a, exactly, and the
    outputs do not change (the dead filters contributed nothing)."""
    graph = load(GLOBAL_NET, shape=(3, 8, 8)).graph
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        w = graph.node(name).params["weight"]
        graph.node(name).params["weight"] = (rng.uniform(0.5, 1.5, w.shape) * rng.choice([-1, 1], w.shape)
                                             ).astype(np.float32)
    graph.node("a").params["weight"][1::2] = 0.0
    x = random_input(graph, batch=2)
    before = Executor(graph).forward(x)["c"]
    report = prune(graph, 0.25, "l1", scope="global")
    assert {r["producers"][0]: r["after"] for r in report} == {"a": 8, "b": 16}
    assert report[0]["ratio"] == 0.5 and report[1]["ratio"] == 0.0
    # Dropping the zero channels shortens c's reduction, so only the summation order changes: float32
    # round-off, far below what removing one live filter would move.
    np.testing.assert_allclose(Executor(graph).forward(x)["c"], before, rtol=0, atol=1e-6 * np.abs(before).max())


def test_global_scope_counts_floors_overrides_and_round_to():
    graph = load(GLOBAL_NET, shape=(3, 8, 8)).graph
    rng = np.random.default_rng(1)
    graph.node("a").params["weight"] *= np.linspace(0.01, 1, 16, dtype=np.float32)[:, None, None, None]
    graph.node("b").params["weight"] = rng.standard_normal(graph.node("b").params["weight"].shape).astype(np.float32)
    g = graph.copy()
    kept = {r["producers"][0]: r["after"] for r in prune(g, 0.5, "l1", scope="global")}
    assert sum(kept.values()) == 16  # exactly half of the 32 channels go
    scales = np.abs(g.node("a").params["weight"]).reshape(kept["a"], -1).sum(1)
    full = np.abs(graph.node("a").params["weight"]).reshape(16, -1).sum(1)
    np.testing.assert_allclose(np.sort(scales), np.sort(full)[-kept["a"]:], rtol=1e-6)  # a kept its largest
    # a group never drops below max(min_channels, round_to), and counts round up to round_to
    kept = {r["producers"][0]: r["after"] for r in prune(graph.copy(), 0.9, "l1", scope="global", min_channels=2)}
    assert min(kept.values()) >= 2 and sum(kept.values()) == max(32 - int(0.9 * 32), 4)
    kept = {r["producers"][0]: r["after"] for r in prune(graph.copy(), 0.5, "l1", scope="global", round_to=4)}
    assert all(n % 4 == 0 for n in kept.values()) and 16 <= sum(kept.values()) <= 20
    # an override takes its group out of the global pool: b keeps its own 25 %, a alone shares the 50 %
    kept = {r["producers"][0]: r["after"] for r in prune(graph.copy(), 0.5, "l1", scope="global",
                                                          overrides={"b": 0.25})}
    assert kept == {"a": 8, "b": 12}


RESNEXT = """
- {name: reduce, type: conv, out: 16, kernel: 1, bias: false}
- {name: relu1, type: relu}
- {name: grouped, type: conv, out: 16, kernel: 3, pad: 1, groups: 4, bias: false}
- {name: relu2, type: relu}
- {name: expand, type: conv, out: 8, kernel: 1, bias: false}
- {name: pool, type: global_avgpool}
- {name: flat, type: flatten}
- {name: fc, type: linear, out: 3}
"""


def test_a_grouped_conv_loses_the_same_number_of_outputs_in_each_group():
    """ResNeXt's grouped 3×3 (4 groups of 4): its dead filters (two per group) go, two per group stay, the groups
    stay 4, the next conv's inputs follow; its inputs (reduce's outputs, dead two per group too) shrink alike in
    each group, each group's filters keeping the columns of its own survivors; and nothing changes."""
    graph = load(RESNEXT, shape=(3, 8, 8)).graph
    randomize_weights(graph, seed=3)
    graph.node("grouped").params["weight"][[0, 3, 5, 6, 8, 9, 13, 15]] = 0.0  # two in each group of four
    graph.node("reduce").params["weight"][[1, 2, 4, 7, 9, 10, 12, 15]] = 0.0
    graph.node("expand").params["weight"][[1, 2, 5, 6]] = 0.0  # (expand is pruned too: its dead half)
    x = random_input(graph, batch=2)
    before = Executor(graph).forward(x)["fc"]
    report = prune(graph, 0.5, "l1")
    after = {r["producers"][0]: r["after"] for r in report}
    assert after == {"reduce": 8, "grouped": 8, "expand": 4}
    node = graph.node("grouped")
    assert node.attrs["groups"] == 4 and node.attrs["out"] == 8 and node.params["weight"].shape == (8, 2, 3, 3)
    assert graph.node("expand").params["weight"].shape[1] == 8
    np.testing.assert_allclose(Executor(graph).forward(x)["fc"], before, rtol=0, atol=1e-6 * np.abs(before).max())
    got = ort_session(graph).run(None, {graph.input_names[0]: x})[0]
    np.testing.assert_allclose(got, before, rtol=1e-5, atol=1e-5 * np.abs(before).max())


def test_a_grouped_conv_keeps_a_multiple_of_its_groups_and_the_best_of_each():
    """Group 0's filters are all weak and group 1's all strong: a global ranking would empty group 0; each group
    keeps its own three best instead."""
    graph = load(RESNEXT, shape=(3, 8, 8)).graph
    randomize_weights(graph, seed=4)
    w = graph.node("grouped").params["weight"]
    w[0:4] *= 0.01
    w[4:8] *= 10.0
    norms = np.abs(w).sum(axis=(1, 2, 3))
    want = np.concatenate([4 * b + np.sort(np.argsort(-norms[4 * b:4 * b + 4])[:3]) for b in range(4)])
    expected = w[want].copy()
    report = prune(graph, 0.3, "l1", skip=["reduce"])  # 16 * 0.7 = 11.2 -> 12: three per group
    assert {r["producers"][0]: r["after"] for r in report}["grouped"] == 12
    assert graph.node("grouped").attrs["groups"] == 4
    np.testing.assert_array_equal(graph.node("grouped").params["weight"], expected)


def test_a_grouped_convs_inputs_keep_the_same_number_in_each_group():
    """reduce feeds a 4-group conv: its channels prune in 4 blocks of 4 even when one block is much weaker, and
    each group's filters keep exactly the columns of its own block's survivors (checked against onnxruntime)."""
    graph = load(RESNEXT, shape=(3, 8, 8)).graph
    randomize_weights(graph, seed=5)
    w = graph.node("reduce").params["weight"]
    w[0:4] *= 0.01  # block 0 weak: a global ranking would drop all of it
    norms = np.abs(w).sum(axis=(1, 2, 3))
    kept = [4 * b + np.sort(np.argsort(-norms[4 * b:4 * b + 4])[:2]) for b in range(4)]
    gw = graph.node("grouped").params["weight"].copy()
    report = prune(graph, 0.5, "l1", skip=["expand"])  # (skips the groups expand reads or writes)
    assert {r["producers"][0]: r["after"] for r in report}["reduce"] == 8
    want = np.concatenate([gw[4 * k:4 * k + 4][:, kept[k] - 4 * k] for k in range(4)])
    np.testing.assert_array_equal(graph.node("grouped").params["weight"], want)
    x = random_input(graph, batch=2)
    out = Executor(graph).forward(x)["fc"]
    got = ort_session(graph).run(None, {graph.input_names[0]: x})[0]
    np.testing.assert_allclose(got, out, rtol=1e-5, atol=1e-5 * np.abs(out).max())
