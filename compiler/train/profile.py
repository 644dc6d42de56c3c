"""`dlc time`: forward and backward time per layer on the CPU backend, with achieved GFLOP/s for layers
that multiply (2 FLOPs per MAC forward; backward counts both the input and the weight gradient: 4 per MAC).
A ReLU that runs inside its batch norm (see Executor) has no time of its own: `fused_into` names the batch norm
whose row holds both. A convolution's row names the kernel route it takes (`algorithm`: winograd, im2col,
depthwise or numpy)."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..graph import Graph
from ..ops import REGISTRY
from .executor import Executor


def _conv_route(graph: Graph, node, batch: int) -> str | None:
    if node.op != "conv":
        return None
    from dlc._C import conv

    a = node.attrs
    x_shape = (batch, *graph.shapes[node.inputs[0]])
    return conv.algorithm(x_shape, node.params["weight"].shape, a["stride"], a["pads"], a["dilation"], a["groups"])


def profile(graph: Graph, batch: int, iterations: int = 10, warmup: int = 2) -> dict[str, Any]:
    ex = Executor(graph)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, *graph.inputs[0].shape)).astype(np.float32)
    fwd_runs: list[dict[str, float]] = []
    bwd_runs: list[dict[str, float]] = []
    for it in range(warmup + iterations):
        fwd: dict[str, float] = {}
        bwd: dict[str, float] = {}
        outs = ex.forward(x, train=True, rng=np.random.default_rng(it), timings=fwd)
        ex.backward({k: np.ones_like(v) / v.size for k, v in outs.items()}, timings=bwd)
        if it >= warmup:
            fwd_runs.append(fwd)
            bwd_runs.append(bwd)
    layers = []
    total_flops = 0.0
    fused = {ex.nodes[j].name: ex.nodes[i].name for i, j in ex._relu_after.items()}
    for node in graph.nodes():
        op = REGISTRY[node.op]
        f = float(np.median([r.get(node.name, 0.0) for r in fwd_runs])) * 1e3
        b = float(np.median([r.get(node.name, 0.0) for r in bwd_runs])) * 1e3
        macs = op.macs(node.attrs, [graph.shapes[v] for v in node.inputs], graph.shapes[node.outputs[0]]) * batch
        flops = 6.0 * macs
        total_flops += flops
        layers.append({"name": node.name, "type": node.op, "output_shape": list(graph.shapes[node.outputs[0]]),
                       "forward_ms": f, "backward_ms": b, "fused_into": fused.get(node.name),
                       "gflops": flops / ((f + b) * 1e-3) / 1e9 if macs and f + b > 0 else 0.0,
                       "algorithm": _conv_route(graph, node, batch)})
    fwd_total = sum(r["forward_ms"] for r in layers)
    bwd_total = sum(r["backward_ms"] for r in layers)
    import dlc._C as native

    return {"model": graph.name, "batch": batch, "iterations": iterations, "isa": native.ISA,
            "isa_runnable": native.runnable_builds(), "layers": layers,
            "forward_ms": fwd_total, "backward_ms": bwd_total,
            "gflops": total_flops / ((fwd_total + bwd_total) * 1e-3) / 1e9 if fwd_total + bwd_total else 0.0}
