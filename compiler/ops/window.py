"""The sliding-window shape rule shared by convolution and pooling: N = (W − F + 2P) / S + 1, with dilation."""

from __future__ import annotations

import math
from typing import Any

from .base import Shape, ShapeError, fmt_shape


def resolve_pads(pad: Any, hw: tuple[int, int], kernel: tuple[int, int], stride: tuple[int, int],
                 dilation: tuple[int, int]) -> tuple[int, int, int, int]:
    """Turn a pad attribute into explicit (top, left, bottom, right) pads for this input size.

    'same' follows TensorFlow/ONNX SAME_UPPER: output = ceil(input / stride), the odd pixel of padding at the end.
    """
    if pad == "valid":
        return (0, 0, 0, 0)
    if pad != "same":
        return tuple(pad)
    begin, end = [], []
    for a in range(2):
        k = (kernel[a] - 1) * dilation[a] + 1
        out = math.ceil(hw[a] / stride[a])
        total = max((out - 1) * stride[a] + k - hw[a], 0)
        begin.append(total // 2)
        end.append(total - total // 2)
    return (begin[0], begin[1], end[0], end[1])


def window_output(in_shape: Shape, kernel: tuple[int, int], stride: tuple[int, int],
                  pads: tuple[int, int, int, int], dilation: tuple[int, int] = (1, 1),
                  ceil_mode: bool = False, what: str = "kernel") -> tuple[int, int]:
    """Output (H, W) of a sliding window; raises ShapeError when the window does not fit."""
    if len(in_shape) != 3:
        raise ShapeError(f"expects a C×H×W feature map, got {fmt_shape(in_shape)}")
    _, h, w = in_shape
    out = []
    for a, size in enumerate((h, w)):
        padded = size + pads[a] + pads[a + 2]
        k = (kernel[a] - 1) * dilation[a] + 1
        if k > padded:
            axis = "height" if a == 0 else "width"
            dil = f" (dilated to {k})" if dilation[a] > 1 else ""
            raise ShapeError(
                f"{what} {kernel[0]}×{kernel[1]}{dil} is larger than the padded input {axis}: input "
                f"{fmt_shape(in_shape)}, padded {axis} {padded}; reduce the {what} or add padding"
            )
        span = padded - k
        n = (math.ceil(span / stride[a]) if ceil_mode else span // stride[a]) + 1
        if ceil_mode and (n - 1) * stride[a] >= size + pads[a]:
            n -= 1  # the last window must start inside the input or its leading padding (as in PyTorch)
        out.append(n)
    return out[0], out[1]


def same_pads_vary(attrs: dict[str, Any]) -> bool:
    """Whether a window layer's resolved 'same' pads depend on the input size: a stride above 1 with a kernel
    wider than one pixel on some axis (at stride 1 the pads are k - 1 at every size)."""
    if attrs.get("pad") != "same":
        return False
    dilation = attrs.get("dilation", (1, 1))
    return any(attrs["stride"][a] > 1 and (attrs["kernel"][a] - 1) * dilation[a] > 0 for a in range(2))


def onnx_pads(attrs: dict[str, Any], dynamic_hw: bool) -> dict[str, Any]:
    """A window op's ONNX padding: the resolved pads, or, in a file whose height/width vary and where 'same'
    pads change with the size, auto_pad SAME_UPPER (ONNX's rule is dlc's 'same'; compiler/dynamic_shapes.py
    refuses the layers onnxruntime cannot run that way)."""
    if dynamic_hw and same_pads_vary(attrs):
        return {"auto_pad": "SAME_UPPER"}
    return {"pads": list(attrs["pads"])}
