"""The GPU check: one prepared script to run where a GPU machine is lent (tests never need a GPU).

It proves the CUDA and TensorRT providers are really used (the provider onnxruntime chose and the nodes each
provider runs, Memcpy nodes included), and measures fp32 / fp16 / int8 latency of one example, with and without
host copies (IO binding), through dlc bench's interleaved harness:

  1. the example (default ResNet-20) exported at fp32 with its YAML's fillers (latency needs no training);
  2. fp16 (dlc's to_fp16, fp32 inputs/outputs) and int8 (dlc quantize's search on the example's synthetic data,
     timed on the device, --force so a file is written even when it is not faster);
  3. for each device in --devices (cuda, tensorrt): a Session per model (TensorRT with fp16 engines for the fp16
     model and an engine cache under OUT), the placement, then dlc bench with IO binding at --batch.

    python benchmarks/gpu_check.py [--json] [--model resnet20] [--devices cuda,tensorrt] [--batch 1,32]
        [--min-time 2] [--out build/gpu_check] [--allow-cpu]

Without a GPU it says so and exits 2; --allow-cpu runs the same steps on the CPU provider (a smoke test of the
script itself, not a GPU result).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def build_models(name: str, out: Path, int8_device: str) -> dict[str, Path]:
    from dlc.compiler.export_onnx import save, to_onnx
    from dlc.compiler.fp16 import to_fp16
    from dlc.compiler.frontend import load_model
    from dlc.compiler.metadata import finalize_metadata
    from dlc.compiler.pipeline import artifact_metadata
    from dlc.compiler.quantize import QuantOptions, quantize_int8

    yaml_path = ROOT / "examples" / f"{name}.yaml"
    loaded = load_model(yaml_path)
    fp32 = to_onnx(loaded.graph, opset=17, metadata=artifact_metadata(loaded, None))
    finalize_metadata(fp32)
    paths = {"fp32": out / "fp32.onnx", "fp16": out / "fp16.onnx", "int8": out / "int8.onnx"}
    save(fp32, paths["fp32"])
    fp16 = to_fp16(fp32)
    finalize_metadata(fp16, precision="fp16")
    save(fp16, paths["fp16"])
    log(f"int8: dlc quantize's search, timed on {int8_device} ...")
    result = quantize_int8(fp32, yaml_path, QuantOptions(device=int8_device, force=True, samples=64, threads=None,
                                                        min_time_s=0.5))
    save(result.model, paths["int8"])
    return paths


def check_device(device: str, paths: dict[str, Path], batches: list[int], min_time: float, out: Path) -> dict:
    from dlc.runtime.bench import bench
    from dlc.runtime.session import Session

    report: dict = {"device": device, "models": {}}
    for precision, path in paths.items():
        start = time.perf_counter()
        s = Session(path, device=device, trt_fp16=precision == "fp16", trt_cache=out / "trt_cache")
        report["models"][precision] = {"provider": s.provider, "placement": s.placement,
                                       "session_s": time.perf_counter() - start}
    r = bench(list(paths.values()), batches=batches, device=device, min_time_s=min_time, io_binding=True,
              trt_cache=out / "trt_cache")
    report["latency"] = [{"model": row.model, "batch": row.batch, "provider": row.provider, "min_ms": row.min_ms,
                          "p50_ms": row.p50_ms, "speedup_vs_fp32_min": row.speedup} for row in r.rows]
    report["warnings"] = r.warnings
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--devices", default="cuda,tensorrt")
    parser.add_argument("--batch", default="1,32")
    parser.add_argument("--min-time", type=float, default=2.0)
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "gpu_check")
    parser.add_argument("--allow-cpu", action="store_true", help="no GPU: run the steps on the CPU provider")
    args = parser.parse_args()

    import onnxruntime as ort

    from dlc.compiler.errors import DlcError
    from dlc.runtime.session import gpu_present

    devices = [d for d in args.devices.split(",") if d]
    if not gpu_present() or "CUDAExecutionProvider" not in ort.get_available_providers():
        if not args.allow_cpu:
            print(f"no GPU here (onnxruntime {ort.__version__}, providers {ort.get_available_providers()}): "
                  "run this on a GPU machine, or --allow-cpu to smoke-test the script", file=sys.stderr)
            return 2
        devices = ["cpu"]
    args.out.mkdir(parents=True, exist_ok=True)
    batches = [int(b) for b in args.batch.split(",")]
    summary = {"onnxruntime": ort.__version__, "model": args.model, "devices": []}
    try:
        paths = build_models(args.model, args.out, devices[0])
        for device in devices:
            log(f"{device}: sessions, placement, latency with and without host copies ...")
            summary["devices"].append(check_device(device, paths, batches, args.min_time, args.out))
    except DlcError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"onnxruntime {summary['onnxruntime']}, {args.model}")
    for d in summary["devices"]:
        print(f"\n{d['device']}:")
        for precision, m in d["models"].items():
            nodes = ", ".join(f"{k.removesuffix('ExecutionProvider')} {v}"
                              for k, v in ((m["placement"] or {}).get("nodes") or {}).items())
            print(f"  {precision:5} on {m['provider']} (session {m['session_s']:.1f} s; nodes {nodes}; "
                  f"Memcpy {(m['placement'] or {}).get('memcpy')})")
        for row in d["latency"]:
            print(f"  {row['model']:28} batch {row['batch']:3}  min {row['min_ms']:8.3f} ms  p50 {row['p50_ms']:8.3f} ms"
                  f"  x fp32 {row['speedup_vs_fp32_min']:.2f}")
        for w in d["warnings"]:
            print(f"  warning: {w}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
