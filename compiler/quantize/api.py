"""`quantize_int8`: static, calibrated INT8 of a float ONNX model, with the format chosen by measurement.

    quant_pre_process (shape inference, BN folding) -> calibrate once on training images (ranges cached) ->
    quantize every candidate format from those ranges, the post-processing tail kept float -> score each on the
    validation split -> time fp32 and all candidates interleaved, briefly, then fp32 and the fastest few again
    at full length -> keep the fastest that is faster than fp32 at every batch size and within
    max_accuracy_drop (speeds within SPEED_TIE of each other tie: then the more accurate, then the smaller file)
    -> otherwise keep the costliest layers float, one at a time, until one is -> otherwise refuse
    (QuantRefused, a DlcError), unless force (then a slower artifact is written, and the report says so).

`dlc quantize` (compiler/cli.py) and `export: {precision: int8}` in `dlc compile` both call quantize_int8.
"""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import onnx

from ..errors import Diagnostic, DlcError
from .calibration import METHODS, calibrate, calibration_set, data_spec
from .dynamic import dynamic_policy
from .formats import FORMATS, candidates, cpu_int8_dot_product, quiet_ort
from .precheck import float_tail, require_float
from .search import CandidateResult, ExclusionStep, Measure, Search, Timing, bench_measure


@dataclass(frozen=True)
class QuantOptions:
    """How to quantize and how to choose. max_accuracy_drop is in points: accuracy %, or mAP@0.5 × 100."""

    samples: int = 256
    method: str = "minmax"  # minmax | entropy | percentile
    percentile: float = 99.999
    max_accuracy_drop: float = 1.0
    force: bool = False  # write the artifact even when no INT8 model is faster than fp32
    formats: tuple[str, ...] | None = None  # restrict the search (qoperator, qdq, dynamic); None: all the target runs
    device: str = "cpu"  # the target's execution provider, where candidates are timed
    target: str | None = None  # the target runtime as text, for the report
    threads: int | None = 2  # onnxruntime intra-op threads while timing (edge CPUs have few cores)
    batches: tuple[int, ...] = (1, 32)
    min_time_s: float = 1.0  # measured seconds per model and batch in the final interleaved timing
    finalists: int = 3  # candidates timed again, at full min_time_s, after a short screening of all
    warmup: int = 5
    max_excluded: int = 6  # layers kept float at most, per candidate tried
    exclusion_tries: int = 2  # fastest candidates the layer exclusion is tried on

    @classmethod
    def from_export(cls, config, **overrides) -> QuantOptions:
        """From the parsed `export:` section (compiler/export_config.ExportConfig)."""
        target = getattr(config, "target", None)
        cal = config.calibration
        base = cls(samples=cal.samples, method=cal.method, percentile=cal.percentile,
                   max_accuracy_drop=config.max_accuracy_drop, force=config.force,
                   device=target.device if target is not None else "cpu",
                   target=str(target) if target is not None else None)
        return replace(base, **overrides)

    def check(self) -> None:
        problems = []
        if not isinstance(self.samples, int) or self.samples < 1:
            problems.append(f"calibration samples must be a positive integer, got {self.samples!r}")
        if self.method not in METHODS:
            problems.append(f"calibration method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if not 50 < self.percentile <= 100:
            problems.append(f"calibration percentile must be in (50, 100], got {self.percentile!r}")
        if not 0 <= self.max_accuracy_drop <= 100:
            problems.append(f"max accuracy drop is in points from 0 to 100, got {self.max_accuracy_drop!r}")
        if self.formats is not None:
            bad = [f for f in self.formats if f not in FORMATS]
            if bad or not self.formats:
                problems.append(f"formats must be among {', '.join(FORMATS)}, got {', '.join(self.formats) or 'none'}")
        if self.device not in ("cpu", "cuda", "tensorrt"):
            problems.append(f"target device must be cpu, cuda or tensorrt, got {self.device!r}")
        if not self.batches or any(b < 1 for b in self.batches):
            problems.append(f"batch sizes must be positive, got {list(self.batches)}")
        if self.threads is not None and self.threads < 1:
            problems.append(f"threads must be >= 1, got {self.threads}")
        if problems:
            raise DlcError(problems)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["batches"] = list(self.batches)
        d["formats"] = list(self.formats) if self.formats else None
        return d


@dataclass
class QuantResult:
    """What quantize_int8 found. `model` is the chosen INT8 model (None when it refused); scores are fractions
    (top-1 accuracy, or mAP@0.5 for detectors), drops are points."""

    model: onnx.ModelProto | None
    chosen: CandidateResult | None
    candidates: list[CandidateResult]
    metric: str
    fp32_accuracy: float
    max_accuracy_drop: float
    float_tail: list[str]
    exclusion: list[ExclusionStep]
    layer_errors: list[dict]  # the chosen model's worst layers (added error first)
    fp32_timing: dict[int, Timing]
    fp32_bytes: int
    calibration: dict[str, Any]
    options: QuantOptions
    notes: list[str] = field(default_factory=list)
    forced: bool = False  # written with force although not faster than fp32
    refused: str | None = None  # why nothing was written
    dynamic: dict[str, Any] | None = None  # dynamic.DynamicPolicy: whether dynamic INT8 was offered, and why
    seconds: dict[str, float] = field(default_factory=dict)  # time spent per phase

    @property
    def int8_accuracy(self) -> float | None:
        return self.chosen.accuracy if self.chosen else None

    @property
    def int8_bytes(self) -> int | None:
        return len(self.model.SerializeToString()) if self.model is not None else None

    @property
    def excluded(self) -> list[str]:
        """Layers kept float to meet the accuracy bound (besides the post-processing tail)."""
        return list(self.chosen.excluded) if self.chosen else []

    def latency(self) -> list[dict[str, Any]]:
        """fp32 vs the chosen model per batch size: minima, medians and their ratios (fp32 / int8)."""
        if self.chosen is None:
            return []
        rows = []
        base = self.chosen.base or self.fp32_timing
        for b, t in sorted(self.chosen.timings.items()):
            f = base[b]
            rows.append({"batch": b, "fp32_min_ms": f.min_ms, "int8_min_ms": t.min_ms, "min_ratio": f.min_ms / t.min_ms,
                         "fp32_p50_ms": f.p50_ms, "int8_p50_ms": t.p50_ms, "median_ratio": f.p50_ms / t.p50_ms})
        return rows

    def to_dict(self) -> dict[str, Any]:
        int8_bytes = self.int8_bytes
        return {
            "chosen": self.chosen.to_dict() if self.chosen else None,
            "written": self.model is not None, "forced": self.forced, "refused": self.refused,
            "metric": self.metric,
            "accuracy": {"fp32": self.fp32_accuracy, "int8": self.int8_accuracy,
                         "drop_points": self.chosen.drop if self.chosen else None,
                         "max_drop_points": self.max_accuracy_drop},
            "size": {"fp32_bytes": self.fp32_bytes, "int8_bytes": int8_bytes,
                     "ratio": self.fp32_bytes / int8_bytes if int8_bytes else None},
            "latency": self.latency(),
            "excluded_layers": self.excluded,
            "exclusion_steps": [s.to_dict() for s in self.exclusion],
            "float_tail": self.float_tail,
            "layer_errors": self.layer_errors,
            "candidates": [c.to_dict() for c in self.candidates],
            "fp32_latency": {str(b): asdict(t) for b, t in sorted(self.fp32_timing.items())},
            "calibration": self.calibration,
            "dynamic": self.dynamic,
            "seconds": self.seconds,
            "options": self.options.to_dict(),
            "notes": self.notes,
        }


class QuantRefused(DlcError):
    """No INT8 model was written; `result` holds the table that led there."""

    def __init__(self, message: str, result: QuantResult):
        super().__init__(message)
        self.result = result


def _require_dynamic_batch(model: onnx.ModelProto, where: str) -> None:
    """Scoring runs the validation split in batches and timing measures batch 1 and 32: a fixed batch cannot."""
    inits = {t.name for t in model.graph.initializer}
    for inp in model.graph.input:
        dims = inp.type.tensor_type.shape.dim if inp.type.tensor_type.HasField("shape") else []
        if inp.name not in inits and dims and dims[0].HasField("dim_value") and dims[0].dim_value > 0:
            raise DlcError(Diagnostic(f"input '{inp.name}' has a fixed batch size of {dims[0].dim_value}: INT8 "
                                      "quantization scores and times the model at other batch sizes; export it "
                                      "with a dynamic batch axis (export: {dynamic: [batch]})", file=where))


def _name_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Unique names for unnamed nodes: quantize_static excludes nodes by name, reports name layers."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    seen = {n.name for n in model.graph.node if n.name}
    for i, node in enumerate(model.graph.node):
        if not node.name:
            name = f"{node.op_type}_{i}"
            while name in seen:
                name += "_"
            node.name = name
            seen.add(name)
    return model


def preprocess(model: onnx.ModelProto, out_path: Path, where: str) -> onnx.ModelProto:
    """onnxruntime's quant_pre_process: shape inference and its basic graph optimizations (Conv+BN folding,
    constant folding), the documented first step before quantize_static. Symbolic shape inference (for
    transformers) runs when sympy is installed; convolutional nets need only onnx's own."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        import sympy  # noqa: F401

        symbolic = True
    except ImportError:
        symbolic = False
    src = out_path.with_name("named.onnx")
    onnx.save(_name_nodes(model), str(src))
    try:
        with quiet_ort():
            quant_pre_process(str(src), str(out_path), skip_symbolic_shape=not symbolic)
    except Exception as exc:
        raise DlcError(Diagnostic(f"onnxruntime's quantization pre-processing failed: {type(exc).__name__}: "
                                  f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}", file=where,
                                  hint="check that the model runs in onnxruntime (dlc bench)")) from None
    return onnx.load(str(out_path))


def _strip_unused_domains(model: onnx.ModelProto) -> None:
    """onnxruntime's optimizer stamps every domain it knows (ai.onnx.ml 5, training, ...) into the opset
    imports; an older runtime may refuse versions it does not know, so keep only domains the nodes use."""
    used = {n.domain or "" for n in model.graph.node} | {""}
    keep = [o for o in model.opset_import if (o.domain or "") in used]
    del model.opset_import[:]
    model.opset_import.extend(keep)


def _compact_names(model: onnx.ModelProto, float_model: onnx.ModelProto) -> None:
    """Short names for what the quantizer added. Its tensor names repeat the layer's in full five times over
    ('ConvBnFusion_W_stage1_0/conv1.weight_DequantizeLinear_Output', ...) and made a tenth of a QDQ ResNet-20
    file. Names the float model has (layers, their outputs, graph inputs and outputs) are kept; added nodes
    are left unnamed, added tensors become q0, q1, ..."""
    keep = {t for n in float_model.graph.node for t in (*n.input, *n.output)}
    keep |= {t.name for t in float_model.graph.initializer} | {i.name for i in model.graph.input}
    keep |= {o.name for o in model.graph.output}
    layer_names = {n.name for n in float_model.graph.node}
    renamed: dict[str, str] = {}

    def short(name: str) -> str:
        if not name or name in keep:
            return name
        if name not in renamed:
            new = f"q{len(renamed)}"
            while new in keep:
                new += "_"
            renamed[name] = new
        return renamed[name]

    g = model.graph
    for t in g.initializer:
        t.name = short(t.name)
    for node in g.node:
        inputs, outputs = [short(x) for x in node.input], [short(x) for x in node.output]
        del node.input[:], node.output[:]
        node.input.extend(inputs)
        node.output.extend(outputs)
        if node.name not in layer_names:
            node.name = ""
    del g.value_info[:]  # optional shape hints under the old names; onnxruntime infers them again


def _finalizer(options: QuantOptions, calibration: dict[str, Any], tail: list[str], float_model: onnx.ModelProto):
    """Rewrites each candidate file as it would be shipped (so sizes and timings are of the real artifact):
    unused opset domains dropped, the quantizer's names shortened, and dlc's metadata (if any) finalized
    (compiler/metadata.py) with precision int8 and how it was made."""
    from onnxruntime import __version__ as ort_version

    def finalize(path: Path, result: CandidateResult) -> None:
        from ..metadata import finalize_metadata

        model = onnx.load(str(path))
        _strip_unused_domains(model)
        _compact_names(model, float_model)
        quantization = {
            **{k: v for k, v in result.candidate.to_dict().items() if k != "key"},
            "calibration": {"method": options.method, "samples": calibration.get("samples"), "split": "train",
                            **({"percentile": options.percentile} if options.method == "percentile" else {})},
            "excluded_layers": list(result.excluded), "float_tail": list(tail),
            "tool": f"onnxruntime.quantization {ort_version}",
        }
        finalize_metadata(model, precision="int8", quantization=quantization)  # no-op for a foreign file
        onnx.save(model, str(path))

    return finalize


def quantize_int8(model: onnx.ModelProto, data, options: QuantOptions | None = None, *, source: str = "<model>",
                  console=None, measure: Measure | None = None) -> QuantResult:
    """Static INT8 of a float model, format chosen by measurement (see the module notes).

    data: a DataSpec or a YAML file with a `data:` section (calibration reads its training split, scoring its
    validation split). measure: replaces the timing (tests inject one); the default times on options.device
    with runtime/bench.py's interleaved harness. Raises DlcError for bad input and QuantRefused (a DlcError
    carrying the result) when nothing may be written."""
    from dlc.runtime.evaluate import Evaluator
    from dlc.runtime.session import Session

    options = options or QuantOptions()
    options.check()
    require_float(model, source)
    _require_dynamic_batch(model, source)
    spec = data_spec(data, source)

    def say(text: str) -> None:
        if console is not None:
            console.print(text, highlight=False)

    measure = measure or bench_measure(options.device, options.threads, options.warmup)
    notes: list[str] = []
    seconds: dict[str, float] = {}
    clock = [time.perf_counter()]

    def lap(phase: str) -> None:
        now = time.perf_counter()
        seconds[phase] = seconds.get(phase, 0.0) + now - clock[0]
        clock[0] = now

    with tempfile.TemporaryDirectory(prefix="dlc-quant-") as tmp:
        work = Path(tmp)
        fp32_path = work / "fp32.onnx"
        fp32_bytes = model.SerializeToString()
        fp32_path.write_bytes(fp32_bytes)
        pre_path = work / "pre.onnx"
        pre_model = preprocess(model, pre_path, source)
        lap("preprocess")
        cal = calibration_set(model, spec, options.samples)
        notes += cal.notes
        say(f"calibrating on {len(cal.images)} training images ({cal.dataset}, {options.method})")
        cache = work / "ranges.json"
        calibrate(pre_path, cal, options.method, options.percentile, cache, work)
        lap("calibrate")
        calibration = {**cal.describe(), "method": options.method, "seconds": seconds["calibrate"]}
        if options.method == "percentile":
            calibration["percentile"] = options.percentile
        tail = float_tail(pre_model)
        policy = dynamic_policy(pre_model)
        int8_dot = cpu_int8_dot_product() if options.device == "cpu" else None
        cands, more = candidates(options.device, options.formats, int8_dot, policy)
        notes += more
        if options.target:
            import onnxruntime

            notes.append(f"target {options.target}: candidates timed on the installed onnxruntime "
                         f"{onnxruntime.__version__} ({options.device})")
        evaluator = Evaluator(spec)
        fp32_eval = evaluator.evaluate(Session(fp32_path, device="cpu"))
        notes += fp32_eval.notes
        metric = fp32_eval.metric
        search = Search(pre_path, fp32_path, cache, options.method, cal, evaluator, fp32_eval.accuracy,
                        options.max_accuracy_drop, measure, options.batches, work, tail,
                        _finalizer(options, calibration, tail, pre_model), say)
        say(f"fp32: {metric} {100 * fp32_eval.accuracy:.2f} {'%' if metric == 'accuracy' else '(×100)'} on "
            f"{fp32_eval.total:,} validation {'boxes' if fp32_eval.task == 'detection' else 'images'}")
        rows = [CandidateResult(c) for c in cands]
        for r in rows:
            search.score(r)
            say(f"  {r.candidate.label}: " + (f"failed ({r.error})" if r.error else
                                             f"{metric} {100 * r.accuracy:.2f} ({0.0 - r.drop + 0.0:+.2f} points)"))
        lap("quantize_and_score")
        if all(r.error for r in rows):
            raise DlcError(Diagnostic("no INT8 candidate could be made: "
                                      + "; ".join(f"{r.candidate.label}: {r.error}" for r in rows), file=source))
        say(f"timing fp32 and {sum(r.error is None for r in rows)} candidates, interleaved, batch "
            f"{', '.join(map(str, options.batches))} ({options.device}, {options.threads or 'default'} threads)")
        base = search.time(rows, options.min_time_s * SCREEN_FRACTION, "screening")
        finalists = _finalists(rows, options.finalists)
        if finalists:
            say(f"timing fp32 and the {len(finalists)} fastest candidates again, {options.min_time_s:g} s each")
            base = search.time(finalists, options.min_time_s, "final")
        lap("time")
        result = QuantResult(None, None, rows, metric, fp32_eval.accuracy, options.max_accuracy_drop, tail, [], [],
                             base, len(fp32_bytes), calibration, options, notes, dynamic=policy.to_dict(),
                             seconds=seconds)
        try:
            _choose(search, result)
        finally:
            lap("choose")
        chosen = result.chosen
        if chosen.candidate.format != "dynamic":
            try:
                result.layer_errors = [e.to_dict() for e in search.errors(chosen.candidate, chosen.excluded)[:10]]
            except Exception as exc:  # the report's extra detail must not sink a good artifact
                notes.append(f"per-layer errors not computed ({type(exc).__name__})")
            lap("layer_errors")
        result.model = onnx.load(str(chosen.path))
    for r in result.candidates:  # their files went with the work folder
        r.path = None
    return result


SCREEN_FRACTION = 0.25  # the screening run of all candidates gets this share of min_time_s


def _finalists(rows: list[CandidateResult], n: int) -> list[CandidateResult]:
    """The n fastest (by the screening) of the candidates within the accuracy bound, else of all."""
    timed = sorted((r for r in rows if r.measured), key=lambda r: r.score, reverse=True)
    within = [r for r in timed if r.within]
    return (within or timed)[:n] if n > 0 else []


def _choose(search: Search, result: QuantResult) -> None:
    """Pick the artifact (see the module notes) or raise QuantRefused."""
    options = result.options
    scored = sorted((r for r in result.candidates if r.error is None and r.measured), key=lambda r: r.score,
                    reverse=True)
    fast = [r for r in scored if r.faster]
    # finalists were timed again at full length: compare them among themselves, not with screening numbers
    pick = _best([r for r in fast if r.within and r.timed == "final"]) or _best([r for r in fast if r.within])
    if pick is None and not fast and options.force:  # nothing is faster: force takes the fastest accurate one
        pick = _best([r for r in scored if r.within])
    tried: list[tuple[CandidateResult, list[ExclusionStep]]] = []
    if pick is None:
        pool = fast if fast else (scored if options.force else [])
        for start in [r for r in pool if r.candidate.format != "dynamic"][:options.exclusion_tries]:
            search.say(f"{start.candidate.label} is {start.drop:.2f} points below fp32 (bound "
                       f"{options.max_accuracy_drop:g}): keeping its costliest layers float")
            new, steps = search.exclude_until_within(start, options.max_excluded)
            if new is start:
                continue
            tried.append((new, steps))
            result.candidates.append(new)  # the table shows what keeping layers float gave
            if new.error is None and new.within:
                search.time([new], options.min_time_s, "final")
                if new.faster or options.force:
                    pick, result.exclusion = new, steps
                    break
                result.notes.append(f"{start.candidate.label} meets the bound with {len(steps)} layers float but "
                                    f"is then no faster than fp32 ({_ratios(new)})")
    if pick is None and options.force:
        pick = _best([r for r in scored if r.within])
    if pick is None:
        if tried:  # the report shows how far keeping layers float got
            result.exclusion = min(tried, key=lambda t: t[0].drop if t[0].drop is not None else math.inf)[1]
        result.refused = _refusal(result, scored, fast, tried)
        raise QuantRefused(result.refused, result)
    if pick not in result.candidates:
        result.candidates.append(pick)
    if not pick.faster:
        result.forced = True
        result.notes.append(f"written because of force: {pick.candidate.label} is not faster than fp32 "
                            f"({_ratios(pick)})")
    result.chosen = pick


SPEED_TIE = 0.05  # speed scores this close to the fastest are a tie: timing on a shared CPU is not finer


def _best(rows: list[CandidateResult]) -> CandidateResult | None:
    """The fastest by score; among those within SPEED_TIE of it, the most accurate, then the smallest file."""
    if not rows:
        return None
    top = max(r.score for r in rows)
    ties = [r for r in rows if r.score >= top * (1 - SPEED_TIE)]
    return min(ties, key=lambda r: (-round(r.accuracy or 0.0, 6), r.file_bytes, -r.score))


def _ratios(r: CandidateResult) -> str:
    return ", ".join(f"batch {b}: {mn:.2f}× by minimum, {md:.2f}× by median" for b, (mn, md) in sorted(r.ratios.items()))


def _refusal(result: QuantResult, scored: list[CandidateResult], fast: list[CandidateResult],
             tried: list[tuple[CandidateResult, list[ExclusionStep]]]) -> str:
    bound = result.max_accuracy_drop
    if not scored:
        return "no INT8 candidate could be timed"
    if not fast:
        best = scored[0]
        return (f"no INT8 candidate is faster than fp32 on this target ({result.options.device}, "
                f"{result.options.threads or 'default'} threads): the fastest, {best.candidate.label}, runs at "
                f"{_ratios(best)}; nothing written (force writes it anyway: --force, or export.force: true)")
    slow = next(((r, steps) for r, steps in tried if r.within), None)
    if slow is not None:
        return (f"{slow[0].candidate.label} stays within {bound:g} points of fp32 only with {len(slow[1])} layers "
                f"kept float, and is then no faster than fp32 ({_ratios(slow[0])}); nothing written (force "
                "writes it anyway: --force, or export.force: true)")
    best = min(((r, steps) for r, steps in tried if r.drop is not None), key=lambda t: t[0].drop, default=None)
    extra = (f"; with {len(best[1])} layers kept float the closest lost {best[0].drop:.2f} points"
             if best is not None else "")
    return (f"no INT8 candidate faster than fp32 stays within {bound:g} points of fp32's "
            f"{result.metric} ({100 * result.fp32_accuracy:.2f} %): the fastest, {fast[0].candidate.label}, "
            f"loses {fast[0].drop:.2f} points{extra}; raise max_accuracy_drop, calibrate with more samples or "
            "another method (entropy, percentile)")


def write_artifact(result: QuantResult, out_path: str | Path) -> tuple[Path, Path]:
    """The chosen model at out_path and the report as JSON beside it (same stem, .json), both atomic."""
    from ..atomic import write_bytes, write_json

    if result.model is None:
        raise DlcError(f"nothing to write: {result.refused or 'no INT8 model was chosen'}")
    out_path = Path(out_path)
    report_path = out_path.with_suffix(".json")
    write_bytes(out_path, result.model.SerializeToString())
    write_json(report_path, {"output": str(out_path), **result.to_dict()})
    return out_path, report_path


def quantize_file(in_path: str | Path, out_path: str | Path, data, options: QuantOptions | None = None,
                  console=None, measure: Measure | None = None) -> QuantResult:
    """`dlc quantize`: read in_path, quantize_int8, write out_path and its .json report."""
    from ..onnx_io import load_onnx

    started = time.perf_counter()
    in_path, out_path = Path(in_path), Path(out_path)
    if out_path.suffix != ".onnx":
        raise DlcError(f"-o must name an .onnx file, got '{out_path}'")
    if out_path.resolve() == in_path.resolve():
        raise DlcError(f"-o {out_path} is the input file: write the INT8 model to a new file")
    model = load_onnx(in_path)
    result = quantize_int8(model, data, options, source=str(in_path), console=console, measure=measure)
    result.seconds["total"] = time.perf_counter() - started
    write_artifact(result, out_path)
    return result
