"""ArgMax inside a segmentation model (`export: {embed_argmax: true}`): the file's output becomes the class map
itself, N×H×W of uint8 (or int64), so a device needs no post-processing and moves 1 byte per pixel instead of
4·C.

The single N×C×H×W output feeds ArgMax(axis=1, keepdims=0) (int64, the lowest index on ties, as numpy's
argmax) and, for uint8, a Cast; the output keeps its name, the metadata records `embedded_argmax` and the new
output convention. Applied after the precision: ArgMax of fp16 or dequantized scores works the same.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

from .errors import Diagnostic, DlcError

DTYPES = {"uint8": TensorProto.UINT8, "int64": TensorProto.INT64}


def embed_argmax(model: onnx.ModelProto, dtype: str = "uint8", file: str = "<model>") -> onnx.ModelProto:
    from .metadata import read_metadata, value_dims, write_metadata

    meta = read_metadata(model, file) or {}
    if meta.get("task") != "segmentation" or len(model.graph.output) != 1:
        raise DlcError(Diagnostic("embed_argmax applies to segmentation models (one N×classes×H×W output of "
                                  "per-pixel class scores)", file=file, hint="remove embed_argmax, or export a "
                                  "segmentation model"))
    if dtype not in DTYPES:
        raise DlcError(Diagnostic(f"embed_argmax: dtype must be one of {', '.join(DTYPES)}, got {dtype!r}", file=file))
    classes = meta.get("classes") or []
    if dtype == "uint8" and len(classes) > 256:
        raise DlcError(Diagnostic(f"embed_argmax: {len(classes)} classes do not fit in uint8", file=file,
                                  hint="use embed_argmax: int64"))
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    old = g.output[0]
    dims = value_dims(old) or ["batch", "classes", "height", "width"]
    if len(dims) != 4:
        raise DlcError(Diagnostic(f"embed_argmax: the output '{old.name}' has shape {dims}, not N×C×H×W", file=file))
    name = old.name
    scores = f"{name}_scores"
    for node in g.node:  # the scores get a new name; the class map takes the output's
        node.output[:] = [scores if o == name else o for o in node.output]
        node.input[:] = [scores if i == name else i for i in node.input]
    argmax = f"{name}_argmax" if dtype == "uint8" else name
    g.node.append(helper.make_node("ArgMax", [scores], [argmax], axis=1, keepdims=0, name=f"{name}/argmax"))
    if dtype == "uint8":
        g.node.append(helper.make_node("Cast", [argmax], [name], to=TensorProto.UINT8, name=f"{name}/cast"))
    shape = [dims[0], dims[2], dims[3]]
    del g.output[:]
    g.output.append(helper.make_tensor_value_info(name, DTYPES[dtype], shape))
    if meta:
        meta["embedded_argmax"] = {"dtype": dtype, "scores": scores}
        meta["output_convention"] = [{
            "name": name, "shape": ["batch", *shape[1:]], "axes": ["batch", "height", "width"], "dtype": dtype,
            "kind": "class_map", "description": "the class index of every input pixel (ArgMax over the class "
                                                "scores inside the model)"}]
        meta["outputs"] = {name: list(shape[1:])}
        write_metadata(out, meta)
    onnx.checker.check_model(out)
    return out
