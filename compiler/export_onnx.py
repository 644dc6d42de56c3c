"""ONNX export: Graph -> onnx.ModelProto (float32, NCHW, dynamic batch axis) with dlc's metadata.

The opset and IR version are set on purpose, not left to the installed onnx's defaults: onnx 1.23 writes IR
version 14, which onnxruntime 1.31 refuses. Opset 17 with IR version 8 loads in every onnxruntime since 1.13
and in TensorRT 8.6+.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from . import __version__
from .atomic import write_bytes
from .errors import DlcError
from .graph import Graph, Node
from .ops import REGISTRY

DEFAULT_OPSET = 17
MIN_OPSET = 13  # Resize with scales as an input, Softmax over one axis, Split/Squeeze with inputs
# The highest opset each ONNX IR version may carry (onnx.helper.VERSION_TABLE), so that the IR version written
# is the lowest one that holds the opset: the widest range of runtimes loads it.
_IR_FOR_OPSET = {13: 7, 14: 7, 15: 8, 16: 8, 17: 8, 18: 8, 19: 9, 20: 9, 21: 10}
MAX_OPSET = max(_IR_FOR_OPSET)
METADATA_KEY = "dlc"


class OnnxBuilder:
    """Collects nodes and initializers while each op's `to_onnx` describes itself."""

    def __init__(self, opset: int = DEFAULT_OPSET) -> None:
        self.opset = opset  # the opset being written: an op may export differently below the one it needs
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


def to_onnx(graph: Graph, opset: int = DEFAULT_OPSET, dynamic_batch: bool = True,
            metadata: dict[str, Any] | None = None) -> onnx.ModelProto:
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise DlcError(f"opset {opset} is not supported: dlc exports opsets {MIN_OPSET} to {MAX_OPSET}")
    b = OnnxBuilder(opset)
    b.shapes = dict(graph.shapes)
    for v in (*graph.input_names, *graph.shapes):
        b._names.add(v)
    for node in graph.nodes():
        REGISTRY[node.op].to_onnx(node, b)
    batch = "batch" if dynamic_batch else 1

    def value_info(name: str) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, [batch, *graph.shapes[name]])

    onnx_graph = helper.make_graph(
        b.nodes, graph.name, [value_info(v) for v in graph.input_names], [value_info(v) for v in graph.outputs],
        initializer=b.initializers,
    )
    model = helper.make_model(
        onnx_graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=_IR_FOR_OPSET[opset],
        producer_name="dlc", producer_version=__version__,
        doc_string=f"{graph.name}, compiled by dlc {__version__}",
    )
    if metadata is not None:
        helper.set_model_props(model, {METADATA_KEY: json.dumps(metadata, sort_keys=True)})
    return model


def check(model: onnx.ModelProto) -> None:
    """onnx's full checker (with shape inference); a failure here is a bug in dlc, not the user's."""
    onnx.checker.check_model(model, full_check=True)


def save(model: onnx.ModelProto, path) -> None:
    write_bytes(path, model.SerializeToString())


def read_metadata(model: onnx.ModelProto) -> dict[str, Any] | None:
    for prop in model.metadata_props:
        if prop.key == METADATA_KEY:
            return json.loads(prop.value)
    return None
