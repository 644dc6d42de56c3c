"""Dynamic height and width: the graph at another input size, and whether an ONNX file may let H and W vary.

A file with dynamic spatial axes must compute, at every input size, what the backend computes on the graph
built at that size with the same weights (`at_input_size`). `check_dynamic` re-infers the graph once per
dynamic spatial axis at twice the size (every stride that divides a size divides its double, so a fully
convolutional net builds there). A layer then fixes the size when

- its shape rule fails there (a `reshape` to a literal spatial shape, an `add` of branches that agree at one
  size only), or
- its parameters would change shape (a `linear` after `flatten`, a `batchnorm` on a flattened map): the
  weights in the file are made for one size.

`global_avgpool` before `flatten`/`linear` is fine: its output does not depend on H and W. What the file itself
would bake in is handled in the export: the detect layer computes its grids from the feature map's shape, and
`pad: same` at a stride takes ONNX's `auto_pad: SAME_UPPER` (the same rule), which onnxruntime cannot apply to
a dilated kernel or a kernel smaller than its stride: those layers are refused by name.
"""

from __future__ import annotations

from collections.abc import Sequence

from .analysis import infer_shapes
from .errors import Diagnostic, DlcError
from .graph import Graph, Node, ValueInfo
from .ops import REGISTRY, fmt_shape
from .ops.base import Shape
from .ops.detect import bind_inferred_strides

AXES = ("batch", "height", "width")
SPATIAL = ("height", "width")
_HINT = ("export with dynamic: [batch], or make the net fully convolutional (e.g. global_avgpool before "
         "flatten and linear)")


def spatial_axes(axes: Sequence[str]) -> tuple[str, ...]:
    return tuple(a for a in SPATIAL if a in axes)


def at_input_size(graph: Graph, shape: Sequence[int]) -> Graph:
    """A copy of `graph`, the same weights, at input size `shape` ((C, H, W); C must not change): shapes
    re-inferred, size-dependent attributes ('same' pads, detect grids) resolved for it. A DlcError names every
    layer that cannot run at that size (a shape rule that fails, weights made for another size)."""
    copy, problems = _reinfer(graph, tuple(int(d) for d in shape))
    if problems:
        raise DlcError(problems)
    return copy


def _diag(node: Node, message: str) -> Diagnostic:
    src = node.source
    return Diagnostic(message, file=src.file, line=src.line, layer=node.name, note=src.note or None)


def _reinfer(graph: Graph, shape: Shape) -> tuple[Graph, list[Diagnostic]]:
    if len(graph.inputs) != 1 or len(graph.inputs[0].shape) != 3:
        shapes = ", ".join(f"{v.name} {fmt_shape(v.shape)}" for v in graph.inputs)
        raise DlcError(f"a graph with height and width to change has one C×H×W input; this one has {shapes}")
    old = graph.inputs[0]
    if len(shape) != 3 or shape[0] != old.shape[0] or min(shape) < 1:
        raise DlcError(f"input size {list(shape)} for '{old.name}' must be [C, H, W] with C = {old.shape[0]}")
    g = graph.copy()
    g.inputs = [ValueInfo(old.name, shape)]
    g.shapes = {old.name: shape}
    if isinstance(g.meta.get("input"), dict):
        g.meta["input"]["shape"] = list(shape)
    problems: list[Diagnostic] = []
    infer_shapes(g, problems)  # layers downstream of a failing one are skipped (their shapes stay None)
    problems += bind_inferred_strides(g)
    for node in g.nodes():
        in_shapes = [g.shapes.get(v) for v in node.inputs]
        if any(s is None for s in in_shapes) or not node.params:
            continue
        want = REGISTRY[node.op].param_shapes(node.attrs, in_shapes)
        for tensor, have in node.params.items():
            if tensor in want and tuple(have.shape) != tuple(want[tensor]):
                before = graph.shapes.get(node.inputs[0])
                problems.append(_diag(node, (
                    f"its {tensor} ({fmt_shape(have.shape)}) is made for the {fmt_shape(before)} input it has "
                    f"at input size {fmt_shape(old.shape)}; at {fmt_shape(shape)} its input is "
                    f"{fmt_shape(in_shapes[0])}{_folded_by(g, node)}")))
                break
    return g, problems


def _folded_by(graph: Graph, node: Node) -> str:
    """' (after 'flat' folds height and width into features)': the layer upstream that turned a C×H×W map into
    the flat vector this node reads, when there is one."""
    value = node.inputs[0]
    for _ in range(len(graph)):
        producer = graph.producer(value)
        if producer is None or not producer.inputs:
            return ""
        src = graph.shapes.get(producer.inputs[0])
        if src is not None and len(src) >= 3 and len(graph.shapes.get(value) or ()) < 3:
            return f" (after '{producer.name}', a {producer.op}, folds height and width into features)"
        value = producer.inputs[0]
    return ""


def _same_pads_problem(node: Node) -> str | None:
    """A 'same'-padded window whose pads change with the input size and that onnxruntime's SAME_UPPER cannot
    express (a dilated kernel, or a kernel smaller than its stride: negative pads)."""
    a = node.attrs
    if node.op not in ("conv", "maxpool", "avgpool") or a.get("pad") != "same":
        return None
    dilation = a.get("dilation", (1, 1))
    for axis in range(2):
        k, s = (a["kernel"][axis] - 1) * dilation[axis] + 1, a["stride"][axis]
        if s == 1 or k == 1:
            continue  # pads k - 1 (stride 1) or 0 (1×1) at every size
        if dilation[axis] > 1:
            return (f"pad: same with dilation {list(dilation)} at stride {list(a['stride'])} needs pads that "
                    "change with the input size, and onnxruntime's auto_pad SAME_UPPER takes no dilation; "
                    "give explicit pads")
        if k < s:
            return (f"pad: same with kernel {list(a['kernel'])} smaller than stride {list(a['stride'])} needs "
                    "pads that change with the input size, which auto_pad SAME_UPPER writes as negative pads "
                    "(onnxruntime refuses them); give explicit pads")
    return None


def check_dynamic(graph: Graph, axes: Sequence[str]) -> dict[str, list[int | str]]:
    """Refuse (DlcError naming each layer, at its YAML line) dynamic height/width for a net that fixes its
    input size; otherwise return the per-sample dims of every graph input and output, symbolic ('height',
    'width', '<output>_height', ...) where they follow a dynamic input axis. A batch-only `axes` checks
    nothing and returns the fixed shapes."""
    for a in axes:
        if a not in AXES:
            raise DlcError(f"unknown dynamic axis '{a}'; dlc's axes: {', '.join(AXES)}")
    names = [*graph.input_names, *graph.outputs]
    dims: dict[str, list[int | str]] = {v: list(graph.shapes[v]) for v in names}
    spatial = spatial_axes(axes)
    if not spatial:
        return dims
    problems: list[Diagnostic] = []
    for node in graph.nodes():
        reason = _same_pads_problem(node)
        if reason:
            problems.append(_diag(node, reason))
    base = graph.inputs[0].shape  # one C×H×W input: _reinfer says so otherwise
    probes: dict[str, Graph] = {}
    fixed: dict[tuple, tuple[Diagnostic, list[str]]] = {}  # layer -> (its first problem, the axes it fixes)
    for axis in spatial:
        i = 1 + SPATIAL.index(axis)
        shape = tuple(d * 2 if j == i else d for j, d in enumerate(base))
        probe, more = _reinfer(graph, shape)
        for d in more:
            fixed.setdefault((d.layer, d.line, d.layer or d.message), (d, []))[1].append(axis)
        probes[axis] = probe
    for d, fixes in fixed.values():  # one message per layer, in graph order
        problems.append(Diagnostic(f"{d.message}: this layer fixes the input {' and '.join(fixes)}", d.file, d.line,
                                   d.layer, _HINT, d.note))
    if problems:
        raise DlcError(problems)
    symbols: dict[tuple, str] = {}
    for v in names:
        for j, d in enumerate(dims[v]):
            moves = tuple((axis, probes[axis].shapes[v][j]) for axis in spatial if probes[axis].shapes[v][j] != d)
            if not moves:
                continue
            key = (d, moves)
            if key not in symbols:
                symbols[key] = _symbol(graph, v, j, d, moves, set(symbols.values()))
            dims[v][j] = symbols[key]
    return dims


def _symbol(graph: Graph, value: str, j: int, d: int, moves: tuple, taken: set[str]) -> str:
    """'height'/'width' for a dim that is the input's own (at both sizes), else '<value>_height' ('_width'),
    '<value>_candidates' for a detect layer's rows, or '<value>_dim<k>' (k: the ONNX axis) for a dim that
    follows both."""
    base = graph.inputs[0].shape
    producer = graph.producer(value)
    if len(moves) == 1:
        axis, probed = moves[0]
        i = 1 + SPATIAL.index(axis)
        if d == base[i] and probed == 2 * base[i]:
            return axis  # the same (d, moves) key always maps here: no clash with itself
        name = f"{value}_{axis}"
    elif producer is not None and producer.op == "detect" and j == 0:
        name = f"{value}_candidates"
    else:
        name = f"{value}_dim{j + 1}"
    out, n = name, 1
    while out in taken or out in AXES:
        out, n = f"{name}_{n}", n + 1
    return out
