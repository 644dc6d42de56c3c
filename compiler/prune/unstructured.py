"""Unstructured (magnitude) pruning: masks that zero individual weights, held at zero while fine-tuning.

Only the weights of conv / conv_transpose / linear layers are pruned; biases, BN and other per-channel
parameters stay dense. Masks are bool arrays (True = keep) keyed "node.weight", like the solver's parameters.

Selection is by |w|, smallest first, ties broken by flat index (lower index pruned first; in global scope,
earlier layers first), so the same weights always give the same masks. Every output channel (filter) keeps its largest weight, so no layer and no filter
is ever pruned entirely; the count of pruned weights is still exact (round(sparsity · n)) unless that would
empty a filter. Masks only shrink: weights pruned by `existing` masks stay pruned.

Honesty about what this buys: the zeros make the ONNX file compress well (what a zip or an OTA update ships,
see `compressed_size`), but the file itself has the same size and dense runtimes such as onnxruntime run it at
the same speed. Structured pruning (compiler/prune/structured.py) is what makes a model faster.
"""

from __future__ import annotations

import fnmatch
import math
import zlib
from typing import Any

import numpy as np

from ..errors import DlcError, did_you_mean
from ..graph import Graph

PRUNABLE_OPS = ("conv", "conv_transpose", "linear")
SCOPES = ("layer", "global")
DENSE_RUNTIME_NOTE = ("zeros do not make dense runtimes such as onnxruntime faster, and the .onnx file keeps its "
                      "size; only its compressed size (zip, OTA update) shrinks")


def _matches(name: str, pattern: str) -> bool:
    return name == pattern or fnmatch.fnmatchcase(name, pattern)


def _check_patterns(patterns, layers: list[str], what: str) -> None:
    for p in patterns:
        if not any(_matches(layer, str(p)) for layer in layers):
            hint = did_you_mean(str(p), layers)
            raise DlcError(f"{what} '{p}' matches no prunable layer (conv, conv_transpose or linear)"
                           + (f"; {hint}" if hint else f"; prunable layers: {', '.join(layers) or 'none'}"))


def _check_sparsity(value, what: str) -> float:
    try:
        s = float(value)
    except (TypeError, ValueError):
        raise DlcError(f"{what} must be a number in [0, 1), got {value!r}") from None
    if not 0.0 <= s < 1.0:
        raise DlcError(f"{what} must be in [0, 1) (the fraction of weights set to zero), got {value!r}")
    return s


def prunable_weights(graph: Graph, skip=()) -> dict[str, np.ndarray]:
    """"node.weight" -> the live weight array of every conv / conv_transpose / linear layer not in `skip`
    (layer names or fnmatch patterns), in graph order."""
    layers = [n.name for n in graph.nodes() if n.op in PRUNABLE_OPS and "weight" in n.params]
    if isinstance(skip, str):
        skip = (skip,)
    _check_patterns(skip, layers, "skip entry")
    return {f"{name}.weight": graph.node(name).params["weight"] for name in layers
            if not any(_matches(name, str(p)) for p in skip)}


def _filter_ids(node, w: np.ndarray) -> np.ndarray:
    """For every weight entry (flat), the output channel it feeds."""
    if node.op == "conv_transpose":  # weight C_in × (out/groups) × kh × kw
        c_in, per_group = w.shape[0], w.shape[1]
        group = np.arange(c_in) // (c_in // node.attrs.get("groups", 1))
        ids = group[:, None] * per_group + np.arange(per_group)[None, :]
        return np.broadcast_to(ids.reshape(c_in, per_group, *([1] * (w.ndim - 2))), w.shape).ravel()
    return np.repeat(np.arange(w.shape[0]), w.size // w.shape[0])  # conv O×(C/g)×kh×kw, linear O×I


def _scores(node, w: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """|w| per flat entry, -1 for entries already pruned (pruned first) and +inf for each filter's protected
    largest kept weight (never pruned)."""
    score = np.abs(w.ravel()).astype(np.float64)
    score[~kept] = -1.0
    fid = _filter_ids(node, w)
    idx = np.arange(w.size)
    order = np.lexsort((idx, -score, fid))  # by filter, then largest first, then lowest index
    first = order[np.unique(fid[order], return_index=True)[1]]
    first = first[score[first] >= 0]  # a filter pruned entirely by `existing` has nothing left to protect
    score[first] = np.inf
    return score


def _prune_smallest(score: np.ndarray, count: int) -> np.ndarray:
    """Keep mask with the `count` lowest scores pruned (stable: equal scores pruned in flat-index order),
    at least every already-pruned entry, never a protected one."""
    count = max(count, int((score < 0).sum()))
    count = min(count, int(np.isfinite(score).sum()))
    keep = np.ones(score.size, dtype=bool)
    keep[np.argsort(score, kind="stable")[:count]] = False
    return keep


def _count(sparsity: float, n: int) -> int:
    return int(math.floor(sparsity * n + 0.5))


def layer_sparsity_for(name: str, sparsity: float, layer_sparsity: dict[str, float] | None) -> float:
    """A layer's target: its exact name in `layer_sparsity`, else the last matching fnmatch pattern, else
    `sparsity`."""
    if not layer_sparsity:
        return sparsity
    if name in layer_sparsity:
        return float(layer_sparsity[name])
    value = sparsity
    for pattern, s in layer_sparsity.items():
        if fnmatch.fnmatchcase(name, str(pattern)):
            value = float(s)
    return value


def magnitude_masks(graph: Graph, sparsity: float, scope: str = "layer",
                    layer_sparsity: dict[str, float] | None = None, skip=(),
                    existing: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Bool keep-masks per "node.weight" that prune the smallest-magnitude weights.

    scope "layer": each layer loses round(s · n) weights, s = `sparsity` or its `layer_sparsity` override (keys
    are layer names or fnmatch patterns; an exact name wins, else the last matching pattern). scope "global":
    one magnitude threshold over all prunable weights not overridden, round(sparsity · N) pruned in total;
    overridden layers are pruned layer-wise. `skip` (names or patterns) stays dense and gets no mask.
    `existing` masks are respected: their pruned weights stay pruned and count towards the target.
    Every output channel keeps its largest weight (see the module docstring).
    """
    if scope not in SCOPES:
        raise DlcError(f"pruning scope '{scope}' is unknown; use one of: {', '.join(SCOPES)}")
    sparsity = _check_sparsity(sparsity, "sparsity")
    weights = prunable_weights(graph, skip)
    layers = [k.rsplit(".", 1)[0] for k in weights]
    all_layers = [n.name for n in graph.nodes() if n.op in PRUNABLE_OPS and "weight" in n.params]
    layer_sparsity = dict(layer_sparsity or {})
    _check_patterns(layer_sparsity, all_layers, "layer_sparsity key")
    for key, value in layer_sparsity.items():
        layer_sparsity[key] = _check_sparsity(value, f"layer_sparsity['{key}']")
    existing = existing or {}
    for key, m in existing.items():
        if key not in weights and key.rsplit(".", 1)[0] not in all_layers:
            raise DlcError(f"existing mask '{key}' names no prunable weight of model '{graph.name}'")
        if key in weights and np.shape(m) != weights[key].shape:
            raise DlcError(f"existing mask '{key}' has shape {np.shape(m)}, the weight has {weights[key].shape}")

    scores: dict[str, np.ndarray] = {}
    for key, name in zip(weights, layers):
        w = weights[key]
        kept = np.asarray(existing[key], dtype=bool).ravel() if key in existing else np.ones(w.size, dtype=bool)
        scores[key] = _scores(graph.node(name), w, kept)

    masks: dict[str, np.ndarray] = {}
    pooled = []
    for key, name in zip(weights, layers):
        overridden = bool(layer_sparsity) and (name in layer_sparsity or any(
            fnmatch.fnmatchcase(name, str(p)) for p in layer_sparsity))
        if scope == "global" and not overridden:
            pooled.append(key)
            continue
        s = layer_sparsity_for(name, sparsity, layer_sparsity)
        masks[key] = _prune_smallest(scores[key], _count(s, weights[key].size)).reshape(weights[key].shape)
    if pooled:
        score = np.concatenate([scores[k] for k in pooled])
        keep = _prune_smallest(score, _count(sparsity, score.size))
        offset = 0
        for key in pooled:
            n = weights[key].size
            masks[key] = keep[offset:offset + n].reshape(weights[key].shape)
            offset += n
    # Graph order, whatever the scope; a skipped layer keeps its existing mask (masks only shrink).
    out = {k: masks[k] for k in weights}
    out.update({k: np.asarray(m, dtype=bool).copy() for k, m in existing.items() if k not in weights})
    return out


def apply_masks(graph: Graph, masks: dict[str, np.ndarray]) -> None:
    """Zero the pruned weights in place (as +0.0, so the bytes compress alike)."""
    for key, mask in masks.items():
        node_name, tensor = key.rsplit(".", 1)
        p = graph.node(node_name).params[tensor]
        if p.shape != np.shape(mask):
            raise DlcError(f"mask '{key}' has shape {np.shape(mask)}, the tensor has {p.shape}")
        np.copyto(p, 0.0, where=~np.asarray(mask, dtype=bool))


def gmp_sparsity(step: int, start: int, end: int, initial: float, final: float) -> float:
    """Cubic gradual-magnitude-pruning schedule (Zhu & Gupta 2017, SparseML GMP):
    s_t = s_f + (s_i - s_f)·(1 - (t - t0)/(t1 - t0))³, `initial` before `start`, `final` from `end` on."""
    if step <= start:
        return float(initial)
    if step >= end:
        return float(final)
    frac = (step - start) / (end - start)
    return float(final + (initial - final) * (1.0 - frac) ** 3)


class MaskKeeper:
    """Trainer callback that keeps pruned weights at exactly zero while fine-tuning.

    The solver does the real work (`Solver.set_masks`: zero gradient and optimizer state for pruned entries,
    re-zeroed after each update); this installs the masks on the trainer's solver and re-applies them to the
    graph. Call `attach(trainer)` before `run()` to hold them from the first step; otherwise they are installed
    after the first step, which zeroes that step's momentum for the pruned weights as well."""

    def __init__(self, masks: dict[str, np.ndarray]):
        self.masks = masks

    def attach(self, trainer) -> None:
        trainer.solver.set_masks(self.masks)
        apply_masks(trainer.graph, self.masks)

    def on_step(self, trainer, global_iteration: int) -> None:
        if trainer.solver.masks is not self.masks:
            trainer.solver.set_masks(self.masks)
        apply_masks(trainer.graph, self.masks)


class GradualPruner:
    """Trainer callback that raises sparsity along `gmp_sparsity` while fine-tuning.

    Iterations count solver steps done (the callback after step g sees g + 1). Masks are recomputed from the
    current weights at `start_iteration`, every `update_every` steps after it and at `end_iteration` (default:
    75 % of the run, read from trainer.total_iters; `update_every` defaults to one epoch's worth of iterations,
    trainer.iters_per_epoch, or less so that the ramp gets at least 8 updates); they only shrink, and the solver holds them in between. Per-layer overrides ramp
    along the same curve, from min(initial_sparsity, their value) to their value. `masks` (optional: those of
    an earlier pruning step, kept pruned) holds the current masks, the final ones after the run; `history` one
    record per update. `attach(trainer)` before `run()` checks the schedule and holds starting masks from the
    first step."""

    def __init__(self, final_sparsity: float, scope: str = "layer", layer_sparsity: dict[str, float] | None = None,
                 skip=(), initial_sparsity: float = 0.0, start_iteration: int = 0, end_iteration: int | None = None,
                 update_every: int | None = None, masks: dict[str, np.ndarray] | None = None):
        self.final_sparsity = _check_sparsity(final_sparsity, "final sparsity")
        self.initial_sparsity = _check_sparsity(initial_sparsity, "initial sparsity")
        if self.initial_sparsity > self.final_sparsity:
            raise DlcError(f"initial sparsity {initial_sparsity} is above the final sparsity {final_sparsity}")
        if scope not in SCOPES:
            raise DlcError(f"pruning scope '{scope}' is unknown; use one of: {', '.join(SCOPES)}")
        if update_every is not None and update_every < 1:
            raise DlcError(f"update_every must be at least 1 iteration, got {update_every}")
        for key, value in (layer_sparsity or {}).items():
            _check_sparsity(value, f"layer_sparsity['{key}']")
        self.scope = scope
        self.layer_sparsity = layer_sparsity
        self.skip = skip
        self.start_iteration = int(start_iteration)
        self.end_iteration = end_iteration
        self.update_every = update_every
        self.masks: dict[str, np.ndarray] = dict(masks or {})
        self.history: list[dict[str, Any]] = []
        self._resolved = False

    def _resolve(self, trainer) -> None:
        prunable_weights(trainer.graph, self.skip)  # a bad skip entry or override fails now, not mid-run
        _check_patterns(self.layer_sparsity or {}, [k.rsplit(".", 1)[0] for k in prunable_weights(trainer.graph)],
                        "layer_sparsity key")
        total = int(trainer.total_iters)
        if self.end_iteration is None:
            self.end_iteration = max(self.start_iteration + 1, int(round(0.75 * total)))
        if self.update_every is None:
            # Once an epoch, but at least ~8 updates over the ramp: with a few fine-tuning epochs, per-epoch
            # updates make big late jumps that the rest of the run cannot recover from (ResNet-20, 4 epochs,
            # 90 %: 82 % val accuracy with 3 updates, 98 % with 14).
            self.update_every = max(1, min(int(trainer.iters_per_epoch),
                                           (self.end_iteration - self.start_iteration) // 8))
        if not 0 <= self.start_iteration < self.end_iteration <= total:
            raise DlcError(f"gradual pruning needs 0 <= start_iteration < end_iteration <= the run's {total} "
                           f"iterations, got start {self.start_iteration}, end {self.end_iteration}")
        self._resolved = True

    def attach(self, trainer) -> None:
        """Check the schedule against the run and hold any starting masks from the first step."""
        self._resolve(trainer)
        if self.masks:
            trainer.solver.set_masks(self.masks)
            apply_masks(trainer.graph, self.masks)

    def sparsity_at(self, iteration: int) -> float:
        return gmp_sparsity(iteration, self.start_iteration, self.end_iteration, self.initial_sparsity,
                            self.final_sparsity)

    def on_step(self, trainer, global_iteration: int) -> None:
        first = not self.history
        if not self._resolved:
            self._resolve(trainer)
        t = global_iteration + 1
        done = bool(self.history) and self.history[-1]["target"] >= self.final_sparsity
        due = t >= self.start_iteration and not done and (
            first or t >= self.end_iteration or (t - self.start_iteration) % self.update_every == 0)
        if due:
            target = self.sparsity_at(t)
            overrides = {k: gmp_sparsity(t, self.start_iteration, self.end_iteration,
                                         min(self.initial_sparsity, float(v)), float(v))
                         for k, v in (self.layer_sparsity or {}).items()}
            self.masks = magnitude_masks(trainer.graph, target, self.scope, overrides or None, self.skip,
                                         existing=self.masks)
            trainer.solver.set_masks(self.masks)
            apply_masks(trainer.graph, self.masks)
            pruned = sum(int((~m).sum()) for m in self.masks.values())
            total = sum(m.size for m in self.masks.values())
            self.history.append({"iteration": t, "target": target, "sparsity": pruned / max(total, 1)})
        elif self.masks:
            if trainer.solver.masks is not self.masks:
                trainer.solver.set_masks(self.masks)
            apply_masks(trainer.graph, self.masks)


def _stats(arrays) -> dict[str, Any]:
    n = sum(a.size for a in arrays)
    zeros = sum(int(a.size - np.count_nonzero(a)) for a in arrays)
    return {"weights": n, "zeros": zeros, "sparsity": zeros / n if n else 0.0}


def sparsity_report(graph: Graph, masks: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
    """Zeros actually in the weights: per prunable layer ("node.weight": weights, zeros, sparsity, plus
    "masked" when `masks` are given), totals over the prunable weights and over all parameter tensors (every
    initializer of the exported file), and a note that dense runtimes get no speed-up from them."""
    weights = prunable_weights(graph)
    layers = {}
    for key, w in weights.items():
        layers[key] = _stats([w])
        if masks is not None and key in masks:
            layers[key]["masked"] = int((~np.asarray(masks[key], dtype=bool)).sum())
    every = [p for node in graph.nodes() for p in node.params.values()]
    return {"layers": layers, "prunable": _stats(list(weights.values())), "all": _stats(every),
            "note": DENSE_RUNTIME_NOTE}


def compressed_size(onnx_bytes: bytes) -> int:
    """Bytes of the file compressed with zlib/deflate at level 9, roughly what a zip or an OTA update ships.

    This is where unstructured sparsity pays: the .onnx file itself stays the same size, and dense runtimes
    such as onnxruntime get no speed-up from zeros."""
    return len(zlib.compress(bytes(onnx_bytes), 9))


def size_report(dense_onnx: bytes, sparse_onnx: bytes) -> dict[str, Any]:
    """File and compressed sizes of a dense model and its sparse version, side by side."""
    dense_c, sparse_c = compressed_size(dense_onnx), compressed_size(sparse_onnx)
    return {"dense_bytes": len(dense_onnx), "sparse_bytes": len(sparse_onnx), "dense_compressed": dense_c,
            "sparse_compressed": sparse_c, "compressed_ratio": sparse_c / max(dense_c, 1),
            "note": DENSE_RUNTIME_NOTE}
