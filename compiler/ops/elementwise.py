"""Activations and other shape-preserving ops: relu, leaky_relu, sigmoid, tanh, silu, gelu, clip (relu6),
hard_sigmoid, hard_swish, prelu, softmax, dropout."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from dlc._C import activation as _k

from .base import OpDef, Param, ParamError, Shape, ShapeError, fmt_shape, register
from .onnx_rules import FLOAT32_MAX, Unsupported, attr, round_attr, rule

if TYPE_CHECKING:  # annotations only: the op registry loads without onnx
    import onnx


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
class Clip(OpDef):
    type = "clip"
    doc = "x clamped to [min, max]; relu6 by default"
    params = (Param("min", "float", 0.0), Param("max", "float", 6.0))

    def check_attrs(self, attrs: dict[str, Any]) -> None:
        if attrs["min"] > attrs["max"]:
            raise ParamError(f"'min' ({attrs['min']:g}) must not exceed 'max' ({attrs['max']:g})")

    def forward(self, node, inputs, ctx):
        a = node.attrs
        return _k.clip_forward(inputs[0], a["min"], a["max"]), (inputs[0] if ctx.train else None)

    def backward(self, node, saved, dy, ctx):
        return [_k.clip_backward(dy, saved, node.attrs["min"], node.attrs["max"])], {}

    def to_onnx(self, node, b) -> None:
        # Opset 11 on, min and max are inputs (dlc exports 11 and up).
        lo = b.initializer(f"{node.name}.min", np.array(node.attrs["min"], np.float32))
        hi = b.initializer(f"{node.name}.max", np.array(node.attrs["max"], np.float32))
        b.node("Clip", [node.inputs[0], lo, hi], node.outputs, node.name)


@register
class HardSigmoid(OpDef):
    type = "hard_sigmoid"
    doc = "max(0, min(1, alpha * x + beta)); ONNX's defaults (PyTorch's Hardsigmoid is alpha 1/6)"
    params = (Param("alpha", "float", 0.2), Param("beta", "float", 0.5))

    def forward(self, node, inputs, ctx):
        a = node.attrs
        return _k.hard_sigmoid_forward(inputs[0], a["alpha"], a["beta"]), (inputs[0] if ctx.train else None)

    def backward(self, node, saved, dy, ctx):
        return [_k.hard_sigmoid_backward(dy, saved, node.attrs["alpha"], node.attrs["beta"])], {}

    def to_onnx(self, node, b) -> None:
        b.node("HardSigmoid", [node.inputs[0]], node.outputs, node.name, alpha=node.attrs["alpha"],
               beta=node.attrs["beta"])


@register
class HardSwish(_Unary):
    type = "hard_swish"
    doc = "x * hard_sigmoid(x) with alpha 1/6, beta 1/2 (MobileNetV3)"
    saves_output = False

    def to_onnx(self, node, b) -> None:
        if b.opset >= 14:
            b.node("HardSwish", [node.inputs[0]], node.outputs, node.name)
            return
        # HardSwish is opset 14: before it, HardSigmoid + Mul (the same function).
        gate = b.fresh(f"{node.name}.gate")
        b.node("HardSigmoid", [node.inputs[0]], [gate], f"{node.name}/gate", alpha=1.0 / 6.0, beta=0.5)
        b.node("Mul", [node.inputs[0], gate], node.outputs, node.name)


@register
class Gelu(_Unary):
    type = "gelu"
    doc = "x * (1 + erf(x / sqrt 2)) / 2, the exact GELU (ConvNeXt, ViT)"
    saves_output = False

    def to_onnx(self, node, b) -> None:
        if b.opset >= 20:
            b.node("Gelu", [node.inputs[0]], node.outputs, node.name)
            return
        # Gelu is opset 20: before it, the erf form PyTorch's exporter writes (which import reads back).
        x = node.inputs[0]
        scaled, erf, plus, prod = (b.fresh(f"{node.name}.{s}") for s in ("scaled", "erf", "plus1", "xp"))
        b.node("Div", [x, b.initializer(f"{node.name}.sqrt2", np.array(np.sqrt(2.0), np.float32))], [scaled],
               f"{node.name}/div")
        b.node("Erf", [scaled], [erf], f"{node.name}/erf")
        b.node("Add", [erf, b.initializer(f"{node.name}.one", np.array(1.0, np.float32))], [plus],
               f"{node.name}/add")
        b.node("Mul", [x, plus], [prod], f"{node.name}/mul")
        b.node("Mul", [prod, b.initializer(f"{node.name}.half", np.array(0.5, np.float32))], node.outputs,
               node.name)


@register
class PRelu(OpDef):
    type = "prelu"
    doc = "x if x > 0 else slope[c] * x, a learned slope per channel"
    fillable = {"slope": {"type": "constant", "value": 0.25}}

    def infer(self, attrs: dict[str, Any], in_shapes: list[Shape]) -> tuple[Shape, dict[str, Any]]:
        if len(in_shapes[0]) not in (1, 3):
            raise ShapeError(f"expects C×H×W or a flat vector, got {fmt_shape(in_shapes[0])}")
        return in_shapes[0], attrs

    def param_shapes(self, attrs: dict[str, Any], in_shapes: list[Shape]) -> dict[str, Shape]:
        return {"slope": (in_shapes[0][0],)}

    def forward(self, node, inputs, ctx):
        return _k.prelu_forward(inputs[0], node.params["slope"]), (inputs[0] if ctx.train else None)

    def backward(self, node, saved, dy, ctx):
        dx, dslope = _k.prelu_backward(dy, saved, node.params["slope"])
        return [dx], {"slope": dslope}

    def to_onnx(self, node, b) -> None:
        slope = node.params["slope"]
        # PRelu broadcasts the slope against N×C×H×W from the right: C×1×1 for a feature map.
        shaped = slope.reshape(-1, 1, 1) if len(b.shapes[node.inputs[0]]) == 3 else slope
        b.node("PRelu", [node.inputs[0], b.initializer(f"{node.name}.slope", shaped)], node.outputs, node.name)


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
        rank = len(b.shapes[node.inputs[0]]) + 1  # with the batch axis
        trailing_ones = all(d == 1 for d in b.shapes[node.inputs[0]][1:]) and not b.dynamic_hw
        if b.opset >= 13 or rank == 2 or trailing_ones:
            # From opset 13 `axis` is the one axis; before it the input is flattened to 2-D at `axis`, which is
            # the same softmax when nothing (or only size-1 axes) follows the channels.
            b.node("Softmax", [node.inputs[0]], node.outputs, node.name, axis=1)
            return
        # Opsets 11 and 12 on N×C×H×W (or any rank): channels moved last, softmax over the last axis, moved back.
        last = b.fresh(f"{node.name}.channels_last")
        soft = b.fresh(f"{node.name}.softmax")
        b.node("Transpose", [node.inputs[0]], [last], f"{node.name}/to_channels_last",
               perm=[0, *range(2, rank), 1])
        b.node("Softmax", [last], [soft], f"{node.name}/softmax", axis=rank - 1)
        b.node("Transpose", [soft], node.outputs, node.name, perm=[0, rank - 1, *range(1, rank - 1)])


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


# --- import from ONNX (onnx_import.py walks the graph and calls these by op type) ---------------------------

@rule("Relu", "Sigmoid", "Tanh")
def _import_unary(imp, node: onnx.NodeProto) -> None:
    op = {"Relu": "relu", "Sigmoid": "sigmoid", "Tanh": "tanh"}[node.op_type]
    if node.op_type == "Sigmoid" and node.output[0] in imp.silu_sigmoids:
        return  # only read as x * sigmoid(x): the Mul becomes the silu layer
    imp.emit(node, op, [imp.value(node.input[0])], {})


@rule("LeakyRelu")
def _import_leaky_relu(imp, node: onnx.NodeProto) -> None:
    imp.emit(
        node, "leaky_relu", [imp.value(node.input[0])], {"slope": round_attr(attr(node, "alpha", 0.01))}
    )


@rule("Clip")
def _import_clip(imp, node: onnx.NodeProto) -> None:
    x = imp.value(node.input[0])
    if imp.opset < 11:  # bounds are attributes before opset 11
        lo, hi = attr(node, "min", -FLOAT32_MAX), attr(node, "max", FLOAT32_MAX)
    else:
        bounds = []
        for k, default in ((1, -FLOAT32_MAX), (2, FLOAT32_MAX)):
            value = imp.const(node, k)
            if value is None and len(node.input) > k and node.input[k]:
                raise Unsupported("its min or max is computed at run time")
            if value is not None and np.asarray(value).size != 1:
                raise Unsupported(f"its bound of shape {list(np.shape(value))} is not a scalar")
            bounds.append(default if value is None else float(np.asarray(value).reshape(-1)[0]))
        lo, hi = bounds
    lo, hi = (max(min(float(v), FLOAT32_MAX), -FLOAT32_MAX) for v in (lo, hi))  # -inf/inf: open
    lo, hi = (round_attr(v) if abs(v) < FLOAT32_MAX else v for v in (lo, hi))
    imp.emit(node, "clip", [x], {"min": lo, "max": hi})


@rule("HardSigmoid")
def _import_hard_sigmoid(imp, node: onnx.NodeProto) -> None:
    raw = {"alpha": round_attr(attr(node, "alpha", 0.2)), "beta": round_attr(attr(node, "beta", 0.5))}
    imp.emit(node, "hard_sigmoid", [imp.value(node.input[0])], raw)


@rule("HardSwish")
def _import_hard_swish(imp, node: onnx.NodeProto) -> None:
    imp.emit(node, "hard_swish", [imp.value(node.input[0])], {})


@rule("Gelu")
def _import_gelu(imp, node: onnx.NodeProto) -> None:
    if attr(node, "approximate", b"none") not in (b"none", "none"):
        raise Unsupported("approximate='tanh' (dlc's gelu is the exact erf form)")
    imp.emit(node, "gelu", [imp.value(node.input[0])], {})


@rule("PRelu")
def _import_prelu(imp, node: onnx.NodeProto) -> None:
    from ..passes.fold import channel_vector

    x = imp.value(node.input[0])
    slope = imp.const(node, 1)
    if slope is None:
        raise Unsupported("its slope is not a constant")
    shape = imp.shape(x)
    vec = channel_vector(np.asarray(slope), len(shape) + 1, shape[0])
    if vec is None:
        raise Unsupported(f"its slope of shape {list(np.shape(slope))} is not per channel or a scalar")
    imp.emit(node, "prelu", [x], {}, {"slope": vec})


@rule("Softmax")
def _import_softmax(imp, node: onnx.NodeProto) -> None:
    x = imp.value(node.input[0])
    axis = int(attr(node, "axis", 1 if imp.opset < 13 else -1))
    if len(imp.shape(x)) != 1 or axis not in (1, -1):
        raise Unsupported(f"on {fmt_shape(imp.shape(x))} along axis {axis} (dlc: N×classes, axis 1)")
    imp.emit(node, "softmax", [x], {})


@rule("Identity", "Dropout")
def _import_passthrough(imp, node: onnx.NodeProto) -> None:
    if (
        node.op_type == "Dropout"
        and len(node.output) > 1
        and node.output[1]
        and (imp.consumers.get(node.output[1]) or node.output[1] in imp.output_names)
    ):
        raise Unsupported("its mask output is used")
    imp.alias[node.output[0]] = imp.value(node.input[0])
