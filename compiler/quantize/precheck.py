"""What dlc checks on a model before quantizing it: that it is a float model, and which of its nodes stay
float by rule (the post-processing tail)."""

from __future__ import annotations

import onnx
from onnx import TensorProto

from ..errors import Diagnostic, DlcError

QUANTIZED_OPS = frozenset({
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv", "QLinearMatMul", "ConvInteger",
    "MatMulInteger", "QGemm", "QLinearAdd", "QLinearMul", "QLinearConcat", "QLinearGlobalAveragePool",
    "QLinearAveragePool", "QLinearSigmoid", "QLinearLeakyRelu", "QLinearSoftmax", "QLinearWhere",
    "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "QAttention", "DynamicQuantizeLSTM", "QEmbedLayerNormalization",
})
_INT8_TYPES = (TensorProto.INT8, TensorProto.UINT8)
COMPUTE_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})


def quantized_evidence(model: onnx.ModelProto) -> str | None:
    """Why the model counts as already quantized (its first quantized node and the int8 initializers), or None."""
    nodes = [n for n in model.graph.node if n.op_type in QUANTIZED_OPS or n.op_type.startswith("QLinear")]
    int8 = [t for t in model.graph.initializer if t.data_type in _INT8_TYPES]
    if not nodes and not int8:
        return None
    parts = []
    if nodes:
        compute = ("QLinearConv", "ConvInteger", "QLinearMatMul", "MatMulInteger", "QGemm")
        first = next((n for n in nodes if n.op_type in compute), nodes[0])
        parts.append(f"node '{first.name or first.output[0]}' is {first.op_type}"
                     + (f", {len(nodes)} quantization nodes in all" if len(nodes) > 1 else ""))
    if int8:
        parts.append(f"{len(int8)} int8/uint8 initializers (e.g. '{int8[0].name}')")
    return "; ".join(parts)


def require_float(model: onnx.ModelProto, where: str) -> None:
    """A DlcError for a model that is already quantized: quantizing twice compounds the rounding and
    onnxruntime's quantizer does not expect Q/DQ or QLinear nodes in its input."""
    evidence = quantized_evidence(model)
    if evidence:
        raise DlcError(Diagnostic(f"the model is already quantized ({evidence}); quantize the float model it "
                                  "came from instead", file=where))
    inputs = [i for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    floats = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE)
    bad = [i.name for i in inputs if i.type.tensor_type.elem_type not in floats]
    if bad:
        raise DlcError(Diagnostic(f"input '{bad[0]}' is not a float tensor: INT8 calibration feeds float images",
                                  file=where))


def float_tail(model: onnx.ModelProto) -> list[str]:
    """Nodes after the last Conv/ConvTranspose/Gemm/MatMul on every path: a detector's decode (sigmoid, grid
    offsets, anchor scaling, concat of boxes in pixels with scores in [0, 1]) or a final softmax. They do no
    multiply-accumulate work that int8 would speed up, and quantizing them puts pixel coordinates and
    probabilities on one 8-bit scale, so they stay float."""
    consumers: dict[str, list[int]] = {}
    nodes = list(model.graph.node)
    for i, node in enumerate(nodes):
        for name in node.input:
            consumers.setdefault(name, []).append(i)
    feeds_compute = [False] * len(nodes)
    for i in reversed(range(len(nodes))):  # ONNX nodes are in topological order: consumers come later
        feeds_compute[i] = any(nodes[c].op_type in COMPUTE_OPS or feeds_compute[c]
                               for out in nodes[i].output for c in consumers.get(out, []))
    return [n.name for n, feeds in zip(nodes, feeds_compute) if n.op_type not in COMPUTE_OPS and n.name and not feeds]
