"""Ops that join branches: elementwise add (residuals) and channel concat (inception)."""

from __future__ import annotations

from typing import Any

import numpy as np

from .base import OpDef, Shape, ShapeError, fmt_shape, register


def _shape_list(in_shapes: list[Shape]) -> str:
    return ", ".join(fmt_shape(s) for s in in_shapes)


@register
class Add(OpDef):
    type = "add"
    doc = "elementwise sum of two or more inputs of one shape"
    min_inputs = 2
    max_inputs = None

    def infer(self, attrs: dict[str, Any], in_shapes: list[Shape]) -> tuple[Shape, dict[str, Any]]:
        if any(s != in_shapes[0] for s in in_shapes):
            raise ShapeError(f"inputs must have the same shape, got {_shape_list(in_shapes)}")
        return in_shapes[0], attrs

    def forward(self, node, inputs, ctx):
        y = inputs[0] + inputs[1]
        for x in inputs[2:]:
            y += x
        return y, None

    def backward(self, node, saved, dy, ctx):
        return [dy] * len(node.inputs), {}  # the executor accumulates; it never writes into a gradient it got

    def to_onnx(self, node, b) -> None:
        op = "Add" if len(node.inputs) == 2 else "Sum"
        b.node(op, list(node.inputs), node.outputs, node.name)


@register
class Concat(OpDef):
    type = "concat"
    doc = "join two or more inputs along channels; spatial sizes must match"
    min_inputs = 2
    max_inputs = None

    def infer(self, attrs: dict[str, Any], in_shapes: list[Shape]) -> tuple[Shape, dict[str, Any]]:
        ranks = {len(s) for s in in_shapes}
        if len(ranks) != 1:
            raise ShapeError(f"inputs must all be feature maps or all flat, got {_shape_list(in_shapes)}")
        if any(s[1:] != in_shapes[0][1:] for s in in_shapes):
            raise ShapeError(f"inputs must have the same spatial size, got {_shape_list(in_shapes)}")
        return (sum(s[0] for s in in_shapes), *in_shapes[0][1:]), attrs

    def forward(self, node, inputs, ctx):
        return np.concatenate(inputs, axis=1), [x.shape[1] for x in inputs]

    def backward(self, node, saved, dy, ctx):
        bounds = np.cumsum(saved)[:-1]
        return [np.ascontiguousarray(g) for g in np.split(dy, bounds, axis=1)], {}

    def to_onnx(self, node, b) -> None:
        b.node("Concat", list(node.inputs), node.outputs, node.name, axis=1)
