"""NMS inside the model: a detector's raw rows (N, K, 5 + C) become final detections in the graph.

What the appended nodes compute is, image by image, exactly `dlc.runtime.postprocess` (score = objectness × best
class probability, class = its argmax, then `filter_detections`): score threshold (strict >), pre-NMS top-k
over all classes (ties to the lower index), NonMaxSuppression per class (or class agnostic) and the detection
cap, best score first. Every step is batched with no loop and no export-time maximum batch, so one file serves
any batch size:

- NonMaxSuppression runs on (N, C, K) scores where each row scores only in its own class (-inf elsewhere), with
  `max_output_boxes_per_class` = the cap: a class never contributes more than the cap to the final top list, so
  capping it first keeps the result exact.
- Its selections (batch, class, row) come out class-major. They are put in (batch ascending, score descending)
  order by one TopK over a float64 key `score - 2·batch` (scores are at most 1, so the batch dominates, and
  float64 holds a float32 score exactly next to any batch index).
- A selection's rank within its image is its position minus the image's first position (an exclusive CumSum of
  per-image counts); ranks below the cap are scattered into a zero tensor (N, max_det, ·) with ScatterND.

Layouts: `padded` gives `detections` (N, max_det, 6) = x1, y1, x2, y2, score, class (zero rows after the last)
and `num_detections` (N,) int64; `efficient_nms` gives TensorRT's EfficientNMS outputs: num_detections (N, 1),
detection_boxes (N, max_det, 4), detection_scores (N, max_det), detection_classes (N, max_det), counts and
classes int32.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .errors import DlcError

LAYOUTS = ("padded", "efficient_nms")
MIN_NMS_OPSET = 11  # NonMaxSuppression, ScatterND, CumSum, Range, Compress


@dataclass(frozen=True)
class NmsSettings:
    max_detections: int = 100
    iou_threshold: float = 0.45
    conf_threshold: float = 0.25
    pre_nms_top_k: int | None = None
    class_agnostic: bool = False
    layout: str = "padded"

    def problems(self) -> list[str]:
        out = []
        if not (isinstance(self.max_detections, int) and self.max_detections >= 1):
            out.append(f"max_detections must be a whole number >= 1, got {self.max_detections!r}")
        if not 0.0 <= float(self.iou_threshold) <= 1.0:
            out.append(f"iou_threshold must be in [0, 1], got {self.iou_threshold!r}")
        if not np.isfinite(float(self.conf_threshold)):
            out.append(f"conf_threshold must be a finite number, got {self.conf_threshold!r}")
        if self.pre_nms_top_k is not None and not (isinstance(self.pre_nms_top_k, int) and self.pre_nms_top_k >= 1):
            out.append(f"pre_nms_top_k must be a whole number >= 1, got {self.pre_nms_top_k!r}")
        if self.layout not in LAYOUTS:
            out.append(f"layout must be one of {', '.join(LAYOUTS)}, got {self.layout!r}")
        return out


class _Nodes:
    """Appends nodes to a graph with fresh names, in the form of the model's opset."""

    def __init__(self, model: onnx.ModelProto, prefix: str = "nms") -> None:
        self.graph = model.graph
        self.opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
        self.prefix = prefix
        self._n = 0
        self._taken = {v for n in self.graph.node for v in (*n.input, *n.output)} | {
            t.name for t in self.graph.initializer} | {i.name for i in self.graph.input}

    def name(self, hint: str) -> str:
        while True:
            self._n += 1
            candidate = f"{self.prefix}/{hint}_{self._n}"
            if candidate not in self._taken:
                self._taken.add(candidate)
                return candidate

    def const(self, hint: str, value, dtype) -> str:
        name = self.name(hint)
        self.graph.initializer.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def op(self, op_type: str, inputs: list[str], hint: str | None = None, outputs: int = 1, out_names=None,
           **attrs) -> str | list[str]:
        names = out_names or [self.name(hint or op_type.lower()) for _ in range(outputs)]
        self.graph.node.append(helper.make_node(op_type, inputs, names, name=self.name(op_type), **attrs))
        return names[0] if outputs == 1 else names

    def _axes_op(self, op_type: str, x: str, axes: list[int], since: int, **attrs) -> str:
        if self.opset >= since:
            return self.op(op_type, [x, self.const("axes", axes, np.int64)], **attrs)
        return self.op(op_type, [x], axes=axes, **attrs)

    def unsqueeze(self, x: str, axes: list[int]) -> str:
        return self._axes_op("Unsqueeze", x, axes, 13)

    def squeeze(self, x: str, axes: list[int]) -> str:
        return self._axes_op("Squeeze", x, axes, 13)

    def reduce_max(self, x: str, axes: list[int], keepdims: int) -> str:
        return self._axes_op("ReduceMax", x, axes, 18, keepdims=keepdims)

    def reduce_sum(self, x: str, axes: list[int], keepdims: int) -> str:
        return self._axes_op("ReduceSum", x, axes, 13, keepdims=keepdims)

    def slice(self, x: str, start: int, end: int, axis: int) -> str:
        return self.op("Slice", [x, self.const("start", [start], np.int64), self.const("end", [end], np.int64),
                                 self.const("axis", [axis], np.int64)])

    def dim(self, x: str, axis: int) -> str:
        """Shape(x)[axis] as a 1-element int64 tensor."""
        return self.slice(self.op("Shape", [x]), axis, axis + 1, 0)


def embed_nms(model: onnx.ModelProto, settings: NmsSettings, output: str | None = None,
              file: str = "<model>") -> onnx.ModelProto:
    """A copy of `model` whose detector output (N, K, 5 + C) is replaced by NMS'd detections (see the module
    notes). `output`: the raw output's name (default: the only output of rank 3 with at least 6 values)."""
    problems = settings.problems()
    if problems:
        raise DlcError(f"{file}: embed_nms: " + "; ".join(problems))
    out = onnx.ModelProto()
    out.CopyFrom(model)
    b = _Nodes(out)
    if b.opset < MIN_NMS_OPSET:
        raise DlcError(f"{file}: NMS inside the model needs opset {MIN_NMS_OPSET} or newer, the model has {b.opset}")
    raw_vi = _raw_output(out, output, file)
    raw = raw_vi.name
    dims = raw_vi.type.tensor_type.shape.dim
    num_classes = dims[2].dim_value - 5

    boxes = b.slice(raw, 0, 4, 2)  # (N, K, 4)
    obj = b.slice(raw, 4, 5, 2)  # (N, K, 1)
    probs = b.slice(raw, 5, 5 + num_classes, 2)  # (N, K, C)
    best = b.reduce_max(probs, [2], keepdims=1)
    labels = b.op("ArgMax", [probs], axis=2, keepdims=0)  # first maximum, as numpy's argmax
    scores = b.squeeze(b.op("Mul", [obj, best]), [2])  # (N, K), objectness × best class probability

    if settings.pre_nms_top_k is not None:  # the k best over all classes; TopK breaks ties to the lower index
        k = b.op("Min", [b.dim(scores, 1), b.const("top_k", [settings.pre_nms_top_k], np.int64)]) \
            if b.opset >= 12 else _min_int(b, b.dim(scores, 1), settings.pre_nms_top_k)
        scores, idx = b.op("TopK", [scores, k], outputs=2, axis=1, largest=1, sorted=1)
        labels = b.op("GatherElements", [labels, idx], axis=1)
        idx4 = b.op("Expand", [b.unsqueeze(idx, [2]), b.const("four", [1, 1, 4], np.int64)])
        boxes = b.op("GatherElements", [boxes, idx4], axis=1)

    if settings.class_agnostic:
        class_scores = b.unsqueeze(scores, [1])  # (N, 1, K)
    else:  # each row scores in its own class only
        classes = b.const("classes", np.arange(num_classes), np.int64)
        own = b.op("Equal", [b.unsqueeze(labels, [2]), classes])  # (N, K, C)
        minus_inf = b.const("minus_inf", -np.inf, np.float32)
        class_scores = b.op("Transpose", [b.op("Where", [own, b.unsqueeze(scores, [2]), minus_inf])],
                            perm=[0, 2, 1])  # (N, C, K)
    selected = b.op("NonMaxSuppression", [
        boxes, class_scores, b.const("max_per_class", [settings.max_detections], np.int64),
        b.const("iou", [settings.iou_threshold], np.float32),
        b.const("score", [settings.conf_threshold], np.float32)], center_point_box=0)  # (S, 3): batch, class, row

    batch_of = b.squeeze(b.slice(selected, 0, 1, 1), [1])  # (S,)
    row_of = b.squeeze(b.slice(selected, 2, 3, 1), [1])
    per_image = b.dim(scores, 1)
    flat = b.op("Add", [b.op("Mul", [batch_of, per_image]), row_of])  # index into the (N·K) rows
    minus_one = b.const("minus_one", [-1], np.int64)
    sel_scores = b.op("Gather", [b.op("Reshape", [scores, minus_one]), flat], axis=0)
    sel_labels = b.op("Gather", [b.op("Reshape", [labels, minus_one]), flat], axis=0)
    sel_boxes = b.op("Gather", [b.op("Reshape", [boxes, b.const("rows4", [-1, 4], np.int64)]), flat], axis=0)

    # (batch ascending, score descending): one TopK over score - 2·batch in float64
    key = b.op("Sub", [b.op("Cast", [sel_scores], to=TensorProto.DOUBLE),
                       b.op("Mul", [b.op("Cast", [batch_of], to=TensorProto.DOUBLE),
                                    b.const("two", 2.0, np.float64)])])
    count = b.op("Shape", [selected])
    count = b.slice(count, 0, 1, 0)
    _, order = b.op("TopK", [key, count], outputs=2, axis=0, largest=1, sorted=1)
    batch_of = b.op("Gather", [batch_of, order], axis=0)
    sel_scores = b.op("Gather", [sel_scores, order], axis=0)
    sel_labels = b.op("Gather", [sel_labels, order], axis=0)
    sel_boxes = b.op("Gather", [sel_boxes, order], axis=0)

    # rank within its image = position - the image's first position
    n = b.dim(raw, 0)
    zero = b.const("zero", 0, np.int64)
    one = b.const("one", 1, np.int64)
    images = b.op("Range", [zero, b.squeeze(n, [0]), one])  # (N,)
    in_image = b.op("Cast", [b.op("Equal", [b.unsqueeze(batch_of, [1]), images])], to=TensorProto.INT64)  # (S, N)
    counts = b.reduce_sum(in_image, [0], keepdims=0)  # (N,)
    starts = b.op("CumSum", [counts, zero], exclusive=1)
    position = b.op("Range", [zero, b.squeeze(count, [0]), one])
    rank = b.op("Sub", [position, b.op("Gather", [starts, batch_of], axis=0)])
    cap = b.const("cap", settings.max_detections, np.int64)
    keep = b.op("Less", [rank, cap])
    batch_of = b.op("Compress", [batch_of, keep], axis=0)
    rank = b.op("Compress", [rank, keep], axis=0)
    rows = b.op("Concat", [sel_boxes, b.unsqueeze(sel_scores, [1]),
                           b.unsqueeze(b.op("Cast", [sel_labels], to=TensorProto.FLOAT), [1])], axis=1)
    rows = b.op("Compress", [rows, keep], axis=0)  # (M, 6)
    where = b.op("Concat", [b.unsqueeze(batch_of, [1]), b.unsqueeze(rank, [1])], axis=1)  # (M, 2)
    shape = b.op("Concat", [n, b.const("tail", [settings.max_detections, 6], np.int64)], axis=0)
    empty = b.op("ConstantOfShape", [shape], value=numpy_helper.from_array(np.zeros(1, np.float32)))
    num = b.op("Where", [b.op("Less", [counts, cap]), counts, cap])  # min(count, cap) per image

    max_det = settings.max_detections
    del out.graph.output[:]
    if settings.layout == "padded":
        b.op("ScatterND", [empty, where, rows], out_names=["detections"])
        b.op("Identity", [num], out_names=["num_detections"])
        out.graph.output.extend([
            helper.make_tensor_value_info("detections", TensorProto.FLOAT, ["batch", max_det, 6]),
            helper.make_tensor_value_info("num_detections", TensorProto.INT64, ["batch"])])
    else:
        padded = b.op("ScatterND", [empty, where, rows])
        b.op("Cast", [b.unsqueeze(num, [1])], out_names=["num_detections"], to=TensorProto.INT32)
        b.op("Slice", [padded, b.const("s0", [0], np.int64), b.const("e4", [4], np.int64),
                       b.const("ax2", [2], np.int64)], out_names=["detection_boxes"])
        b.op("Identity", [b.squeeze(b.slice(padded, 4, 5, 2), [2])], out_names=["detection_scores"])
        b.op("Cast", [b.squeeze(b.slice(padded, 5, 6, 2), [2])], out_names=["detection_classes"],
             to=TensorProto.INT32)
        out.graph.output.extend([
            helper.make_tensor_value_info("num_detections", TensorProto.INT32, ["batch", 1]),
            helper.make_tensor_value_info("detection_boxes", TensorProto.FLOAT, ["batch", max_det, 4]),
            helper.make_tensor_value_info("detection_scores", TensorProto.FLOAT, ["batch", max_det]),
            helper.make_tensor_value_info("detection_classes", TensorProto.INT32, ["batch", max_det])])
    _update_metadata(out, raw, settings)
    return out


def _min_int(b: _Nodes, x: str, value: int) -> str:
    """min(x, value) on int64 before opset 12 (Min took floats only)."""
    c = b.const("top_k", [value], np.int64)
    return b.op("Where", [b.op("Less", [x, c]), x, c])


def _raw_output(model: onnx.ModelProto, name: str | None, file: str) -> onnx.ValueInfoProto:
    outputs = list(model.graph.output)

    def is_rows(vi) -> bool:
        dims = vi.type.tensor_type.shape.dim
        return len(dims) == 3 and dims[2].HasField("dim_value") and dims[2].dim_value >= 6

    if name is not None:
        found = [o for o in outputs if o.name == name]
        if not found:
            raise DlcError(f"{file}: embed_nms: no output named {name!r} (outputs: "
                           f"{', '.join(o.name for o in outputs)})")
        if not is_rows(found[0]):
            raise DlcError(f"{file}: embed_nms: output {name!r} is not detector rows (N, K, 5 + C)")
        return found[0]
    rows = [o for o in outputs if is_rows(o)]
    if len(rows) != 1:
        raise DlcError(f"{file}: embed_nms needs a detector with one output of rows (N, K, 5 + C); this model's "
                       f"outputs are {', '.join(o.name for o in outputs)} (name one with its output name)")
    return rows[0]


def _update_metadata(model: onnx.ModelProto, raw: str, settings: NmsSettings) -> None:
    from .metadata import read_metadata, write_metadata

    meta = read_metadata(model)
    if meta is None:
        return
    meta["embedded_nms"] = {"raw_output": raw, "max_detections": settings.max_detections,
                            "iou_threshold": settings.iou_threshold, "conf_threshold": settings.conf_threshold,
                            "pre_nms_top_k": settings.pre_nms_top_k, "class_agnostic": settings.class_agnostic,
                            "layout": settings.layout}
    if settings.layout == "padded":
        conv = [{"name": "detections", "shape": ["batch", settings.max_detections, 6],
                 "axes": ["batch", "detection", "value"], "dtype": "float32", "kind": "detections_nms",
                 "row": ["x1", "y1", "x2", "y2", "score", "class"],
                 "description": "final detections, best score first, zero rows after num_detections"},
                {"name": "num_detections", "shape": ["batch"], "axes": ["batch"], "dtype": "int64",
                 "kind": "count", "description": "valid rows of detections per image"}]
    else:
        conv = [{"name": "num_detections", "shape": ["batch", 1], "axes": ["batch", "one"], "dtype": "int32",
                 "kind": "count", "description": "TensorRT EfficientNMS convention"},
                {"name": "detection_boxes", "shape": ["batch", settings.max_detections, 4],
                 "axes": ["batch", "detection", "coordinate"], "dtype": "float32", "kind": "boxes",
                 "description": "x1, y1, x2, y2 in input pixels, best score first"},
                {"name": "detection_scores", "shape": ["batch", settings.max_detections],
                 "axes": ["batch", "detection"], "dtype": "float32", "kind": "scores", "description": "score"},
                {"name": "detection_classes", "shape": ["batch", settings.max_detections],
                 "axes": ["batch", "detection"], "dtype": "int32", "kind": "classes",
                 "description": "class index"}]
    meta["output_convention"] = conv
    meta["outputs"] = {c["name"]: c["shape"][1:] for c in conv}
    write_metadata(model, meta)
