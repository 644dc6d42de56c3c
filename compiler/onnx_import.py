"""ONNX import: an onnx.ModelProto -> dlc's Graph IR, for pretrained networks, transfer learning and `dlc import`.

The model is first normalised with dlc's own ONNX passes (constant folding, no-op elimination, a Pad into the
padding of the Conv or pool after it, a bias Add into the Conv or MatMul before it, per-channel scales into
weights, CSE, DCE). Batch norm is not folded: it stays a batchnorm layer, so an imported network fine-tunes
with it. Then each ONNX node becomes one IR layer (ReLU6, a Clip, is a clip layer; a Pad that fuse_pad left is a
pad layer; ConvTranspose is conv_transpose, LRN is lrn), a few patterns become one layer as a whole (x * Sigmoid(x)
is silu, while other products of two tensors, equal in shape or C×H×W by a C×1×1 gate, are mul, and likewise
Sub and Div of two tensors are sub and div; Mul, Div, Add and Sub of a tensor and a scalar or per-channel constant
that no Conv took, such as input normalisation (x - mean) / std, are affine; MatMul + Add of a
bias is linear; ReduceMean over H, W is global average pooling), and Identity and Dropout are left out. Every node that does not map is collected, and one error lists them all.

A detector dlc exported (metadata task: detection) has its decode subgraph (nodes '<layer>/s<i>/...') cut off
before normalising: the head maps that fed it become the inputs of one detect layer rebuilt from the metadata
(classes, anchors, strides, post-processing and loss settings). Another tool's decode stays unsupported, and the
error names the head maps to cut it off at.

IR layers are named after the ONNX nodes, made into plain names ('/' is dlc's block-scope separator), and each
layer's output value is named after the layer, as in a model YAML.

This module is the walk over the graph, the patterns that span several nodes (silu, the GELU erf chain,
LayerNorm2d, ConvNeXt's channels-last block, a detector's decode) and the helpers the import rules share. The rule
for each ONNX op lives beside the op's definition in compiler/ops/ (registered with `@rule` from
ops/onnx_rules.py), so adding an op is one module: its OpDef, its kernels and its import rule.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from .analysis import infer_shapes
from .errors import Diagnostic, DlcError
from .export_onnx import read_metadata
from .graph import Graph, Node, Source, ValueInfo
from .onnx_io import tensor_array
from .ops import REGISTRY, Shape, ShapeError, fmt_shape
from .ops.detect import LOSS_PARAMS, POSTPROCESS_PARAMS, infer_strides
from .ops.onnx_rules import RULES
from .ops.onnx_rules import Skip as _Skip
from .ops.onnx_rules import Unsupported as _Unsupported
from .ops.onnx_rules import round_attr as _round
from .ops.onnx_rules import text as _text
from .ops.window import resolve_pads
from .passes import optimize
from .passes.fold import channel_vector
from .passes.graph import attr, constant_value

MIN_OPSET = 9
MAX_OPSET = onnx.defs.onnx_opset_version()
# BatchNormalization is kept (no fold_bn): fine-tuning needs it.
NORMALIZE = [
    "constant_folding",
    "eliminate",
    "fuse_pad",
    "fuse_bias",
    "fold_scale",
    "cse",
    "eliminate",
    "dce",
]
SUPPORTED = (
    "Add, AveragePool, BatchNormalization, Clip (constant bounds), Concat, Conv, ConvTranspose (explicit pads), "
    "Div (two tensors of one shape, or C×H×W by C×1×1), Dropout, Flatten, Gemm, GlobalAveragePool, GlobalMaxPool, "
    "Gelu, x * 0.5 * (1 + Erf(x / sqrt 2)) (as gelu), HardSigmoid, HardSwish, Identity, LayerNormalization (over "
    "channels: of a flat tensor, or between Transpose(0,2,3,1) and Transpose(0,3,1,2)), LeakyRelu, LRN, MatMul, "
    "MaxPool, "
    "Mul (x * Sigmoid(x) as silu; two tensors of one shape, or C×H×W by C×1×1), "
    "Pad (H and W; constant, reflect or edge), PRelu (constant per-channel slope), ReduceMean (over H, W), Relu, "
    "Reshape (constant shape, batch axis kept), Resize (nearest), Sigmoid, Slice and Split (channel ranges, axis 1, "
    "step 1), Softmax, Squeeze (not the batch axis), "
    "Sub (as Div), Sum, Tanh, Transpose (batch axis kept first), Unsqueeze (not before the batch axis), Upsample; "
    "Add, Sub, Mul and Div of a tensor and a scalar or per-channel constant (as affine; not a constant / x); "
    "and between Transpose(0,2,3,1) and Transpose(0,3,1,2) a chain of LayerNormalization, MatMul (+ Add) by a "
    "constant, per-channel Add/Mul, Gelu and Relu/Sigmoid/Tanh on the channels (ConvNeXt's block, as NCHW layers)"
)
_ODD = re.compile(r"[^A-Za-z0-9_]+")
# The ops of the decode that dlc's detect layer exports (ops/detect.py, Detect.to_onnx).
# Shape/Gather/Cast/Range/Expand build the grid of a decode exported with dynamic height and width.
_DECODE_OPS = {"Reshape", "Transpose", "Sigmoid", "Slice", "Mul", "Add", "Sub", "Pow", "Concat", "Identity",
               "Shape", "Gather", "Cast", "Range", "Expand"}
# Ops that, unsupported, point to a detector's decode (or NMS) in another tool's export.
_DECODE_HINT_OPS = {"Slice", "Split", "Pow", "Exp", "Gather", "GatherElements", "TopK", "NonMaxSuppression"}


def plain_name(name: str) -> str:
    """A layer name dlc's YAML accepts: letters, digits and '_' ('/', '.' and other characters become '_').
    Empty when nothing usable is left."""
    return _ODD.sub("_", name).strip("_")


def _scope(name: str, op_type: str) -> tuple[tuple[str, ...], str | None]:
    """An exporter's node name as (scope, op part). PyTorch names nodes '/layer1/layer1.0/conv1/Conv': the
    scope's qualified names collapse ('layer1', 'layer1.0' -> 'layer1.0') and a last part that names the op
    type ('Conv', 'Relu_1') comes apart, to be left out where the scope alone names one layer."""
    parts = [p for p in name.split("/") if p]
    op_part = None
    if len(parts) > 1 and re.fullmatch(re.escape(op_type) + r"(_\d+)?", parts[-1]):
        op_part = parts.pop()
    scope: list[str] = []
    for p in parts:
        if scope and p.startswith(scope[-1] + "."):
            scope[-1] = p
        else:
            scope.append(p)
    return tuple(scope), op_part


def _value_dims(model: onnx.ModelProto) -> dict[str, tuple[int | None, ...]]:
    """ONNX value name -> dims (None where unknown or symbolic), from ONNX shape inference where it works."""
    try:
        model = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except Exception:  # noqa: BLE001 - shapes are a cross-check only: without them, dlc's own inference stands
        pass
    dims = {}
    g = model.graph
    for vi in [*g.input, *g.value_info, *g.output]:
        t = vi.type.tensor_type
        if vi.type.HasField("tensor_type") and t.HasField("shape"):
            dims[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim)
    return dims


@dataclass
class _Decode:
    """The decode subgraph of a detect layer dlc exported, cut off the model: what the detect layer that
    replaces it reads (the head maps, scale by scale) and is (its YAML parameters, from the metadata)."""

    layer: str  # the detect layer's name: its decode nodes are '<layer>/s<i>/...' and '<layer>'
    output: str  # the ONNX value with the decoded rows
    heads: list[str]  # ONNX values, in scale order
    raw: dict[str, Any]
    grids: list[list[int]] | None
    outputs: list[str]  # the original model's outputs


def _cut_decode(model: onnx.ModelProto, meta: dict[str, Any], file: str) -> tuple[onnx.ModelProto, _Decode] | None:
    """For a detector dlc exported (metadata task: detection): the model without its decode, whose outputs are
    the head maps instead, and what the detect layer needs. None for other models, and for a detector whose
    decode is cut off already."""
    if meta.get("task") != "detection":
        return None
    det = meta.get("detection")

    def bad(what: str) -> DlcError:
        return DlcError(Diagnostic(f"the ONNX metadata says task: detection, but {what}", file=file,
                                   hint="export it again with `dlc compile`, or cut the decode off and import the "
                                        "head maps alone"))

    if not isinstance(det, dict) or not isinstance(det.get("output"), str):
        raise bad("it has no detection.output naming the decoded output")
    g = model.graph
    output, outputs = det["output"], [o.name for o in g.output]
    if output not in outputs:
        return None
    kind = det.get("decode")
    if not isinstance(kind, str) or not kind.startswith("yolov5"):
        raise bad(f"its decode is {kind!r}; this dlc imports the yolov5 decode its detect layer writes")
    scale_node = re.compile(re.escape(output) + r"/s(\d+)/")
    producers = {o: n for n in g.node for o in n.output if o}
    consts = {t.name for t in g.initializer} | {o for n in g.node if n.op_type == "Constant" for o in n.output}

    def inside(n: onnx.NodeProto) -> bool:
        return n.name == output or scale_node.match(n.name) is not None

    first = producers.get(output)
    if first is None or not inside(first):
        raise bad(f"output '{output}' is not computed by a decode whose nodes are named '{output}/s<i>/...'")
    decode: dict[str, onnx.NodeProto] = {}
    heads: dict[int, set[str]] = {}
    stack = [first]
    while stack:
        n = stack.pop()
        if n.output[0] in decode:
            continue
        decode[n.output[0]] = n
        if n.op_type not in _DECODE_OPS or n.domain not in ("", "ai.onnx"):
            raise bad(f"its decode has node '{n.name}' ({n.op_type}), which dlc's detect layer does not write")
        for v in n.input:
            p = producers.get(v)
            if not v or v in consts:
                continue
            if p is not None and inside(p):
                stack.append(p)
                continue
            m = scale_node.match(n.name)
            if m is None:
                raise bad(f"decode node '{n.name}' reads '{v}', which is not a scale's decoded rows")
            heads.setdefault(int(m.group(1)), set()).add(v)
    anchors = det.get("anchors")
    scales = len(anchors) if isinstance(anchors, list) else len(heads)
    if sorted(heads) != list(range(scales)) or any(len(v) != 1 for v in heads.values()):
        found = {f"s{i}": sorted(v) for i, v in sorted(heads.items())}
        raise bad(f"its decode reads {found}, not one head map for each of its {scales} scale(s)")
    for n in g.node:
        if n.output[0] not in decode and any(v in decode and v != output for v in n.input):
            raise bad(f"node '{n.name}' reads a value inside the decode of '{output}'")
    # The detect layer: classes, anchors and strides from the metadata, post-processing and loss settings where
    # it has them (the defaults otherwise).
    raw: dict[str, Any] = {"classes": det.get("num_classes"), "anchors": anchors, "strides": det.get("strides")}
    for section, keys in ((meta.get("postprocess"), POSTPROCESS_PARAMS), (det.get("loss"), LOSS_PARAMS)):
        if isinstance(section, dict):
            raw.update({k: section[k] for k in keys if k in section})
    grids = det.get("grids")
    cut = onnx.ModelProto()
    cut.CopyFrom(model)
    kept = [n for n in cut.graph.node if n.output[0] not in decode]
    del cut.graph.node[:]
    cut.graph.node.extend(kept)
    head_values = [next(iter(heads[i])) for i in range(scales)]
    new_outputs: list[onnx.ValueInfoProto] = []
    for o in g.output:
        if o.name == output:
            new_outputs += [helper.make_tensor_value_info(h, TensorProto.FLOAT, None) for h in head_values]
        else:
            new_outputs.append(o)
    del cut.graph.output[:]
    cut.graph.output.extend(new_outputs)
    return cut, _Decode(output, output, head_values, raw, grids if isinstance(grids, list) else None, outputs)


class _Importer:
    def __init__(self, model: onnx.ModelProto, name: str | None, source: str | None):
        self.source = source
        self.file = source or "<onnx model>"
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
        if not MIN_OPSET <= self.opset <= MAX_OPSET:
            raise DlcError(
                Diagnostic(
                    f"opset {self.opset}: dlc imports ONNX opsets {MIN_OPSET} to {MAX_OPSET}",
                    file=self.file,
                    hint="convert it with onnx.version_converter first",
                )
            )
        self.meta = self._metadata(model)
        self.onnx_nodes = len(model.graph.node)
        self.decode: _Decode | None = None
        cut = _cut_decode(model, self.meta, self.file)
        if cut is not None:  # a dlc detector: its decode becomes one detect layer (see finish)
            model, self.decode = cut
        try:
            model, _ = optimize(model, NORMALIZE)
        except DlcError:
            raise
        except Exception:  # noqa: BLE001 - normalising is a help, not a must: map the graph as it is
            pass
        self.model = model
        g = model.graph
        self.consts: dict[str, np.ndarray] = {t.name: tensor_array(t, self.file) for t in g.initializer}
        for n in g.node:
            if n.op_type == "Constant" and n.domain in ("", "ai.onnx"):
                value = constant_value(n)
                if value is not None:
                    self.consts[n.output[0]] = value
        self.dims = _value_dims(model)
        self.producers = {o: n for n in g.node for o in n.output if o}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in g.node:
            for i in n.input:
                if i:
                    self.consumers.setdefault(i, []).append(n)
        self.output_names = [o.name for o in g.output]
        self.alias: dict[str, str] = {}  # ONNX value -> IR value
        self.origin: dict[str, str] = {}  # IR value -> the ONNX value it stands for
        self.broken: set[str] = set()
        self.unsupported: dict[tuple[str, str | None], list[str]] = {}
        self.taken: set[str] = set()
        self.graph = self._graph(name)

    # --- set-up ---------------------------------------------------------------------------------------------
    def _metadata(self, model: onnx.ModelProto) -> dict[str, Any]:
        meta = read_metadata(model, self.file)  # not a JSON object: a DlcError naming the file
        return meta if isinstance(meta, dict) else {}

    def _graph(self, name: str | None) -> Graph:
        g = self.model.graph
        inputs = [i for i in g.input if i.name not in self.consts]
        if len(inputs) != 1:
            names = ", ".join(f"'{i.name}'" for i in inputs) or "none"
            raise DlcError(
                Diagnostic(
                    f"the model has {len(inputs)} inputs ({names}); dlc imports models with "
                    "exactly one image input N×C×H×W",
                    file=self.file,
                )
            )
        vi = inputs[0]
        self.onnx_input = vi.name
        t = vi.type.tensor_type
        if not vi.type.HasField("tensor_type") or t.elem_type != TensorProto.FLOAT:
            kind = (
                TensorProto.DataType.Name(t.elem_type) if vi.type.HasField("tensor_type") else "not a tensor"
            )
            raise DlcError(
                Diagnostic(
                    f"input '{vi.name}' is {kind}; dlc imports a float32 image input N×C×H×W", file=self.file
                )
            )
        dims = (
            [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
            if t.HasField("shape")
            else None
        )
        if dims is None or len(dims) != 4:
            rank = "of unknown rank" if dims is None else f"of rank {len(dims)}"
            raise DlcError(
                Diagnostic(f"input '{vi.name}' is {rank}; dlc imports an image input N×C×H×W", file=self.file)
            )
        if any(not d for d in dims[1:]):
            shown = [d if d else "?" for d in dims]
            raise DlcError(
                Diagnostic(
                    f"input '{vi.name}' has shape {shown}: C, H and W must be fixed numbers (the "
                    "batch may be dynamic)",
                    file=self.file,
                    hint="export the model again with a fixed image size",
                )
            )
        self.batch = dims[0] or None
        shape = tuple(int(d) for d in dims[1:])
        input_name = plain_name(vi.name)
        if not input_name or input_name[0].isdigit():
            input_name = "input"
        self.taken.add(input_name)
        self.alias[vi.name] = input_name
        self.shapes: dict[str, Shape] = {input_name: shape}
        channels = shape[0]
        norm = {}
        for key, default in (("mean", 0.0), ("std", 1.0)):
            value = (
                (self.meta.get("input") or {}).get(key) if isinstance(self.meta.get("input"), dict) else None
            )
            ok = (
                isinstance(value, list)
                and len(value) == channels
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
            )
            norm[key] = [float(v) for v in value] if ok else [default] * channels
        classes = self.meta.get("classes")
        classes = [str(c) for c in classes] if isinstance(classes, list) and classes else None
        name = (
            name
            or self.meta.get("model")
            or (Path(self.source).stem if self.source else None)
            or g.name
            or "model"
        )
        return Graph(
            str(name),
            [ValueInfo(input_name, shape)],
            meta={
                "input": {"name": input_name, "shape": list(shape), **norm},
                "classes": classes,
                "source": {
                    "file": self.source,
                    "opset": self.opset,
                    "onnx_nodes": self.onnx_nodes,
                    "producer": f"{self.model.producer_name} {self.model.producer_version}".strip(),
                },
            },
        )

    # --- helpers --------------------------------------------------------------------------------------------
    def value(self, name: str) -> str:
        """The IR value an ONNX value stands for."""
        if name in self.alias:
            return self.alias[name]
        if name in self.broken:
            raise _Skip
        if name in self.consts:
            raise _Unsupported("reads a constant where dlc expects a feature map")
        raise _Unsupported(f"reads '{name}', which no node computes")

    def const(self, node: onnx.NodeProto, k: int) -> np.ndarray | None:
        if len(node.input) <= k or not node.input[k]:
            return None
        return self.consts.get(node.input[k])

    def shape(self, value: str) -> Shape:
        return self.shapes[value]

    def feature_map(self, node: onnx.NodeProto) -> str:
        x = self.value(node.input[0])
        if len(self.shape(x)) != 3:
            raise _Unsupported(f"its input is {fmt_shape(self.shape(x))}, not a C×H×W feature map")
        return x

    def layer_name(self, node: onnx.NodeProto, op: str, suffix: str = "") -> str:
        base = ""
        if node.name:
            scope, op_part = _scope(node.name, node.op_type)
            if op_part is not None and self.scope_count.get(scope, 0) > 1:
                scope += (op_part.lower(),)  # several layers in one scope: 'layer1_0_relu', 'layer1_0_add'
            base = plain_name("_".join(scope))
        base = base or plain_name(node.output[0] if node.output else "")
        if not base:
            base = f"{op}_{len(self.graph) + 1}"
        elif base[0].isdigit():
            base = f"{op}_{base}"
        base += suffix
        name, k = base, 2
        while name in self.taken:
            name, k = f"{base}_{k}", k + 1
        self.taken.add(name)
        return name

    def emit(
        self,
        node: onnx.NodeProto,
        op: str,
        inputs: list[str],
        raw: dict[str, Any],
        params: dict[str, np.ndarray] | None = None,
        out: str | None = None,
        suffix: str = "",
    ) -> str:
        """Add one IR layer made from `node`; its value stands for ONNX value `out` (the node's first output)."""
        opdef = REGISTRY[op]
        attrs, errors = opdef.parse_attrs(raw)
        if errors:
            raise _Unsupported("; ".join(message for _, message in errors))
        in_shapes = [self.shape(v) for v in inputs]
        try:
            out_shape, attrs = opdef.infer(attrs, in_shapes)
        except ShapeError as exc:
            raise _Unsupported(str(exc)) from None
        # Own, writable copies: training updates them in place (batch norm's running statistics).
        params = {k: np.array(v, dtype=np.float32, order="C") for k, v in (params or {}).items()}
        want = opdef.param_shapes(attrs, in_shapes)
        got = {k: tuple(v.shape) for k, v in params.items()}
        if got != want:
            raise _Unsupported(f"its tensors have shapes {got}; the layer needs {want}")
        name = self.layer_name(node, op, suffix)
        self.graph.add_node(
            Node(
                name,
                op,
                list(inputs),
                [name],
                attrs=attrs,
                params=params,
                source=Source(self.source, None, f"ONNX node '{node.name or node.output[0]}'"),
            )
        )
        self.shapes[name] = out_shape
        self.graph.shapes[name] = out_shape
        onnx_value = node.output[0] if out is None else out
        self.alias[onnx_value] = name
        self.origin[name] = onnx_value
        return name

    def pads(
        self,
        node: onnx.NodeProto,
        hw: tuple[int, int],
        kernel: list[int],
        strides: list[int],
        dilations: list[int],
    ) -> list[int]:
        auto = _text(attr(node, "auto_pad", "NOTSET"))
        if auto in ("NOTSET", ""):
            pads = [int(p) for p in attr(node, "pads", [0, 0, 0, 0])]
            if len(pads) != 4 or min(pads) < 0:
                raise _Unsupported(f"pads {pads}")
            return pads
        if auto == "VALID":
            return [0, 0, 0, 0]
        if auto in ("SAME_UPPER", "SAME_LOWER"):
            t, left, b, r = resolve_pads("same", hw, tuple(kernel), tuple(strides), tuple(dilations))
            return [t, left, b, r] if auto == "SAME_UPPER" else [b, r, t, left]
        raise _Unsupported(f"auto_pad {auto}")

    def axes(self, node: onnx.NodeProto, input_from: int) -> list[int] | None:
        """Squeeze/ReduceMean axes: an attribute in older opsets, the second input from opset `input_from` on."""
        if self.opset < input_from:
            axes = attr(node, "axes")
            return None if axes is None else [int(a) for a in axes]
        value = self.const(node, 1)
        if value is None and len(node.input) > 1 and node.input[1]:
            raise _Unsupported("its axes are computed at run time")
        return None if value is None else [int(a) for a in np.asarray(value).reshape(-1)]

    # --- helpers the import rules in compiler/ops/ share ------------------------------------------------------
    def conv_weights(self, node: onnx.NodeProto, what: str) -> tuple[np.ndarray, np.ndarray | None, list[int]]:
        """A (transposed) convolution's constant 2-D weight, optional constant bias and kernel size."""
        w = self.const(node, 1)
        if w is None:
            raise _Unsupported("its weight is not a constant")
        if w.ndim != 4:
            raise _Unsupported(f"{w.ndim - 2}-D {what} (dlc convolves in 2-D)")
        b = self.const(node, 2)
        if b is None and len(node.input) > 2 and node.input[2]:
            raise _Unsupported("its bias is not a constant")
        kernel = [int(k) for k in attr(node, "kernel_shape", w.shape[2:])]
        if kernel != list(w.shape[2:]):
            raise _Unsupported(f"kernel_shape {kernel} differs from the weight's {list(w.shape[2:])}")
        return w, b, kernel


    def _scalar(self, name: str) -> float | None:
        v = self.consts.get(name)
        return float(np.asarray(v).reshape(-1)[0]) if v is not None and np.asarray(v).size == 1 else None

    def _find_gelus(self) -> None:
        """PyTorch's GELU before opset 20: Mul(Mul(x, Add(Erf(Div(x, sqrt 2)), 1)), 0.5) (Div may be Mul by
        1/sqrt 2; operands in either order). The last Mul becomes one gelu layer, the other nodes go."""
        self.gelu_inner: set[str] = set()
        self.gelu_at: dict[str, str] = {}

        def only_reader(value: str) -> onnx.NodeProto | None:
            readers = self.consumers.get(value, [])
            return readers[0] if len(readers) == 1 and value not in self.output_names else None

        def other(node: onnx.NodeProto, value: str) -> str | None:
            ins = [i for i in node.input if i]
            return ins[1 - ins.index(value)] if len(ins) == 2 and value in ins else None

        for erf in self.model.graph.node:
            if erf.op_type != "Erf" or erf.domain not in ("", "ai.onnx"):
                continue
            scale = self.producers.get(erf.input[0])
            if scale is None or scale.op_type not in ("Div", "Mul") or only_reader(scale.output[0]) is not erf:
                continue
            x = scale.input[0]
            factor = self._scalar(scale.input[1])
            want = math.sqrt(2.0) if scale.op_type == "Div" else 1 / math.sqrt(2.0)
            if factor is None or abs(factor - want) > 1e-4 or x in self.consts:
                continue
            add = only_reader(erf.output[0])
            if add is None or add.op_type != "Add" or self._scalar(other(add, erf.output[0]) or "") != 1.0:
                continue
            mul1 = only_reader(add.output[0])
            if mul1 is None or mul1.op_type != "Mul" or other(mul1, add.output[0]) != x:
                continue
            mul2 = only_reader(mul1.output[0])
            if mul2 is None or mul2.op_type != "Mul" or self._scalar(other(mul2, mul1.output[0]) or "") != 0.5:
                continue
            self.gelu_inner.update(n.output[0] for n in (scale, erf, add, mul1))
            self.gelu_at[mul2.output[0]] = x


    def _silu_input(self, node: onnx.NodeProto) -> str | None:
        """For Mul(x, Sigmoid(x)) (either order): x."""
        if len(node.input) != 2:
            return None
        for a, b in (node.input, reversed(node.input)):
            sig = self.producers.get(b)
            if (
                sig is not None
                and sig.op_type == "Sigmoid"
                and sig.domain in ("", "ai.onnx")
                and sig.input[0] == a
            ):
                return a
        return None


    def _binary(self, node: onnx.NodeProto, op: str, by_const: str, verb: str) -> None:
        """Mul, Sub or Div of two computed tensors: equal shapes, or C×H×W with a C×1×1 second operand."""
        names = [i for i in node.input if i]
        constant = [k for k, i in enumerate(names) if i in self.consts]
        if len(names) == 2 and len(constant) == 1:
            k = constant[0]
            return self.affine(node, op, names[1 - k], self.consts[names[k]], const_first=k == 0)
        if len(names) != 2 or constant:
            raise _Unsupported(f"{by_const} a constant (dlc takes only a scalar or per-channel constant)")
        a, b = (self.value(i) for i in names)
        sa, sb = self.shape(a), self.shape(b)
        if op == "mul" and len(sb) == 3 and sa == (sb[0], 1, 1):
            a, b, sa, sb = b, a, sb, sa  # the gate second (a product commutes; a difference or quotient does not)
        if not (sa == sb or (len(sa) == 3 and sb == (sa[0], 1, 1))):
            raise _Unsupported(
                f"broadcasts {fmt_shape(sa)} with {fmt_shape(sb)} (dlc {verb} equal shapes or C×H×W by C×1×1)"
            )
        self.emit(node, op, [a, b], {})
        return None

    def affine(self, node: onnx.NodeProto, op: str, x: str, c: np.ndarray, const_first: bool) -> None:
        """x * c, x / c, x + c, x - c or c - x with a constant c that is a scalar or varies only along the
        channel axis: one affine layer (scale and shift per channel)."""
        value = self.value(x)
        shape = self.shape(value)
        verb = {"mul": "multiplies by", "div": "divides by", "add": "adds", "sub": "subtracts"}[op]
        if op == "div" and const_first:
            raise _Unsupported("divides a constant by a tensor (dlc divides only by a constant)")
        vec = channel_vector(np.asarray(c), len(shape) + 1, shape[0]) if shape else None
        if vec is None:
            raise _Unsupported(
                f"{verb} a constant of shape {list(np.shape(c))} (dlc takes only a scalar or per-channel constant: "
                "(), (1,), (C,) for a flat input, (C, 1, 1) or (1, C, 1, 1))"
            )
        ones, zeros = np.ones_like(vec), np.zeros_like(vec)
        scale, shift = {
            "mul": (vec, zeros),
            "div": (1.0 / vec, zeros),
            "add": (ones, vec),
            "sub": (-ones, vec) if const_first else (ones, -vec),
        }[op]
        self.emit(node, "affine", [value], {}, {"scale": scale, "shift": shift})


    def bias_add(self, node: onnx.NodeProto, y: str, c: np.ndarray) -> None:
        """layer(x) + constant bias, where the layer is a conv or linear layer whose output nothing else reads;
        any other tensor plus a scalar or per-channel constant is an affine layer."""
        value = self.value(y)
        layer = self.graph.producer(value)
        ok = (
            layer is not None
            and layer.op in ("conv", "linear")
            and self.origin.get(value) == y
            and len(self.consumers.get(y, [])) == 1
            and y not in self.output_names
        )
        vec = channel_vector(c, len(self.shape(value)) + 1, layer.attrs["out"]) if ok else None
        if vec is None:  # not a bias to fold: a shift of its own
            return self.affine(node, "add", y, c, False)
        layer.params["bias"] = (layer.params.get("bias", 0.0) + vec).astype(np.float32)
        layer.attrs["bias"] = True
        self.alias[node.output[0]] = value
        self.origin[value] = node.output[0]
        return None


    def _flat(self, node: onnx.NodeProto, x: str) -> None:
        if len(self.shape(x)) == 1:
            self.alias[node.output[0]] = x
        else:
            self.emit(node, "flatten", [x], {})

    def _reshape_to(self, node: onnx.NodeProto, x: str, shape: Shape) -> None:
        """x under a new per-sample shape: flatten where that is what it is, nothing where nothing changes."""
        if tuple(shape) == self.shape(x):
            self.alias[node.output[0]] = x
        elif len(shape) == 1:
            self._flat(node, x)
        else:
            self.emit(node, "reshape", [x], {"shape": list(shape)})


    def _channel_axis(self, node: onnx.NodeProto, x: str, default: int) -> None:
        rank = len(self.shape(x)) + 1
        axis = int(attr(node, "axis", default))
        if axis % rank != 1:
            raise _Unsupported(f"along axis {axis} (dlc splits and slices channels, axis 1, only)")


    def _emit_layer_norm(self, at: onnx.NodeProto, ln: onnx.NodeProto, x: str) -> None:
        c = self.shape(x)[0]
        scale = self.const(ln, 1)
        bias = self.const(ln, 2) if len(ln.input) > 2 and ln.input[2] else np.zeros(c, np.float32)
        if scale is None or bias is None or np.size(scale) != c or np.size(bias) != c:
            raise _Unsupported("its scale and bias are not constants with one value per channel")
        self.emit(at, "layernorm", [x], {"eps": _round(attr(ln, "epsilon", 1e-5))},
                  {"scale": np.asarray(scale).reshape(c), "bias": np.asarray(bias).reshape(c)})

    def _find_layer_norms_2d(self) -> None:
        """Transpose(0,2,3,1) -> LayerNormalization(axis -1) -> Transpose(0,3,1,2), each read only by the next:
        the last Transpose becomes one layernorm layer over the channels of the NCHW map."""
        self.ln2d_inner: set[str] = set()
        self.ln2d_at: dict[str, tuple[onnx.NodeProto, str]] = {}
        for ln in self.model.graph.node:
            if ln.op_type != "LayerNormalization" or ln.domain not in ("", "ai.onnx"):
                continue
            first = self.producers.get(ln.input[0])
            readers = self.consumers.get(ln.output[0], [])
            if (first is None or first.op_type != "Transpose" or attr(first, "perm") != [0, 2, 3, 1]
                    or len(self.consumers.get(first.output[0], [])) != 1 or len(readers) != 1
                    or readers[0].op_type != "Transpose" or attr(readers[0], "perm") != [0, 3, 1, 2]
                    or int(attr(ln, "axis", -1)) not in (-1, 3) or first.output[0] in self.output_names
                    or ln.output[0] in self.output_names):
                continue
            self.ln2d_inner.update((first.output[0], ln.output[0]))
            self.ln2d_at[readers[0].output[0]] = (ln, first.input[0])

    _CL_UNARY = {"Relu": "relu", "Sigmoid": "sigmoid", "Tanh": "tanh", "Gelu": "gelu"}

    def _find_channels_last(self) -> None:
        """Transpose(0,2,3,1) -> a chain of ops on the channel axis -> Transpose(0,3,1,2), as ConvNeXt's block
        writes it (LayerNorm, Linear, GELU, Linear on channels-last maps). Each op of the chain has one reader
        and acts on the last axis only: LayerNormalization, MatMul by a constant C_in×C_out (+ Add of its bias:
        a 1×1 conv), Add or Mul of a per-channel constant (affine), GELU, Relu, Sigmoid, Tanh. The chain is
        imported as those layers on the NCHW map at the closing Transpose; a chain with anything else is left
        to the usual handlers (which name what they cannot take)."""
        self.cl_inner: set[str] = set()
        self.cl_at: dict[str, tuple[str, list[tuple[str, onnx.NodeProto, Any]]]] = {}

        def readers(value: str) -> list[onnx.NodeProto]:
            return [] if value in self.output_names else self.consumers.get(value, [])

        def per_channel(name: str, c: int) -> np.ndarray | None:
            v = self.consts.get(name)
            return None if v is None or np.size(v) != c or np.shape(v)[-1:] != (c,) else np.asarray(v).reshape(c)

        for first in self.model.graph.node:
            if first.op_type != "Transpose" or attr(first, "perm") != [0, 2, 3, 1] or \
                    first.output[0] in self.ln2d_inner:
                continue
            dims = self.dims.get(first.input[0])
            if not dims or len(dims) != 4 or not isinstance(dims[1], int):
                continue
            c, cur, steps, inner = dims[1], first.output[0], [], [first.output[0]]
            ok = False
            while True:
                rs = readers(cur)
                if cur in self.gelu_inner or any(r.output[0] in self.gelu_inner for r in rs):
                    final = next((out for out, x in self.gelu_at.items() if x == cur), None)
                    if final is None:
                        break
                    steps.append(("gelu", self.producers[final], None))
                    inner.append(final)  # (the chain's other nodes are skipped as gelu_inner already)
                    cur = final
                    continue
                if len(rs) != 1:
                    break
                r = rs[0]
                if r.op_type == "Transpose" and attr(r, "perm") == [0, 3, 1, 2]:
                    ok = bool(steps)
                    last = r
                    break
                others = [i for i in r.input if i and i != cur]
                if r.op_type == "LayerNormalization" and int(attr(r, "axis", -1)) in (-1, 3) and r.input[0] == cur:
                    scale = per_channel(r.input[1], c)
                    bias = per_channel(r.input[2], c) if len(r.input) > 2 and r.input[2] else np.zeros(c, np.float32)
                    if scale is None or bias is None:
                        break
                    steps.append(("layernorm", r, (scale, bias)))
                elif r.op_type == "MatMul" and r.input[0] == cur and others and \
                        np.ndim(self.consts.get(others[0], np.zeros(0))) == 2 and \
                        np.shape(self.consts[others[0]])[0] == c:
                    w = np.asarray(self.consts[others[0]])
                    steps.append(("linear", r, [w, None]))
                    c = int(w.shape[1])
                elif r.op_type in ("Add", "Mul") and len(others) == 1 and per_channel(others[0], c) is not None:
                    vec = per_channel(others[0], c)
                    if r.op_type == "Add" and steps and steps[-1][0] == "linear" and steps[-1][2][1] is None:
                        steps[-1][2][1] = vec  # the Linear's bias
                    else:
                        steps.append(("affine", r, (np.ones(c) if r.op_type == "Add" else vec,
                                                    vec if r.op_type == "Add" else np.zeros(c))))
                elif r.op_type in self._CL_UNARY and r.input[0] == cur:
                    if r.op_type == "Gelu" and attr(r, "approximate", b"none") not in (b"none", "none"):
                        break
                    steps.append((self._CL_UNARY[r.op_type], r, None))
                else:
                    break
                inner.append(r.output[0])
                cur = r.output[0]
            if ok:
                self.cl_inner.update(inner)
                self.cl_at[last.output[0]] = (first.input[0], steps)

    def _emit_channels_last(self, closing: onnx.NodeProto) -> None:
        source, steps = self.cl_at[closing.output[0]]
        x = self.value(source)
        for k, (kind, node, data) in enumerate(steps):
            # the chain's ONNX values are channels-last: the layers stand for NCHW twins of them
            out = closing.output[0] if k == len(steps) - 1 else f"{node.output[0]} (NCHW)"
            if kind == "layernorm":
                x = self.emit(node, "layernorm", [x], {"eps": _round(attr(node, "epsilon", 1e-5))},
                              {"scale": data[0], "bias": data[1]}, out=out)
            elif kind == "linear":
                w, b = data
                params = {"weight": np.ascontiguousarray(w.T)[:, :, None, None]}
                if b is not None:
                    params["bias"] = b
                x = self.emit(node, "conv", [x], {"out": int(w.shape[1]), "kernel": [1, 1], "bias": b is not None},
                              params, out=out)
            elif kind == "affine":
                x = self.emit(node, "affine", [x], {}, {"scale": data[0], "shift": data[1]}, out=out)
            else:
                x = self.emit(node, kind, [x], {}, out=out)


    # --- the whole graph ------------------------------------------------------------------------------------
    def run(self) -> Graph:
        g = self.model.graph
        # Sigmoids read only as x * Sigmoid(x): the Mul becomes one silu layer and the Sigmoid goes.
        self.silu_sigmoids = set()
        for n in g.node:
            if n.op_type != "Sigmoid" or n.domain not in ("", "ai.onnx") or n.output[0] in self.output_names:
                continue
            readers = self.consumers.get(n.output[0], [])
            if readers and all(r.op_type == "Mul" and self._silu_input(r) == n.input[0] for r in readers):
                self.silu_sigmoids.add(n.output[0])
        self._find_gelus()
        self._find_layer_norms_2d()
        self._find_channels_last()
        # How many layer-making nodes share each name scope (see _scope).
        self.scope_count: dict[tuple[str, ...], int] = {}
        for n in g.node:
            if (
                n.name
                and n.op_type not in ("Constant", "Identity", "Dropout")
                and n.output[0] not in self.silu_sigmoids
                and n.output[0] not in self.gelu_inner
                and n.output[0] not in self.ln2d_inner
                and n.output[0] not in self.cl_inner
            ):
                key = _scope(n.name, n.op_type)[0]
                self.scope_count[key] = self.scope_count.get(key, 0) + 1
        for node in g.node:
            std = node.domain in ("", "ai.onnx")
            if std and node.op_type == "Constant":
                continue
            if node.output and node.output[0] in self.gelu_inner:
                continue  # part of x * 0.5 * (1 + erf(x / sqrt 2)): the last Mul is the gelu layer
            if node.output and node.output[0] in self.ln2d_inner:
                continue  # Transpose + LayerNormalization of a LayerNorm2d: the last Transpose is the layer
            if node.output and node.output[0] in self.cl_inner:
                continue  # inside a channels-last chain: its closing Transpose emits the layers
            handler = RULES.get(node.op_type) if std else None
            try:
                if handler is None:
                    raise _Unsupported(None)
                handler(self, node)
            except _Skip:
                self.broken.update(o for o in node.output if o)
            except _Unsupported as exc:
                op = node.op_type if std else f"{node.domain}.{node.op_type}"
                self.unsupported.setdefault((op, exc.reason), []).append(node.name or node.output[0])
                self.broken.update(o for o in node.output if o)
        if self.unsupported:
            raise DlcError(self.unsupported_diagnostic())
        return self.finish()

    def unsupported_diagnostic(self) -> Diagnostic:
        groups = []
        for (op, reason), names in self.unsupported.items():
            shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
            groups.append(f"{op} ×{len(names)} ({shown})" + (f" [{reason}]" if reason else ""))
        heads = self.decode_heads()
        cut = ""
        if heads:
            quoted = ", ".join(f"'{h}'" for h in heads)
            cut = (
                f"this looks like a detector's decode: dlc imports the decode only of detectors it exported "
                f"itself; cut it off at the head maps ({quoted}), e.g. onnx.utils.extract_model("
                f"'{self.source or 'model.onnx'}', 'heads.onnx', ['{self.onnx_input}'], [{quoted}]), "
                "import that and add a "
                "detect layer reading the heads to the YAML; "
            )
        return Diagnostic(
            "unsupported ONNX ops: " + ", ".join(groups),
            file=self.file,
            hint=f"{cut}dlc imports {SUPPORTED}",
        )

    def decode_heads(self) -> list[str]:
        """Where an unsupported op that decodes boxes (Slice, Pow, Exp, ...) shows a detector's decode: the
        outputs of the nearest convolutions before those ops (the head maps to cut at), in graph order."""
        g = self.model.graph
        hint_ops = {(op, reason) for op, reason in self.unsupported if op in _DECODE_HINT_OPS}
        # Decoded boxes come out as N×K×(4 + ...) (or N×(4 + ...)×K), or NMS picks them.
        rows = any(len(self.dims.get(name) or ()) == 3 for name in self.output_names)
        if not hint_ops or not (rows or "NonMaxSuppression" in {op for op, _ in hint_ops}):
            return []
        if self.meta.get("task") == "detection":
            return []
        names = {n for key in hint_ops for n in self.unsupported[key]}
        stack = [n for n in g.node if (n.name or n.output[0]) in names]
        seen: set[str] = set()
        heads: set[str] = set()
        while stack:
            n = stack.pop()
            for v in n.input:
                p = self.producers.get(v)
                if p is None or v in seen:
                    continue
                seen.add(v)
                if p.op_type == "Conv":
                    heads.add(v)
                else:
                    stack.append(p)
        order = {o: k for k, n in enumerate(g.node) for o in n.output}
        return sorted(heads, key=order.__getitem__)

    def finish(self) -> Graph:
        graph = self.graph
        names = self.output_names
        if self.decode is not None:
            self.add_detect(self.decode)
            names = self.decode.outputs
        outputs = {}
        for name in names:
            value = self.alias.get(name)
            if value is None or value in graph.input_names:
                what = "the model input itself" if value else "not computed by any layer"
                raise DlcError(
                    Diagnostic(
                        f"graph output '{name}' is {what}; dlc needs each output to be a layer's",
                        file=self.file,
                    )
                )
            outputs[name] = value
        graph.outputs = list(dict.fromkeys(outputs.values()))
        graph.meta["source"]["outputs"] = outputs
        infer_shapes(graph)
        graph.check()
        for onnx_value, value in self.alias.items():
            dims, shape = self.dims.get(onnx_value), graph.shapes.get(value)
            if dims is None or shape is None or None in dims[1:]:
                continue
            if tuple(dims[1:]) != tuple(shape) or len(dims) != len(shape) + 1:
                raise DlcError(
                    Diagnostic(
                        f"value '{onnx_value}': dlc infers N×{fmt_shape(shape)} for layer '{value}', the ONNX model "
                        f"says {list(dims)}",
                        file=self.file,
                        hint="a dlc import bug: please report it with the model",
                    )
                )
        return graph


    def add_detect(self, d: _Decode) -> None:
        """The detect layer in place of a dlc detector's decode, reading the layers that compute its head maps."""
        inputs = []
        for head in d.heads:
            value = self.alias.get(head)
            if value is None or value in self.graph.input_names:
                raise DlcError(Diagnostic(f"the decode of '{d.output}' reads '{head}', which is not a layer's "
                                          "output: dlc needs a head map computed by a layer", file=self.file))
            inputs.append(value)
        opdef = REGISTRY["detect"]
        attrs, errors = opdef.parse_attrs(d.raw)
        if errors:
            raise DlcError(Diagnostic(
                f"the detection metadata does not make a detect layer: {'; '.join(m for _, m in errors)}",
                file=self.file, hint="export the model again with `dlc compile`"))
        try:
            shape, attrs = opdef.infer(attrs, [self.shape(v) for v in inputs])
        except ShapeError as exc:
            raise DlcError(Diagnostic(f"the detection metadata does not fit the head maps: {exc}",
                                      file=self.file)) from None
        if d.grids is not None and [list(g) for g in attrs["grids"]] != d.grids:
            raise DlcError(Diagnostic(f"the head maps are {[list(g) for g in attrs['grids']]} cells, the "
                                      f"detection metadata says {d.grids}", file=self.file))
        base = plain_name(d.layer) or "detect"
        if attrs["strides"] is None:  # metadata without strides: those of the head maps, as a YAML build binds
            attrs["strides"] = infer_strides(base, self.graph.inputs[0].shape, attrs["grids"])
        name, k = base, 2
        while name in self.taken:
            name, k = f"{base}_{k}", k + 1
        self.taken.add(name)
        self.graph.add_node(Node(name, "detect", inputs, [name], attrs=attrs, params={},
                                 source=Source(self.source, None, f"ONNX nodes '{d.layer}/s<i>/...' (decode)")))
        self.shapes[name] = shape
        self.graph.shapes[name] = shape
        self.alias[d.output] = name
        self.origin[name] = d.output


def import_onnx(model: onnx.ModelProto, name: str | None = None, source: str | None = None) -> Graph:
    """Map an ONNX model to dlc's Graph IR (weights as layer parameters). `name` names the model (default: the
    name in dlc's metadata, else the file's stem); `source` is the file, for messages. Raises DlcError naming
    every unsupported node at once, or the input or output that dlc cannot take."""
    return _Importer(model, name, source).run()


def verify_import(
    original: onnx.ModelProto,
    graph: Graph,
    runs: int = 3,
    rtol: float = 1e-3,
    atol: float = 1e-4,
    seed: int = 0,
):
    """Run the original model and dlc's export of the imported graph on the same random inputs through
    onnxruntime (its optimizations off); raise DlcError if an output differs beyond tolerance."""
    from .export_onnx import to_onnx
    from .passes.verify import Verification, _session, random_feeds

    try:
        a = _session(original)
    except Exception as exc:  # noqa: BLE001 - e.g. an opset newer than the installed onnxruntime runs
        raise DlcError(
            f"onnxruntime cannot run the original model to compare ({exc}); import with --check 0 "
            "to skip the comparison"
        ) from None
    b = _session(to_onnx(graph))
    names = [o.name for o in a.get_outputs()]
    outputs = (graph.meta.get("source") or {}).get("outputs") or dict(zip(names, graph.outputs))
    rng = np.random.default_rng(seed)
    worst_abs = worst_rel = 0.0
    for _ in range(runs):
        feeds = random_feeds(a, rng)
        x = next(iter(feeds.values()))
        try:
            theirs = a.run(names, feeds)
        except Exception as exc:  # noqa: BLE001 - the original model fails on onnxruntime: not ours to prove
            raise DlcError(
                f"onnxruntime cannot run the original model to compare ({exc}); import with --check 0 "
                "to skip the comparison"
            ) from None
        mine = b.run([outputs[n] for n in names], {graph.input_names[0]: x})
        for name, want, got in zip(names, theirs, mine):
            if want.shape != got.shape:
                raise DlcError(
                    f"output '{name}': the imported model gives shape {got.shape}, the original {want.shape}"
                )
            with np.errstate(invalid="ignore", over="ignore"):  # inf - inf: equal values differ by 0
                diff = np.where(want == got, 0.0, np.abs(want.astype(np.float64) - got.astype(np.float64)))
            worst_abs = max(worst_abs, float(diff.max(initial=0)))
            worst_rel = max(worst_rel, float((diff / (np.abs(want) + 1e-12)).max(initial=0)))
            if not np.allclose(got, want, rtol=rtol, atol=atol):
                raise DlcError(
                    f"the imported model differs from the original on output '{name}': max abs diff "
                    f"{diff.max():.3g} (rtol {rtol:g}, atol {atol:g}); a dlc import bug: please report "
                    "it with the model"
                )
    return Verification(runs, worst_abs, worst_rel, rtol, atol)
