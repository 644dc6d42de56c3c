"""Graph -> a model YAML that reads like a hand-written one and that dlc's loader accepts: one flow-style line
per layer with only the parameters that differ from their defaults, `inputs:` only where a layer does not read
the layer above it, and `weights:` naming the safetensors file that holds the layers' tensors."""

from __future__ import annotations

import json
import re
from typing import Any

import numpy as np
import yaml

from . import __version__
from .graph import Graph, Node
from .ops import REGISTRY, Param

_PLAIN = re.compile(r"[A-Za-z_][A-Za-z0-9_./-]*")


def _str(s: str) -> str:
    """A string as a YAML scalar: plain where it reads back as the same string, else double-quoted."""
    if _PLAIN.fullmatch(s) and yaml.safe_load(s) == s:
        return s
    return json.dumps(s, ensure_ascii=False)


def _float(v: float) -> str:
    text = repr(float(v))
    mantissa, e, exponent = text.partition("e")
    if e and "." not in mantissa:  # PyYAML reads 1e-05 as a string; 1.0e-05 as a float
        text = f"{mantissa}.0e{exponent}"
    return text


def flow(v: Any) -> str:
    """A value in YAML flow style."""
    if isinstance(v, (bool, np.bool_)):
        return "true" if v else "false"
    if v is None:
        return "null"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        return _float(v)
    if isinstance(v, str):
        return _str(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(flow(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_str(str(k))}: {flow(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"cannot write {type(v).__name__} to YAML")


def _shown(p: Param, value: Any) -> Any:
    """A parameter in its shortest YAML form: 3 for [3, 3]; [1, 2] for pads (1, 2, 1, 2)."""
    if p.kind == "pair" and value is not None:
        return value[0] if value[0] == value[1] else list(value)
    if p.kind == "pad" and not isinstance(value, str):
        t, left, b, r = value
        if t == left == b == r:
            return t
        return [t, left] if (t, left) == (b, r) else [t, left, b, r]
    return value


def _whole(v: Any) -> Any:
    """Nested lists of numbers with whole floats as integers: anchors [[10.0, 13.0]] as [[10, 13]]."""
    if isinstance(v, (list, tuple)):
        return [_whole(x) for x in v]
    if isinstance(v, (float, np.floating)) and float(v).is_integer():
        return int(v)
    return v


def _detect_shown(name: str, value: Any) -> Any:
    """A detect layer's list parameters as one writes them: strides [8, 16] for [(8, 8), (16, 16)], anchors
    not found yet as auto."""
    if name == "anchors" and value is None:
        return "auto"
    if name == "strides" and value is not None:
        return [s[0] if s[0] == s[1] else list(s) for s in value]
    if name in ("anchors", "class_weights") and value is not None:
        return _whole(value)
    return value


def layer_params(node: Node) -> dict[str, Any]:
    """The node's YAML parameters that differ from the op's defaults (required ones always)."""
    out = {}
    for p in REGISTRY[node.op].params:
        value = node.attrs.get(p.name)
        if not p.required:
            default = p.parse(p.default)
            if value == default:
                continue
            if p.name == "stride" and p.default is None and value == node.attrs.get("kernel"):
                continue  # pooling: the stride defaults to the window
        out[p.name] = _detect_shown(p.name, value) if node.op == "detect" else _shown(p, value)
    for tensor, filler in node.fillers.items():
        out[f"{tensor}_filler"] = filler
    return out


def _same(values: list[float]) -> Any:
    return values[0] if len(set(values)) == 1 else values


def graph_to_yaml(graph: Graph, weights_file: str | None = "weights.safetensors") -> str:
    """The model section for `graph` (a flat graph: layer names without '/'). With `weights_file`, the model
    loads its tensors from that file (relative to the YAML's folder)."""
    nodes = graph.nodes()
    scoped = [n.name for n in nodes if "/" in n.name]
    if scoped:
        raise ValueError(f"graph_to_yaml writes flat layer lists; '{scoped[0]}' is a block-scoped name")
    meta = graph.meta
    inp = meta.get("input") or {}
    source = (meta.get("source") or {}).get("file")
    origin = f"imported from {source} by dlc {__version__}" if source else f"written by dlc {__version__}"
    lines = [f"# {graph.name}: {origin}, {len(nodes)} layers."]
    detector = any(n.op == "detect" for n in nodes)
    if weights_file and detector:
        lines += [
            f"# The layers' tensors are in {weights_file}, matched by layer name and shape when the model loads:",
            "# for other classes, set the detect layer's `classes` and its head convs' `out` (anchors × (5 +",
            "# classes)): the heads start from their fillers while the rest keep their weights; add data: and",
            "# train: sections to fine-tune.",
        ]
    elif weights_file:
        lines += [
            f"# The layers' tensors are in {weights_file}, matched by layer name and shape when the model loads:",
            "# change a layer (e.g. the last linear layer's `out`, for other classes) and that layer starts from",
            "# its filler while the rest keep their weights; add data: and train: sections to fine-tune.",
        ]
    mean = _same(inp.get("mean") or [0.0]) if inp else 0.0
    std = _same(inp.get("std") or [1.0]) if inp else 1.0
    value = graph.inputs[0]
    lines += [
        "model:",
        f"  name: {_str(graph.name)}",
        f"  input: {flow({'name': value.name, 'shape': list(value.shape), 'mean': mean, 'std': std})}",
    ]
    if meta.get("classes"):
        lines.append(f"  classes: {flow([str(c) for c in meta['classes']])}")
    if weights_file:
        lines.append(f"  weights: {_str(weights_file)}")
    lines.append("  layers:")
    prev = value.name
    for node in nodes:
        item: dict[str, Any] = {"name": node.name, "type": node.op, **layer_params(node)}
        if node.inputs != [prev]:
            item["inputs"] = node.inputs[0] if len(node.inputs) == 1 else list(node.inputs)
        lines.append(f"    - {flow(item)}")
        prev = node.outputs[0]
    if graph.outputs != [prev]:
        lines.append(f"  outputs: {flow(graph.outputs)}")
    return "\n".join(lines) + "\n"
