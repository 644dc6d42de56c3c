"""Batch normalization (ONNX BatchNormalization, inference form with running statistics)."""

from __future__ import annotations

from typing import Any

import numpy as np

from dlc._C import batchnorm as _k

from .base import OpDef, Param, Shape, ShapeError, fmt_shape, register


@register
class BatchNorm(OpDef):
    type = "batchnorm"
    doc = "batch normalization over channels; scale/bias learned, mean/var running statistics"
    params = (
        Param("eps", "float", 1e-5, minimum=0.0),
        Param("momentum", "float", 0.1, minimum=0.0, maximum=1.0, help="running-statistics update rate"),
    )
    fillable = {"scale": {"type": "constant", "value": 1.0}, "bias": {"type": "constant", "value": 0.0}}

    def infer(self, attrs: dict[str, Any], in_shapes: list[Shape]) -> tuple[Shape, dict[str, Any]]:
        if len(in_shapes[0]) not in (1, 3):
            raise ShapeError(f"expects C×H×W or a flat vector, got {fmt_shape(in_shapes[0])}")
        return in_shapes[0], attrs

    def param_shapes(self, attrs: dict[str, Any], in_shapes: list[Shape]) -> dict[str, Shape]:
        c = (in_shapes[0][0],)
        return {"scale": c, "bias": c, "mean": c, "var": c}

    def default_params(self, attrs: dict[str, Any], in_shapes: list[Shape]) -> dict[str, np.ndarray]:
        c = in_shapes[0][0]
        return {"mean": np.zeros(c, np.float32), "var": np.ones(c, np.float32)}

    def fan(self, attrs, in_shapes, out_shape) -> tuple[int, int]:
        return 1, 1

    def forward(self, node, inputs, ctx):
        x, p, eps = inputs[0], node.params, node.attrs["eps"]
        if not ctx.train:
            return _k.batchnorm_forward_eval(x, p["scale"], p["bias"], p["mean"], p["var"], eps), None
        y, mean, invstd = _k.batchnorm_forward_train(x, p["scale"], p["bias"], eps)
        # Running statistics: the batch variance made unbiased, blended in with weight `momentum` (PyTorch's).
        count = x.size // x.shape[1]
        var = (1.0 / np.square(invstd.astype(np.float64)) - eps) * count / max(count - 1, 1)
        m = node.attrs["momentum"]
        p["mean"][...] = (1 - m) * p["mean"] + m * mean
        p["var"][...] = (1 - m) * p["var"] + m * var.astype(np.float32)
        return y, (x, mean, invstd)

    def backward(self, node, saved, dy, ctx):
        x, mean, invstd = saved
        dx, dscale, dbias = _k.batchnorm_backward(dy, x, node.params["scale"], mean, invstd)
        return [dx], {"scale": dscale, "bias": dbias}

    def to_onnx(self, node, b) -> None:
        names = [b.initializer(f"{node.name}.{p}", node.params[p]) for p in ("scale", "bias", "mean", "var")]
        b.node("BatchNormalization", [node.inputs[0], *names], node.outputs, node.name, epsilon=node.attrs["eps"],
               momentum=1.0 - node.attrs["momentum"])  # ONNX's momentum weighs the old statistics
