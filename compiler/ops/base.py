"""The op definition: everything dlc knows about one operation type lives in one `OpDef` subclass.

An OpDef declares its YAML parameters (with defaults and checks), its shape rule, its parameter shapes and
initialisation, its parameter count and MACs, its receptive-field step and its ONNX export. Adding an op means
writing one subclass and registering it; nothing else in the compiler changes.

Shapes are per sample (the batch axis is dynamic and never stored): (C, H, W) for feature maps, (F,) for flat
vectors.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

if TYPE_CHECKING:
    from ..export_onnx import OnnxBuilder
    from ..graph import Node

Shape = tuple[int, ...]

REQUIRED = object()


class ParamError(ValueError):
    """A YAML parameter value is wrong; the message says what was expected."""


class ShapeError(ValueError):
    """The op cannot run on its input shapes; the message gives the computed shapes."""


# --------------------------------------------------------------------------------------------- parameters
def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass(frozen=True)
class Param:
    """One YAML parameter of a layer.

    kind: 'int' | 'float' | 'bool' | 'choice' | 'pair' (int or [h, w]) | 'pad' (int, [h, w], [t, l, b, r],
    'same' or 'valid') | 'ints' (a non-empty list of integers, e.g. a shape or a permutation) | 'custom'
    (`parser` turns the YAML value, or None when absent, into the attribute and raises ParamError).
    """

    name: str
    kind: str
    default: Any = REQUIRED
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] = ()
    help: str = ""
    parser: Callable[[Any], Any] | None = None

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def parse(self, value: Any) -> Any:
        if self.parser is not None:
            return self.parser(value)
        if value is None and self.default is None:
            return None
        kind = self.kind
        if kind == "int":
            if not _is_int(value):
                raise ParamError(f"'{self.name}' must be an integer, got {value!r}")
            self._check_range(value)
            return int(value)
        if kind == "float":
            if not _is_number(value) or not math.isfinite(value):
                raise ParamError(f"'{self.name}' must be a finite number, got {value!r}")
            self._check_range(value)
            return float(value)
        if kind == "bool":
            if not isinstance(value, bool):
                raise ParamError(f"'{self.name}' must be true or false, got {value!r}")
            return value
        if kind == "choice":
            if value not in self.choices:
                raise ParamError(f"'{self.name}' must be one of {', '.join(self.choices)}; got {value!r}")
            return value
        if kind == "pair":
            pair = self._ints(value, (1, 2))
            pair = pair * 2 if len(pair) == 1 else pair
            for v in pair:
                self._check_range(v)
            return tuple(pair)
        if kind == "ints":
            if not isinstance(value, (list, tuple)) or not value or not all(_is_int(v) for v in value):
                raise ParamError(f"'{self.name}' must be a non-empty list of integers, got {value!r}")
            for v in value:
                self._check_range(v)
            return tuple(int(v) for v in value)
        if kind == "pad":
            if value in ("same", "valid"):
                return value
            pads = self._ints(value, (1, 2, 4))
            if any(p < 0 for p in pads):
                raise ParamError(f"'{self.name}' must not be negative, got {value!r}")
            if len(pads) == 1:
                pads = pads * 4
            elif len(pads) == 2:
                pads = [pads[0], pads[1], pads[0], pads[1]]
            return tuple(pads)  # (top, left, bottom, right), ONNX's order
        raise AssertionError(f"unknown param kind {kind}")

    def _ints(self, value: Any, lengths: tuple[int, ...]) -> list[int]:
        values = [value] if _is_int(value) else value
        if not isinstance(values, list) or len(values) not in lengths or not all(_is_int(v) for v in values):
            forms = {1: "an integer", 2: "[h, w]", 4: "[top, left, bottom, right]"}
            expected = " or ".join(forms[n] for n in lengths)
            extra = " or 'same'/'valid'" if self.kind == "pad" else ""
            raise ParamError(f"'{self.name}' must be {expected}{extra}, got {value!r}")
        return [int(v) for v in values]

    def _check_range(self, v: float) -> None:
        if self.minimum is not None and v < self.minimum:
            raise ParamError(f"'{self.name}' must be >= {self.minimum:g}, got {v!r}")
        if self.maximum is not None and v > self.maximum:
            raise ParamError(f"'{self.name}' must be <= {self.maximum:g}, got {v!r}")


# --------------------------------------------------------------------------------------- receptive field
@dataclass(frozen=True)
class RField:
    """Receptive field of one value, per spatial axis (h, w): size in input pixels, jump (the input-pixel
    distance between two neighbouring features) and start (the input-pixel coordinate of the centre of the
    first feature's field; pixel centres are 0, 1, 2, ...)."""

    size: tuple[float, float] = (1, 1)
    jump: tuple[float, float] = (1, 1)
    start: tuple[float, float] = (0.0, 0.0)

    def window(self, kernel: tuple[int, int], stride: tuple[int, int], pad_begin: tuple[int, int],
               dilation: tuple[int, int] = (1, 1)) -> RField:
        size, jump, start = [], [], []
        for a in range(2):
            k = (kernel[a] - 1) * dilation[a] + 1
            size.append(self.size[a] + (k - 1) * self.jump[a])
            jump.append(self.jump[a] * stride[a])
            start.append(self.start[a] + ((k - 1) / 2 - pad_begin[a]) * self.jump[a])
        return RField(tuple(size), tuple(jump), tuple(start))

    def whole(self, extent: tuple[int, int]) -> RField:
        """A feature that sees every position of a value of this spatial extent (global pooling, flatten)."""
        size = tuple(self.size[a] + (extent[a] - 1) * self.jump[a] for a in range(2))
        start = tuple(self.start[a] + (extent[a] - 1) * self.jump[a] / 2 for a in range(2))
        return RField(size, tuple(float(s) for s in size), start)


# ------------------------------------------------------------------------------------------------ op def
@dataclass
class RunContext:
    """What an op's forward and backward see besides its node: the mode and the run's random generator."""

    train: bool = False
    rng: np.random.Generator = field(default_factory=np.random.default_rng)
    need_input_grad: list[bool] = field(default_factory=list)  # set per node by the executor before backward
    frozen: frozenset[str] = frozenset()  # layers that do not train: their batch norms use running statistics
    sync_bn: Any = None  # a distributed World when batch norm's statistics span every rank's batch (train.sync_bn)


class OpDef:
    """Base class. Subclasses set `type`, `params` and override what differs from an elementwise op."""

    type: ClassVar[str]
    doc: ClassVar[str] = ""
    params: ClassVar[tuple[Param, ...]] = ()
    min_inputs: ClassVar[int] = 1
    max_inputs: ClassVar[int | None] = 1
    # Names of the op's parameter tensors that take a filler, mapped to their default filler.
    fillable: ClassVar[dict[str, dict[str, Any]]] = {}

    # --- YAML -> attributes ---------------------------------------------------------------------------
    def parse_attrs(self, raw: dict[str, Any]) -> tuple[dict[str, Any], list[tuple[str, str]]]:
        """Parse this op's parameters from a layer mapping. Returns (attrs, [(key, error message)])."""
        attrs: dict[str, Any] = {}
        errors: list[tuple[str, str]] = []
        for p in self.params:
            if p.name in raw:
                try:
                    attrs[p.name] = p.parse(raw[p.name])
                except ParamError as exc:
                    errors.append((p.name, str(exc)))
            elif p.required:
                errors.append((p.name, f"missing required parameter '{p.name}'" + (f" ({p.help})" if p.help else "")))
            else:
                attrs[p.name] = p.parse(p.default)  # defaults go through the same normalisation
        if not errors:
            try:
                self.check_attrs(attrs)
            except ParamError as exc:
                errors.append(("", str(exc)))
        return attrs, errors

    def check_attrs(self, attrs: dict[str, Any]) -> None:
        """Cross-parameter checks (raise ParamError)."""

    # --- shapes ---------------------------------------------------------------------------------------
    def infer(self, attrs: dict[str, Any], in_shapes: list[Shape]) -> tuple[Shape, dict[str, Any]]:
        """Return (output shape, resolved attrs). Resolved attrs may add values computed from the input
        shape (e.g. explicit pads for pad: same). Raise ShapeError with the computed shapes."""
        return in_shapes[0], attrs

    # --- parameters -----------------------------------------------------------------------------------
    def param_shapes(self, attrs: dict[str, Any], in_shapes: list[Shape]) -> dict[str, Shape]:
        return {}

    def trainable(self, attrs: dict[str, Any]) -> tuple[str, ...]:
        """Which parameter tensors are learned (the rest, e.g. BN running statistics, are buffers)."""
        return tuple(self.fillable)

    def default_params(self, attrs: dict[str, Any], in_shapes: list[Shape]) -> dict[str, np.ndarray]:
        """Non-fillable parameter tensors (e.g. BN statistics) at their initial values."""
        return {}

    def fan(self, attrs: dict[str, Any], in_shapes: list[Shape], out_shape: Shape) -> tuple[int, int]:
        """(fan_in, fan_out) for xavier/kaiming fillers."""
        return (1, 1)

    # --- cost -----------------------------------------------------------------------------------------
    def macs(self, attrs: dict[str, Any], in_shapes: list[Shape], out_shape: Shape) -> int:
        """Multiply-accumulates per sample (convolutions and linear layers; elementwise ops count 0)."""
        return 0

    # --- receptive field ------------------------------------------------------------------------------
    def receptive(self, attrs: dict[str, Any], in_fields: list[RField], in_shapes: list[Shape]) -> RField:
        """Default for elementwise ops and merges: the widest input field."""
        return max(in_fields, key=lambda f: (f.size[0] * f.size[1], -f.jump[0]))

    # --- training backend (float32 NCHW kernels in dlc._C) --------------------------------------------
    def forward(self, node: Node, inputs: list[np.ndarray], ctx: RunContext) -> tuple[np.ndarray, Any]:
        """Return (output, saved): `saved` is whatever backward needs (None in eval mode is fine)."""
        raise NotImplementedError(f"'{self.type}' has no training-backend kernel")

    def backward(self, node: Node, saved: Any, dy: np.ndarray,
                 ctx: RunContext) -> tuple[list[np.ndarray | None], dict[str, np.ndarray]]:
        """Return (gradient per input, gradient per parameter tensor)."""
        raise NotImplementedError(f"'{self.type}' has no training-backend kernel")

    # --- ONNX -----------------------------------------------------------------------------------------
    def to_onnx(self, node: Node, b: OnnxBuilder) -> None:
        raise NotImplementedError(f"{self.type} has no ONNX export")


REGISTRY: dict[str, OpDef] = {}


def register(cls: type[OpDef]) -> type[OpDef]:
    """Class decorator: one instance of each op definition, keyed by its YAML type name."""
    if cls.type in REGISTRY:
        raise AssertionError(f"op type '{cls.type}' registered twice")
    REGISTRY[cls.type] = cls()
    return cls


def get_op(op_type: str) -> OpDef:
    return REGISTRY[op_type]


def fmt_shape(shape: Shape | None) -> str:
    return "?" if shape is None else "×".join(str(d) for d in shape)
