"""Proof for a rewrite: the model before and after, on the same random inputs, through onnxruntime with its own
graph optimizations disabled (so onnxruntime's rewrites cannot hide ours)."""

from __future__ import annotations

from dataclasses import dataclass

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


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


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


def verify(before: onnx.ModelProto, after: onnx.ModelProto, runs: int = 3, rtol: float = 1e-3, atol: float = 1e-4,
           seed: int = 0) -> Verification:
    """Raise DlcError if any output differs beyond tolerance on `runs` random inputs."""
    a, b = _session(before), _session(after)
    names = [o.name for o in a.get_outputs()]
    if names != [o.name for o in b.get_outputs()]:
        raise DlcError(f"the optimized model's outputs {[o.name for o in b.get_outputs()]} differ from {names}")
    rng = np.random.default_rng(seed)
    worst_abs = worst_rel = 0.0
    for _ in range(runs):
        feeds = random_feeds(a, rng)
        for name, x, y in zip(names, a.run(None, feeds), b.run(None, feeds)):
            if x.shape != y.shape:
                raise DlcError(f"output '{name}' changed shape: {x.shape} -> {y.shape}")
            diff = np.abs(x.astype(np.float64) - y.astype(np.float64))
            worst_abs = max(worst_abs, float(diff.max(initial=0)))
            worst_rel = max(worst_rel, float((diff / (np.abs(x) + 1e-12)).max(initial=0)))
            if not np.allclose(y, x, rtol=rtol, atol=atol):
                raise DlcError(f"the optimized model differs from the original on output '{name}': max abs diff "
                               f"{diff.max():.3g} (rtol {rtol}, atol {atol}); a pass is wrong for this graph — "
                               "rerun with --passes to find which")
    return Verification(runs, worst_abs, worst_rel, rtol, atol)
