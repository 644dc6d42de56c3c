"""Proof for a rewrite: the model before and after, on the same random inputs, through onnxruntime with its own
graph optimizations disabled (so onnxruntime's rewrites cannot hide ours)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from ..errors import DlcError
from ..limits import check_input


@dataclass
class Verification:
    runs: int
    max_abs_diff: float
    max_rel_diff: float
    rtol: float
    atol: float

    def to_dict(self) -> dict:
        return self.__dict__.copy()


def _session(model: onnx.ModelProto | str | Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    source = str(model) if isinstance(model, (str, Path)) else model.SerializeToString()
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def random_feeds(session: ort.InferenceSession, rng: np.random.Generator, batch: int = 2) -> dict[str, np.ndarray]:
    feeds = {}
    for arg in session.get_inputs():
        shape = [d if isinstance(d, int) and d >= 0 else batch for d in arg.shape]  # a fixed 0 stays 0
        kind = arg.type[len("tensor("):-1]
        dtype = {"float": np.float32, "float16": np.float16, "double": np.float64, "int64": np.int64,
                 "int32": np.int32, "bool": np.bool_}.get(kind, np.float32)
        check_input(shape, 8, f"random input '{arg.name}'")
        if np.issubdtype(dtype, np.floating):
            feeds[arg.name] = rng.standard_normal(shape).astype(dtype)
        else:
            feeds[arg.name] = np.zeros(shape, dtype)
    return feeds


def verify(before: onnx.ModelProto | str | Path, after: onnx.ModelProto | str | Path, runs: int = 3,
           rtol: float = 1e-3, atol: float = 1e-4, seed: int = 0) -> Verification:
    """Raise DlcError if any output differs beyond tolerance on `runs` random inputs. Models may be given as
    files. The two sessions are never alive together: the reference outputs are computed first, so verifying a
    550 MB model holds its weights once, not twice."""
    a = _session(before)
    names = [o.name for o in a.get_outputs()]
    rng = np.random.default_rng(seed)
    feeds = [random_feeds(a, rng) for _ in range(runs)]
    expected = [a.run(None, f) for f in feeds]
    del a
    b = _session(after)
    if names != [o.name for o in b.get_outputs()]:
        raise DlcError(f"the optimized model's outputs {[o.name for o in b.get_outputs()]} differ from {names}")
    worst_abs = worst_rel = 0.0
    for feed, reference in zip(feeds, expected):
        for name, x, y in zip(names, reference, b.run(None, feed)):
            if x.shape != y.shape:
                raise DlcError(f"output '{name}' changed shape: {x.shape} -> {y.shape}")
            diff, scale, close = compare(x, y, rtol, atol)
            worst_abs = max(worst_abs, float(diff.max(initial=0)))
            worst_rel = max(worst_rel, float((diff / np.maximum(np.abs(x.astype(np.float64)), scale) if scale
                                              else diff).max(initial=0)))
            if not close:
                raise DlcError(f"the optimized model differs from the original on output '{name}': max abs diff "
                               f"{diff.max():.3g} (rtol {rtol} of the output's scale {scale:.3g}, atol {atol}); a "
                               "pass is wrong for this graph — rerun with --passes to find which")
    return Verification(runs, worst_abs, worst_rel, rtol, atol)


def compare(x: np.ndarray, y: np.ndarray, rtol: float, atol: float) -> tuple[np.ndarray, float, bool]:
    """Whether `y` matches the reference `x`: |y - x| <= atol + rtol * max(|x|, scale) elementwise, where scale
    is x's root mean square. Relative to the output's scale, not only to each element: a rewrite that reorders
    float32 sums moves every element by about eps times the magnitude of what was summed, so a near-zero logit
    among ones in the hundreds (VGG-19 with random weights) would fail a purely elementwise rtol. Equal values
    (infinities included) always match; a NaN on one side only never does."""
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        finite = x64[np.isfinite(x64)]
        scale = float(np.sqrt(np.mean(np.square(finite)))) if finite.size else 0.0
        diff = np.abs(x64 - y64)
        bound = atol + rtol * np.maximum(np.abs(x64), scale)
        same = (x64 == y64) | (np.isnan(x64) & np.isnan(y64))
        close = bool(np.all(same | (diff <= bound)))
    return np.where(same, 0.0, diff), scale, close
