"""Graph optimization passes on ONNX graphs: small named rewrites in one registry, each proven by running the
graph before and after on random inputs through onnxruntime.

Why ONNX-level and not on dlc's IR: the passes must work on ONNX files from elsewhere, whose ops (Reshape,
Transpose, MatMul, Constant subgraphs...) dlc's layer IR does not model, and on dlc's own exports alike; this is
how onnxoptimizer and OnnxSlim work too. The IR stays the home of training-time transformations.
"""

from . import rewrites  # noqa: F401  (registers every pass)
from .graph import OnnxGraph
from .registry import DEFAULT_PASSES, PASSES, PassReport, optimize, register_pass
from .verify import verify

__all__ = ["DEFAULT_PASSES", "PASSES", "OnnxGraph", "PassReport", "optimize", "register_pass", "verify"]
