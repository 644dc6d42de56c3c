"""Ops that move elements without computing: reshape and transpose of the per-sample axes (the batch axis stays
first and is never named), and slice, a range of channels (ShuffleNetV2's channel split). Per-sample shapes of any rank pass through them, e.g. ShuffleNet's channel shuffle
C×H×W -> g×(C/g)×H×W -> (C/g)×g×H×W -> C×H×W."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .base import OpDef, Param, ParamError, RField, Shape, ShapeError, fmt_shape, register


def _spatial_kept(in_shape: Shape, out_shape: Shape, kept: bool) -> bool:
    return kept and len(in_shape) >= 3 and len(out_shape) >= 3 and in_shape[-2:] == out_shape[-2:]


def _field(in_field: RField, in_shape: Shape, kept: bool) -> RField:
    """The last two axes of a value of rank 3 or more are H and W: kept in place, the field is unchanged;
    otherwise each output feature may come from anywhere, as after flatten."""
    if kept or len(in_shape) < 3:
        return in_field
    return in_field.whole(in_shape[-2:])


@register
class Reshape(OpDef):
    type = "reshape"
    doc = "the same elements in C order under a new per-sample `shape` (no batch axis; one entry may be -1)"
    params = (
        Param("shape", "ints", minimum=-1, help="per-sample shape, e.g. [2, 4, 8, 8]; one entry may be -1"),
    )

    def check_attrs(self, attrs: dict[str, Any]) -> None:
        shape = attrs["shape"]
        if shape.count(-1) > 1:
            raise ParamError(f"'shape' may have one -1 entry, got {list(shape)}")
        if 0 in shape:
            raise ParamError(f"'shape' entries must be positive or -1, got {list(shape)}")

    def _resolve(self, shape: tuple[int, ...], in_shape: Shape) -> Shape:
        n = math.prod(in_shape)
        known = math.prod(d for d in shape if d != -1)
        if -1 in shape:
            if n % known:
                raise ShapeError(
                    f"cannot reshape {fmt_shape(in_shape)} ({n} elements) to {list(shape)}: "
                    f"{n} is not a multiple of {known}"
                )
            return tuple(n // known if d == -1 else d for d in shape)
        if known != n:
            raise ShapeError(
                f"cannot reshape {fmt_shape(in_shape)} ({n} elements) to {fmt_shape(shape)} ({known} elements)"
            )
        return tuple(shape)

    def infer(self, attrs: dict[str, Any], in_shapes: list[Shape]) -> tuple[Shape, dict[str, Any]]:
        return self._resolve(attrs["shape"], in_shapes[0]), attrs

    def receptive(self, attrs: dict[str, Any], in_fields: list[RField], in_shapes: list[Shape]) -> RField:
        out = self._resolve(attrs["shape"], in_shapes[0])
        return _field(in_fields[0], in_shapes[0], _spatial_kept(in_shapes[0], out, True))

    def forward(self, node, inputs, ctx):
        x = np.ascontiguousarray(inputs[0])
        return x.reshape(x.shape[0], *node.attrs["shape"]), x.shape

    def backward(self, node, saved, dy, ctx):
        return [np.ascontiguousarray(dy).reshape(saved)], {}

    def to_onnx(self, node, b) -> None:
        target = b.initializer(f"{node.name}.shape", np.array([0, *node.attrs["shape"]], np.int64))
        b.node("Reshape", [node.inputs[0], target], node.outputs, node.name)


@register
class Transpose(OpDef):
    type = "transpose"
    doc = "permute the per-sample axes by `perm` (a permutation of 0..rank-1; the batch axis stays first)"
    params = (Param("perm", "ints", minimum=0, help="new order of the per-sample axes, e.g. [1, 0, 2, 3]"),)

    def check_attrs(self, attrs: dict[str, Any]) -> None:
        perm = attrs["perm"]
        if sorted(perm) != list(range(len(perm))):
            raise ParamError(f"'perm' must be a permutation of 0..{len(perm) - 1}, got {list(perm)}")

    def infer(self, attrs: dict[str, Any], in_shapes: list[Shape]) -> tuple[Shape, dict[str, Any]]:
        perm, shape = attrs["perm"], in_shapes[0]
        if len(perm) != len(shape):
            raise ShapeError(
                f"perm {list(perm)} has {len(perm)} axes; the input {fmt_shape(shape)} has {len(shape)}"
            )
        return tuple(shape[p] for p in perm), attrs

    def receptive(self, attrs: dict[str, Any], in_fields: list[RField], in_shapes: list[Shape]) -> RField:
        perm, r = attrs["perm"], len(in_shapes[0])
        return _field(in_fields[0], in_shapes[0], r >= 3 and list(perm[-2:]) == [r - 2, r - 1])

    def forward(self, node, inputs, ctx):
        axes = (0, *(p + 1 for p in node.attrs["perm"]))
        return np.ascontiguousarray(np.transpose(inputs[0], axes)), None

    def backward(self, node, saved, dy, ctx):
        axes = (0, *(p + 1 for p in node.attrs["perm"]))
        return [np.ascontiguousarray(np.transpose(dy, np.argsort(axes)))], {}

    def to_onnx(self, node, b) -> None:
        b.node(
            "Transpose",
            [node.inputs[0]],
            node.outputs,
            node.name,
            perm=[0, *(p + 1 for p in node.attrs["perm"])],
        )


@register
class Slice(OpDef):
    type = "slice"
    doc = "channels [start, end) of the input (ShuffleNetV2's channel split; ONNX Split or Slice on axis 1)"
    params = (
        Param("start", "int", 0, minimum=0, help="first channel"),
        Param("end", "int", minimum=1, help="one past the last channel"),
    )

    def infer(self, attrs: dict[str, Any], in_shapes: list[Shape]) -> tuple[Shape, dict[str, Any]]:
        shape = in_shapes[0]
        if not 0 <= attrs["start"] < attrs["end"] <= shape[0]:
            raise ShapeError(f"channels [{attrs['start']}, {attrs['end']}) are not within the input's {shape[0]} "
                             f"(input {fmt_shape(shape)})")
        return (attrs["end"] - attrs["start"], *shape[1:]), attrs

    def forward(self, node, inputs, ctx):
        x = inputs[0]
        return np.ascontiguousarray(x[:, node.attrs["start"]:node.attrs["end"]]), x.shape

    def backward(self, node, saved, dy, ctx):
        dx = np.zeros(saved, np.float32)
        dx[:, node.attrs["start"]:node.attrs["end"]] = dy
        return [dx], {}

    def to_onnx(self, node, b) -> None:
        a = node.attrs
        starts = b.initializer(f"{node.name}.starts", np.array([a["start"]], np.int64))
        ends = b.initializer(f"{node.name}.ends", np.array([a["end"]], np.int64))
        axes = b.initializer(f"{node.name}.axes", np.array([1], np.int64))
        b.node("Slice", [node.inputs[0], starts, ends, axes], node.outputs, node.name)
