"""Fully connected layer (ONNX Gemm with a transposed weight) and flatten."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from .base import OpDef, Param, RField, Shape, ShapeError, fmt_shape, register
from .onnx_rules import Unsupported, attr, rule

if TYPE_CHECKING:  # annotations only: the op registry loads without onnx
    import onnx


@register
class Linear(OpDef):
    type = "linear"
    doc = "y = x Wᵀ + b on a flat vector; weight out×in"
    params = (Param("out", "int", minimum=1, help="number of output features"), Param("bias", "bool", True))
    fillable = {"weight": {"type": "kaiming"}, "bias": {"type": "constant", "value": 0.0}}

    def infer(self, attrs: dict[str, Any], in_shapes: list[Shape]) -> tuple[Shape, dict[str, Any]]:
        if len(in_shapes[0]) != 1:
            raise ShapeError(f"expects a flat vector, got {fmt_shape(in_shapes[0])}; add a 'flatten' layer before it")
        return (attrs["out"],), attrs

    def param_shapes(self, attrs: dict[str, Any], in_shapes: list[Shape]) -> dict[str, Shape]:
        shapes = {"weight": (attrs["out"], in_shapes[0][0])}
        if attrs["bias"]:
            shapes["bias"] = (attrs["out"],)
        return shapes

    def fan(self, attrs, in_shapes, out_shape) -> tuple[int, int]:
        return in_shapes[0][0], attrs["out"]

    def macs(self, attrs, in_shapes, out_shape) -> int:
        return in_shapes[0][0] * attrs["out"]

    def forward(self, node, inputs, ctx):
        x = inputs[0]
        y = x @ node.params["weight"].T  # BLAS sgemm through numpy
        if "bias" in node.params:
            y += node.params["bias"]
        return y, (x if ctx.train else None)

    def backward(self, node, saved, dy, ctx):
        grads = {"weight": dy.T @ saved}
        if "bias" in node.params:
            grads["bias"] = dy.sum(axis=0)
        return [dy @ node.params["weight"]], grads

    def to_onnx(self, node, b) -> None:
        inputs = b.weight_inputs(node)
        b.node("Gemm", inputs, node.outputs, node.name, transB=1)


@register
class Flatten(OpDef):
    type = "flatten"
    doc = "C×H×W -> (C·H·W) in C-major order"

    def infer(self, attrs: dict[str, Any], in_shapes: list[Shape]) -> tuple[Shape, dict[str, Any]]:
        return (math.prod(in_shapes[0]),), attrs

    def receptive(self, attrs: dict[str, Any], in_fields: list[RField], in_shapes: list[Shape]) -> RField:
        shape = in_shapes[0]
        return in_fields[0].whole(shape[1:]) if len(shape) == 3 else in_fields[0]

    def forward(self, node, inputs, ctx):
        x = inputs[0]
        return np.ascontiguousarray(x).reshape(x.shape[0], -1), x.shape

    def backward(self, node, saved, dy, ctx):
        return [dy.reshape(saved)], {}

    def to_onnx(self, node, b) -> None:
        b.node("Flatten", [node.inputs[0]], node.outputs, node.name, axis=1)


# --- import from ONNX (onnx_import.py walks the graph and calls these by op type) ---------------------------

@rule("Gemm")
def _import_gemm(imp, node: onnx.NodeProto) -> None:
    from ..passes.fold import channel_vector

    x = imp.value(node.input[0])
    if len(imp.shape(x)) != 1:
        raise Unsupported(f"its input is {fmt_shape(imp.shape(x))}, not N×features")
    if attr(node, "transA", 0):
        raise Unsupported("transA")
    b = imp.const(node, 1)
    if b is None or b.ndim != 2:
        raise Unsupported("its B is not a constant matrix")
    alpha, beta = float(attr(node, "alpha", 1.0)), float(attr(node, "beta", 1.0))
    weight = (b if attr(node, "transB", 0) else b.T).astype(np.float64) * alpha
    params = {"weight": weight}
    c = imp.const(node, 2)
    if len(node.input) > 2 and node.input[2]:
        if c is None:
            raise Unsupported("its C is not a constant")
        bias = channel_vector(c, 2, weight.shape[0])
        if bias is None:
            raise Unsupported(f"its C of shape {list(c.shape)} is not a bias vector")
        params["bias"] = bias * beta
    imp.emit(node, "linear", [x], {"out": int(weight.shape[0]), "bias": "bias" in params}, params)


@rule("MatMul")
def _import_matmul(imp, node: onnx.NodeProto) -> None:
    x = imp.value(node.input[0])
    b = imp.const(node, 1)
    if b is None or b.ndim != 2:
        raise Unsupported("dlc imports MatMul only with a constant 2-D right operand (a linear layer)")
    if len(imp.shape(x)) != 1:
        raise Unsupported(f"its input is {fmt_shape(imp.shape(x))}, not N×features")
    imp.emit(node, "linear", [x], {"out": int(b.shape[1]), "bias": False}, {"weight": b.T})


@rule("Flatten")
def _import_flatten(imp, node: onnx.NodeProto) -> None:
    x = imp.value(node.input[0])
    rank = len(imp.shape(x)) + 1
    axis = int(attr(node, "axis", 1))
    if axis % rank != 1:
        raise Unsupported(f"axis {axis} (dlc flattens from axis 1)")
    imp._flat(node, x)
