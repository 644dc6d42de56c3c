"""`dlc info model.onnx`: what an ONNX file is and how to use it, from the file itself and from dlc's metadata.

Facts come from the file (opset, IR version, inputs and outputs, node count and op histogram, parameters and
MACs from runtime/cost.py, which understands quantized graphs, precision, the oldest onnxruntime that loads
it); the metadata (compiler/metadata.py) adds what the file cannot say (task, preprocessing, classes, the
output convention, the pass log). Where the two disagree (metadata left stale by a tool that edited the
file), `problems` says so. Files without dlc metadata get the facts and a note.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path
from typing import Any

from dlc.compiler.metadata import (
    detect_precision,
    dtype_name,
    min_onnxruntime,
    model_opset,
    read_metadata,
    validate_metadata,
    value_dims,
)
from dlc.compiler.onnx_io import load_onnx


def _values(values, skip: set[str]) -> list[dict[str, Any]]:
    return [{"name": v.name, "dtype": dtype_name(v.type.tensor_type.elem_type), "shape": value_dims(v)}
            for v in values if v.name not in skip]


def model_info(path: str | Path) -> dict[str, Any]:
    """Everything `dlc info` prints, as a JSON-ready dict. A missing or corrupt file, or metadata that is not
    a JSON object, is a DlcError naming the file."""
    from .cost import count_macs, count_params

    path = Path(path)
    model = load_onnx(path)
    meta = read_metadata(model, str(path))
    data = path.read_bytes()
    inits = {t.name for t in model.graph.initializer}
    elements: Counter[str] = Counter()
    for t in model.graph.initializer:
        n = 1
        for d in t.dims:
            n *= d
        elements[dtype_name(t.data_type)] += n
    opset = model_opset(model)
    try:
        macs: int | None = count_macs(model)
    except Exception:  # shape inference on an unusual graph; the rest of the facts still stand
        macs = None
    problems = []
    if meta is not None:
        problems = validate_metadata(meta, model)
    ops = Counter(n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}" for n in model.graph.node)
    return {
        "file": str(path),
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "producer": {"name": model.producer_name or None, "version": model.producer_version or None},
        "opset": opset,
        "opsets": {o.domain or "ai.onnx": o.version for o in model.opset_import},
        "ir_version": int(model.ir_version),
        "min_onnxruntime": min_onnxruntime(opset, model.ir_version),
        "precision": detect_precision(model),
        "inputs": _values(model.graph.input, inits),
        "outputs": _values(model.graph.output, set()),
        "nodes": len(model.graph.node),
        "ops": dict(ops.most_common()),
        "params": count_params(model),
        "initializer_elements": dict(elements.most_common()),
        "macs": macs,
        "has_dlc_metadata": meta is not None,
        "metadata_schema": None if meta is None else meta.get("schema_version", 1),
        "metadata": meta,
        "problems": problems,
    }


def _shape(dims) -> str:
    return "?" if dims is None else "[" + ", ".join(str(d) for d in dims) + "]"


def _floats(values) -> str:
    if not isinstance(values, list):
        return str(values)
    return "[" + ", ".join(f"{v:g}" if isinstance(v, (int, float)) else str(v) for v in values) + "]"


def info_lines(info: dict[str, Any]) -> list[tuple[str, str]]:
    """The report as (label, text) rows, for the CLI to print."""
    rows: list[tuple[str, str]] = []
    producer = " ".join(v for v in info["producer"].values() if v) or "unknown"
    rows.append(("file", f"{info['file']} ({info['bytes']:,} bytes, sha256 {info['sha256'][:12]}…), made by "
                 f"{producer}"))
    ort = info["min_onnxruntime"]
    others = ", ".join(f"{d} {v}" for d, v in info["opsets"].items() if d != "ai.onnx")
    rows.append(("format", f"opset {info['opset']}{f' (+ {others})' if others else ''}, IR version "
                 f"{info['ir_version']}; loads in onnxruntime {ort + ' or newer' if ort else '(unknown version)'}"))
    rows.append(("precision", info["precision"]))
    meta = info["metadata"] or {}
    conventions = {c.get("name"): c for c in meta.get("output_convention") or [] if isinstance(c, dict)}
    for v in info["inputs"]:
        rows.append(("input", f"{v['name']}  {v['dtype']}  {_shape(v['shape'])}"))
    for v in info["outputs"]:
        c = conventions.get(v["name"])
        what = f"  ({c.get('kind')}: {c.get('description')})" if c else ""
        rows.append(("output", f"{v['name']}  {v['dtype']}  {_shape(v['shape'])}{what}"))
    ops = ", ".join(f"{k} {n}" for k, n in info["ops"].items())
    rows.append(("nodes", f"{info['nodes']}: {ops}"))
    elems = ", ".join(f"{k} {n:,}" for k, n in info["initializer_elements"].items())
    macs = "unknown" if info["macs"] is None else f"{info['macs']:,}"
    rows.append(("cost", f"{info['params']:,} params, {macs} MACs per image (initializers: {elems or 'none'})"))
    if not info["has_dlc_metadata"]:
        rows.append(("metadata", "none: this file has no dlc metadata (not made by dlc, or stripped); input "
                     "preprocessing and the output convention are unknown"))
        return rows
    schema = info["metadata_schema"]
    rows.append(("metadata", f"dlc schema {schema}" + (" (unversioned, before schema 2)" if schema == 1 else "")
                 + (f", written by dlc {meta['dlc_version']}" if meta.get("dlc_version") else "")))
    classes = meta.get("classes")
    named = f", {len(classes)} classes: {', '.join(map(str, classes[:10]))}{' …' if len(classes) > 10 else ''}" \
        if isinstance(classes, list) else ""
    rows.append(("model", f"{meta.get('model')} ({meta.get('task', 'classification')}){named}"))
    pre = meta.get("preprocessing")
    if isinstance(pre, dict):
        resize = pre.get("resize") or {}
        size = "×".join(str(s) for s in resize.get("size") or [])
        rows.append(("preprocess", f"{pre.get('channel_order')}, {resize.get('mode')} resize to {size}"
                     f"{'' if resize.get('keep_aspect_ratio') else ' (aspect not kept)'}, scale {pre.get('scale'):.6g}, "
                     f"mean {_floats(pre.get('mean'))}, std {_floats(pre.get('std'))}, {pre.get('dtype')} "
                     f"{pre.get('layout')}: {pre.get('formula')}"))
    elif isinstance(meta.get("input"), dict):
        inp = meta["input"]
        rows.append(("preprocess", f"mean {_floats(inp.get('mean'))}, std {_floats(inp.get('std'))} (schema 1: "
                     "resize and scale not recorded)"))
    for c in conventions.values():
        if c.get("kind") == "detections":
            rows.append(("detections", f"rows [{', '.join(c.get('row', []))}]; {c.get('boxes')}; score = "
                         f"{c.get('score')}; {c.get('nms')}"))
    post = meta.get("postprocess")
    if isinstance(post, dict):
        rows.append(("postprocess", ", ".join(f"{k} {v}" for k, v in post.items())))
    q = meta.get("quantization")
    if isinstance(q, dict):
        rows.append(("quantization", ", ".join(f"{k} {v}" for k, v in q.items())))
    f16 = meta.get("fp16")
    if isinstance(f16, dict):
        rows.append(("fp16", f"keep_io_types {f16.get('keep_io_types')}; kept in float32: "
                     f"{', '.join(f16.get('fp32_ops') or []) or 'nothing'}"))
    if isinstance(meta.get("target"), dict):
        rows.append(("target", ", ".join(f"{k} {v}" for k, v in meta["target"].items())))
    passes = meta.get("passes")
    if isinstance(passes, list):
        log = ", ".join(f"{p.get('name')} ({p.get('changes')})" for p in passes if isinstance(p, dict))
        rows.append(("passes", log or "none"))
    for problem in info["problems"]:
        rows.append(("problem", problem))
    return rows

