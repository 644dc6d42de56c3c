"""Spatial padding (ONNX Pad): constant, reflect or edge, on the H and W axes only."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from .base import OpDef, Param, ParamError, RField, Shape, ShapeError, fmt_shape, register
from .onnx_rules import Unsupported, attr, round_attr, rule, text

if TYPE_CHECKING:  # annotations only: the op registry loads without onnx
    import onnx


def _source_index(size: int, begin: int, end: int, mode: str) -> np.ndarray:
    """For each padded position along one axis, the input position it copies (reflect or edge)."""
    return np.pad(np.arange(size), (begin, end), mode=mode)


@register
class Pad(OpDef):
    type = "pad"
    doc = "pad H and W: constant (value), reflect (mirror without the edge) or edge (repeat the edge)"
    params = (
        Param("pads", "pad", help="padding: p, [h, w] or [top, left, bottom, right]"),
        Param("mode", "choice", "constant", choices=("constant", "reflect", "edge")),
        Param("value", "float", 0.0),
    )

    def check_attrs(self, attrs: dict[str, Any]) -> None:
        if attrs["pads"] in ("same", "valid"):
            raise ParamError("'pads' must be explicit: an integer, [h, w] or [top, left, bottom, right]")
        if attrs["mode"] != "constant" and attrs["value"] != 0.0:
            raise ParamError(f"'value' applies to mode constant only, not {attrs['mode']}")

    def infer(self, attrs: dict[str, Any], in_shapes: list[Shape]) -> tuple[Shape, dict[str, Any]]:
        shape = in_shapes[0]
        if len(shape) != 3:
            raise ShapeError(f"expects a C×H×W feature map, got {fmt_shape(shape)}")
        t, left, b, r = attrs["pads"]
        _, h, w = shape
        if attrs["mode"] == "reflect" and (max(t, b) > h - 1 or max(left, r) > w - 1):
            raise ShapeError(
                f"reflect padding {list(attrs['pads'])} must be smaller than the input's height and width: "
                f"input {fmt_shape(shape)}"
            )
        return (shape[0], h + t + b, w + left + r), attrs

    def receptive(self, attrs: dict[str, Any], in_fields: list[RField], in_shapes: list[Shape]) -> RField:
        return in_fields[0].window((1, 1), (1, 1), attrs["pads"][:2])

    def forward(self, node, inputs, ctx):
        a, x = node.attrs, inputs[0]
        t, left, b, r = a["pads"]
        widths = ((0, 0), (0, 0), (t, b), (left, r))
        if a["mode"] == "constant":
            y = np.pad(x, widths, mode="constant", constant_values=np.float32(a["value"]))
        else:
            y = np.pad(x, widths, mode=a["mode"])
        return y, (x.shape if ctx.train else None)

    def backward(self, node, saved, dy, ctx):
        a = node.attrs
        n, c, h, w = saved
        t, left, b, r = a["pads"]
        if a["mode"] == "constant":
            return [np.ascontiguousarray(dy[:, :, t : t + h, left : left + w])], {}
        # Every padded position copies one input position: scatter-add the gradient back, axis by axis.
        rows = np.zeros((n, c, h, dy.shape[3]), np.float32)
        np.add.at(rows, (slice(None), slice(None), _source_index(h, t, b, a["mode"])), dy)
        dx = np.zeros((n, c, h, w), np.float32)
        np.add.at(dx, (slice(None), slice(None), slice(None), _source_index(w, left, r, a["mode"])), rows)
        return [dx], {}

    def to_onnx(self, node, b) -> None:
        a = node.attrs
        t, left, bottom, r = a["pads"]
        inputs = [
            node.inputs[0],
            b.initializer(f"{node.name}.pads", np.array([0, 0, t, left, 0, 0, bottom, r], np.int64)),
        ]
        if a["mode"] == "constant" and a["value"] != 0.0:
            inputs.append(b.initializer(f"{node.name}.value", np.array(a["value"], np.float32)))
        b.node("Pad", inputs, node.outputs, node.name, mode=a["mode"])


# --- import from ONNX (onnx_import.py walks the graph and calls these by op type) ---------------------------

@rule("Pad")
def _import_pad(imp, node: onnx.NodeProto) -> None:
    """A Pad that fuse_pad left (not before a Conv or pool, or not constant): spatial axes only."""
    x = imp.feature_map(node)
    mode = text(attr(node, "mode", "constant"))
    if mode not in ("constant", "reflect", "edge"):
        raise Unsupported(f"mode {mode} (dlc pads constant, reflect or edge)")
    if imp.opset < 11:
        pads, value, axes = attr(node, "pads"), float(attr(node, "value", 0.0)), None
    else:
        pads, value, axes = imp.const(node, 1), 0.0, imp.const(node, 3)
        for k, what in ((1, "pads"), (2, "value"), (3, "axes")):
            if len(node.input) > k and node.input[k] and imp.const(node, k) is None:
                raise Unsupported(f"its {what} are computed at run time")
        v = imp.const(node, 2)
        if v is not None:
            if np.asarray(v).size != 1:
                raise Unsupported(f"its value of shape {list(np.shape(v))} is not a scalar")
            value = float(np.asarray(v).reshape(-1)[0])
    if pads is None:
        raise Unsupported("it has no pads")
    pads = [int(p) for p in np.asarray(pads).reshape(-1)]
    rank = 4
    if axes is not None:
        axes = [int(a) % rank for a in np.asarray(axes).reshape(-1)]
        if len(pads) != 2 * len(axes):
            raise Unsupported(f"pads {pads} do not match axes {axes}")
        full = [0] * (2 * rank)
        for j, a in enumerate(axes):
            full[a], full[a + rank] = pads[j], pads[j + len(axes)]
        pads = full
    if len(pads) != 2 * rank:
        raise Unsupported(f"pads {pads} are not for an N×C×H×W tensor")
    if pads[0] or pads[1] or pads[4] or pads[5]:
        raise Unsupported(f"pads {pads} pad the batch or channel axis (dlc pads H and W)")
    if min(pads) < 0:
        raise Unsupported(f"pads {pads} crop (negative)")
    raw = {"pads": [pads[2], pads[3], pads[6], pads[7]], "mode": mode}
    if mode == "constant":
        raw["value"] = round_attr(value) if np.isfinite(value) else value
    imp.emit(node, "pad", [x], raw)
