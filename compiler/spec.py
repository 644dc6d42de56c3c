"""The YAML model spec: read a document into a `ModelSpec` — a flat list of layers with resolved inputs.

Layers are sequential by default: a layer reads the previous layer's output unless it names `inputs:`.
Each layer's output value is named after the layer (Caffe's top). Reusable `blocks:` take parameters
(`$name` in the block's layers) and may be used with `repeat:`; a block instance's layers are named
`instance/layer`, and the instance's name stands for its last layer's output.

Every problem is collected as a Diagnostic (file, line, layer, did-you-mean); nothing stops at the first one.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field
from pathlib import PurePosixPath, PureWindowsPath
from typing import Any

from . import limits
from .errors import Diagnostic, DlcError, did_you_mean
from .fillers import parse_filler
from .ops import REGISTRY, ParamError
from .sections import SCHEMAS, check_section
from .yaml_loader import LDict, LList

TOP_LEVEL_KEYS = ("model", *SCHEMAS)
MODEL_KEYS = ("name", "seed", "input", "classes", "weights", "outputs", "blocks", "layers")
INPUT_KEYS = ("name", "shape", "mean", "std")
BLOCK_KEYS = ("params", "inputs", "layers", "output")
LAYER_KEYS = ("name", "type", "inputs")
INSTANCE_KEYS = ("name", "block", "inputs", "repeat")
_PARAM_REF = re.compile(r"^\$\{?([A-Za-z_]\w*)\}?$")


@dataclass
class InputSpec:
    name: str
    shape: tuple[int, int, int]
    mean: list[float]
    std: list[float]


@dataclass
class LayerSpec:
    name: str  # scoped name; also the name of its output value
    type: str | None  # None when the layer is too broken to say
    inputs: list[str]
    attrs: dict[str, Any] = field(default_factory=dict)
    fillers: dict[str, dict[str, Any]] = field(default_factory=dict)
    line: int | None = None
    note: str = ""
    ok: bool = True


@dataclass
class ModelSpec:
    file: str
    sha256: str
    name: str = "model"
    seed: int = 0
    input: InputSpec | None = None
    layers: list[LayerSpec] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    classes: list[str] | None = None
    classes_line: int | None = None
    weights: str | None = None  # safetensors file of layer tensors, relative to the YAML file's folder
    weights_line: int | None = None
    export: dict[str, Any] = field(default_factory=dict)
    sections: dict[str, Any] = field(default_factory=dict)
    section_lines: dict[str, int | None] = field(default_factory=dict)
    train: Any = None  # train.config.TrainConfig when the file has a train: section
    data: Any = None  # train.config.DataConfig


@dataclass
class _Scope:
    """Name resolution inside one list of layers (the model's, or one block instance's)."""

    prefix: str  # "" at top level, "stage1_0/" inside a block instance
    visible: dict[str, str]  # local name -> global value name
    declared: dict[str, int | None]  # every name declared in this list -> its line (to spot forward refs)
    env: dict[str, Any] | None = None  # block parameters, None at top level
    note: str = ""
    stack: tuple[str, ...] = ()


class _Parser:
    def __init__(self, file: str, text: str):
        self.file = file
        self.diags: list[Diagnostic] = []
        self.spec = ModelSpec(file=file, sha256=hashlib.sha256(text.encode("utf-8")).hexdigest())
        self.blocks: dict[str, LDict] = {}

    def error(self, message: str, line: int | None, layer: str | None = None, hint: str | None = None,
              note: str = "") -> None:
        self.diags.append(Diagnostic(message, file=self.file, line=line, layer=layer, hint=hint, note=note or None))

    # ---------------------------------------------------------------------------------------- document
    def parse(self, doc: Any) -> ModelSpec:
        if not isinstance(doc, dict):
            self.error("the file must be a YAML mapping with a 'model:' section", getattr(doc, "line", 1))
            return self.spec
        for key, value in doc.items():
            line = doc.line_of(key)
            if key == "model":
                continue
            if key not in TOP_LEVEL_KEYS:
                self.error(f"unknown section '{key}'", line,
                           hint=did_you_mean(key, TOP_LEVEL_KEYS) or f"sections are {', '.join(TOP_LEVEL_KEYS)}")
                continue
            self.diags += check_section(key, value, self.file, line)
            self.spec.sections[key] = value
            self.spec.section_lines[key] = line
        if isinstance(doc.get("export"), dict):
            self.spec.export = dict(doc["export"])
        if "model" not in doc:
            self.error("no 'model:' section: a file needs one to describe the network", 1)
        else:
            self.model(doc["model"], doc.line_of("model"))
        return self.spec

    def model(self, m: Any, line: int | None) -> None:
        if not isinstance(m, dict):
            self.error("'model' must be a mapping with name, input and layers", line)
            return
        self.unknown_keys(m, MODEL_KEYS, "model")
        name = m.get("name", "model")
        if not isinstance(name, str) or not name:
            self.error("'model.name' must be a non-empty string", m.line_of("name"))
        else:
            self.spec.name = name
        seed = m.get("seed", 0)
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            self.error(f"'model.seed' must be a non-negative integer, got {seed!r}", m.line_of("seed"))
        else:
            self.spec.seed = seed
        classes = m.get("classes")
        if classes is not None:
            if not isinstance(classes, list) or not all(isinstance(c, (str, int)) for c in classes) or not classes:
                self.error("'model.classes' must be a non-empty list of class names", m.line_of("classes"))
            else:
                self.spec.classes = [str(c) for c in classes]
                self.spec.classes_line = m.line_of("classes")
        if "weights" in m:
            self.weights(m["weights"], m.line_of("weights"))
        if "input" not in m:
            self.error("'model.input' is missing: give at least its shape, e.g. input: {shape: [3, 32, 32]}",
                       m.line)
        else:
            self.input(m["input"], m.line_of("input"))
        blocks = m.get("blocks", {})
        if not isinstance(blocks, dict):
            self.error("'model.blocks' must map block names to block definitions", m.line_of("blocks"))
        else:
            for bname, block in blocks.items():
                self.block_definition(str(bname), block, blocks.line_of(bname))
        layers = m.get("layers")
        if not isinstance(layers, list) or not layers:
            self.error("'model.layers' must be a non-empty list of layers", m.line_of("layers") or m.line)
            return
        input_name = self.spec.input.name if self.spec.input else "input"
        scope = _Scope(prefix="", visible={input_name: input_name}, declared=self.declared_names(layers))
        if input_name in scope.declared:
            self.error(f"a layer is named '{input_name}', the model input's name", scope.declared[input_name],
                       hint="rename the layer or set model.input.name")
        last = self.layer_list(layers, scope, input_name)
        self.outputs(m, scope, last)

    def weights(self, value: Any, line: int | None) -> None:
        """model.weights: a file inside the YAML file's folder (no absolute path, no '..')."""
        if not isinstance(value, str) or not value.strip():
            self.error(f"'model.weights' must be the path of a safetensors file, got {value!r}", line)
            return
        posix, windows = PurePosixPath(value.replace("\\", "/")), PureWindowsPath(value)
        if posix.is_absolute() or windows.is_absolute() or windows.drive or ".." in posix.parts:
            self.error(f"'model.weights' must be a path inside the YAML file's folder, got '{value}'", line,
                       hint="give it relative to the YAML file, without '..', e.g. weights: weights.safetensors")
            return
        self.spec.weights, self.spec.weights_line = value, line

    def input(self, spec: Any, line: int | None) -> None:
        if not isinstance(spec, dict):
            self.error("'model.input' must be a mapping, e.g. {name: image, shape: [3, 32, 32]}", line)
            return
        self.unknown_keys(spec, INPUT_KEYS, "model.input")
        name = spec.get("name", "input")
        shape = spec.get("shape")
        ok = True
        if not isinstance(name, str) or not name:
            self.error("'model.input.name' must be a non-empty string", spec.line_of("name"))
            ok = False
        if (not isinstance(shape, list) or len(shape) != 3
                or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape)):
            self.error(f"'model.input.shape' must be [C, H, W] (three integers), got {shape!r}",
                       spec.line_of("shape"))
            return
        if any(d <= 0 for d in shape):
            self.error(f"'model.input.shape' sizes must be positive, got {shape}", spec.line_of("shape"))
            return
        channels = shape[0]
        norm = {}
        for key, default in (("mean", 0.0), ("std", 1.0)):
            value = spec.get(key, default)
            values = [value] * channels if isinstance(value, (int, float)) and not isinstance(value, bool) else value
            if (not isinstance(values, list) or len(values) != channels
                    or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                               for v in values)):
                self.error(f"'model.input.{key}' must be a finite number or a list of {channels} (one per "
                           f"channel), got {value!r}", spec.line_of(key))
                ok = False
                continue
            if key == "std" and any(v <= 0 for v in values):
                self.error(f"'model.input.std' values must be positive, got {values}", spec.line_of(key))
                ok = False
            norm[key] = [float(v) for v in values]
        if ok:
            self.spec.input = InputSpec(name, tuple(shape), norm["mean"], norm["std"])

    def outputs(self, m: dict, scope: _Scope, last: str | None) -> None:
        outs = m.get("outputs")
        if outs is None:
            self.spec.outputs = [last] if last else []
            return
        outs = [outs] if isinstance(outs, str) else outs
        if not isinstance(outs, list) or not all(isinstance(o, str) for o in outs) or not outs:
            self.error("'model.outputs' must be a layer name or a list of layer names", m.line_of("outputs"))
            return
        for o in outs:
            value = self.resolve(o, scope, m.line_of("outputs"), None)
            if value:
                self.spec.outputs.append(value)

    # ------------------------------------------------------------------------------------------ blocks
    def block_definition(self, name: str, block: Any, line: int | None) -> None:
        if not isinstance(block, dict):
            self.error(f"block '{name}' must be a mapping with params and layers", line)
            return
        self.unknown_keys(block, BLOCK_KEYS, f"block '{name}'")
        params = block.get("params", {})
        if not isinstance(params, dict):
            self.error(f"'params' of block '{name}' must map parameter names to defaults (null: required)",
                       block.line_of("params"))
            return
        inputs = block.get("inputs", ["input"])
        if isinstance(inputs, str):
            inputs = [inputs]
        if not isinstance(inputs, list) or not inputs or not all(isinstance(i, str) for i in inputs):
            self.error(f"'inputs' of block '{name}' must be a list of names", block.line_of("inputs"))
            return
        layers = block.get("layers")
        if not isinstance(layers, list) or not layers:
            self.error(f"block '{name}' needs a non-empty 'layers' list", block.line_of("layers") or line)
            return
        if name in REGISTRY:
            self.error(f"block '{name}' has the name of a layer type", line, hint="rename the block")
            return
        self.blocks[name] = block

    def instance(self, item: LDict, name: str, scope: _Scope, inputs: list[str], line: int | None) -> str | None:
        """Expand `{block: X, ...}` into layers; return the value name its name stands for."""
        bname = item["block"]
        if not isinstance(bname, str) or bname not in self.blocks:
            hint = did_you_mean(str(bname), self.blocks) or (
                f"defined blocks: {', '.join(self.blocks)}" if self.blocks else "define it under model.blocks")
            self.error(f"unknown block '{bname}'", item.line_of("block"), name, hint, scope.note)
            return None
        if bname in scope.stack:
            self.error(f"block '{bname}' uses itself (through {' -> '.join(scope.stack)})", line, name,
                       note=scope.note)
            return None
        block = self.blocks[bname]
        params = block.get("params", {})
        env: dict[str, Any] = {}
        for key, value in item.items():
            if key in INSTANCE_KEYS:
                continue
            if key not in params:
                self.error(f"block '{bname}' has no parameter '{key}'", item.line_of(key), name,
                           did_you_mean(key, params) or f"its parameters: {', '.join(params) or 'none'}", scope.note)
                continue
            env[key] = value
        for key, default in params.items():
            if key not in env:
                if default is None:
                    self.error(f"block '{bname}' needs parameter '{key}'", line, name, note=scope.note)
                    return None
                env[key] = default
        repeat = item.get("repeat", 1)
        if not isinstance(repeat, int) or isinstance(repeat, bool) or repeat < 1:
            self.error(f"'repeat' must be a positive integer, got {repeat!r}", item.line_of("repeat"), name,
                       note=scope.note)
            return None
        block_inputs = block.get("inputs", ["input"])
        block_inputs = [block_inputs] if isinstance(block_inputs, str) else block_inputs
        if len(inputs) != len(block_inputs):
            self.error(f"block '{bname}' takes {len(block_inputs)} input(s) ({', '.join(block_inputs)}), "
                       f"got {len(inputs)}", item.line_of("inputs") or line, name, note=scope.note)
            return None
        if repeat > limits.current().repeat:
            raise DlcError(Diagnostic(limits.exceeded("repeat", repeat), file=self.file, line=item.line_of("repeat"),
                                      layer=name))
        if repeat > 1 and len(block_inputs) != 1:
            self.error(f"'repeat' needs a block with one input; '{bname}' takes {len(block_inputs)}",
                       item.line_of("repeat"), name, note=scope.note)
            return None
        out = None
        for i in range(repeat):
            inst = f"{scope.prefix}{name}" + (f"_{i}" if repeat > 1 else "")
            note = f"in block '{bname}' used by '{inst}' at line {line}"
            inner = _Scope(prefix=inst + "/", visible=dict(zip(block_inputs, inputs)),
                           declared=self.declared_names(block["layers"]), env=env, note=note,
                           stack=(*scope.stack, bname))
            out = self.layer_list(block["layers"], inner, inputs[0], block.get("output"))
            if out is None:
                return None
            if repeat > 1:
                scope.visible[inst[len(scope.prefix):]] = out
            inputs = [out]
        return out

    # ------------------------------------------------------------------------------------------ layers
    def declared_names(self, layers: list) -> dict[str, int | None]:
        names = {}
        for i, item in enumerate(layers):
            if isinstance(item, dict) and isinstance(item.get("name"), str):
                names.setdefault(item["name"], item.line_of("name"))
            elif isinstance(item, dict) and isinstance(item.get("type"), str):
                names.setdefault(f"{item['type']}_{i + 1}", None)
        return names

    def layer_list(self, layers: list, scope: _Scope, prev: str | None, output: str | None = None) -> str | None:
        seen: dict[str, int | None] = {}
        for i, raw in enumerate(layers):
            line = layers.line_of(i) if isinstance(layers, LList) else None
            if not isinstance(raw, dict):
                self.error(f"a layer must be a mapping such as {{type: relu}}, got {raw!r}", line, note=scope.note)
                continue
            item = self.substitute(raw, scope, line) if scope.env is not None else raw
            kind = "block" if "block" in item else "layer"
            name = item.get("name", f"{item.get('type', kind)}_{i + 1}")
            if not isinstance(name, str) or not name or "/" in name:
                self.error(f"a layer name must be a non-empty string without '/', got {name!r}",
                           item.line_of("name"), note=scope.note)
                continue
            if name in seen:
                self.error(f"duplicate layer name '{name}' (first used at line {seen[name]})",
                           item.line_of("name"), name, note=scope.note)
                continue
            seen[name] = item.line_of("name")
            inputs = self.layer_inputs(item, scope, prev, f"{scope.prefix}{name}")
            if kind == "block":
                self.unknown_keys_instance(item, scope)
                value = self.instance(item, name, scope, inputs, line) if inputs is not None else None
            else:
                value = self.layer(item, f"{scope.prefix}{name}", scope, inputs, line)
            if value is None:  # still define the name, so later references do not cascade into more errors
                value = f"{scope.prefix}{name}"
                self.spec.layers.append(LayerSpec(value, None, [], line=line, note=scope.note, ok=False))
            scope.visible[name] = value
            prev = value
        if output is not None:
            return self.resolve(output, scope, None, None)
        return prev

    def layer_inputs(self, item: LDict, scope: _Scope, prev: str | None, layer: str) -> list[str] | None:
        if "inputs" not in item:
            return [prev] if prev else []
        refs = item["inputs"]
        refs = [refs] if isinstance(refs, str) else refs
        if not isinstance(refs, list) or not refs or not all(isinstance(r, str) for r in refs):
            self.error(f"'inputs' must be a layer name or a list of names, got {item['inputs']!r}",
                       item.line_of("inputs"), layer, note=scope.note)
            return None
        resolved = [self.resolve(r, scope, item.line_of("inputs"), layer) for r in refs]
        return None if None in resolved else resolved

    def resolve(self, ref: str, scope: _Scope, line: int | None, layer: str | None) -> str | None:
        if ref in scope.visible:
            return scope.visible[ref]
        if ref in scope.declared:
            where = f" (line {scope.declared[ref]})" if scope.declared[ref] else ""
            self.error(f"input '{ref}' is defined later{where}: a layer can only read layers above it",
                       line, layer, note=scope.note)
        else:
            self.error(f"input '{ref}' is not defined", line, layer,
                       did_you_mean(ref, scope.visible) or f"defined so far: {', '.join(scope.visible)}",
                       scope.note)
        return None

    def layer(self, item: LDict, name: str, scope: _Scope, inputs: list[str] | None, line: int | None) -> str | None:
        op_type = item.get("type")
        if op_type is None:
            self.error("the layer has no 'type' (or 'block')", line, name, note=scope.note)
            return None
        if not isinstance(op_type, str) or op_type not in REGISTRY:
            is_block = isinstance(op_type, str) and op_type in self.blocks  # a list or mapping is not hashable
            hint = (f"'{op_type}' is a block: write 'block: {op_type}'" if is_block
                    else did_you_mean(str(op_type), REGISTRY) or f"layer types: {', '.join(sorted(REGISTRY))}")
            self.error(f"unknown layer type '{op_type}'", item.line_of("type"), name, hint, scope.note)
            return None
        op = REGISTRY[op_type]
        filler_keys = {f"{tensor}_filler": tensor for tensor in op.fillable}
        allowed = (*LAYER_KEYS, *(p.name for p in op.params), *filler_keys)
        ok = self.unknown_keys(item, allowed, f"{op_type} layer", name, scope.note)
        attrs, errors = op.parse_attrs({k: v for k, v in item.items() if k not in LAYER_KEYS})
        for key, message in errors:
            self.error(message, item.line_of(key) if key else line, name, note=scope.note)
        fillers = {}
        for key, tensor in filler_keys.items():
            if key in item:
                try:
                    fillers[tensor] = parse_filler(item[key])
                except ParamError as exc:
                    self.error(str(exc), item.line_of(key), name, note=scope.note)
                    ok = False
        if inputs is None:
            return None
        n = len(inputs)
        if n < op.min_inputs or (op.max_inputs is not None and n > op.max_inputs):
            want = f"{op.min_inputs} or more" if op.max_inputs is None else str(op.max_inputs)
            self.error(f"{op_type} takes {want} input(s), got {n}", item.line_of("inputs") or line, name,
                       hint="name them with inputs: [a, b]" if op.max_inputs is None else None, note=scope.note)
            ok = False
        if len(self.spec.layers) >= limits.current().layers:  # stop expanding now: blocks multiply
            raise DlcError(Diagnostic(limits.exceeded("layers", len(self.spec.layers) + 1,
                                                      "layers after block expansion (counting so far)"),
                                      file=self.file, line=line, layer=name, note=scope.note or None))
        self.spec.layers.append(LayerSpec(name, op_type, inputs, attrs, fillers, line, scope.note,
                                          ok and not errors))
        return name

    # ------------------------------------------------------------------------------------------ helpers
    def unknown_keys(self, mapping: LDict, allowed: tuple[str, ...], what: str, layer: str | None = None,
                     note: str = "") -> bool:
        ok = True
        for key in mapping:
            if key not in allowed:
                ok = False
                self.error(f"unknown key '{key}' in {what}", mapping.line_of(key), layer,
                           did_you_mean(str(key), allowed) or f"known keys: {', '.join(allowed)}", note)
        return ok

    def unknown_keys_instance(self, item: LDict, scope: _Scope) -> None:
        if "type" in item:
            self.error("a layer has either 'type' or 'block', not both", item.line_of("type"),
                       item.get("name"), note=scope.note)

    def substitute(self, value: Any, scope: _Scope, line: int | None) -> Any:
        """Replace `$param` (or `${param}`) strings by the block parameter's value, keeping line numbers."""
        if isinstance(value, str):
            match = _PARAM_REF.match(value)
            if not match:
                return value
            key = match.group(1)
            if key not in scope.env:
                self.error(f"'{value}' names no parameter of this block", line,
                           hint=did_you_mean(key, scope.env) or f"parameters: {', '.join(scope.env) or 'none'}",
                           note=scope.note)
                return value
            return scope.env[key]
        if isinstance(value, dict):
            out = LDict({k: self.substitute(v, scope, value.line_of(k)) for k, v in value.items()})
            out.line, out.key_lines = value.line, getattr(value, "key_lines", {})
            return out
        if isinstance(value, list):
            out = LList(self.substitute(v, scope, line) for v in value)
            out.line, out.item_lines = getattr(value, "line", line), getattr(value, "item_lines", [])
            return out
        return value


def parse_model_spec(doc: Any, file: str, text: str) -> tuple[ModelSpec, list[Diagnostic]]:
    """Parse a loaded YAML document. Returns the spec and every problem found (empty when all is well)."""
    parser = _Parser(file, text)
    spec = parser.parse(doc)
    unique = list(dict.fromkeys(parser.diags))
    return spec, unique
