"""Read a model YAML into a validated, shape-checked, initialised Graph — or one DlcError listing every problem."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .builder import build_graph, initialize
from .errors import Diagnostic, DlcError
from .graph import Graph
from .spec import ModelSpec, parse_model_spec
from .yaml_loader import load_yaml_file, load_yaml_text


@dataclass
class LoadedModel:
    spec: ModelSpec
    graph: Graph
    prune: Any = None  # prune.config.PruneConfig when the file has a prune: section
    export: Any = None  # export_config.ExportConfig (defaults when the file has no export: section)


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
        from .data.datasets import unused_data_keys

        spec.data, more = parse_data(sections["data"], spec.file)
        diags += more + unused_data_keys(sections["data"], spec.file)
    if "train" in sections and isinstance(sections["train"], dict):
        spec.train, more = parse_train(sections["train"], spec.file, [layer.name for layer in spec.layers])
        diags += more
    if isinstance(sections.get("optimize"), dict):
        diags += _check_optimize(spec, sections["optimize"])
    return diags


def _check_optimize(spec: ModelSpec, section) -> list[Diagnostic]:
    """optimize: {passes: [...], check: N, rtol, atol}: pass names must exist."""
    from .errors import did_you_mean
    from .passes import PASSES

    diags = []
    passes = section.get("passes")
    if passes is not None:
        line = section.line_of("passes") if hasattr(section, "line_of") else None
        if not all(isinstance(p, str) for p in passes):
            diags.append(Diagnostic("'optimize.passes' must be a list of pass names", file=spec.file, line=line))
        else:
            for p in passes:
                if p not in PASSES:
                    diags.append(Diagnostic(f"unknown pass '{p}' in 'optimize.passes'", file=spec.file, line=line,
                                            hint=did_you_mean(p, PASSES) or f"passes: {', '.join(sorted(PASSES))}"))
    check = section.get("check", 3)
    if not isinstance(check, int) or isinstance(check, bool) or check < 0:
        diags.append(Diagnostic(f"'optimize.check' is how many random inputs to compare (0: none), got {check!r}",
                                file=spec.file, line=section.line_of("check") if hasattr(section, "line_of") else None))
    return diags


def _prune_section(spec: ModelSpec):
    """prune: into a PruneConfig (fine-tuning settings on top of train:), or None without the section."""
    section = spec.sections.get("prune")
    if not isinstance(section, dict):
        return None, []
    from .prune.config import parse_prune

    train = spec.sections.get("train")
    return parse_prune(section, spec.file, [layer.name for layer in spec.layers],
                       train if isinstance(train, dict) else None, has_data="data" in spec.sections,
                       section_line=spec.section_lines.get("prune"))


def _export_section(spec: ModelSpec):
    """export: into an ExportConfig; its structure was checked in sections.py, so only values are left."""
    from .export_config import parse_export

    section = spec.sections.get("export")
    return parse_export(section if isinstance(section, dict) else None, spec.file)


def _load(doc, filename: str, text: str) -> LoadedModel:
    spec, diagnostics = parse_model_spec(doc, filename, text)
    if spec.input is None:  # without an input there is nothing to infer shapes from
        raise DlcError(diagnostics)
    diagnostics += _training_sections(spec)
    prune_config, more = _prune_section(spec)
    diagnostics += more
    export_config, more = _export_section(spec)
    diagnostics += more
    graph, shape_diagnostics = build_graph(spec)
    diagnostics += shape_diagnostics
    if not diagnostics:  # class names vs the data and the output width (needs a sound graph)
        from .data.labels import check_labels

        diagnostics += check_labels(spec, graph)
    if diagnostics:
        raise DlcError(sorted(diagnostics, key=lambda d: (d.line or 0)))
    initialize(graph, spec.seed)
    if spec.weights is not None:
        _load_weights(spec, graph)
    return LoadedModel(spec, graph, prune_config, export_config)


def _load_weights(spec: ModelSpec, graph: Graph) -> None:
    """model.weights: copy the file's tensors into the layers with the same name and shape (the others keep
    their fillers: a changed head is initialised afresh). Records what was loaded in graph.meta['weights']."""
    from .train.checkpoint import load_matching, read_checkpoint

    def fail(message: str, hint: str | None = None) -> DlcError:
        return DlcError(Diagnostic(message, file=spec.file, line=spec.weights_line, hint=hint))

    base = Path(spec.file).parent
    path = base / spec.weights
    if not path.is_file():
        raise fail(f"weights file '{spec.weights}' not found (looked for {path})",
                   "model.weights is relative to the YAML file's folder")
    if base.resolve() not in path.resolve().parents:
        raise fail(f"weights file '{spec.weights}' leads outside the YAML file's folder (a link?)")
    try:
        params, _, _, _ = read_checkpoint(path)
    except DlcError as exc:
        raise fail(f"cannot read weights file '{spec.weights}': {exc.diagnostics[0].message}",
                   "is it a complete safetensors file written by dlc (dlc import, dlc train)?") from None
    result = load_matching(graph, params)
    if result["loaded"] == 0 and result["tensors"]:  # a model without parameters loads nothing, rightly
        raise fail(f"none of the {len(params)} tensors in '{spec.weights}' fits a layer of this model (by layer "
                   "name and shape)", "the file's tensors are named 'param/<layer>.<tensor>', e.g. "
                   "'param/conv1.weight'")
    graph.meta["weights"] = {"file": spec.weights, **result}
