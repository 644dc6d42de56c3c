"""Safe YAML loading that remembers the line of every mapping key and list item.

PyYAML's SafeLoader builds plain Python objects; this subclass builds `LDict`/`LList`, which behave exactly like
dict/list but also know the (1-based) line of each entry, so validation can point at `model.yaml:14`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from . import limits
from .errors import Diagnostic, DlcError


class LDict(dict):
    """A dict that knows its own line and the line of each key."""

    line: int | None = None
    key_lines: dict[str, int]

    def line_of(self, key: str) -> int | None:
        return getattr(self, "key_lines", {}).get(key, self.line)


class LList(list):
    """A list that knows its own line and the line of each item."""

    line: int | None = None
    item_lines: list[int]

    def line_of(self, index: int) -> int | None:
        lines = getattr(self, "item_lines", [])
        return lines[index] if 0 <= index < len(lines) else self.line


# libyaml's parser when PyYAML was built with it (the wheels are): the same events and marks, about 10x faster
# than the pure-Python scanner, which took 20 s to reach the layer limit in a 100,000-item list.
_FAST = getattr(yaml, "CSafeLoader", None)


class _LineLoader(_FAST or yaml.SafeLoader):
    pass


# YAML 1.1 reads `1.0e6` and `1e-3` as strings (its floats need a dot and a signed exponent); YAML 1.2 and every
# user read them as numbers. Added after SafeLoader's own float rule, so everything that was a float stays one.
_LineLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode) -> LDict:
    loader.flatten_mapping(node)
    out = LDict()
    out.line = node.start_mark.line + 1
    out.key_lines = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            hash(key)
        except TypeError:
            raise yaml.constructor.ConstructorError(
                None, None, "a mapping key must be a plain value", key_node.start_mark
            ) from None
        if key in out:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key '{key}'", key_node.start_mark
            )
        out[key] = loader.construct_object(value_node, deep=True)
        out.key_lines[str(key)] = key_node.start_mark.line + 1
    return out


def _construct_sequence(loader: _LineLoader, node: yaml.SequenceNode) -> LList:
    out = LList(loader.construct_object(child, deep=True) for child in node.value)
    out.line = node.start_mark.line + 1
    out.item_lines = [child.start_mark.line + 1 for child in node.value]
    return out


def _construct_int(loader: _LineLoader, node: yaml.ScalarNode) -> int:
    """An integer within 64 bits: no setting needs more, and a larger one breaks float() and numpy downstream."""
    digits = len(node.value.replace("_", "").lstrip("+-"))
    value = loader.construct_yaml_int(node) if digits <= 64 else None  # Python refuses str->int of 4,300+ digits
    if value is None or not -2**63 <= value < 2**63:
        raise yaml.constructor.ConstructorError(None, None, f"integer {node.value[:40]}{'...' if len(node.value) > 40 else ''}"
                                                " is out of range (at most 19 digits)", node.start_mark)
    return value


_LineLoader.add_constructor("tag:yaml.org,2002:int", _construct_int)
_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _construct_sequence)


def _check_size(root: yaml.Node | None, filename: str) -> None:
    """Refuse a document whose values, with every alias expanded, are too many or nested too deeply (a
    "billion laughs" file is a few hundred bytes that expand to 10^9 values), or that refers to itself.
    Iterative, with the expanded size of each node computed once, so the check itself is cheap."""
    if root is None:
        return
    lim = limits.current()
    size: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, int, bool]] = [(root, 1, False)]
    while stack:
        node, depth, done = stack.pop()
        key = id(node)
        if done:
            on_path.discard(key)
            children = _children(node)
            size[key] = 1 + sum(size[id(c)] for c in children)
            if size[key] > lim.yaml_nodes:
                raise DlcError(Diagnostic(limits.exceeded("yaml_nodes", size[key]), file=filename,
                                          line=node.start_mark.line + 1,
                                          hint="anchors and aliases (&name / *name) multiply the values"))
            continue
        if key in size:
            continue
        if key in on_path:
            raise DlcError(Diagnostic("an alias refers to the value that contains it (a recursive anchor)",
                                      file=filename, line=node.start_mark.line + 1))
        if depth > lim.yaml_depth:
            raise DlcError(Diagnostic(limits.exceeded("yaml_depth", depth), file=filename,
                                      line=node.start_mark.line + 1))
        on_path.add(key)
        stack.append((node, depth, True))
        stack.extend((c, depth + 1, False) for c in _children(node) if id(c) not in size)


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def load_yaml_text(text: str, filename: str = "<string>") -> Any:
    if len(text) > limits.current().yaml_bytes:
        raise DlcError(Diagnostic(limits.exceeded("yaml_bytes", len(text)), file=filename))
    loader = None
    try:
        loader = _LineLoader(text)  # the pure-Python reader refuses control characters here, libyaml's later
        node = loader.get_single_node()
        _check_size(node, filename)
        return loader.construct_document(node) if node is not None else None
    except yaml.reader.ReaderError as exc:
        raise DlcError(Diagnostic(f"character {chr(exc.character)!r} is not allowed in YAML (a binary or corrupt "
                                  "file?)", file=filename, line=_line_at(text, exc.position))) from None
    except RecursionError:
        raise DlcError(Diagnostic("YAML nested too deeply to read", file=filename)) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        problem = exc.problem or exc.context or "invalid YAML"
        raise DlcError(Diagnostic(f"YAML syntax error: {problem}", file=filename, line=line)) from None
    except yaml.YAMLError as exc:
        raise DlcError(Diagnostic(f"YAML error: {exc}", file=filename)) from None
    finally:
        if loader is not None:
            loader.dispose()


def _line_at(text: str, position: int) -> int:
    """The 1-based line of a reader error's position: a byte offset into the UTF-8 text for libyaml, a character
    index for the pure-Python reader."""
    head = text.encode("utf-8", "surrogatepass")[:max(position, 0)] if _FAST else text[:max(position, 0)]
    return head.count(b"\n" if _FAST else "\n") + 1


def load_yaml_file(path: str | Path) -> tuple[Any, str]:
    """Return (parsed document, raw text). The raw text is kept for the artifact's sha256."""
    path = Path(path)
    try:
        if path.exists() and not path.is_file():  # a FIFO or device would block or never end
            raise DlcError(Diagnostic("not a regular file, expected a YAML file", file=str(path)))
        if path.is_file() and path.stat().st_size > limits.current().yaml_bytes:
            raise DlcError(Diagnostic(limits.exceeded("yaml_bytes", path.stat().st_size), file=str(path)))
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DlcError(Diagnostic("file not found", file=str(path), hint="check the path")) from None
    except IsADirectoryError:
        raise DlcError(Diagnostic("is a directory, expected a YAML file", file=str(path))) from None
    except UnicodeDecodeError:
        raise DlcError(Diagnostic("not a UTF-8 text file", file=str(path))) from None
    return load_yaml_text(text, str(path)), text
