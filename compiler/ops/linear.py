"""Fully connected layer (ONNX Gemm with a transposed weight) and flatten."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .base import OpDef, Param, RField, Shape, ShapeError, fmt_shape, register


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
