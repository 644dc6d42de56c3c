"""Read a model YAML into a validated, shape-checked, initialised Graph — or one DlcError listing every problem."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .builder import build_graph, initialize
from .errors import Diagnostic, DlcError
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


def _training_sections(spec: ModelSpec) -> list[Diagnostic]:
    """Parse train: and data: into typed settings; each needs the other."""
    from .train.config import parse_data, parse_train

    sections, diags = spec.sections, []
    if "train" in sections and "data" not in sections:
        diags.append(Diagnostic("a 'train:' section needs a 'data:' section saying what to train on "
                                "(e.g. data: {dataset: synthetic})", file=spec.file,
                                line=spec.section_lines.get("train")))
    if "data" in sections and isinstance(sections["data"], dict):
        spec.data, more = parse_data(sections["data"], spec.file)
        diags += more
    if "train" in sections and isinstance(sections["train"], dict):
        spec.train, more = parse_train(sections["train"], spec.file, [layer.name for layer in spec.layers])
        diags += more
    return diags


def _load(doc, filename: str, text: str) -> LoadedModel:
    spec, diagnostics = parse_model_spec(doc, filename, text)
    if spec.input is None:  # without an input there is nothing to infer shapes from
        raise DlcError(diagnostics)
    diagnostics += _training_sections(spec)
    graph, shape_diagnostics = build_graph(spec)
    diagnostics += shape_diagnostics
    if diagnostics:
        raise DlcError(sorted(diagnostics, key=lambda d: (d.line or 0)))
    initialize(graph, spec.seed)
    return LoadedModel(spec, graph)
