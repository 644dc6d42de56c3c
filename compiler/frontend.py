"""Read a model YAML into a validated, shape-checked, initialised Graph — or one DlcError listing every problem."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .builder import build_graph, initialize
from .errors import DlcError
from .graph import Graph
from .spec import ModelSpec, parse_model_spec
from .yaml_loader import load_yaml_file, load_yaml_text


@dataclass
class LoadedModel:
    spec: ModelSpec
    graph: Graph


def load_model(path: str | Path) -> LoadedModel:
    doc, text = load_yaml_file(path)
    return _load(doc, str(path), text)


def load_model_text(text: str, filename: str = "<string>") -> LoadedModel:
    return _load(load_yaml_text(text, filename), filename, text)


def _load(doc, filename: str, text: str) -> LoadedModel:
    spec, diagnostics = parse_model_spec(doc, filename, text)
    if spec.input is None:  # without an input there is nothing to infer shapes from
        raise DlcError(diagnostics)
    graph, shape_diagnostics = build_graph(spec)
    diagnostics += shape_diagnostics
    if diagnostics:
        raise DlcError(sorted(diagnostics, key=lambda d: (d.line or 0)))
    initialize(graph, spec.seed)
    return LoadedModel(spec, graph)
