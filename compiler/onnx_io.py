"""Reading ONNX files safely: a clear error for a missing or corrupt file, and external data only from inside
the model's own folder (a tensor's `location` may not be absolute or climb out with '..')."""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import external_data_helper

from .errors import Diagnostic, DlcError


def load_onnx(path: str | Path) -> onnx.ModelProto:
    path = Path(path)
    if not path.is_file():
        raise DlcError(Diagnostic("ONNX file not found", file=str(path), hint="check the path"))
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError and friends
        raise DlcError(Diagnostic(f"not a readable ONNX model ({type(exc).__name__}: {exc})", file=str(path),
                                  hint="is it a complete .onnx file?")) from None
    base = path.parent.resolve()
    for tensor in external_data_helper._get_all_tensors(model):
        if not external_data_helper.uses_external_data(tensor):
            continue
        info = external_data_helper.ExternalDataInfo(tensor)
        target = (base / info.location).resolve()
        if Path(info.location).is_absolute() or base not in target.parents:
            raise DlcError(Diagnostic(f"tensor '{tensor.name}' keeps its data at '{info.location}', outside the "
                                      "model's folder; refusing to read it", file=str(path)))
        if not target.is_file():
            raise DlcError(Diagnostic(f"external data file '{info.location}' of tensor '{tensor.name}' is missing",
                                      file=str(path)))
    try:
        external_data_helper.load_external_data_for_model(model, str(base))
    except Exception as exc:
        raise DlcError(Diagnostic(f"cannot read the model's external data ({exc})", file=str(path))) from None
    if not model.graph.node:
        raise DlcError(Diagnostic("the ONNX model has no nodes", file=str(path)))
    return model
