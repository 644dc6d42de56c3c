"""Nearest-neighbour upsampling by an integer factor (ONNX Resize)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from .base import OpDef, Param, RField, Shape, ShapeError, fmt_shape, register
from .onnx_rules import Unsupported, attr, rule, text

if TYPE_CHECKING:  # annotations only: the op registry loads without onnx
    import onnx


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


# --- import from ONNX (onnx_import.py walks the graph and calls these by op type) ---------------------------

def _nearest_is_floor(ctm: str, nearest_mode: str, size: int, scale: int) -> bool:
    """Whether ONNX Resize (nearest, this coordinate transformation and rounding) picks input pixel
    floor(i / scale) for every output pixel i of an axis of `size` pixels: dlc's upsample."""
    out = size * scale
    for i in range(out):
        if ctm in ("half_pixel", "half_pixel_symmetric"):  # the same for an integer scale
            x = (i + 0.5) / scale - 0.5
        elif ctm == "pytorch_half_pixel":
            x = (i + 0.5) / scale - 0.5 if out > 1 else 0.0
        elif ctm == "asymmetric":
            x = i / scale
        elif ctm == "align_corners":
            x = i * (size - 1) / (out - 1) if out > 1 else 0.0
        elif ctm == "tf_half_pixel_for_nn":
            x = (i + 0.5) / scale
        else:
            return False
        if nearest_mode == "floor":
            k = math.floor(x)
        elif nearest_mode == "ceil":
            k = math.ceil(x)
        elif nearest_mode in ("round_prefer_floor", "round_prefer_ceil"):
            half = x == math.floor(x) + 0.5
            k = (
                (math.floor(x) if nearest_mode == "round_prefer_floor" else math.ceil(x))
                if half
                else round(x)
            )
        else:
            return False
        if min(max(k, 0), size - 1) != i // scale:
            return False
    return True


@rule("Resize", "Upsample")
def _import_resize(imp, node: onnx.NodeProto) -> None:
    mode = text(attr(node, "mode", "nearest"))
    if mode != "nearest":
        raise Unsupported(f"mode '{mode}' (dlc upsamples nearest only)")
    x = imp.feature_map(node)
    c, h, w = imp.shape(x)
    legacy = node.op_type == "Upsample" or imp.opset < 11
    scales, sizes = (imp.const(node, 1), None) if legacy else (imp.const(node, 2), imp.const(node, 3))
    scales = None if scales is None or scales.size == 0 else [float(s) for s in scales.reshape(-1)]
    sizes = None if sizes is None or sizes.size == 0 else [int(s) for s in sizes.reshape(-1)]
    axes = attr(node, "axes")
    if axes is not None and not legacy:  # opset 18: scales or sizes for these axes only
        full = [1.0, 1.0, float(h), float(w)] if sizes is not None else [1.0] * 4
        values = sizes if sizes is not None else scales
        if values is None or len(values) != len(axes):
            raise Unsupported("its axes and scales disagree")
        for a, v in zip(axes, values):
            full[int(a) % 4] = v
        if sizes is not None:
            sizes = [int(v) for v in full]
            sizes[:2] = [imp.batch or 1, c]
        else:
            scales = full
    if legacy:
        ctm, rounding = "asymmetric", "floor"
    else:
        ctm = text(attr(node, "coordinate_transformation_mode", "half_pixel"))
        rounding = text(attr(node, "nearest_mode", "round_prefer_floor"))
        if sizes is not None and text(attr(node, "keep_aspect_ratio_policy", "stretch")) != "stretch":
            raise Unsupported("keep_aspect_ratio_policy")
    if scales is not None:
        if len(scales) != 4 or scales[:2] != [1.0, 1.0]:
            raise Unsupported(f"scales {scales} (dlc upsamples H and W)")
        factors = scales[2:]
    else:
        if sizes is None:
            dims = imp.dims.get(node.output[0])
            if dims is None or len(dims) != 4 or None in dims[1:]:
                raise Unsupported("its output size is computed at run time")
            sizes = [0, *dims[1:]]
        if len(sizes) != 4 or sizes[1] != c or (sizes[0] and sizes[0] != imp.batch):
            raise Unsupported(f"sizes {sizes} (dlc upsamples H and W, whatever the batch)")
        factors = [sizes[2] / h, sizes[3] / w]
    if any(f != int(f) or f < 1 for f in factors):
        raise Unsupported(f"scale factors {factors} (dlc upsamples by whole numbers)")
    sh, sw = int(factors[0]), int(factors[1])
    if not (_nearest_is_floor(ctm, rounding, h, sh) and _nearest_is_floor(ctm, rounding, w, sw)):
        raise Unsupported(
            f"coordinate_transformation_mode '{ctm}' with nearest_mode '{rounding}' does not "
            "repeat each pixel (dlc's nearest upsampling)"
        )
    imp.emit(node, "upsample", [x], {"scale": [sh, sw]})
