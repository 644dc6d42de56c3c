"""Atomic file writes: write to a temporary file beside the target, fsync, then rename into place, so a crash
or Ctrl-C never leaves a half-written artifact over a user's earlier result."""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

# Temporary files are named ".<target name>.<8 random characters>.tmp" (tempfile.mkstemp with the prefix and
# suffix below). A write killed hard (kill -9, power loss) leaves one behind; remove_stale_temps() clears them.
TEMP_NAME = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes(path: str | Path, data: bytes) -> Path:
    return write_chunks(path, [data])


def write_chunks(path: str | Path, chunks: Iterable[bytes]) -> Path:
    """write_bytes for data made piece by piece (a large ONNX file, one tensor at a time): only one piece is in
    memory at once, and the target is replaced only once every piece is on disk."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; artifacts get the usual permissions
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def remove_stale_temps(folder: str | Path) -> list[Path]:
    """Delete the temporary files an interrupted write_bytes left in `folder` (only names matching TEMP_NAME,
    only regular files, only in that folder itself). Call it only while the folder is yours (the output-folder
    lock), since a live writer's temporary file looks the same. Returns what was removed."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        if TEMP_NAME.match(entry.name) and entry.is_file(follow_symlinks=False):
            try:
                os.unlink(entry.path)
                removed.append(Path(entry.path))
            except OSError:
                pass
    return removed


def write_text(path: str | Path, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2) + "\n")
