"""From a float ONNX model to the artifact the `export:` section asks for: opset and IR for the target, precision
(fp32, fp16, int8), the finished metadata, a load check on the installed onnxruntime, and a numerical proof.

Shared by `dlc compile` (YAML -> trained graph -> ONNX) and `dlc export` (YAML + weights, or any ONNX file).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from .errors import Diagnostic, DlcError
from .export_config import ExportConfig
from .metadata import read_metadata
from .targets import ResolvedTarget, installed_runtime_note, ir_for_opset, resolve_target


@dataclass
class Plan:
    """The opset and IR version to write, and why."""

    opset: int
    ir_version: int
    target: ResolvedTarget | None
    reason: str  # "export.opset", "--opset", "target onnxruntime 1.14 ...", "default"

    def to_dict(self) -> dict[str, Any]:
        t = self.target
        return {"opset": self.opset, "ir_version": self.ir_version, "reason": self.reason,
                "target": None if t is None else {"runtime": t.runtime, "version": t.version, "device": t.device,
                                                  "max_opset": t.opset, "max_ir_version": t.ir_version,
                                                  "from_table": t.from_table}}


def plan_opset(cfg: ExportConfig, opset_override: int | None = None, file: str = "<export>",
               convert: bool = False) -> Plan:
    """The opset: --opset, else export.opset, else the target's highest (capped at what dlc writes), else the
    default. An opset above what the target loads is refused. `convert`: for an ONNX file through onnx's version
    converter, whose range is 11 to the newest opset the installed onnx knows."""
    from .export_onnx import DEFAULT_OPSET, MAX_OPSET, MIN_OPSET

    if convert:
        MIN_OPSET, MAX_OPSET = 11, onnx.defs.onnx_opset_version()  # noqa: N806 - the same bounds, widened

    target = None
    if cfg.target is not None:
        t = cfg.target
        target = resolve_target(t.runtime, t.version, t.device, max_writable=MAX_OPSET)
    if opset_override is not None:
        opset, reason = opset_override, "--opset"
    elif cfg.opset is not None:
        opset, reason = cfg.opset, "export.opset"
    elif target is not None:
        opset, reason = target.opset, f"the highest opset {target.describe()} loads"
    else:
        opset, reason = DEFAULT_OPSET, f"dlc's default (opset {DEFAULT_OPSET} loads in onnxruntime 1.12 and newer)"
    if not MIN_OPSET <= opset <= MAX_OPSET:
        what = "onnx's version converter writes" if convert else "dlc writes"
        raise DlcError(Diagnostic(f"opset {opset} is out of range: {what} opsets {MIN_OPSET} to {MAX_OPSET}",
                                  file=file))
    if target is not None and opset > target.opset:
        raise DlcError(Diagnostic(f"opset {opset} is newer than {target.describe()} loads",
                                  file=file, hint=f"use opset {target.opset} or lower, or a newer target"))
    ir = ir_for_opset(opset)
    if target is not None and ir > target.ir_version:  # pragma: no cover - the table's rows hold their opsets
        raise DlcError(f"IR version {ir} of opset {opset} is newer than {target.describe()} loads")
    return Plan(opset, ir, target, reason)


@dataclass
class Finished:
    model: onnx.ModelProto
    precision: str
    notes: list[str] = field(default_factory=list)
    precision_check: dict[str, Any] | None = None
    quantization: Any = None  # quantize.QuantResult for int8

    def report(self) -> dict[str, Any]:
        q = self.quantization
        return {"precision": self.precision, "precision_check": self.precision_check, "notes": self.notes,
                "quantization": None if q is None else q.to_dict()}


def finish(model: onnx.ModelProto, cfg: ExportConfig, plan: Plan, *, data=None, source: str = "<model>",
           console=None, passes=None) -> Finished:
    """Apply the precision to a float model of plan.opset, stamp the metadata and keep within the target.
    `data`: what int8 calibrates and scores on (a YAML path with a data: section, or a DataSpec)."""
    from .metadata import finalize_metadata

    notes: list[str] = []
    if plan.target is not None:
        note = installed_runtime_note(plan.target)
        if note:
            notes.append(note)
    float_model = model
    quant = None
    if cfg.precision == "fp16":
        from .fp16 import fp16_cpu_warning, to_fp16

        model = to_fp16(model, keep_io_types=cfg.keep_io_types, file=source)
        device = plan.target.device if plan.target is not None else "cpu"
        warning = fp16_cpu_warning(device)
        if warning:
            notes.append(warning)
    elif cfg.precision == "int8":
        from .quantize import QuantOptions, quantize_int8

        if data is None:
            raise DlcError(Diagnostic("precision int8 needs calibration data: a data: section in the YAML, or "
                                      "--data model.yaml", file=source))
        options = QuantOptions.from_export(cfg)
        quant = quantize_int8(model, data, options, source=source, console=console)
        model = quant.model
        notes += quant.notes
    check = None
    if cfg.precision == "fp16" and cfg.keep_io_types:
        check = compare(float_model, model, runs=2, rtol=1e-2, what="the fp16 model against fp32")
    if cfg.embed_nms:  # after the precision: the NMS tail stays float32 and is never quantized
        model = embed_detector_nms(model, cfg, source)
        notes.append(f"NMS is inside the model ({cfg.layout} layout, at most "
                     f"{read_metadata(model)['embedded_nms']['max_detections']} detections per image)")
    if cfg.embed_argmax:  # after the precision: ArgMax of fp16 or dequantized scores is the same class map
        from .embed_argmax import embed_argmax

        model = embed_argmax(model, cfg.embed_argmax, source)
        notes.append(f"ArgMax is inside the model: its output is the {cfg.embed_argmax} class map")
    keep_within(model, plan, source)
    finalize_metadata(model, passes=passes, precision=cfg.precision, file=source)
    return Finished(model, cfg.precision, notes, check, quant)


def embed_detector_nms(model: onnx.ModelProto, cfg: ExportConfig, source: str) -> onnx.ModelProto:
    """NMS inside a detector, with the detect layer's post-processing settings from the metadata (conf and IoU
    thresholds, class agnostic, the detection cap unless export.max_detections sets it)."""
    from .embed_nms import NmsSettings, embed_nms

    meta = read_metadata(model, source) or {}
    post = meta.get("postprocess")
    if meta.get("task") != "detection" or not isinstance(post, dict):
        raise DlcError(Diagnostic("embed_nms applies to detectors (a model with a detect layer)", file=source,
                                  hint="remove embed_nms, or export a detector"))
    settings = NmsSettings(max_detections=cfg.max_detections or int(post.get("max_detections", 100)),
                           iou_threshold=float(post.get("iou_threshold", 0.45)),
                           conf_threshold=float(post.get("conf_threshold", 0.25)),
                           class_agnostic=bool(post.get("class_agnostic", False)), layout=cfg.layout)
    return embed_nms(model, settings, file=source)


def keep_within(model: onnx.ModelProto, plan: Plan, source: str) -> None:
    """A converter (onnxruntime's quantizer, the fp16 converter) may stamp the installed onnx's newest IR version
    or raise the opset: put the IR back to the lowest that holds the opset, and refuse what the target cannot
    load."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), plan.opset)
    model.ir_version = ir_for_opset(opset)  # converters keep the source's or stamp onnx's newest
    if plan.target is not None and (opset > plan.target.opset or model.ir_version > plan.target.ir_version):
        raise DlcError(Diagnostic(f"the converted model has opset {opset} and IR version {model.ir_version}, "
                                  f"newer than {plan.target.describe()} loads", file=source,
                                  hint="choose a newer target, or fp32"))


def scaled_error(expected: np.ndarray, got: np.ndarray) -> float:
    """Largest difference relative to the output's scale (its largest magnitude), so an output of logits in the
    tens and one of probabilities near zero are judged alike."""
    expected = expected.astype(np.float64)
    scale = float(np.abs(expected).max(initial=0.0)) or 1.0
    return float(np.abs(got.astype(np.float64) - expected).max(initial=0.0)) / scale


def compare(before: onnx.ModelProto, after: onnx.ModelProto, runs: int = 3, rtol: float = 1e-4,
            what: str = "the converted model", seed: int = 0) -> dict[str, Any]:
    """Run both models on the same random inputs in onnxruntime; DlcError when an output's scaled error exceeds
    rtol. Returns the worst error per output."""
    from .passes.verify import _session

    a, b = _session(before), _session(after)
    names = [o.name for o in a.get_outputs()]
    if names != [o.name for o in b.get_outputs()]:
        raise DlcError(f"{what} has outputs {[o.name for o in b.get_outputs()]}, the source {names}")
    rng = np.random.default_rng(seed)
    worst = dict.fromkeys(names, 0.0)
    for _ in range(runs):
        feeds = _feeds(a, before, rng)
        for name, x, y in zip(names, a.run(None, feeds), b.run(None, feeds)):
            if x.shape != y.shape:
                raise DlcError(f"{what}: output '{name}' has shape {y.shape}, the source {x.shape}")
            worst[name] = max(worst[name], scaled_error(x, y))
    bad = {k: v for k, v in worst.items() if not v <= rtol}
    if bad:
        raise DlcError(f"{what} differs from the source: " + ", ".join(
            f"output '{k}' by {v:.3g} of its scale" for k, v in bad.items()) + f" (allowed {rtol:g})")
    return {"runs": runs, "rtol": rtol, "max_scaled_error": worst}


def _feeds(session, model: onnx.ModelProto, rng: np.random.Generator, batch: int = 2) -> dict[str, np.ndarray]:
    """Random float inputs of batch 2; a symbolic height or width takes dlc's metadata input size (else 32)."""
    from .metadata import read_metadata

    try:
        meta = read_metadata(model) or {}
    except DlcError:
        meta = {}
    shape_hint = list((meta.get("input") or {}).get("shape") or [])
    feeds = {}
    for arg in session.get_inputs():
        shape = []
        for i, d in enumerate(arg.shape):
            if isinstance(d, int) and d > 0:
                shape.append(d)
            elif i == 0:
                shape.append(batch)
            else:
                shape.append(int(shape_hint[i - 1]) if i - 1 < len(shape_hint) else 32)
        kind = arg.type[len("tensor("):-1]
        if kind in ("float", "float16", "double"):
            dtype = {"float": np.float32, "float16": np.float16, "double": np.float64}[kind]
            feeds[arg.name] = rng.standard_normal(shape).astype(dtype)
        else:
            feeds[arg.name] = np.zeros(shape, {"int64": np.int64, "int32": np.int32, "bool": np.bool_}.get(kind,
                                                                                                       np.int64))
    return feeds


def convert_onnx(model: onnx.ModelProto, plan: Plan, source: str) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """An ONNX file from elsewhere at plan.opset: onnx's version converter when the opset differs, the IR version
    lowered to what the opset needs, then proven equal to the source on random inputs through onnxruntime."""
    from onnx import version_converter

    current = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if current is None:
        raise DlcError(Diagnostic("the model imports no default-domain (ai.onnx) opset", file=source))
    info: dict[str, Any] = {"source_opset": current, "source_ir_version": int(model.ir_version)}
    converted = model
    if current != plan.opset:
        try:
            converted = version_converter.convert_version(model, plan.opset)
            info["converter"] = f"onnx.version_converter {current} -> {plan.opset}"
        except Exception as exc:  # the C++ converter raises RuntimeError/ValidationError with the adapter's reason
            reason = _first_line(exc)
            if plan.opset > current:
                raise DlcError(Diagnostic(f"onnx's version converter cannot take this model from opset {current} "
                                          f"to {plan.opset}: {reason}", file=source,
                                          hint="pick an opset closer to the source's")) from None
            # onnx has few down-adapters (none for Relu 14 -> 13, whose change was a new type). Restamp the opset
            # instead: the full checker below refuses any node whose form the older opset lacks, and the numeric
            # check refuses any whose meaning changed.
            converted = _restamp(model, plan.opset)
            info["converter"] = (f"opset restamped {current} -> {plan.opset} (onnx's converter has no down-adapter: "
                                 f"{reason[:160]}); every node checked valid at opset {plan.opset} and the outputs "
                                 f"equal the source's")
    keep_within(converted, plan, source)
    try:
        onnx.checker.check_model(converted, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise DlcError(Diagnostic(f"the model cannot be written at opset {plan.opset}: onnx's checker says "
                                  f"{_first_line(exc)}", file=source,
                                  hint=f"use opset {current} or nearer to it (the source's ops need it)")) from None
    info["verification"] = compare(model, converted, runs=3, rtol=1e-4,
                                   what=f"the opset-{plan.opset} model")
    return converted, info


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]


def _restamp(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    out = onnx.ModelProto.FromString(model.SerializeToString())
    for imp in out.opset_import:
        if imp.domain in ("", "ai.onnx"):
            imp.version = opset
    del out.graph.value_info[:]  # inferred at the source opset
    return out


def load_check(model: onnx.ModelProto, source: str) -> str:
    """Load the finished file in the installed onnxruntime (CPU): the provider's name."""
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        raise DlcError(Diagnostic(f"the installed onnxruntime {ort.__version__} cannot load the artifact: "
                                  f"{str(exc).strip().splitlines()[0][:300]}", file=source)) from None
    return session.get_providers()[0]


def write_model(model: onnx.ModelProto, path: Path) -> int:
    from .atomic import write_bytes

    data = model.SerializeToString()
    write_bytes(Path(path), data)
    return len(data)
