"""One error path for the whole CLI: any exception becomes one short `error:` line and an exit code.

Commands raise `DlcError` for what they can name themselves. Everything else that escapes a command lands here:
failures the user's input or machine causes (a full disk, a missing permission, an image bomb, a corrupt ONNX
file that onnx or onnxruntime refuses, input nested too deeply, memory running out) exit with 2 like any user
error; anything else is a bug in dlc and exits with 1, asking for a report (the traceback only with --debug).
"""

from __future__ import annotations

import errno
import re
from dataclasses import dataclass

from .errors import DlcError, shorten

USER_ERROR = 2
INTERNAL_ERROR = 1


@dataclass(frozen=True)
class Failure:
    code: int
    lines: list[str]
    internal: bool = False


def _os_error(exc: OSError) -> str:
    where = f"{shorten(str(exc.filename))}: " if exc.filename else ""
    if exc.errno == errno.ENOSPC:
        return f"{where}no space left on the device; free some space and run again (finished files are kept)"
    if exc.errno == errno.EDQUOT:
        return f"{where}disk quota exceeded; free some space and run again (finished files are kept)"
    if isinstance(exc, PermissionError):
        return f"{where}permission denied; check the file's or folder's permissions"
    if isinstance(exc, IsADirectoryError):
        return f"{where}is a folder, expected a file"
    if isinstance(exc, NotADirectoryError):
        return f"{where}a part of this path is a file, expected a folder"
    if isinstance(exc, FileExistsError):
        return f"{where}already exists; remove it or choose another path"
    if isinstance(exc, FileNotFoundError):
        return f"{where}no such file or folder; check the path"
    reason = exc.strerror or str(exc) or type(exc).__name__
    return f"{where}{shorten(reason)}"


def _is_onnx_error(exc: BaseException) -> bool:
    module = type(exc).__module__ or ""
    if module.startswith(("onnx.", "onnxruntime")) or module == "onnx":
        return True
    # protobuf's DecodeError: a file that is not a serialized ONNX model
    return module.startswith("google.protobuf") and type(exc).__name__ == "DecodeError"


_ORT_SOURCE = re.compile(r"/\S*onnxruntime_src/\S+:\d+ [^\n]*?\) ")
_ORT_CODE = re.compile(r"^\[ONNXRuntimeError\] : \d+ : [A-Z_]+ : ")


def ort_message(text: str) -> str:
    """onnxruntime's message without its C++ source location and function signature."""
    text = _ORT_CODE.sub("", _ORT_SOURCE.sub(" ", str(text).strip()))
    return re.sub(r"  +", " ", text).strip()


def _first_line(exc: BaseException, limit: int = 300) -> str:
    text = ort_message(str(exc)) or type(exc).__name__
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    head = lines[0] if lines else text
    return shorten(head, limit)


MAX_SHOWN = 100  # diagnostics printed for one error; the count of all of them follows


def classify(exc: BaseException) -> Failure:
    """The exit code and message lines for an exception that escaped a command."""
    if isinstance(exc, DlcError):
        count = len(exc.diagnostics)
        # the first ones are what a user fixes first; printing 100,000 lines took half a minute
        lines = [d.format() for d in exc.diagnostics[:MAX_SHOWN]] or [shorten(str(exc))]
        if count > MAX_SHOWN:
            lines.append(f"... and {count - MAX_SHOWN:,} more not shown")
        if count > 1:
            lines.append(f"{count:,} problems found")
        return Failure(USER_ERROR, lines)
    if isinstance(exc, MemoryError):
        return Failure(USER_ERROR, ["out of memory: the model, batch or input is too large for this machine; "
                                    "use a smaller batch_size or input shape"])
    if isinstance(exc, RecursionError):
        return Failure(USER_ERROR, ["the input is nested too deeply to process (recursion limit reached); "
                                    "flatten the YAML/JSON or the ONNX graph"])
    if type(exc).__name__ == "DecompressionBombError":  # PIL; not imported here to keep the CLI start fast
        return Failure(USER_ERROR, [f"image too large: {_first_line(exc)}"])
    if isinstance(exc, OSError):
        return Failure(USER_ERROR, [_os_error(exc)])
    if _is_onnx_error(exc):
        source = "onnxruntime" if (type(exc).__module__ or "").startswith("onnxruntime") else "onnx"
        return Failure(USER_ERROR, [f"{source} refused the model: {_first_line(exc)}"])
    return Failure(INTERNAL_ERROR, [f"internal error ({type(exc).__name__}: {_first_line(exc, 200)}). This is a "
                                    "bug in dlc; please report it with the command that caused it and the output "
                                    "of the same command with --debug"], internal=True)
