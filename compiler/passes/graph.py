"""A mutable view of an ONNX graph for rewriting: nodes in a list, initializers as numpy arrays, and
producer/consumer lookups rebuilt on demand."""

from __future__ import annotations

import itertools

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..onnx_io import copy_without, tensor_array

SHAPE_VALUE_LIMIT = 1024  # elements: larger float initializers are passed to shape inference as shapes only


class OnnxGraph:
    def __init__(self, model: onnx.ModelProto):
        # Everything of the model but its graph (a few fields), so the caller's ModelProto, weights and all, can
        # be freed once the graph is read: `dlc optimize` on a 550 MB file must not hold the weights three times.
        self.model = copy_without(model, ("graph",))
        g = model.graph
        self.model.graph.name, self.model.graph.doc_string = g.name, g.doc_string
        self.nodes: list[onnx.NodeProto] = [copy_node(n) for n in g.node]
        self.inits: dict[str, np.ndarray] = {t.name: tensor_array(t, "the model") for t in g.initializer}
        # copies, not views: a view into the model would keep its whole arena, weights and all, alive
        self.inputs = [_copy(i) for i in g.input if i.name not in self.inits]
        self.outputs = [_copy(o) for o in g.output]
        self._names = itertools.count()
        self._taken: set[str] | None = None

    # --- lookups --------------------------------------------------------------------------------------------
    def producers(self) -> dict[str, onnx.NodeProto]:
        return {o: n for n in self.nodes for o in n.output if o}

    def consumers(self) -> dict[str, list[onnx.NodeProto]]:
        out: dict[str, list[onnx.NodeProto]] = {}
        for n in self.nodes:
            for i in n.input:
                if i:
                    out.setdefault(i, []).append(n)
        return out

    @property
    def output_names(self) -> set[str]:
        return {o.name for o in self.outputs}

    def opset(self, domain: str = "") -> int:
        return next((o.version for o in self.model.opset_import if o.domain in (domain, "ai.onnx")), 0)

    def const(self, name: str) -> np.ndarray | None:
        """The value of `name` if it is an initializer or the output of a Constant node."""
        if name in self.inits:
            return self.inits[name]
        for n in self.nodes:
            if n.op_type == "Constant" and n.output[0] == name:
                return constant_value(n)
        return None

    def param_count(self) -> int:
        return int(sum(a.size for a in self.inits.values()))

    # --- edits ----------------------------------------------------------------------------------------------
    def fresh(self, base: str) -> str:
        """A name no value in the graph has. The set of taken names is built once and grows with every name
        handed out (passes name new values through here)."""
        if self._taken is None:
            self._taken = set(self.inits) | {o for n in self.nodes for o in n.output} | {i.name for i in self.inputs}
        while True:
            name = f"{base}_{next(self._names)}"
            if name not in self._taken and name not in self.inits:
                self._taken.add(name)
                return name

    def add_init(self, base: str, value: np.ndarray) -> str:
        name = self.fresh(base)
        self.inits[name] = value
        return name

    def remove(self, *nodes: onnx.NodeProto) -> None:
        ids = {id(n) for n in nodes}
        self.nodes = [n for n in self.nodes if id(n) not in ids]

    def bypass(self, node: onnx.NodeProto, keep: str) -> None:
        """Remove a single-output node whose output equals its input `keep`, rewiring readers to `keep`.
        If the output is a graph output, the producer of `keep` is renamed instead, so names stay stable."""
        out = node.output[0]
        self.remove(node)
        if out in self.output_names and keep not in self.output_names and keep not in {i.name for i in self.inputs} \
                and keep not in self.inits and self.producers().get(keep) is not None:
            self.rename(keep, out)
        elif out in self.output_names:
            self.nodes.append(helper.make_node("Identity", [keep], [out], name=f"{out}_identity"))
        else:
            self.replace_uses(out, keep)

    def replace_uses(self, old: str, new: str) -> None:
        for n in self.nodes:
            for k, name in enumerate(n.input):
                if name == old:
                    n.input[k] = new

    def rename(self, old: str, new: str) -> None:
        for n in self.nodes:
            for k, name in enumerate(n.output):
                if name == old:
                    n.output[k] = new
        self.replace_uses(old, new)

    def topo_sort(self) -> None:
        """Kahn's algorithm, keeping the current order wherever the dependencies allow (a heap on position)."""
        known = {i.name for i in self.inputs} | set(self.inits) | {""}
        order = stable_topological_order(self.nodes, known)
        if len(order) < len(self.nodes):  # a cycle: keep the rest as they were
            seen = set(order)
            order += [k for k in range(len(self.nodes)) if k not in seen]
        self.nodes = [self.nodes[k] for k in order]

    def shape_model(self) -> onnx.ModelProto:
        """The graph for ONNX shape inference, without its weights' bytes: float initializers above
        SHAPE_VALUE_LIMIT elements become graph inputs of their type and shape (shape inference reads only the
        values of shape-like tensors, which are small or integer), so inferring shapes on a 550 MB VGG costs
        what it costs on its graph, not a serialisation of every weight."""
        used = {i for n in self.nodes for i in n.input} | self.output_names | _subgraph_reads(self.nodes)
        inits, weights = [], []
        for k, v in self.inits.items():
            if k not in used:
                continue
            if v.size > SHAPE_VALUE_LIMIT and v.dtype.kind in "fc":
                weights.append(helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape))
            else:
                inits.append(numpy_helper.from_array(np.ascontiguousarray(v).reshape(np.shape(v)), k))
        inputs = list(self.inputs) + weights
        if self.model.ir_version < 4:
            inputs += [helper.make_tensor_value_info(t.name, t.data_type, t.dims) for t in inits]
        graph = helper.make_graph(self.nodes, self.model.graph.name, inputs, self.outputs, initializer=inits)
        # IR 4 at least, so that weights may be inputs without initializers
        return helper.make_model(graph, opset_imports=list(self.model.opset_import),
                                 ir_version=max(self.model.ir_version, 4))

    def to_model(self) -> onnx.ModelProto:
        """The graph as a new ModelProto. Built in place, field by field: helper.make_graph and make_model
        would copy every initializer twice more (a 550 MB VGG spent 3 s in those copies)."""
        used = {i for n in self.nodes for i in n.input} | self.output_names | _subgraph_reads(self.nodes)
        model = onnx.ModelProto()
        model.ir_version = self.model.ir_version
        model.producer_name, model.producer_version = self.model.producer_name, self.model.producer_version
        model.doc_string = self.model.doc_string
        model.opset_import.extend(self.model.opset_import)
        graph = model.graph
        graph.name, graph.doc_string = self.model.graph.name, self.model.graph.doc_string
        graph.node.extend(self.nodes)
        graph.input.extend(self.inputs)
        graph.output.extend(self.outputs)
        for k, v in self.inits.items():
            if k in used:
                _fill_tensor(graph.initializer.add(), k, v)
        if self.model.ir_version < 4:  # before IR 4 every initializer must also be a graph input
            graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, t.dims) for t in graph.initializer)
        for prop in self.model.metadata_props:
            model.metadata_props.append(prop)
        return model


def _free_names(graph: onnx.GraphProto) -> set[str]:
    """Names a subgraph reads from enclosing scopes."""
    defined = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {o for n in graph.node for o in n.output}
    reads = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    for n in graph.node:
        reads |= outer_reads(n)
    return reads - defined - {""}


def stable_topological_order(nodes: list[onnx.NodeProto], known: set[str] = frozenset()) -> list[int]:
    """Node positions in an order where each node follows the producers of what it reads (its inputs and what
    its subgraphs read), the original order wherever it is already valid (Kahn's algorithm, a heap on
    position). Names in `known` (graph inputs, initializers) have no producer. Shorter than `nodes` when
    there is a cycle: the nodes on or after it are left out."""
    import heapq

    producer = {o: k for k, n in enumerate(nodes) for o in n.output if o}
    waiting = [0] * len(nodes)
    readers: dict[int, list[int]] = {}
    for k, n in enumerate(nodes):
        deps = {producer[i] for i in (*n.input, *outer_reads(n)) if i not in known and i in producer}
        deps.discard(k)
        waiting[k] = len(deps)
        for d in deps:
            readers.setdefault(d, []).append(k)
    ready = [k for k, w in enumerate(waiting) if w == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        k = heapq.heappop(ready)
        order.append(k)
        for r in readers.get(k, ()):
            waiting[r] -= 1
            if waiting[r] == 0:
                heapq.heappush(ready, r)
    return order


def outer_reads(node: onnx.NodeProto) -> set[str]:
    """Names a node reads implicitly, from inside its If/Loop/Scan bodies."""
    names: set[str] = set()
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            names |= _free_names(a.g)
        elif a.type == onnx.AttributeProto.GRAPHS:
            for g in a.graphs:
                names |= _free_names(g)
    return names


def _subgraph_reads(nodes: list[onnx.NodeProto]) -> set[str]:
    return {name for n in nodes for name in outer_reads(n)}


_PLAIN_DTYPES = {np.dtype(t) for t in (np.float16, np.float32, np.float64, np.int8, np.int16, np.int32, np.int64,
                                        np.uint8, np.uint16, np.uint32, np.uint64, np.bool_, np.complex64,
                                        np.complex128)}


def _fill_tensor(tensor: onnx.TensorProto, name: str, value: np.ndarray) -> None:
    """numpy_helper.from_array into a tensor already in its place (no copy of a finished TensorProto); types
    with their own encoding (strings, packed 4-bit, 8-bit floats) go through numpy_helper itself."""
    value = np.asarray(value)
    if value.dtype not in _PLAIN_DTYPES:  # isnative is part of dtype equality: big-endian arrays go this way too
        tensor.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(value).reshape(np.shape(value)), name))
        return
    tensor.name = name
    tensor.data_type = helper.np_dtype_to_tensor_dtype(value.dtype)
    tensor.dims.extend(value.shape)
    tensor.raw_data = np.ascontiguousarray(value).tobytes()


def _copy(message):
    out = type(message)()
    out.CopyFrom(message)
    return out


def copy_node(node: onnx.NodeProto) -> onnx.NodeProto:
    return _copy(node)


def constant_value(node: onnx.NodeProto) -> np.ndarray | None:
    for a in node.attribute:
        if a.name == "value":
            return tensor_array(a.t, f"Constant '{node.name or node.output[0]}'")
        if a.name in ("value_float", "value_int"):
            return np.array(helper.get_attribute_value(a))
        if a.name in ("value_floats", "value_ints"):
            return np.array(helper.get_attribute_value(a))
    return None


def attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def set_attr(node: onnx.NodeProto, name: str, value) -> None:
    for k, a in enumerate(node.attribute):
        if a.name == name:
            del node.attribute[k]
            break
    node.attribute.append(helper.make_attribute(name, value))
