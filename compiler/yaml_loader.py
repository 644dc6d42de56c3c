"""Safe YAML loading that remembers the line of every mapping key and list item.

PyYAML's SafeLoader builds plain Python objects; this subclass builds `LDict`/`LList`, which behave exactly like
dict/list but also know the (1-based) line of each entry, so validation can point at `model.yaml:14`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

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


class _LineLoader(yaml.SafeLoader):
    pass


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


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _construct_sequence)


def load_yaml_text(text: str, filename: str = "<string>") -> Any:
    try:
        return yaml.load(text, Loader=_LineLoader)  # noqa: S506 - _LineLoader derives from SafeLoader
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        problem = exc.problem or exc.context or "invalid YAML"
        raise DlcError(Diagnostic(f"YAML syntax error: {problem}", file=filename, line=line)) from None
    except yaml.YAMLError as exc:
        raise DlcError(Diagnostic(f"YAML error: {exc}", file=filename)) from None


def load_yaml_file(path: str | Path) -> tuple[Any, str]:
    """Return (parsed document, raw text). The raw text is kept for the artifact's sha256."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DlcError(Diagnostic("file not found", file=str(path), hint="check the path")) from None
    except IsADirectoryError:
        raise DlcError(Diagnostic("is a directory, expected a YAML file", file=str(path))) from None
    except UnicodeDecodeError:
        raise DlcError(Diagnostic("not a UTF-8 text file", file=str(path))) from None
    return load_yaml_text(text, str(path)), text
