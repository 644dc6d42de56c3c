"""One dlc at a time per output folder: `dlc train` and `dlc compile` hold DIR/.dlc.lock while they work.

The lock is created atomically (O_CREAT | O_EXCL) and holds JSON: pid, host, the process's start time (Linux)
and the command. It is removed at exit, on an error and at Ctrl-C. A lock whose process is gone (on this host:
no such pid, a zombie, or a pid since reused by a process started later) is stale: it is reported in one line
and taken over. A lock from another host cannot be checked and is refused with the file to delete. Once the
folder is ours, temporary files an interrupted atomic write left there are removed.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .atomic import remove_stale_temps
from .errors import DlcError

LOCK_NAME = ".dlc.lock"
_held: dict[str, int] = {}  # resolved folder -> nesting depth, for this process (compile trains inside its lock)


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux /proc), or None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int, started: Any) -> bool:
    if pid == os.getpid():
        return False  # not held by this process (that is tracked in _held): left by an earlier process, pid reused
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it exists
    except OSError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if state in ("Z", "X"):
            return False  # a zombie holds no folder
    except (OSError, IndexError):
        pass
    now = _start_time(pid)
    return not (isinstance(started, int) and now is not None and now != started)


def _describe(owner: dict[str, Any]) -> str:
    command = f"dlc {owner['command']}, " if isinstance(owner.get("command"), str) else ""
    since = owner.get("time")
    when = f", since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(since))}" if isinstance(since, (int, float)) \
        else ""
    return f"{command}pid {owner.get('pid')}{when}"


def _read(lock: Path) -> dict[str, Any] | None:
    try:
        owner = json.loads(lock.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return owner if isinstance(owner, dict) else None


def _acquire(folder: Path, command: str, say) -> Path:
    lock = folder / LOCK_NAME
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": _start_time(os.getpid()),
          "command": command, "time": time.time()}
    for _ in range(5):
        try:
            fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            pass
        except OSError as exc:
            raise DlcError(f"{folder}: cannot create the lock file {lock} ({exc.strerror or exc})") from None
        else:
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(me) + "\n")
            return lock
        owner = _read(lock)
        if owner is None:
            try:
                age = time.time() - lock.stat().st_mtime
            except FileNotFoundError:
                continue  # released meanwhile: try again
            if age < 5:  # another dlc is between creating and writing it
                raise DlcError(f"{folder} is being claimed by another dlc right now (lock {lock}); wait for it to "
                               "finish or use another -o folder")
            say(f"note: took over the unreadable lock {lock} (left by an interrupted dlc)")
        elif owner.get("host") != me["host"]:
            raise DlcError(f"{folder} is in use by {_describe(owner)} on host {owner.get('host')!s:.80}, which "
                           f"cannot be checked from here; if no dlc runs there, delete {lock}")
        elif not isinstance(owner.get("pid"), int) or isinstance(owner.get("pid"), bool):
            say(f"note: took over the malformed lock {lock}")
        elif _alive(owner["pid"], owner.get("started")):
            raise DlcError(f"{folder} is in use by another dlc ({_describe(owner)}); wait for it to finish, or "
                           f"use another -o folder (lock file: {lock})")
        else:
            say(f"note: took over the stale lock {lock} of pid {owner['pid']}, which is no longer running")
        try:
            lock.unlink()
        except FileNotFoundError:
            pass
    raise DlcError(f"{folder}: could not take the lock {lock}: other processes keep claiming it")


def _release(lock: Path) -> None:
    owner = _read(lock)
    if owner is not None and owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname():
        lock.unlink(missing_ok=True)


@contextmanager
def claim_output_folder(folder: str | Path, command: str, console=None) -> Iterator[Path]:
    """Create `folder` if needed, hold its lock for the block, and remove stale temporary files in it (and in
    its snapshots/ folder, which dlc train also writes). Nested claims of one folder in one process are fine."""
    folder = Path(folder)

    def say(text: str) -> None:
        if console is not None:
            console.print(text, highlight=False)

    if folder.exists() and not folder.is_dir():
        raise DlcError(f"-o {folder}: is a file, not a folder; dlc {command} writes a folder there (pick another "
                       "path)")
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DlcError(f"{folder}: cannot create the output folder ({exc.strerror or exc})") from None
    key = str(folder.resolve())
    if key in _held:
        _held[key] += 1
        try:
            yield folder
        finally:
            _held[key] -= 1
        return
    lock = _acquire(folder, command, say)
    _held[key] = 1
    try:
        removed = [p for sub in (folder, folder / "snapshots", folder / "data_store") for p in remove_stale_temps(sub)]
        if removed:
            say(f"note: removed {len(removed)} temporary file(s) an interrupted write left in {folder}: "
                + ", ".join(p.name for p in removed[:3]) + (" ..." if len(removed) > 3 else ""))
        yield folder
    finally:
        del _held[key]
        _release(lock)
        if created and not any(folder.iterdir()):  # a run that failed before writing leaves no empty folder
            folder.rmdir()
