"""Per-layer quantization error: which layers cost the most when quantized, from float and quantized per-layer
outputs on calibration images.

The quantized side is the QDQ form of the candidate (same activation/weight types, per-channel and
reduce_range settings, same ranges), run with onnxruntime's graph optimizations off, so every QuantizeLinear/
DequantizeLinear pair rounds exactly where the int8 kernels would, and compute nodes keep their names (a
QOperator graph fuses them away). Each node of the float graph is compared with the node of the same name in
the QDQ graph, output against output: that is the layer's value after its inputs and weights were rounded and
before its own output is (the next layer's input rounding is charged to the next layer, which is what keeping
that layer float would remove).

A layer is a compute node together with the Relu/Clip that follows it alone (QDQ folds that activation into the
quantized range and drops the node). Its error is the relative L2 error ||q - f|| / ||f|| of its output over the
samples; errors accumulate through the net, so the layer is ranked by the error it ADDS: its output error minus
the largest error of the nodes that feed it (graph inputs: 0). Keeping a layer float brings its added error to
about 0.

Accumulated errors saturate once a net is badly off (a relative error cannot grow much past 1), so the choice of
layers to keep float uses each layer in isolation instead (`isolated_sensitivity`): the model quantized at that
layer only, from float inputs, compared at the layer's output and at the graph outputs. That costs one
quantization per layer, once, since a layer alone does not depend on which others are float.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper

# ops whose quantization rounds values (layout ops such as Reshape/Flatten/Transpose only carry errors along)
UNIT_OPS = frozenset({
    "Conv", "ConvTranspose", "Gemm", "MatMul", "Add", "Mul", "Concat", "GlobalAveragePool", "AveragePool",
    "Sigmoid", "Softmax", "LeakyRelu", "Relu", "Clip", "Resize", "BatchNormalization", "InstanceNormalization",
    "LayerNormalization", "MaxPool",
})
_FOLDED = ("Relu", "Clip")
SAMPLES = 64


@dataclass(frozen=True)
class LayerError:
    node: str  # the layer's compute node (its name in the float and the QDQ graph)
    op: str
    members: tuple[str, ...]  # nodes kept float together when the layer is excluded (node + folded Relu/Clip)
    tensor: str  # the output compared
    error: float  # ||q - f|| / ||f|| of the layer's output (accumulated through the layers before it)
    added: float  # error minus the largest error among the layer's inputs: what quantizing this layer adds

    def to_dict(self) -> dict:
        d = asdict(self)
        d["members"] = list(self.members)
        return d


def layers(model: onnx.ModelProto, skip: set[str] = frozenset()) -> list[tuple[onnx.NodeProto, list[str], str]]:
    """(compute node, member node names, output tensor) for every layer not in `skip`."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    outputs = {o.name for o in model.graph.output}
    absorbed: set[str] = set()
    found = []
    for node in model.graph.node:
        if node.op_type not in UNIT_OPS or node.name in skip or node.name in absorbed or not node.name:
            continue
        members, out = [node.name], node.output[0]
        while out not in outputs:
            nxt = consumers.get(out, [])
            if len(nxt) != 1 or nxt[0].op_type not in _FOLDED or nxt[0].name in skip:
                break
            members.append(nxt[0].name)
            absorbed.add(nxt[0].name)
            out = nxt[0].output[0]
        found.append((node, members, out))
    return found


def _with_outputs(model: onnx.ModelProto, names: list[str]) -> bytes:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    present = {o.name for o in m.graph.output}
    for name in names:
        if name not in present:
            m.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
            present.add(name)
    return m.SerializeToString()


def _session(model_bytes: bytes):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(model_bytes, sess_options=options, providers=["CPUExecutionProvider"])


def layer_errors(float_model: onnx.ModelProto, qdq_model: onnx.ModelProto, images: np.ndarray, input_name: str,
                 batch: int, skip: set[str] = frozenset()) -> list[LayerError]:
    """Every layer's output error and added error (see the module notes), worst added error first."""
    units = layers(float_model, skip)
    q_nodes = {n.name: n for n in qdq_model.graph.node if n.name}
    producer: dict[str, onnx.NodeProto] = {o: n for n in float_model.graph.node for o in n.output}
    head_of = {m: node.name for node, members, _ in units for m in members}  # folded Relu -> its layer's node
    pairs: dict[str, tuple[str, str]] = {}  # float node -> (float output, QDQ output)
    for node in float_model.graph.node:
        twin = q_nodes.get(node.name)
        if twin is not None and twin.op_type == node.op_type and node.output and twin.output:
            pairs[node.name] = (node.output[0], twin.output[0])
    names = list(pairs)
    f_sess = _session(_with_outputs(float_model, [pairs[n][0] for n in names]))
    q_sess = _session(_with_outputs(qdq_model, [pairs[n][1] for n in names]))
    diff2, ref2 = np.zeros(len(names)), np.zeros(len(names))
    for start in range(0, len(images), batch):
        feed = {input_name: np.ascontiguousarray(images[start:start + batch], dtype=np.float32)}
        f_vals = f_sess.run([pairs[n][0] for n in names], feed)
        q_vals = q_sess.run([pairs[n][1] for n in names], feed)
        for k, (f, q) in enumerate(zip(f_vals, q_vals)):
            f = np.asarray(f, np.float64)
            diff2[k] += float(np.sum((np.asarray(q, np.float64) - f) ** 2))
            ref2[k] += float(np.sum(f ** 2))
    err = {n: float(np.sqrt(d / r)) if r > 0 else float(np.sqrt(d)) for n, d, r in zip(names, diff2, ref2)}

    def input_error(tensor: str) -> float:
        node = producer.get(tensor)
        if node is None:  # a graph input or an initializer: exact
            return 0.0
        name = node.name if node.name in err else head_of.get(node.name, node.name)
        return err.get(name, 0.0)

    result = []
    for node, members, out in units:
        if node.name not in err:
            continue
        before = max((input_error(i) for i in node.input if i), default=0.0)
        result.append(LayerError(node.name, node.op_type, tuple(members), out, err[node.name],
                                 max(err[node.name] - before, 0.0)))
    result.sort(key=lambda e: e.added, reverse=True)
    return result


@dataclass(frozen=True)
class LayerSensitivity:
    node: str
    op: str
    members: tuple[str, ...]
    layer_error: float  # ||q - f|| / ||f|| at the layer's output, with only this layer quantized
    output_error: float  # the same at the graph outputs: what quantizing this layer alone costs the result

    def to_dict(self) -> dict:
        d = asdict(self)
        d["members"] = list(self.members)
        return d


def isolated_sensitivity(float_model: onnx.ModelProto, quantize_only: Callable[[list[str]], onnx.ModelProto],
                         images: np.ndarray, input_name: str, batch: int,
                         skip: set[str] = frozenset()) -> list[LayerSensitivity]:
    """Each layer quantized alone (quantize_only(members) returns that QDQ model), worst output error first."""
    units = layers(float_model, skip)
    outputs = [o.name for o in float_model.graph.output]
    heads = [node.output[0] for node, _, _ in units]
    f_sess = _session(_with_outputs(float_model, [*outputs, *heads]))
    feeds = [{input_name: np.ascontiguousarray(images[s:s + batch], dtype=np.float32)}
             for s in range(0, len(images), batch)]
    f_vals = [f_sess.run([*outputs, *heads], feed) for feed in feeds]
    result = []
    for k, (node, members, _) in enumerate(units):
        q_model = quantize_only(members)
        twin = next((n for n in q_model.graph.node if n.name == node.name and n.op_type == node.op_type), None)
        if twin is None:  # the quantizer left this layer alone (an op type it does not quantize here)
            continue
        q_sess = _session(_with_outputs(q_model, [*outputs, twin.output[0]]))
        out_d = out_r = lay_d = lay_r = 0.0
        for feed, f in zip(feeds, f_vals):
            q = q_sess.run([*outputs, twin.output[0]], feed)
            for a, b in zip(q[:len(outputs)], f[:len(outputs)]):
                b = np.asarray(b, np.float64)
                out_d += float(np.sum((np.asarray(a, np.float64) - b) ** 2))
                out_r += float(np.sum(b ** 2))
            b = np.asarray(f[len(outputs) + k], np.float64)
            lay_d += float(np.sum((np.asarray(q[-1], np.float64) - b) ** 2))
            lay_r += float(np.sum(b ** 2))
        result.append(LayerSensitivity(node.name, node.op_type, tuple(members),
                                       float(np.sqrt(lay_d / lay_r)) if lay_r else float(np.sqrt(lay_d)),
                                       float(np.sqrt(out_d / out_r)) if out_r else float(np.sqrt(out_d))))
    result.sort(key=lambda e: e.output_error, reverse=True)
    return result
