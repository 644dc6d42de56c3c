"""Does transfer learning help? Pretrain ResNet-20 on six of the synthetic shapes, then learn the six others from
a few images per class (5 by default): from the pretrained weights (head only, with the cached trunk; and
everything) against the same network from scratch, on the same budget. Also: seconds per epoch of head-only training with and without
`cache_features` on the frozen ResNet-20 trunk.

    python benchmarks/transfer.py [--json] [--out build/transfer] [--pretrain-epochs 8] [--epochs 15]
                                  [--per-class 5] [--batch 10] [--difficulty hard|easy]

Writes OUT/curves.png (validation accuracy per epoch of the three fine-tuning runs) and prints a table with the
ratios; `--json` prints the same as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
PRETRAIN_CLASSES = range(0, 6)  # disc, square, triangle, plus, ring, hbar
NEW_CLASSES = range(6, 12)  # vbar, diamond, x, half_disc, frame, dots


def write_folder(root: Path, images: np.ndarray, labels: np.ndarray, names: list[str], classes, per_class: int,
                 skip: int = 0) -> None:
    """`per_class` images of each class in `classes` (after skipping `skip` of each) as root/<name>/<i>.png."""
    from PIL import Image

    for k in classes:
        folder = root / names[k]
        folder.mkdir(parents=True, exist_ok=True)
        for i, j in enumerate(np.flatnonzero(labels == k)[skip:skip + per_class]):
            pixels = (np.clip(images[j].transpose(1, 2, 0), 0, 1) * 255).round().astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i:04d}.png")


def network(out: int) -> str:
    """examples/resnet20.yaml's model: section with `out` classes and no data/train sections."""
    text = (ROOT / "examples" / "resnet20.yaml").read_text()
    model = text[text.index("model:"):text.index("\ndata:")]
    return model.replace("{name: fc, type: linear, out: 10}", f"{{name: fc, type: linear, out: {out}}}")


def yaml(out: int, root: str, train: str, batch: int = 32) -> str:
    return (network(out) + f"\ndata: {{dataset: imagefolder, root: {root}}}\n"
            f"train:\n  solver: sgd\n  momentum: 0.9\n  weight_decay: 0.0005\n  batch_size: {batch}\n  seed: 1\n"
            f"{train}")


def run(path: Path, out: Path):
    from dlc.compiler.frontend import load_model
    from dlc.compiler.train.trainer import Trainer

    started = time.perf_counter()
    trainer = Trainer(load_model(path), out, progress=False)
    setup = time.perf_counter() - started
    result = trainer.run()
    return result, setup, trainer


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "build" / "transfer"))
    parser.add_argument("--pretrain-epochs", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=15, help="fine-tuning epochs (each run)")
    parser.add_argument("--per-class", type=int, default=5, help="training images per new class")
    parser.add_argument("--batch", type=int, default=10, help="fine-tuning batch size (each run)")
    parser.add_argument("--difficulty", choices=("hard", "easy"), default="hard",
                        help="the synthetic shapes' difficulty (default hard; on easy, 20 images per class "
                        "already take every run to 100 %%)")
    args = parser.parse_args()

    from dlc.compiler.data.synthetic import make_shapes

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    images, labels, names = make_shapes(12 * 400, 12, (3, 32, 32), seed=3, difficulty=args.difficulty)
    data = f"data-{args.difficulty}"
    new = f"{data}/new{args.per_class}"
    if not (out / data / "pretrain").exists():
        write_folder(out / data / "pretrain" / "train", images, labels, names, PRETRAIN_CLASSES, 250)
        write_folder(out / data / "pretrain" / "val", images, labels, names, PRETRAIN_CLASSES, 50, skip=250)
    if not (out / new).exists():
        write_folder(out / new / "train", images, labels, names, NEW_CLASSES, args.per_class)
        write_folder(out / new / "val", images, labels, names, NEW_CLASSES, 100, skip=250)

    say = (lambda *a: None) if args.json else (lambda *a: print(*a, file=sys.stderr, flush=True))
    # 1. pretraining on the first six shapes
    (out / "pretrain.yaml").write_text(yaml(6, f"{data}/pretrain", f"  base_lr: 0.1\n  lr_policy: cosine\n"
                                            f"  epochs: {args.pretrain_epochs}\n  warmup: {{epochs: 1}}\n"))
    say(f"pretraining ResNet-20 on {', '.join(names[k] for k in PRETRAIN_CLASSES)} ...")
    pre, _, _ = run(out / "pretrain.yaml", out / "pretrained")
    say(f"  val accuracy {pre.final['val_accuracy']:.3f} after {len(pre.history)} epochs ({pre.seconds:.0f} s)")

    # 2. the six new shapes from a few images each, three ways, the same budget
    common = f"  lr_policy: cosine\n  epochs: {args.epochs}\n"
    setups = {
        # the classifier's rows meant the old shapes: it starts afresh (reinit), as in any real transfer
        "transfer_head": "  init_from: pretrained/checkpoint.safetensors\n  transfer: head\n  reinit: [fc]\n"
                         "  cache_features: true\n  base_lr: 0.05\n",
        "transfer_full": "  init_from: pretrained/checkpoint.safetensors\n  transfer: full\n  reinit: [fc]\n"
                         "  base_lr: 0.01\n",
        "scratch": "  base_lr: 0.05\n",
    }
    runs = {}
    for name, train in setups.items():
        (out / f"{name}.yaml").write_text(yaml(6, new, train + common, args.batch))
        say(f"fine-tuning: {name} ...")
        result, setup, trainer = run(out / f"{name}.yaml", out / name)
        runs[name] = {"val_accuracy": [h["val_accuracy"] for h in result.history],
                      "final_val_accuracy": result.final["val_accuracy"], "best_val_accuracy":
                      max(h["val_accuracy"] for h in result.history), "seconds": result.seconds + setup,
                      "transfer": trainer.transfer_report and {k: trainer.transfer_report[k]
                                                               for k in ("transferred", "tensors")}}
        say(f"  final val accuracy {runs[name]['final_val_accuracy']:.3f} ({runs[name]['seconds']:.1f} s)")

    # 3. head-only epochs on the pretraining-sized set, with and without the cached trunk
    speed = {}
    for cached in (False, True):
        train = ("  init_from: pretrained/checkpoint.safetensors\n  transfer: head\n  base_lr: 0.05\n  epochs: 2\n"
                 + ("  cache_features: true\n" if cached else ""))
        (out / f"speed_{cached}.yaml").write_text(yaml(6, f"{data}/pretrain", train))
        result, setup, _ = run(out / f"speed_{cached}.yaml", out / f"speed_{cached}")
        speed["cached" if cached else "uncached"] = {
            "seconds_per_epoch": float(np.mean([h["seconds"] for h in result.history])), "setup_seconds": setup,
            "images": 1500}
    speed["speedup_per_epoch"] = speed["uncached"]["seconds_per_epoch"] / speed["cached"]["seconds_per_epoch"]

    summary = {"pretrain": {"classes": [names[k] for k in PRETRAIN_CLASSES], "val_accuracy": pre.final["val_accuracy"],
                            "epochs": len(pre.history), "seconds": pre.seconds},
               "new_classes": [names[k] for k in NEW_CLASSES], "train_images_per_class": args.per_class,
               "difficulty": args.difficulty,
               "fine_tune_epochs": args.epochs, "fine_tune_batch": args.batch,
               "fine_tune": runs, "head_only_epoch_speed": speed,
               "transfer_over_scratch": {k: runs[k]["final_val_accuracy"] / max(runs["scratch"]["final_val_accuracy"],
                                                                                1e-9)
                                         for k in ("transfer_head", "transfer_full")}}
    _plot(runs, out / "curves.png", args.per_class)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"pretrained on {', '.join(summary['pretrain']['classes'])}: val accuracy "
          f"{pre.final['val_accuracy']:.3f}")
    print(f"new classes {', '.join(summary['new_classes'])}, {args.per_class} training images each, "
          f"{args.epochs} epochs per run:")
    print(f"{'run':15} {'final acc':>9} {'best acc':>9} {'seconds':>8} {'vs scratch':>10}")
    for name, r in runs.items():
        ratio = r["final_val_accuracy"] / max(runs["scratch"]["final_val_accuracy"], 1e-9)
        print(f"{name:15} {r['final_val_accuracy']:>9.3f} {r['best_val_accuracy']:>9.3f} {r['seconds']:>8.1f} "
              f"{ratio:>9.2f}x")
    print(f"head-only epoch on 1,500 images: {speed['uncached']['seconds_per_epoch']:.2f} s without the feature "
          f"cache, {speed['cached']['seconds_per_epoch']:.3f} s with it ({speed['speedup_per_epoch']:.0f}x; the "
          f"cache itself took {speed['cached']['setup_seconds'] - speed['uncached']['setup_seconds']:.1f} s once)")
    print(f"curves: {out / 'curves.png'}")
    return 0


def _plot(runs, path: Path, per_class: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    labels = {"transfer_head": "pretrained, head only (cached trunk)", "transfer_full": "pretrained, all layers",
              "scratch": "from scratch"}
    for name, r in runs.items():
        ax.plot(range(1, len(r["val_accuracy"]) + 1), [100 * a for a in r["val_accuracy"]], marker="o",
                label=labels[name])
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"ResNet-20 on 6 new shapes, {per_class} images per class")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
