"""Weight initialisation (Caffe's fillers): xavier, kaiming, gaussian, uniform, constant.

A filler is written in YAML as a name (`weight_filler: xavier`) or a mapping
(`weight_filler: {type: gaussian, std: 0.01}`).
"""

from __future__ import annotations

import math
import zlib
from typing import Any

import numpy as np

from .ops.base import ParamError

FILLERS: dict[str, dict[str, Any]] = {
    # type: {option: default}
    "xavier": {"gain": 1.0},  # Glorot uniform: U(-a, a), a = gain * sqrt(6 / (fan_in + fan_out))
    "kaiming": {"mode": "fan_in", "gain": math.sqrt(2.0)},  # He normal: N(0, gain / sqrt(fan))
    "gaussian": {"mean": 0.0, "std": 0.01},
    "uniform": {"low": -0.05, "high": 0.05},
    "constant": {"value": 0.0},
}


def parse_filler(value: Any) -> dict[str, Any]:
    """Validate a filler spec and return it with every option filled in."""
    spec = {"type": value} if isinstance(value, str) else value
    if not isinstance(spec, dict) or "type" not in spec:
        raise ParamError(f"a filler is a name ({', '.join(FILLERS)}) or a mapping with a 'type', got {value!r}")
    kind = spec["type"]
    if kind not in FILLERS:
        from .errors import did_you_mean

        hint = did_you_mean(kind, FILLERS)
        raise ParamError(f"unknown filler '{kind}'; one of {', '.join(FILLERS)}" + (f" ({hint})" if hint else ""))
    options = dict(FILLERS[kind])
    for key, v in spec.items():
        if key == "type":
            continue
        if key not in options:
            raise ParamError(f"filler '{kind}' has no option '{key}'; it takes {', '.join(options) or 'none'}")
        if key == "mode":
            if v not in ("fan_in", "fan_out"):
                raise ParamError(f"filler mode must be fan_in or fan_out, got {v!r}")
        elif not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            raise ParamError(f"filler option '{key}' must be a finite number, got {v!r}")
        options[key] = v
    if kind == "gaussian" and options["std"] < 0:
        raise ParamError("gaussian filler std must be >= 0")
    if kind == "uniform" and options["low"] > options["high"]:
        raise ParamError("uniform filler needs low <= high")
    return {"type": kind, **options}


def layer_rng(seed: int, layer_name: str, tensor: str) -> np.random.Generator:
    """A generator per (seed, layer, tensor): one layer's initial weights do not change when others are added."""
    return np.random.default_rng([seed, zlib.crc32(f"{layer_name}.{tensor}".encode())])


def fill(spec: dict[str, Any], shape: tuple[int, ...], fan_in: int, fan_out: int,
         rng: np.random.Generator) -> np.ndarray:
    kind = spec["type"]
    if kind == "constant":
        out = np.full(shape, spec["value"])
    elif kind == "gaussian":
        out = rng.normal(spec["mean"], spec["std"], shape)
    elif kind == "uniform":
        out = rng.uniform(spec["low"], spec["high"], shape)
    elif kind == "xavier":
        a = spec["gain"] * math.sqrt(6.0 / max(fan_in + fan_out, 1))
        out = rng.uniform(-a, a, shape)
    elif kind == "kaiming":
        fan = fan_in if spec["mode"] == "fan_in" else fan_out
        out = rng.normal(0.0, spec["gain"] / math.sqrt(max(fan, 1)), shape)
    else:  # parse_filler admits only the kinds above
        raise AssertionError(kind)
    return np.ascontiguousarray(out, dtype=np.float32)
