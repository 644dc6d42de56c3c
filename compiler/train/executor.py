"""Runs a Graph on dlc's own kernels: forward with a tape, backward in reverse topological order.

In eval mode each intermediate value is dropped as soon as its last reader has run, so memory stays at the
width of the graph rather than its depth. In training mode each node keeps only what its backward needs
(`saved`), not every activation.

A batch norm whose output only a ReLU reads runs fused with it (BatchNorm.forward_relu: one pass over the
tensor each way instead of two, the same numbers), except where batch norm is frozen or synced over ranks, or
where a caller asks for the batch norm's own output. `dlc time` then books the pair's time under the batch norm.
"""

from __future__ import annotations

import ctypes
import os
import sys
import time
from typing import Any

import numpy as np

from ..graph import Graph, Node
from ..ops import REGISTRY, OpDef
from ..ops.base import RunContext


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed activation-sized blocks for the next step instead of handing them back to
    the OS: by default a freed block at the top of the heap above twice the last big allocation is trimmed, and
    blocks above the mmap threshold are unmapped, so every step page-faults its activations in afresh (a ResNet-20
    step at batch 64 took 253-266 ms so, 219-223 ms kept; peak memory the same). Training only, once per process;
    not where the user set MALLOC_* themselves, nor off glibc. Returns whether it was applied."""
    global _HEAP_KEPT
    if _HEAP_KEPT is not None:
        return _HEAP_KEPT
    _HEAP_KEPT = False
    if not sys.platform.startswith("linux") or any(k.startswith("MALLOC_") for k in os.environ) \
            or os.environ.get("DLC_KEEP_HEAP", "1") == "0":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    _HEAP_KEPT = bool(mallopt(m_mmap_threshold, 32 << 20) and mallopt(m_trim_threshold, 1 << 30)
                      and mallopt(m_top_pad, 64 << 20))
    return _HEAP_KEPT


_HEAP_KEPT: bool | None = None
_FUSED = ("fused with the batch norm before it",)  # the tape entry of a ReLU that ran inside its batch norm


class Executor:
    def __init__(self, graph: Graph):
        self.graph = graph
        self.nodes: list[Node] = graph.nodes()
        self.ops: list[OpDef] = [REGISTRY[n.op] for n in self.nodes]
        self.inputs = set(graph.input_names)
        last_use: dict[str, int] = {}
        for i, node in enumerate(self.nodes):
            for v in node.inputs:
                last_use[v] = i
        self._free_after = [[v for v in n.inputs if last_use[v] == i and v not in graph.outputs]
                            for i, n in enumerate(self.nodes)]
        self._relu_after = self._fusable_relus(graph)
        self._tape: list[Any] | None = None
        self._ctx = RunContext()
        self.frozen: frozenset[str] = frozenset()
        self.no_backward: frozenset[str] = frozenset()
        self.skip_forward: frozenset[str] = frozenset()  # layers whose outputs come in the feeds (cached)
        self.sync_bn = None  # a distributed World: training batch norm normalises over every rank's batch

    def _fusable_relus(self, graph: Graph) -> dict[int, int]:
        """{position of a batch norm: position of the ReLU that is its output's only reader}."""
        readers: dict[str, list[int]] = {}
        for i, node in enumerate(self.nodes):
            for v in node.inputs:
                readers.setdefault(v, []).append(i)
        pairs = {}
        for i, node in enumerate(self.nodes):
            out = node.outputs[0]
            if node.op != "batchnorm" or out in graph.outputs or len(readers.get(out, [])) != 1:
                continue
            j = readers[out][0]
            if self.nodes[j].op == "relu" and j > i:
                pairs[i] = j
        return pairs

    def _fuse(self, i: int, wanted) -> bool:
        node, relu = self.nodes[i], self.nodes[self._relu_after[i]]
        return (node.name not in self._ctx.frozen and self._ctx.sync_bn is None and node.outputs[0] not in wanted
                and node.name not in self.skip_forward and relu.name not in self.skip_forward)

    def set_frozen(self, frozen: set[str], no_backward: set[str]) -> None:
        """Layers that do not train (`frozen`: batch norm there normalises with its running statistics, in
        training too) and those backward can skip (`no_backward`: nothing that trains is at or before them)."""
        self.frozen, self.no_backward = frozenset(frozen), frozenset(no_backward)

    def forward(self, feeds: dict[str, np.ndarray] | np.ndarray, train: bool = False,
                rng: np.random.Generator | None = None, outputs: list[str] | None = None,
                timings: dict[str, float] | None = None) -> dict[str, np.ndarray]:
        """Run the graph. `outputs` defaults to the graph's outputs; in train mode a tape is kept for backward.
        With `timings`, each node's seconds are added to it (for `dlc time`)."""
        if isinstance(feeds, np.ndarray):
            feeds = {self.graph.input_names[0]: feeds}
        wanted = outputs or self.graph.outputs
        values = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in feeds.items()}
        self._ctx = RunContext(train=train, rng=rng if rng is not None else np.random.default_rng(0),
                               frozen=self.frozen, sync_bn=self.sync_bn if train else None)
        if train:
            keep_freed_memory()
        tape = [] if train else None
        fused: set[int] = set()  # ReLUs already run with their batch norm
        for i, (node, op) in enumerate(zip(self.nodes, self.ops)):
            if node.name in self.skip_forward or i in fused:  # a cached frozen trunk (its outputs are fed)
                if tape is not None:
                    tape.append(_FUSED if i in fused else None)
                continue
            run, out = op.forward, node.outputs[0]
            if i in self._relu_after and self._fuse(i, wanted):
                j = self._relu_after[i]
                fused.add(j)
                run, out = op.forward_relu, self.nodes[j].outputs[0]
            if timings is not None:
                start = time.perf_counter()
                y, saved = run(node, [values[v] for v in node.inputs], self._ctx)
                timings[node.name] = timings.get(node.name, 0.0) + time.perf_counter() - start
            else:
                y, saved = run(node, [values[v] for v in node.inputs], self._ctx)
            values[out] = y
            if tape is not None:
                tape.append(saved)
            for v in self._free_after[i]:
                if v not in wanted:
                    values.pop(v, None)
        self._tape = tape
        return {k: values[k] for k in wanted}

    def backward(self, grad_outputs: dict[str, np.ndarray], input_grads: bool = False,
                 timings: dict[str, float] | None = None) -> dict[str, dict[str, np.ndarray]]:
        """Gradients of the parameters, {node name: {tensor: grad}}, given d(loss)/d(output) per output.
        With `input_grads`, also fills `self.input_grads` with the gradient of each graph input (otherwise
        the first layers skip computing it)."""
        if self._tape is None:
            raise RuntimeError("backward needs a forward pass with train=True first")
        grads: dict[str, np.ndarray] = dict(grad_outputs)
        param_grads: dict[str, dict[str, np.ndarray]] = {}
        ctx = self._ctx
        for node, op, saved in zip(reversed(self.nodes), reversed(self.ops), reversed(self._tape)):
            dy = grads.pop(node.outputs[0], None)
            if saved is _FUSED:  # the ReLU of a fused pair: its batch norm's backward masks dy itself
                if dy is not None:
                    grads[node.inputs[0]] = dy
                continue
            if dy is None or (node.name in self.no_backward and not input_grads):
                continue  # nothing downstream of this node reaches the loss, or nothing up to it trains
            ctx.need_input_grad = [input_grads or v not in self.inputs for v in node.inputs]
            start = time.perf_counter()
            grads_in, pgrads = op.backward(node, saved, np.ascontiguousarray(dy, dtype=np.float32), ctx)
            if timings is not None:
                timings[node.name] = timings.get(node.name, 0.0) + time.perf_counter() - start
            if pgrads:
                param_grads[node.name] = pgrads
            for v, g in zip(node.inputs, grads_in):
                if g is None:
                    continue
                # Out of place: an op may hand the same array to several inputs (add does).
                grads[v] = g if v not in grads else grads[v] + g
        self.input_grads = {v: grads[v] for v in self.inputs if v in grads}
        self._tape = None
        return param_grads
