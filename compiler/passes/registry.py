"""The pass registry: each pass is `fn(OnnxGraph) -> int` (how many rewrites it made), registered by name and
run in the order asked; each run reports nodes and parameters before and after."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import onnx

from ..errors import DlcError, did_you_mean
from .graph import OnnxGraph, outer_reads

PASSES: dict[str, Callable[[OnnxGraph], int]] = {}
DEFAULT_PASSES = ["constant_folding", "eliminate", "fuse_pad", "fuse_bias", "fold_bn", "fold_scale", "cse",
                  "eliminate", "dce"]


def register_pass(name: str):
    def wrap(fn: Callable[[OnnxGraph], int]) -> Callable[[OnnxGraph], int]:
        if name in PASSES:
            raise AssertionError(f"pass '{name}' registered twice")
        PASSES[name] = fn
        fn.pass_name = name
        return fn
    return wrap


@dataclass
class PassReport:
    name: str
    rewrites: int
    nodes_before: int
    nodes_after: int
    params_before: int
    params_after: int
    ms: float

    def to_dict(self) -> dict:
        return asdict(self)

    def line(self) -> str:
        return (f"{self.name:17} {self.rewrites:4d} rewrites  nodes {self.nodes_before} -> {self.nodes_after}  "
                f"params {self.params_before:,} -> {self.params_after:,}  ({self.ms:.1f} ms)")


def check_names(names: list[str]) -> None:
    unknown = [n for n in names if n not in PASSES]
    if unknown:
        hints = [f"'{n}'" + (f" ({did_you_mean(n, PASSES)})" if did_you_mean(n, PASSES) else "") for n in unknown]
        raise DlcError(f"unknown pass {', '.join(hints)}; passes: {', '.join(sorted(PASSES))}")


def optimize(model: onnx.ModelProto, passes: list[str] | None = None) -> tuple[onnx.ModelProto, list[PassReport]]:
    """Run the passes in order; returns the new model and one report per pass."""
    names = DEFAULT_PASSES if passes is None else passes
    check_names(names)
    g = OnnxGraph(model)
    del model  # where the caller holds no other reference, the input's weights are freed here (see OnnxGraph)
    reports = []
    for name in names:
        before_nodes, before_params = len(g.nodes), g.param_count()
        start = time.perf_counter()
        count = PASSES[name](g)
        g.topo_sort()
        used = {i for n in g.nodes for i in (*n.input, *outer_reads(n))} | g.output_names
        g.inits = {k: v for k, v in g.inits.items() if k in used}
        reports.append(PassReport(name, count, before_nodes, len(g.nodes), before_params, g.param_count(),
                                  (time.perf_counter() - start) * 1e3))
    return g.to_model(), reports
