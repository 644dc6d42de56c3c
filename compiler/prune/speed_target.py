"""Structured pruning to a measured speed-up on the target runtime (`prune: {target: {speedup, batch}}`).

In the spirit of NetAdapt (Yang et al. 2018) and HALP (Shen et al. 2022): the widths of the channel groups are
chosen from latencies measured on onnxruntime itself, not from MACs, whose relation to time onnxruntime's
kernels do not follow (channel blocks, layout reorders, fixed per-node costs).

1. Every conv / conv_transpose / linear layer's time is looked up in a latency table (latency_table.py) at each
   width its input and output groups can take: multiples of `round_to` (at least size / 8 apart), measured
   once per machine and cached.
2. The whole model is timed once on the runtime (dlc's passes applied, as deployed): what the layers do not
   explain (adds, pools, reorders between layers) is kept as a constant, so the table predicts whole-model
   time as `other + Σ layer times`.
3. Greedy search, one move at a time: for every group, the largest narrowing that saves at least a step of
   predicted time (2.5 % of the model's, or what is left to save), scored by the importance it removes (each
   channel's score over its group's mean, as global pruning ranks them) per millisecond saved; the cheapest
   move is taken until the prediction meets the target.
4. The chosen widths are pruned on a copy, exported, optimized and timed against the baseline, interleaved
   (ratio of minima, as `dlc bench`). When the measured speed-up falls short, the predicted goal is tightened
   by the shortfall and the search goes on from there; at most `MAX_ROUNDS` rounds.
The target is reached when the measured speed-up is at least the target. When no group can narrow any more,
the search stops and says how far it got.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DlcError
from ..graph import Graph
from .latency_table import TIMED_OPS, LatencyTable, layer_key, overhead_key
from .structured import _Analysis, importance, matches

MAX_ROUNDS = 8  # whole-model measurements along the path at most
STEP_FRACTION = 0.01  # each greedy move saves at least this fraction of the model's predicted time
ACCEPT = 1.02  # a state is accepted when measured at least this × the target: re-measurements scatter too
GRID = 8  # widths per group: multiples of max(round_to, ceil(size / GRID))
CIN_POINTS = 12  # input widths measured per layer at most; between them, linear interpolation


@dataclass
class SpeedTarget:
    speedup: float
    batch: int = 1
    device: str = "cpu"
    threads: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"speedup": self.speedup, "batch": self.batch, "device": self.device, "threads": self.threads}


@dataclass
class _Layer:
    name: str
    op: str
    attrs: dict[str, Any]
    in_shape: tuple[int, ...]  # per sample; in_shape[0] is replaced by the pruned input width
    fixed_in: int  # input channels (features) from spaces no searched group owns
    in_groups: dict[int, float]  # group id -> input channels per channel of that group
    out_group: int | None  # the group its output channels belong to (None: fixed)
    depthwise: bool = False
    table: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # cout -> (cins, ms)

    def cin(self, widths: dict[int, int]) -> int:
        return int(round(self.fixed_in + sum(per * widths[g] for g, per in self.in_groups.items())))

    def cout(self, widths: dict[int, int]) -> int:
        if self.depthwise:
            return self.cin(widths)
        return widths[self.out_group] if self.out_group is not None else int(self.attrs["out"])

    def key(self, cin: int, cout: int) -> dict[str, Any]:
        attrs = dict(self.attrs, out=cout)
        if self.depthwise:
            attrs["groups"] = cout
        return layer_key(self.op, attrs, (cin, *self.in_shape[1:]))

    def ms(self, widths: dict[int, int]) -> float:
        cins, times = self.table[self.cout(widths)]
        return float(np.interp(self.cin(widths), cins, times))


@dataclass
class SearchResult:
    widths: dict[str, int]  # first producer of each searched group -> channels kept
    sizes: dict[str, int]  # ... -> channels before
    reached: bool
    measured_speedup: float
    predicted_speedup: float
    baseline_ms: float
    pruned_ms: float
    rounds: list[dict[str, Any]]
    table: dict[str, Any]
    note: str = ""

    def ratios(self) -> dict[str, float]:
        """{first producer: fraction removed}, for structured.prune(group_ratios=...)."""
        return {p: 1.0 - w / self.sizes[p] for p, w in self.widths.items()}

    def to_dict(self) -> dict[str, Any]:
        return {"reached": self.reached, "measured_speedup": self.measured_speedup,
                "predicted_speedup": self.predicted_speedup, "baseline_ms": self.baseline_ms,
                "pruned_ms": self.pruned_ms, "widths": self.widths, "sizes": self.sizes, "rounds": self.rounds,
                "table": self.table, "note": self.note}


def candidate_widths(size: int, round_to: int, blocks: int = 1) -> list[int]:
    """The widths a group of `size` channels may take, ascending, ending at `size`."""
    step = max(round_to, math.ceil(size / GRID), 1)
    unit = math.lcm(max(round_to, 1), max(blocks, 1))
    step = math.ceil(step / unit) * unit
    return sorted({w for w in range(step, size, step)} | {size})


def _layers(graph: Graph, an: _Analysis, searched: dict[int, Any]) -> list[_Layer]:
    layers = []
    for node in graph.nodes():
        if node.op not in TIMED_OPS:
            continue
        value = node.inputs[0]
        shape = tuple(graph.shapes[value])
        roots = an.roots(an.labels[value][0])
        in_groups: dict[int, float] = {}
        fixed_in = 0
        for r, count in zip(*np.unique(roots, return_counts=True)):
            if int(r) in searched:
                in_groups[int(r)] = count / searched[int(r)].size
            else:
                fixed_in += int(count)
        if node.op == "linear":  # a flattened map: features = channels · H · W, all scale with the group
            in_shape = (int(np.prod(shape)),)
        else:
            in_shape = shape
        depthwise = node.op == "conv" and 1 < node.attrs["groups"] == shape[0] == node.attrs["out"]
        out_root = None if depthwise else an.find(int(an.labels[node.outputs[0]][0][0]))
        layers.append(_Layer(node.name, node.op, dict(node.attrs), in_shape, fixed_in, in_groups,
                             out_root if out_root in searched else None, depthwise))
    return layers


def _cin_grid(layer: _Layer, cands: dict[int, list[int]]) -> list[int]:
    values = {layer.fixed_in}
    for g, per in layer.in_groups.items():
        values = {v + int(round(per * w)) for v in values for w in cands[g]}
    values = sorted(values)
    if len(values) > CIN_POINTS:
        idx = np.unique(np.linspace(0, len(values) - 1, CIN_POINTS).round().astype(int))
        values = [values[i] for i in idx]
    return values


def _fill_tables(layers: list[_Layer], cands: dict[int, list[int]], table: LatencyTable) -> None:
    """Each layer's milliseconds at every (input, output) width of its grid, less what a model of the bare
    input costs to run (overhead_key): in the whole model, one run call and one input copy serve all layers."""
    plan = []  # (layer, cout, cins)
    for layer in layers:
        cins = _cin_grid(layer, cands)
        if layer.depthwise:
            plan += [(layer, c, [c]) for c in cins]
        else:
            couts = cands[layer.out_group] if layer.out_group is not None else [int(layer.attrs["out"])]
            plan += [(layer, c, cins) for c in couts]
    keys = [layer.key(ci, co) for layer, co, cins in plan for ci in cins]
    bare = [overhead_key(k["in_shape"]) for k in keys]
    times = table.lookup(keys + bare)
    net = iter(max(t - o, 0.02 * t) for t, o in zip(times[:len(keys)], times[len(keys):]))
    for layer, co, cins in plan:
        layer.table[co] = (np.asarray(cins, float), np.asarray([next(net) for _ in cins]))
    for layer in layers:  # a depthwise layer: one table over its width, looked up by cout (= cin)
        if layer.depthwise:
            cins = sorted(layer.table)
            ms = [layer.table[c][1][0] for c in cins]
            layer.table = {c: (np.asarray(cins, float), np.asarray(ms)) for c in cins}


def _deployable(graph: Graph, ratios: dict[str, float] | None, exclude) -> bytes:
    """The graph (pruned to `ratios` on a copy) as deployed: exported and through dlc's default passes."""
    from ..export_onnx import to_onnx
    from ..passes.registry import optimize
    from .structured import prune

    g = graph.copy()
    if ratios:
        prune(g, 0.0, "l1", skip=exclude, group_ratios=ratios)
    model, _ = optimize(to_onnx(g))
    return model.SerializeToString()


def time_models(models: list[bytes], target: SpeedTarget, min_time_s: float) -> list[float]:
    """Minimum latency (ms) of each model, interleaved in one timing process (runtime.bench_isolated)."""
    from dlc.runtime.bench_isolated import bench_isolated

    with tempfile.TemporaryDirectory(prefix="dlc-speed-target-") as tmp:
        paths = []
        for k, data in enumerate(models):
            paths.append(Path(tmp) / f"model_{k}.onnx")
            paths[-1].write_bytes(data)
        result = bench_isolated(paths, [target.batch], device=target.device, min_time_s=min_time_s,
                                threads=target.threads)
    return [r.min_ms for r in result.rows]


def search(graph: Graph, target: SpeedTarget, importance_method: str = "l1", round_to: int = 1,
           exclude=(), cache: bool = True, min_time_s: float = 1.0, say: Callable[[str], None] | None = None,
           damage: Callable[[Graph], float] | None = None,
           timer: Callable[[list[bytes], SpeedTarget, float], list[float]] | None = None,
           table: LatencyTable | None = None) -> SearchResult:
    """Per-group widths whose pruned model measures at least `target.speedup` × faster than `graph` on the
    target runtime. `damage(graph)` (e.g. validation loss; pipeline.damage_fn) ranks the moves by what each
    group's narrowing measurably costs; without it, by the importance scores removed. `timer` (tests) replaces
    the whole-model timing; `table` the layer table."""
    say = say or (lambda _msg: None)
    timer = timer or time_models
    an = _Analysis(graph)
    groups = [g for g in an.groups() if g.prunable and not any(matches(n, exclude) for n in g.producers + g.members)]
    if not groups:
        raise DlcError("pruning to a speed target: the model has no prunable channel groups (every group is fixed "
                       "or excluded)")
    searched = {g.id: g for g in groups}
    cands = {g.id: candidate_widths(g.size, round_to, g.blocks) for g in groups}
    layers = _layers(graph, an, searched)
    table = table or LatencyTable(target.batch, target.device, target.threads, cache=cache)
    say(f"latency table: {sum(len(_cin_grid(la, cands)) for la in layers)} input widths over {len(layers)} layers "
        f"at batch {target.batch} on {target.device}")
    _fill_tables(layers, cands, table)
    say(f"latency table: {table.measured} entries measured, {table.cached} from the cache "
        f"({table.seconds:.1f} s)")

    # normalised importance, ascending: narrowing a group to w drops its (size - w) lowest scores
    scores = {g.id: importance(graph, g, importance_method, seed=g.id) for g in groups}
    lowest = {}
    for g in groups:
        sc = scores[g.id]
        norm = sc / sc.mean() if sc.mean() > 0 else np.ones_like(sc)
        lowest[g.id] = np.concatenate([[0.0], np.cumsum(np.sort(norm))])
    curves = _damage_curves(graph, groups, cands, scores, damage, say) if damage else None

    full = {g.id: g.size for g in groups}
    layer_sum = sum(la.ms(full) for la in layers)
    base_bytes = _deployable(graph, None, exclude)
    baseline_ms = timer([base_bytes], target, min_time_s)[0]
    other = max(baseline_ms - layer_sum, 0.0)  # what the layers do not explain: a constant
    say(f"baseline: {baseline_ms:.3f} ms at batch {target.batch} (its layers in the table: {layer_sum:.3f} ms)")

    def predicted(w: dict[int, int]) -> float:
        return other + sum(la.ms(w) for la in layers)

    def cost(gid: int, old: int, new: int) -> float:
        size = searched[gid].size
        l1 = float(lowest[gid][size - new] - lowest[gid][size - old])
        if curves is None:
            return l1
        # measured damage (never below zero: noise), the L1 share only breaking ties between free moves
        return max(curves[gid][new] - curves[gid][old], 0.0) + 1e-6 * l1

    path = _greedy_path(groups, cands, full, predicted, cost)
    predicted0 = path[0][1]
    say(f"search path: {len(path) - 1} moves, predicted {predicted0 / path[-1][1]:.2f}x at the narrowest")

    # Measured bisection along the path for its first state measured at least ACCEPT x the target: states are
    # ever narrower, so measured speed rises along it (up to noise). The first probe is the predicted state.
    sizes = {g.producers[0]: g.size for g in groups}
    measured: dict[int, tuple[float, float]] = {}
    rounds: list[dict[str, Any]] = []

    def ratios_of(i: int) -> dict[str, float]:
        return {searched[g].producers[0]: 1.0 - w / searched[g].size for g, w in path[i][0].items()}

    def measure(i: int) -> float:
        if i not in measured:
            base_ms, pruned_ms = timer([base_bytes, _deployable(graph, ratios_of(i), exclude)], target, min_time_s)
            measured[i] = (base_ms, pruned_ms)
            rounds.append({"round": len(rounds) + 1, "state": i, "predicted_speedup": predicted0 / path[i][1],
                           "measured_speedup": base_ms / pruned_ms, "baseline_ms": base_ms, "pruned_ms": pruned_ms})
            say(f"round {len(rounds)}: path state {i}/{len(path) - 1}, predicted {predicted0 / path[i][1]:.2f}x, "
                f"measured {base_ms / pruned_ms:.2f}x ({base_ms:.3f} -> {pruned_ms:.3f} ms)")
        base_ms, pruned_ms = measured[i]
        return base_ms / pruned_ms

    want = target.speedup * ACCEPT
    last = len(path) - 1
    lo, hi = 0, None  # lo: known to miss (state 0 is the model itself); hi: known to meet
    probe = next((i for i, (_, t) in enumerate(path) if predicted0 / t >= want), last)
    while len(rounds) < MAX_ROUNDS:
        got = measure(probe)
        if got >= want:
            hi = probe
        else:
            lo = probe
        if (hi is None and lo == last) or (hi is not None and hi - lo <= 1):
            break
        # next probe: where the prediction, scaled by how far off it was at this probe, says the target is
        scale = (predicted0 / path[probe][1]) / got
        top = hi if hi is not None else last
        guess = next((i for i in range(lo + 1, top + 1) if predicted0 / path[i][1] / scale >= want), top)
        if guess in measured or not lo < guess <= top:
            guess = (lo + top + 1) // 2 if hi is None else (lo + hi) // 2
        if guess in measured:
            break
        probe = guess
    if hi is None:  # nothing met it: the fastest measured state
        best = max(measured, key=lambda i: measured[i][0] / measured[i][1])
    else:
        best = hi
    base_ms, pruned_ms = measured[best]
    speed = base_ms / pruned_ms
    reached = speed >= target.speedup
    note = "" if reached else (
        f"reached {speed:.2f}x of the {target.speedup:g}x asked for"
        + (": every group is at its narrowest allowed width" if best == len(path) - 1 or measured.get(
            len(path) - 1) else f" in {MAX_ROUNDS} measurements")
        + (f" (widths are multiples of round_to {round_to})" if round_to > 1 else ""))
    return SearchResult({searched[g].producers[0]: w for g, w in path[best][0].items()}, sizes, reached, speed,
                        predicted0 / path[best][1], base_ms, pruned_ms, rounds, table.to_dict(), note)


def _damage_curves(graph: Graph, groups, cands, scores: dict[int, np.ndarray], damage,
                   say) -> dict[int, dict[int, float]]:
    """{group: {width: damage with only that group narrowed to width}}, its lowest-importance channels removed
    (as structured.prune removes them), each on a copy of the graph: the sensitivity analysis behind the
    search's choice of which group to narrow. Damages add up across groups in the search (as sensitivity-based
    pruning assumes)."""
    from .structured import kept_channels, prune_channels

    base = damage(graph)
    curves: dict[int, dict[int, float]] = {}
    total = sum(len(cands[g.id]) - 1 for g in groups)
    say(f"sensitivity: {total} trials (one group narrowed at a time)")
    for g in groups:
        curve = {g.size: base}
        for w in cands[g.id]:
            if w < g.size:
                trial = graph.copy()
                prune_channels(trial, g, kept_channels(scores[g.id], w, g.blocks))
                curve[w] = damage(trial)
        curves[g.id] = curve
    return curves


def _greedy_path(groups, cands, widths, predicted, cost) -> list[tuple[dict[int, int], float]]:
    """States from the full widths to the narrowest: each move narrows the one group whose narrowing loses the
    least importance per millisecond saved, by the least that saves STEP_FRACTION of the first state's
    predicted time (or, where no narrowing saves that much, the one that saves most)."""
    widths = dict(widths)
    now = predicted(widths)
    step = STEP_FRACTION * now
    path = [(dict(widths), now)]
    while True:
        best = None  # (score, gid, width, time)
        for g in groups:
            w0 = widths[g.id]
            move = None
            for w in reversed([w for w in cands[g.id] if w < w0]):  # widest first
                t = predicted({**widths, g.id: w})
                if now - t >= step:
                    move = (w, t)
                    break
                if now - t > 0 and (move is None or t < move[1]):
                    move = (w, t)
            if move is None:
                continue
            score = cost(g.id, w0, move[0]) / (now - move[1])
            if best is None or score < best[0]:
                best = (score, g.id, *move)
        if best is None:
            return path
        _, gid, w, now = best
        widths[gid] = w
        path.append((dict(widths), now))
