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
