"""Ops that move elements without computing: reshape and transpose of the per-sample axes (the batch axis stays
first and is never named), and slice, a range of channels (ShuffleNetV2's channel split). Per-sample shapes of any rank pass through them, e.g. ShuffleNet's channel shuffle
C×H×W -> g×(C/g)×H×W -> (C/g)×g×H×W -> C×H×W."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from .base import OpDef, Param, ParamError, RField, Shape, ShapeError, fmt_shape, register
from .onnx_rules import Unsupported, attr, rule

if TYPE_CHECKING:  # annotations only: the op registry loads without onnx
    import onnx


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


# --- import from ONNX (onnx_import.py walks the graph and calls these by op type) ---------------------------

@rule("Split")
def _import_split(imp, node: onnx.NodeProto) -> None:
    """Split along the channels into slice layers, one per output (ShuffleNetV2's chunk)."""
    x = imp.value(node.input[0])
    imp._channel_axis(node, x, 0)
    c, outputs = imp.shape(x)[0], [o for o in node.output]
    sizes = attr(node, "split") if imp.opset < 13 else imp.const(node, 1)
    if sizes is None and len(node.input) > 1 and node.input[1]:
        raise Unsupported("its split sizes are computed at run time")
    if sizes is None:  # equal parts (the last one smaller from opset 18, as num_outputs says)
        k = len(outputs)
        part = -(-c // k)
        sizes = [min(part, c - i * part) for i in range(k)]
    sizes = [int(v) for v in np.asarray(sizes).reshape(-1)]
    if len(sizes) != len(outputs) or sum(sizes) != c or min(sizes) <= 0:
        raise Unsupported(f"sizes {sizes} do not split {c} channels into {len(outputs)} parts")
    start = 0
    for k, (out, size) in enumerate(zip(outputs, sizes)):
        if out:
            imp.emit(node, "slice", [x], {"start": start, "end": start + size}, out=out,
                      suffix="" if k == 0 else f"_{k}")
        start += size


@rule("Slice")
def _import_slice(imp, node: onnx.NodeProto) -> None:
    """Slice of a channel range with step 1 (constant starts/ends on axis 1)."""
    x = imp.value(node.input[0])
    rank, c = len(imp.shape(x)) + 1, imp.shape(x)[0]
    if imp.opset < 10:
        starts, ends, axes, steps = attr(node, "starts"), attr(node, "ends"), attr(node, "axes"), None
    else:
        if any(len(node.input) > k and node.input[k] and imp.const(node, k) is None for k in range(1, 5)):
            raise Unsupported("its starts, ends, axes or steps are computed at run time")
        starts, ends, axes, steps = (imp.const(node, k) for k in range(1, 5))
    starts, ends = (None if v is None else [int(a) for a in np.asarray(v).reshape(-1)] for v in (starts, ends))
    axes = list(range(len(starts or []))) if axes is None else [int(a) % rank for a in np.asarray(axes).reshape(-1)]
    steps = [1] * len(axes) if steps is None else [int(a) for a in np.asarray(steps).reshape(-1)]
    if starts is None or ends is None or axes != [1] or steps != [1]:
        raise Unsupported(f"on axes {axes} with steps {steps} (dlc slices a channel range, axis 1, step 1)")
    start = max(0, min(c, starts[0] + c if starts[0] < 0 else starts[0]))
    end = max(0, min(c, ends[0] + c if ends[0] < 0 else ends[0]))
    if start == 0 and end == c:
        imp.alias[node.output[0]] = x
        return
    imp.emit(node, "slice", [x], {"start": start, "end": end})


@rule("Reshape")
def _import_reshape(imp, node: onnx.NodeProto) -> None:
    x = imp.value(node.input[0])
    target = imp.const(node, 1)
    if target is None:
        raise Unsupported("its target shape is computed at run time")
    t = [int(v) for v in np.asarray(target).reshape(-1)]
    shape = imp.shape(x)
    n = math.prod(shape)
    allowzero = bool(attr(node, "allowzero", 0))
    if allowzero and 0 in t:
        raise Unsupported(f"to {t} with allowzero (a zero-sized tensor)")
    # Entries 0 copy the input's dimension (allowzero off); the batch entry must keep the batch.
    rest = [shape[k] if d == 0 and k < len(shape) else d for k, d in enumerate(t[1:])]
    static = bool(rest) and 0 not in rest and -1 not in rest and math.prod(rest) == n
    if not t or not (t[0] == 0 or (imp.batch is not None and t[0] == imp.batch) or (t[0] == -1 and static)):
        raise Unsupported(f"to {t}: it does not keep the batch axis first (dlc reshapes per sample)")
    if not rest or 0 in rest or rest.count(-1) > 1 or any(d < -1 for d in rest):
        raise Unsupported(f"to {t}")
    known = math.prod(d for d in rest if d != -1)
    if (-1 in rest and n % known) or (-1 not in rest and known != n):
        raise Unsupported(f"to {t}: {fmt_shape(shape)} has {n} elements per sample")
    imp._reshape_to(node, x, tuple(n // known if d == -1 else d for d in rest))


@rule("Squeeze")
def _import_squeeze(imp, node: onnx.NodeProto) -> None:
    x = imp.value(node.input[0])
    axes = imp.axes(node, 13)
    shape = imp.shape(x)
    rank = len(shape) + 1
    if axes is None or any(not -rank <= a < rank for a in axes):
        raise Unsupported(f"axes {axes} of {fmt_shape(shape)} (dlc squeezes named axes, not the batch)")
    drop = {a % rank for a in axes}
    if 0 in drop or any(shape[a - 1] != 1 for a in drop):
        raise Unsupported(f"axes {axes} of N×{fmt_shape(shape)} (dlc squeezes axes of size 1, not the batch)")
    imp._reshape_to(node, x, tuple(d for k, d in enumerate(shape) if k + 1 not in drop))


@rule("Unsqueeze")
def _import_unsqueeze(imp, node: onnx.NodeProto) -> None:
    x = imp.value(node.input[0])
    axes = imp.axes(node, 13)
    shape = imp.shape(x)
    rank = len(shape) + 1 + len(axes or [])
    if not axes or any(not -rank <= a < rank for a in axes) or len({a % rank for a in axes}) != len(axes):
        raise Unsupported(f"axes {axes} of N×{fmt_shape(shape)}")
    add = {a % rank for a in axes}
    if 0 in add:
        raise Unsupported(f"axes {axes} of N×{fmt_shape(shape)} (a new axis before the batch)")
    dims = iter(shape)
    imp._reshape_to(node, x, tuple(1 if k in add else next(dims) for k in range(1, rank)))


@rule("Transpose")
def _import_transpose(imp, node: onnx.NodeProto) -> None:
    if node.output[0] in imp.cl_at:
        return imp._emit_channels_last(node)
    if node.output[0] in imp.ln2d_at:
        ln, x = imp.ln2d_at[node.output[0]]
        return imp._emit_layer_norm(node, ln, imp.value(x))
    x = imp.value(node.input[0])
    rank = len(imp.shape(x)) + 1
    perm = attr(node, "perm")
    perm = list(reversed(range(rank))) if perm is None else [int(p) for p in perm]
    if sorted(perm) != list(range(rank)) or perm[0] != 0:
        raise Unsupported(f"perm {perm} (dlc transposes per sample: the batch axis stays first)")
    if perm == sorted(perm):
        imp.alias[node.output[0]] = x
    else:
        imp.emit(node, "transpose", [x], {"perm": [p - 1 for p in perm[1:]]})
