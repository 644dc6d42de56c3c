"""2-D convolution (ONNX Conv): any kernel shape, stride, padding incl. 'same', dilation, groups; and its
transpose (ONNX ConvTranspose)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from dlc._C import conv as _k

from .base import OpDef, Param, ParamError, RField, Shape, ShapeError, fmt_shape, register
from .onnx_rules import Unsupported, attr, rule, text

if TYPE_CHECKING:  # annotations only: the op registry loads without onnx
    import onnx
from .window import onnx_pads, resolve_pads, window_output

# Shared by conv and conv_transpose (which adds output_padding after pad).
_CONV_PARAMS = (
    Param("out", "int", minimum=1, help="number of output channels"),
    Param("kernel", "pair", minimum=1, help="kernel size: k or [kh, kw]"),
    Param("stride", "pair", 1, minimum=1),
    Param("pad", "pad", 0),
    Param("dilation", "pair", 1, minimum=1),
    Param("groups", "int", 1, minimum=1),
    Param("bias", "bool", True),
)
_FILLERS = {"weight": {"type": "kaiming"}, "bias": {"type": "constant", "value": 0.0}}


@register
class Conv(OpDef):
    type = "conv"
    doc = "2-D convolution; weight O×(C/groups)×kh×kw"
    params = _CONV_PARAMS
    fillable = _FILLERS

    def check_attrs(self, attrs: dict[str, Any]) -> None:
        if attrs["out"] % attrs["groups"]:
            raise ParamError(f"out ({attrs['out']}) must be divisible by groups ({attrs['groups']})")

    def infer(self, attrs: dict[str, Any], in_shapes: list[Shape]) -> tuple[Shape, dict[str, Any]]:
        shape = in_shapes[0]
        if len(shape) != 3:
            raise ShapeError(f"expects a C×H×W feature map, got {fmt_shape(shape)}")
        if shape[0] % attrs["groups"]:
            raise ShapeError(f"input channels ({shape[0]}) must be divisible by groups ({attrs['groups']})")
        pads = resolve_pads(attrs["pad"], shape[1:], attrs["kernel"], attrs["stride"], attrs["dilation"])
        h, w = window_output(shape, attrs["kernel"], attrs["stride"], pads, attrs["dilation"])
        return (attrs["out"], h, w), {**attrs, "pads": pads}

    def param_shapes(self, attrs: dict[str, Any], in_shapes: list[Shape]) -> dict[str, Shape]:
        kh, kw = attrs["kernel"]
        shapes = {"weight": (attrs["out"], in_shapes[0][0] // attrs["groups"], kh, kw)}
        if attrs["bias"]:
            shapes["bias"] = (attrs["out"],)
        return shapes

    def fan(self, attrs: dict[str, Any], in_shapes: list[Shape], out_shape: Shape) -> tuple[int, int]:
        kh, kw = attrs["kernel"]
        g = attrs["groups"]
        return in_shapes[0][0] // g * kh * kw, attrs["out"] // g * kh * kw

    def macs(self, attrs: dict[str, Any], in_shapes: list[Shape], out_shape: Shape) -> int:
        kh, kw = attrs["kernel"]
        per_output = in_shapes[0][0] // attrs["groups"] * kh * kw
        return out_shape[0] * out_shape[1] * out_shape[2] * per_output

    def receptive(self, attrs: dict[str, Any], in_fields: list[RField], in_shapes: list[Shape]) -> RField:
        return in_fields[0].window(attrs["kernel"], attrs["stride"], attrs["pads"][:2], attrs["dilation"])

    def forward(self, node, inputs, ctx):
        a, x = node.attrs, inputs[0]
        out_hw = self.infer(a, [x.shape[1:]])[0][1:]
        y = _k.conv2d_forward(x, node.params["weight"], node.params.get("bias"), a["stride"], a["pads"],
                              a["dilation"], a["groups"], out_hw)
        return y, (x if ctx.train else None)

    def backward(self, node, saved, dy, ctx):
        a = node.attrs
        dx, dw, db = _k.conv2d_backward(saved, node.params["weight"], dy, a["stride"], a["pads"], a["dilation"],
                                        a["groups"], ctx.need_input_grad[0], "bias" in node.params)
        grads = {"weight": dw}
        if db is not None:
            grads["bias"] = db
        return [dx], grads

    def to_onnx(self, node, b) -> None:
        inputs = b.weight_inputs(node)
        a = node.attrs
        b.node("Conv", inputs, node.outputs, node.name, kernel_shape=list(a["kernel"]),
               strides=list(a["stride"]), **onnx_pads(a, b.dynamic_hw), dilations=list(a["dilation"]),
               group=a["groups"])


@register
class ConvTranspose(OpDef):
    type = "conv_transpose"
    doc = "2-D transposed convolution (ONNX ConvTranspose); weight C×(out/groups)×kh×kw"
    params = _CONV_PARAMS[:4] + (Param("output_padding", "pair", 0, minimum=0),) + _CONV_PARAMS[4:]
    fillable = _FILLERS

    def check_attrs(self, attrs: dict[str, Any]) -> None:
        if attrs["pad"] == "same":
            raise ParamError("'pad' of a conv_transpose must be explicit: an integer, [h, w] or [t, l, b, r]")
        if attrs["out"] % attrs["groups"]:
            raise ParamError(f"out ({attrs['out']}) must be divisible by groups ({attrs['groups']})")
        for a in range(2):
            if attrs["output_padding"][a] >= attrs["stride"][a]:
                raise ParamError(
                    f"output_padding {list(attrs['output_padding'])} must be smaller than the stride "
                    f"{list(attrs['stride'])}"
                )

    def infer(self, attrs: dict[str, Any], in_shapes: list[Shape]) -> tuple[Shape, dict[str, Any]]:
        shape = in_shapes[0]
        if len(shape) != 3:
            raise ShapeError(f"expects a C×H×W feature map, got {fmt_shape(shape)}")
        if shape[0] % attrs["groups"]:
            raise ShapeError(f"input channels ({shape[0]}) must be divisible by groups ({attrs['groups']})")
        pads = (0, 0, 0, 0) if attrs["pad"] == "valid" else tuple(attrs["pad"])
        hw = []
        for a in range(2):
            k = (attrs["kernel"][a] - 1) * attrs["dilation"][a] + 1
            n = (shape[a + 1] - 1) * attrs["stride"][a] - pads[a] - pads[a + 2] + k + attrs["output_padding"][a]
            if n < 1:
                raise ShapeError(
                    f"output {'height' if a == 0 else 'width'} would be {n} for input {fmt_shape(shape)} "
                    f"with pads {list(pads)}; reduce the padding"
                )
            hw.append(n)
        return (attrs["out"], hw[0], hw[1]), {**attrs, "pads": pads}

    def param_shapes(self, attrs: dict[str, Any], in_shapes: list[Shape]) -> dict[str, Shape]:
        kh, kw = attrs["kernel"]
        shapes = {"weight": (in_shapes[0][0], attrs["out"] // attrs["groups"], kh, kw)}
        if attrs["bias"]:
            shapes["bias"] = (attrs["out"],)
        return shapes

    def fan(self, attrs: dict[str, Any], in_shapes: list[Shape], out_shape: Shape) -> tuple[int, int]:
        # Each output pixel sums about C/groups * kh * kw / (sh * sw) inputs.
        kh, kw = attrs["kernel"]
        sh, sw = attrs["stride"]
        g = attrs["groups"]
        return max(1, in_shapes[0][0] // g * kh * kw // (sh * sw)), attrs["out"] // g * kh * kw

    def macs(self, attrs: dict[str, Any], in_shapes: list[Shape], out_shape: Shape) -> int:
        kh, kw = attrs["kernel"]
        c, h, w = in_shapes[0]
        return c * h * w * (attrs["out"] // attrs["groups"]) * kh * kw

    def receptive(self, attrs: dict[str, Any], in_fields: list[RField], in_shapes: list[Shape]) -> RField:
        f = in_fields[0]
        size, jump, start = [], [], []
        for a in range(2):
            k = (attrs["kernel"][a] - 1) * attrs["dilation"][a] + 1
            s = attrs["stride"][a]
            size.append(f.size[a] + (k - 1) / s * f.jump[a])  # an output sees about (k - 1) / s + 1 inputs
            jump.append(f.jump[a] / s)
            start.append(f.start[a] + (attrs["pads"][a] - (k - 1) / 2) / s * f.jump[a])
        return RField(tuple(size), tuple(jump), tuple(start))

    # y = convT(x, w) is the input gradient of the convolution z = conv(y', w) that maps out -> C channels:
    # forward is that conv's backward-input, backward-input is its forward, and the weight gradient is its
    # weight gradient with the roles of input and upstream gradient swapped.
    def forward(self, node, inputs, ctx):
        a, x = node.attrs, inputs[0]
        out_shape = self.infer(a, [x.shape[1:]])[0]
        w = node.params["weight"]
        y = _k.conv2d_backward_input(x, w, (x.shape[0], *out_shape), a["stride"], a["pads"], a["dilation"],
                                     a["groups"])
        if "bias" in node.params:
            y += node.params["bias"].reshape(1, -1, 1, 1)
        return y, (x if ctx.train else None)

    def backward(self, node, saved, dy, ctx):
        a, x = node.attrs, saved
        w = node.params["weight"]
        dx = None
        if ctx.need_input_grad[0]:
            dx = _k.conv2d_forward(dy, w, None, a["stride"], a["pads"], a["dilation"], a["groups"], x.shape[2:])
        _, dw, _ = _k.conv2d_backward(dy, w, x, a["stride"], a["pads"], a["dilation"], a["groups"], False, False)
        grads = {"weight": dw}
        if "bias" in node.params:
            grads["bias"] = dy.sum(axis=(0, 2, 3), dtype=np.float64).astype(np.float32)
        return [dx], grads

    def to_onnx(self, node, b) -> None:
        inputs = b.weight_inputs(node)
        a = node.attrs
        b.node("ConvTranspose", inputs, node.outputs, node.name, kernel_shape=list(a["kernel"]),
               strides=list(a["stride"]), pads=list(a["pads"]), dilations=list(a["dilation"]), group=a["groups"],
               output_padding=list(a["output_padding"]))


# --- import from ONNX (onnx_import.py walks the graph and calls these by op type) ---------------------------

@rule("Conv")
def _import_conv(imp, node: onnx.NodeProto) -> None:
    x = imp.value(node.input[0])
    w, b, kernel = imp.conv_weights(node, "convolution")
    if len(imp.shape(x)) != 3:
        raise Unsupported(f"its input is {fmt_shape(imp.shape(x))}, not a C×H×W feature map")
    strides = [int(s) for s in attr(node, "strides", [1, 1])]
    dilations = [int(d) for d in attr(node, "dilations", [1, 1])]
    pads = imp.pads(node, imp.shape(x)[1:], kernel, strides, dilations)
    params = {"weight": w} if b is None else {"weight": w, "bias": b}
    imp.emit(
        node,
        "conv",
        [x],
        {
            "out": int(w.shape[0]),
            "kernel": kernel,
            "stride": strides,
            "pad": pads,
            "dilation": dilations,
            "groups": int(attr(node, "group", 1)),
            "bias": b is not None,
        },
        params,
    )


@rule("ConvTranspose")
def _import_conv_transpose(imp, node: onnx.NodeProto) -> None:
    x = imp.feature_map(node)
    w, b, kernel = imp.conv_weights(node, "transposed convolution")
    auto = text(attr(node, "auto_pad", "NOTSET"))
    if auto not in ("NOTSET", ""):
        raise Unsupported(f"auto_pad {auto} (dlc imports explicit pads)")
    pads = [int(p) for p in attr(node, "pads", [0, 0, 0, 0])]
    if len(pads) != 4 or min(pads) < 0:
        raise Unsupported(f"pads {pads}")
    group = int(attr(node, "group", 1))
    strides = [int(s) for s in attr(node, "strides", [1, 1])]
    output_padding = [int(p) for p in attr(node, "output_padding", [0, 0])]
    dilations = [int(d) for d in attr(node, "dilations", [1, 1])]
    wanted = attr(node, "output_shape")
    if wanted is not None:
        # ONNX then ignores pads and works them out: the odd pixel of padding at the start (auto_pad NOTSET).
        wanted = [int(v) for v in wanted][-2:]
        hw = imp.shape(x)[1:]
        total = [
            strides[a] * (hw[a] - 1) + output_padding[a] + (kernel[a] - 1) * dilations[a] + 1 - wanted[a]
            for a in range(2)
        ]
        implied = [t - t // 2 for t in total] + [t // 2 for t in total]
        if min(total) < 0 or (attr(node, "pads") is not None and pads != implied):
            raise Unsupported(f"output_shape {wanted} does not agree with its pads {pads}")
        pads = implied
    raw = {
        "out": int(w.shape[1]) * group,
        "kernel": kernel,
        "stride": strides,
        "pad": pads,
        "output_padding": output_padding,
        "dilation": dilations,
        "groups": group,
        "bias": b is not None,
    }
    params = {"weight": w} if b is None else {"weight": w, "bias": b}
    imp.emit(node, "conv_transpose", [x], raw, params)
