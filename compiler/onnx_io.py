"""Reading ONNX files safely: a clear error for a missing or corrupt file, and external data only from inside
the model's own folder (a tensor's `location` may not be absolute or climb out with '..')."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import Message
from onnx import TensorProto, external_data_helper, numpy_helper

from . import limits
from .errors import Diagnostic, DlcError

# Which repeated field holds a tensor's values when they are not in raw_data, and how many entries per element.
_TYPED_FIELD = {
    TensorProto.FLOAT: ("float_data", 1), TensorProto.DOUBLE: ("double_data", 1),
    TensorProto.INT64: ("int64_data", 1), TensorProto.UINT64: ("uint64_data", 1),
    TensorProto.UINT32: ("uint64_data", 1), TensorProto.COMPLEX64: ("float_data", 2),
    TensorProto.COMPLEX128: ("double_data", 2),
    **{t: ("int32_data", 1) for t in (TensorProto.INT32, TensorProto.INT16, TensorProto.INT8, TensorProto.UINT16,
                                      TensorProto.UINT8, TensorProto.BOOL, TensorProto.FLOAT16,
                                      TensorProto.BFLOAT16)},
}


# Types stored below a byte per element: raw_data packs them, two 4-bit or four 2-bit values to a byte.
_PACKED_BITS = {TensorProto.UINT4: 4, TensorProto.INT4: 4, TensorProto.FLOAT4E2M1: 4,
                **{getattr(TensorProto, t): 2 for t in ("UINT2", "INT2") if hasattr(TensorProto, t)}}
# 8-bit floats: one byte each in raw_data, one int32_data entry each otherwise.
_BYTE_FLOATS = {getattr(TensorProto, t) for t in ("FLOAT8E4M3FN", "FLOAT8E4M3FNUZ", "FLOAT8E5M2", "FLOAT8E5M2FNUZ",
                                                  "FLOAT8E8M0") if hasattr(TensorProto, t)}


def _itemsize(data_type: int) -> int | None:
    if data_type in _BYTE_FLOATS:
        return 1
    if data_type not in _TYPED_FIELD:
        return None  # strings and packed types: checked on their own below
    return onnx.helper.tensor_dtype_to_np_dtype(data_type).itemsize


def _raw_bytes(data_type: int, elements: int) -> int | None:
    """How many raw_data bytes a tensor of this type and element count holds; None where onnx's packing is not
    pinned down here (6-bit floats): such a tensor is checked when it is read (tensor_array)."""
    size = _itemsize(data_type)
    if size is not None:
        return elements * size
    if data_type in _PACKED_BITS:
        return -(-elements * _PACKED_BITS[data_type] // 8)
    return None


def check_tensors(model: onnx.ModelProto, where: str, base: Path | None = None) -> None:
    """Refuse tensors whose declared shape does not match their data (a corrupt or crafted file that would make a
    reader over-read or allocate from the declared size) and external data with a negative or out-of-file
    offset or length; and graphs with more nodes than the onnx_nodes limit."""
    def fail(message: str) -> DlcError:
        return DlcError(Diagnostic(message, file=where, hint="the file is corrupt; export it again"))

    nodes = sum(len(g.node) for g in _graphs(model.graph))
    limits.check("onnx_nodes", nodes)
    for tensor in external_data_helper._get_all_tensors(model):
        name = tensor.name or "<unnamed>"
        if any(d < 0 for d in tensor.dims):
            raise fail(f"tensor '{name}' has a negative dimension {list(tensor.dims)}")
        if tensor.data_type not in onnx.TensorProto.DataType.values() or tensor.data_type == 0:
            raise fail(f"tensor '{name}' has no known element type (data_type {tensor.data_type})")
        elements = math.prod(tensor.dims)
        size = _itemsize(tensor.data_type)
        expected_raw = _raw_bytes(tensor.data_type, elements)
        if external_data_helper.uses_external_data(tensor):
            info = {e.key: e.value for e in tensor.external_data}
            try:
                offset, length = int(info.get("offset", 0) or 0), int(info.get("length", -1) or 0)
            except ValueError:
                raise fail(f"tensor '{name}': external data offset/length are not integers") from None
            if offset < 0 or ("length" in info and length < 0):
                raise fail(f"tensor '{name}': negative external data offset or length ({offset}, {length})")
            if expected_raw is not None and "length" in info and length != expected_raw:
                raise fail(f"tensor '{name}' is declared {list(tensor.dims)} ({expected_raw:,} bytes) but its "
                           f"external data is {length:,} bytes")
            if base is not None and info.get("location"):
                target = base / info["location"]
                if target.is_file() and offset + max(length, 0) > target.stat().st_size:
                    raise fail(f"tensor '{name}': external data ends past the end of '{info['location']}'")
            continue
        has_raw = tensor.HasField("raw_data") or bool(tensor.raw_data)
        if tensor.data_type == TensorProto.STRING:
            if has_raw:
                raise fail(f"string tensor '{name}' holds raw bytes (strings are stored as a list; was its type "
                           "changed?)")
            if len(tensor.string_data) != elements:
                raise fail(f"tensor '{name}' is declared {list(tensor.dims)} ({elements:,} strings) but holds "
                           f"{len(tensor.string_data):,}")
            continue
        if has_raw:
            if expected_raw is not None and len(tensor.raw_data) != expected_raw:
                raise fail(f"tensor '{name}' is declared {list(tensor.dims)} ({expected_raw:,} bytes) but holds "
                           f"{len(tensor.raw_data):,} bytes")
            continue
        if size is None or tensor.data_type not in _TYPED_FIELD and tensor.data_type not in _BYTE_FLOATS:
            continue
        field, per = _TYPED_FIELD.get(tensor.data_type, ("int32_data", 1))
        count = len(getattr(tensor, field))
        if count != elements * per:
            raise fail(f"tensor '{name}' is declared {list(tensor.dims)} ({elements:,} values) but holds {count:,}")


def tensor_array(tensor: onnx.TensorProto, where: str) -> np.ndarray:
    """A tensor's values as numpy; data that does not fit its declared type or shape is the file's fault (a
    DlcError naming the tensor), not a ValueError from deep inside onnx."""
    try:
        return numpy_helper.to_array(tensor)
    except (ValueError, TypeError, KeyError, OverflowError) as exc:
        known = tensor.data_type in TensorProto.DataType.values()
        kind = TensorProto.DataType.Name(tensor.data_type) if known else f"type {tensor.data_type}"
        raise DlcError(Diagnostic(f"tensor '{tensor.name or '<unnamed>'}' cannot be read as its declared {kind} "
                                  f"{list(tensor.dims)} ({exc})", file=where,
                                  hint="the file is corrupt; export it again")) from None


def _graphs(graph: onnx.GraphProto):
    """The graph and every subgraph (If/Loop/Scan bodies), iteratively (a deep nesting is no RecursionError)."""
    stack = [graph]
    while stack:
        g = stack.pop()
        yield g
        for node in g.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    stack.append(attr.g)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    stack.extend(attr.graphs)


def read_onnx_proto(path: str | Path) -> onnx.ModelProto:
    """The model without its external data, checked: a regular file that parses, external data only from inside
    its folder, and tensors whose data matches their declared shape."""
    path = Path(path)
    if not path.exists():
        raise DlcError(Diagnostic("ONNX file not found", file=str(path), hint="check the path"))
    if not path.is_file():  # a folder, FIFO or device: reading would fail or block
        raise DlcError(Diagnostic("not a regular file, expected an .onnx file", file=str(path)))
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError and friends
        raise DlcError(Diagnostic(f"not a readable ONNX model ({type(exc).__name__}: {exc})", file=str(path),
                                  hint="is it a complete .onnx file?")) from None
    base = path.parent.resolve()
    for tensor in external_data_helper._get_all_tensors(model):
        if not external_data_helper.uses_external_data(tensor):
            continue
        try:
            info = external_data_helper.ExternalDataInfo(tensor)
        except ValueError as exc:  # onnx's own checks: a negative offset, a non-integer length
            raise DlcError(Diagnostic(f"tensor '{tensor.name}': bad external data ({exc})", file=str(path),
                                      hint="the file is corrupt; export it again")) from None
        if "\x00" in info.location:
            raise DlcError(Diagnostic(f"tensor '{tensor.name}': external data location {info.location!r} holds a NUL "
                                      "byte", file=str(path), hint="the file is corrupt; export it again"))
        target = (base / info.location).resolve()
        if Path(info.location).is_absolute() or base not in target.parents:
            raise DlcError(Diagnostic(f"tensor '{tensor.name}' keeps its data at '{info.location}', outside the "
                                      "model's folder; refusing to read it", file=str(path)))
        if not target.is_file():
            raise DlcError(Diagnostic(f"external data file '{info.location}' of tensor '{tensor.name}' is missing",
                                      file=str(path)))
    check_tensors(model, str(path), base)
    check_text(model, str(path))
    check_value_types(model, str(path))
    return model


def check_value_types(model: onnx.ModelProto, where: str) -> None:
    """Every typed input, output and value_info names an element type onnx knows (onnx's own readers raise a
    bare ValueError on an unknown enum value)."""
    known = set(TensorProto.DataType.values())
    for g in _graphs(model.graph):
        for v in (*g.input, *g.output, *g.value_info):
            if v.type.HasField("tensor_type") and v.type.tensor_type.elem_type not in known:
                raise DlcError(Diagnostic(f"value '{v.name}' has no known element type (elem_type "
                                          f"{v.type.tensor_type.elem_type})", file=where,
                                          hint="the file is corrupt; export it again"))


def check_text(model: onnx.ModelProto, where: str) -> None:
    """Every name and string field must be UTF-8. protobuf hands back invalid bytes as `bytes` instead of `str`,
    which no later step expects (a crafted or bit-flipped file)."""
    def fail(what: str, value: bytes) -> DlcError:
        return DlcError(Diagnostic(f"{what} {value[:60]!r} is not valid UTF-8 text", file=where,
                                   hint="the file is corrupt; export it again"))

    def texts(items, what: str) -> None:
        for v in items:
            if not isinstance(v, str):
                raise fail(what, v)

    texts([model.producer_name, model.producer_version, model.domain, model.doc_string], "the model's header")
    texts([o.domain for o in model.opset_import], "an opset domain")
    texts([t for p in model.metadata_props for t in (p.key, p.value)], "a metadata entry")
    for g in _graphs(model.graph):
        texts([g.name], "a graph name")
        texts([v.name for v in (*g.input, *g.output, *g.value_info)], "a value name")
        texts([t.name for t in g.initializer], "an initializer name")
        for n in g.node:
            texts([n.name, n.op_type, n.domain], "a node's name or type")
            texts([*n.input, *n.output], f"a value name of node '{n.name}'" if isinstance(n.name, str) else
                  "a value name")
            texts([a.name for a in n.attribute], "an attribute name")  # a STRING attribute's value is bytes


def load_onnx(path: str | Path) -> onnx.ModelProto:
    path = Path(path)
    model = read_onnx_proto(path)
    base = path.parent.resolve()
    try:
        external_data_helper.load_external_data_for_model(model, str(base))
    except Exception as exc:
        raise DlcError(Diagnostic(f"cannot read the model's external data ({exc})", file=str(path))) from None
    if not model.graph.node:
        raise DlcError(Diagnostic("the ONNX model has no nodes", file=str(path)))
    return model


# --- writing large models piece by piece --------------------------------------------------------------------------
_GRAPH_FIELD, _INITIALIZER_FIELD = 7, 5  # ModelProto.graph, GraphProto.initializer (onnx.proto field numbers)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _length_delimited(field: int, payload_size: int) -> bytes:
    return _varint(field << 3 | 2) + _varint(payload_size)


def copy_without(message, skip: tuple[str, ...] = ()):
    """A new message of the same type holding `message`'s fields except those named in `skip` (a field path
    like "graph.initializer" skips one field of a sub-message). No copy of what is skipped is ever made: for a
    ModelProto, `copy_without(model, ("graph.initializer",))` costs its nodes, not its weights."""
    out = type(message)()
    for field, value in message.ListFields():
        if field.name in skip:
            continue
        inner = tuple(s.split(".", 1)[1] for s in skip if s.startswith(field.name + "."))
        if inner:
            getattr(out, field.name).CopyFrom(copy_without(value, inner))
        elif isinstance(value, Message):
            getattr(out, field.name).CopyFrom(value)
        elif hasattr(value, "extend"):  # a repeated field
            getattr(out, field.name).extend(value)
        else:
            setattr(out, field.name, value)
    return out


def serialized_chunks(model: onnx.ModelProto):
    """The model's protobuf encoding in pieces: the model without its initializers, then one more `graph`
    field per initializer, holding just that tensor. Protobuf parsers merge repeated occurrences of a message
    field (the encoding's rule, which onnx and onnxruntime both follow), so the file reads back as the same
    model, initializers in order, while writing it never holds more than one tensor's bytes beside the model
    (SerializeToString of a 550 MB VGG holds all 550 MB twice more)."""
    yield copy_without(model, ("graph.initializer",)).SerializeToString()
    for tensor in model.graph.initializer:
        data = tensor.SerializeToString()
        inner = _length_delimited(_INITIALIZER_FIELD, len(data))
        yield _length_delimited(_GRAPH_FIELD, len(inner) + len(data)) + inner
        yield data


def save_onnx(model: onnx.ModelProto, path: str | Path) -> Path:
    """Write the model atomically, one initializer at a time (see serialized_chunks)."""
    from .atomic import write_chunks

    return write_chunks(path, serialized_chunks(model))


def weightless(model: onnx.ModelProto, limit: int = 1024) -> onnx.ModelProto:
    """The model with every floating-point initializer above `limit` elements turned into a graph input of its
    type and shape: what onnx's checker and shape inference need of a large model (they read the values of
    small, shape-like tensors only), at the cost of its graph rather than a serialisation of its weights."""
    light = copy_without(model, ("graph.initializer",))
    named_inputs = {i.name for i in light.graph.input}
    floats = {TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16}
    for tensor in model.graph.initializer:
        if tensor.data_type in floats and math.prod(tensor.dims) > limit:
            if tensor.name not in named_inputs:
                light.graph.input.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type,
                                                                            list(tensor.dims)))
        else:
            light.graph.initializer.append(tensor)
    return light
