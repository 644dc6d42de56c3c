"""Activations and other shape-preserving ops: relu, leaky_relu, sigmoid, tanh, silu, softmax, dropout."""

from __future__ import annotations

import numpy as np

from dlc._C import activation as _k

from .base import OpDef, Param, register


class _Unary(OpDef):
    onnx_type = ""
    saves_output = True  # backward needs y (relu, sigmoid, tanh); otherwise x

    def kernels(self):
        name = self.type
        return getattr(_k, f"{name}_forward"), getattr(_k, f"{name}_backward")

    def forward(self, node, inputs, ctx):
        fwd, _ = self.kernels()
        y = fwd(inputs[0])
        return y, ((y if self.saves_output else inputs[0]) if ctx.train else None)

    def backward(self, node, saved, dy, ctx):
        _, bwd = self.kernels()
        return [bwd(dy, saved)], {}

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

    def forward(self, node, inputs, ctx):
        return _k.leaky_relu_forward(inputs[0], node.attrs["slope"]), (inputs[0] if ctx.train else None)

    def backward(self, node, saved, dy, ctx):
        return [_k.leaky_relu_backward(dy, saved, node.attrs["slope"])], {}

    def to_onnx(self, node, b) -> None:
        b.node("LeakyRelu", [node.inputs[0]], node.outputs, node.name, alpha=node.attrs["slope"])


@register
class Silu(_Unary):
    type = "silu"
    doc = "x * sigmoid(x) (swish)"
    saves_output = False

    def to_onnx(self, node, b) -> None:
        # Standard ONNX has no SiLU before opset 24: Sigmoid + Mul, which runtimes fuse back.
        sig = b.fresh(f"{node.name}.sigmoid")
        b.node("Sigmoid", [node.inputs[0]], [sig], f"{node.name}/sigmoid")
        b.node("Mul", [node.inputs[0], sig], node.outputs, node.name)


@register
class Softmax(OpDef):
    type = "softmax"
    doc = "softmax over channels (axis 1)"

    def forward(self, node, inputs, ctx):
        y = _k.softmax_forward(inputs[0])
        return y, (y if ctx.train else None)

    def backward(self, node, saved, dy, ctx):
        return [_k.softmax_backward(dy, saved)], {}

    def to_onnx(self, node, b) -> None:
        b.node("Softmax", [node.inputs[0]], node.outputs, node.name, axis=1)


@register
class Dropout(OpDef):
    type = "dropout"
    doc = "inverted dropout while training; the identity at inference"
    params = (Param("ratio", "float", 0.5, minimum=0.0, maximum=0.999),)

    def forward(self, node, inputs, ctx):
        x, ratio = inputs[0], node.attrs["ratio"]
        if not ctx.train or ratio == 0:
            return x, None
        mask = (ctx.rng.random(x.shape, dtype=np.float32) >= ratio).astype(np.uint8)
        return _k.dropout_forward(x, mask, ratio), mask

    def backward(self, node, saved, dy, ctx):
        if saved is None:
            return [dy], {}
        return [_k.dropout_backward(dy, saved, node.attrs["ratio"])], {}

    def to_onnx(self, node, b) -> None:
        # The artifact is for inference, where dropout is the identity.
        b.node("Identity", [node.inputs[0]], node.outputs, node.name)
