"""FP16 against FP32 on onnxruntime's CPU provider, side by side: how much slower dlc's fp16 artifact runs there.

For each example (default: ResNet-20, initial filler weights: latency does not depend on their values) the
fp32 export and its `dlc.compiler.fp16.to_fp16` conversions, with float32 inputs/outputs (keep_io_types, dlc's
default: "fp16") and with float16 ones ("fp16_io"), run in dlc bench's interleaved harness (runtime/bench.py:
A, B, C, A, B, C, ... until each has min-time of runs), 2 threads, at batch 1 and 32, onnxruntime's default
graph optimizations (ORT_ENABLE_ALL, as dlc bench and dlc predict run, which folds the fp16 weights back to
float32 at load time) and ORT_ENABLE_BASIC (each fp16 node runs behind Casts). Printed: fp16 latency as a multiple of
fp32's by minimum and by median (> 1: fp16 is slower), the file sizes,
the largest output difference relative to the output's scale, and the machine's load average before and after
(other jobs on a shared machine hit both models alike, but say how noisy the run was).

    python benchmarks/fp16_vs_fp32.py [--model resnet20] [--batch 1 --batch 32] [--level all] [--min-time 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent


VARIANTS = ("fp32", "fp16", "fp16_io")  # fp16_io: to_fp16(keep_io_types=False), float16 inputs and outputs


def measure(example: str, batches: list[int], min_time: float, threads: int, levels: list[str]) -> dict:
    from dlc.compiler.export_onnx import save, to_onnx
    from dlc.compiler.fp16 import to_fp16
    from dlc.compiler.frontend import load_model
    from dlc.runtime import Session
    from dlc.runtime.bench import bench

    graph = load_model(ROOT / "examples" / f"{example}.yaml").graph
    fp32 = to_onnx(graph)
    models = {"fp32": fp32, "fp16": to_fp16(fp32), "fp16_io": to_fp16(fp32, keep_io_types=False)}
    with tempfile.TemporaryDirectory() as tmp:
        paths = [Path(tmp) / f"{k}.onnx" for k in VARIANTS]
        for k, path in zip(VARIANTS, paths):
            save(models[k], path)
        x = np.random.default_rng(0).standard_normal((8, *graph.inputs[0].shape)).astype(np.float32)
        outs = [next(iter(Session(p, device="cpu").run(x).values())).astype(np.float32) for p in paths]
        rel = {k: float(np.abs(outs[0] - y).max() / np.abs(outs[0]).max()) for k, y in zip(VARIANTS[1:], outs[1:])}
        load_before = os.getloadavg()
        results = {lvl: bench(paths, batches=batches, device="cpu", min_time_s=min_time, threads=threads,
                              optimization=lvl) for lvl in levels}
        load_after = os.getloadavg()
    rows = []
    for (level, result), batch in ((lr, b) for lr in results.items() for b in batches):
        by = {k: r for k, r in zip(VARIANTS, (r for r in result.rows if r.batch == batch))}
        row = {"optimization": level, "batch": batch, **{f"{k}_min_ms": by[k].min_ms for k in VARIANTS},
               **{f"{k}_p50_ms": by[k].p50_ms for k in VARIANTS}, "runs": [by[k].runs for k in VARIANTS]}
        for k in VARIANTS[1:]:  # latency as a multiple of fp32's: > 1 is slower
            row[f"{k}_slowdown_min"] = by[k].min_ms / by["fp32"].min_ms
            row[f"{k}_slowdown_median"] = by[k].p50_ms / by["fp32"].p50_ms
        rows.append(row)
    sizes = {k: r.file_bytes for k, r in zip(VARIANTS, next(iter(results.values())).rows)}
    return {"model": example, "bytes": sizes, "max_rel_diff": rel, "rows": rows,
            "load_average_before": list(load_before), "load_average_after": list(load_after)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", help="example name (repeatable; default resnet20)")
    parser.add_argument("--batch", type=int, action="append", help="batch size (repeatable; default 1 and 32)")
    parser.add_argument("--min-time", type=float, default=2.0, help="seconds of timed runs per model and batch")
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    parser.add_argument("--level", action="append", choices=["disable", "basic", "extended", "all"],
                        help="onnxruntime graph optimization level (repeatable; default all and basic)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()
    results = {"onnxruntime": ort.__version__, "threads": args.threads, "cpu_count": os.cpu_count(),
               "models": [measure(m, args.batch or [1, 32], args.min_time, args.threads, args.level or ["all", "basic"])
                          for m in args.model or ["resnet20"]]}
    if args.json:
        json.dump(results, sys.stdout, indent=2)
        print()
        return
    print(f"fp16 vs fp32 on onnxruntime {ort.__version__} CPU, {args.threads} threads, interleaved runs "
          "(slowdown = fp16 latency / fp32 latency; > 1: fp16 slower)")
    for m in results["models"]:
        b = m["bytes"]
        print(f"\n{m['model']}: files fp32 {b['fp32']:,}, fp16 {b['fp16']:,} bytes ({b['fp32'] / b['fp16']:.2f}x "
              f"smaller); max output diff of fp16 {m['max_rel_diff']['fp16']:.1e}, fp16_io "
              f"{m['max_rel_diff']['fp16_io']:.1e} of the output's scale; load average "
              f"{m['load_average_before'][0]:.2f} -> {m['load_average_after'][0]:.2f}")
        print(f"  {'level':>7} {'batch':>5} {'fp32 min':>10} {'fp32 p50':>10} {'fp16 by min':>12} {'by p50':>7} "
              f"{'fp16_io by min':>15} {'by p50':>7}")
        for r in m["rows"]:
            print(f"  {r['optimization']:>7} {r['batch']:>5} {r['fp32_min_ms']:>8.3f}ms {r['fp32_p50_ms']:>8.3f}ms "
                  f"{r['fp16_slowdown_min']:>11.2f}x {r['fp16_slowdown_median']:>6.2f}x "
                  f"{r['fp16_io_slowdown_min']:>14.2f}x {r['fp16_io_slowdown_median']:>6.2f}x")

if __name__ == "__main__":
    main()
