"""Folding constants into the layer before them: BatchNormalization (fold_bn) and a per-channel Mul/Add/Sub
(fold_scale) become the weights and bias of the Conv, ConvTranspose, Gemm or MatMul that feeds them.

Each fold is exact in arithmetic (y*s + t distributed over the layer's sum) and fires only where nothing else
can see the intermediate tensor: the layer's output has one reader and is not a graph output, and every value
that is folded is a constant (an initializer, a Constant node, or an Identity of one).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from .graph import OnnxGraph, attr, constant_value, set_attr
from .registry import register_pass

FOLD_INTO = ("Conv", "ConvTranspose", "Gemm", "MatMul")


# --- helpers shared with fuse.py ----------------------------------------------------------------------------
def is_std(node: onnx.NodeProto) -> bool:
    return node.domain in ("", "ai.onnx")


def const_of(
    g: OnnxGraph, name: str, producers: dict[str, onnx.NodeProto] | None = None
) -> np.ndarray | None:
    """The value of `name` if it is a constant: an initializer, a Constant node, or an Identity chain of one
    (the legacy PyTorch exporter routes shared parameters through Identity)."""
    if not name:
        return None
    producers = g.producers() if producers is None else producers
    for _ in range(64):
        node = producers.get(name)
        if node is not None and node.op_type == "Identity" and is_std(node) and name not in g.inits:
            name = node.input[0]
            continue
        if name in g.inits:
            return g.inits[name]
        return constant_value(node) if node is not None and node.op_type == "Constant" else None
    return None


def is_float(a: np.ndarray | None) -> bool:
    return a is not None and np.issubdtype(a.dtype, np.floating)


def single_reader(g: OnnxGraph, name: str, consumers: dict[str, list[onnx.NodeProto]]) -> bool:
    """True if exactly one node reads `name` (once) and it is not a graph output."""
    readers = consumers.get(name, [])
    return name not in g.output_names and len(readers) == 1 and list(readers[0].input).count(name) == 1


def channel_vector(c: np.ndarray, rank: int, channels: int) -> np.ndarray | None:
    """`c` as a float64 vector of length `channels` if, broadcast against a rank-`rank` tensor, it varies only
    along axis 1 (and so leaves the tensor's shape alone); None otherwise."""
    if c.ndim > rank:
        return None
    shape = (1,) * (rank - c.ndim) + c.shape
    if any(d != 1 for k, d in enumerate(shape) if k != 1) or shape[1] not in (1, channels):
        return None
    return np.broadcast_to(c.astype(np.float64).reshape(-1), (channels,)).copy()


def known_ranks(g: OnnxGraph) -> dict[str, int]:
    """Ranks of the graph's values that ONNX shape inference can tell (empty if it fails)."""
    try:
        model = onnx.shape_inference.infer_shapes(g.shape_model())
    except Exception:  # noqa: BLE001 — unknown ops or bad shapes: we simply know nothing
        return {}
    ranks = {k: v.ndim for k, v in g.inits.items()}
    graph = model.graph
    for info in [*graph.input, *graph.value_info, *graph.output]:
        t = info.type.tensor_type
        if info.type.HasField("tensor_type") and t.HasField("shape"):
            ranks[info.name] = len(t.shape.dim)
    return ranks


def prune_dead(g: OnnxGraph, names: list[str]) -> None:
    """Remove Constant/Identity nodes left without readers after their value was replaced by a new one.
    The graph's indexes are built once per call (and kept current here), not once per name: on a 1,700-node
    graph rebuilding them per name made fold_bn quadratic (10 s)."""
    producers = g.producers()
    todo = [n for n in names if n and n in producers]
    if not todo:
        return
    consumers = g.consumers()
    while todo:
        name = todo.pop()
        if name in g.output_names or consumers.get(name):
            continue
        node = producers.get(name)
        if (
            node is not None
            and is_std(node)
            and node.op_type in ("Constant", "Identity")
            and len(node.output) == 1
        ):
            g.remove(node)
            producers.pop(name, None)
            for i in node.input:
                if i:
                    consumers[i] = [c for c in consumers.get(i, []) if c is not node]
                    todo.append(i)


def set_input(node: onnx.NodeProto, k: int, name: str) -> None:
    while len(node.input) <= k:
        node.input.append("")
    node.input[k] = name


def absorb(g: OnnxGraph, layer: onnx.NodeProto, tail: onnx.NodeProto) -> None:
    """`layer` takes over `tail`'s output name (so graph outputs keep theirs) and `tail` goes."""
    layer.output[0] = tail.output[0]
    g.remove(tail)


def scale_out_channels(layer: onnx.NodeProto, w: np.ndarray, s: np.ndarray) -> np.ndarray | None:
    """Weight `w` of a Conv/ConvTranspose/Gemm/MatMul with every output channel k multiplied by s[k] (float64
    arithmetic, the weight's dtype back); None if the shapes don't line up."""
    op, wd = layer.op_type, w.astype(np.float64)
    if op == "Conv":
        if w.ndim < 3 or w.shape[0] != s.size:
            return None
        out = wd * s.reshape((-1,) + (1,) * (w.ndim - 1))
    elif op == "ConvTranspose":  # (C_in, C_out/group, k...): output channel = group * C_out/group + j
        group = int(attr(layer, "group", 1))
        if w.ndim < 3 or group < 1 or w.shape[0] % group or w.shape[1] * group != s.size:
            return None
        per = w.shape[1]
        grouped = wd.reshape((group, w.shape[0] // group, per) + w.shape[2:])
        out = (grouped * s.reshape((group, 1, per) + (1,) * (w.ndim - 2))).reshape(w.shape)
    elif op == "Gemm":
        if w.ndim != 2:
            return None
        trans = int(attr(layer, "transB", 0))
        if w.shape[0 if trans else 1] != s.size:
            return None
        out = wd * (s[:, None] if trans else s[None, :])
    elif op == "MatMul":
        if w.ndim != 2 or w.shape[1] != s.size:
            return None
        out = wd * s[None, :]
    else:
        return None
    return out.astype(w.dtype)


def out_channels(layer: onnx.NodeProto, w: np.ndarray) -> int:
    if layer.op_type == "Conv":
        return w.shape[0]
    if layer.op_type == "ConvTranspose":
        return w.shape[1] * int(attr(layer, "group", 1))
    if layer.op_type == "Gemm":
        return w.shape[0] if int(attr(layer, "transB", 0)) else w.shape[1]
    return w.shape[-1]


def out_rank(layer: onnx.NodeProto, w: np.ndarray, ranks: dict[str, int] | None) -> int | None:
    """The rank of the layer's output, where it is known (convs: the weight's rank; Gemm: 2)."""
    if layer.op_type in ("Conv", "ConvTranspose"):
        return w.ndim
    if layer.op_type == "Gemm":
        return 2
    if ranks is not None and ranks.get(layer.input[0]) == 2 and w.ndim == 2:
        return 2
    return None


class _Layer:
    """A Conv/ConvTranspose/Gemm/MatMul whose weight (and bias, if any) are constants, with an affine
    y -> y*s + t per output channel applied to it."""

    def __init__(self, g: OnnxGraph, node: onnx.NodeProto, producers):
        self.g, self.node = g, node
        self.w = const_of(g, node.input[1], producers) if len(node.input) > 1 else None
        self.has_bias = len(node.input) > 2 and bool(node.input[2])
        self.b = const_of(g, node.input[2], producers) if self.has_bias else None

    @property
    def ok(self) -> bool:
        if not is_float(self.w) or (self.has_bias and not is_float(self.b)):
            return False
        return self.node.op_type != "MatMul" or not self.has_bias

    def channels(self) -> int:
        return out_channels(self.node, self.w)

    def apply(self, s: np.ndarray | None, t: np.ndarray | None, tail: onnx.NodeProto) -> bool:
        """Fold y*s + t (s or t None: 1 or 0) into the layer and drop `tail`; False (and nothing changed) if
        it cannot be done."""
        g, node, w, n = self.g, self.node, self.w, self.channels()
        new_w = scale_out_channels(node, w, s) if s is not None else None
        if s is not None and new_w is None:
            return False
        scale = np.ones(n) if s is None else s
        shift = np.zeros(n) if t is None else t
        attrs: dict[str, float] = {}
        new_b = add_node = None
        if node.op_type == "Gemm":  # alpha*A@B + beta*C  ->  A@(alpha*B*s) + (beta*C*s + t)
            alpha, beta = float(attr(node, "alpha", 1.0)), float(attr(node, "beta", 1.0))
            if new_w is not None and alpha != 1.0:
                new_w, attrs["alpha"] = (new_w.astype(np.float64) * alpha).astype(w.dtype), 1.0
            if self.has_bias or t is not None:
                c = self.b.astype(np.float64) * beta if self.has_bias else np.zeros(())
                try:
                    new_b = c * scale + shift
                except ValueError:
                    return False
                if new_b.ndim > 2:
                    return False
                if beta != 1.0:
                    attrs["beta"] = 1.0
        elif node.op_type == "MatMul":  # no bias input: the shift becomes an Add after it
            if np.any(shift != 0):
                add_node = shift
        elif self.has_bias or t is not None:
            b = self.b.astype(np.float64) if self.has_bias else np.zeros(n)
            if b.shape != (n,):
                return False
            new_b = b * scale + shift

        base, old = node.name or node.output[0], [*node.input[1:], *tail.input]
        if new_w is not None:
            set_input(node, 1, g.add_init(f"{base}_W", new_w))
        if new_b is not None:
            set_input(
                node,
                2,
                g.add_init(f"{base}_C" if node.op_type == "Gemm" else f"{base}_B", new_b.astype(w.dtype)),
            )
        for key, value in attrs.items():
            set_attr(node, key, value)
        if add_node is not None:
            mid = g.fresh(node.output[0])
            bias = g.add_init(f"{base}_bias", add_node.astype(w.dtype))
            g.nodes.insert(
                next(k for k, m in enumerate(g.nodes) if m is tail),
                helper.make_node("Add", [mid, bias], [tail.output[0]], name=tail.name or f"{mid}_add"),
            )
            node.output[0] = mid
            g.remove(tail)
        else:
            absorb(g, node, tail)
        prune_dead(g, [name for name in old if name not in node.input])
        return True


# --- fold_bn ------------------------------------------------------------------------------------------------
def _bn_affine(g: OnnxGraph, bn: onnx.NodeProto, producers) -> tuple[np.ndarray, np.ndarray] | None:
    """(s, t) with BN(y) = y*s + t per channel, if the BN is in inference form with constant statistics."""
    if len(bn.input) != 5 or not all(bn.input) or int(attr(bn, "training_mode", 0)) != 0:
        return None
    if int(attr(bn, "spatial", 1)) != 1 or (g.opset() < 7 and int(attr(bn, "is_test", 0)) != 1):
        return None  # per-activation statistics; before opset 7, training unless is_test=1
    values = [const_of(g, name, producers) for name in bn.input[1:]]
    if not all(is_float(v) for v in values):
        return None
    scale, beta, mean, var = (v.astype(np.float64) for v in values)
    if (
        not (scale.ndim == beta.ndim == mean.ndim == var.ndim == 1)
        or len({scale.size, beta.size, mean.size, var.size}) != 1
    ):
        return None
    s = scale / np.sqrt(var + float(attr(bn, "epsilon", 1e-5)))
    return s, beta - mean * s


def _fold_bn_once(g: OnnxGraph, bn: onnx.NodeProto, ranks_cache: list, producers, consumers) -> bool:
    extra_outputs = [o for o in bn.output[1:] if o]
    if any(o in g.output_names or o in consumers for o in extra_outputs):
        return False
    x = bn.input[0] if bn.input else ""
    layer = producers.get(x)
    if layer is None or layer.op_type not in FOLD_INTO or not is_std(layer) or layer.output[0] != x:
        return False
    if not single_reader(g, x, consumers):
        return False
    affine = _bn_affine(g, bn, producers)
    if affine is None:
        return False
    fold = _Layer(g, layer, producers)
    if not fold.ok or fold.channels() != affine[0].size:
        return False
    if layer.op_type == "MatMul":  # BN's channels are axis 1; MatMul's features the last axis: rank 2 only
        if not ranks_cache:
            ranks_cache.append(known_ranks(g))
        if out_rank(layer, fold.w, ranks_cache[0]) != 2:
            return False
    return fold.apply(affine[0], affine[1], bn)


@register_pass("fold_bn")
def fold_bn(g: OnnxGraph) -> int:
    """BatchNormalization into the Conv, ConvTranspose, Gemm or MatMul before it."""
    ranks: list = []
    bns = [n for n in g.nodes if n.op_type == "BatchNormalization" and is_std(n)]
    count, index = 0, None
    for bn in bns:
        # a failed attempt changes nothing, so the indexes are rebuilt only after a fold (once per node was
        # quadratic: 150 s on a 5,000-node chain)
        index = index or (g.producers(), g.consumers())
        if _fold_bn_once(g, bn, ranks, *index):
            count, index = count + 1, None
    return count


# --- fold_scale ---------------------------------------------------------------------------------------------
SCALE_INTO = ("Conv", "ConvTranspose", "Gemm")


def _fold_scale_once(g: OnnxGraph, node: onnx.NodeProto, producers, consumers) -> bool:
    if len(node.input) != 2 or not is_std(node):
        return False
    for k in (0, 1):
        if node.op_type == "Sub" and k == 1:
            break
        y, c_name = node.input[k], node.input[1 - k]
        layer = producers.get(y)
        if layer is None or layer.op_type not in SCALE_INTO or not is_std(layer) or layer.output[0] != y:
            continue
        c = const_of(g, c_name, producers)
        if not is_float(c) or not single_reader(g, y, consumers):
            continue
        fold = _Layer(g, layer, producers)
        if not fold.ok:
            continue
        vec = channel_vector(c, out_rank(layer, fold.w, None), fold.channels())
        if vec is None:
            continue
        if node.op_type == "Mul":
            return fold.apply(vec, None, node)
        return fold.apply(None, -vec if node.op_type == "Sub" else vec, node)
    return False


@register_pass("fold_scale")
def fold_scale(g: OnnxGraph) -> int:
    """A per-output-channel constant Mul, Add or Sub right after a Conv/ConvTranspose/Gemm into its weights."""
    count, changed = 0, True
    while changed:
        changed = False
        index = None  # rebuilt only after a fold: a failed attempt changes nothing
        for node in [n for n in g.nodes if n.op_type in ("Mul", "Add", "Sub")]:
            if index is None:
                index = (g.producers(), g.consumers(), {id(n) for n in g.nodes})
            if id(node) in index[2] and _fold_scale_once(g, node, index[0], index[1]):
                count, changed, index = count + 1, True, None
    return count
