"""dlc's INT8 against fp32 and against the peer (plain onnxruntime quantize_static), measured side by side.

For the ResNet-20 example (examples/resnet20.yaml) and the tiny detector (examples/tiny_detector.yaml):
  a) train and export each with dlc.compiler.pipeline.compile_model into OUT/<name> (README: about 95 s and 45 s
     on an idle 2-core machine), or reuse OUT/<name>/model.onnx when its report says it was trained from the
     same YAML (--retrain to train again);
  b) dlc's INT8: dlc.compiler.quantize.quantize_int8 (calibration on the training split, the format chosen by
     measurement, layers kept float if the accuracy bound needs it), written to OUT/<name>/model.int8.onnx;
  c) the peer: onnxruntime's documented flow with defaults — quant_pre_process, then quantize_static (QDQ, S8S8,
     per-tensor, MinMax, every op type it knows) — on the SAME calibration images dlc used;
  d) accuracy (top-1, or mAP@0.5 for the detector) of fp32, dlc and the peer on the validation split
     (runtime/evaluate.py), and latency of the three interleaved run by run (runtime/bench.py's harness) on the
     onnxruntime CPU provider at --threads (2) and batch 1 and 32: ratio of minima (the targets') and of medians.
     The three share one onnxruntime thread pool while timing, in a process of their own (as in dlc's own
     search; runtime/bench_isolated.py): with a pool each, the session that just ran keeps its threads spinning
     on the cores the next one needs.

Targets for dlc's INT8: at least as accurate as the peer and faster than it at both batch sizes; within 1 point
of fp32 (mAP within 0.02); file >= 3.5x smaller; >= 2.5x faster than fp32 at batch 32 and >= 1.5x at batch 1 by
ratio of minima. Prints a table and met/MISSED per target; --json prints everything; OUT/summary.json keeps it.

    python benchmarks/quantize_vs_fp32.py [--json] [--quick] [--out DIR] [--threads 2] [--min-time S]
        [--samples N] [--retrain] [--models resnet20,tiny_detector]

--quick: 2 training epochs into OUT/quick, 64 calibration samples and short timing: proves the pipeline runs
(accuracy and speed targets may then be missed). Run the real one on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
MODELS = {"resnet20": ROOT / "examples/resnet20.yaml", "tiny_detector": ROOT / "examples/tiny_detector.yaml"}
TARGETS = {"b1_min_ratio": 1.5, "b32_min_ratio": 2.5, "size_ratio": 3.5, "accuracy_points": 1.0, "map_drop": 0.02}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def quick_yaml(src: Path, out_dir: Path, epochs: int | None, difficulty: str | None = None) -> Path:
    """A copy of the example with fewer epochs (--quick) and the synthetic set's difficulty; relative data roots
    made absolute."""
    doc = yaml.safe_load(src.read_text())
    data = doc.get("data") or {}
    for key in ("root", "images", "annotations", "val_images", "val_annotations"):
        if data.get(key) and not Path(data[key]).is_absolute():
            data[key] = str((src.parent / data[key]).resolve())
    if epochs is not None:
        doc["train"] = {**doc.get("train", {}), "epochs": epochs}
        doc["train"].pop("early_stopping", None)
    if difficulty and data.get("dataset") == "synthetic":
        data["difficulty"] = difficulty
    dst = out_dir / src.name
    out_dir.mkdir(parents=True, exist_ok=True)
    dst.write_text(yaml.safe_dump(doc, sort_keys=False))
    return dst


def trained(yaml_path: Path, out_dir: Path, retrain: bool) -> tuple[Path, dict]:
    """OUT/<name>/model.onnx trained from yaml_path: reused when its report matches the YAML, else trained."""
    from dlc.compiler.frontend import load_model
    from dlc.compiler.pipeline import compile_model

    report_path = out_dir / "report.json"
    sha = load_model(yaml_path).spec.sha256
    if not retrain and report_path.is_file():
        report = json.loads(report_path.read_text())
        training = report.get("training") or {}
        if report.get("yaml_sha256") == sha and training.get("stopped") and (out_dir / "model.onnx").is_file():
            log(f"{yaml_path.name}: reusing the model trained in {out_dir} ({training.get('seconds', 0):.0f} s then)")
            return out_dir / "model.onnx", training
    log(f"{yaml_path.name}: training and exporting into {out_dir} ...")
    result = compile_model(yaml_path, out_dir)
    return result.onnx_path, result.report["training"]


def peer_quantize(fp32_path: Path, out_path: Path, cal) -> float:
    """The peer: quant_pre_process + quantize_static with its defaults, on dlc's calibration images."""
    from onnxruntime.quantization import quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from dlc.compiler.quantize.formats import quiet_ort

    started = time.perf_counter()
    pre = out_path.with_name("peer_pre.onnx")
    with quiet_ort():
        quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True)
        quantize_static(str(pre), str(out_path), cal.reader())
    pre.unlink()
    return time.perf_counter() - started


def run_model(name: str, yaml_path: Path, out_dir: Path, args) -> dict:
    import onnx

    from dlc.compiler.quantize import QuantOptions, QuantRefused, quantize_int8, write_artifact
    from dlc.compiler.quantize.calibration import calibration_set, data_spec
    from dlc.runtime.bench import bench
    from dlc.runtime.bench_isolated import bench_isolated
    from dlc.runtime.evaluate import Evaluator
    from dlc.runtime.session import Session

    fp32_path, training = trained(yaml_path, out_dir, args.retrain)
    model = onnx.load(str(fp32_path))
    options = QuantOptions(samples=args.samples, threads=args.threads, min_time_s=args.min_time)
    log(f"{name}: dlc quantize (format search, {args.samples} calibration samples) ...")
    started = time.perf_counter()
    try:
        result = quantize_int8(model, yaml_path, options, source=str(fp32_path))
    except QuantRefused as exc:  # a measured outcome, reported as such
        return {"model": name, "refused": str(exc), "report": exc.result.to_dict()}
    dlc_seconds = time.perf_counter() - started
    dlc_path, _ = write_artifact(result, out_dir / "model.int8.onnx")
    cal = calibration_set(model, data_spec(yaml_path, str(yaml_path)), args.samples)  # the same images
    peer_path = out_dir / "model.peer_int8.onnx"
    peer_seconds = peer_quantize(fp32_path, peer_path, cal)
    evaluator = Evaluator(yaml_path)
    scores = {k: evaluator.evaluate(Session(p, device="cpu")) for k, p in
              (("fp32", fp32_path), ("dlc", dlc_path), ("peer", peer_path))}
    log(f"{name}: timing fp32, dlc and peer interleaved at batch 1 and 32 ({args.threads} threads) ...")
    sides = [fp32_path, dlc_path, peer_path]
    if args.own_threads:
        timing = bench(sides, [1, 32], device="cpu", min_time_s=args.min_time * 2, threads=args.threads)
    else:
        timing = bench_isolated(sides, [1, 32], device="cpu", min_time_s=args.min_time * 2, threads=args.threads)
    rows = {(Path(r.path).name, r.batch): r for r in timing.rows}
    sides = {"fp32": fp32_path.name, "dlc": dlc_path.name, "peer": peer_path.name}
    lat = {side: {b: {"min_ms": rows[(f, b)].min_ms, "p50_ms": rows[(f, b)].p50_ms} for b in (1, 32)}
           for side, f in sides.items()}
    sizes = {side: p.stat().st_size for side, p in (("fp32", fp32_path), ("dlc", dlc_path), ("peer", peer_path))}
    detector = scores["fp32"].task == "detection"
    out = {
        "model": name, "metric": scores["fp32"].metric, "training": training,
        "chosen": result.chosen.candidate.label, "excluded_layers": result.excluded,
        "float_tail_nodes": len(result.float_tail),
        "seconds": {"dlc_quantize": dlc_seconds, "peer_quantize": peer_seconds},
        "score": {k: v.accuracy for k, v in scores.items()},
        "val_loss": {k: v.loss for k, v in scores.items()},  # classification: cross-entropy beside top-1
        "size_bytes": sizes, "latency": lat,
        "ratios": {side: {b: {"min": lat["fp32"][b]["min_ms"] / lat[side][b]["min_ms"],
                               "median": lat["fp32"][b]["p50_ms"] / lat[side][b]["p50_ms"]} for b in (1, 32)}
                   for side in ("dlc", "peer")},
        "size_ratio": {side: sizes["fp32"] / sizes[side] for side in ("dlc", "peer")},
        "candidates": [c.to_dict() for c in result.candidates],
    }
    out["targets"] = judge(out, detector)
    return out


def judge(r: dict, detector: bool) -> list[dict]:
    s, ratios = r["score"], r["ratios"]
    drop = s["fp32"] - s["dlc"]
    within = (drop <= TARGETS["map_drop"] + 1e-9) if detector else (100 * drop <= TARGETS["accuracy_points"] + 1e-9)
    rows = [
        ("as accurate as the peer", s["dlc"] >= s["peer"] - 1e-12, f"{_score(s['dlc'], detector)} vs peer "
         f"{_score(s['peer'], detector)}"),
        ("faster than the peer (min, b1 and b32)",
         all(r["latency"]["dlc"][b]["min_ms"] < r["latency"]["peer"][b]["min_ms"] for b in (1, 32)),
         ", ".join(f"b{b} {r['latency']['peer'][b]['min_ms'] / r['latency']['dlc'][b]['min_ms']:.2f}x" for b in (1, 32))),
        ("mAP within 0.02 of fp32" if detector else "within 1 point of fp32", within,
         f"{_score(s['fp32'], detector)} -> {_score(s['dlc'], detector)}"),
        (f">= {TARGETS['size_ratio']}x smaller file", r["size_ratio"]["dlc"] >= TARGETS["size_ratio"],
         f"{r['size_ratio']['dlc']:.2f}x"),
        (f">= {TARGETS['b32_min_ratio']}x at batch 32 (min)", ratios["dlc"][32]["min"] >= TARGETS["b32_min_ratio"],
         f"{ratios['dlc'][32]['min']:.2f}x (median {ratios['dlc'][32]['median']:.2f}x)"),
        (f">= {TARGETS['b1_min_ratio']}x at batch 1 (min)", ratios["dlc"][1]["min"] >= TARGETS["b1_min_ratio"],
         f"{ratios['dlc'][1]['min']:.2f}x (median {ratios['dlc'][1]['median']:.2f}x)"),
    ]
    return [{"target": t, "met": bool(ok), "measured": m} for t, ok, m in rows]


def _score(x: float, detector: bool) -> str:
    return f"mAP {x:.3f}" if detector else f"{100 * x:.2f} %"


def print_report(results: list[dict], args) -> None:
    print(f"INT8 vs fp32 on onnxruntime CPU, {args.threads} threads; ratios fp32/int8 by minimum (median) over "
          "interleaved runs" + (" [--quick: smoke run]" if args.quick else ""))
    for r in results:
        if "refused" in r:
            print(f"\n{r['model']}: dlc refused: {r['refused']}")
            continue
        det = r["metric"] != "accuracy"
        print(f"\n{r['model']}  (dlc chose {r['chosen']}; layers kept float: {', '.join(r['excluded_layers']) or 'none'}"
              f"; float post-processing nodes: {r['float_tail_nodes']})")
        print(f"  {'':6} {'score':>12} {'val loss':>9} {'KiB':>9} {'size x':>7} {'b1 min ms':>10} {'b1 x':>15} {'b32 min ms':>11} "
              f"{'b32 x':>15}")
        for side in ("fp32", "dlc", "peer"):
            lat = r["latency"][side]
            size = r["size_bytes"][side]
            if side == "fp32":
                ratio1 = ratio32 = "1.00x"
                sx = "1.00x"
            else:
                q = r["ratios"][side]
                ratio1 = f"{q[1]['min']:.2f}x ({q[1]['median']:.2f}x)"
                ratio32 = f"{q[32]['min']:.2f}x ({q[32]['median']:.2f}x)"
                sx = f"{r['size_ratio'][side]:.2f}x"
            loss = r["val_loss"][side]
            print(f"  {side:6} {_score(r['score'][side], det):>12} {'' if loss is None else f'{loss:.4f}':>9} "
                  f"{size / 1024:>9.1f} {sx:>7} "
                  f"{lat[1]['min_ms']:>10.3f} {ratio1:>15} {lat[32]['min_ms']:>11.3f} {ratio32:>15}")
        for t in r["targets"]:
            print(f"  {'met   ' if t['met'] else 'MISSED'}  {t['target']}: {t['measured']}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--quick", action="store_true", help="2 epochs, 64 samples, short timing: a smoke run")
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "quantize_bench")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--min-time", type=float, default=None, help="seconds per finalist and batch (default 1)")
    parser.add_argument("--samples", type=int, default=None, help="calibration samples (default 256)")
    parser.add_argument("--own-threads", action="store_true",
                        help="time with a thread pool per session (onnxruntime's default) instead of one shared "
                        "pool; interleaved sessions then slow each other")
    parser.add_argument("--retrain", action="store_true", help="train again even if OUT holds a trained model")
    parser.add_argument("--difficulty", choices=("hard", "easy"), default="hard",
                        help="ResNet-20's synthetic set (default hard: near 90 %% top-1, so a drop shows)")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated: " + ", ".join(MODELS))
    args = parser.parse_args()
    args.min_time = args.min_time if args.min_time is not None else (0.2 if args.quick else 1.0)
    args.samples = args.samples or (64 if args.quick else 256)
    out_root = args.out / "quick" if args.quick else args.out
    results = []
    started = time.perf_counter()
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        if name not in MODELS:
            raise SystemExit(f"unknown model '{name}': use {', '.join(MODELS)}")
        yaml_path = quick_yaml(MODELS[name], out_root / name, 2 if args.quick else None, args.difficulty)
        results.append(run_model(name, yaml_path, out_root / name, args))
    summary = {"threads": args.threads, "quick": args.quick, "min_time_s": args.min_time, "samples": args.samples,
               "seconds": time.perf_counter() - started, "targets": TARGETS, "results": results}
    from dlc.compiler.atomic import write_json

    write_json(out_root / "summary.json", summary)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print_report(results, args)
        print(f"\n({summary['seconds']:.0f} s; summary in {out_root / 'summary.json'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
