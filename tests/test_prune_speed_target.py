"""Pruning to a measured speed target: the per-layer latency table (entries, cache, the child process that times
them), the greedy search with its measured bisection (on a deterministic cost model, so the test asserts on
exact numbers, not on this machine's timings), prune.target / --target-speedup and their errors."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from test_prune_pipeline import MODEL, tiny
from typer.testing import CliRunner

from dlc.compiler.cli import app
from dlc.compiler.errors import DlcError
from dlc.compiler.frontend import load_model, load_model_text
from dlc.compiler.prune import latency_table as lt
from dlc.compiler.prune import speed_target as st
from dlc.compiler.prune.structured import channel_groups
from dlc.runtime.cost import count_macs

from helpers import ROOT, errors_of

runner = CliRunner()


def _macs(key) -> int:
    return count_macs(onnx.load_from_string(lt.layer_onnx(key)))


class CostTable:
    """A latency table from a cost model: 1 ms per 10 MMAC at batch 1, plus 0.01 ms per entry (the bare-input
    entries cost exactly that, so they cancel)."""

    def __init__(self, batch=1):
        self.batch, self.calls, self.measured, self.cached, self.seconds = batch, 0, 0, 0, 0.0

    def lookup(self, keys):
        self.calls += 1
        return [0.01 + (0 if k["op"] == "none" else self.batch * _macs(k) / 1e7) for k in keys]

    def to_dict(self):
        return {"entries": 0, "measured": 0, "cached": 0, "seconds": 0.0, "cache": None}


def cost_timer(fixed_ms=0.005, slow=1.3):
    """Whole-model 'measurements' from MACs, off from the table by `slow` and a fixed cost, as a real runtime is."""
    seen = []

    def timer(models, target, min_time_s):
        out = [fixed_ms + slow * target.batch * count_macs(onnx.load_from_string(m)) / 1e7 for m in models]
        seen.append(out)
        return out

    timer.seen = seen
    return timer


def test_candidate_widths():
    assert st.candidate_widths(16, 1) == [2, 4, 6, 8, 10, 12, 14, 16]
    assert st.candidate_widths(64, 16) == [16, 32, 48, 64]
    assert st.candidate_widths(16, 16) == [16]
    assert st.candidate_widths(20, 8) == [8, 16, 20]  # the full width even when it is no multiple
    assert st.candidate_widths(24, 1, blocks=4) == [4, 8, 12, 16, 20, 24]


@pytest.mark.parametrize("op, attrs, in_shape, out_shape", [
    ("conv", {"out": 12, "kernel": (3, 3), "stride": (2, 2), "pads": (1, 1, 1, 1), "dilation": (1, 1), "groups": 1,
              "bias": False}, (5, 9, 9), (12, 5, 5)),
    ("conv", {"out": 8, "kernel": (3, 3), "stride": (1, 1), "pads": (1, 1, 1, 1), "dilation": (1, 1), "groups": 8,
              "bias": True}, (8, 6, 6), (8, 6, 6)),
    ("conv_transpose", {"out": 4, "kernel": (2, 2), "stride": (2, 2), "pads": (0, 0, 0, 0), "dilation": (1, 1),
                        "groups": 1, "bias": True, "output_padding": (0, 0)}, (6, 5, 5), (4, 10, 10)),
    ("linear", {"out": 7, "bias": True}, (30,), (7,)),
    ("none", {}, (3, 4, 4), (3, 4, 4)),
])
def test_layer_entries_are_the_layer_as_exported(op, attrs, in_shape, out_shape):
    key = lt.layer_key(op, attrs, in_shape) if op != "none" else lt.overhead_key(in_shape)
    s = ort.InferenceSession(lt.layer_onnx(key), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((2, *in_shape)).astype(np.float32)
    y = s.run(None, {s.get_inputs()[0].name: x})[0]
    assert y.shape == (2, *out_shape)
    assert (y >= 0).all() and (y > 0).any()  # the ReLU after the layer
    if op == "none":
        np.testing.assert_array_equal(y, np.maximum(x, 0))
    json.dumps(key)  # keys are plain JSON (the cache file)


def test_measured_entries_are_positive_and_scale(tmp_path):
    conv = {"out": 32, "kernel": (3, 3), "stride": (1, 1), "pads": (1, 1, 1, 1), "dilation": (1, 1), "groups": 1,
            "bias": False}
    small, big = lt.layer_key("conv", conv, (4, 8, 8)), lt.layer_key("conv", conv, (32, 32, 32))
    seen = []
    ms = lt.measure_entries([small, big], batch=2, threads=1, progress=lambda d, n: seen.append((d, n)))
    assert seen == [(1, 2), (2, 2)]
    assert 0 < ms[0] < ms[1]  # 128x the MACs: no noise hides that
    with pytest.raises(DlcError, match="measuring layer latencies on onnxruntime failed"):
        lt.measure_entries([{"op": "conv", "attrs": {"out": 2}, "in_shape": [1, 2, 2]}], batch=1)


def test_table_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DLC_CACHE_DIR", str(tmp_path))
    calls = []

    def fake(keys, batch, device, threads, progress):
        calls.append(len(keys))
        return [float(k["in_shape"][0] * batch) for k in keys]

    monkeypatch.setattr(lt, "measure_entries", fake)
    keys = [lt.overhead_key((c, 4, 4)) for c in (1, 2, 3)]
    t = lt.LatencyTable(batch=2)
    assert t.lookup(keys + keys[:1]) == [2.0, 4.0, 6.0, 2.0] and calls == [3]  # duplicates measured once
    again = lt.LatencyTable(batch=2)
    assert again.lookup(keys[::-1]) == [6.0, 4.0, 2.0] and calls == [3]  # from the file
    assert again.to_dict()["cached"] == 3 and again.to_dict()["measured"] == 0
    assert lt.LatencyTable(batch=3).lookup(keys[:1]) == [3.0] and calls == [3, 1]  # batch is part of the key
    doc = json.loads((tmp_path / "latency_tables.json").read_text())
    assert doc["version"] == lt.CACHE_VERSION and len(doc["entries"]) == 4
    (tmp_path / "latency_tables.json").write_text("{not json")  # corrupt: measured again, and rewritten
    assert lt.LatencyTable(batch=2).lookup(keys[:1]) == [2.0] and calls == [3, 1, 1]
    assert json.loads((tmp_path / "latency_tables.json").read_text())["version"] == lt.CACHE_VERSION
    assert lt.LatencyTable(batch=2, cache=False).lookup(keys[:1]) == [2.0] and calls == [3, 1, 1, 1]


def _graph(text=None):
    return load_model_text(text or MODEL, "tiny.yaml").graph


def test_search_meets_the_target_with_the_first_state_that_measures_it():
    graph = _graph()
    timer = cost_timer()
    r = st.search(graph, st.SpeedTarget(2.0), round_to=1, timer=timer, table=CostTable())
    assert r.reached and r.measured_speedup >= 2.0 * st.ACCEPT
    base_ms = timer.seen[0][0]
    assert r.baseline_ms == pytest.approx(base_ms)
    # the cost model is exact up to scale: the pruned graph's MACs give the measured time back
    assert r.pruned_ms == pytest.approx(base_ms / r.measured_speedup)
    states = {row["state"]: row["measured_speedup"] for row in r.rounds}
    chosen = next(row["state"] for row in r.rounds if row["measured_speedup"] == r.measured_speedup)
    assert chosen - 1 in states or chosen == 1  # bisection ended next to a state that misses
    assert all(v < 2.0 * st.ACCEPT for s, v in states.items() if s < chosen)
    assert set(r.widths) == {"c1", "c2"} and all(w % 2 == 0 and 2 <= w <= 16 for w in r.widths.values())
    # measured time falls along the path: a wider state never measures faster
    order = sorted(states)
    assert all(states[a] <= states[b] + 1e-9 for a, b in zip(order, order[1:]))


def test_search_prefers_the_group_whose_narrowing_costs_least():
    graph = _graph()

    def damage(g):  # narrowing c2 is ruinous, c1 is free
        return 100.0 * (16 - g.node("c2").attrs["out"]) + 0.0 * g.node("c1").attrs["out"]

    r = st.search(graph, st.SpeedTarget(1.5), timer=cost_timer(), table=CostTable(), damage=damage)
    assert r.reached and r.widths["c2"] == 16 and r.widths["c1"] < 16

    def damage2(g):  # the other way round
        return 100.0 * (16 - g.node("c1").attrs["out"])

    r2 = st.search(graph, st.SpeedTarget(1.2), timer=cost_timer(), table=CostTable(), damage=damage2)
    assert r2.reached and r2.widths["c1"] == 16 and r2.widths["c2"] < 16


def test_unreachable_target_says_how_far_it_got():
    graph = _graph()
    r = st.search(graph, st.SpeedTarget(50.0), round_to=8, timer=cost_timer(), table=CostTable())
    assert not r.reached and r.widths == {"c1": 8, "c2": 8}  # the narrowest allowed
    assert "narrowest allowed width" in r.note and "round_to 8" in r.note and r.measured_speedup > 1.2


def test_search_on_residual_groups():
    graph = load_model(ROOT / "examples/resnet20.yaml").graph
    r = st.search(graph, st.SpeedTarget(2.0, batch=4), round_to=8, timer=cost_timer(slow=1.0),
                  table=CostTable(batch=4))
    groups = {g.producers[0]: g.size for g in channel_groups(graph) if g.prunable}
    assert r.reached and set(r.widths) == set(groups)
    assert all(w % 8 == 0 and w <= groups[p] for p, w in r.widths.items())


def test_run_prune_with_a_target(tmp_path, monkeypatch):
    monkeypatch.setattr(st, "time_models", cost_timer())
    monkeypatch.setattr(st, "LatencyTable", lambda *a, **k: CostTable())
    path = tiny(tmp_path, "prune: {target: {speedup: 2.0, batch: 1, threads: 2}, fine_tune: {epochs: 1}}\n")
    result = runner.invoke(app, ["prune", str(path), "--allow-untrained", "-o", str(tmp_path / "p.onnx"), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    t = report["target"]
    assert t["reached"] and t["speedup"] == 2.0 and t["threads"] == 2 and t["measured_speedup"] >= 2.0
    assert report["fine_tuned"] and report["config"]["target"]["speedup"] == 2.0
    # the file written has the widths the search chose
    model = onnx.load(str(tmp_path / "p.onnx"))
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    inits = {i.name: i for i in model.graph.initializer}
    assert [inits[c.input[1]].dims[0] for c in convs] == [t["widths"]["c1"], t["widths"]["c2"]]
    # the command line's target replaces the YAML's, and unreachable ones fail before fine-tuning
    result = runner.invoke(app, ["prune", str(path), "--allow-untrained", "-o", str(tmp_path / "q.onnx"),
                                 "--target-speedup", "40", "--round-to", "8"])
    assert result.exit_code == 2
    assert "cannot prune to 40x at batch 1 on cpu" in result.output and "a smaller round_to" in result.output
    assert not (tmp_path / "q.onnx").exists()


@pytest.mark.parametrize("flags, message", [
    (["--target-speedup", "2", "--ratio", "0.5"], "--ratio and --target-speedup do not go together"),
    (["--target-speedup", "0.9"], "--target-speedup must be > 1"),
    (["--batch", "8"], "--batch sets where the speed target is measured: give --target-speedup too"),
    (["--target-speedup", "2", "--method", "unstructured"], "a speed target needs --method structured"),
    (["--target-speedup", "2", "--device", "gpu"], "--device must be one of"),
])
def test_cli_errors(tmp_path, flags, message):
    path = tiny(tmp_path)
    result = runner.invoke(app, ["prune", str(path), "--allow-untrained", "-o", str(tmp_path / "p.onnx"), *flags])
    assert result.exit_code == 2 and message in " ".join(result.output.split()), result.output


def test_section_errors():
    base = MODEL + "data: {dataset: synthetic, samples: 40, num_classes: 4}\n"
    cases = {
        "prune: {target: {speedup: 1.0}}": "'prune.target.speedup' must be a number > 1",
        "prune: {target: {speedup: 2, batch: 0}}": "'prune.target.batch' must be an integer >= 1",
        "prune: {target: {speedup: 2, device: gpu}}": "'prune.target.device' must be one of",
        "prune: {target: {speedup: 2, batchsize: 4}}": "unknown key 'prune.target.batchsize'",
        "prune: {target: {speedup: 2}, amount: 0.5}": "'prune.amount' and 'prune.target' do not go together",
        "prune: {target: {speedup: 2}, method: unstructured}": "'prune.target' needs method structured",
        "prune: {target: 2}": "'prune.target' takes {speedup: 2.0, batch: 1}",
    }
    for section, message in cases.items():
        errs = errors_of(base + section + "\n")
        assert any(message in e for e in errs), (section, errs)
    loaded = load_model_text(base + "prune: {target: {speedup: 2.5, batch: 8}}\n", "t.yaml")
    assert loaded.prune.target == st.SpeedTarget(2.5, 8, "cpu", None)


@pytest.mark.parametrize("example", ["mobilenet_small", "unet_small", "inception_small"])
def test_search_through_depthwise_concat_and_up_convolutions(example):
    """Depthwise convs (width tied to their input), concatenated skips and conv_transpose: the table's widths
    are the ones the pruned graph really has, and the chosen model exports and runs."""
    from dlc.compiler.export_onnx import to_onnx
    from dlc.compiler.prune.structured import prune

    graph = load_model(ROOT / f"examples/{example}.yaml").graph
    table = CostTable()
    r = st.search(graph, st.SpeedTarget(1.6), round_to=4, timer=cost_timer(slow=1.0), table=table)
    assert r.reached, r.note
    g = graph.copy()
    prune(g, 0.0, skip=(), group_ratios=r.ratios())
    assert {p: g.node(p).attrs["out"] for p in r.widths} == r.widths
    an = st._Analysis(graph)
    searched = {gr.id: gr for gr in an.groups() if gr.prunable}
    by_producer = {gr.producers[0]: gr.id for gr in searched.values()}
    widths = {by_producer[p]: w for p, w in r.widths.items()}
    for layer in st._layers(graph, an, searched):  # the table's input widths are the pruned graph's
        node = g.node(layer.name)
        shape = g.shapes[node.inputs[0]]
        assert layer.cin(widths) == (int(np.prod(shape)) if node.op == "linear" else shape[0]), layer.name
        assert layer.cout(widths) == node.attrs["out"], layer.name
    model = to_onnx(g)
    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((1, *graph.shapes[graph.input_names[0]])).astype(np.float32)
    assert np.isfinite(s.run(None, {s.get_inputs()[0].name: x})[0]).all()


def test_real_runtime_path(tmp_path, monkeypatch):
    """The search on onnxruntime itself: entries measured in the child process and cached, whole models timed
    in bench_isolated. Timings are not asserted (shared machines); what was measured must be consistent."""
    monkeypatch.setenv("DLC_CACHE_DIR", str(tmp_path))
    graph = _graph()
    r = st.search(graph, st.SpeedTarget(1.3, batch=8, threads=1), round_to=8, min_time_s=0.05)
    assert r.table["measured"] == r.table["entries"] > 0 and r.table["cached"] == 0
    assert (tmp_path / "latency_tables.json").is_file()
    assert r.rounds and all(row["baseline_ms"] > 0 and row["pruned_ms"] > 0 for row in r.rounds)
    assert r.measured_speedup == pytest.approx(r.baseline_ms / r.pruned_ms)
    assert r.measured_speedup in [row["measured_speedup"] for row in r.rounds]
    assert r.reached == (r.measured_speedup >= 1.3) and (r.note == "") == r.reached
    again = st.search(graph, st.SpeedTarget(1.3, batch=8, threads=1), round_to=8, min_time_s=0.05)
    assert again.table["measured"] == 0 and again.table["cached"] == r.table["entries"]


def test_validation_loss_of_the_search_is_cross_entropy():
    """The search's damage for a classifier: mean cross-entropy of the backend's logits on the first `limit`
    images, against scikit-learn's log_loss."""
    from sklearn.metrics import log_loss

    from dlc.compiler.prune.pipeline import ValData
    from dlc.compiler.train.executor import Executor

    graph = _graph()
    rng = np.random.default_rng(3)
    for node in graph.nodes():
        for k, v in node.params.items():
            if k == "weight":
                v[...] = rng.standard_normal(v.shape).astype(np.float32) * 0.1
    x = rng.standard_normal((70, 3, 16, 16)).astype(np.float32)
    y = rng.integers(0, 4, 70)
    val = ValData(x, y, batch_size=16)
    logits = Executor(graph).forward(x[:50])[graph.outputs[0]].astype(np.float64)
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    assert 0.3 < probs.max() < 0.999  # neither uniform nor saturated: a wrong loss would show
    assert val.loss(graph, limit=50) == pytest.approx(log_loss(y[:50], probs, labels=range(4)), rel=1e-5)
