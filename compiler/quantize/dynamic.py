"""Dynamic INT8 (weights int8 ahead of time, activations quantized at run time): offered for linear-heavy nets
only.

Dynamic quantization turns MatMul/Gemm into MatMulInteger with DynamicQuantizeLinear in front, which pays off
where matrix products dominate (MLPs, transformers). It turns Conv into ConvInteger, which onnxruntime's CPU
provider runs without a fast kernel (im2col plus a generic integer GEMM, then a float rescale), so a conv net
gets slower than fp32. dlc looks at where a net's multiply-accumulates are and refuses dynamic quantization,
with that reason, when the MatMul/Gemm share is below LINEAR_SHARE.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import onnx

LINEAR_SHARE = 0.5  # MatMul/Gemm MACs over all MACs from which dynamic quantization is offered
_LINEAR_OPS = ("Gemm", "MatMul")


@dataclass(frozen=True)
class DynamicPolicy:
    allowed: bool
    linear_share: float  # MatMul/Gemm MACs / all MACs
    linear_macs: int
    total_macs: int
    reason: str

    def to_dict(self) -> dict:
        return {"allowed": self.allowed, "linear_share": self.linear_share, "linear_macs": self.linear_macs,
                "total_macs": self.total_macs, "reason": self.reason}


def dynamic_policy(model: onnx.ModelProto) -> DynamicPolicy:
    """Whether dynamic INT8 suits this net, from its MAC split (runtime/cost.py's node_macs)."""
    from dlc.runtime.cost import node_macs

    per_node = node_macs(model)
    total = sum(n.macs for n in per_node)
    linear = sum(n.macs for n in per_node if n.op in _LINEAR_OPS)
    conv = sum(n.macs for n in per_node if n.op in ("Conv", "ConvTranspose"))
    share = linear / total if total else 0.0
    if total == 0:
        return DynamicPolicy(False, 0.0, 0, 0, "the model has no Conv/Gemm/MatMul work to quantize")
    if share >= LINEAR_SHARE:
        return DynamicPolicy(True, share, linear, total,
                             f"MatMul/Gemm hold {share:.0%} of the MACs: dynamic INT8 (MatMulInteger) fits")
    return DynamicPolicy(False, share, linear, total,
                         f"dynamic INT8 is for linear-heavy nets: here convolutions hold {conv / total:.0%} of the "
                         f"MACs and MatMul/Gemm {share:.0%} (dynamic needs >= {LINEAR_SHARE:.0%}); dynamic "
                         "quantization turns Conv into ConvInteger, which onnxruntime's CPU provider has no fast "
                         "kernel for, so the model would run slower than fp32. Use static INT8 (the default)")


def gemm_to_matmul(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Gemm with a constant B (dlc's `linear`) as MatMul + Add, the form onnxruntime's dynamic quantizer
    handles (it has no integer Gemm). Only plain Gemms (alpha = beta = 1, no transA) are rewritten; the node
    keeps its name, so exclusions and reports still name the layer. Returns the model and how many changed."""
    from onnx import helper, numpy_helper

    model = onnx.ModelProto.FromString(model.SerializeToString())
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    nodes, changed = [], 0
    for node in g.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if (node.op_type != "Gemm" or node.input[1] not in inits or attrs.get("transA", 0)
                or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0):
            nodes.append(node)
            continue
        b = numpy_helper.to_array(inits[node.input[1]])
        b_name = node.input[1]
        if attrs.get("transB", 0):
            b_name = f"{node.input[1]}_t"
            g.initializer.append(numpy_helper.from_array(b.T.copy(), b_name))
        has_bias = len(node.input) > 2 and node.input[2]
        product = f"{node.output[0]}_matmul" if has_bias else node.output[0]
        nodes.append(helper.make_node("MatMul", [node.input[0], b_name], [product], name=node.name))
        if has_bias:
            nodes.append(helper.make_node("Add", [product, node.input[2]], [node.output[0]], name=f"{node.name}_bias"))
        changed += 1
    del g.node[:]
    g.node.extend(nodes)
    used = {name for n in g.node for name in n.input}
    keep = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)
    return model, changed


def quantize_dynamic_int8(pre_path: Path, out_path: Path, per_channel: bool = False,
                          exclude: list[str] | tuple[str, ...] = ()) -> None:
    """onnxruntime's quantize_dynamic on MatMul only (Gemm rewritten to MatMul first; convolutions stay
    float): int8 weights, activations quantized at run time by DynamicQuantizeLinear."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from .formats import quiet_ort

    model, _ = gemm_to_matmul(onnx.load(str(pre_path)))
    matmul_path = Path(out_path).with_suffix(".matmul.onnx")
    onnx.save(model, str(matmul_path))
    with quiet_ort():
        quantize_dynamic(str(matmul_path), str(out_path), op_types_to_quantize=["MatMul"],
                         per_channel=per_channel, weight_type=QuantType.QInt8, nodes_to_exclude=list(exclude))
    matmul_path.unlink(missing_ok=True)
