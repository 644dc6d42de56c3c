"""Deployment artifacts, measured: bundle sizes, cold start of .onnx against .ort, run.py's images/s against
dlc predict's, and NMS inside the model against the raw model + dlc's native NMS.

For LeNet-5 and the tiny detector (trained with dlc compile into OUT/<name> unless OUT/<name>/model.onnx
exists; about 5 s and 40 s on 2 cores):
  a) `dlc package` of the model (and, for the detector, of its --embed-nms export): bundle and unpacked sizes;
  b) cold start: onnxruntime session creation + first run, .onnx against the bundle's .ort, each in a fresh
     process (--cold-runs times, minimum and median);
  c) throughput on --images generated PNGs: the bundle's run.py (in its own process, dlc unimportable) against
     `dlc predict` in-process, both end to end (read, preprocess, run, post-process);
  d) the detector with NMS inside against raw + dlc's NMS (dlc bench --postprocess), batch 1 and 8, interleaved,
     --threads onnxruntime threads. Target: within 1.3x at batch 8.

    python benchmarks/deploy_bundle.py [--json] [--out DIR] [--images 64] [--cold-runs 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
MODELS = {"lenet5": ROOT / "examples/lenet5.yaml", "tiny_detector": ROOT / "examples/tiny_detector.yaml"}
NO_DLC = ("import runpy, sys; sys.modules['dlc'] = None; sys.argv = ['run.py'] + sys.argv[1:]; "
          "runpy.run_path('run.py', run_name='__main__')")
COLD = ("import sys, time; t = time.perf_counter(); import numpy as np, onnxruntime as ort; "
        "s = ort.InferenceSession(sys.argv[1], providers=['CPUExecutionProvider']); i = s.get_inputs()[0]; "
        "x = np.zeros([1] + [d if isinstance(d, int) else 1 for d in i.shape[1:]], np.float32); "
        "t1 = time.perf_counter(); s.run(None, {i.name: x}); t2 = time.perf_counter(); "
        "print(t1 - t, t2 - t)")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def trained(name: str, out: Path) -> Path:
    model = out / name / "model.onnx"
    if not model.exists():
        from dlc.compiler.pipeline import compile_model

        log(f"{name}: training with dlc compile into {model.parent} ...")
        compile_model(MODELS[name], model.parent)
    return model


def cold_start(path: Path, runs: int) -> dict:
    """Seconds from interpreter start of the import to the end of the first run (session creation included),
    in a fresh process each time."""
    totals, creates = [], []
    for _ in range(runs):
        proc = subprocess.run([sys.executable, "-c", COLD, str(path)], capture_output=True, text=True, check=True)
        create, total = map(float, proc.stdout.split())
        creates.append(create)
        totals.append(total)
    return {"min_s": min(totals), "median_s": statistics.median(totals), "create_min_s": min(creates)}


def make_images(folder: Path, n: int) -> list[Path]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        path = folder / f"img{i:03d}.png"
        Image.fromarray(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def throughput(bundle: Path, model: Path, images: list[Path], work: Path) -> dict:
    from dlc.compiler.bundle import safe_extract
    from dlc.runtime.predict import predict

    device = work / "device"
    device.mkdir()
    safe_extract(bundle, device)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", NO_DLC, *map(str, images), "--json", str(work / "out.json")],
                   cwd=device, capture_output=True, check=True)
    run_py = time.perf_counter() - start
    start = time.perf_counter()
    predict(model, images, device="cpu")
    dlc = time.perf_counter() - start
    return {"images": len(images), "run_py_images_per_s": len(images) / run_py,
            "dlc_predict_images_per_s": len(images) / dlc,
            "note": "run.py's time includes its interpreter and onnxruntime start; dlc predict's does not"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "deploy_bench")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--cold-runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--min-time", type=float, default=2.0)
    args = parser.parse_args()

    from dlc.compiler.artifact import embed_detector_nms
    from dlc.compiler.bundle import package
    from dlc.compiler.export_config import ExportConfig
    from dlc.compiler.export_onnx import save
    from dlc.compiler.onnx_io import load_onnx
    from dlc.runtime.bench import bench

    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        images = make_images(work / "images", args.images)
        for name in MODELS:
            model = trained(name, args.out)
            variants = {"raw": model}
            if name == "tiny_detector":
                nms_path = args.out / name / "model.nms.onnx"
                save(embed_detector_nms(load_onnx(model), ExportConfig(embed_nms=True), str(model)), nms_path)
                variants["embedded_nms"] = nms_path
            for variant, path in variants.items():
                log(f"{name} ({variant}): packaging, cold start, throughput ...")
                bundle = args.out / f"{name}.{variant}.tar.gz"
                manifest = package(path, bundle)
                unpacked = sum(f["bytes"] for f in manifest["files"].values())
                row = {"model": name, "variant": variant, "bundle_bytes": bundle.stat().st_size,
                       "unpacked_bytes": unpacked}
                with tempfile.TemporaryDirectory() as t2:
                    from dlc.compiler.bundle import safe_extract

                    safe_extract(bundle, Path(t2))
                    row["cold_start"] = {"onnx": cold_start(Path(t2) / "model.onnx", args.cold_runs),
                                         "ort": cold_start(Path(t2) / "model.ort", args.cold_runs)}
                    sub = work / f"{name}_{variant}"
                    sub.mkdir()
                    row["throughput"] = throughput(bundle, path, images, sub)
                results.append(row)
            if name == "tiny_detector":
                log("tiny_detector: embedded NMS against raw + dlc NMS, batch 1 and 8 ...")
                r = bench([variants["raw"], variants["embedded_nms"]], batches=(1, 8), device="cpu",
                          min_time_s=args.min_time, threads=args.threads, postprocess=True)
                nms_rows = {(row.model, row.batch): row for row in r.rows}
                ratio = {b: {"raw_plus_dlc_nms_min_ms": nms_rows[("model.onnx", b)].min_ms,
                             "embedded_min_ms": nms_rows[("model.nms.onnx", b)].min_ms,
                             "embedded_over_raw_min": nms_rows[("model.nms.onnx", b)].min_ms
                             / nms_rows[("model.onnx", b)].min_ms,
                             "embedded_over_raw_median": nms_rows[("model.nms.onnx", b)].p50_ms
                             / nms_rows[("model.onnx", b)].p50_ms} for b in (1, 8)}
                results.append({"model": name, "variant": "nms_comparison", "batches": ratio,
                                "target_batch8_within": 1.3,
                                "met": ratio[8]["embedded_over_raw_min"] <= 1.3})
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    for row in results:
        if row["variant"] == "nms_comparison":
            print(f"\n{row['model']}: NMS inside the model / (raw + dlc NMS), by minimum (median):")
            for b, v in row["batches"].items():
                print(f"  batch {b}: {v['embedded_min_ms']:.3f} ms vs {v['raw_plus_dlc_nms_min_ms']:.3f} ms = "
                      f"{v['embedded_over_raw_min']:.2f}x ({v['embedded_over_raw_median']:.2f}x)")
            print(f"  {'met' if row['met'] else 'MISSED'}: within 1.3x at batch 8")
            continue
        c, t = row["cold_start"], row["throughput"]
        print(f"\n{row['model']} ({row['variant']}): bundle {row['bundle_bytes'] / 1024:.0f} KiB "
              f"({row['unpacked_bytes'] / 1024:.0f} KiB unpacked)")
        print(f"  cold start (import + session + first run, min / median of {args.cold_runs}): "
              f".onnx {c['onnx']['min_s'] * 1e3:.0f} / {c['onnx']['median_s'] * 1e3:.0f} ms, "
              f".ort {c['ort']['min_s'] * 1e3:.0f} / {c['ort']['median_s'] * 1e3:.0f} ms")
        print(f"  {t['images']} images: run.py {t['run_py_images_per_s']:.0f} img/s (process start included), "
              f"dlc predict {t['dlc_predict_images_per_s']:.0f} img/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
