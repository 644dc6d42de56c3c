"""runtime.bench.bench in a process of its own, its models sharing one onnxruntime thread pool.

Interleaved timing with a thread pool per session (onnxruntime's default) lets the session that just ran keep
its threads spinning on the cores the next session needs. Measured on this repository's 2-core machine, the
ratio of minima of one fp32/INT8 pair then swung between 1.0x and 3.0x from run to run, with medians twice the
minima; sharing one process-wide pool gives each model its time alone (ResNet-20 INT8 1.75x / 2.25x at batch
1 / 32 interleaved vs 1.78x / 2.29x each alone), minima and medians within a few per cent. onnxruntime allows
that pool once per process and then refuses sessions with threads of their own, so the timing runs in a
child process: `python -m dlc.runtime.bench_isolated`, a JSON request on stdin, the BenchResult as JSON on
stdout (no pickle).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from dlc.compiler import limits
from dlc.compiler.errors import Diagnostic, DlcError

from .bench import BenchResult, BenchRow


def bench_isolated(paths: Sequence[str | Path], batches: Sequence[int] = (1,), device: str = "cpu",
                   min_time_s: float = 2.0, warmup: int = 5, threads: int | None = None,
                   optimization: str = "all", timeout_s: float | None = None, data: str | Path | None = None,
                   postprocess: bool = False, trt_fp16: bool = False, trt_cache: str | Path | None = None,
                   io_binding: bool = False) -> BenchResult:
    """runtime.bench.bench(..., shared_threads=True) in a child process; the same arguments and result."""
    request = {"paths": [str(p) for p in paths], "batches": [int(b) for b in batches], "device": device,
               "min_time_s": float(min_time_s), "warmup": int(warmup), "threads": threads,
               "optimization": optimization, "data": str(data) if data is not None else None,
               "postprocess": bool(postprocess), "trt_fp16": bool(trt_fp16),
               "trt_cache": str(trt_cache) if trt_cache is not None else None, "io_binding": bool(io_binding),
               "limits": [f"{k}={v}" for k, v in asdict(limits.current()).items()]}  # --limit reaches the child
    proc = subprocess.run([sys.executable, "-m", "dlc.runtime.bench_isolated"], input=json.dumps(request),
                          capture_output=True, text=True, timeout=timeout_s)
    lines = proc.stdout.strip().splitlines()
    try:
        reply = json.loads(lines[-1]) if lines else {}
    except json.JSONDecodeError:
        reply = {}
    if proc.returncode != 0 or "result" not in reply:
        if reply.get("error"):
            raise DlcError([Diagnostic(line) for line in reply["error"].splitlines()])  # dlc's own message (a missing file, a corrupt model), as in-process
        detail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise DlcError(f"timing the models in a separate process failed: {detail}")
    for line in proc.stderr.splitlines():  # the child's notes ("dlc: running on the CPU ...") reach the user
        if line.startswith("dlc: "):
            print(line, file=sys.stderr)
    data_out = reply["result"]
    rows = [BenchRow(**r) for r in data_out.pop("rows")]
    return BenchResult(**data_out, rows=rows)


def _main() -> int:
    from .bench import bench

    request = json.loads(sys.stdin.read())
    try:
        limits.configure(request.get("limits"))
        result = bench(request["paths"], request["batches"], device=request["device"],
                       min_time_s=request["min_time_s"], warmup=request["warmup"], threads=request["threads"],
                       optimization=request["optimization"], shared_threads=True, data=request.get("data"),
                       postprocess=request.get("postprocess", False), trt_fp16=request.get("trt_fp16", False),
                       trt_cache=request.get("trt_cache"), io_binding=request.get("io_binding", False))
    except DlcError as exc:
        print(json.dumps({"error": str(exc)}))
        return 2
    print(json.dumps({"result": result.to_dict()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
