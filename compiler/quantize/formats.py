"""The INT8 formats dlc tries, and quantizing a model into one of them with onnxruntime's quantize_static.

Which format is fastest depends on the runtime and the CPU, not on habit: on onnxruntime 1.31's CPU provider
QOperator (QLinearConv) U8S8 beat fp32 by 1.7-3.5× on ResNet-20 where QDQ S8S8, the format onnxruntime's docs
call the first choice, was slower than fp32. So dlc quantizes into every candidate the target can load and
measures them: QDQ and QOperator × S8S8 and U8S8 (activations/weights) × per-channel on/off, and the same with
`reduce_range` (7-bit weights) where the CPU has no int8 dot-product unit (x86 VNNI, ARM dotprod), because
without one the u8×s8 multiply-add instructions can saturate.
"""

from __future__ import annotations

import contextlib
import io
import logging
import platform
from dataclasses import asdict, dataclass
from pathlib import Path

FORMATS = ("qoperator", "qdq", "dynamic")
# execution providers and the formats they load (a format a target's runtime cannot load is not tried)
DEVICE_FORMATS = {
    "cpu": ("qoperator", "qdq", "dynamic"),
    "cuda": ("qdq",),  # the CUDA provider runs QDQ graphs; QOperator's contrib ops fall back to the CPU
    "tensorrt": ("qdq",),  # TensorRT reads only QDQ, with symmetric int8 activations and weights
}
_X86_DOT_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
_ARM_DOT_FLAGS = ("asimddp",)


@dataclass(frozen=True)
class Candidate:
    """One way to quantize: format, activation/weight types, per-channel weights, 7-bit weights."""

    format: str  # "qoperator" | "qdq" | "dynamic" (linear-heavy nets only, see dynamic.py)
    activations: str  # "u8" | "s8"
    weights: str = "s8"
    per_channel: bool = True
    reduce_range: bool = False
    symmetric_activations: bool = False  # TensorRT: zero point 0

    @property
    def key(self) -> str:
        return (f"{self.format}_{self.activations}{self.weights}_{'pc' if self.per_channel else 'pt'}"
                + ("_rr" if self.reduce_range else "") + ("_sym" if self.symmetric_activations else ""))

    @property
    def label(self) -> str:
        if self.format == "dynamic":
            return f"Dynamic S8 weights {'per-channel' if self.per_channel else 'per-tensor'}"
        fmt = "QOperator" if self.format == "qoperator" else "QDQ"
        return (f"{fmt} {self.activations.upper()}{self.weights.upper()} "
                f"{'per-channel' if self.per_channel else 'per-tensor'}"
                + (" reduce_range" if self.reduce_range else "") + (" symmetric" if self.symmetric_activations else ""))

    def to_dict(self) -> dict:
        return {**asdict(self), "key": self.key, "label": self.label}


def cpu_int8_dot_product(cpuinfo: str | None = None) -> bool | None:
    """Whether this CPU has an int8 dot-product unit: x86 AVX512-VNNI / AVX-VNNI / AMX-INT8, ARM dotprod
    (`asimddp`). Read from /proc/cpuinfo's flags (x86) or Features (ARM); None where that cannot be read."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            return None
    words: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            words.update(value.split())
    if not words:
        return None
    return any(f in words for f in (*_X86_DOT_FLAGS, *_ARM_DOT_FLAGS))


def candidates(device: str = "cpu", formats: tuple[str, ...] | None = None, int8_dot: bool | None = None,
               dynamic=None) -> tuple[list[Candidate], list[str]]:
    """The candidates to try on `device` and notes on what was left out and why. `dynamic` is the model's
    DynamicPolicy (dynamic.py): dynamic candidates join for linear-heavy nets; asking for them explicitly on
    a conv net is an error that gives the reason."""
    from ..errors import DlcError

    notes = []
    allowed = DEVICE_FORMATS.get(device, FORMATS)
    wanted = tuple(formats) if formats else allowed
    unknown = [f for f in wanted if f not in FORMATS]
    if unknown:
        raise DlcError(f"unknown INT8 format(s) {', '.join(unknown)}: use {', '.join(FORMATS)}")
    if "dynamic" in wanted and dynamic is not None and not dynamic.allowed:
        if formats and "dynamic" in formats:
            raise DlcError(f"dynamic INT8 refused: {dynamic.reason}")
        notes.append(f"dynamic INT8 not tried: {dynamic.reason}")
        wanted = tuple(f for f in wanted if f != "dynamic")
    use = [f for f in wanted if f in allowed]
    for f in wanted:
        if f not in allowed:
            notes.append(f"{f} is not tried: a {device} target's runtime does not run it "
                         f"({device} loads {', '.join(allowed)})")
    if not use:
        raise DlcError(f"none of the formats {', '.join(wanted)} runs on a {device} target; it runs "
                       f"{', '.join(allowed)}")
    if device == "tensorrt":
        return [Candidate("qdq", "s8", "s8", pc, symmetric_activations=True) for pc in (True, False)], notes
    if int8_dot is None:
        notes.append(f"could not tell whether this CPU ({platform.machine()}) has an int8 dot-product unit: "
                     "tried reduce_range (7-bit weights) as well")
        ranges = (False, True)
    elif int8_dot:
        ranges = (False,)
        notes.append("reduce_range not tried: the CPU has an int8 dot-product unit (VNNI / dotprod), so 8-bit "
                     "weights do not saturate")
    else:
        ranges = (True,)
        notes.append("reduce_range (7-bit weights) on: the CPU has no int8 dot-product unit (VNNI / dotprod), "
                     "where u8×s8 multiply-adds can saturate with 8-bit weights")
    out = [Candidate(f, act, "s8", pc, rr) for f in use if f != "dynamic" for act in ("u8", "s8")
           for pc in (True, False) for rr in ranges]
    if "dynamic" in use:
        out += [Candidate("dynamic", "u8", "s8", pc) for pc in (False, True)]
    return out, notes


@contextlib.contextmanager
def quiet_ort():
    """onnxruntime.quantization logs advice through the root logger ("Please consider to run pre-processing",
    "use QDQ for S8S8") and its histogram calibrators print progress to stdout; dlc reports its own findings
    (and --json owns stdout), so silence both while it works."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.setLevel(level)


def quantize_candidate(pre_path: Path, out_path: Path, cand: Candidate, cache_path: Path, method: str,
                       exclude: list[str] | tuple[str, ...] = (), only: list[str] | tuple[str, ...] = ()) -> None:
    """Quantize the pre-processed model into `cand`'s format from the cached ranges; `exclude` stays float;
    `only`, if given, are the only nodes quantized."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    from .calibration import METHODS

    if cand.format == "dynamic":
        from .dynamic import quantize_dynamic_int8

        quantize_dynamic_int8(pre_path, out_path, cand.per_channel, exclude)
        return

    types = {"u8": QuantType.QUInt8, "s8": QuantType.QInt8}
    extra = {"ActivationSymmetric": True} if cand.symmetric_activations else {}
    with quiet_ort():
        quantize_static(str(pre_path), str(out_path), None,
                        quant_format=QuantFormat.QOperator if cand.format == "qoperator" else QuantFormat.QDQ,
                        per_channel=cand.per_channel, reduce_range=cand.reduce_range,
                        activation_type=types[cand.activations], weight_type=types[cand.weights],
                        nodes_to_exclude=list(exclude), nodes_to_quantize=list(only) or None,
                        calibrate_method=METHODS[method],
                        calibration_cache_path=str(cache_path), extra_options=extra)
