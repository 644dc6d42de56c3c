"""What an op's ONNX import rule needs: the registry by ONNX op type, the two ways a rule says no, and small readers
of ONNX attributes. Each op module registers its rules beside its OpDef with `@rule("OnnxOp", ...)`;
`onnx_import.py` walks the graph and calls `RULES[node.op_type](importer, node)`.

A rule reads its inputs through the importer (`imp.value`, `imp.const`, `imp.shape`, `imp.feature_map`), adds
layers with `imp.emit` (or aliases a value it passes through, `imp.alias[...]`), and raises `Unsupported(reason)`
for a node it cannot map. Nothing here imports onnx at start-up: the CLI loads the op registry for every command.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

RULES: dict[str, Callable[[Any, Any], None]] = {}
FLOAT32_MAX = float(np.finfo(np.float32).max)  # an open Clip bound (dlc's bounds are finite numbers)


def rule(*op_types: str):
    """Register the decorated function as the import rule of these ONNX op types (default domain)."""

    def register(fn):
        for op in op_types:
            if op in RULES:
                raise ValueError(f"ONNX op {op} has two import rules: {RULES[op].__name__} and {fn.__name__}")
            RULES[op] = fn
        return fn

    return register


class Unsupported(Exception):
    """This node does not map to a dlc layer; the reason says why (None: dlc has no such op at all)."""

    def __init__(self, reason: str | None = None):
        super().__init__(reason)
        self.reason = reason


class Skip(Exception):
    """This node reads the output of one that did not map: it is not reported on its own."""


def attr(node, name: str, default=None):
    """The value of a node's attribute, or `default`."""
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def text(value: Any) -> Any:
    return value.decode() if isinstance(value, bytes) else value


def round_attr(value: float, complement: bool = False) -> float:
    """An ONNX float attribute (stored as float32) as the shortest decimal that was meant: 0.0010000000475 ->
    0.001. With `complement`, 1 - value the same way (batch norm's momentum: 0.9499999881 -> 0.05)."""
    want = np.float32(value)
    for digits in range(1, 10):
        short = float(f"{1.0 - float(value) if complement else float(value):.{digits}g}")
        if np.float32(1.0 - short if complement else short) == want:
            return short
    return 1.0 - float(value) if complement else float(value)
