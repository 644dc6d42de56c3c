"""dlc's self-description inside an ONNX file: one JSON object under the model's metadata key "dlc".

A program that loads the file (dlc predict/evaluate/import, or anyone's deployment code) needs to know how to
feed it and how to read what comes out, without the YAML. The schema is versioned (`schema_version`) and
documented field by field in the README ("The dlc metadata"); files written before the version existed read as
schema 1 and carry the subset of keys listed in LEGACY_KEYS.

Who writes what:
- `build_metadata(graph, ...)` at export: what the graph says (model, task, input, preprocessing, outputs and
  their convention, detection post-processing).
- `finalize_metadata(model, passes=..., precision=...)` on the finished ModelProto, right before it is saved:
  opset, IR version, the minimum onnxruntime, precision, the file's own input/output dtypes and shapes, the
  pass log. These are read from the ModelProto itself, so they are true for the file that is written.
- `update_metadata(model, **fields)` for later stages (fp16, int8, opset conversion) to stamp what they did.

Metadata is JSON only, written with allow_nan=False (strict JSON) and read with json.loads; a value that is
not a JSON object is refused with a DlcError naming the file, never evaluated.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import onnx
from onnx import TensorProto

from .errors import Diagnostic, DlcError

METADATA_KEY = "dlc"
SCHEMA_VERSION = 2  # 1: the unversioned metadata of dlc before issue 14
TASKS = ("classification", "detection", "segmentation")
PRECISIONS = ("fp32", "fp16", "int8")
# The image pipeline dlc trains with and `dlc predict` feeds (compiler/data/datasets.read_image).
PIXEL_SCALE = 1.0 / 255.0
PREPROCESS_FORMULA = "x[c] = (pixel[c] * scale - mean[c]) / std[c], pixel in 0..255"
# Keys of schema 1 that readers rely on; schema 2 keeps all of them with the same meaning.
LEGACY_KEYS = ("model", "input", "outputs", "classes", "dlc_version", "yaml_sha256", "task", "postprocess",
               "detection")
# The top-level fields of schema 2 that every file has (null where they do not apply), and those only
# detectors have. update_metadata refuses other names: a typo would otherwise go unnoticed.
REQUIRED_FIELDS = ("schema_version", "dlc_version", "model", "yaml_sha256", "task", "classes", "input",
                   "preprocessing", "outputs", "output_convention", "opset", "ir_version", "min_onnxruntime",
                   "precision", "quantization", "fp16", "target", "passes")
DETECTION_FIELDS = ("postprocess", "detection")
FIELDS = REQUIRED_FIELDS + DETECTION_FIELDS + ("embedded_nms", "embedded_argmax")
QUANTIZED_OPS = frozenset({
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv", "QLinearMatMul", "ConvInteger",
    "MatMulInteger", "QGemm", "QLinearAdd", "QLinearMul", "QLinearConcat", "QLinearGlobalAveragePool",
    "QLinearAveragePool", "QLinearSigmoid", "QLinearLeakyRelu", "QLinearSoftmax", "MatMulIntegerToFloat",
    "DynamicQuantizeMatMul",
})
_DTYPE_NAMES = {TensorProto.FLOAT: "float32", TensorProto.FLOAT16: "float16", TensorProto.DOUBLE: "float64",
                TensorProto.BFLOAT16: "bfloat16", TensorProto.INT8: "int8", TensorProto.UINT8: "uint8",
                TensorProto.INT32: "int32", TensorProto.INT64: "int64", TensorProto.BOOL: "bool"}


# --- building ---------------------------------------------------------------------------------------------
def build_metadata(graph, *, model: str, classes: list[str] | None = None, yaml_sha256: str | None = None,
                   dlc_version: str | None = None) -> dict[str, Any]:
    """The metadata of a dlc Graph about to be exported (see the module notes for what comes later)."""
    from . import __version__
    from .ops.detect import detection_metadata

    inp = graph.meta["input"]
    c, h, w = (list(inp["shape"]) + [None, None, None])[:3]
    mean = _per_channel(inp.get("mean"), c, 0.0)
    std = _per_channel(inp.get("std"), c, 1.0)
    meta: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "dlc_version": dlc_version or __version__,
        "model": model,
        "yaml_sha256": yaml_sha256,
        "task": "classification",
        "classes": classes,
        # schema 1's keys (name, shape, mean, std, layout, dtype) plus onnx_shape, the file's own dims
        "input": {**inp, "mean": mean, "std": std, "layout": "NCHW", "dtype": "float32"},
        "preprocessing": {
            "channel_order": "grey" if c == 1 else "RGB",
            "resize": {"mode": "bilinear", "size": [h, w], "keep_aspect_ratio": False, "align_corners": False},
            "scale": PIXEL_SCALE,
            "mean": mean,
            "std": std,
            "dtype": "float32",
            "layout": "NCHW",
            "formula": PREPROCESS_FORMULA,
        },
        "outputs": {o: list(graph.shapes[o]) for o in graph.outputs},  # schema 1: per-sample shapes
        "output_convention": [_output_convention(graph, o) for o in graph.outputs],
        # known only once the file is finished: finalize_metadata stamps them
        "opset": None, "ir_version": None, "min_onnxruntime": None, "precision": None, "passes": [],
        "quantization": None,
        "fp16": None,
        "target": None,
    }
    if is_segmentation(graph):
        meta["task"] = "segmentation"
        meta["output_convention"] = [_segmentation_convention(graph, graph.outputs[0])]
    detection = detection_metadata(graph)  # a detector: task, post-processing defaults, anchors, strides, layout
    if detection is not None:
        meta.update(detection)
        meta["output_convention"] = [_detection_convention(detection, o, graph.shapes[o]) for o in graph.outputs]
    return meta


def _per_channel(value: Any, channels: int | None, default: float) -> list[float]:
    if value is None:
        value = default
    values = [value] * (channels or 1) if isinstance(value, (int, float)) else list(value)
    return [float(v) for v in values]


def _axes(rank: int) -> list[str]:
    return {1: ["batch"], 2: ["batch", "class"], 3: ["batch", "row", "value"],
            4: ["batch", "channel", "height", "width"]}.get(rank, ["batch", *(f"axis{i}" for i in range(1, rank))])


def _output_convention(graph, name: str) -> dict[str, Any]:
    node = graph.producer(name)
    shape = ["batch", *graph.shapes[name]]
    kind, description = {
        "softmax": ("probabilities", "class probabilities (softmax over the class axis)"),
        "sigmoid": ("scores", "per-class sigmoid scores in [0, 1], independent of each other"),
    }.get(node.op if node is not None else "", ("logits", "class scores before softmax (argmax is the predicted "
                                                          "class)"))
    return {"name": name, "shape": shape, "axes": _axes(len(shape)), "dtype": "float32", "kind": kind,
            "description": description}


def is_segmentation(graph) -> bool:
    """A single C×H×W output at the input's height and width: class scores for every input pixel."""
    if len(graph.outputs) != 1 or any(n.op == "detect" for n in graph.nodes()):
        return False
    shape = tuple(graph.shapes[graph.outputs[0]])
    inp = tuple(graph.meta["input"]["shape"])
    return len(shape) == 3 and len(inp) == 3 and shape[1:] == inp[1:]


def _segmentation_convention(graph, name: str) -> dict[str, Any]:
    convention = _output_convention(graph, name)
    what = {"probabilities": "class probabilities per pixel (softmax over the channel axis)",
            "logits": "class scores per pixel before softmax (argmax over the channel axis is each pixel's class)"}
    convention["description"] = what.get(convention["kind"], convention["description"])
    return convention


def _detection_convention(detection: dict[str, Any], name: str, shape) -> dict[str, Any]:
    det = detection["detection"]
    if name != det["output"]:
        return {"name": name, "shape": ["batch", *shape], "axes": _axes(len(shape) + 1), "dtype": "float32",
                "kind": "tensor", "description": "an extra output of the detector"}
    c = det["num_classes"]
    return {
        "name": name, "shape": ["batch", *shape], "axes": ["batch", "candidate", "value"], "dtype": "float32",
        "kind": "detections",
        "row": ["x1", "y1", "x2", "y2", "objectness", *(f"p_class{k}" for k in range(c))],
        "boxes": "x1, y1, x2, y2 in input pixels (of the resized input, not the original image)",
        "score": "objectness * class probability",
        "nms": "not in the graph: apply NMS with the settings under 'postprocess'",
        "description": det["layout"],
    }


# --- reading and writing --------------------------------------------------------------------------------
def parse_metadata(raw: str | None, file: str | None = None) -> dict[str, Any] | None:
    """The JSON object in a metadata value (None when there is none). Anything else is a DlcError naming the
    file: dlc never evaluates metadata."""
    if raw is None:
        return None
    where = file or "the ONNX model"
    if isinstance(raw, bytes):  # protobuf hands back bytes for a string field that is not valid UTF-8
        raise DlcError(Diagnostic(f"the '{METADATA_KEY}' metadata is not UTF-8 text (a corrupt file?)", file=where,
                                  hint="re-export the model with dlc, or remove the metadata entry"))
    try:
        meta = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        looks_like_repr = raw.lstrip().startswith(("{'", "{\"", "[")) and "'" in raw[:200]
        why = " (it looks like a Python repr, which dlc does not evaluate)" if looks_like_repr else ""
        raise DlcError(Diagnostic(f"the '{METADATA_KEY}' metadata is not valid JSON{why}: {exc}", file=where,
                                  hint="re-export the model with dlc, or remove the metadata entry")) from None
    if not isinstance(meta, dict):
        raise DlcError(Diagnostic(f"the '{METADATA_KEY}' metadata is JSON but not an object (got "
                                  f"{type(meta).__name__})", file=where,
                                  hint="re-export the model with dlc, or remove the metadata entry"))
    return meta


def read_metadata(model: onnx.ModelProto, file: str | None = None) -> dict[str, Any] | None:
    """dlc's metadata of a ModelProto, or None when it has none; garbage is a DlcError naming `file`."""
    for prop in model.metadata_props:
        if prop.key == METADATA_KEY:
            return parse_metadata(prop.value, file)
    return None


def write_metadata(model: onnx.ModelProto, meta: dict[str, Any]) -> None:
    """Store `meta` under the key "dlc", replacing what was there (other keys are kept, in order)."""
    text = json.dumps(meta, sort_keys=True, allow_nan=False)  # strict JSON: no NaN/Infinity
    kept = [(p.key, p.value) for p in model.metadata_props if p.key != METADATA_KEY]
    del model.metadata_props[:]
    for key, value in [*kept, (METADATA_KEY, text)]:
        prop = model.metadata_props.add()
        prop.key, prop.value = key, value


def update_metadata(model: onnx.ModelProto, **fields: Any) -> dict[str, Any] | None:
    """Set top-level fields of the model's dlc metadata and write it back; returns the new metadata, or None
    (nothing written) when the model has none, e.g. a foreign ONNX file. Unknown field names are a bug."""
    unknown = [k for k in fields if k not in FIELDS]
    if unknown:
        raise ValueError(f"not fields of the dlc metadata schema: {unknown}; fields: {', '.join(FIELDS)}")
    meta = read_metadata(model)
    if meta is None:
        return None
    meta.update(fields)
    write_metadata(model, meta)
    return meta


# --- facts of the file ----------------------------------------------------------------------------------
def model_opset(model: onnx.ModelProto) -> int | None:
    """The default-domain opset the model imports."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


def dtype_name(elem_type: int) -> str:
    if elem_type in _DTYPE_NAMES:
        return _DTYPE_NAMES[elem_type]
    try:
        return TensorProto.DataType.Name(elem_type).lower()
    except ValueError:  # a corrupt or newer file: describe it rather than fail
        return f"unknown type {elem_type}"


def value_dims(vi: onnx.ValueInfoProto) -> list[int | str] | None:
    """A value's dims as the file states them: ints, names of symbolic axes, or '?' where unknown."""
    tt = vi.type.tensor_type
    if not tt.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim]


def detect_precision(model: onnx.ModelProto) -> str:
    """'int8' for a quantized graph, 'fp16' when most weight elements are float16, else 'fp32'."""
    if any(n.op_type in QUANTIZED_OPS for n in model.graph.node):
        return "int8"
    counts = {TensorProto.FLOAT: 0, TensorProto.FLOAT16: 0}
    for t in model.graph.initializer:
        if t.data_type in counts:
            n = 1
            for d in t.dims:
                n *= d
            counts[t.data_type] += n
    return "fp16" if counts[TensorProto.FLOAT16] > counts[TensorProto.FLOAT] else "fp32"


def min_onnxruntime(opset: int | None, ir_version: int | None) -> str | None:
    """The oldest onnxruntime that loads this opset and IR version (compiler/targets.py's table)."""
    if opset is None or not ir_version:
        return None
    from .targets import min_runtime_for

    try:
        found = min_runtime_for(opset, ir_version)
    except (DlcError, ValueError, LookupError):  # an opset or IR newer than the table knows
        return None
    return None if found is None else str(found)


def _pass_entry(report: Any) -> dict[str, Any]:
    """A pass log entry from a passes.PassReport (or its dict): name and how many rewrites it made."""
    d = report.to_dict() if hasattr(report, "to_dict") else dict(report)
    entry = {"name": d["name"], "changes": int(d.get("changes", d.get("rewrites", 0)))}
    for key in ("nodes_before", "nodes_after"):
        if key in d:
            entry[key] = int(d[key])
    return entry


def finalize_metadata(model: onnx.ModelProto, passes: Iterable[Any] | None = None, precision: str | None = None,
                      file: str | None = None, **fields: Any) -> dict[str, Any] | None:
    """Stamp what only the finished file knows, read from the ModelProto: opset, IR version, the minimum
    onnxruntime, precision (given, else detected from the graph), the inputs' and outputs' dtypes and dims.
    `passes` (PassReports or their dicts) are appended to the pass log. Other `fields` as update_metadata.
    Call it on the ModelProto right before it is saved. Returns the metadata (None: the model has none);
    `file` names the model in the error for unreadable metadata."""
    meta = read_metadata(model, file)
    if meta is None:
        return None
    if precision is not None and precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    opset = model_opset(model)
    meta.update(schema_version=SCHEMA_VERSION, opset=opset, ir_version=int(model.ir_version),
                min_onnxruntime=min_onnxruntime(opset, model.ir_version),
                precision=precision or detect_precision(model))
    meta["passes"] = [*(meta.get("passes") or []), *(_pass_entry(p) for p in passes or ())]
    graph_inputs = {i.name: i for i in model.graph.input}
    inp = meta.get("input")
    if isinstance(inp, dict) and inp.get("name") in graph_inputs:
        vi = graph_inputs[inp["name"]]
        inp["dtype"] = dtype_name(vi.type.tensor_type.elem_type)
        inp["onnx_shape"] = value_dims(vi)
        if isinstance(meta.get("preprocessing"), dict):
            meta["preprocessing"]["dtype"] = inp["dtype"]
    outputs = {o.name: o for o in model.graph.output}
    for conv in meta.get("output_convention") or []:
        vi = outputs.get(conv.get("name"))
        if vi is not None:
            conv["dtype"] = dtype_name(vi.type.tensor_type.elem_type)
            conv["shape"] = value_dims(vi) or conv.get("shape")
    unknown = [k for k in fields if k not in FIELDS]
    if unknown:
        raise ValueError(f"not fields of the dlc metadata schema: {unknown}")
    meta.update(fields)
    write_metadata(model, meta)
    return meta


def validate_metadata(meta: dict[str, Any], model: onnx.ModelProto | None = None) -> list[str]:
    """Problems with a schema-2 metadata object (empty: none): missing or mistyped fields, and, given the model,
    fields that disagree with the file (stale after an edit by a tool that did not update them)."""
    problems = []
    version = meta.get("schema_version")
    if version is None:
        return [f"no schema_version: written before schema {SCHEMA_VERSION} (dlc's schema 1), so it lacks "
                f"{', '.join(k for k in REQUIRED_FIELDS if k not in meta) or 'nothing'}"]
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        problems.append(f"schema_version {version!r} is newer than this dlc reads ({SCHEMA_VERSION})")
    for key in REQUIRED_FIELDS + (DETECTION_FIELDS if meta.get("task") == "detection" else ()):
        if key not in meta:
            problems.append(f"missing field '{key}'")
    if meta.get("task") not in TASKS:
        problems.append(f"task {meta.get('task')!r} is not one of {', '.join(TASKS)}")
    if meta.get("precision") not in PRECISIONS:
        problems.append(f"precision {meta.get('precision')!r} is not one of {', '.join(PRECISIONS)}")
    if meta.get("precision") == "int8" and not isinstance(meta.get("quantization"), dict):
        problems.append("precision int8 without a 'quantization' object (its format)")
    inp = meta.get("input")
    if not isinstance(inp, dict) or not isinstance(inp.get("shape"), list):
        problems.append("'input' must be an object with 'shape' [C, H, W]")
    if not isinstance(meta.get("passes"), list):
        problems.append("'passes' must be a list")
    if model is not None:
        facts = {"opset": model_opset(model), "ir_version": int(model.ir_version),
                 "precision": detect_precision(model)}
        for key, value in facts.items():
            if key in meta and meta[key] != value:
                problems.append(f"{key} is {meta[key]!r} in the metadata but {value!r} in the file")
    return problems
