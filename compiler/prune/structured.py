"""Structured (channel) pruning with dependency groups, in the style of Torch-Pruning's DepGraph.

Every conv / conv_transpose / linear output opens a channel *space* (one slot per output channel). Labels
flow forward through the graph: each value carries, for every entry of its axis 0 (channels of a C×H×W map,
features of a flat vector), the (space, index) it came from. Pass-through layers (BN, activations, pools,
dropout, pad, upsample, depthwise convs) keep the labels, concat concatenates them, flatten repeats each
channel's label H·W times, and elementwise add/sub/mul/div unite the spaces of their operands index by index
(a union-find over spaces). A *group* is one set of united spaces: pruning it removes the same indices from
every producer, every per-channel parameter and every consumer's input slice that carries its labels.

Barriers (reshape, transpose, lrn, softmax, grouped non-depthwise convs, unknown ops), the model input and
the graph outputs mark the spaces they touch not prunable, so the final classifier is never pruned.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field

import numpy as np

from ..analysis import infer_shapes
from ..errors import DlcError
from ..graph import Graph

PASS_THROUGH = {
    "relu",
    "sigmoid",
    "tanh",
    "leaky_relu",
    "silu",
    "gelu",
    "clip",
    "hard_sigmoid",
    "hard_swish",
    "prelu",
    "dropout",
    "batchnorm",
    "affine",
    "pad",
    "maxpool",
    "avgpool",
    "global_avgpool",
    "upsample",
}
ELEMENTWISE = {"add", "sub", "mul", "div"}
PER_CHANNEL_PARAMS = {
    "batchnorm": ("scale", "bias", "mean", "var"),
    "affine": ("scale", "shift"),
    "prelu": ("slope",),
}
PRODUCERS = {"conv", "conv_transpose", "linear"}


@dataclass
class Group:
    """Coupled channel slots that are pruned with the same indices."""

    id: int
    producers: list[str]  # layers whose output channels open the group's spaces (topological order)
    size: int  # channels per slot
    prunable: bool
    members: list[str] = field(default_factory=list)  # every layer with a tensor sliced by the group
    reason: str = ""
    blocks: int = 1  # the channels form this many equal blocks that must shrink alike (a grouped conv's groups)

    def __repr__(self) -> str:
        state = "prunable" if self.prunable else f"fixed ({self.reason})"
        return f"Group({self.producers}, C={self.size}, {state})"


@dataclass
class _Binding:
    node: str
    param: str
    axis: int
    value: str  # whose labels index this axis
    groups: int = 1  # a grouped conv's weight axis 1: each group's rows take their own block of the input


class _Analysis:
    def __init__(self, graph: Graph):
        self.graph = graph
        self.parent: list[int] = []
        self.size: list[int] = []
        self.producer: list[str | None] = []
        self.fixed: dict[int, str] = {}  # space -> reason (on any space; resolved through find)
        self.labels: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.bindings: list[_Binding] = []
        self.blocks: dict[int, int] = {}  # space -> equal blocks its channels come in (grouped conv outputs)
        self._run()

    # --- union-find ----------------------------------------------------------------------------------
    def new_space(self, size: int, producer: str | None, fixed: str = "") -> int:
        s = len(self.parent)
        self.parent.append(s)
        self.size.append(size)
        self.producer.append(producer)
        if fixed:
            self.fixed[s] = fixed
        return s

    def find(self, s: int) -> int:
        while self.parent[s] != s:
            self.parent[s] = self.parent[self.parent[s]]
            s = self.parent[s]
        return s

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)
            if self.size[ra] != self.size[rb]:
                self.fixed[ra] = "operands of different widths"

    def roots(self, spaces: np.ndarray) -> np.ndarray:
        return np.array([self.find(int(s)) for s in spaces], dtype=np.int64)

    def fix(self, value: str, reason: str) -> None:
        if value in self.labels:
            for s in np.unique(self.labels[value][0]):
                self.fixed[int(s)] = reason

    def fresh(self, value: str, producer: str | None, fixed: str = "") -> None:
        shape = self.graph.shapes[value]
        c = int(shape[0]) if shape else 1
        s = self.new_space(c, producer, fixed)
        self.labels[value] = (np.full(c, s, dtype=np.int64), np.arange(c, dtype=np.int64))

    # --- propagation ---------------------------------------------------------------------------------
    def _run(self) -> None:
        g = self.graph
        for name in g.input_names:
            self.fresh(name, None, "model input")
        for node in g.nodes():
            ins = [self.labels[v] for v in node.inputs]
            out = node.outputs[0] if node.outputs else None
            op, a = node.op, node.attrs
            if op == "conv":
                c_in = g.shapes[node.inputs[0]][0]
                if a["groups"] == 1:
                    self.bindings.append(_Binding(node.name, "weight", 1, node.inputs[0]))
                    self.fresh(out, node.name)
                    self._bind_out(node, out, 0)
                elif a["groups"] == c_in == a["out"]:  # depthwise: channels pass through
                    self.labels[out] = ins[0]
                    self._bind_out(node, out, 0)
                else:  # grouped (ResNeXt): inputs and outputs go in equal numbers from each group
                    spaces, idx = ins[0]
                    if len(np.unique(spaces)) == 1 and np.array_equal(idx, np.arange(len(idx))):
                        space = int(spaces[0])
                        if self.blocks.get(space, a["groups"]) != a["groups"]:
                            self.fix(node.inputs[0], "grouped convs with different group counts")
                        self.blocks[space] = int(a["groups"])
                        self.bindings.append(_Binding(node.name, "weight", 1, node.inputs[0], int(a["groups"])))
                    else:  # its input mixes channels of several producers: its blocks are not one space's
                        self.fix(node.inputs[0], f"grouped conv '{node.name}'")
                    self.fresh(out, node.name)
                    self.blocks[int(self.labels[out][0][0])] = int(a["groups"])
                    self._bind_out(node, out, 0)
            elif op == "conv_transpose" and a["groups"] == 1:
                self.bindings.append(_Binding(node.name, "weight", 0, node.inputs[0]))
                self.fresh(out, node.name)
                self._bind_out(node, out, 1)
            elif op == "linear":
                self.bindings.append(_Binding(node.name, "weight", 1, node.inputs[0]))
                self.fresh(out, node.name)
                self._bind_out(node, out, 0)
            elif op in PASS_THROUGH:
                self.labels[out] = ins[0]
                for p in PER_CHANNEL_PARAMS.get(op, ()):
                    if p in node.params:
                        self.bindings.append(_Binding(node.name, p, 0, node.inputs[0]))
            elif op == "flatten":
                shape = g.shapes[node.inputs[0]]
                rep = int(np.prod(shape[1:])) if len(shape) > 1 else 1
                self.labels[out] = (np.repeat(ins[0][0], rep), np.repeat(ins[0][1], rep))
            elif op == "concat":
                self.labels[out] = (np.concatenate([s for s, _ in ins]), np.concatenate([i for _, i in ins]))
            elif op == "slice":  # a channel range: its labels are the range's (offsets follow pruning in apply)
                self.labels[out] = (ins[0][0][a["start"]:a["end"]], ins[0][1][a["start"]:a["end"]])
            elif op in ELEMENTWISE:
                (sa, ia), (sb, ib) = ins
                self.labels[out] = ins[0]
                if len(sa) != len(sb) or not np.array_equal(ia, ib):
                    for v in node.inputs:
                        self.fix(v, f"misaligned operands of '{node.name}'")
                else:
                    for x, y in set(zip(sa.tolist(), sb.tolist())):
                        self.union(x, y)
            else:  # barrier
                for v in node.inputs:
                    self.fix(v, f"{op} '{node.name}'")
                for v in node.outputs:
                    self.fresh(v, None, f"{op} '{node.name}'")
        for v in g.outputs:
            self.fix(v, "graph output")

    def _bind_out(self, node, out: str, axis: int) -> None:
        if "weight" in node.params:
            self.bindings.append(_Binding(node.name, "weight", axis, out))
        if "bias" in node.params:
            self.bindings.append(_Binding(node.name, "bias", 0, out))

    # --- groups --------------------------------------------------------------------------------------
    def groups(self) -> list[Group]:
        by_root: dict[int, Group] = {}
        order = {n.name: k for k, n in enumerate(self.graph.nodes())}
        for s, prod in enumerate(self.producer):
            if prod is None:
                continue
            r = self.find(s)
            grp = by_root.setdefault(r, Group(id=r, producers=[], size=self.size[r], prunable=True))
            grp.producers.append(prod)
        for s, reason in self.fixed.items():
            grp = by_root.get(self.find(s))
            if grp is not None and grp.prunable:
                grp.prunable, grp.reason = False, reason
        for s, n in self.blocks.items():
            grp = by_root.get(self.find(s))
            if grp is None:
                continue
            if grp.blocks not in (1, n) and grp.prunable:
                grp.prunable, grp.reason = False, "grouped convs with different group counts"
            grp.blocks = n
        for b in self.bindings:
            for r in np.unique(self.roots(np.unique(self.labels[b.value][0]))):
                grp = by_root.get(int(r))
                if grp is not None and b.node not in grp.members:
                    grp.members.append(b.node)
        out = sorted(by_root.values(), key=lambda gr: min(order[p] for p in gr.producers))
        for grp in out:
            grp.producers.sort(key=order.__getitem__)
            grp.members.sort(key=order.__getitem__)
        return out

    def root_of(self, group: Group) -> int:
        for s, prod in enumerate(self.producer):
            if prod == group.producers[0]:
                return self.find(s)
        raise KeyError(f"no group with producer '{group.producers[0]}' in this graph")

    def _kept(self, value: str, keeps: dict[int, np.ndarray]) -> np.ndarray:
        """Which channels of `value` stay, as a bool mask."""
        spaces, idx = self.labels[value]
        roots = self.roots(spaces)
        mask = np.ones(len(idx), dtype=bool)
        for r, keep in keeps.items():
            sel = roots == r
            mask[sel] = np.isin(idx[sel], keep)
        return mask

    def apply(self, keeps: dict[int, np.ndarray]) -> None:
        g = self.graph
        touched = set()
        slices = {}
        for node in g.nodes():  # the new offsets of each channel range, from what stays before and inside it
            if node.op == "slice":
                mask = self._kept(node.inputs[0], keeps)
                start, end = int(mask[:node.attrs["start"]].sum()), int(mask[:node.attrs["end"]].sum())
                if end == start:
                    raise DlcError(f"pruning would remove every channel that slice '{node.name}' takes "
                                   f"([{node.attrs['start']}, {node.attrs['end']})); prune less, or exclude the "
                                   "layers that produce them")
                slices[node.name] = (start, end)
        for name, (start, end) in slices.items():
            g.node(name).attrs.update(start=start, end=end)
        for b in self.bindings:
            mask = self._kept(b.value, keeps)
            if mask.all():
                continue
            node = g.node(b.node)
            if b.groups > 1:  # rows of group k read input block k: each keeps its own block's survivors
                w = node.params[b.param]
                blocks = mask.reshape(b.groups, -1)
                counts = blocks.sum(axis=1)
                if len(set(counts.tolist())) != 1:
                    raise DlcError(f"pruning '{b.node}': its {b.groups} input groups would keep "
                                   f"{counts.tolist()} channels; a grouped conv needs the same number in each")
                rows = w.shape[0] // b.groups
                node.params[b.param] = np.ascontiguousarray(np.concatenate(
                    [w[k * rows:(k + 1) * rows][:, np.flatnonzero(blocks[k])] for k in range(b.groups)]))
            else:
                node.params[b.param] = np.ascontiguousarray(
                    np.take(node.params[b.param], np.flatnonzero(mask), axis=b.axis)
                )
            touched.add(b.node)
        for name in touched:
            node = g.node(name)
            if node.op in ("conv", "linear"):
                # depthwise (groups == in == out): its channels pass through, so groups follows them; a grouped
                # conv keeps its groups (its outputs shrink by the same number in each)
                depthwise = node.op == "conv" and 1 < node.attrs["groups"] == node.attrs["out"]
                node.attrs["out"] = int(node.params["weight"].shape[0])
                if depthwise:
                    node.attrs["groups"] = node.attrs["out"]
            elif node.op == "conv_transpose":
                node.attrs["out"] = int(node.params["weight"].shape[1])
        infer_shapes(g)


def channel_groups(graph: Graph) -> list[Group]:
    """The dependency groups of `graph`, ordered by their first producer."""
    return _Analysis(graph).groups()


def _filter_norms(node, p: int) -> np.ndarray:
    w = node.params["weight"]
    if node.op == "conv_transpose":
        w = np.moveaxis(w, 1, 0)
    return np.abs(w.reshape(w.shape[0], -1).astype(np.float64)) ** p


def importance(graph: Graph, group: Group, method: str = "l1", seed: int = 0) -> np.ndarray:
    """One score per channel slot of `group` (higher = more important)."""
    if method == "random":
        return np.random.default_rng(seed).random(group.size)
    if method == "bn_scale":
        an = _Analysis(graph)
        root = an.root_of(group)
        score = np.zeros(group.size)
        found = False
        for node in graph.nodes():
            if node.op != "batchnorm":
                continue
            spaces, idx = an.labels[node.inputs[0]]
            sel = an.roots(spaces) == root
            if sel.any():
                found = True
                np.add.at(score, idx[sel], np.abs(node.params["scale"][sel].astype(np.float64)))
        return score if found else importance(graph, group, "l1")
    if method not in ("l1", "l2"):
        raise ValueError(f"unknown importance method '{method}' (l1, l2, bn_scale, random)")
    p = 1 if method == "l1" else 2
    score = np.zeros(group.size)
    for name in group.producers:
        score += _filter_norms(graph.node(name), p).sum(axis=1)
    return score if p == 1 else np.sqrt(score)


def prune_channels(graph: Graph, group: Group, keep_indices) -> None:
    """Keep only `keep_indices` of `group`'s channel slots in every tensor of the group; shapes are re-inferred."""
    an = _Analysis(graph)
    keep = np.unique(np.asarray(keep_indices, dtype=np.int64))
    if len(keep) == 0 or keep[0] < 0 or keep[-1] >= group.size:
        raise ValueError(f"keep_indices must be a non-empty subset of range({group.size})")
    an.apply({an.root_of(group): keep})


def _n_keep(c: int, ratio: float, round_to: int, min_channels: int) -> int:
    n = math.ceil(round((1.0 - ratio) * c, 6))
    n = max(n, min_channels, round_to, 1)
    if round_to > 1:
        n = math.ceil(n / round_to) * round_to
    return min(n, c)


def matches(name: str, patterns) -> bool:
    """Whether a layer name equals or fnmatch-matches any of `patterns`."""
    return any(name == p or fnmatch.fnmatchcase(name, p) for p in patterns)


def group_ratio(group: Group, ratio: float | None, overrides: dict[str, float] | None,
                producers=frozenset()) -> float | None:
    """The override of the group's producers (else of its own members: BN, depthwise convs) when a pattern
    matches, else the global ratio; the last matching pattern wins, as in train.layers. Members in `producers`
    (every group's producers) only read the group's channels, so their names set their own group's ratio."""
    own = [m for m in group.members if m not in producers]
    for names in (group.producers, own):
        found = None
        for pattern, r in (overrides or {}).items():
            if any(matches(n, (pattern,)) for n in names):
                found = r
        if found is not None:
            return float(found)
    return ratio


def prune(
    graph: Graph,
    ratio: float,
    method: str = "l1",
    round_to: int = 1,
    skip=(),
    min_channels: int = 1,
    seed: int = 0,
    overrides: dict[str, float] | None = None,
    original_sizes: dict[str, int] | None = None,
    scope: str = "layer",
    group_ratios: dict[str, float] | None = None,
) -> list[dict]:
    """Prune channels of every prunable group in place; returns one report row per group.

    scope "layer": each group loses `ratio` of its channels. scope "global" (Torch-Pruning's global pruning):
    `ratio` of all the channels of the groups without an override go, the least important first, ranked across
    groups by importance divided by its group's mean (so wide and narrow layers compare fairly); each group keeps
    at least max(min_channels, round_to) and its count is rounded up to round_to.
    `overrides` maps layer names or fnmatch patterns to their group's own ratio (0 keeps it whole); `skip`
    (names or patterns) leaves a group whole. With `original_sizes` ({first producer: channels}), ratios count
    from those sizes rather than the current ones, so iterative steps land on the same final widths as one shot.
    `group_ratios` ({first producer: ratio}, e.g. from a speed-target search) sets those groups' ratios exactly,
    before any pattern in `overrides`.
    """
    for r in [ratio, *(overrides or {}).values(), *(group_ratios or {}).values()]:
        if not 0.0 <= r < 1.0:
            raise ValueError(f"ratio must be in [0, 1), got {r}")
    if scope not in ("layer", "global"):
        raise ValueError(f"scope must be 'layer' or 'global', got '{scope}'")
    an = _Analysis(graph)
    groups = an.groups()
    producers = {p for g in groups for p in g.producers}
    rows = []  # (group, its ratio or None for the global pool, channels it counts from)
    for grp in groups:
        if not grp.prunable or any(matches(n, skip) for n in grp.producers + grp.members):
            continue
        r = (group_ratios or {}).get(grp.producers[0])
        if r is None:
            r = group_ratio(grp, None, overrides, producers)  # None: no override
        if r is None and scope == "layer":
            r = ratio
        rows.append((grp, r, (original_sizes or {}).get(grp.producers[0], grp.size)))
    scores = {grp.id: importance(graph, grp, method, seed=seed + grp.id) for grp, _, _ in rows}
    counts = {grp.id: min(_n_keep(base, r, round_to, min_channels), grp.size) for grp, r, base in rows if r is not None}
    counts.update(_global_counts([(g, b) for g, r, b in rows if r is None], scores, ratio, round_to, min_channels))
    for grp, _, _ in rows:  # a grouped conv's output: a multiple of its groups, at least one per group
        if grp.blocks > 1:
            counts[grp.id] = min(max(math.ceil(counts[grp.id] / grp.blocks), 1) * grp.blocks, grp.size)
    keeps: dict[int, np.ndarray] = {}
    report = []
    for grp, r, base in rows:
        n = counts[grp.id]
        if n < grp.size:
            keeps[grp.id] = kept_channels(scores[grp.id], n, grp.blocks)
        report.append({"producers": list(grp.producers), "before": grp.size, "after": n,
                       "ratio": r if r is not None else 1.0 - n / base})
    if keeps:
        an.apply(keeps)
    return report


def kept_channels(scores: np.ndarray, n: int, blocks: int = 1) -> np.ndarray:
    """The sorted indices of the `n` channels that stay: the most important (ties to the lower index), or for a
    grouped conv's output (`blocks` > 1) the best n / blocks of each block."""
    if blocks == 1:
        return np.sort(np.argsort(-scores, kind="stable")[:n])
    per, width = n // blocks, len(scores) // blocks
    return np.sort(np.concatenate([b * width + np.argsort(-scores[b * width:(b + 1) * width], kind="stable")[:per]
                                   for b in range(blocks)]))


def _global_counts(pool: list[tuple[Group, int]], scores: dict[int, np.ndarray], ratio: float, round_to: int,
                   min_channels: int) -> dict[int, int]:
    """Channels each pooled group keeps when the least important `ratio` of all their channels (counted from
    their original sizes) go, by importance normalised by each group's mean."""
    if not pool:
        return {}
    floor = {g.id: min(max(min_channels, round_to, 1), g.size) for g, _ in pool}
    target = sum(b for _, b in pool) - math.floor(round(ratio * sum(b for _, b in pool), 6))
    keep = dict(floor)
    # Every channel above its group's floor competes on its normalised score; ties go to the earlier group/index.
    cand = []
    for g, _ in pool:
        s = scores[g.id]
        norm = s / s.mean() if s.mean() > 0 else np.zeros_like(s)
        top = np.sort(norm)[::-1][floor[g.id]:]
        cand += [(-v, g.id, i) for i, v in enumerate(top)]
    cand.sort()
    for _, gid, _ in cand[:max(target - sum(floor.values()), 0)]:
        keep[gid] += 1
    sizes = {g.id: g.size for g, _ in pool}
    return {gid: min(math.ceil(n / round_to) * round_to if round_to > 1 else n, sizes[gid]) for gid, n in keep.items()}


def group_sizes(graph: Graph) -> dict[str, int]:
    """{first producer: channels} of every group (the reference for `prune(original_sizes=...)`)."""
    return {g.producers[0]: g.size for g in channel_groups(graph)}
