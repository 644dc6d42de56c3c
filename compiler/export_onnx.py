"""ONNX export: Graph -> onnx.ModelProto (float32, NCHW, dynamic batch axis) with dlc's metadata.

dlc writes opsets 11 to MAX_OPSET, opset 17 by default (onnxruntime 1.12 and newer, TensorRT 8.6+, load it).
Each op's `to_onnx` writes the form of the opset being written (`b.opset`): Softmax over channels moves them
last before opset 13 (where `axis` flattened the input to 2-D), Resize gets an empty roi tensor before 13,
HardSwish is HardSigmoid + Mul before 14. MAX_OPSET is the newest opset at which every op dlc writes passes onnx's
full checker and runs in onnxruntime 1.31 equal to the backend (tests/test_opsets.py), capped at what the
installed onnx knows.

The IR version is set on purpose, not left to the installed onnx's default (onnx 1.23 stamps IR 14, which
onnxruntime 1.31 refuses): it is the lowest IR version that may carry the opset, from
compiler/targets.py:ir_for_opset (onnx.helper.VERSION_TABLE), so that the widest range of runtimes loads the file.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from . import __version__
from .atomic import write_bytes
from .dynamic_shapes import check_dynamic
from .errors import DlcError
from .graph import Graph, Node
from .ops import REGISTRY
from .targets import ir_for_opset

DEFAULT_OPSET = 17
MIN_OPSET = 11  # Resize (with roi, scales and sizes), Clip and Pad with inputs, Range: every form dlc writes
# The newest opset at which every op dlc writes was checked (onnx's full checker, onnxruntime 1.31 runs it and
# equals the backend: tests/test_opsets.py), and never above what the installed onnx knows. onnx 1.23 writes up to
# 28; onnxruntime 1.31 refuses to load 27 and 28 (not official released opsets, it says), whatever the ops.
TESTED_MAX_OPSET = 26
MAX_OPSET = min(TESTED_MAX_OPSET, onnx.defs.onnx_opset_version())
METADATA_KEY = "dlc"


class OnnxBuilder:
    """Collects nodes and initializers while each op's `to_onnx` describes itself."""

    def __init__(self, opset: int = DEFAULT_OPSET) -> None:
        self.opset = opset  # the opset being written: an op may export differently below the one it needs
        self.dynamic: tuple[str, ...] = ("batch",)  # the file's dynamic axes (batch, height, width)
        self.shapes: dict[str, tuple[int, ...]] = {}  # per-sample shape of each graph value
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._names: set[str] = set()

    def fresh(self, base: str) -> str:
        name, i = base, 1
        while name in self._names:
            name, i = f"{base}_{i}", i + 1
        self._names.add(name)
        return name

    def initializer(self, base: str, array: np.ndarray) -> str:
        name = self.fresh(base)
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def weight_inputs(self, node: Node) -> list[str]:
        """The node's data input followed by its weight and, when it has one, its bias, as initializers."""
        names = [node.inputs[0], self.initializer(f"{node.name}.weight", node.params["weight"])]
        if "bias" in node.params:
            names.append(self.initializer(f"{node.name}.bias", node.params["bias"]))
        return names

    def node(self, op_type: str, inputs: list[str], outputs: list[str], name: str, **attrs: Any) -> None:
        self.nodes.append(helper.make_node(op_type, inputs, outputs, name=name, **attrs))

    @property
    def dynamic_hw(self) -> bool:
        """Height or width varies: an op must not bake a size-derived constant (grids, 'same' pads)."""
        return "height" in self.dynamic or "width" in self.dynamic


def to_onnx(graph: Graph, opset: int = DEFAULT_OPSET, dynamic_batch: bool = True,
            metadata: dict[str, Any] | None = None, dynamic: Sequence[str] | None = None) -> onnx.ModelProto:
    """`dynamic`: the symbolic axes, a subset of batch, height, width (default: batch; `dynamic_batch=False` is
    the older spelling of no dynamic axis). Dynamic height/width is refused, naming the layer, for a net that
    fixes its input size (compiler/dynamic_shapes.py)."""
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise DlcError(f"opset {opset} is not supported: dlc exports opsets {MIN_OPSET} to {MAX_OPSET}")
    axes = tuple(dynamic) if dynamic is not None else (("batch",) if dynamic_batch else ())
    dims = check_dynamic(graph, axes)  # per-sample dims of inputs and outputs, symbolic where they vary
    b = OnnxBuilder(opset)
    b.dynamic = axes
    b.shapes = dict(graph.shapes)
    for v in (*graph.input_names, *graph.shapes):
        b._names.add(v)
    for node in graph.nodes():
        REGISTRY[node.op].to_onnx(node, b)
    batch = "batch" if "batch" in axes else 1

    def value_info(name: str) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, [batch, *dims[name]])

    onnx_graph = helper.make_graph(
        b.nodes, graph.name, [value_info(v) for v in graph.input_names], [value_info(v) for v in graph.outputs],
        initializer=b.initializers,
    )
    model = helper.make_model(
        onnx_graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_for_opset(opset),
        producer_name="dlc", producer_version=__version__,
        doc_string=f"{graph.name}, compiled by dlc {__version__}",
    )
    if metadata is not None:
        from .metadata import write_metadata

        write_metadata(model, metadata)  # strict JSON under METADATA_KEY
    return model


def check(model: onnx.ModelProto) -> None:
    """onnx's full checker (with shape inference); a failure here is a bug in dlc, not the user's."""
    onnx.checker.check_model(model, full_check=True)


def save(model: onnx.ModelProto, path) -> None:
    write_bytes(path, model.SerializeToString())


def read_metadata(model: onnx.ModelProto, file: str | None = None) -> dict[str, Any] | None:
    """dlc's metadata (JSON only; garbage is a DlcError naming `file`): see compiler/metadata.py."""
    from .metadata import read_metadata as read

    return read(model, file)
