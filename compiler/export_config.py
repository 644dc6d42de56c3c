"""The `export:` section (and `dlc export`'s flags), checked value by value into a typed ExportConfig.

Structure (unknown keys, types) is checked in sections.py; this adds choices, ranges and the target runtime.
Every problem comes back with its YAML line, so a file with three mistakes gets three messages at once.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import Diagnostic, DlcError, did_you_mean
from .yaml_loader import LDict

PRECISIONS = ("fp32", "fp16", "int8")
DYNAMIC_AXES = ("batch", "height", "width")
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
DEVICES = ("cpu", "cuda", "tensorrt")
RUNTIMES = ("onnxruntime",)


@dataclass(frozen=True)
class TargetSpec:
    """The runtime an artifact is made for, as the user wrote it; compiler/targets.py resolves it."""

    runtime: str = "onnxruntime"
    version: str | None = None  # None: the installed runtime
    device: str = "cpu"

    def __str__(self) -> str:
        return f"{self.runtime}@{self.version or 'installed'}:{self.device}"


@dataclass(frozen=True)
class Calibration:
    samples: int = 256
    method: str = "minmax"
    percentile: float = 99.999


@dataclass(frozen=True)
class ExportConfig:
    opset: int | None = None  # explicit opset; None: the target's highest, else DEFAULT_OPSET
    target: TargetSpec | None = None
    dynamic: tuple[str, ...] = ("batch",)
    precision: str = "fp32"
    calibration: Calibration = field(default_factory=Calibration)
    max_accuracy_drop: float = 1.0  # points: accuracy %, or mAP@0.5 x 100 for detectors
    keep_io_types: bool = True  # fp16: inputs and outputs stay float32
    filename: str = "model.onnx"
    force: bool = False  # int8: write the artifact even when it is not faster than fp32
    embed_nms: bool = False  # detectors: NMS inside the graph (compiler/embed_nms.py)
    max_detections: int | None = None  # embed_nms: the cap per image (default: the detect layer's)
    layout: str = "padded"  # embed_nms: padded | efficient_nms
    embed_argmax: str | None = None  # segmentation: ArgMax in the graph, output dtype uint8 | int64

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["dynamic"] = list(self.dynamic)
        return d


def parse_target(value: Any) -> TargetSpec:
    """`onnxruntime@1.14:cpu`, `1.14`, `onnxruntime@1.14` or a mapping {runtime, version, device}.
    Raises ValueError with the reason (the caller adds file and line)."""
    if isinstance(value, str):
        text, device = value, "cpu"
        if ":" in text:
            text, device = text.rsplit(":", 1)
        runtime, _, version = text.rpartition("@") if "@" in text else ("onnxruntime", "", text)
        value = {"runtime": runtime or "onnxruntime", "version": version or None, "device": device}
    if not isinstance(value, dict):
        raise ValueError(f"'target' must be a mapping {{runtime, version, device}} or 'onnxruntime@1.14:cpu', "
                         f"got {value!r}")
    for key in value:
        if key not in ("runtime", "version", "device"):
            hint = did_you_mean(key, ("runtime", "version", "device")) or "known keys: runtime, version, device"
            raise ValueError(f"unknown key '{key}' in 'export.target' ({hint})")
    runtime = value.get("runtime", "onnxruntime")
    if runtime not in RUNTIMES:
        raise ValueError(f"target runtime {runtime!r} is not known; dlc targets: {', '.join(RUNTIMES)}")
    version = value.get("version")
    if isinstance(version, (int, float)) and not isinstance(version, bool):
        # YAML reads 1.10 as the number 1.1: a version must be written as a string to mean what it says.
        raise ValueError(f"write the target version as a string, e.g. version: \"{version}\" "
                         f"(YAML reads an unquoted 1.10 as the number 1.1)")
    if version is not None and not isinstance(version, str):
        raise ValueError(f"target version must be a string such as \"1.14\", got {version!r}")
    device = value.get("device", "cpu")
    if device not in DEVICES:
        hint = did_you_mean(str(device), DEVICES)
        raise ValueError(f"target device must be one of {', '.join(DEVICES)}, got {device!r}"
                         + (f" ({hint})" if hint else ""))
    spec = TargetSpec(runtime, version or None, device)
    if spec.version is not None:
        from .targets import resolve_target

        try:
            resolve_target(spec.runtime, spec.version, spec.device)
        except DlcError as exc:
            raise ValueError(str(exc)) from None
    return spec


def parse_dynamic(value: Any) -> tuple[str, ...]:
    """`[batch, height, width]`, `batch,height` (the CLI's form), `[]` for a fully static file."""
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"'dynamic' must be a list of axis names from {', '.join(DYNAMIC_AXES)}, got {value!r}")
    for v in value:
        if v not in DYNAMIC_AXES:
            hint = did_you_mean(v, DYNAMIC_AXES) or f"axes: {', '.join(DYNAMIC_AXES)}"
            raise ValueError(f"unknown dynamic axis '{v}' ({hint})")
    if ("height" in value) != ("width" in value):
        raise ValueError("'dynamic' takes height and width together (a file whose height alone varies is rare "
                         "and most runtimes optimise it as fully dynamic anyway)")
    return tuple(a for a in DYNAMIC_AXES if a in value)  # canonical order, no duplicates


def parse_export(section: Any, file: str = "<export>") -> tuple[ExportConfig, list[Diagnostic]]:
    """The typed settings and every problem found (empty when the section is good)."""
    if section is None:
        return ExportConfig(), []
    diags: list[Diagnostic] = []

    def line(key: str) -> int | None:
        return section.line_of(key) if isinstance(section, LDict) and key in section else None

    def bad(key: str, message: str, hint: str | None = None) -> None:
        diags.append(Diagnostic(message, file=file, line=line(key), hint=hint))

    kwargs: dict[str, Any] = {}
    if "opset" in section:
        from .export_onnx import MAX_OPSET, MIN_OPSET

        opset = section["opset"]
        if not isinstance(opset, int) or isinstance(opset, bool):
            pass  # a wrong type is reported by the structural check (sections.py)
        elif not MIN_OPSET <= opset <= MAX_OPSET:
            bad("opset", f"'export.opset' must be an integer from {MIN_OPSET} to {MAX_OPSET} (the opsets dlc "
                         f"writes with the installed onnx), got {opset!r}")
        else:
            kwargs["opset"] = opset
    if section.get("target") is not None:
        try:
            kwargs["target"] = parse_target(section["target"])
        except ValueError as exc:
            bad("target", str(exc))
    if "opset" in kwargs and "target" in kwargs and kwargs["target"].version is not None:
        from .targets import resolve_target

        t = kwargs["target"]
        top = resolve_target(t.runtime, t.version, t.device).opset
        if kwargs["opset"] > top:
            bad("opset", f"'export.opset' {kwargs['opset']} is newer than onnxruntime {t.version} loads "
                         f"(its highest is opset {top})", hint=f"use opset {top} or lower, or drop opset")
    if "dynamic" in section and "dynamic_batch" in section:
        bad("dynamic_batch", "give 'dynamic' or the older 'dynamic_batch', not both",
            hint="dynamic_batch: false is dynamic: []")
    elif "dynamic" in section:
        try:
            kwargs["dynamic"] = parse_dynamic(section["dynamic"])
        except ValueError as exc:
            bad("dynamic", str(exc))
    elif section.get("dynamic_batch") is False:
        kwargs["dynamic"] = ()
    precision = section.get("precision", "fp32")
    if not isinstance(precision, str):
        pass
    elif precision not in PRECISIONS:
        bad("precision", f"'export.precision' must be one of {', '.join(PRECISIONS)}, got {precision!r}",
            hint=did_you_mean(str(precision), PRECISIONS))
    else:
        kwargs["precision"] = precision
    calibration = section.get("calibration")
    if calibration is not None:
        if precision != "int8":
            bad("calibration", "'export.calibration' applies to precision: int8 only",
                hint="add precision: int8, or remove calibration")
        if isinstance(calibration, dict):
            cal, more = _calibration(calibration, file)
            diags += more
            kwargs["calibration"] = cal
    if "max_accuracy_drop" in section:
        drop = section["max_accuracy_drop"]
        if not isinstance(drop, (int, float)) or isinstance(drop, bool):
            pass
        elif not 0 <= drop <= 100:
            bad("max_accuracy_drop", f"'export.max_accuracy_drop' is in points (0 to 100) of validation accuracy "
                                     f"(or mAP@0.5 x 100), got {drop!r}")
        else:
            kwargs["max_accuracy_drop"] = float(drop)
    for key in ("keep_io_types", "force", "embed_nms"):
        if key in section and isinstance(section[key], bool):
            kwargs[key] = section[key]
    if "max_detections" in section:
        cap = section["max_detections"]
        if isinstance(cap, int) and not isinstance(cap, bool):
            if 1 <= cap <= 100_000:
                kwargs["max_detections"] = cap
            else:
                bad("max_detections", f"'export.max_detections' must be from 1 to 100000, got {cap!r}")
    if "layout" in section and isinstance(section["layout"], str):
        from .embed_nms import LAYOUTS

        if section["layout"] in LAYOUTS:
            kwargs["layout"] = section["layout"]
        else:
            bad("layout", f"'export.layout' must be one of {', '.join(LAYOUTS)}, got {section['layout']!r}",
                hint=did_you_mean(section["layout"], LAYOUTS))
    if "embed_argmax" in section:
        value = section["embed_argmax"]
        if value is True:
            kwargs["embed_argmax"] = "uint8"
        elif value in ("uint8", "int64"):
            kwargs["embed_argmax"] = value
        elif value is not False:
            bad("embed_argmax", f"'export.embed_argmax' is true (a uint8 class map), uint8, int64 or false, "
                                f"got {value!r}")
    for key in ("max_detections", "layout"):
        if key in section and not section.get("embed_nms"):
            bad(key, f"'export.{key}' applies with embed_nms: true only", hint="add embed_nms: true")
    filename = section.get("filename", "model.onnx")
    from pathlib import Path

    if not isinstance(filename, str):
        pass
    elif Path(filename).name != filename or filename in (".", "..") or not filename.endswith(".onnx"):
        bad("filename", "'export.filename' must be a plain file name ending in .onnx (it is written inside the "
                        f"output folder), got {filename!r}")
    else:
        kwargs["filename"] = filename
    return ExportConfig(**kwargs), diags


def _calibration(section: dict, file: str) -> tuple[Calibration, list[Diagnostic]]:
    diags, kwargs = [], {}

    def line(key: str) -> int | None:
        return section.line_of(key) if isinstance(section, LDict) and key in section else None

    samples = section.get("samples", 256)
    if not isinstance(samples, int) or isinstance(samples, bool):
        pass
    elif samples < 1:
        diags.append(Diagnostic(f"'export.calibration.samples' must be a positive integer, got {samples!r}",
                                file=file, line=line("samples")))
    else:
        kwargs["samples"] = samples
    method = section.get("method", "minmax")
    if not isinstance(method, str):
        pass
    elif method not in CALIBRATION_METHODS:
        diags.append(Diagnostic(f"'export.calibration.method' must be one of {', '.join(CALIBRATION_METHODS)}, "
                                f"got {method!r}", file=file, line=line("method"),
                                hint=did_you_mean(str(method), CALIBRATION_METHODS)))
    else:
        kwargs["method"] = method
    pct = section.get("percentile", 99.999)
    if not isinstance(pct, (int, float)) or isinstance(pct, bool):
        pass
    elif not 50 < pct <= 100:
        diags.append(Diagnostic(f"'export.calibration.percentile' must be in (50, 100], got {pct!r}",
                                file=file, line=line("percentile")))
    else:
        kwargs["percentile"] = float(pct)
    return Calibration(**kwargs), diags


def export_config(section: Any, file: str = "<export>") -> ExportConfig:
    """parse_export for callers that want an exception: one DlcError listing every problem."""
    config, diags = parse_export(section, file)
    if diags:
        raise DlcError(diags)
    return config
