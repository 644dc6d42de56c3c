"""Transfer learning: start a model from a pretrained network's weights and choose what trains.

`train.init_from` names the source: an ONNX file (imported on the fly), a safetensors checkpoint (dlc train,
dlc import) or the folder `dlc import -o DIR` wrote. Tensors move by layer name and shape; each one that does not
is reported with its reason, and `strict: true` turns any of them into an error. `freeze` and `transfer` choose
the frozen layers; `reinit` sends layers back to their fillers even where the source fits.

The three regimes, one line each:
  transfer: head               # little data: train the last layer with parameters (and what follows it)
  transfer: {partial: LAYER}   # more data: freeze LAYER and everything it depends on, train the rest
  transfer: full               # a lot of data: train everything, from the pretrained weights
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import networkx as nx
import numpy as np

from ..errors import Diagnostic, DlcError, did_you_mean
from ..graph import Graph
from ..ops import REGISTRY

REGIMES = ("head", "full")


@dataclass
class TransferConfig:
    init_from: str | None = None  # as written, relative to the YAML file's folder
    strict: bool = False
    reinit: list[str] = field(default_factory=list)  # layer names or patterns
    freeze: list[str] = field(default_factory=list)  # layer names or patterns
    freeze_up_to: str | None = None  # this layer and every layer it depends on
    regime: str | None = None  # head | full | partial (with freeze_up_to)
    cache_features: bool = False  # train the head on the frozen trunk's outputs, computed once (feature_cache.py)
    line: int | None = None  # of init_from, for messages


def parse_transfer(section, checker, layer_names: list[str]) -> TransferConfig:
    """The transfer keys of `train:` (init_from, strict, reinit, freeze, transfer, cache_features), checked;
    problems go to `checker` with their lines."""
    t = TransferConfig()
    names = set(layer_names)

    def patterns(key: str, value: Any, within=None) -> list[str]:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(p, str) and p for p in items):
            checker.error(f"'train.{key}' must be a layer name, a pattern like 'stage1*', or a list of them, got "
                          f"{value!r}", key, within)
            return []
        for p in items:
            if not any(fnmatch.fnmatchcase(n, p) for n in layer_names):
                checker.error(f"'train.{key}': '{p}' matches no layer", key, within, did_you_mean(p, layer_names))
        return list(items)

    def layer(key: str, value: Any, within=None) -> str | None:
        if not isinstance(value, str) or value not in names:
            checker.error(f"'train.{key}' must name a layer, got {value!r}", key, within,
                          did_you_mean(str(value), layer_names))
            return None
        return value

    if "init_from" in section:
        value = section["init_from"]
        if not isinstance(value, str) or not value:
            checker.error(f"'train.init_from' must be the path of an .onnx file, a .safetensors checkpoint or a "
                          f"folder written by dlc import, got {value!r}", "init_from")
        elif Path(value).is_absolute() or ".." in Path(value).parts:
            checker.error(f"'train.init_from' must be a path inside the YAML file's folder, got '{value}'",
                          "init_from", hint="copy or link the pretrained file next to the YAML")
        else:
            t.init_from = value
        t.line = checker.line("init_from")
    t.strict = bool(section.get("strict", False))
    if "strict" in section and not isinstance(section["strict"], bool):
        checker.error(f"'train.strict' must be true or false, got {section['strict']!r}", "strict")
    if "reinit" in section:
        t.reinit = patterns("reinit", section["reinit"])
    if "freeze" in section:
        value = section["freeze"]
        if isinstance(value, dict):
            if set(value) != {"up_to"}:
                checker.error("'train.freeze' takes {up_to: LAYER}, or layer names or patterns", "freeze")
            else:
                t.freeze_up_to = layer("freeze.up_to", value["up_to"], value)
        else:
            t.freeze = patterns("freeze", value)
    if "transfer" in section:
        value = section["transfer"]
        if isinstance(value, dict) and set(value) == {"partial"}:
            t.regime = "partial"
            up_to = layer("transfer.partial", value["partial"], value)
            if t.freeze_up_to is not None or t.freeze:
                checker.error("give 'train.transfer' or 'train.freeze', not both (transfer chooses the frozen "
                              "layers)", "transfer")
            t.freeze_up_to = up_to
        elif value in REGIMES:
            t.regime = value
            if t.freeze_up_to is not None or t.freeze:
                checker.error("give 'train.transfer' or 'train.freeze', not both (transfer chooses the frozen "
                              "layers)", "transfer")
        else:
            checker.error(f"'train.transfer' must be head, full or {{partial: LAYER}}, got {value!r}", "transfer",
                          hint="head: train the classifier only; {partial: LAYER}: freeze up to LAYER; full: "
                               "train everything from the pretrained weights")
    if "cache_features" in section:
        if not isinstance(section["cache_features"], bool):
            checker.error(f"'train.cache_features' must be true or false, got {section['cache_features']!r}",
                          "cache_features")
        else:
            t.cache_features = section["cache_features"]
    return t


def _has_params(graph: Graph, name: str) -> bool:
    node = graph.node(name)
    return any(t in node.params for t in REGISTRY[node.op].trainable(node.attrs))


def frozen_layers(graph: Graph, t: TransferConfig) -> set[str]:
    """The names of the layers whose parameters do not train (their batch norms use running statistics)."""
    names = [n.name for n in graph.nodes()]
    if t.regime == "head":
        with_params = [n for n in names if _has_params(graph, n)]
        if not with_params:
            return set()
        head = with_params[-1]
        return set(names) - {head} - nx.descendants(graph.nx, head)
    if t.freeze_up_to is not None:
        return {t.freeze_up_to} | nx.ancestors(graph.nx, t.freeze_up_to)
    return {n for n in names if any(fnmatch.fnmatchcase(n, p) for p in t.freeze)}


def _fmt(shape) -> str:
    return "×".join(str(d) for d in shape) or "scalar"


def read_source(path: Path, where: str, line: int | None) -> dict[str, np.ndarray]:
    """The tensors of a pretrained network, named 'layer.tensor' like a dlc graph's parameters."""
    from ..onnx_io import load_onnx
    from .checkpoint import read_checkpoint

    def fail(message: str, hint: str | None = None) -> DlcError:
        return DlcError(Diagnostic(message, file=where, line=line, hint=hint))

    if path.is_dir():
        candidates = [path / "weights.safetensors", path / "checkpoint.safetensors", path / "model.onnx"]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise fail(f"'train.init_from' folder {path} holds none of weights.safetensors (dlc import), "
                       "checkpoint.safetensors (dlc train) or model.onnx")
        path = found
    if not path.is_file():
        raise fail(f"'train.init_from' file {path} not found", "init_from is relative to the YAML file's folder")
    if path.suffix.lower() == ".onnx":
        from ..onnx_import import import_onnx

        graph = import_onnx(load_onnx(path), source=path.name)
        return {f"{n.name}.{k}": v for n in graph.nodes() for k, v in n.params.items()}
    if path.suffix.lower() == ".safetensors":
        params, _, _, _ = read_checkpoint(path)
        return params
    raise fail(f"'train.init_from' must be an .onnx file, a .safetensors checkpoint or a folder from dlc import, "
               f"got '{path.name}'")


def apply_transfer(graph: Graph, t: TransferConfig, base: Path, where: str) -> dict[str, Any]:
    """Copy the source's tensors into the graph by layer name and shape, send `reinit` layers back to the
    fillers they already hold (the graph was just initialised), and report every tensor that did not move and
    why. With `strict`, any tensor that did not move (other than reinit) is an error."""
    source = read_source(base / t.init_from, where, t.line)
    reinit = {n.name for n in graph.nodes() if any(fnmatch.fnmatchcase(n.name, p) for p in t.reinit)}
    transferred, total = 0, 0
    mismatched: list[dict[str, Any]] = []
    missing: list[str] = []
    kept_fresh: list[str] = []
    used: set[str] = set()
    for node in graph.nodes():
        for tensor, current in node.params.items():
            key = f"{node.name}.{tensor}"
            total += 1
            value = source.get(key)
            if value is not None:
                used.add(key)
            if node.name in reinit:
                kept_fresh.append(key)
            elif value is None:
                missing.append(key)
            elif value.shape != current.shape:
                mismatched.append({"tensor": key, "source": list(value.shape), "model": list(current.shape)})
            else:
                node.params[tensor] = np.array(value, dtype=np.float32, copy=True)
                transferred += 1
    report = {"from": t.init_from, "transferred": transferred, "tensors": total, "reinit": kept_fresh,
              "shape_mismatch": mismatched, "not_in_source": missing, "unused_in_source": sorted(set(source) - used)}
    if transferred == 0 and total:
        raise DlcError(Diagnostic(f"'train.init_from': none of the {len(source)} tensors of '{t.init_from}' fits a "
                                  "layer of this model by name and shape", file=where, line=t.line,
                                  hint="layer names must match the source's (dlc import shows them); rename the "
                                       "layers or start without init_from"))
    if t.strict and (mismatched or missing):
        problems = [f"{m['tensor']} ({_fmt(m['source'])} in the source, {_fmt(m['model'])} here)"
                    for m in mismatched] + [f"{k} (not in the source)" for k in missing]
        raise DlcError(Diagnostic(f"'train.init_from' with strict: {len(problems)} tensor(s) do not transfer: "
                                  f"{', '.join(problems[:8])}{' ...' if len(problems) > 8 else ''}", file=where,
                                  line=t.line, hint="list the layers that change in 'train.reinit', or drop "
                                                    "strict"))
    return report


def describe(report: dict[str, Any]) -> str:
    """One line for the console: 'transferred 58 of 62 tensors from x.onnx; reinitialised fc.weight (1000×512 →
    5×512): shape; not in the source: ...'."""
    parts = [f"transferred {report['transferred']} of {report['tensors']} tensors from {report['from']}"]
    if report["shape_mismatch"]:
        parts.append("reinitialised " + ", ".join(f"{m['tensor']} ({_fmt(m['source'])} → {_fmt(m['model'])})"
                                                  for m in report["shape_mismatch"][:6]) + ": shape")
    if report["reinit"]:
        parts.append("reinitialised " + ", ".join(report["reinit"][:6]) + ": reinit")
    if report["not_in_source"]:
        parts.append("not in the source: " + ", ".join(report["not_in_source"][:6])
                     + (" ..." if len(report["not_in_source"]) > 6 else ""))
    if report["unused_in_source"]:  # e.g. a source whose batch norms were folded into conv biases
        parts.append(f"{len(report['unused_in_source'])} source tensor(s) unused: "
                     + ", ".join(report["unused_in_source"][:4]) + (" ..." if len(report["unused_in_source"]) > 4
                                                                    else ""))
    return "; ".join(parts)
