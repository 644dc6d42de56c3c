"""FP16 artifacts: weights and compute in float16, inputs and outputs float32 by default.

Built on onnxruntime's own converter (onnxruntime/transformers/float16.py, `convert_float_to_float16`, shipped in
the onnxruntime wheel), which casts at the graph's edges (keep_io_types) and around the ops it is told to keep
in float32. dlc adds what that converter leaves to its caller: a topological order (it appends its Cast nodes
at the end, which onnx's checker refuses), one Cast where it makes a copy per float32 consumer (same output
name twice), no float32 -> float16 -> float32 round trips between two float32 nodes, the ops and nodes that
stay float32 for dlc's graphs, onnx's full check, and the metadata stamp.

Kept in float32:
- ops without good fp16 kernels or with a float32-only input: NonMaxSuppression, TopK, RoiAlign, Range,
  CumSum, Upsample, ... (the converter's DEFAULT_OP_BLOCK_LIST); Resize's `scales` input is float32 by the
  ONNX spec and stays so (the converter keeps it);
- LRN: it sums squares of activations over a window, which overflows float16 (max 65504) once activations
  pass 256;
- a detector's decode (the nodes of the detect layer, '<layer>' and '<layer>/...'): box centres and sizes in
  input pixels would be rounded to 0.5 px between 512 and 1024 px in float16; it is a negligible share of
  the compute.

On onnxruntime's CPU provider fp16 is no faster than fp32 (see fp16_cpu_warning); it pays on CUDA and TensorRT.
"""

from __future__ import annotations

from collections.abc import Iterable

import onnx
from onnx import TensorProto

from .errors import DlcError
from .metadata import QUANTIZED_OPS, finalize_metadata, read_metadata


def _default_block_ops() -> tuple[str, ...]:
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST

    return (*DEFAULT_OP_BLOCK_LIST, "LRN")


FP32_OPS: tuple[str, ...] = _default_block_ops()


def decode_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of a dlc detector's decode nodes (the detect layer's), from the metadata's detection output."""
    try:
        meta = read_metadata(model) or {}
    except DlcError:
        meta = {}
    det = meta.get("detection") if meta.get("task") == "detection" else None
    if not isinstance(det, dict) or not det.get("output"):
        return []
    producer = next((n for n in model.graph.node if det["output"] in n.output), None)
    if producer is None:
        return []
    layer = producer.name.split("/")[0]
    return [n.name for n in model.graph.node if n.name == layer or n.name.startswith(layer + "/")]


def _float_elements(model: onnx.ModelProto) -> dict[int, int]:
    counts: dict[int, int] = {}
    for t in model.graph.initializer:
        n = 1
        for d in t.dims:
            n *= d
        counts[t.data_type] = counts.get(t.data_type, 0) + n
    return counts


def _refuse_unconvertible(model: onnx.ModelProto, file: str) -> None:
    quantized = sorted({n.op_type for n in model.graph.node if n.op_type in QUANTIZED_OPS})
    if quantized:
        raise DlcError(f"{file}: the model is already quantized ({', '.join(quantized)}); convert the float model "
                       "to fp16 instead")
    counts = _float_elements(model)
    float_inputs = [i for i in model.graph.input if i.type.tensor_type.elem_type == TensorProto.FLOAT]
    if not counts.get(TensorProto.FLOAT) and not float_inputs:
        what = "already float16" if counts.get(TensorProto.FLOAT16) else "without float32 weights or inputs"
        raise DlcError(f"{file}: the model is {what}: nothing to convert to fp16")


def topological_sort(graph: onnx.GraphProto) -> None:
    """Reorder the nodes so that each comes after the producers of its inputs (stable: the original order
    wherever it is already valid). Raises DlcError on a cycle."""
    from .passes.graph import stable_topological_order

    nodes = list(graph.node)
    order = stable_topological_order(nodes)
    if len(order) != len(nodes):
        raise DlcError(f"graph '{graph.name}' has a cycle: it cannot be ordered")
    del graph.node[:]
    graph.node.extend(nodes[k] for k in order)


def _dedupe_nodes(graph: onnx.GraphProto) -> None:
    """Drop exact duplicates: the converter inserts one Cast per blocked consumer of a float16 value, all with
    the same output name, so two blocked consumers of one value break single assignment."""
    seen: set[bytes] = set()
    kept = []
    for n in graph.node:
        key = n.SerializeToString(deterministic=True)
        if key not in seen:
            seen.add(key)
            kept.append(n)
    del graph.node[:]
    graph.node.extend(kept)


def _fold_cast_pairs(model: onnx.ModelProto) -> int:
    """Remove float32 -> float16 -> float32 round trips between two float32 (blocked) nodes: the converter
    casts every edge of a blocked chain down and back up, which costs time and rounds the values to fp16."""
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in model.graph.node
           for a in n.attribute):
        return 0  # renaming would have to reach into subgraphs; dlc's graphs have none
    typed = onnx.shape_inference.infer_shapes(model)
    elem = {v.name: v.type.tensor_type.elem_type
            for v in (*typed.graph.input, *typed.graph.value_info, *typed.graph.output)}
    elem.update({t.name: t.data_type for t in model.graph.initializer})
    g = model.graph
    outputs = {o.name for o in g.output}

    def cast_to(n: onnx.NodeProto) -> int | None:
        return next((a.i for a in n.attribute if a.name == "to"), None) if n.op_type == "Cast" else None

    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    rename: dict[str, str] = {}
    dropped: set[int] = set()
    for down in g.node:
        if cast_to(down) != TensorProto.FLOAT16 or elem.get(down.input[0]) != TensorProto.FLOAT:
            continue
        half = down.output[0]
        users = consumers.get(half, [])
        if half in outputs or not users or any(cast_to(u) != TensorProto.FLOAT for u in users):
            continue
        for up in users:
            if up.output[0] in outputs:  # keep the graph output's name: the up-cast becomes an Identity
                up.op_type, up.input[0] = "Identity", down.input[0]
                del up.attribute[:]
            else:
                rename[up.output[0]] = down.input[0]
                dropped.add(id(up))
        dropped.add(id(down))
    if not dropped:
        return 0
    kept = [n for n in g.node if id(n) not in dropped]
    for n in kept:
        for k, name in enumerate(n.input):
            while name in rename:
                name = rename[name]
            n.input[k] = name
    del g.node[:]
    g.node.extend(kept)
    return len(dropped)


def to_fp16(model: onnx.ModelProto, keep_io_types: bool = True, block_ops: Iterable[str] = FP32_OPS,
            block_nodes: Iterable[str] | None = None, file: str = "the model") -> onnx.ModelProto:
    """A float16 copy of a float32 model. keep_io_types: inputs and outputs stay float32 (Cast at the edges).
    block_ops: op types kept in float32; block_nodes: node names kept in float32 (default: a dlc detector's
    decode). The result passes onnx's full check; dlc metadata, when there is one, is stamped with
    precision fp16 and what stayed float32."""
    _refuse_unconvertible(model, file)
    from onnxruntime.transformers.float16 import convert_float_to_float16

    source = onnx.ModelProto.FromString(model.SerializeToString())
    blocked_nodes = set(decode_nodes(source) if block_nodes is None else block_nodes)
    blocked_ops = set(block_ops)
    del source.graph.value_info[:]  # the converter infers types afresh; stale entries would mislead it
    try:
        converted = convert_float_to_float16(source, keep_io_types=keep_io_types, op_block_list=sorted(blocked_ops),
                                             node_block_list=sorted(blocked_nodes))
    except Exception as exc:  # the converter asserts and raises on graphs it cannot type
        raise DlcError(f"{file}: onnxruntime's fp16 converter failed: {type(exc).__name__}: {exc}") from None
    _dedupe_nodes(converted.graph)
    topological_sort(converted.graph)
    del converted.graph.value_info[:]  # shape inference recomputes them; dropping them keeps the file lean
    _fold_cast_pairs(converted)
    try:
        onnx.checker.check_model(converted, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise DlcError(f"{file}: the fp16 model fails onnx's checker: {str(exc).splitlines()[0]}") from None
    fp32 = sorted({n.op_type for n in converted.graph.node
                   if n.op_type != "Cast" and (n.op_type in blocked_ops or n.name in blocked_nodes)})
    finalize_metadata(converted, precision="fp16",
                      fp16={"keep_io_types": bool(keep_io_types), "fp32_ops": fp32,
                            "fp32_nodes": sum(1 for n in converted.graph.node
                                              if n.op_type in blocked_ops or n.name in blocked_nodes)})
    return converted


def fp16_cpu_warning(device: str | None) -> str | None:
    """The warning for an fp16 artifact made for onnxruntime's CPU provider (None for GPU devices). The numbers
    behind it: benchmarks/fp16_vs_fp32.py, and the README's FP16 section."""
    if device not in (None, "cpu"):
        return None
    return ("fp16 is no faster than fp32 on onnxruntime's CPU execution provider, and slower below its full graph "
            "optimizations: the CPU provider has float16 kernels for few ops, so it runs an fp16 model in float32 "
            "behind Cast nodes (with all optimizations on, it casts the weights back to float32 when loading). "
            "fp16 then only halves the file. Use fp32 or int8 for a CPU target; fp16 pays on cuda and tensorrt.")
