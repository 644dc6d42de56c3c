"""Segmentation quality and the speed pruning buys: train examples/unet_small.yaml on the built-in synthetic
segmentation set, prune it 50 % (structured, L1) with fine-tuning, and measure both ONNX files side by side on
onnxruntime at batch 8 with their mIoU on the validation split.

    python benchmarks/segment_quality.py [--json] [--out build/segment_quality] [--fine-tune-epochs 8]
                                         [--lr 0.003] [--min-time 2]

Targets (issue 12): val mIoU >= 0.85 within 5 minutes of training on 2 cores; after 50 % pruning and
fine-tuning, mIoU within 0.02 of the baseline and onnxruntime >= 1.5x faster at batch 8 (ratio of minima).
Every step is a dlc command (compile, prune, bench) run with --json, so the numbers are what a user gets.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from dlc_cli import dlc, log  # benchmarks/ is on sys.path when a script runs

ROOT = Path(__file__).resolve().parent.parent
YAML = ROOT / "examples" / "unet_small.yaml"
TARGETS = {"miou": 0.85, "train_seconds": 300.0, "miou_drop": 0.02, "speedup_b8": 1.5}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "segment_quality")
    parser.add_argument("--fine-tune-epochs", type=int, default=8)
    parser.add_argument("--lr", type=float, default=0.003, help="fine-tuning learning rate")
    parser.add_argument("--min-time", type=float, default=2.0, help="seconds of runs per model in the bench")
    parser.add_argument("--reuse", action="store_true", help="reuse OUT/baseline when it holds this model's "
                                                             "finished training (dlc compile without --retrain)")
    args = parser.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)

    log(f"training {YAML.name} (dlc compile --retrain) ...")
    started = time.perf_counter()
    report = dlc("compile", YAML, "-o", out / "baseline", *([] if args.reuse else ["--retrain"]))
    wall = time.perf_counter() - started
    training = report["training"]
    if "reused" in training:
        log(f"  reused {training['reused']} (its training times are the original run's)")
    metrics = json.loads((out / "baseline" / "metrics.json").read_text())
    best = metrics["epochs"][(metrics["best_epoch"] or len(metrics["epochs"])) - 1]
    first_above = next((h for h in metrics["epochs"] if h["val_miou"] >= TARGETS["miou"]), None)
    to_target = (sum(h["seconds"] for h in metrics["epochs"][:first_above["epoch"]])
                 if first_above is not None else None)

    log(f"pruning 50 % (structured, L1) and fine-tuning {args.fine_tune_epochs} epochs ...")
    pruned = out / "pruned.onnx"
    prune = dlc("prune", YAML, "--weights", out / "baseline" / "checkpoint.safetensors", "-o", pruned,
                "--method", "structured", "--ratio", "0.5", "--fine-tune-epochs", args.fine_tune_epochs,
                "--lr", args.lr)

    log("benchmarking both on onnxruntime, batch 8 ...")
    bench = dlc("bench", out / "baseline" / "model.onnx", pruned, "--data", YAML, "--batch", "8",
                "--min-time", args.min_time)
    rows = {r["path"]: r for r in bench["rows"]}
    base_row, pruned_row = rows[str(out / "baseline" / "model.onnx")], rows[str(pruned)]
    evals = bench["evaluations"]
    result = {
        "machine": f"{os.cpu_count()} cores",
        "training": {"epochs": training["epochs"], "seconds": training["seconds"], "wall_seconds": wall,
                     "val_miou": best["val_miou"], "val_pixel_accuracy": best["val_pixel_accuracy"],
                     "val_mdice": best["val_mdice"], "val_loss": best["val_loss"],
                     "per_class_iou": {k: v["iou"] for k, v in best["per_class"].items()},
                     "seconds_to_target_miou": to_target},
        "pruning": {"params": [prune["before"]["params"], prune["after"]["params"]],
                    "macs": [prune["before"]["macs"], prune["after"]["macs"]],
                    "val_miou": [prune["before"]["val_accuracy"], prune["after"]["val_accuracy"]]},
        "bench_b8": {"baseline_min_ms": base_row["min_ms"], "pruned_min_ms": pruned_row["min_ms"],
                     "speedup_min": base_row["min_ms"] / pruned_row["min_ms"],
                     "speedup_median": base_row["p50_ms"] / pruned_row["p50_ms"],
                     "speedup_interval": pruned_row.get("speedup_interval"),
                     "onnx_miou": [e["accuracy"] for e in evals], "warnings": bench["warnings"]},
        "targets": TARGETS,
    }
    t, p, b = result["training"], result["pruning"], result["bench_b8"]
    result["met"] = {
        "miou": t["val_miou"] >= TARGETS["miou"],
        "train_seconds": to_target is not None and to_target <= TARGETS["train_seconds"],
        "miou_drop": p["val_miou"][0] - p["val_miou"][1] <= TARGETS["miou_drop"],
        "speedup_b8": b["speedup_min"] >= TARGETS["speedup_b8"],
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"U-Net ({YAML.name}), {result['machine']}")
    print(f"  trained      {t['epochs']} epochs in {t['seconds']:.1f} s: val mIoU {t['val_miou']:.4f} (target "
          f">= {TARGETS['miou']}, reached after {to_target if to_target is None else round(to_target, 1)} s), "
          f"pixel accuracy {t['val_pixel_accuracy']:.4f}, mDice {t['val_mdice']:.4f}")
    print("  per class    " + ", ".join(f"{k} {v:.3f}" for k, v in t["per_class_iou"].items()))
    print(f"  pruned 50 %  params {p['params'][0]:,} -> {p['params'][1]:,}, MACs ÷ {p['macs'][0] / p['macs'][1]:.2f}"
          f", val mIoU {p['val_miou'][0]:.4f} -> {p['val_miou'][1]:.4f} (drop target <= {TARGETS['miou_drop']})")
    print(f"  batch 8      {b['baseline_min_ms']:.2f} ms -> {b['pruned_min_ms']:.2f} ms: {b['speedup_min']:.2f}x by "
          f"minima ({b['speedup_median']:.2f}x by medians; target >= {TARGETS['speedup_b8']}x)")
    for w in b["warnings"]:
        print(f"  warning      {w}")
    print("  met          " + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in result["met"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
