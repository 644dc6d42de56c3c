"""Batch normalization (ONNX BatchNormalization, inference form with running statistics), layer normalization over
channels (ConvNeXt's LayerNorm2d), local response normalisation across channels (ONNX LRN), and a per-channel
affine scale and shift (ONNX Mul + Add)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from dlc._C import batchnorm as _k
from dlc._C import layernorm as _ln

from .base import OpDef, Param, Shape, ShapeError, fmt_shape, register
from .onnx_rules import Unsupported, attr, round_attr, rule

if TYPE_CHECKING:  # annotations only: the op registry loads without onnx
    import onnx


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
        if not ctx.train or node.name in ctx.frozen:
            y = _k.batchnorm_forward_eval(x, p["scale"], p["bias"], p["mean"], p["var"], eps)
            if not ctx.train:
                return y, None
            # frozen (transfer learning): the running statistics normalise and stay as they are; backward is
            # the fixed per-channel scale
            return y, ("frozen", p["scale"] / np.sqrt(p["var"].astype(np.float64) + eps))
        if ctx.sync_bn is not None:
            y, mean, invstd, count = _synced_forward(x, p, eps, ctx.sync_bn, node.name)
        else:
            y, mean, invstd = _k.batchnorm_forward_train(x, p["scale"], p["bias"], eps)
            count = x.size // x.shape[1]
        self._update_running(node, mean, invstd, count, eps)
        return y, (x, mean, invstd)

    def forward_relu(self, node, inputs, ctx):
        """This batch norm and the ReLU that alone reads it, in one pass (the executor fuses the pair where that
        is exact: not frozen, not synced over ranks); the output is the ReLU's, and backward() then takes the
        ReLU's upstream gradient."""
        x, p, eps = inputs[0], node.params, node.attrs["eps"]
        if not ctx.train:
            return _k.batchnorm_forward_eval(x, p["scale"], p["bias"], p["mean"], p["var"], eps, relu=True), None
        y, mean, invstd = _k.batchnorm_forward_train(x, p["scale"], p["bias"], eps, relu=True)
        self._update_running(node, mean, invstd, x.size // x.shape[1], eps)
        return y, (x, mean, invstd, y)

    @staticmethod
    def _update_running(node, mean, invstd, count: int, eps: float) -> None:
        # Running statistics: the batch variance made unbiased, blended in with weight `momentum` (PyTorch's).
        p = node.params
        var = (1.0 / np.square(invstd.astype(np.float64)) - eps) * count / max(count - 1, 1)
        m = node.attrs["momentum"]
        p["mean"][...] = (1 - m) * p["mean"] + m * mean
        p["var"][...] = (1 - m) * p["var"] + m * var.astype(np.float32)

    def backward(self, node, saved, dy, ctx):
        if len(saved) == 4:  # fused with its ReLU: dy is the ReLU's, masked inside the kernel
            x, mean, invstd, y = saved
            dx, dscale, dbias = _k.batchnorm_backward(dy, x, node.params["scale"], mean, invstd, y)
            return [dx], {"scale": dscale, "bias": dbias}
        if isinstance(saved[0], str):  # ("frozen", scale / sqrt(var + eps))
            k = saved[1].astype(np.float32).reshape((1, -1) + (1,) * (dy.ndim - 2))
            return [dy * k], {}
        x, mean, invstd = saved
        if ctx.sync_bn is not None:
            return _synced_backward(dy, x, node.params["scale"], mean, invstd, ctx.sync_bn, node.name)
        dx, dscale, dbias = _k.batchnorm_backward(dy, x, node.params["scale"], mean, invstd)
        return [dx], {"scale": dscale, "bias": dbias}

    def to_onnx(self, node, b) -> None:
        names = [b.initializer(f"{node.name}.{p}", node.params[p]) for p in ("scale", "bias", "mean", "var")]
        b.node("BatchNormalization", [node.inputs[0], *names], node.outputs, node.name, epsilon=node.attrs["eps"],
               momentum=1.0 - node.attrs["momentum"])  # ONNX's momentum weighs the old statistics


def _synced_forward(x, p, eps: float, world, name: str):
    """Training batch norm over every rank's batch (train.sync_bn): one allreduce of the per-channel sum, sum of
    squares and count (float64, so E[x²] − mean² keeps float32's precision), then the usual affine map."""
    x3 = x.reshape(x.shape[0], x.shape[1], -1)
    local = np.concatenate([x3.sum(axis=(0, 2), dtype=np.float64),
                            np.einsum("ncs,ncs->c", x3, x3, dtype=np.float64), [x3.shape[0] * x3.shape[2]]])
    total = world.allreduce_sum(local, f"batch-norm statistics of '{name}'")
    c = x.shape[1]
    count = int(total[-1])
    mean = total[:c] / count
    var = np.maximum(total[c:2 * c] / count - mean * mean, 0.0)
    y = _k.batchnorm_forward_eval(x, p["scale"], p["bias"], mean.astype(np.float32), var.astype(np.float32), eps)
    return y, mean.astype(np.float32), (1.0 / np.sqrt(var + eps)).astype(np.float32), count


def _synced_backward(dy, x, gamma, mean, invstd, world, name: str):
    """The gradient of batch norm over every rank's batch: Σdy and Σdy·(x − μ) are summed over the ranks for dx;
    dscale and dbias stay this rank's share (the gradient allreduce averages them like every other gradient)."""
    n, c = x.shape[0], x.shape[1]
    x3, dy3 = x.reshape(n, c, -1), dy.reshape(n, c, -1)
    xm = x3 - mean[None, :, None]
    local = np.concatenate([dy3.sum(axis=(0, 2), dtype=np.float64),
                            np.einsum("ncs,ncs->c", dy3, xm, dtype=np.float64), [n * x3.shape[2]]])
    total = world.allreduce_sum(local, f"batch-norm gradient of '{name}'")
    count = total[-1]
    inv = invstd.astype(np.float64)
    dy_mean = (total[:c] / count).astype(np.float32)[None, :, None]
    proj = (inv * inv * total[c:2 * c] / count).astype(np.float32)[None, :, None]
    k = (gamma.astype(np.float64) * inv).astype(np.float32)[None, :, None]
    dx = ((dy3 - dy_mean - xm * proj) * k).reshape(x.shape)
    return [dx], {"scale": (local[c:2 * c] * inv).astype(np.float32), "bias": local[:c].astype(np.float32)}


@register
class LayerNorm(OpDef):
    type = "layernorm"
    doc = "layer normalization over channels at each position (ConvNeXt's LayerNorm2d); scale/bias learned"
    params = (Param("eps", "float", 1e-6, minimum=0.0),)
    fillable = {"scale": {"type": "constant", "value": 1.0}, "bias": {"type": "constant", "value": 0.0}}

    def infer(self, attrs: dict[str, Any], in_shapes: list[Shape]) -> tuple[Shape, dict[str, Any]]:
        if len(in_shapes[0]) not in (1, 3):
            raise ShapeError(f"expects C×H×W or a flat vector, got {fmt_shape(in_shapes[0])}")
        return in_shapes[0], attrs

    def param_shapes(self, attrs: dict[str, Any], in_shapes: list[Shape]) -> dict[str, Shape]:
        return {"scale": (in_shapes[0][0],), "bias": (in_shapes[0][0],)}

    def fan(self, attrs, in_shapes, out_shape) -> tuple[int, int]:
        return 1, 1

    def forward(self, node, inputs, ctx):
        p = node.params
        y, mean, invstd = _ln.layernorm_forward(inputs[0], p["scale"], p["bias"], node.attrs["eps"])
        return y, ((inputs[0], mean, invstd) if ctx.train else None)

    def backward(self, node, saved, dy, ctx):
        x, mean, invstd = saved
        dx, dscale, dbias = _ln.layernorm_backward(dy, x, node.params["scale"], mean, invstd)
        return [dx], {"scale": dscale, "bias": dbias}

    def to_onnx(self, node, b) -> None:
        x, eps = node.inputs[0], node.attrs["eps"]
        scale = b.initializer(f"{node.name}.scale", node.params["scale"])
        bias = b.initializer(f"{node.name}.bias", node.params["bias"])
        spatial = len(b.shapes[x]) == 3
        if b.opset >= 17:  # LayerNormalization normalises trailing axes: channels last for a C×H×W map
            if not spatial:
                b.node("LayerNormalization", [x, scale, bias], node.outputs, node.name, axis=-1, epsilon=eps)
                return
            nhwc, normed = b.fresh(f"{node.name}.nhwc"), b.fresh(f"{node.name}.normed")
            b.node("Transpose", [x], [nhwc], f"{node.name}/to_nhwc", perm=[0, 2, 3, 1])
            b.node("LayerNormalization", [nhwc, scale, bias], [normed], f"{node.name}/ln", axis=-1, epsilon=eps)
            b.node("Transpose", [normed], node.outputs, f"{node.name}/to_nchw", perm=[0, 3, 1, 2])
            return
        # before opset 17: (x - mean) / sqrt(var + eps) * scale + bias, the means over axis 1
        shape = [-1, 1, 1] if spatial else [-1]
        scale_b = b.fresh(f"{node.name}.scale_b")
        bias_b = b.fresh(f"{node.name}.bias_b")
        b.node("Reshape", [scale, b.initializer(f"{node.name}.cshape", np.array(shape, np.int64))], [scale_b],
               f"{node.name}/scale_shape")
        b.node("Reshape", [bias, b.initializer(f"{node.name}.cshape2", np.array(shape, np.int64))], [bias_b],
               f"{node.name}/bias_shape")
        mean, d, sq, var, ve, std, xhat, scaled = (b.fresh(f"{node.name}.{t}") for t in (
            "mean", "d", "sq", "var", "ve", "std", "xhat", "scaled"))
        b.node("ReduceMean", [x], [mean], f"{node.name}/mean", axes=[1], keepdims=1)
        b.node("Sub", [x, mean], [d], f"{node.name}/sub")
        b.node("Mul", [d, d], [sq], f"{node.name}/sq")
        b.node("ReduceMean", [sq], [var], f"{node.name}/var", axes=[1], keepdims=1)
        b.node("Add", [var, b.initializer(f"{node.name}.eps", np.array(eps, np.float32))], [ve], f"{node.name}/eps")
        b.node("Sqrt", [ve], [std], f"{node.name}/sqrt")
        b.node("Div", [d, std], [xhat], f"{node.name}/div")
        b.node("Mul", [xhat, scale_b], [scaled], f"{node.name}/scale")
        b.node("Add", [scaled, bias_b], node.outputs, node.name)


def _window_sum(s: np.ndarray, below: int, above: int) -> np.ndarray:
    """out[:, c] = sum of s[:, c - below ... c + above] over the channels inside [0, C), via a cumulative sum."""
    c = s.shape[1]
    cum = np.zeros((s.shape[0], c + 1, *s.shape[2:]), np.float64)
    np.cumsum(s, axis=1, dtype=np.float64, out=cum[:, 1:])
    idx = np.arange(c)
    return cum[:, np.minimum(idx + above, c - 1) + 1] - cum[:, np.maximum(idx - below, 0)]


@register
class LRN(OpDef):
    type = "lrn"
    doc = "local response normalisation across channels (ONNX LRN): x / (bias + alpha/size * window sum x²)^beta"
    params = (
        Param("size", "int", 5, minimum=1, help="channels in the window"),
        Param("alpha", "float", 1e-4),
        Param("beta", "float", 0.75),
        Param("bias", "float", 1.0),
    )

    def infer(self, attrs: dict[str, Any], in_shapes: list[Shape]) -> tuple[Shape, dict[str, Any]]:
        if len(in_shapes[0]) != 3:
            raise ShapeError(f"expects a C×H×W feature map, got {fmt_shape(in_shapes[0])}")
        return in_shapes[0], attrs

    @staticmethod
    def _reach(size: int) -> tuple[int, int]:
        return (size - 1) // 2, size // 2  # channels below and above the centre (ONNX: floor and ceil)

    def forward(self, node, inputs, ctx):
        a, x = node.attrs, inputs[0]
        below, above = self._reach(a["size"])
        x64 = x.astype(np.float64)
        d = a["bias"] + a["alpha"] / a["size"] * _window_sum(x64 * x64, below, above)
        y = (x64 * d ** -a["beta"]).astype(np.float32)
        return y, ((x, d) if ctx.train else None)

    def backward(self, node, saved, dy, ctx):
        a = node.attrs
        x, d = saved
        below, above = self._reach(a["size"])
        x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
        scale = d ** -a["beta"]
        g = dy64 * x64 * scale / d * (-a["beta"] * a["alpha"] / a["size"])
        # d[c] reads x[c'] for c' in [c - below, c + above]: the transpose window sums c in [c' - above, c' + below].
        dx = dy64 * scale + 2.0 * x64 * _window_sum(g, above, below)
        return [dx.astype(np.float32)], {}

    def to_onnx(self, node, b) -> None:
        a = node.attrs
        b.node("LRN", [node.inputs[0]], node.outputs, node.name, size=a["size"], alpha=a["alpha"], beta=a["beta"],
               bias=a["bias"])


def _per_channel(v: np.ndarray, ndim: int) -> np.ndarray:
    """A (C,) vector shaped to broadcast along axis 1 of an N×C×... tensor of rank `ndim`."""
    return v.reshape((-1,) + (1,) * (ndim - 2))


@register
class Affine(OpDef):
    type = "affine"
    doc = "y = x * scale[c] + shift[c], a learned scale and shift per channel (e.g. input normalisation)"
    fillable = {"scale": {"type": "constant", "value": 1.0}, "shift": {"type": "constant", "value": 0.0}}

    def infer(self, attrs: dict[str, Any], in_shapes: list[Shape]) -> tuple[Shape, dict[str, Any]]:
        if len(in_shapes[0]) not in (1, 3):
            raise ShapeError(f"expects C×H×W or a flat vector, got {fmt_shape(in_shapes[0])}")
        return in_shapes[0], attrs

    def param_shapes(self, attrs: dict[str, Any], in_shapes: list[Shape]) -> dict[str, Shape]:
        c = (in_shapes[0][0],)
        return {"scale": c, "shift": c}

    def forward(self, node, inputs, ctx):
        x, p = inputs[0], node.params
        y = x * _per_channel(p["scale"], x.ndim) + _per_channel(p["shift"], x.ndim)
        return y.astype(np.float32, copy=False), (x if ctx.train else None)

    def backward(self, node, saved, dy, ctx):
        x = saved
        axes = tuple(k for k in range(dy.ndim) if k != 1)
        dx = (dy * _per_channel(node.params["scale"], dy.ndim)).astype(np.float32, copy=False)
        dscale = np.sum(dy.astype(np.float64) * x, axis=axes).astype(np.float32)
        dshift = np.sum(dy, axis=axes, dtype=np.float64).astype(np.float32)
        return [dx], {"scale": dscale, "shift": dshift}

    def to_onnx(self, node, b) -> None:
        # Mul then Add, both broadcasting from the right: C×1×1 for a feature map, C for a flat vector.
        spatial = len(b.shapes[node.inputs[0]]) == 3
        scale, shift = (node.params[p].reshape(-1, 1, 1) if spatial else node.params[p] for p in ("scale", "shift"))
        scale_name = b.initializer(f"{node.name}.scale", scale)
        shift_name = b.initializer(f"{node.name}.shift", shift)
        scaled = b.fresh(f"{node.name}.scaled")
        b.node("Mul", [node.inputs[0], scale_name], [scaled], f"{node.name}/mul")
        b.node("Add", [scaled, shift_name], node.outputs, node.name)


# --- import from ONNX (onnx_import.py walks the graph and calls these by op type) ---------------------------

@rule("BatchNormalization")
def _import_batchnorm(imp, node: onnx.NodeProto) -> None:
    x = imp.value(node.input[0])
    tensors = [imp.const(node, k) for k in range(1, 5)]
    if any(t is None for t in tensors):
        raise Unsupported("its scale, bias, mean or variance is not a constant")
    if attr(node, "training_mode", 0) or any(
        imp.consumers.get(o) or o in imp.output_names for o in node.output[1:] if o
    ):
        raise Unsupported("training mode (its batch statistics are used)")
    eps, momentum = (
        round_attr(attr(node, "epsilon", 1e-5)),
        round_attr(attr(node, "momentum", 0.9), complement=True),
    )
    imp.emit(
        node,
        "batchnorm",
        [x],
        {"eps": eps, "momentum": momentum},
        dict(zip(("scale", "bias", "mean", "var"), tensors)),
    )


@rule("LayerNormalization")
def _import_layer_norm(imp, node: onnx.NodeProto) -> None:
    """LayerNormalization over the channels: of a flat (N, C) tensor, or (see transpose) inside
    Transpose(0,2,3,1) ... Transpose(0,3,1,2), ConvNeXt's LayerNorm2d."""
    x = imp.value(node.input[0])
    if len(imp.shape(x)) != 1:
        raise Unsupported("it normalises more than the channel axis (dlc's layernorm is over channels: "
                           "of a flat tensor, or of a map between Transpose(0,2,3,1) and Transpose(0,3,1,2))")
    if int(attr(node, "axis", -1)) not in (-1, 1):
        raise Unsupported(f"axis {attr(node, 'axis', -1)} (dlc normalises over the channels only)")
    imp._emit_layer_norm(node, node, x)


@rule("LRN")
def _import_lrn(imp, node: onnx.NodeProto) -> None:
    raw = {
        "size": int(attr(node, "size", 0)),
        "alpha": round_attr(attr(node, "alpha", 1e-4)),
        "beta": round_attr(attr(node, "beta", 0.75)),
        "bias": round_attr(attr(node, "bias", 1.0)),
    }
    imp.emit(node, "lrn", [imp.feature_map(node)], raw)
