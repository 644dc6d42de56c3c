"""Pruned vs baseline ResNet-20, measured (issue 5): does pruning make the model faster, and at what accuracy?

Steps, all through the `dlc` command line, in the output folder (default build/prune_bench):
  a) train ResNet-20 (examples/resnet20.yaml, synthetic shapes) with `dlc train`, or take --weights CKPT, and
     export the baseline with `dlc compile --weights`;
  b) 50 % structured filter pruning (L1) + fine-tuning: `dlc prune --method structured --ratio 0.5`;
  c) 90 % unstructured magnitude pruning + fine-tuning with a gradual (GMP) schedule: `dlc prune --method
     unstructured --ratio 0.9` on a copy of the YAML with `prune: {schedule: gmp}`;
  d) `dlc optimize` all three (fold BN, fuse, eliminate): the deployable files. The targets are judged on these;
     the raw exports are benchmarked beside them;
  e) `dlc bench` (Python API, same harness) on onnxruntime CPU with --threads 2 at batch 1 and 32, with accuracy
     on the YAML's validation split: the three optimized files, then the three raw ones;
  f) context: the structured model beside a hand-made half-width ResNet-20 (every `out` in model.layers halved
     but the last; untrained, timing only) at --threads and at one thread, so the pruned model's speed-up can be
     judged against what the same architecture built by hand gets on this machine now.

Prints the dlc bench tables, then a summary (also written to OUT/summary.json): accuracy, speed-ups (ratio of minima over interleaved runs, the
robust one the targets use, and ratio of medians), params / MACs / size, gzip-compressed sizes (what unstructured
sparsity buys), and PASS/FAIL against the targets: structured >= 1.5x at batch 1 and >= 1.8x at batch 32 with
accuracy within 1 point of the baseline; unstructured within 1 point.

    python benchmarks/prune_vs_baseline.py [--json] [--quick] [--out DIR] [--weights CKPT] [--fine-tune-epochs E]
        [--unstructured-epochs E] [--schedule gmp|oneshot] [--threads 2] [--min-time S]

--quick: 3 training epochs, 1 fine-tuning epoch each and shorter timing, a smoke run (targets may fail).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import zlib
from pathlib import Path

import yaml
from dlc_cli import dlc, log  # benchmarks/ is on sys.path when a script runs

ROOT = Path(__file__).resolve().parent.parent
YAML = ROOT / "examples/resnet20.yaml"
TARGETS = {"structured_b1": 1.5, "structured_b32": 1.8, "accuracy_drop_points": 1.0}


def prune_flags_ready() -> None:
    """Fine-tuning and unstructured pruning through `dlc prune` flags; say so plainly where they are missing."""
    help_text = subprocess.run([sys.executable, "-m", "dlc.compiler.cli", "prune", "--help"], cwd=ROOT,
                               capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"}).stdout
    missing = [f for f in ("--method", "--importance", "--fine-tune-epochs") if f not in help_text]
    if missing:
        raise SystemExit(f"`dlc prune` lacks {', '.join(missing)}: this benchmark needs pruning with fine-tuning")


def overlay(src: Path, dst: Path, **sections) -> Path:
    """A copy of the YAML with some sections updated (e.g. fewer epochs, a prune: section); relative data
    roots are made absolute so the copy loads from anywhere."""
    doc = yaml.safe_load(src.read_text())
    data = doc.get("data") or {}
    if data.get("root") and not Path(data["root"]).is_absolute():
        data["root"] = str((src.parent / data["root"]).resolve())
    for name, values in sections.items():
        doc[name] = {**(doc.get(name) or {}), **values}
    dst.write_text(yaml.safe_dump(doc, sort_keys=False))
    return dst


def half_width(src: Path, dst: Path) -> Path:
    """The hand-made comparison: every `out` in model.layers halved, except the last layer's (the classes)."""
    doc = yaml.safe_load(src.read_text())
    layers = doc["model"]["layers"]
    for layer in layers[:-1]:
        if isinstance(layer.get("out"), int):
            layer["out"] = max(1, layer["out"] // 2)
    doc.pop("train", None)
    dst.write_text(yaml.safe_dump(doc, sort_keys=False))
    return dst


def label_of_first(context: dict) -> str:
    return next(iter(context.values())).rows[0].model


def gzip_bytes(path: Path) -> int:
    return len(zlib.compress(path.read_bytes(), 9))


def ratio(rows: list[dict], name: str, base: str, batch: int) -> dict:
    by = {(r["model"], r["batch"]): r for r in rows}
    r, b = by[(name, batch)], by[(base, batch)]
    return {"min_ratio": b["min_ms"] / r["min_ms"], "median_ratio": b["p50_ms"] / r["p50_ms"],
            "paired_ratio": r["paired_ratio"]}  # the baseline is the first model of every bench here


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print everything as JSON")
    parser.add_argument("--quick", action="store_true", help="fewer epochs and shorter timing: a smoke run")
    parser.add_argument("--out", type=Path, default=ROOT / "build/prune_bench", help="working folder")
    parser.add_argument("--yaml", type=Path, default=YAML, help="model YAML (with data: and train:)")
    parser.add_argument("--difficulty", choices=("hard", "easy"), default="hard",
                        help="the synthetic set's data.difficulty (default hard: ResNet-20 lands near 90 %%, so an "
                        "accuracy drop shows; easy gives 100 %% to every model)")
    parser.add_argument("--weights", type=Path, help="use this trained checkpoint instead of training")
    parser.add_argument("--fine-tune-epochs", type=int, help="structured: fine-tuning epochs (default 3, quick 1)")
    parser.add_argument("--unstructured-epochs", type=int,
                        help="unstructured: fine-tuning epochs, over which GMP ramps the sparsity (default 6, quick 1)")
    parser.add_argument("--lr", type=float, help="fine-tuning learning rate (default: dlc prune's)")
    parser.add_argument("--schedule", choices=("gmp", "oneshot"), default="gmp",
                        help="unstructured sparsity schedule over the fine-tuning (default gmp)")
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads (default 2)")
    parser.add_argument("--min-time", type=float, help="seconds of timed runs per model and batch (default 4)")
    args = parser.parse_args()
    from dlc.runtime.bench import bench, bench_table

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    epochs = args.fine_tune_epochs if args.fine_tune_epochs is not None else (1 if args.quick else 3)
    # GMP reaches 90 % at 75 % of the fine-tuning: 3 epochs left 96.7 % here, 6 epochs (or one-shot + 3) 100 %
    u_epochs = args.unstructured_epochs if args.unstructured_epochs is not None else (1 if args.quick else 6)
    min_time = args.min_time if args.min_time is not None else (0.5 if args.quick else 4.0)
    prune_flags_ready()
    seconds: dict[str, float] = {}
    if (yaml.safe_load(args.yaml.read_text()).get("data") or {}).get("dataset") == "synthetic":
        args.yaml = overlay(args.yaml, out / f"{args.yaml.stem}_{args.difficulty}.yaml",
                            data={"difficulty": args.difficulty})

    # a) baseline
    t0 = time.perf_counter()
    if args.weights:
        ckpt, training = args.weights.resolve(), None
    else:
        train_yaml = overlay(args.yaml, out / "train.yaml", train={"epochs": 3}) if args.quick else args.yaml
        log(f"a) training {train_yaml} ...")
        training = dlc("train", train_yaml, "-o", out / "train")
        ckpt = out / "train/checkpoint.safetensors"
    seconds["train"] = time.perf_counter() - t0
    compiled = dlc("compile", args.yaml, "--weights", ckpt, "-o", out / "baseline")
    files = {"baseline": Path(compiled["onnx"]["path"]).resolve()}

    # b), c) pruning + fine-tuning
    lr = ["--lr", str(args.lr)] if args.lr else []
    log(f"b) structured pruning, ratio 0.5, L1, {epochs} fine-tuning epochs ...")
    t0 = time.perf_counter()
    reports = {"structured": dlc("prune", args.yaml, "--weights", ckpt, "--method", "structured", "--importance",
                                 "l1", "--ratio", "0.5", "--fine-tune-epochs", str(epochs), *lr,
                                 "-o", out / "structured.onnx")}
    seconds["structured"] = time.perf_counter() - t0
    log(f"c) unstructured pruning, 90 % magnitude, {args.schedule}, {u_epochs} fine-tuning epochs ...")
    t0 = time.perf_counter()
    gmp_yaml = overlay(args.yaml, out / "unstructured.yaml", prune={"method": "unstructured", "importance":
                                                                    "magnitude", "amount": 0.9,
                                                                    "schedule": args.schedule})
    reports["unstructured"] = dlc("prune", gmp_yaml, "--weights", ckpt, "--method", "unstructured", "--importance",
                                  "magnitude", "--ratio", "0.9", "--fine-tune-epochs", str(u_epochs), *lr,
                                  "-o", out / "unstructured.onnx")
    seconds["unstructured"] = time.perf_counter() - t0
    files["structured"], files["unstructured"] = out / "structured.onnx", out / "unstructured.onnx"

    # d) deployable files
    optimized = {}
    for name, path in list(files.items()):
        optimized[name] = out / f"{name}.opt.onnx"
        dlc("optimize", path, "-o", optimized[name])
    half_yaml = half_width(args.yaml, out / "halfwidth.yaml")
    dlc("compile", half_yaml, "--skip-train", "-o", out / "halfwidth")
    half = out / "halfwidth.opt.onnx"
    dlc("optimize", out / "halfwidth/model.onnx", "-o", half)

    # e) dlc bench of the deployable files, then of the raw exports; accuracy on the validation split
    names = list(files)
    results = {}
    for kind, src in (("optimized", optimized), ("raw", files)):
        log(f"e) dlc bench of the {kind} files, {args.threads} threads, batch 1 and 32 ...")
        results[kind] = bench([src[n] for n in names], [1, 32], device="cpu", min_time_s=min_time, data=args.yaml,
                              threads=args.threads)
    result = results["optimized"]
    log("f) context: structured vs a hand-made half-width model, at 2 threads and 1 thread ...")
    trio = [optimized["baseline"], optimized["structured"], half]
    context = {f"{args.threads} threads": bench(trio, [1, 32], device="cpu", min_time_s=min_time,
                                                threads=args.threads),
               "1 thread": bench(trio, [1], device="cpu", min_time_s=min_time, threads=1)}
    context_rows = {k: [{"model": r.model, "batch": r.batch, "min_ratio": r.speedup, "median_ratio": r.median_ratio,
                         "paired_ratio": r.paired_ratio, "min_ms": r.min_ms, "p50_ms": r.p50_ms}
                        for r in c.rows[1:] if r.model != c.rows[0].model] for k, c in context.items()}
    base_acc = result.evaluations[0]["accuracy"]
    models, speedups = {}, {}
    for kind, src in (("optimized", optimized), ("raw", files)):
        rows = [r.__dict__ for r in results[kind].rows]
        for n, ev in zip(names, results[kind].evaluations):
            row = next(r for r in rows if r["path"] == str(src[n]))
            models[f"{n} ({kind})"] = {"path": str(src[n]), "params": row["params"], "macs": row["macs"],
                                       "file_bytes": row["file_bytes"], "gzip_bytes": gzip_bytes(src[n]),
                                       "accuracy": ev["accuracy"], "val_loss": ev.get("loss"),
                                       "macro_f1": ev["macro_f1"]}
        labels = {r["path"]: r["model"] for r in rows}
        speedups[kind] = {n: {str(b): ratio(rows, labels[str(src[n])], labels[str(src["baseline"])], b)
                              for b in (1, 32)} for n in ("structured", "unstructured")}
    opt = speedups["optimized"]["structured"]
    drop = {n: 100 * (base_acc - models[f"{n} (optimized)"]["accuracy"]) for n in ("structured", "unstructured")}
    targets = [
        {"target": "structured speed-up, batch 1 (min ratio)", "value": opt["1"]["min_ratio"],
         "threshold": f">= {TARGETS['structured_b1']}", "pass": opt["1"]["min_ratio"] >= TARGETS["structured_b1"]},
        {"target": "structured speed-up, batch 32 (min ratio)", "value": opt["32"]["min_ratio"],
         "threshold": f">= {TARGETS['structured_b32']}", "pass": opt["32"]["min_ratio"] >= TARGETS["structured_b32"]},
        *({"target": f"{n} accuracy drop (points)", "value": drop[n], "threshold": "<= 1.0",
           "pass": drop[n] <= TARGETS["accuracy_drop_points"] and reports[n].get("fine_tuned", False)}
          for n in ("structured", "unstructured")),
    ]
    summary = {
        "settings": {"yaml": str(args.yaml), "threads": args.threads, "min_time_s": min_time, "quick": args.quick,
                     "fine_tune_epochs": {"structured": epochs, "unstructured": u_epochs},
                     "unstructured_schedule": args.schedule, "judged_on": "optimized (dlc optimize) files, ratio of minima",
                     "provider": result.rows[0].provider},
        "seconds": seconds, "training": training and training.get("final", {}).get("val_accuracy"),
        "prune_reports": reports, "models": models, "speedups": speedups, "context": context_rows,
        "targets": targets, "pass": all(t["pass"] for t in targets),
        "bench": {kind: r.to_dict() for kind, r in results.items()},
        "bench_context": {k: c.to_dict() for k, c in context.items()},
    }
    from dlc.compiler.atomic import write_json

    write_json(out / "summary.json", summary)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0

    from rich.console import Console

    console = Console(width=200)
    for kind, r in results.items():
        console.print(bench_table(r))
        for w in r.warnings:
            console.print(f"[yellow]warning:[/] {w}", highlight=False)
        print(f"  ({kind} files)\n")
    print(f"\nResNet-20 pruned vs baseline on onnxruntime CPU ({args.threads} threads); targets judged on the "
          "optimized files, speed-up = ratio of minima over interleaved runs")
    print(f"{'model':26} {'top-1 %':>8} {'val loss':>9} {'params':>9} {'MACs':>12} {'KiB':>8} {'gzip KiB':>9}")
    for name, m in models.items():
        loss = m["val_loss"] if m["val_loss"] is not None else float("nan")
        print(f"{name:26} {100 * m['accuracy']:>8.2f} {loss:>9.4f} {m['params']:>9,} {m['macs']:>12,} "
              f"{m['file_bytes'] / 1024:>8.1f} {m['gzip_bytes'] / 1024:>9.1f}")
    print(f"\n{'speed-up vs baseline':26} {'b1 min':>7} {'median':>7} {'paired':>7} {'b32 min':>8} {'median':>7} "
          f"{'paired':>7}")
    for kind, per in speedups.items():
        for n, s in per.items():
            cells = " ".join(f"{s[b][k]:>{w}.2f}x" for b in ("1", "32")
                             for k, w in (("min_ratio", 6 if b == "1" else 7), ("median_ratio", 6), ("paired_ratio", 6)))
            print(f"{n + ' (' + kind + ')':26} {cells}")
    print(f"\ncontext, same harness: speed-up vs {label_of_first(context)} (min / median / paired ratio)")
    for k, rows in context_rows.items():
        for r in rows:
            print(f"  {k:10} batch {r['batch']:>2}  {r['model']:22} {r['min_ratio']:.2f}x / {r['median_ratio']:.2f}x / "
                  f"{r['paired_ratio']:.2f}x")
    sizes = reports["unstructured"].get("sizes") or {}
    if sizes:
        print(f"\nunstructured: dense runtimes get no speed-up from zeros; compressed file "
              f"{sizes['dense_compressed'] / 1024:,.1f} -> {sizes['sparse_compressed'] / 1024:,.1f} KiB")
    print()
    for t in targets:
        print(f"{'PASS' if t['pass'] else 'FAIL'}  {t['target']}: {t['value']:.2f} (target {t['threshold']})")
    for n in ("structured", "unstructured"):
        if not reports[n].get("fine_tuned"):
            print(f"note  {n}: not fine-tuned ({'; '.join(reports[n].get('notes') or [])})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
