"""Per-layer latency tables on the target runtime, for pruning to a speed target (speed_target.py).

An entry is one conv / conv_transpose / linear layer at one width (input channels, output channels), batch and
spatial size, exported the way dlc exports it (followed by a ReLU, which onnxruntime fuses into the conv) and
timed alone on onnxruntime with the target's provider and threads: the minimum over at least `RUNS` runs and
`MIN_TIME_S` seconds, after warm-up. The minimum, because other jobs on a shared machine only ever add time.

Entries are measured in a child process (`python -m dlc.compiler.prune.latency_table`, a JSON request and reply,
no pickle) whose sessions share one onnxruntime thread pool, as `dlc bench` times models: the training process
keeps its own OpenMP threads and onnxruntime's spinning threads do not sit on the cores the next session needs.

Measured entries are cached in one JSON file (`DLC_CACHE_DIR`, else `$XDG_CACHE_HOME/dlc`, else ~/.cache/dlc:
latency_tables.json), keyed by the layer and by what its time depends on: onnxruntime's version, the device,
threads, batch and the CPU. Delete the file to measure again.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DlcError

RUNS = 10
MIN_TIME_S = 0.03
WARMUP = 3
CACHE_VERSION = 1
TIMED_OPS = ("conv", "conv_transpose", "linear")


def layer_key(op: str, attrs: dict[str, Any], in_shape: Sequence[int]) -> dict[str, Any]:
    """What a layer's time depends on, as plain JSON values: its op, its shape-setting attributes and its
    per-sample input shape (channels first)."""
    keep = ("out", "kernel", "stride", "pads", "dilation", "groups", "output_padding", "bias")
    a = {k: (list(v) if isinstance(v, tuple) else v) for k, v in attrs.items() if k in keep}
    return {"op": op, "attrs": a, "in_shape": [int(d) for d in in_shape]}


def overhead_key(in_shape: Sequence[int]) -> dict[str, Any]:
    """The entry of a model that only applies a ReLU to an input of this shape: what every entry pays besides
    its layer (the run call, copying the input in and the output out), subtracted from the layer's time."""
    return {"op": "none", "attrs": {}, "in_shape": [int(d) for d in in_shape]}


def layer_onnx(key: dict[str, Any]) -> bytes:
    """The layer of `key` as an ONNX model (random weights, then a ReLU), exported by dlc's own exporter; op
    "none" (overhead_key) is the ReLU alone."""
    from ..analysis import infer_shapes
    from ..export_onnx import to_onnx
    from ..graph import Graph, Node, ValueInfo
    from ..ops import REGISTRY

    op, attrs, in_shape = key["op"], dict(key["attrs"]), tuple(key["in_shape"])
    attrs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in attrs.items()}
    if "pads" in attrs:
        attrs["pad"] = attrs["pads"]
    if op == "linear":
        attrs.setdefault("bias", True)
    g = Graph("latency_entry", [ValueInfo("x", in_shape)])
    if op == "none":
        g.add_node(Node("relu", "relu", ["x"], ["z"]))
        g.outputs = ["z"]
        infer_shapes(g)
        return to_onnx(g).SerializeToString()
    rng = np.random.default_rng(0)
    shapes = REGISTRY[op].param_shapes(attrs, [in_shape])
    params = {k: rng.standard_normal(s).astype(np.float32) * 0.1 for k, s in shapes.items()}
    g.add_node(Node("layer", op, ["x"], ["y"], attrs, params))
    g.add_node(Node("relu", "relu", ["y"], ["z"]))
    g.outputs = ["z"]
    infer_shapes(g)
    return to_onnx(g).SerializeToString()


def environment(device: str, threads: int | None, batch: int) -> dict[str, Any]:
    """Everything besides the layer that an entry's time depends on."""
    import onnxruntime as ort

    return {"onnxruntime": ort.__version__, "device": device, "threads": threads, "batch": int(batch),
            "cpu": _cpu_name(), "cores": os.cpu_count()}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cache_path() -> Path:
    root = os.environ.get("DLC_CACHE_DIR")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME")
        root = str(Path(xdg) / "dlc") if xdg else str(Path.home() / ".cache" / "dlc")
    return Path(root) / "latency_tables.json"


def _entry_id(env: dict[str, Any], key: dict[str, Any]) -> str:
    text = json.dumps({"env": env, "layer": key}, sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # absent or unreadable: measure again (the file is rewritten whole below)
    if not isinstance(doc, dict) or doc.get("version") != CACHE_VERSION or not isinstance(doc.get("entries"), dict):
        return {}
    return doc["entries"]


class LatencyTable:
    """Milliseconds per layer entry at one batch, device and thread count, measured once and cached."""

    def __init__(self, batch: int = 1, device: str = "cpu", threads: int | None = None, cache: bool = True,
                 progress: Callable[[int, int], None] | None = None):
        self.batch, self.device, self.threads = int(batch), device, threads
        self.env = environment(device, threads, batch)
        self.cache = cache_path() if cache else None
        self.progress = progress
        self.ms: dict[str, float] = {}
        self.measured = 0  # entries measured by this table (not found in the cache)
        self.cached = 0
        self.seconds = 0.0

    def lookup(self, keys: Sequence[dict[str, Any]]) -> list[float]:
        """Milliseconds for each key: from this table, the cache file, or measured now (all missing at once)."""
        ids = [_entry_id(self.env, k) for k in keys]
        missing = {i: k for i, k in zip(ids, keys) if i not in self.ms}
        if missing and self.cache is not None:
            stored = _read_cache(self.cache)
            for i in list(missing):
                if isinstance(stored.get(i), dict) and isinstance(stored[i].get("ms"), (int, float)):
                    self.ms[i] = float(stored[i]["ms"])
                    self.cached += 1
                    del missing[i]
        if missing:
            start = time.perf_counter()
            times = measure_entries(list(missing.values()), self.batch, self.device, self.threads, self.progress)
            self.seconds += time.perf_counter() - start
            self.measured += len(times)
            self.ms.update(zip(missing, times))
            if self.cache is not None:
                self._store({i: {"ms": t, "layer": missing[i], "env": self.env} for i, t in zip(missing, times)})
        return [self.ms[i] for i in ids]

    def _store(self, new: dict[str, Any]) -> None:
        from ..atomic import write_json

        entries = _read_cache(self.cache)  # merged: another process may have added entries meanwhile
        entries.update(new)
        try:
            write_json(self.cache, {"version": CACHE_VERSION, "entries": entries})
        except OSError as exc:  # a read-only home: the table still works, it is only measured again next time
            print(f"dlc: could not write the latency cache {self.cache}: {exc}", file=sys.stderr)
            self.cache = None

    def to_dict(self) -> dict[str, Any]:
        return {"batch": self.batch, "device": self.device, "threads": self.threads, "entries": len(self.ms),
                "measured": self.measured, "cached": self.cached, "seconds": round(self.seconds, 2),
                "cache": str(self.cache) if self.cache else None}


def measure_entries(keys: Sequence[dict[str, Any]], batch: int, device: str = "cpu", threads: int | None = None,
                    progress: Callable[[int, int], None] | None = None) -> list[float]:
    """Milliseconds (minimum over the timed runs) for each layer entry, measured in a child process."""
    with tempfile.TemporaryDirectory(prefix="dlc-latency-") as tmp:
        reply = Path(tmp) / "reply.json"
        request = {"keys": list(keys), "batch": int(batch), "device": device, "threads": threads,
                   "reply": str(reply)}
        proc = subprocess.Popen([sys.executable, "-m", "dlc.compiler.prune.latency_table"], stdin=subprocess.PIPE,
                                stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        proc.stdin.write(json.dumps(request))
        proc.stdin.close()
        tail = []
        for line in proc.stderr:  # progress lines "done total", anything else kept for the error message
            parts = line.split()
            if len(parts) == 3 and parts[0] == "progress" and progress is not None:
                progress(int(parts[1]), int(parts[2]))
            elif parts and parts[0] != "progress":
                tail = (tail + [line.strip()])[-5:]
        rc = proc.wait()
        try:
            doc = json.loads(reply.read_text())
        except (OSError, ValueError):
            doc = {}
        if rc != 0 or "ms" not in doc:
            detail = doc.get("error") or (tail[-1] if tail else f"exit status {rc}")
            raise DlcError(f"measuring layer latencies on onnxruntime failed: {detail}")
        return [float(t) for t in doc["ms"]]


def _time_entry(key: dict[str, Any], batch: int, device: str, threads: int | None) -> float:
    from dlc.runtime.session import Session

    session = Session(layer_onnx(key), device=device, threads=threads, shared_threads=True)
    x = np.random.default_rng(1).standard_normal((batch, *key["in_shape"])).astype(np.float32)
    feeds = {session.inputs[0].name: x}
    run = session._session.run
    for _ in range(WARMUP):
        run(None, feeds)
    best, spent, n = float("inf"), 0.0, 0
    while n < RUNS or spent < MIN_TIME_S:
        t0 = time.perf_counter()
        run(None, feeds)
        dt = time.perf_counter() - t0
        best, spent, n = min(best, dt), spent + dt, n + 1
    return best * 1e3


def _main() -> int:
    request = json.loads(sys.stdin.read())
    reply = Path(request["reply"])
    from ..atomic import write_json

    try:
        keys, times = request["keys"], []
        for k, key in enumerate(keys):
            times.append(_time_entry(key, request["batch"], request["device"], request["threads"]))
            print(f"progress {k + 1} {len(keys)}", file=sys.stderr, flush=True)
    except DlcError as exc:
        write_json(reply, {"error": str(exc)})
        return 2
    write_json(reply, {"ms": times})
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
