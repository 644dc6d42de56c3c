"""What an ONNX model costs: parameters and multiply-accumulates per image, for float and quantized graphs alike.

Quantized graphs hide their arithmetic from plain counting: a QOperator file keeps its weights as int8/uint8
initializers and computes in QLinearConv/QGemm/ConvInteger/MatMulInteger, and a QDQ file feeds Conv/Gemm from
DequantizeLinear nodes. Counting only float initializers and Conv nodes gives a QOperator ResNet-20 827
"parameters" (its scales) and 0 MACs. Here:

- params: every initializer that holds weights or biases — float, int8/uint8 (and int4/int16 kinds), and int32
  quantized biases — but not scales and zero points (the inputs of quantized ops that hold quantization
  parameters). A quantized model therefore counts the same parameters as the float model it came from after
  batch norm is folded into the convolutions (quant_pre_process folds it): conv weights and one bias per
  output channel. Against the unfolded float file the difference is the batch norms' 4 values per channel
  minus the one fused bias per channel (plus a bias where a conv had none).
- MACs: Conv/ConvTranspose/Gemm/MatMul and their quantized forms (QLinearConv, ConvInteger, QLinearMatMul,
  MatMulInteger, QGemm, MatMulIntegerToFloat, DynamicQuantizeMatMul); a QDQ DQ→Conv→Q is a Conv. Shapes come
  from onnx shape inference on a float "shape twin" of the graph in which every quantized op is replaced by
  its float counterpart (onnx cannot infer the com.microsoft ops QLinearAdd, QGemm, ... itself).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16}
_QUANT_WEIGHT_TYPES = {TensorProto.INT8, TensorProto.UINT8, TensorProto.INT16, TensorProto.UINT16,
                       TensorProto.INT4, TensorProto.UINT4}

# inputs of quantized ops that hold scales and zero points (not weights)
_QPARAM_INPUTS: dict[str, set[int]] = {
    "QuantizeLinear": {1, 2}, "DequantizeLinear": {1, 2},
    "QLinearConv": {1, 2, 4, 5, 6, 7}, "QLinearMatMul": {1, 2, 4, 5, 6, 7}, "QGemm": {1, 2, 4, 5, 7, 8},
    "ConvInteger": {2, 3}, "MatMulInteger": {2, 3},
    "MatMulIntegerToFloat": {2, 3, 4, 5}, "DynamicQuantizeMatMul": {2, 3},
    "QLinearAdd": {1, 2, 4, 5, 6, 7}, "QLinearMul": {1, 2, 4, 5, 6, 7},
    "QLinearGlobalAveragePool": {1, 2, 3, 4}, "QLinearAveragePool": {1, 2, 3, 4},
    "QLinearSigmoid": {1, 2, 3, 4}, "QLinearLeakyRelu": {1, 2, 3, 4}, "QLinearSoftmax": {1, 2, 3, 4},
}
# int32 inputs that are quantized biases (weights): counted as parameters
_BIAS_INPUTS: dict[str, set[int]] = {
    "DequantizeLinear": {0}, "QLinearConv": {8}, "QGemm": {6}, "MatMulIntegerToFloat": {6},
    "DynamicQuantizeMatMul": {4},
}
# op -> (float twin op, inputs kept, attributes kept (None: all))
_TWINS: dict[str, tuple[str, tuple[int, ...], tuple[str, ...] | None]] = {
    "QuantizeLinear": ("Identity", (0,), ()), "DequantizeLinear": ("Identity", (0,), ()),
    "DynamicQuantizeLinear": ("Identity", (0,), ()),
    "QLinearConv": ("Conv", (0, 3, 8), None), "ConvInteger": ("Conv", (0, 1), None),
    "QLinearMatMul": ("MatMul", (0, 3), ()), "MatMulInteger": ("MatMul", (0, 1), ()),
    "MatMulIntegerToFloat": ("MatMul", (0, 1), ()), "DynamicQuantizeMatMul": ("MatMul", (0, 1), ()),
    "QGemm": ("Gemm", (0, 3, 6), ("transA", "transB", "alpha")),
    "QLinearAdd": ("Add", (0, 3), ()), "QLinearMul": ("Mul", (0, 3), ()),
    "QLinearGlobalAveragePool": ("GlobalAveragePool", (0,), ()),
    "QLinearAveragePool": ("AveragePool", (0,), ("auto_pad", "ceil_mode", "count_include_pad", "kernel_shape",
                                                  "pads", "strides")),
    "QLinearSigmoid": ("Sigmoid", (0,), ()), "QLinearLeakyRelu": ("LeakyRelu", (0,), ("alpha",)),
    "QLinearSoftmax": ("Softmax", (0,), ("axis",)),
}
# ops whose MACs are counted: op -> (kind, weight input)
_MAC_OPS: dict[str, tuple[str, int]] = {
    "Conv": ("conv", 1), "QLinearConv": ("conv", 3), "ConvInteger": ("conv", 1), "ConvTranspose": ("convT", 1),
    "Gemm": ("gemm", 1), "QGemm": ("gemm", 3),
    "MatMul": ("matmul", 1), "QLinearMatMul": ("matmul", 3), "MatMulInteger": ("matmul", 1),
    "MatMulIntegerToFloat": ("matmul", 1), "DynamicQuantizeMatMul": ("matmul", 1),
}
INT8_MAC_OPS = frozenset(op for op in _MAC_OPS if op not in ("Conv", "ConvTranspose", "Gemm", "MatMul"))


def _qparam_positions(node: onnx.NodeProto) -> set[int]:
    if node.op_type in _QPARAM_INPUTS:
        return _QPARAM_INPUTS[node.op_type]
    if node.op_type == "QLinearConcat":  # Y_scale, Y_zero_point, then (X, X_scale, X_zero_point) triples
        return {i for i in range(len(node.input)) if i < 2 or (i - 2) % 3}
    if node.op_type.startswith("QLinear"):  # an op not in the table: onnxruntime's naming tells
        return {i for i, name in enumerate(node.input) if name.endswith(("scale", "zero_point"))}
    return set()


def count_params(model: onnx.ModelProto) -> int:
    """Weight and bias elements: float and int8/uint8 initializers other than scales and zero points, and int32
    initializers used as quantized biases. See the module notes."""
    weight_use: dict[str, bool] = {}  # initializer -> used at least once as a weight (not a qparam)
    bias_use: set[str] = set()
    for node in model.graph.node:
        qparams = _qparam_positions(node)
        bias_slots = _BIAS_INPUTS.get(node.op_type, set())
        for i, name in enumerate(node.input):
            if not name:
                continue
            weight_use[name] = weight_use.get(name, False) or i not in qparams
            if i in bias_slots:
                bias_use.add(name)
    total = 0
    for t in model.graph.initializer:
        used_as_weight = weight_use.get(t.name, True)  # an unused initializer counts, as it always did
        if t.data_type in FLOAT_TYPES or t.data_type in _QUANT_WEIGHT_TYPES:
            counted = used_as_weight
        else:
            counted = t.data_type == TensorProto.INT32 and t.name in bias_use
        if counted:
            total += int(np.prod(t.dims, dtype=np.int64))
    return total


def _shape_twin(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose quantized ops are their float counterparts and whose quantized initializers are float graph
    inputs of the same shape (no data), so onnx shape inference can follow every tensor; batch fixed to 1."""
    twin = onnx.ModelProto()
    twin.CopyFrom(model)
    g = twin.graph
    quant_inputs: set[str] = set()
    nodes = []
    for node in g.node:
        if node.op_type == "QLinearConcat":  # Y_scale, Y_zero_point, then (X, X_scale, X_zero_point) triples
            spec = ("Concat", tuple(range(2, len(node.input), 3)), ("axis",))
        else:
            spec = _TWINS.get(node.op_type)
        if spec is None:
            nodes.append(node)
            continue
        op, keep, attrs = spec
        quant_inputs.update(node.input)
        new = helper.make_node(op, [node.input[i] for i in keep if i < len(node.input) and node.input[i]],
                               [node.output[0]], name=node.name)
        new.attribute.extend(a for a in node.attribute if attrs is None or a.name in attrs)
        nodes.append(new)
    del g.node[:]
    g.node.extend(nodes)
    kept, as_inputs = [], []
    for t in g.initializer:
        if t.name in quant_inputs and t.data_type not in FLOAT_TYPES and t.data_type != TensorProto.INT64:
            as_inputs.append(helper.make_tensor_value_info(t.name, TensorProto.FLOAT, list(t.dims)))
        else:
            kept.append(t)
    del g.initializer[:]
    g.initializer.extend(kept)
    del g.value_info[:]  # the quantized tensors' types would contradict the twin's float ones
    for out in g.output:
        if out.type.tensor_type.elem_type not in FLOAT_TYPES:
            out.type.tensor_type.elem_type = TensorProto.FLOAT
    inits = {t.name for t in g.initializer}
    for inp in g.input:
        if inp.name in inits or not inp.type.tensor_type.HasField("shape"):
            continue
        dims = inp.type.tensor_type.shape.dim
        if len(dims):
            dims[0].Clear()
            dims[0].dim_value = 1
    g.input.extend(as_inputs)
    return twin


def _shapes(model: onnx.ModelProto) -> dict[str, list[int] | None]:
    twin = _shape_twin(model)
    try:
        twin = onnx.shape_inference.infer_shapes(twin)
    except Exception:  # inference can fail on unusual graphs: count what the file's own shapes allow
        pass
    shapes: dict[str, list[int] | None] = {}
    for vi in [*twin.graph.input, *twin.graph.value_info, *twin.graph.output]:
        tt = vi.type.tensor_type
        if tt.HasField("shape"):
            dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
            shapes[vi.name] = None if None in dims else dims
    for t in model.graph.initializer:
        shapes[t.name] = list(t.dims)
    return shapes


@dataclass(frozen=True)
class NodeMacs:
    name: str
    op: str
    macs: int
    int8: bool  # computed in 8-bit integers: a quantized op, or a QDQ Conv/Gemm/MatMul fed by DequantizeLinear


def node_macs(model: onnx.ModelProto) -> list[NodeMacs]:
    """MACs per image of every Conv/ConvTranspose/Gemm/MatMul-like node (quantized forms included).

    Conv: output elements × C_in/groups × kh × kw; ConvTranspose: input elements × C_out/groups × kh × kw;
    Gemm and MatMul: M × K × N (times any batch dimensions of MatMul). Batch fixed to 1."""
    shapes = _shapes(model)
    dq_outputs = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    result = []
    for node in model.graph.node:
        if node.op_type not in _MAC_OPS:
            continue
        kind, w_index = _MAC_OPS[node.op_type]
        macs = 0
        if kind in ("conv", "convT"):
            w = shapes.get(node.input[w_index])
            ref = shapes.get(node.output[0] if kind == "conv" else node.input[0])
            if w and ref:
                macs = int(np.prod(ref, dtype=np.int64)) * int(np.prod(w[1:], dtype=np.int64))
        elif kind == "gemm":
            a, y = shapes.get(node.input[0]), shapes.get(node.output[0])
            if a and y and len(a) == 2:
                trans_a = next((at.i for at in node.attribute if at.name == "transA"), 0)
                macs = y[0] * y[1] * (a[0] if trans_a else a[1])
        else:
            a, y = shapes.get(node.input[0]), shapes.get(node.output[0])
            if a and y:
                macs = int(np.prod(y, dtype=np.int64)) * a[-1]
        int8 = node.op_type in INT8_MAC_OPS or (
            len(node.input) > w_index and node.input[0] in dq_outputs and node.input[w_index] in dq_outputs)
        result.append(NodeMacs(node.name, node.op_type, int(macs), int8))
    return result


def count_macs(model: onnx.ModelProto) -> int:
    """MACs per image of the whole model (see node_macs)."""
    return sum(n.macs for n in node_macs(model))


@dataclass
class ModelCost:
    """What a model file costs: bytes on disk, parameters (weights and biases) and MACs per image."""

    file_bytes: int
    params: int
    macs: int
    int8_macs: int = 0  # of `macs`, those computed in 8-bit integers


def model_cost(path: str | Path) -> ModelCost:
    """File size, parameters (count_params) and MACs (node_macs) of one ONNX file."""
    from dlc.compiler.onnx_io import load_onnx

    model = load_onnx(path)
    per_node = node_macs(model)
    return ModelCost(file_bytes=Path(path).stat().st_size, params=count_params(model),
                     macs=sum(n.macs for n in per_node), int8_macs=sum(n.macs for n in per_node if n.int8))
