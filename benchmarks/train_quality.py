"""Train the example models end to end with `dlc train` semantics and report accuracy and wall time.

    python benchmarks/train_quality.py [--models lenet5,resnet20] [--json]

Targets (issue 3): LeNet-5 on digits >= 97 % validation accuracy in <= 60 s on 2 cores; ResNet-20 on the
synthetic set >= 95 %.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGETS = {"lenet5": (0.97, 60.0), "resnet20": (0.95, None)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="lenet5,resnet20")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from dlc.compiler.frontend import load_model
    from dlc.compiler.train.trainer import train_model

    rows = []
    for name in args.models.split(","):
        started = time.perf_counter()
        loaded = load_model(ROOT / "examples" / f"{name}.yaml")
        with tempfile.TemporaryDirectory() as out:
            result = train_model(loaded, out, progress=False)
        seconds = time.perf_counter() - started
        acc_target, time_target = TARGETS.get(name, (None, None))
        final = result.final
        rows.append({
            "model": name, "epochs": len(result.history), "val_accuracy": final["val_accuracy"],
            "val_loss": final["val_loss"], "seconds": seconds,
            "images_per_s": sum(h["images_per_s"] for h in result.history) / len(result.history),
            "accuracy_target": acc_target, "seconds_target": time_target,
            "meets_target": (acc_target is None or final["val_accuracy"] >= acc_target)
            and (time_target is None or seconds <= time_target),
        })
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(f"{'model':10} {'epochs':>6} {'val acc':>8} {'seconds':>8} {'img/s':>7}  target")
        for r in rows:
            target = f">= {r['accuracy_target']:.0%}" if r["accuracy_target"] else ""
            if r["seconds_target"]:
                target += f" in <= {r['seconds_target']:.0f} s"
            print(f"{r['model']:10} {r['epochs']:>6} {r['val_accuracy']:>8.4f} {r['seconds']:>8.1f} "
                  f"{r['images_per_s']:>7.0f}  {target} {'met' if r['meets_target'] else 'MISSED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
