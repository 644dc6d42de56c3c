"""Running dlc's own commands from a benchmark, so its numbers are what a user of the CLI gets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def dlc(*args: str | Path) -> dict:
    """Run one dlc command with --json; its JSON output, or exit with dlc's own error message."""
    cmd = [sys.executable, "-m", "dlc.compiler.cli", *map(str, args), "--json"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
    if proc.returncode != 0:
        log(proc.stderr.strip())
        raise SystemExit(f"failed ({proc.returncode}): dlc {' '.join(map(str, args))}")
    return json.loads(proc.stdout)
