"""Activations and other shape-preserving ops: relu, leaky_relu, sigmoid, tanh, silu, softmax, dropout."""

from __future__ import annotations

from .base import OpDef, Param, register


class _Unary(OpDef):
    onnx_type = ""

    def to_onnx(self, node, b) -> None:
        b.node(self.onnx_type, [node.inputs[0]], node.outputs, node.name)


@register
class Relu(_Unary):
    type = "relu"
    doc = "max(x, 0)"
    onnx_type = "Relu"


@register
class Sigmoid(_Unary):
    type = "sigmoid"
    doc = "1 / (1 + exp(-x))"
    onnx_type = "Sigmoid"


@register
class Tanh(_Unary):
    type = "tanh"
    doc = "hyperbolic tangent"
    onnx_type = "Tanh"


@register
class LeakyRelu(OpDef):
    type = "leaky_relu"
    doc = "x if x > 0 else slope * x"
    params = (Param("slope", "float", 0.01),)

    def to_onnx(self, node, b) -> None:
        b.node("LeakyRelu", [node.inputs[0]], node.outputs, node.name, alpha=node.attrs["slope"])


@register
class Silu(OpDef):
    type = "silu"
    doc = "x * sigmoid(x) (swish)"

    def to_onnx(self, node, b) -> None:
        # Standard ONNX has no SiLU before opset 24: Sigmoid + Mul, which runtimes fuse back.
        sig = b.fresh(f"{node.name}.sigmoid")
        b.node("Sigmoid", [node.inputs[0]], [sig], f"{node.name}/sigmoid")
        b.node("Mul", [node.inputs[0], sig], node.outputs, node.name)


@register
class Softmax(OpDef):
    type = "softmax"
    doc = "softmax over channels (axis 1)"

    def to_onnx(self, node, b) -> None:
        b.node("Softmax", [node.inputs[0]], node.outputs, node.name, axis=1)


@register
class Dropout(OpDef):
    type = "dropout"
    doc = "inverted dropout while training; the identity at inference"
    params = (Param("ratio", "float", 0.5, minimum=0.0, maximum=0.999),)

    def to_onnx(self, node, b) -> None:
        # The artifact is for inference, where dropout is the identity.
        b.node("Identity", [node.inputs[0]], node.outputs, node.name)
