"""Pooling: max, average (ONNX MaxPool / AveragePool) and global average."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from dlc._C import pool as _k

from .base import OpDef, Param, RField, Shape, ShapeError, fmt_shape, register
from .onnx_rules import Unsupported, attr, rule

if TYPE_CHECKING:  # annotations only: the op registry loads without onnx
    import onnx
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


# --- import from ONNX (onnx_import.py walks the graph and calls these by op type) ---------------------------

def _max_pool_ends(raw: dict[str, Any], shape: Shape) -> dict[str, Any]:
    """A max pool whose end padding is more than half its window (how exporters write ceil_mode for opsets
    before 10) as the same windows with ceil_mode and less padding: dlc, like PyTorch, pads at most half a window.
    The padding is -inf for a max pool, so only where the windows start and how many there are matters."""
    kernel, stride, pads = raw["kernel"], raw["stride"], raw["pad"]
    if all(max(pads[a], pads[a + 2]) * 2 <= kernel[a] for a in range(2)) or any(
        pads[a] * 2 > kernel[a] for a in range(2)
    ):
        return raw
    try:
        want = window_output(shape, tuple(kernel), tuple(stride), tuple(pads), ceil_mode=raw["ceil_mode"])
    except ShapeError:
        return raw
    for ceil in (False, True):
        ends = []
        for a in range(2):
            for end in range(kernel[a] // 2 + 1):
                trial = [pads[0], pads[1], end, end] if a == 0 else [pads[0], pads[1], pads[2], end]
                try:
                    got = window_output(shape, tuple(kernel), tuple(stride), tuple(trial), ceil_mode=ceil)
                except ShapeError:
                    continue
                if got[a] == want[a]:
                    ends.append(end)
                    break
        if len(ends) == 2:
            return {**raw, "pad": [pads[0], pads[1], ends[0], ends[1]], "ceil_mode": ceil}
    return raw


@rule("MaxPool", "AveragePool")
def _import_pool(imp, node: onnx.NodeProto) -> None:
    x = imp.feature_map(node)
    kernel = [int(k) for k in attr(node, "kernel_shape", [])]
    if len(kernel) != 2:
        raise Unsupported(f"{len(kernel)}-D pooling (dlc pools in 2-D)")
    if any(int(d) != 1 for d in attr(node, "dilations", [1, 1])):
        raise Unsupported("dilated pooling")
    if (
        node.op_type == "MaxPool"
        and len(node.output) > 1
        and node.output[1]
        and (imp.consumers.get(node.output[1]) or node.output[1] in imp.output_names)
    ):
        raise Unsupported("its Indices output is used")
    strides = [int(s) for s in attr(node, "strides", [1, 1])]
    raw = {
        "kernel": kernel,
        "stride": strides,
        "pad": imp.pads(node, imp.shape(x)[1:], kernel, strides, [1, 1]),
        "ceil_mode": bool(attr(node, "ceil_mode", 0)),
    }
    if node.op_type == "AveragePool":
        raw["count_include_pad"] = bool(attr(node, "count_include_pad", 0))
    else:
        raw = _max_pool_ends(raw, imp.shape(x))
    imp.emit(node, "maxpool" if node.op_type == "MaxPool" else "avgpool", [x], raw)


@rule("GlobalAveragePool", "GlobalMaxPool")
def _import_global_pool(imp, node: onnx.NodeProto) -> None:
    x = imp.feature_map(node)
    if node.op_type == "GlobalAveragePool":
        imp.emit(node, "global_avgpool", [x], {})
    else:  # a max over the whole map is a max pool with the map's size as its window
        imp.emit(node, "maxpool", [x], {"kernel": list(imp.shape(x)[1:])})


@rule("ReduceMean")
def _import_reduce_mean(imp, node: onnx.NodeProto) -> None:
    x = imp.feature_map(node)
    axes = imp.axes(node, 18)
    if axes is None or sorted(a % 4 for a in axes) != [2, 3]:
        raise Unsupported(f"over axes {axes} (dlc averages over H and W only: global pooling)")
    if attr(node, "keepdims", 1):
        imp.emit(node, "global_avgpool", [x], {})
    else:
        pooled = imp.emit(
            node, "global_avgpool", [x], {}, out=f"{node.output[0]} (pooled)", suffix="_pool"
        )
        imp.emit(node, "flatten", [pooled], {})
