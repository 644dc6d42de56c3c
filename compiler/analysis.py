"""Analysis of a Graph: shape inference, parameter counts, MACs and receptive fields, per layer and in total."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from . import limits
from .errors import Diagnostic, DlcError
from .graph import Graph
from .ops import REGISTRY, RField, ShapeError, fmt_shape


def infer_shapes(graph: Graph, diagnostics: list[Diagnostic] | None = None) -> None:
    """Fill `graph.shapes` in topological order and resolve shape-dependent attributes (e.g. 'same' pads).

    With a `diagnostics` list, problems are appended there and the layers downstream of a broken one are
    skipped (their shapes stay unknown); without one, the first problem raises DlcError.
    """
    for node in graph.nodes():
        in_shapes = [graph.shapes.get(v) for v in node.inputs]
        if any(s is None for s in in_shapes):
            for out in node.outputs:
                graph.shapes[out] = None
            continue
        try:
            out_shape, node.attrs = REGISTRY[node.op].infer(node.attrs, in_shapes)
            elements = math.prod(out_shape)
            if elements > limits.current().activation_elements:  # before anything is allocated
                raise ShapeError(limits.exceeded("activation_elements", elements,
                                                 f"output {list(out_shape)}: elements per sample"))
        except ShapeError as exc:
            src = node.source
            diag = Diagnostic(str(exc), file=src.file, line=src.line, layer=node.name, note=src.note or None)
            if diagnostics is None:
                raise DlcError(diag) from None
            diagnostics.append(diag)
            out_shape = None
        for out in node.outputs:
            graph.shapes[out] = out_shape


@dataclass
class LayerStats:
    name: str
    type: str
    output_shape: list[int]
    params: int
    macs: int
    rf_size: list[float]
    rf_jump: list[float]
    rf_start: list[float]


@dataclass
class Summary:
    model: str
    input_shape: list[int]
    layers: list[LayerStats]
    total_params: int
    total_macs: int
    output_shapes: dict[str, list[int]]
    receptive_field: list[float]  # (h, w): the largest field of any feature map, before global pooling


    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def count_params(graph: Graph, node_name: str) -> int:
    """Learned parameters of one node (BN running statistics are buffers, not counted)."""
    node = graph.node(node_name)
    learned = REGISTRY[node.op].trainable(node.attrs)
    return int(sum(np.prod(node.params[p].shape) for p in learned if p in node.params))


def summarize(graph: Graph) -> Summary:
    """Per-layer output shape, parameters, MACs and receptive field (size, jump, start), with totals."""
    fields: dict[str, RField] = {name: RField() for name in graph.input_names}
    layers = []
    for node in graph.nodes():
        op = REGISTRY[node.op]
        in_shapes = [graph.shapes[v] for v in node.inputs]
        out_shape = graph.shapes[node.outputs[0]]
        rf = op.receptive(node.attrs, [fields[v] for v in node.inputs], in_shapes)
        for out in node.outputs:
            fields[out] = rf
        layers.append(LayerStats(
            name=node.name, type=node.op, output_shape=list(out_shape),
            params=count_params(graph, node.name), macs=int(op.macs(node.attrs, in_shapes, out_shape)),
            rf_size=[float(s) for s in rf.size], rf_jump=[float(j) for j in rf.jump],
            rf_start=[float(s) for s in rf.start],
        ))
    inp = graph.inputs[0]
    return Summary(
        model=graph.name, input_shape=list(inp.shape), layers=layers,
        total_params=sum(layer.params for layer in layers), total_macs=sum(layer.macs for layer in layers),
        output_shapes={o: list(graph.shapes[o]) for o in graph.outputs},
        receptive_field=max((layer.rf_size for layer in layers if len(layer.output_shape) == 3
                             and layer.output_shape[1:] != [1, 1]), default=[1.0, 1.0], key=lambda r: r[0] * r[1]),
    )


def fmt_rf(layer: LayerStats) -> str:
    """'size / jump / start', collapsed to one number per item where height and width agree."""
    def one(pair: list[float]) -> str:
        a, b = (f"{v:g}" for v in pair)
        return a if a == b else f"{a}×{b}"
    return f"{one(layer.rf_size)} / {one(layer.rf_jump)} / {one(layer.rf_start)}"


__all__ = ["LayerStats", "Summary", "count_params", "fmt_rf", "fmt_shape", "infer_shapes", "summarize"]
