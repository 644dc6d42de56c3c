"""From a ModelSpec to a Graph: one node per layer, shapes inferred, parameters filled in."""

from __future__ import annotations

import math

from . import limits
from .analysis import infer_shapes
from .errors import Diagnostic
from .fillers import fill, layer_rng, parse_filler
from .graph import Graph, Node, Source, ValueInfo
from .ops import REGISTRY
from .ops.detect import bind_inferred_strides
from .spec import ModelSpec


def build_graph(spec: ModelSpec) -> tuple[Graph, list[Diagnostic]]:
    """Build the IR and infer shapes. Returns the graph and the shape problems found (see infer_shapes)."""
    inp = spec.input
    graph = Graph(spec.name, [ValueInfo(inp.name, inp.shape)], meta={
        "input": {"name": inp.name, "shape": list(inp.shape), "mean": inp.mean, "std": inp.std},
        "classes": spec.classes,
    })
    for layer in spec.layers:
        if not layer.ok:
            graph.shapes[layer.name] = None  # reported already; downstream layers are skipped
            continue
        graph.add_node(Node(
            name=layer.name, op=layer.type, inputs=list(layer.inputs), outputs=[layer.name],
            attrs=dict(layer.attrs), fillers=dict(layer.fillers),
            source=Source(spec.file, layer.line, layer.note),
        ))
    graph.outputs = list(spec.outputs)
    diagnostics: list[Diagnostic] = []
    infer_shapes(graph, diagnostics)
    diagnostics += bind_inferred_strides(graph)  # detect layers without `strides:` run on every path
    if not diagnostics:
        diagnostics += _check_param_bytes(spec, graph)
    return graph, diagnostics


def _check_param_bytes(spec: ModelSpec, graph: Graph) -> list[Diagnostic]:
    """Refuse, before allocating, a model whose float32 parameters would pass the param_bytes limit."""
    total = 0
    for node in graph.nodes():
        in_shapes = [graph.shapes.get(v) for v in node.inputs]
        if any(s is None for s in in_shapes):  # downstream of a layer already reported
            continue
        shapes = REGISTRY[node.op].param_shapes(node.attrs, in_shapes)
        total += 4 * sum(math.prod(shape) for shape in shapes.values())
    if total <= limits.current().param_bytes:
        return []
    return [Diagnostic(limits.exceeded("param_bytes", total), file=spec.file)]


def initialize(graph: Graph, seed: int = 0) -> None:
    """Give every node its parameters: fillable tensors from their fillers (the layer's own or the op's
    default), the rest (e.g. BN running statistics) from the op's defaults."""
    for node in graph.nodes():
        op = REGISTRY[node.op]
        in_shapes = [graph.shapes[v] for v in node.inputs]
        out_shape = graph.shapes[node.outputs[0]]
        shapes = op.param_shapes(node.attrs, in_shapes)
        defaults = op.default_params(node.attrs, in_shapes)
        fan_in, fan_out = op.fan(node.attrs, in_shapes, out_shape)
        params = {}
        for tensor, shape in shapes.items():
            if tensor in op.fillable:
                spec = node.fillers.get(tensor) or parse_filler(op.fillable[tensor])
                params[tensor] = fill(spec, shape, fan_in, fan_out, layer_rng(seed, node.name, tensor))
            else:
                params[tensor] = defaults[tensor]
        node.params = params
