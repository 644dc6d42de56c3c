"""Nearest-neighbour upsampling by an integer factor (ONNX Resize)."""

from __future__ import annotations

from typing import Any

import numpy as np

from .base import OpDef, Param, RField, Shape, ShapeError, fmt_shape, register


@register
class Upsample(OpDef):
    type = "upsample"
    doc = "nearest-neighbour upsampling by an integer factor per axis"
    params = (Param("scale", "pair", 2, minimum=1, help="factor: s or [sh, sw]"),
              Param("mode", "choice", "nearest", choices=("nearest",)))

    def infer(self, attrs: dict[str, Any], in_shapes: list[Shape]) -> tuple[Shape, dict[str, Any]]:
        shape = in_shapes[0]
        if len(shape) != 3:
            raise ShapeError(f"expects a C×H×W feature map, got {fmt_shape(shape)}")
        sh, sw = attrs["scale"]
        return (shape[0], shape[1] * sh, shape[2] * sw), attrs

    def receptive(self, attrs: dict[str, Any], in_fields: list[RField], in_shapes: list[Shape]) -> RField:
        f = in_fields[0]
        return RField(f.size, tuple(f.jump[a] / attrs["scale"][a] for a in range(2)), f.start)

    def forward(self, node, inputs, ctx):
        x = inputs[0]
        sh, sw = node.attrs["scale"]
        n, c, h, w = x.shape
        y = np.broadcast_to(x[:, :, :, None, :, None], (n, c, h, sh, w, sw)).reshape(n, c, h * sh, w * sw)
        return y, None

    def backward(self, node, saved, dy, ctx):
        sh, sw = node.attrs["scale"]
        n, c, hh, ww = dy.shape
        return [dy.reshape(n, c, hh // sh, sh, ww // sw, sw).sum(axis=(3, 5))], {}

    def to_onnx(self, node, b) -> None:
        sh, sw = node.attrs["scale"]
        scales = b.initializer(f"{node.name}.scales", np.array([1, 1, sh, sw], np.float32))
        # roi is optional (an empty name) from opset 13; at 11 and 12 it is a required input, read only by
        # tf_crop_and_resize: an empty float tensor.
        roi = "" if b.opset >= 13 else b.initializer(f"{node.name}.roi", np.zeros(0, np.float32))
        # asymmetric + floor is PyTorch's 'nearest': output pixel i reads input pixel floor(i / s).
        b.node("Resize", [node.inputs[0], roi, scales], node.outputs, node.name, mode="nearest",
               coordinate_transformation_mode="asymmetric", nearest_mode="floor")
