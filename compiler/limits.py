"""Resource limits: a small input must not make dlc allocate without bound or run for hours.

Each limit is checked before the work it bounds (parsing, expansion, allocation), is reported with the number
found and the number allowed, and can be raised for one run: `dlc --limit layers=50000 compile m.yaml` (or the
environment variable DLC_LIMITS="layers=50000,param_bytes=8e9").
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields

from .errors import DlcError


@dataclass
class Limits:
    yaml_bytes: int = 16 << 20  # a model file larger than 16 MiB is not a hand-written model
    yaml_nodes: int = 1_000_000  # YAML values after anchors/aliases are expanded ("billion laughs")
    yaml_depth: int = 100  # nesting of YAML/JSON mappings and lists
    layers: int = 10_000  # layers after block expansion
    repeat: int = 1_000  # `repeat:` of one block instance
    activation_elements: int = 1 << 28  # elements of one layer's output for one sample (1 GiB in float32)
    param_bytes: int = 2 << 30  # float32 bytes of all parameters (2 GiB)
    input_bytes: int = 1 << 30  # one random or loaded input batch (1 GiB)
    image_pixels: int = 64 << 20  # pixels of one image (64 Mpx, below PIL's 89 Mpx bomb warning)
    onnx_nodes: int = 200_000  # nodes of an ONNX graph


DESCRIPTIONS = {
    "yaml_bytes": "bytes of a model YAML file",
    "yaml_nodes": "YAML values after anchors and aliases are expanded",
    "yaml_depth": "nesting depth of YAML/JSON",
    "layers": "layers after block expansion",
    "repeat": "'repeat' of one block instance",
    "activation_elements": "elements of one layer's output per sample",
    "param_bytes": "bytes of all parameters (float32)",
    "input_bytes": "bytes of one input batch",
    "image_pixels": "pixels of one image",
    "onnx_nodes": "nodes of an ONNX graph",
}

_current = Limits()


def current() -> Limits:
    return _current


def _parse(items: list[str], source: str) -> dict[str, int]:
    names = [f.name for f in fields(Limits)]
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in names:
            raise DlcError(f"{source}: '{item}' is not NAME=NUMBER with NAME one of {', '.join(names)}")
        try:
            number = float(value)
        except ValueError:
            raise DlcError(f"{source}: '{item}': {value!r} is not a number") from None
        if not number >= 1 or number != number or number == float("inf"):
            raise DlcError(f"{source}: '{item}': a limit must be a finite number >= 1")
        out[key] = int(number)
    return out


def configure(items: list[str] | None = None) -> Limits:
    """Set the limits for this process from DLC_LIMITS and then `--limit NAME=N` items (which win)."""
    global _current
    values: dict[str, int] = {}
    env = os.environ.get("DLC_LIMITS", "")
    if env.strip():
        values.update(_parse([p for p in env.split(",") if p.strip()], "DLC_LIMITS"))
    values.update(_parse(list(items or []), "--limit"))
    _current = Limits(**values)
    return _current


def exceeded(name: str, found: int, what: str | None = None) -> str:
    """The message for a limit passed: what, the number found, the limit, and how to raise it."""
    limit = getattr(_current, name)
    return (f"{what or DESCRIPTIONS[name]}: {found:,} is above the limit of {limit:,} "
            f"(raise it with `dlc --limit {name}={max(found, limit * 2)} ...` if this is intended)")


def check(name: str, found: int, what: str | None = None) -> None:
    """Raise a DlcError when `found` is above the limit `name`."""
    if found > getattr(_current, name):
        raise DlcError(exceeded(name, found, what))


def check_input(shape: list[int] | tuple[int, ...], itemsize: int, what: str) -> None:
    """Refuse to allocate an input batch beyond input_bytes (a batch of 10^6 or a 10^5-pixel axis)."""
    elements = 1
    for d in shape:
        elements *= max(int(d), 0)
    check("input_bytes", elements * itemsize, f"{what} {list(shape)}: bytes")
