"""Ops that join branches: elementwise add (residuals), channel concat (inception), and mul, sub and div of two
inputs (equal shapes, or a C×1×1 second input broadcast over a C×H×W first)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from .base import OpDef, RField, Shape, ShapeError, fmt_shape, register
from .onnx_rules import Unsupported, attr, rule

if TYPE_CHECKING:  # annotations only: the op registry loads without onnx
    import onnx


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


class _Broadcast(OpDef):
    """Two inputs of one shape, or C×H×W against a C×1×1 second input broadcast over H×W (mul, sub, div)."""

    min_inputs = 2
    max_inputs = 2
    onnx_op: str

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

    @staticmethod
    def _reduce(g: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """The gradient of a second input that was broadcast over H×W: summed back to N×C×1×1."""
        if g.shape != shape:
            g = g.sum(axis=(2, 3), keepdims=True, dtype=np.float32)
        return g

    def forward(self, node, inputs, ctx):
        a, b = inputs
        return self.compute(a, b), ((a, b) if ctx.train else None)

    def backward(self, node, saved, dy, ctx):
        a, b = saved
        need = ctx.need_input_grad or [True, True]
        da, db = self.grads(a, b, dy, need[0], need[1])
        return [da, None if db is None else self._reduce(db, b.shape)], {}

    def compute(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def grads(self, a, b, dy, need_a: bool, need_b: bool) -> tuple[np.ndarray | None, np.ndarray | None]:
        """(d/da, d/db before reducing over broadcast axes); None where not needed."""
        raise NotImplementedError

    def to_onnx(self, node, b) -> None:
        b.node(self.onnx_op, list(node.inputs), node.outputs, node.name)


@register
class Mul(_Broadcast):
    type = "mul"
    doc = "elementwise product of two inputs of one shape, or C×H×W times a C×1×1 gate (squeeze-excite)"
    onnx_op = "Mul"

    def compute(self, a, b):
        return a * b

    def grads(self, a, b, dy, need_a, need_b):
        return (dy * b if need_a else None), (dy * a if need_b else None)


@register
class Sub(_Broadcast):
    type = "sub"
    doc = "elementwise difference a - b of two inputs of one shape, or C×H×W minus a C×1×1 second input"
    onnx_op = "Sub"

    def compute(self, a, b):
        return a - b

    def grads(self, a, b, dy, need_a, need_b):
        return (dy if need_a else None), (-dy if need_b else None)


@register
class Div(_Broadcast):
    type = "div"
    doc = "elementwise quotient a / b of two inputs of one shape, or C×H×W divided by a C×1×1 second input"
    onnx_op = "Div"

    def compute(self, a, b):
        return a / b

    def grads(self, a, b, dy, need_a, need_b):
        da = dy / b if need_a else None
        db = -(dy * a) / (b * b) if need_b else None
        return da, db


# --- import from ONNX (onnx_import.py walks the graph and calls these by op type) ---------------------------

@rule("Mul")
def _import_mul(imp, node: onnx.NodeProto) -> None:
    if node.output[0] in imp.gelu_at:
        imp.emit(node, "gelu", [imp.value(imp.gelu_at[node.output[0]])], {})
        return
    x = imp._silu_input(node)
    if x is not None:
        imp.emit(node, "silu", [imp.value(x)], {})
        return
    imp._binary(node, "mul", "multiplies by", "multiplies")


@rule("Sub")
def _import_sub(imp, node: onnx.NodeProto) -> None:
    imp._binary(node, "sub", "subtracts", "subtracts")


@rule("Div")
def _import_div(imp, node: onnx.NodeProto) -> None:
    imp._binary(node, "div", "divides by", "divides")


@rule("Add", "Sum")
def _import_add(imp, node: onnx.NodeProto) -> None:
    names = [i for i in node.input if i]
    constant = [k for k, i in enumerate(names) if i in imp.consts]
    if len(names) == 2 and len(constant) == 1:
        return imp.bias_add(node, names[1 - constant[0]], imp.consts[names[constant[0]]])
    if constant:
        raise Unsupported("adds a constant")
    values = [imp.value(i) for i in names]
    if len(values) == 1:
        imp.alias[node.output[0]] = values[0]
        return None
    shapes = [imp.shape(v) for v in values]
    if any(s != shapes[0] for s in shapes):
        raise Unsupported(
            f"broadcasts {', '.join(fmt_shape(s) for s in shapes)} (dlc adds equal shapes)"
        )
    imp.emit(node, "add", values, {})
    return None


@rule("Concat")
def _import_concat(imp, node: onnx.NodeProto) -> None:
    values = [imp.value(i) for i in node.input if i]
    ranks = {len(imp.shape(v)) + 1 for v in values}
    axis = attr(node, "axis")
    if len(ranks) != 1 or axis is None or int(axis) % ranks.pop() != 1:
        raise Unsupported(f"along axis {axis} (dlc concatenates channels: axis 1)")
    if len(values) == 1:
        imp.alias[node.output[0]] = values[0]
    else:
        imp.emit(node, "concat", values, {})
