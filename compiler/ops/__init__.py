"""The op registry: `REGISTRY[type]` is the one definition of each layer type (see base.OpDef)."""

from . import conv, detect, elementwise, layout, linear, merge, norm, pad, pool, resize  # noqa: F401  (registers the ops)
from .base import REGISTRY, OpDef, Param, ParamError, RField, Shape, ShapeError, fmt_shape, get_op

__all__ = ["REGISTRY", "OpDef", "Param", "ParamError", "RField", "Shape", "ShapeError", "fmt_shape", "get_op"]
