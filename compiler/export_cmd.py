"""`dlc export`: a YAML model with its weights, or any ONNX file, -> an ONNX artifact for a target runtime.

The YAML path rebuilds the graph and writes it at the chosen opset (every op in that opset's form) and checks the
file against dlc's own backend; the ONNX path converts with onnx's version converter and checks the result against
the source through onnxruntime. Both then apply the precision (compiler/artifact.py) and load the file in the
installed onnxruntime.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any

from .artifact import Plan, compare, convert_onnx, finish, load_check, plan_opset, scaled_error, write_model
from .errors import Diagnostic, DlcError
from .export_config import ExportConfig, parse_dynamic, parse_target


def overrides(target: str | None = None, dynamic: str | None = None, precision: str | None = None,
              samples: int | None = None, method: str | None = None, max_accuracy_drop: float | None = None,
              force: bool = False, keep_io_types: bool | None = None, embed_nms: bool = False,
              max_detections: int | None = None, layout: str | None = None) -> dict[str, Any]:
    """ExportConfig fields from the command's flags (only those given), checked like the YAML's values."""
    from .export_config import CALIBRATION_METHODS, PRECISIONS

    out: dict[str, Any] = {}
    try:
        if target is not None:
            out["target"] = parse_target(target)
        if dynamic is not None:
            out["dynamic"] = parse_dynamic(dynamic)
    except ValueError as exc:
        raise DlcError(str(exc)) from None
    if precision is not None:
        if precision not in PRECISIONS:
            raise DlcError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        out["precision"] = precision
    if samples is not None or method is not None:
        if method is not None and method not in CALIBRATION_METHODS:
            raise DlcError(f"--method must be one of {', '.join(CALIBRATION_METHODS)}, got {method!r}")
        out["calibration"] = ("samples", samples), ("method", method)
    if max_accuracy_drop is not None:
        out["max_accuracy_drop"] = float(max_accuracy_drop)
    if force:
        out["force"] = True
    if keep_io_types is not None:
        out["keep_io_types"] = keep_io_types
    if embed_nms:
        out["embed_nms"] = True
    if max_detections is not None or layout is not None:
        from .embed_nms import LAYOUTS

        if not embed_nms:
            raise DlcError("--max-detections and --layout apply with --embed-nms")
        if layout is not None and layout not in LAYOUTS:
            raise DlcError(f"--layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
        if max_detections is not None:
            out["max_detections"] = max_detections
        if layout is not None:
            out["layout"] = layout
    return out


def _apply(cfg: ExportConfig, changes: dict[str, Any]) -> ExportConfig:
    changes = dict(changes)
    cal = changes.pop("calibration", None)
    if cal is not None:
        changes["calibration"] = dataclasses.replace(cfg.calibration, **{k: v for k, v in cal if v is not None})
    return dataclasses.replace(cfg, **changes)


def export_yaml(yaml_path: Path, output: Path, weights: Path | None, opset: int | None, changes: dict[str, Any],
                data: Path | None = None, console=None) -> dict[str, Any]:
    from .export_onnx import check, to_onnx
    from .frontend import load_model
    from .pipeline import artifact_metadata

    loaded = load_model(yaml_path)
    cfg = _apply(loaded.export, changes)
    plan = plan_opset(cfg, opset, str(yaml_path))
    classes = None
    if weights is not None:
        from .train.checkpoint import load_params_into, read_checkpoint
        from .train.trainer import restore_anchors

        params, _, _, info = read_checkpoint(weights)
        load_params_into(loaded.graph, params, str(weights))
        restore_anchors(loaded.graph, info)
        classes = info.get("classes")
        source_weights = str(weights)
    elif loaded.graph.meta.get("weights"):
        source_weights = loaded.graph.meta["weights"].get("file")
    else:
        raise DlcError(Diagnostic("no weights to export: give --weights CKPT (e.g. build/<name>/"
                                  "checkpoint.safetensors from dlc train), or set model.weights in the YAML",
                                  file=str(yaml_path),
                                  hint="`dlc compile` trains and exports in one step"))
    model = to_onnx(loaded.graph, metadata=artifact_metadata(loaded, classes), opset=plan.opset,
                    dynamic=cfg.dynamic)
    check(model)
    backend = _backend_check(model, loaded.graph)
    has_data = data if data is not None else (yaml_path if "data" in loaded.spec.sections else None)
    finished = finish(model, cfg, plan, data=has_data, source=str(yaml_path), console=console)
    provider = load_check(finished.model, str(yaml_path))
    size = write_model(finished.model, output)
    return _report(yaml_path, output, plan, finished, provider, size,
                   {"weights": source_weights, "backend_check": backend, "dynamic": list(cfg.dynamic)})


def export_onnx_file(path: Path, output: Path, opset: int | None, changes: dict[str, Any],
                     data: Path | None = None, console=None) -> dict[str, Any]:
    from .onnx_io import load_onnx

    if "dynamic" in changes:
        raise DlcError(Diagnostic("--dynamic applies to a YAML model: an ONNX file keeps its own axes",
                                  file=str(path), hint="export from the YAML, or leave --dynamic out"))
    if output.resolve() == path.resolve():
        raise DlcError(f"-o {output} is the input file: write the exported model to a new file")
    model = load_onnx(path)
    cfg = _apply(ExportConfig(), changes)
    if cfg.target is None and opset is None:
        raise DlcError(Diagnostic("say what to export for: --target onnxruntime@1.14 or --opset N",
                                  file=str(path)))
    plan = plan_opset(cfg, opset, str(path), convert=True)
    converted, conversion = convert_onnx(model, plan, str(path))
    finished = finish(converted, cfg, plan, data=data, source=str(path), console=console)
    provider = load_check(finished.model, str(path))
    size = write_model(finished.model, output)
    return _report(path, output, plan, finished, provider, size, {"conversion": conversion})


def _backend_check(model, graph, batch: int = 2, rtol: float = 1e-4) -> dict[str, Any]:
    """The written file against dlc's backend on random inputs (inference mode), output by output."""
    from dlc.runtime import Session

    from .train.executor import Executor

    session = Session(model.SerializeToString(), device="cpu")
    feeds = session.random_inputs(batch=batch)
    got = session.run(feeds)
    ref = Executor(graph).forward({k: v for k, v in feeds.items()}, train=False)
    worst = {}
    for name, value in got.items():
        worst[name] = scaled_error(ref[name], value)
        if not worst[name] <= rtol:
            raise DlcError(f"the exported output '{name}' differs from dlc's backend by {worst[name]:.3g} of its "
                           f"scale: a dlc bug at opset {model.opset_import[0].version}, please report it")
    return {"batch": batch, "rtol": rtol, "max_scaled_error": worst}


def _report(source: Path, output: Path, plan: Plan, finished, provider: str, size: int,
            extra: dict[str, Any]) -> dict[str, Any]:
    data = output.read_bytes()
    return {"input": str(source), "output": str(output), **plan.to_dict(), "ir_version": finished.model.ir_version,
            "bytes": size, "sha256": hashlib.sha256(data).hexdigest(), "loaded_on": provider,
            **finished.report(), **extra}


__all__ = ["compare", "export_onnx_file", "export_yaml", "overrides"]
