"""Ops that join branches: elementwise add (residuals) and channel concat (inception)."""

from __future__ import annotations

from typing import Any

import numpy as np

from .base import OpDef, RField, Shape, ShapeError, fmt_shape, register


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


@register
class Mul(OpDef):
    type = "mul"
    doc = "elementwise product of two inputs of one shape, or C×H×W times a C×1×1 gate (squeeze-excite)"
    min_inputs = 2
    max_inputs = 2

    def infer(self, attrs: dict[str, Any], in_shapes: list[Shape]) -> tuple[Shape, dict[str, Any]]:
        a, b = in_shapes
        if a == b or (len(a) == 3 and b == (a[0], 1, 1)):
            return a, attrs
        raise ShapeError(
            f"inputs must have the same shape, or the second must be C×1×1 against a C×H×W first; "
            f"got {_shape_list(in_shapes)}"
        )

    def receptive(self, attrs: dict[str, Any], in_fields: list[RField], in_shapes: list[Shape]) -> RField:
        # Positions follow the first input (a broadcast gate has no positions of its own); each sees both fields.
        a, b = in_fields
        size = tuple(max(a.size[k], b.size[k]) for k in range(2))
        start = tuple(a.start[k] if a.size[k] >= b.size[k] else b.start[k] for k in range(2))
        return RField(size, a.jump, start)

    def forward(self, node, inputs, ctx):
        a, b = inputs
        return a * b, ((a, b) if ctx.train else None)

    def backward(self, node, saved, dy, ctx):
        a, b = saved
        need = ctx.need_input_grad or [True, True]
        da = dy * b if need[0] else None
        db = None
        if need[1]:
            db = dy * a
            if db.shape != b.shape:  # the gate was broadcast over H×W: sum it back
                db = db.sum(axis=(2, 3), keepdims=True, dtype=np.float32)
        return [da, db], {}

    def to_onnx(self, node, b) -> None:
        b.node("Mul", list(node.inputs), node.outputs, node.name)
