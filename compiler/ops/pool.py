"""Pooling: max, average (ONNX MaxPool / AveragePool) and global average."""

from __future__ import annotations

from typing import Any

import numpy as np

from dlc._C import pool as _k

from .base import OpDef, Param, RField, Shape, ShapeError, fmt_shape, register
from .window import onnx_pads, resolve_pads, window_output


class _Pool(OpDef):
    onnx_type = ""
    params = (
        Param("kernel", "pair", minimum=1, help="window size: k or [kh, kw]"),
        Param("stride", "pair", None, minimum=1, help="defaults to the kernel size"),
        Param("pad", "pad", 0),
        Param("ceil_mode", "bool", False),
    )

    def infer(self, attrs: dict[str, Any], in_shapes: list[Shape]) -> tuple[Shape, dict[str, Any]]:
        shape = in_shapes[0]
        stride = attrs["stride"] or attrs["kernel"]
        if len(shape) != 3:
            raise ShapeError(f"expects a C×H×W feature map, got {fmt_shape(shape)}")
        pads = resolve_pads(attrs["pad"], shape[1:], attrs["kernel"], stride, (1, 1))
        for a in range(2):
            if max(pads[a], pads[a + 2]) * 2 > attrs["kernel"][a]:
                raise ShapeError(f"pad {max(pads[a], pads[a + 2])} is more than half the window "
                                 f"{attrs['kernel'][0]}×{attrs['kernel'][1]}: some windows would hold only padding")
        h, w = window_output(shape, attrs["kernel"], stride, pads, ceil_mode=attrs["ceil_mode"], what="window")
        return (shape[0], h, w), {**attrs, "stride": stride, "pads": pads}

    def receptive(self, attrs: dict[str, Any], in_fields: list[RField], in_shapes: list[Shape]) -> RField:
        return in_fields[0].window(attrs["kernel"], attrs["stride"], attrs["pads"][:2])

    def onnx_attrs(self, attrs: dict[str, Any]) -> dict[str, Any]:
        return {}

    def out_hw(self, node, x: np.ndarray) -> tuple[int, int]:
        return self.infer(node.attrs, [x.shape[1:]])[0][1:]

    def to_onnx(self, node, b) -> None:
        a = node.attrs
        b.node(self.onnx_type, [node.inputs[0]], node.outputs, node.name, kernel_shape=list(a["kernel"]),
               strides=list(a["stride"]), **onnx_pads(a, b.dynamic_hw), ceil_mode=int(a["ceil_mode"]),
               **self.onnx_attrs(a))


@register
class MaxPool(_Pool):
    type = "maxpool"
    doc = "max pooling"
    onnx_type = "MaxPool"

    def forward(self, node, inputs, ctx):
        a, x = node.attrs, inputs[0]
        y, argmax = _k.maxpool_forward(x, a["kernel"], a["stride"], a["pads"], self.out_hw(node, x))
        return y, ((argmax, x.shape[2:]) if ctx.train else None)

    def backward(self, node, saved, dy, ctx):
        argmax, in_hw = saved
        return [_k.maxpool_backward(dy, argmax, in_hw)], {}


@register
class AvgPool(_Pool):
    type = "avgpool"
    doc = "average pooling; padding is left out of the average unless count_include_pad"
    onnx_type = "AveragePool"
    params = _Pool.params + (Param("count_include_pad", "bool", False),)

    def onnx_attrs(self, attrs: dict[str, Any]) -> dict[str, Any]:
        return {"count_include_pad": int(attrs["count_include_pad"])}

    def forward(self, node, inputs, ctx):
        a, x = node.attrs, inputs[0]
        y = _k.avgpool_forward(x, a["kernel"], a["stride"], a["pads"], self.out_hw(node, x), a["count_include_pad"])
        return y, x.shape[2:]

    def backward(self, node, saved, dy, ctx):
        a = node.attrs
        return [_k.avgpool_backward(dy, saved, a["kernel"], a["stride"], a["pads"], a["count_include_pad"])], {}


@register
class GlobalAvgPool(OpDef):
    type = "global_avgpool"
    doc = "average over all positions: C×H×W -> C×1×1"

    def infer(self, attrs: dict[str, Any], in_shapes: list[Shape]) -> tuple[Shape, dict[str, Any]]:
        shape = in_shapes[0]
        if len(shape) != 3:
            raise ShapeError(f"expects a C×H×W feature map, got {fmt_shape(shape)}")
        return (shape[0], 1, 1), attrs

    def receptive(self, attrs: dict[str, Any], in_fields: list[RField], in_shapes: list[Shape]) -> RField:
        return in_fields[0].whole(in_shapes[0][1:])

    def forward(self, node, inputs, ctx):
        return _k.global_avgpool_forward(inputs[0]), inputs[0].shape[2:]

    def backward(self, node, saved, dy, ctx):
        return [_k.global_avgpool_backward(dy, saved)], {}

    def to_onnx(self, node, b) -> None:
        b.node("GlobalAveragePool", [node.inputs[0]], node.outputs, node.name)
