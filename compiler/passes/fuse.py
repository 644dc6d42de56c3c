"""Fusions of a small op into its neighbour: a bias Add into the Conv or MatMul before it (fuse_bias), and a
zero Pad into the padding of the Conv or pool after it (fuse_pad). Each fires only where it is exact and the
intermediate tensor has no other reader and is not a graph output."""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import helper

from .fold import (
    channel_vector,
    const_of,
    is_float,
    is_std,
    known_ranks,
    prune_dead,
    set_input,
    single_reader,
)
from .graph import OnnxGraph, attr, set_attr
from .registry import register_pass


# --- fuse_bias ----------------------------------------------------------------------------------------------
def _conv_bias(g: OnnxGraph, conv: onnx.NodeProto, add: onnx.NodeProto, c: np.ndarray, producers) -> bool:
    """Conv without bias + Add(per-channel constant) -> Conv with that bias."""
    if len(conv.input) > 2 and conv.input[2]:
        return False
    w = const_of(g, conv.input[1], producers) if len(conv.input) > 1 else None
    if w is None or w.ndim < 3 or w.dtype != c.dtype:
        return False
    vec = channel_vector(c, w.ndim, w.shape[0])
    if vec is None:
        return False
    set_input(conv, 2, g.add_init(f"{conv.name or conv.output[0]}_B", vec.astype(c.dtype)))
    conv.output[0] = add.output[0]
    g.remove(add)
    return True


def _matmul_gemm(
    g: OnnxGraph,
    mm: onnx.NodeProto,
    add: onnx.NodeProto,
    c_name: str,
    c: np.ndarray,
    producers,
    ranks: dict[str, int],
) -> bool:
    """MatMul(A of rank 2, constant (K, N)) + Add(constant (N,) or (1, N)) -> Gemm(A, W, C)."""
    if g.opset() < 7:  # Gemm before opset 7 broadcast only when told to
        return False
    w = const_of(g, mm.input[1], producers)
    if w is None or w.ndim != 2 or w.dtype != c.dtype or ranks.get(mm.input[0]) != 2:
        return False
    if channel_vector(c, 2, w.shape[1]) is None:
        return False
    gemm = helper.make_node(
        "Gemm",
        [mm.input[0], mm.input[1], c_name],
        [add.output[0]],
        name=mm.name or add.name or f"{add.output[0]}_gemm",
    )
    g.nodes[next(k for k, n in enumerate(g.nodes) if n is mm)] = gemm
    g.remove(add)
    return True


@register_pass("fuse_bias")
def fuse_bias(g: OnnxGraph) -> int:
    """Conv (no bias) + per-channel Add -> Conv with bias; MatMul (2-D, constant weight) + Add -> Gemm."""
    count, ranks = 0, None
    index = None  # rebuilt only after a fusion: a failed attempt changes nothing
    for add in [n for n in g.nodes if n.op_type == "Add" and is_std(n) and len(n.input) == 2]:
        index = index or (g.producers(), g.consumers())
        producers, consumers = index
        for k in (0, 1):
            y, c_name = add.input[k], add.input[1 - k]
            layer = producers.get(y)
            if layer is None or not is_std(layer) or layer.op_type not in ("Conv", "MatMul"):
                continue
            c = const_of(g, c_name, producers)
            if not is_float(c) or not single_reader(g, y, consumers):
                continue
            if layer.op_type == "Conv":
                done = _conv_bias(g, layer, add, c, producers)
            else:
                if ranks is None:
                    ranks = known_ranks(g)
                done = _matmul_gemm(g, layer, add, c_name, c, producers, ranks)
            if done:
                count, index = count + 1, None
                break
    return count


# --- fuse_pad -----------------------------------------------------------------------------------------------
def _pad_spec(
    g: OnnxGraph, pad: onnx.NodeProto, rank: int | None, producers
) -> tuple[list[int], float] | None:
    """(pads as [begins..., ends...] over all axes, the pad value) of a constant-mode Pad, if known."""
    if attr(pad, "mode", b"constant") not in (b"constant", "constant"):
        return None
    axes = None
    if g.opset() >= 11:
        pads = const_of(g, pad.input[1], producers) if len(pad.input) > 1 else None
        if pads is None:
            return None
        value = 0.0
        if len(pad.input) > 2 and pad.input[2]:
            v = const_of(g, pad.input[2], producers)
            if v is None or v.size != 1:
                return None
            value = float(v.reshape(-1)[0])
        if len(pad.input) > 3 and pad.input[3]:
            axes = const_of(g, pad.input[3], producers)
            if axes is None:
                return None
        pads = [int(p) for p in np.asarray(pads).reshape(-1)]
    else:
        pads = attr(pad, "pads")
        if pads is None:
            return None
        pads, value = [int(p) for p in pads], float(attr(pad, "value", 0.0))
    if axes is None:
        return pads, value
    if rank is None or len(pads) != 2 * len(axes):
        return None
    full = [0] * (2 * rank)
    for j, a in enumerate(int(a) for a in np.asarray(axes).reshape(-1)):
        a = a + rank if a < 0 else a
        if not 0 <= a < rank:
            return None
        full[a], full[a + rank] = pads[j], pads[j + len(axes)]
    return full, value


def _kernel_rank(g: OnnxGraph, node: onnx.NodeProto, producers) -> int | None:
    kernel = attr(node, "kernel_shape")
    if kernel is not None:
        return len(kernel)
    if node.op_type == "Conv" and len(node.input) > 1:
        w = const_of(g, node.input[1], producers)
        if w is not None:
            return w.ndim - 2
    return None


def _fuse_pad_once(g: OnnxGraph, pad: onnx.NodeProto, producers, consumers) -> bool:
    y = pad.output[0]
    if len(pad.input) < 1 or not single_reader(g, y, consumers):
        return False
    node = consumers[y][0]
    if not is_std(node) or node.op_type not in ("Conv", "AveragePool", "MaxPool") or node.input[0] != y:
        return False
    if attr(node, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        return False
    k_rank = _kernel_rank(g, node, producers)
    spec = _pad_spec(g, pad, None if k_rank is None else k_rank + 2, producers)
    if spec is None:
        return False
    pads, value = spec
    rank = len(pads) // 2
    if len(pads) % 2 or rank < 3 or (k_rank is not None and k_rank != rank - 2) or min(pads) < 0:
        return False
    if pads[0] or pads[1] or pads[rank] or pads[rank + 1]:  # batch or channel padding
        return False
    spatial = rank - 2
    own = [int(p) for p in attr(node, "pads", [0] * 2 * spatial)]
    if len(own) != 2 * spatial:
        return False
    new = [own[i] + pads[2 + i] for i in range(spatial)] + [
        own[spatial + i] + pads[rank + 2 + i] for i in range(spatial)
    ]
    if node.op_type == "Conv":
        if value != 0.0:
            return False
    else:
        if int(attr(node, "ceil_mode", 0)):  # windows past the end count differently: leave them alone
            return False
        kernel = attr(node, "kernel_shape")
        if kernel is None or any(
            new[i] >= kernel[i] or new[spatial + i] >= kernel[i] for i in range(spatial)
        ):
            return False  # onnxruntime wants pads smaller than the kernel
        if node.op_type == "AveragePool":
            if value != 0.0 or (any(own) and not int(attr(node, "count_include_pad", 0))):
                return False
            set_attr(node, "count_include_pad", 1)
        else:  # MaxPool: its implicit padding is -inf; the indices output would count padded positions
            if not (math.isinf(value) and value < 0):
                return False
            if (
                len(node.output) > 1
                and node.output[1]
                and (node.output[1] in consumers or node.output[1] in g.output_names)
            ):
                return False
    set_attr(node, "pads", new)
    node.input[0] = pad.input[0]
    g.remove(pad)
    prune_dead(g, [i for i in pad.input[1:] if i])
    return True


@register_pass("fuse_pad")
def fuse_pad(g: OnnxGraph) -> int:
    """A constant Pad on the spatial axes into the `pads` of the Conv, AveragePool or MaxPool after it."""
    pads = [n for n in g.nodes if n.op_type == "Pad" and is_std(n)]
    # last first: in a chain Pad -> Pad -> Conv (PyTorch's opset-9 export), the second fuses, then the first
    count, index = 0, None
    for pad in reversed(pads):
        index = index or (g.producers(), g.consumers())  # rebuilt only after a fusion
        if _fuse_pad_once(g, pad, *index):
            count, index = count + 1, None
    return count
