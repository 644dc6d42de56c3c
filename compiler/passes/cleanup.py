"""Clean-up passes: remove no-op nodes (`eliminate`), dead nodes (`dce`), fold constant subgraphs
(`constant_folding`) and merge duplicate computations (`cse`). Each keeps the graph's input and output names and
emits only standard ONNX ops."""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .graph import OnnxGraph, attr, constant_value, outer_reads, set_attr
from .registry import register_pass

FOLD_LIMIT = 1 << 24  # elements: larger folded tensors stay computed at run time
CSE_INIT_LIMIT = 4096  # elements: initializers compared by value for `cse`
RANDOM_OPS = {
    "RandomNormal",
    "RandomUniform",
    "RandomNormalLike",
    "RandomUniformLike",
    "Multinomial",
    "Bernoulli",
    "Dropout",
}
# DequantizeLinear/QuantizeLinear on weights are a pattern runtimes look for in quantized models; keep them.
NO_FOLD = RANDOM_OPS | {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}
RESHAPING = {"Reshape", "Flatten", "Squeeze", "Unsqueeze"}  # ops that keep the row-major element order

Dims = tuple[int | None, ...]


# --- shared helpers ---------------------------------------------------------------------------------------------
def _subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    out = []
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            out.append(a.g)
        elif a.type == onnx.AttributeProto.GRAPHS:
            out.extend(a.graphs)
    return out


def _subgraph_names(nodes: list[onnx.NodeProto]) -> set[str]:
    """Every outer-scope name read inside a subgraph (If/Loop/Scan bodies): such values are read implicitly."""
    return {name for n in nodes for name in outer_reads(n)}


def _value_infos(g: OnnxGraph) -> dict[str, tuple[int, Dims | None]]:
    """name -> (elem_type, dims) from ONNX shape inference; a dim is None where it is symbolic or unknown."""
    model = g.shape_model()
    try:
        model = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except Exception:  # a graph shape inference cannot follow: use what the graph declares
        pass
    infos: dict[str, tuple[int, Dims | None]] = {}
    for vi in [*model.graph.input, *model.graph.value_info, *model.graph.output]:
        if not vi.type.HasField("tensor_type"):
            continue
        t = vi.type.tensor_type
        dims = None
        if t.HasField("shape"):
            dims = tuple(d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim)
        infos[vi.name] = (t.elem_type, dims)
    for name, value in g.inits.items():
        infos[name] = (helper.np_dtype_to_tensor_dtype(value.dtype), tuple(int(d) for d in value.shape))
    return infos


def _static(dims: Dims | None) -> bool:
    return dims is not None and all(d is not None for d in dims)


def _consts(g: OnnxGraph) -> dict[str, np.ndarray]:
    out = dict(g.inits)
    for n in g.nodes:
        if n.op_type == "Constant" and n.domain in ("", "ai.onnx"):
            value = constant_value(n)
            if value is not None:
                out[n.output[0]] = value
    return out


def _axes(node: onnx.NodeProto, consts: dict[str, np.ndarray], opset: int) -> list[int] | None:
    """Squeeze/Unsqueeze axes: an attribute before opset 13, a constant input from 13 on."""
    if opset < 13 or len(node.input) < 2:
        value = attr(node, "axes")
        return None if value is None else [int(a) for a in value]
    value = consts.get(node.input[1]) if node.input[1] else None
    return None if value is None else [int(a) for a in np.asarray(value).reshape(-1)]


# --- eliminate --------------------------------------------------------------------------------------------------
class _Ctx:
    """What the eliminate rules read and how they edit. The producer/consumer index is kept up to date edit by
    edit, and removed nodes leave `g.nodes` only when the round ends (`finish`), so a rewrite costs the
    degree of the values it touches, not the size of the graph (a 5,000-node Identity chain was quadratic)."""

    def __init__(self, g: OnnxGraph):
        self.g = g
        self.infos = _value_infos(g)
        self.consts = _consts(g)
        self.protected = _subgraph_names(g.nodes)
        self.opset = g.opset() or 17
        self.producers = g.producers()
        self.consumers = g.consumers()
        self.alive = {id(n) for n in g.nodes}
        self.dead: set[int] = set()

    def finish(self) -> None:
        if self.dead:
            self.g.nodes = [n for n in self.g.nodes if id(n) not in self.dead]

    def dims(self, name: str) -> Dims | None:
        return self.infos.get(name, (0, None))[1]

    def rank(self, name: str) -> int | None:
        dims = self.dims(name)
        return None if dims is None else len(dims)

    def unused(self, name: str) -> bool:
        return name not in self.g.output_names and name not in self.protected and not self.consumers.get(name)

    # --- edits that keep the index true ------------------------------------------------------------------------
    def _unread(self, node: onnx.NodeProto, name: str) -> None:
        readers = self.consumers.get(name, [])
        for k, n in enumerate(readers):
            if n is node:
                del readers[k]
                break
        if not readers:
            self.consumers.pop(name, None)

    def set_input(self, node: onnx.NodeProto, k: int, name: str) -> None:
        if node.input[k]:
            self._unread(node, node.input[k])
        node.input[k] = name
        if name:
            self.consumers.setdefault(name, []).append(node)

    def remove(self, node: onnx.NodeProto) -> None:
        self.alive.discard(id(node))
        self.dead.add(id(node))
        for name in node.input:
            if name:
                self._unread(node, name)
        for name in node.output:
            if name and self.producers.get(name) is node:
                del self.producers[name]

    def replace_uses(self, old: str, new: str) -> None:
        for n in list(self.consumers.get(old, [])):
            for k, name in enumerate(n.input):
                if name == old:
                    self.set_input(n, k, new)

    def rename(self, old: str, new: str) -> None:
        producer = self.producers.pop(old, None)
        if producer is not None:
            for k, name in enumerate(producer.output):
                if name == old:
                    producer.output[k] = new
            self.producers[new] = producer
        self.replace_uses(old, new)

    def bypass(self, node: onnx.NodeProto, keep: str) -> None:
        """OnnxGraph.bypass on the index: readers of the output read `keep`; if the output is a graph output,
        the producer of `keep` is renamed instead (names stay stable), or an Identity keeps the name."""
        g, out = self.g, node.output[0]
        self.remove(node)
        if out in g.output_names and keep not in g.output_names and keep not in {i.name for i in g.inputs} \
                and keep not in g.inits and self.producers.get(keep) is not None:
            self.rename(keep, out)
        elif out in g.output_names:
            identity = helper.make_node("Identity", [keep], [out], name=f"{out}_identity")
            g.nodes.append(identity)
            self.producers[out] = identity
            self.consumers.setdefault(keep, []).append(identity)
            self.alive.add(id(identity))
        else:
            self.replace_uses(out, keep)

    def drop(self, node: onnx.NodeProto, keep: str) -> bool:
        """Remove a pass-through node (output == `keep`). An Identity that must stay to name a graph output is
        kept; another node there becomes that Identity."""
        g, out = self.g, node.output[0]
        if out in self.protected:
            return False
        if out in g.output_names:
            if keep in self.protected:
                return False
            renameable = (
                keep not in g.output_names
                and keep not in g.inits
                and keep in self.producers
                and keep not in {i.name for i in g.inputs}
            )
            if node.op_type == "Identity" and not renameable:
                return False
        self.bypass(node, keep)
        return True

    def drop_if_unused(self, node: onnx.NodeProto) -> None:
        if all(self.unused(o) for o in node.output if o):
            self.remove(node)


def _elim_identity(c: _Ctx, node: onnx.NodeProto) -> bool:
    return c.drop(node, node.input[0])


def _elim_dropout(c: _Ctx, node: onnx.NodeProto) -> bool:
    if len(node.input) > 2 and node.input[2]:
        mode = c.consts.get(node.input[2])
        if mode is None or bool(np.asarray(mode).reshape(-1)[0]):
            return False
    if c.opset < 7 and attr(node, "is_test", 0) == 0:
        return False
    if len(node.output) > 1 and node.output[1] and not c.unused(node.output[1]):
        return False
    return c.drop(node, node.input[0])


def _same_shape(c: _Ctx, node: onnx.NodeProto) -> bool:
    """Whether a Reshape leaves its input's shape as it is."""
    in_dims, out_dims = c.dims(node.input[0]), c.dims(node.output[0])
    if _static(in_dims) and _static(out_dims):
        return in_dims == out_dims
    target = c.consts.get(node.input[1])
    if target is None or in_dims is None or target.ndim != 1 or len(target) != len(in_dims):
        return False
    allowzero, free = attr(node, "allowzero", 0), 0
    for want, have in zip(target.tolist(), in_dims):
        if want == 0 and not allowzero:
            continue
        if want == -1:
            free += 1
        elif have is None or want != have:
            return False
    return free <= 1


def _elim_reshape(c: _Ctx, node: onnx.NodeProto) -> bool:
    if _same_shape(c, node):
        return c.drop(node, node.input[0])
    # Reshape of a reshape: the first only reorders nothing, so the second can read the first's input, provided
    # the second's target does not copy dims (0 entries) from the tensor it reads.
    src = c.producers.get(node.input[0])
    if src is None or src.op_type not in RESHAPING or src.domain not in ("", "ai.onnx") or not src.input[0]:
        return False
    if src.output[0] in c.g.output_names or src.output[0] in c.protected:
        return False
    target = c.consts.get(node.input[1])
    if target is None or (0 in target.tolist() and not attr(node, "allowzero", 0)):
        out_dims = c.dims(node.output[0])
        if not _static(out_dims) or 0 in out_dims:
            return False
        name = c.g.add_init(f"{node.output[0]}_shape", np.array(out_dims, np.int64))
        c.consts[name] = c.g.inits[name]
        c.set_input(node, 1, name)
    c.set_input(node, 0, src.input[0])
    c.drop_if_unused(src)
    return True


def _perm(node: onnx.NodeProto, rank: int | None) -> list[int] | None:
    perm = attr(node, "perm")
    if perm is not None:
        return [int(p) for p in perm]
    return None if rank is None else list(reversed(range(rank)))


def _elim_transpose(c: _Ctx, node: onnx.NodeProto) -> bool:
    perm = _perm(node, c.rank(node.input[0]))
    if perm is not None and perm == list(range(len(perm))):
        return c.drop(node, node.input[0])
    src = c.producers.get(node.input[0])
    if perm is None or src is None or src.op_type != "Transpose" or src.domain not in ("", "ai.onnx"):
        return False
    if src.output[0] in c.g.output_names or src.output[0] in c.protected:
        return False
    first = _perm(src, c.rank(src.input[0]))
    if first is None or len(first) != len(perm):
        return False
    composed = [first[p] for p in perm]
    if composed == list(range(len(composed))):
        if not c.drop(node, src.input[0]):
            return False
    else:
        c.set_input(node, 0, src.input[0])
        set_attr(node, "perm", composed)
    c.drop_if_unused(src)
    return True


def _elim_flatten(c: _Ctx, node: onnx.NodeProto) -> bool:
    if c.rank(node.input[0]) == 2 and attr(node, "axis", 1) in (1, -1):
        return c.drop(node, node.input[0])
    return False


def _elim_squeeze_pair(c: _Ctx, node: onnx.NodeProto) -> bool:
    """Unsqueeze(Squeeze(x, axes), axes) and Squeeze(Unsqueeze(x, axes), axes) are x."""
    other = "Squeeze" if node.op_type == "Unsqueeze" else "Unsqueeze"
    src = c.producers.get(node.input[0])
    if src is None or src.op_type != other or src.domain not in ("", "ai.onnx"):
        return False
    if src.output[0] in c.g.output_names or src.output[0] in c.protected:
        return False
    a, b = _axes(src, c.consts, c.opset), _axes(node, c.consts, c.opset)
    if not a or not b:
        return False
    rank = c.rank(src.input[0])
    if rank is not None and src.op_type == "Unsqueeze":
        rank += len(a)  # both lists index the unsqueezed tensor
    if rank is None and min(a + b) < 0:
        return False
    if rank is not None:
        a, b = [x % rank for x in a], [x % rank for x in b]
    if sorted(a) != sorted(b) or len(set(a)) != len(a):
        return False
    if not c.drop(node, src.input[0]):
        return False
    c.drop_if_unused(src)
    return True


def _elim_gather_arange(c: _Ctx, node: onnx.NodeProto) -> bool:
    """Gather(Reshape(x, [-1]), arange(n) shaped S) on axis 0, every element taken once in order: torch.export's
    as_strided of a contiguous view (ConvNeXt's classifier). It is Reshape(x, S); the Reshape rules go on."""
    if attr(node, "axis", 0) != 0 or len(node.input) != 2:
        return False
    idx, src = c.consts.get(node.input[1]), c.producers.get(node.input[0])
    if idx is None or src is None or src.op_type != "Reshape" or src.domain not in ("", "ai.onnx"):
        return False
    flat = c.dims(src.output[0])
    if not idx.size or flat != (idx.size,) or not np.array_equal(np.asarray(idx).reshape(-1), np.arange(idx.size)):
        return False
    shape = c.g.add_init(f"{node.output[0]}_shape", np.array(idx.shape, np.int64))
    c.consts[shape] = c.g.inits[shape]
    node.op_type = "Reshape"
    del node.attribute[:]
    c.set_input(node, 1, shape)
    c.set_input(node, 0, src.input[0])
    c.drop_if_unused(src)
    return True


_ELIMINATE = {
    "Gather": _elim_gather_arange,
    "Identity": _elim_identity,
    "Dropout": _elim_dropout,
    "Reshape": _elim_reshape,
    "Transpose": _elim_transpose,
    "Flatten": _elim_flatten,
    "Squeeze": _elim_squeeze_pair,
    "Unsqueeze": _elim_squeeze_pair,
}


@register_pass("eliminate")
def eliminate(g: OnnxGraph) -> int:
    """Remove nodes that compute nothing: Identity, inference Dropout, no-op Reshape/Transpose/Flatten, and
    collapse Transpose pairs, Reshape chains, Squeeze/Unsqueeze pairs and in-order Gathers of a flattened
    tensor."""
    total = 0
    while True:
        c, count = _Ctx(g), 0
        for node in list(g.nodes):
            rule = _ELIMINATE.get(node.op_type)
            if rule is None or node.domain not in ("", "ai.onnx") or id(node) not in c.alive:
                continue
            if rule(c, node):
                count += 1
        c.finish()
        total += count
        if not count:
            return total


# --- dce --------------------------------------------------------------------------------------------------------
@register_pass("dce")
def dce(g: OnnxGraph) -> int:
    """Remove nodes none of whose outputs reach a graph output, and initializers nothing reads; counts both."""
    producers = g.producers()
    live_names = set(g.output_names)
    stack = list(live_names)
    live: set[int] = set()
    while stack:
        node = producers.get(stack.pop())
        if node is None or id(node) in live:
            continue
        live.add(id(node))
        reads = [i for i in node.input if i] + sorted(_subgraph_names([node]))
        for name in reads:
            if name not in live_names:
                live_names.add(name)
                stack.append(name)
    before = len(g.nodes)
    g.nodes = [n for n in g.nodes if id(n) in live]
    used = {i for n in g.nodes for i in n.input} | _subgraph_names(g.nodes) | g.output_names
    dead_inits = [k for k in g.inits if k not in used]
    for k in dead_inits:
        del g.inits[k]
    return before - len(g.nodes) + len(dead_inits)


# --- constant_folding -------------------------------------------------------------------------------------------
def _evaluate(node: onnx.NodeProto, feeds: dict[str, np.ndarray], opset: int) -> list[np.ndarray] | None:
    from onnx.reference import ReferenceEvaluator

    axes = attr(node, "axes")
    if node.op_type == "Unsqueeze" and axes is not None and len(node.input) == 1:
        # onnx's reference evaluator fails on Unsqueeze-1/11 (axes as an attribute), the legacy exporters' form
        x = np.asarray(feeds[node.input[0]])
        rank = x.ndim + len(axes)
        try:
            return [np.expand_dims(x, tuple(sorted(int(a) % rank for a in axes)))]
        except ValueError:  # numpy.AxisError is one
            return None
    try:
        names = [o for o in node.output if o]
        results = ReferenceEvaluator(node, opsets={"": opset}).run(names, feeds)
    except Exception:  # an op or a case the reference evaluator does not cover: leave it to run time
        return None
    out = []
    for r in results:
        if not isinstance(r, np.ndarray | np.generic) or np.asarray(r).dtype == object:
            return None  # sequences, optionals, strings
        out.append(np.asarray(r))
    return out


def _estimated_size(node: onnx.NodeProto, vals: list[np.ndarray | None]) -> int | None:
    """Elements the node would produce, for the ops whose output can be much larger than their input."""
    try:
        if node.op_type == "ConstantOfShape":
            return int(np.prod(vals[0]))
        if node.op_type == "Expand":
            return int(np.prod(np.broadcast_shapes(vals[0].shape, tuple(int(d) for d in vals[1]))))
        if node.op_type == "Tile":
            return int(np.prod(np.array(vals[0].shape) * vals[1]))
        if node.op_type == "Range":
            return int(max(math.ceil((float(vals[1]) - float(vals[0])) / float(vals[2])), 0))
    except Exception:
        return None
    return 0


def _shape_dims(c: _Ctx, shape_node: onnx.NodeProto) -> Dims | None:
    """What a Shape node yields, with None for the dims not known before run time."""
    dims = c.dims(shape_node.input[0])
    if dims is None:
        return None
    start, end = attr(shape_node, "start", 0), attr(shape_node, "end", None)
    return tuple(dims[start:end])


def _positions(c: _Ctx, node: onnx.NodeProto) -> tuple[onnx.NodeProto, np.ndarray] | None:
    """For a Gather (axis 0) or Slice of a Shape output with constant indices: the Shape node and the positions
    picked from its output."""
    shape_node = c.producers.get(node.input[0]) if node.input else None
    if shape_node is None or shape_node.op_type != "Shape" or node.op_type not in ("Gather", "Slice"):
        return None
    if node.op_type == "Gather" and attr(node, "axis", 0) not in (0, -1):
        return None
    rest = [i for i in node.input[1:] if i]
    if not all(i in c.consts for i in rest):
        return None
    dims = _shape_dims(c, shape_node)
    if dims is None:
        return None
    feeds = {node.input[0]: np.arange(len(dims), dtype=np.int64), **{i: c.consts[i] for i in rest}}
    result = _evaluate(node, feeds, c.opset)
    return None if result is None else (shape_node, result[0])


def _fold_value(c: _Ctx, node: onnx.NodeProto) -> list[np.ndarray] | None:
    """The node's outputs if they can be known before run time."""
    if node.domain not in ("", "ai.onnx") or node.op_type in NO_FOLD or _subgraphs(node) or not node.input:
        return None
    inputs = [i for i in node.input if i]
    if all(i in c.consts for i in inputs):
        size = _estimated_size(node, [c.consts.get(i) if i else None for i in node.input])
        if size is None or size > FOLD_LIMIT:
            return None
        return _evaluate(node, {i: c.consts[i] for i in inputs}, c.opset)
    if node.op_type == "Shape":
        dims = _shape_dims(c, node)
        return [np.array(dims, np.int64)] if _static(dims) else None
    if node.op_type == "Size":
        dims = c.dims(node.input[0])
        return [np.array(math.prod(dims), np.int64)] if _static(dims) else None
    picked = _positions(c, node)
    if picked is not None:
        dims = _shape_dims(c, picked[0])
        chosen = [dims[int(p)] for p in picked[1].reshape(-1)]
        if all(d is not None for d in chosen):
            return [np.array(chosen, np.int64).reshape(picked[1].shape)]
    return None


def _through_identity(c: _Ctx, name: str) -> str:
    """The value `name` copies, looking through Identity nodes."""
    src = c.producers.get(name)
    while src is not None and src.op_type == "Identity" and src.domain in ("", "ai.onnx"):
        name = src.input[0]
        src = c.producers.get(name)
    return name


_BATCH_KEEPING = {
    "Identity", "Dropout", "Relu", "Sigmoid", "Tanh", "Clip", "LeakyRelu", "HardSigmoid", "HardSwish",
    "BatchNormalization", "Conv", "ConvTranspose", "MaxPool", "AveragePool", "Softmax",
}


def _keeps_batch(c: _Ctx, name: str, origin: str, depth: int = 0) -> bool:
    """Whether value `name` has the batch axis (axis 0) of value `origin`: `origin` itself, or computed from it
    by ops that keep axis 0 (per-sample ops, Transpose with perm[0] = 0, Reshape copying dim 0)."""
    while depth < 64:
        name = _through_identity(c, name)
        if name == origin:
            return True
        src = c.producers.get(name)
        if src is None or src.domain not in ("", "ai.onnx"):
            return False
        if src.op_type == "Transpose":
            perm = attr(src, "perm")
            if perm is None or int(perm[0]) != 0:
                return False
        elif src.op_type == "Reshape":
            target = c.consts.get(src.input[1])
            if target is None:
                target = _reshape_target(c, src, depth + 1)
            if target is None or target.size == 0 or int(target.reshape(-1)[0]) != 0 or attr(src, "allowzero", 0):
                return False
        elif src.op_type in ("Squeeze", "Unsqueeze"):
            axes = _axes(src, c.consts, c.opset)
            rank = c.rank(src.input[0] if src.op_type == "Squeeze" else src.output[0])
            if not axes or any(a == 0 or (a < 0 and (rank is None or a % rank == 0)) for a in axes):
                return False
        elif src.op_type == "Flatten":
            if attr(src, "axis", 1) != 1:
                return False
        elif src.op_type not in _BATCH_KEEPING:
            return False
        name, depth = src.input[0], depth + 1
    return False


def _reshape_target(c: _Ctx, node: onnx.NodeProto, depth: int = 0) -> np.ndarray | None:
    """A constant target for a Reshape with a computed one: its output shape where that is static, or for
    Reshape(x, Concat(..., Shape(x)[i], ...)) where each non-constant piece is dim i of x at position i: the
    target with 0 ("copy this dim") at those positions, e.g. x.view(x.size(0), -1) -> Reshape(x, [0, -1]). A
    leading Shape(y)[0] also counts where x keeps y's batch axis (see _keeps_batch)."""
    if node.input[1] in c.consts:
        return None
    out_dims = c.dims(node.output[0])
    if _static(out_dims) and 0 not in out_dims:
        return np.array(out_dims, np.int64)
    if attr(node, "allowzero", 0):
        return None
    concat = c.producers.get(node.input[1])
    if concat is None or concat.op_type != "Concat" or attr(concat, "axis", 0) not in (0, -1):
        return None
    pieces: list[int] = []
    for name in concat.input:
        if name in c.consts:
            value = np.asarray(c.consts[name])
            if value.ndim != 1:
                return None
            pieces += [int(v) for v in value]
            continue
        src = c.producers.get(name)
        if src is not None and src.op_type == "Unsqueeze" and _axes(src, c.consts, c.opset) in ([0], [-1]):
            src = c.producers.get(src.input[0])  # a scalar Gather made 1-D
        picked = _positions(c, src) if src is not None else None
        if picked is None:
            return None
        if _through_identity(c, picked[0].input[0]) != _through_identity(c, node.input[0]):
            # Shape(y)[0] where x's batch axis is y's, through ops that keep it (the channel shuffle's second
            # view(n, -1, h, w) takes n from the tensor before the first view and the transpose).
            if picked[1].reshape(-1).tolist() != [0] or len(pieces) != 0 or attr(picked[0], "start", 0) != 0:
                return None
            if not _keeps_batch(c, node.input[0], _through_identity(c, picked[0].input[0]), depth):
                return None
        start = attr(picked[0], "start", 0)
        rank = c.rank(node.input[0])
        if start < 0 and rank is None:
            return None
        start = start % rank if start < 0 else start
        for p in picked[1].reshape(-1).tolist():
            if start + p != len(pieces):
                return None
            pieces.append(0)
    if 0 not in pieces or sum(p == -1 for p in pieces) > 1:
        return None
    return np.array(pieces, np.int64)


MAX_FOLD_ROUNDS = 64


@register_pass("constant_folding")
def constant_folding(g: OnnxGraph) -> int:
    """Replace nodes whose outputs are known before run time (constant inputs, static shapes) by initializers;
    Constant nodes become initializers; shape arithmetic on dynamic dims becomes a Reshape target with 0s.

    Rounds repeat while a round folded something and Shape nodes remain: shape inference cannot see through a
    Slice whose ends are computed (PyTorch's chunk), so the shapes after it are known only once it is folded,
    and each ShuffleNetV2 unit's channel shuffle reads the shape the unit before produced."""
    total = 0
    for _ in range(MAX_FOLD_ROUNDS):
        count = _fold_round(g)
        total += count
        if not count or not any(n.op_type == "Shape" for n in g.nodes):
            break
    return total


def _fold_round(g: OnnxGraph) -> int:
    g.topo_sort()
    # The rules below read the graph as it was when the pass began (the index is not updated in this loop);
    # folded nodes are swapped for their replacements (none, or a Constant) once the loop is done.
    c, count, touched = _Ctx(g), 0, []
    replaced: dict[int, list[onnx.NodeProto]] = {}
    outputs = g.output_names
    for node in list(g.nodes):
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            value = c.consts.get(node.output[0])
            if value is not None and node.output[0] not in outputs:
                g.inits[node.output[0]] = value
                replaced[id(node)] = []
                count += 1
            continue
        if node.op_type == "Reshape" and node.domain in ("", "ai.onnx") and len(node.input) > 1:
            target = _reshape_target(c, node)
            if target is not None:
                touched += [c.producers[node.input[1]]] if node.input[1] in c.producers else []
                node.input[1] = g.add_init(f"{node.output[0]}_shape", target)  # index stays stale (above)
                c.consts[node.input[1]] = target
                count += 1
                continue
        values = _fold_value(c, node)
        if values is None or any(v.size > FOLD_LIMIT for v in values):
            continue
        names = [o for o in node.output if o]
        replacement = []
        for name, value in zip(names, values):
            elem = c.infos.get(name, (0, None))[0]
            if elem and helper.tensor_dtype_to_np_dtype(elem) != value.dtype:
                value = value.astype(helper.tensor_dtype_to_np_dtype(elem))
            c.consts[name] = value
            if name in outputs:  # a graph output must stay produced by a node
                replacement.append(
                    helper.make_node(
                        "Constant",
                        [],
                        [name],
                        name=f"{name}_const",
                        value=numpy_helper.from_array(value, name),
                    )
                )
            else:
                g.inits[name] = value
        touched += [c.producers[i] for i in node.input if i in c.producers]
        replaced[id(node)] = replacement
        count += 1
    if replaced:
        g.nodes = [m for n in g.nodes for m in replaced.get(id(n), [n])]
    # the nodes that fed only folded ones are dead now
    c = _Ctx(g)
    while touched:
        node = touched.pop()
        if id(node) in c.alive and all(c.unused(o) for o in node.output if o):
            c.remove(node)
            touched += [c.producers[i] for i in node.input if i in c.producers]
    c.finish()
    return count


# --- cse --------------------------------------------------------------------------------------------------------
def _node_key(node: onnx.NodeProto) -> tuple:
    attrs = tuple(sorted((a.name, a.SerializeToString(deterministic=True)) for a in node.attribute))
    return (node.domain, node.op_type, tuple(node.input), attrs, tuple(bool(o) for o in node.output))


@register_pass("cse")
def cse(g: OnnxGraph) -> int:
    """Merge duplicate small initializers (same dtype, shape and bytes) and nodes with the same op, inputs and
    attributes; the first stays and readers of the others read it. Graph outputs keep their producers."""
    protected = _subgraph_names(g.nodes) | g.output_names
    alias: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, value in list(g.inits.items()):
        if value.size > CSE_INIT_LIMIT or value.dtype == object or name in protected:
            continue
        key = (value.dtype.str, value.shape, np.ascontiguousarray(value).tobytes())
        if key in seen:
            alias[name] = seen[key]
            del g.inits[name]
        else:
            seen[key] = name
    count = len(alias)
    g.topo_sort()
    first: dict[tuple, onnx.NodeProto] = {}
    kept = []
    for node in g.nodes:
        for k, name in enumerate(node.input):
            if name in alias:
                node.input[k] = alias[name]
        if node.op_type in RANDOM_OPS or _subgraphs(node):
            kept.append(node)
            continue
        key = _node_key(node)
        if key not in first or any(o in protected for o in node.output):
            first.setdefault(key, node)
            kept.append(node)
            continue
        for dup, keep in zip(node.output, first[key].output):
            if dup:
                alias[dup] = keep
        count += 1
    g.nodes = kept
    return count
