"""The `detect` layer: YOLO-style decode of one raw head map per scale into (K, 5 + C) rows of
(x1, y1, x2, y2 in input pixels, objectness, class probabilities), K = Σ A·H·W, scale by scale, anchor-major,
then row, then column (csrc/detect_ref.py has the formulas).

The layer also carries its training settings (box_loss, obj_loss, gains, anchor_t, ...), like Caffe's loss
layers, next to the heads they train, and the post-processing defaults that travel in the ONNX metadata.
Anchors are explicit ([[[w, h], ...] per scale] in input pixels) or `auto`: k-means over the training boxes
at training start, written into the node's attrs (so export and checkpoints carry them).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from onnx import TensorProto

from dlc._C import detect as _k

from ..errors import Diagnostic, DlcError
from .base import OpDef, Param, ParamError, Shape, ShapeError, _is_int, _is_number, fmt_shape, register

BOX_LOSSES = ("ciou", "diou", "giou", "smooth_l1")
OBJ_LOSSES = ("bce", "focal")
# The settings the ONNX metadata carries (postprocess, detection.loss), so that `dlc import` restores them.
POSTPROCESS_PARAMS = ("conf_threshold", "iou_threshold", "max_detections", "class_agnostic")
LOSS_PARAMS = ("box_loss", "obj_loss", "focal_gamma", "focal_alpha", "class_weights", "box_gain", "obj_gain",
               "cls_gain", "anchor_t", "neighbor_cells", "obj_target")


def _parse_anchors(value: Any):
    if value == "auto":
        return None
    msg = "'anchors' must be auto or one list of [w, h] pairs per scale, e.g. [[[10, 13], [16, 30]], [[33, 23]]]"
    if not isinstance(value, list) or not value:
        raise ParamError(f"{msg}; got {value!r}")
    out = []
    for scale in value:
        if not isinstance(scale, list) or not scale:
            raise ParamError(f"{msg}; got {value!r}")
        pairs = []
        for pair in scale:
            if (not isinstance(pair, list) or len(pair) != 2 or not all(_is_number(v) for v in pair)
                    or not all(math.isfinite(v) and v > 0 for v in pair)):
                raise ParamError(f"{msg} with positive sizes; got {pair!r}")
            pairs.append([float(pair[0]), float(pair[1])])
        out.append(pairs)
    return out


def _parse_strides(value: Any):
    if value is None:
        return None
    if not isinstance(value, list) or not value:
        raise ParamError(f"'strides' must be a list with one stride per input map (8 or [8, 8]), got {value!r}")
    out = []
    for s in value:
        pair = [s, s] if _is_int(s) else s
        if not isinstance(pair, list) or len(pair) != 2 or not all(_is_int(v) and v > 0 for v in pair):
            raise ParamError(f"'strides' must be a list of positive integers or [sh, sw] pairs, got {value!r}")
        out.append((int(pair[0]), int(pair[1])))
    return out


def _parse_class_weights(value: Any):
    if value is None:
        return None
    if not isinstance(value, list) or not value or not all(_is_number(v) and v >= 0 for v in value):
        raise ParamError(f"'class_weights' must be a list of non-negative numbers, one per class, got {value!r}")
    return [float(v) for v in value]


@register
class Detect(OpDef):
    type = "detect"
    doc = "YOLO-style decode of raw head maps (one per scale) into boxes, objectness and class probabilities"
    min_inputs = 1
    max_inputs = None
    params = (
        Param("classes", "int", minimum=1, help="number of object classes"),
        Param("anchors", "custom", help="[[[w, h], ...] per scale] in input pixels, or auto", parser=_parse_anchors),
        Param("anchors_per_scale", "int", None, minimum=1),
        Param("strides", "custom", None, parser=_parse_strides),
        Param("box_loss", "choice", "ciou", choices=BOX_LOSSES),
        Param("obj_loss", "choice", "bce", choices=OBJ_LOSSES),
        Param("focal_gamma", "float", 1.5, minimum=0.0),
        Param("focal_alpha", "float", 0.25, minimum=0.0, maximum=1.0),
        Param("class_weights", "custom", None, parser=_parse_class_weights),
        Param("box_gain", "float", 0.05, minimum=0.0),
        Param("obj_gain", "float", 1.0, minimum=0.0),
        Param("cls_gain", "float", 0.5, minimum=0.0),
        Param("anchor_t", "float", 4.0, minimum=1.0),
        Param("neighbor_cells", "bool", True),
        Param("obj_target", "choice", "iou", choices=("iou", "one")),
        Param("conf_threshold", "float", 0.25, minimum=0.0, maximum=1.0),
        Param("iou_threshold", "float", 0.45, minimum=0.0, maximum=1.0),
        Param("max_detections", "int", 100, minimum=1),
        Param("class_agnostic", "bool", False),
    )

    # --- YAML -> attributes -----------------------------------------------------------------------------
    def check_attrs(self, attrs: dict[str, Any]) -> None:
        if attrs["anchors"] is None and attrs["anchors_per_scale"] is None:
            raise ParamError("anchors: auto needs 'anchors_per_scale' (e.g. 3): how many anchors k-means finds "
                             "per scale")
        if attrs["anchors"] is not None and attrs["anchors_per_scale"] is not None:
            counts = {len(a) for a in attrs["anchors"]}
            if counts != {attrs["anchors_per_scale"]}:
                raise ParamError(f"anchors_per_scale is {attrs['anchors_per_scale']} but the anchors list has "
                                 f"{sorted(counts)} per scale; give one or make them agree")
        cw = attrs["class_weights"]
        if cw is not None and len(cw) != attrs["classes"]:
            raise ParamError(f"class_weights has {len(cw)} values for {attrs['classes']} classes")

    # --- shapes -------------------------------------------------------------------------------------------
    def infer(self, attrs: dict[str, Any], in_shapes: list[Shape]) -> tuple[Shape, dict[str, Any]]:
        d = 5 + attrs["classes"]
        anchors = attrs["anchors"]
        if anchors is not None and len(anchors) != len(in_shapes):
            raise ShapeError(f"anchors are given for {len(anchors)} scale(s) but the layer has {len(in_shapes)} "
                             "input map(s): give one anchor list per input")
        strides = attrs["strides"]
        if strides is not None and len(strides) != len(in_shapes):
            raise ShapeError(f"strides has {len(strides)} value(s) for {len(in_shapes)} input map(s)")
        k = 0
        grids = []
        for i, shape in enumerate(in_shapes):
            if len(shape) != 3:
                raise ShapeError(f"input {i} must be a raw C×H×W head map, got {fmt_shape(shape)}")
            a = len(anchors[i]) if anchors is not None else attrs["anchors_per_scale"]
            if shape[0] != a * d:
                raise ShapeError(
                    f"input {i} has {shape[0]} channels; a head for {a} anchors and {attrs['classes']} classes "
                    f"needs {a}×(5+{attrs['classes']}) = {a * d}: set out: {a * d} on the 1×1 head conv")
            grids.append((shape[1], shape[2]))
            k += a * shape[1] * shape[2]
        return (k, d), {**attrs, "grids": grids}

    # --- training backend ---------------------------------------------------------------------------------
    def forward(self, node, inputs, ctx):
        a = node.attrs
        anchors, strides = anchors_of(node), strides_of(node)
        y = _k.decode(inputs, [np.asarray(x, np.float64) for x in anchors], strides, a["classes"])
        return y, (inputs if ctx.train else None)

    def backward(self, node, saved, dy, ctx):
        """The decode's own gradient (training uses dlc.compiler.detect.loss on the maps instead; this serves
        `dlc time` and any loss written on the decoded rows)."""
        d = 5 + node.attrs["classes"]
        grads, offset = [], 0
        for raw, anc, (sh, sw) in zip(saved, anchors_of(node), strides_of(node)):
            n, ch, h, w = raw.shape
            na = ch // d
            rows = dy[:, offset:offset + na * h * w].reshape(n, na, h, w, d).astype(np.float64)
            offset += na * h * w
            s = 1.0 / (1.0 + np.exp(-raw.reshape(n, na, d, h, w).transpose(0, 1, 3, 4, 2).astype(np.float64)))
            anc = np.asarray(anc, np.float64)[None, :, None, None, :]
            g = np.empty_like(rows)
            # x1 = cx − w/2, x2 = cx + w/2: d/dcx = g0 + g2, d/dw = (g2 − g0)/2
            g[..., 0] = (rows[..., 0] + rows[..., 2]) * 2 * sw
            g[..., 1] = (rows[..., 1] + rows[..., 3]) * 2 * sh
            g[..., 2] = (rows[..., 2] - rows[..., 0]) / 2 * 8 * s[..., 2] * anc[..., 0]
            g[..., 3] = (rows[..., 3] - rows[..., 1]) / 2 * 8 * s[..., 3] * anc[..., 1]
            g[..., 4:] = rows[..., 4:]
            g *= s * (1 - s)
            grads.append(np.ascontiguousarray(g.transpose(0, 1, 4, 2, 3).reshape(raw.shape), dtype=np.float32))
        return grads, {}

    # --- ONNX ---------------------------------------------------------------------------------------------
    def to_onnx(self, node, b) -> None:
        """With a fixed input size the grids and the per-row anchors are constants of A·H·W rows; with dynamic
        height/width the grid comes from each map's Shape (Range, opset 11) and the anchors broadcast as
        (1, A, 1, 2). The rows and their order are the same either way."""
        a = node.attrs
        d = 5 + a["classes"]
        anchors = anchors_of(node)
        # The graph's input is the first value in b.shapes (Graph.__init__ records inputs first).
        strides = strides_of(node, next(iter(b.shapes.values()), None))
        two = b.initializer(f"{node.name}.two", np.array(2.0, np.float32))
        half = b.initializer(f"{node.name}.half", np.array(0.5, np.float32))
        rows = []
        for i, (value, anc, stride) in enumerate(zip(node.inputs, anchors, strides)):
            decode = _decode_any_size if b.dynamic_hw else _decode_fixed_size
            rows.append(decode(b, f"{node.name}/s{i}", value, anc, stride, d, two, half))
        if len(rows) == 1:
            b.node("Identity", rows, node.outputs, node.name)
        else:
            b.node("Concat", rows, node.outputs, node.name, axis=1)


_BOX_KEYS = ("xy", "wh", "rest", "xy2", "xyg", "cxy", "wh2", "whp", "bwh", "hwh", "x1y1", "x2y2")


def _decode_fixed_size(b, p: str, value: str, anc, stride, d: int, two: str, half: str) -> str:
    """One scale's rows (N, A·H·W, d) with the grid and anchors as constants of A·H·W rows."""
    (sh, sw), (h, w), na = stride, b.shapes[value][1:], len(anc)
    shape1 = b.initializer(f"{p}.shape1", np.array([-1, na, d, h * w], np.int64))
    shape2 = b.initializer(f"{p}.shape2", np.array([-1, na * h * w, d], np.int64))
    gy, gx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    grid = np.stack([gx, gy], -1).reshape(1, 1, h * w, 2) - 0.5
    grid = np.broadcast_to(grid, (1, na, h * w, 2)).reshape(1, na * h * w, 2).astype(np.float32)
    anchor_px = np.repeat(np.asarray(anc, np.float32)[None, :, None, :], h * w, axis=2)
    anchor_c = b.initializer(f"{p}.anchors", anchor_px.reshape(1, na * h * w, 2))
    grid_c = b.initializer(f"{p}.grid", grid)
    stride_c = b.initializer(f"{p}.stride", np.array([sw, sh], np.float32))
    names = {k: b.fresh(f"{p}/{k}") for k in ("r1", "t", "r2", "s", *_BOX_KEYS, "out")}
    b.node("Reshape", [value, shape1], [names["r1"]], b.fresh(f"{p}/reshape1"))
    b.node("Transpose", [names["r1"]], [names["t"]], b.fresh(f"{p}/transpose"), perm=[0, 1, 3, 2])
    b.node("Reshape", [names["t"], shape2], [names["r2"]], b.fresh(f"{p}/reshape2"))
    b.node("Sigmoid", [names["r2"]], [names["s"]], b.fresh(f"{p}/sigmoid"))
    _boxes(b, p, names, grid_c, stride_c, anchor_c, two, half, d, axis=2, out=names["out"])
    return names["out"]


def _decode_any_size(b, p: str, value: str, anc, stride, d: int, two: str, half: str) -> str:
    """One scale's rows (N, A·H·W, d) for a map of any size: decoded as (N, A, H·W, d) against a grid
    (1, 1, H·W, 2) built from the map's Shape and anchors (1, A, 1, 2), then reshaped (0/-1, no H·W constant)."""
    (sh, sw), na = stride, len(anc)
    shape1 = b.initializer(f"{p}.shape1", np.array([0, na, d, -1], np.int64))
    anchor_c = b.initializer(f"{p}.anchors", np.asarray(anc, np.float32).reshape(1, na, 1, 2))
    stride_c = b.initializer(f"{p}.stride", np.array([sw, sh], np.float32))
    names = {k: b.fresh(f"{p}/{k}") for k in ("r1", "t", "s", *_BOX_KEYS, "rows", "out")}
    b.node("Reshape", [value, shape1], [names["r1"]], b.fresh(f"{p}/reshape1"))
    b.node("Transpose", [names["r1"]], [names["t"]], b.fresh(f"{p}/transpose"), perm=[0, 1, 3, 2])
    b.node("Sigmoid", [names["t"]], [names["s"]], b.fresh(f"{p}/sigmoid"))
    grid_c = _grid(b, p, value, half)
    _boxes(b, p, names, grid_c, stride_c, anchor_c, two, half, d, axis=3, out=names["rows"])
    b.node("Reshape", [names["rows"], b.initializer(f"{p}.shape2", np.array([0, -1, d], np.int64))],
           [names["out"]], b.fresh(f"{p}/reshape2"))
    return names["out"]


def _grid(b, p: str, value: str, half: str) -> str:
    """(1, 1, H·W, 2): (x - 0.5, y - 0.5) of every cell of `value`'s map, row-major, from its runtime Shape."""
    g = {k: b.fresh(f"{p}/grid_{k}") for k in ("shape", "h", "w", "hf", "wf", "y", "x", "y3", "x3", "hw", "hw1",
                                               "ye", "xe", "xy", "c", "out")}
    const = {
        "i2": np.array(2, np.int64), "i3": np.array(3, np.int64), "zero": np.array(0.0, np.float32),
        "one": np.array(1.0, np.float32), "col": np.array([-1, 1, 1], np.int64),
        "row": np.array([1, -1, 1], np.int64), "start": np.array([2], np.int64), "end": np.array([4], np.int64),
        "ones": np.array([1], np.int64), "flat": np.array([1, 1, -1, 2], np.int64),
    }
    c = {k: b.initializer(f"{p}.grid_{k}", v) for k, v in const.items()}
    b.node("Shape", [value], [g["shape"]], b.fresh(f"{p}/grid_shape"))
    for axis, idx in (("h", "i2"), ("w", "i3")):
        b.node("Gather", [g["shape"], c[idx]], [g[axis]], b.fresh(f"{p}/grid_{axis}"), axis=0)  # a scalar
        b.node("Cast", [g[axis]], [g[axis + "f"]], b.fresh(f"{p}/grid_{axis}f"), to=TensorProto.FLOAT)
    b.node("Range", [c["zero"], g["hf"], c["one"]], [g["y"]], b.fresh(f"{p}/grid_range_y"))
    b.node("Range", [c["zero"], g["wf"], c["one"]], [g["x"]], b.fresh(f"{p}/grid_range_x"))
    b.node("Reshape", [g["y"], c["col"]], [g["y3"]], b.fresh(f"{p}/grid_col"))  # (H, 1, 1)
    b.node("Reshape", [g["x"], c["row"]], [g["x3"]], b.fresh(f"{p}/grid_row"))  # (1, W, 1)
    b.node("Slice", [g["shape"], c["start"], c["end"]], [g["hw"]], b.fresh(f"{p}/grid_hw"))
    b.node("Concat", [g["hw"], c["ones"]], [g["hw1"]], b.fresh(f"{p}/grid_hw1"), axis=0)  # [H, W, 1]
    b.node("Expand", [g["x3"], g["hw1"]], [g["xe"]], b.fresh(f"{p}/grid_expand_x"))
    b.node("Expand", [g["y3"], g["hw1"]], [g["ye"]], b.fresh(f"{p}/grid_expand_y"))
    b.node("Concat", [g["xe"], g["ye"]], [g["xy"]], b.fresh(f"{p}/grid_xy"), axis=2)  # (H, W, 2): x, y
    b.node("Sub", [g["xy"], half], [g["c"]], b.fresh(f"{p}/grid_centre"))
    b.node("Reshape", [g["c"], c["flat"]], [g["out"]], b.fresh(f"{p}/grid"))
    return g["out"]


def _boxes(b, p: str, names: dict[str, str], grid: str, stride: str, anchors: str, two: str, half: str, d: int,
           axis: int, out: str) -> None:
    """Sigmoid outputs `names['s']` (fields along `axis`) -> rows (x1, y1, x2, y2, objectness, classes)."""
    for key, lo, hi in (("xy", 0, 2), ("wh", 2, 4), ("rest", 4, d)):
        starts = b.initializer(f"{p}.{key}_start", np.array([lo], np.int64))
        ends = b.initializer(f"{p}.{key}_end", np.array([hi], np.int64))
        axes = b.initializer(f"{p}.{key}_axis", np.array([axis], np.int64))
        b.node("Slice", [names["s"], starts, ends, axes], [names[key]], b.fresh(f"{p}/slice_{key}"))
    # cxy = (2 s_xy + grid - 0.5) * stride; wh = (2 s_wh)^2 * anchor
    b.node("Mul", [names["xy"], two], [names["xy2"]], b.fresh(f"{p}/mul_xy"))
    b.node("Add", [names["xy2"], grid], [names["xyg"]], b.fresh(f"{p}/add_grid"))
    b.node("Mul", [names["xyg"], stride], [names["cxy"]], b.fresh(f"{p}/mul_stride"))
    b.node("Mul", [names["wh"], two], [names["wh2"]], b.fresh(f"{p}/mul_wh"))
    b.node("Pow", [names["wh2"], two], [names["whp"]], b.fresh(f"{p}/pow"))
    b.node("Mul", [names["whp"], anchors], [names["bwh"]], b.fresh(f"{p}/mul_anchor"))
    b.node("Mul", [names["bwh"], half], [names["hwh"]], b.fresh(f"{p}/half"))
    b.node("Sub", [names["cxy"], names["hwh"]], [names["x1y1"]], b.fresh(f"{p}/x1y1"))
    b.node("Add", [names["cxy"], names["hwh"]], [names["x2y2"]], b.fresh(f"{p}/x2y2"))
    b.node("Concat", [names["x1y1"], names["x2y2"], names["rest"]], [out], b.fresh(f"{p}/concat"), axis=axis)


# --- helpers used by the op, the trainer, the loss and the exporter ----------------------------------------
def anchors_of(node) -> list[list[list[float]]]:
    anchors = node.attrs["anchors"]
    if anchors is None:
        raise DlcError(f"detect layer '{node.name}': anchors: auto are computed from the training boxes at "
                       "the start of training; train the model first (or give the anchors explicitly)")
    return anchors


def strides_of(node, input_shape: Shape | None = None) -> list[tuple[float, float]]:
    """Per scale (sh, sw) in input pixels: the layer's own `strides`, else the ones bound from the model's
    input size (bind_strides), else from `input_shape` (C, H, W)."""
    if node.attrs.get("strides") is not None:
        return [(float(s[0]), float(s[1])) for s in node.attrs["strides"]]
    if input_shape is not None:
        return infer_strides(node.name, input_shape, node.attrs["grids"])
    raise DlcError(f"detect layer '{node.name}': strides are not known; give strides: [...] on the layer")


def infer_strides(name: str, input_shape: Shape, grids: list[tuple[int, int]]) -> list[tuple[int, int]]:
    h, w = input_shape[-2:]
    strides = []
    for i, (gh, gw) in enumerate(grids):
        sh, sw = h / gh, w / gw
        if sh != int(sh) or sw != int(sw):
            raise DlcError(f"detect layer '{name}': input {i} is {gh}×{gw} for a {h}×{w} image, not a whole "
                           f"stride; give strides: [...] on the layer")
        strides.append((int(sh), int(sw)))
    return strides


def bind_strides(graph) -> None:
    """Resolve every detect layer's strides from the model's input size (when not given), and check given ones
    against it: a head map of H×W cells on an image of IH×IW pixels has stride IH/H × IW/W."""
    for node in graph.nodes():
        if node.op == "detect":
            bind_strides_of(node, graph.inputs[0].shape)


def bind_strides_of(node, shape) -> None:
    """Given strides must fit the head maps (a map of H cells covers ceil(IH / stride) of them, as padded
    convolutions give); absent ones are inferred and must divide the input exactly."""
    given = node.attrs.get("strides")
    if given is None:
        node.attrs["strides"] = infer_strides(node.name, shape, node.attrs["grids"])
        return
    h, w = shape[-2:]
    fits = len(given) == len(node.attrs["grids"]) and all(
        math.ceil(h / sh) == gh and math.ceil(w / sw) == gw for (sh, sw), (gh, gw) in zip(given, node.attrs["grids"]))
    if not fits:
        maps = ", ".join(f"{gh}×{gw}" for gh, gw in node.attrs["grids"])
        raise DlcError(f"detect layer '{node.name}': strides {[list(s) for s in given]} do not match the head maps "
                       f"({maps} on a {h}×{w} input); leave strides: out to infer them")
    node.attrs["strides"] = [tuple(s) for s in given]


def bind_inferred_strides(graph) -> list[Diagnostic]:
    """At graph build, after shape inference: a detect layer without `strides:` gets the strides its head maps
    imply for the model's input size, so the backend (Executor, `dlc time`) runs it like training and export
    do. Given strides must match the maps. Returns the layers whose maps are no whole stride of the input, or
    whose given strides disagree with them, as diagnostics at their YAML line."""
    diagnostics = []
    for node in graph.nodes():
        if node.op != "detect" or "grids" not in node.attrs:
            continue  # shapes unknown (reported already)
        try:
            bind_strides_of(node, graph.inputs[0].shape)
        except DlcError as exc:
            src = node.source
            diagnostics += [Diagnostic(d.message, file=src.file, line=src.line, note=src.note or None)
                            for d in exc.diagnostics]
    return diagnostics


def detect_node(graph):
    """The detect layer producing the graph's (only) output, or None."""
    if len(graph.outputs) != 1:
        return None
    node = graph.producer(graph.outputs[0])
    return node if node is not None and node.op == "detect" else None








def detection_metadata(graph) -> dict[str, Any] | None:
    """What a runtime needs to post-process the detector's output, merged into the ONNX metadata (None for
    other models): task, the post-processing defaults (top level, as `postprocess(**...)` takes them) and,
    under `detection`, the anchors and strides per scale and the output layout."""
    node = detect_node(graph)
    if node is None:
        return None
    bind_strides(graph)
    a = node.attrs
    postprocess = {k: a[k] for k in POSTPROCESS_PARAMS}
    return {"task": "detection", "postprocess": postprocess, "detection": {
        "output": node.outputs[0],
        "layout": "(N, K, 5 + C) rows x1, y1, x2, y2 (input pixels), objectness, C class probabilities; "
                  "K = sum of A*H*W over scales, scale by scale, anchor-major, then row, then column; "
                  "score = objectness * class probability",
        "num_classes": a["classes"],
        "anchors": anchors_of(node),
        "strides": [list(s) for s in a["strides"]],
        "grids": [list(g) for g in a["grids"]],
        "decode": "yolov5: cx = (2 sigmoid(tx) - 0.5 + gx) * stride_w, w = (2 sigmoid(tw))^2 * anchor_w",
        "loss": {k: a[k] for k in LOSS_PARAMS},  # the training settings, for fine-tuning after `dlc import`
    }}
