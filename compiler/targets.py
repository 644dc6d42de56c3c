"""Target runtimes: which opset and IR version an onnxruntime release loads, and what that means for a file.

No runtime API says which IR version it accepts, and onnx's `make_model` stamps the newest IR it knows, which an
older runtime refuses ("Unsupported model IR version"). So the table below is the contract: it follows
onnxruntime's published compatibility table (docs/Versioning.md / onnxruntime.ai "compatibility"), one row per
release line. A target picks the highest opset of its row and the lowest IR version that holds that opset (the
widest set of runtimes loads it); an explicit opset may go lower, never higher than the row.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from .errors import Diagnostic, DlcError

# onnxruntime release (major.minor) -> (highest ONNX opset implemented, highest IR version supported).
ORT_TABLE: dict[tuple[int, int], tuple[int, int]] = {
    (1, 10): (15, 8),
    (1, 11): (16, 8),
    (1, 12): (17, 8),
    (1, 13): (17, 8),
    (1, 14): (18, 8),
    (1, 15): (19, 9),
    (1, 16): (19, 9),
    (1, 17): (20, 9),
    (1, 18): (21, 10),
    (1, 19): (21, 10),
    (1, 20): (21, 10),
    (1, 21): (22, 10),
    (1, 22): (22, 11),
    (1, 23): (23, 11),
}

# The highest opset each ONNX IR version may carry (onnx.helper.VERSION_TABLE): the IR written for an opset is the
# lowest one that holds it.
def _ir_table() -> dict[int, int]:
    from onnx.helper import VERSION_TABLE  # rows (onnx release, IR version, ai.onnx opset, ...)

    return {opset: min(row[1] for row in VERSION_TABLE if row[2] >= opset)
            for opset in range(11, max(row[2] for row in VERSION_TABLE) + 1)}


_IR_OF_OPSET = _ir_table()


@dataclass(frozen=True)
class ResolvedTarget:
    """A target with the numbers it stands for."""

    runtime: str
    version: str  # "1.14", or the installed version when the user named none
    device: str
    opset: int  # the highest opset the target loads (capped at what dlc writes)
    ir_version: int  # the highest IR version the target loads
    from_table: bool  # False: the installed runtime, probed, not in the table

    def describe(self) -> str:
        source = "onnxruntime's compatibility table" if self.from_table else "probed on the installed runtime"
        return (f"{self.runtime} {self.version} ({self.device}): opset {self.opset}, IR version "
                f"{self.ir_version} ({source})")


def parse_version(text: str) -> tuple[int, int]:
    """'1.14', '1.14.1' or '1.14.1+cu118' -> (1, 14). ValueError on anything else."""
    parts = str(text).strip().split("+")[0].split(".")
    if len(parts) < 2 or not all(p.isdigit() for p in parts[:2]):
        raise ValueError(f"{text!r} is not an onnxruntime version such as \"1.14\"")
    return int(parts[0]), int(parts[1])


def known_versions() -> list[str]:
    return [f"{a}.{b}" for a, b in sorted(ORT_TABLE)]


def ir_for_opset(opset: int) -> int:
    """The lowest IR version that may carry `opset`."""
    if opset not in _IR_OF_OPSET:
        raise DlcError(f"opset {opset} has no known IR version (dlc knows opsets {min(_IR_OF_OPSET)} to "
                       f"{max(_IR_OF_OPSET)})")
    return _IR_OF_OPSET[opset]


def min_runtime_for(opset: int, ir_version: int) -> str | None:
    """The oldest onnxruntime release line in the table that loads a file of this opset and IR version;
    None when no release in the table does (a file newer than the table)."""
    for key in sorted(ORT_TABLE):
        max_opset, max_ir = ORT_TABLE[key]
        if opset <= max_opset and ir_version <= max_ir:
            return f"{key[0]}.{key[1]}"
    return None


def installed_runtime() -> str | None:
    try:
        import onnxruntime
    except ImportError:  # pragma: no cover - a required dependency
        return None
    return onnxruntime.__version__


@lru_cache(maxsize=1)
def probe_installed() -> tuple[int, int]:
    """(highest opset, highest IR version) the installed onnxruntime loads, found by loading a one-node model
    (Identity, which every opset has) at each opset and IR version that the installed onnx can write."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    def loads(opset: int, ir: int) -> bool:
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
        graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe", [x], [y])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir)
        try:
            ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        except Exception:  # noqa: BLE001 - refusal is the answer being probed
            return False
        return True

    newest_onnx = onnx.defs.onnx_opset_version()
    best_opset = max((o for o in range(11, newest_onnx + 1) if loads(o, ir_for_opset(o))), default=11)
    best_ir = max((ir for ir in range(ir_for_opset(best_opset), onnx.IR_VERSION + 1) if loads(best_opset, ir)),
                  default=ir_for_opset(best_opset))
    return best_opset, best_ir


def resolve_target(runtime: str = "onnxruntime", version: str | None = None, device: str = "cpu",
                   max_writable: int | None = None) -> ResolvedTarget:
    """The opset and IR version for a target. `version` None means the installed onnxruntime. An unknown
    version is a DlcError that lists the known ones. `max_writable` caps the opset at what dlc's exporter
    writes (the table may know newer opsets than dlc emits)."""
    if runtime != "onnxruntime":
        raise DlcError(f"target runtime {runtime!r} is not known; dlc targets: onnxruntime")
    installed = installed_runtime()
    if version is None:
        if installed is None:
            raise DlcError("no onnxruntime is installed: name a target version (e.g. target: onnxruntime@1.18)")
        version, explicit = installed, False
    else:
        explicit = True
    try:
        key = parse_version(version)
    except ValueError as exc:
        raise DlcError(Diagnostic(f"target version {version!r}: {exc}",
                                  hint=f"known onnxruntime versions: {', '.join(known_versions())}")) from None
    if key in ORT_TABLE:
        opset, ir = ORT_TABLE[key]
        from_table = True
    elif installed is not None and parse_version(installed) == key:
        opset, ir = probe_installed()
        from_table = False
    elif explicit:
        raise DlcError(Diagnostic(f"onnxruntime {version} is not in dlc's target table",
                                  hint=f"known versions: {', '.join(known_versions())}"
                                  + (f", and the installed {installed}" if installed else "")
                                  + "; or give an explicit opset instead of a target"))
    else:  # pragma: no cover - installed runtime matched above
        opset, ir = probe_installed()
        from_table = False
    if max_writable is not None:
        opset = min(opset, max_writable)
    return ResolvedTarget(runtime, f"{key[0]}.{key[1]}" if from_table else str(version), device, opset, ir,
                          from_table)


def installed_runtime_note(target: ResolvedTarget) -> str | None:
    """A plain sentence when the load check ran on a runtime newer than the target (it then proves less)."""
    installed = installed_runtime()
    if installed is None:
        return None
    try:
        newer = parse_version(installed) > parse_version(target.version)
    except ValueError:
        return None
    if not newer:
        return None
    return (f"the installed onnxruntime {installed} is newer than the target {target.version}: loading the file "
            f"here proves it is valid, not that {target.version} runs it (dlc kept to opset {target.opset} and IR "
            f"version {target.ir_version}, which {target.version} loads per onnxruntime's table)")
