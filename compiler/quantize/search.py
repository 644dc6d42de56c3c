"""Trying the candidate formats: quantize each from one calibration, score it on the validation split, time
them all against fp32 in one interleaved run (runtime/bench.py's harness), and, when no fast candidate keeps
the accuracy, keep the layers that cost the most in float, one at a time, until it does."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from .calibration import CalibrationSet
from .formats import Candidate, quantize_candidate
from .sensitivity import SAMPLES, LayerError, LayerSensitivity, isolated_sensitivity, layer_errors


@dataclass(frozen=True)
class Timing:
    """One model's latency at one batch size (ms): minimum and median over interleaved runs."""

    min_ms: float
    p50_ms: float


# measure(paths, batches, min_time_s) -> per path, {batch: Timing}; the first path is the fp32 baseline
Measure = Callable[[Sequence[Path], Sequence[int], float], list[dict[int, Timing]]]


def bench_measure(device: str = "cpu", threads: int | None = 2, warmup: int = 5) -> Measure:
    """The default measurement: dlc bench's interleaved harness (runtime.bench.bench) on the target device,
    the models sharing one thread pool in a timing process of their own."""

    def measure(paths: Sequence[Path], batches: Sequence[int], min_time_s: float) -> list[dict[int, Timing]]:
        from dlc.runtime.bench_isolated import bench_isolated

        # one thread pool shared by all models, in a process of its own: sessions with their own pools slow
        # each other down when interleaved (runtime/bench_isolated.py)
        result = bench_isolated(list(paths), list(batches), device=device, min_time_s=min_time_s, warmup=warmup,
                                threads=threads)
        index = {str(Path(p)): i for i, p in enumerate(paths)}
        out: list[dict[int, Timing]] = [{} for _ in paths]
        for row in result.rows:
            out[index[str(Path(row.path))]][row.batch] = Timing(row.min_ms, row.p50_ms)
        return out

    return measure


@dataclass
class CandidateResult:
    """A candidate's measured outcome. accuracy is a fraction (top-1 or mAP@0.5); drop is in points."""

    candidate: Candidate
    excluded: list[str] = field(default_factory=list)  # nodes kept float to meet the accuracy bound
    path: Path | None = None
    accuracy: float | None = None
    drop: float | None = None
    within: bool = False
    file_bytes: int = 0
    timings: dict[int, Timing] = field(default_factory=dict)
    base: dict[int, Timing] = field(default_factory=dict)  # fp32 in the same interleaved run
    ratios: dict[int, tuple[float, float]] = field(default_factory=dict)  # batch -> (min ratio, median ratio)
    timed: str = ""  # which run timed it: "screening" (all candidates, short), "final" (the finalists, full)
    error: str | None = None  # why this candidate could not be made or run

    @property
    def measured(self) -> bool:
        return bool(self.ratios)

    @property
    def score(self) -> float:
        """Speed-up by ratio of minima, geometric mean over the batch sizes measured (0 if unmeasured)."""
        if not self.ratios:
            return 0.0
        return math.exp(sum(math.log(r[0]) for r in self.ratios.values()) / len(self.ratios))

    @property
    def faster(self) -> bool:
        """Faster than fp32 at every batch size measured, by ratio of minimum latencies."""
        return bool(self.ratios) and all(r[0] > 1.0 for r in self.ratios.values())

    def to_dict(self) -> dict:
        return {
            **self.candidate.to_dict(), "excluded": list(self.excluded), "accuracy": self.accuracy,
            "drop_points": self.drop, "within_bound": self.within, "file_bytes": self.file_bytes,
            "latency": {str(b): {"min_ms": t.min_ms, "p50_ms": t.p50_ms,
                                 "min_ratio": self.ratios.get(b, (None, None))[0],
                                 "median_ratio": self.ratios.get(b, (None, None))[1]}
                        for b, t in sorted(self.timings.items())},
            "timed": self.timed, "speedup_score": self.score if self.ratios else None, "faster": self.faster,
            "error": self.error,
        }


@dataclass
class ExclusionStep:
    layer: LayerSensitivity  # the layer kept float in this step, with what quantizing it alone cost
    accuracy: float  # after keeping it (and the steps before) float
    drop: float

    def to_dict(self) -> dict:
        return {**self.layer.to_dict(), "accuracy_after": self.accuracy, "drop_after_points": self.drop}


class Search:
    """One run's shared state: the pre-processed model, the cached ranges, the validation scorer, timing."""

    def __init__(self, pre_path: Path, fp32_path: Path, cache_path: Path, method: str, cal: CalibrationSet,
                 evaluator, fp32_accuracy: float, max_drop: float, measure: Measure, batches: Sequence[int],
                 work_dir: Path, always_float: Sequence[str], finalize: Callable[[Path, CandidateResult], None],
                 say: Callable[[str], None]):
        self.pre_path, self.fp32_path, self.cache_path, self.method = pre_path, fp32_path, cache_path, method
        self.cal, self.evaluator, self.fp32_accuracy, self.max_drop = cal, evaluator, fp32_accuracy, max_drop
        self.measure, self.batches, self.work_dir = measure, tuple(batches), work_dir
        self.always_float = list(always_float)
        self.finalize, self.say = finalize, say
        self._count = 0
        self._pre_model: onnx.ModelProto | None = None
        self._sensitivity: dict[str, list[LayerSensitivity]] = {}

    @property
    def pre_model(self) -> onnx.ModelProto:
        if self._pre_model is None:
            self._pre_model = onnx.load(str(self.pre_path))
        return self._pre_model

    def _file(self, cand: Candidate) -> Path:
        self._count += 1
        return self.work_dir / f"{self._count:03d}_{cand.key}.onnx"

    def quantize(self, cand: Candidate, excluded: Sequence[str] = ()) -> Path:
        path = self._file(cand)
        quantize_candidate(self.pre_path, path, cand, self.cache_path, self.method,
                           [*self.always_float, *excluded])
        return path

    def score(self, result: CandidateResult) -> None:
        """Quantize, finalize and evaluate one candidate in place; a failure is recorded, not raised."""
        from dlc.runtime.session import Session

        from ..errors import DlcError

        try:
            result.path = self.quantize(result.candidate, result.excluded)
        except Exception as exc:  # onnxruntime's quantizer raises its own types for graphs it cannot handle
            text = str(exc).strip()
            result.error = f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"
            return
        self.finalize(result.path, result)
        try:
            evaluation = self.evaluator.evaluate(Session(result.path, device="cpu"))
        except DlcError as exc:  # e.g. onnxruntime cannot load or run this format
            result.error = exc.diagnostics[0].message
            return
        result.accuracy = evaluation.accuracy
        result.drop = 100.0 * (self.fp32_accuracy - evaluation.accuracy)
        result.within = result.drop <= self.max_drop + 1e-9
        result.file_bytes = result.path.stat().st_size

    def time(self, results: Sequence[CandidateResult], min_time_s: float, stage: str) -> dict[int, Timing]:
        """Time fp32 and every scored result in one interleaved run; fills timings, base and ratios. Returns
        fp32's timing."""
        runnable = [r for r in results if r.error is None and r.path is not None]
        timings = self.measure([self.fp32_path, *(r.path for r in runnable)], self.batches, min_time_s)
        base = dict(timings[0])
        for r, t in zip(runnable, timings[1:]):
            r.timings, r.base, r.timed = dict(t), base, stage
            r.ratios = {b: (base[b].min_ms / t[b].min_ms, base[b].p50_ms / t[b].p50_ms) for b in self.batches}
        return base

    def _twin(self, cand: Candidate) -> Candidate:
        """The QDQ form of a candidate (same types and settings): its tensors keep the float graph's names."""
        return Candidate("qdq", cand.activations, cand.weights, cand.per_channel, cand.reduce_range,
                         cand.symmetric_activations)

    def errors(self, cand: Candidate, excluded: Sequence[str]) -> list[LayerError]:
        """Per-layer errors of `cand` (through its QDQ twin) with `excluded` kept float."""
        path = self.quantize(self._twin(cand), excluded)
        return layer_errors(self.pre_model, onnx.load(str(path)), self.cal.images[:SAMPLES], self.cal.input_name,
                            self.cal.batch, skip={*self.always_float, *excluded})

    def sensitivity(self, cand: Candidate) -> list[LayerSensitivity]:
        """Every layer quantized alone in `cand`'s settings, worst cost at the outputs first (cached)."""
        twin = self._twin(cand)
        if twin.key not in self._sensitivity:
            def quantize_only(members: list[str]) -> onnx.ModelProto:
                path = self._file(twin)
                quantize_candidate(self.pre_path, path, twin, self.cache_path, self.method, self.always_float,
                                   only=members)
                model = onnx.load(str(path))
                path.unlink()
                return model

            self._sensitivity[twin.key] = isolated_sensitivity(
                self.pre_model, quantize_only, self.cal.images[:SAMPLES], self.cal.input_name, self.cal.batch,
                skip=set(self.always_float))
        return self._sensitivity[twin.key]

    def exclude_until_within(self, start: CandidateResult, max_layers: int) -> tuple[CandidateResult, list[ExclusionStep]]:
        """Greedy: keep float the layer whose quantization alone costs the outputs most, re-quantize and
        re-score, then the next, until the accuracy bound holds or `max_layers` are float. Returns the last
        result (scored, not timed) and the steps."""
        cand = start.candidate
        excluded: list[str] = list(start.excluded)
        steps: list[ExclusionStep] = []
        result = start
        ranked = [s for s in self.sensitivity(cand) if s.output_error > 0 and s.node not in excluded]
        for layer in ranked[:max_layers]:
            excluded += [m for m in layer.members if m not in excluded]
            result = CandidateResult(cand, list(excluded))
            self.score(result)
            if result.error is not None:
                break
            steps.append(ExclusionStep(layer, result.accuracy, result.drop))
            self.say(f"  kept {layer.node} ({layer.op}) float (alone it costs the outputs {layer.output_error:.3g} "
                     f"relative error): {_pct(result.accuracy)} ({0.0 - result.drop + 0.0:+.2f} points)")
            if result.within:
                break
        return result, steps


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f} %"


def describe_ranges(cache_path: Path) -> int:
    """How many tensors the cached calibration holds ranges for."""
    return len(json.loads(Path(cache_path).read_text()).get("data", {}))
