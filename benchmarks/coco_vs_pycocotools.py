"""COCO bbox evaluation: dlc's coco_evaluate against pycocotools' COCOeval on one COCO-sized synthetic set, side by
side in one run, with every statistic and the whole precision and recall arrays compared; and `dlc eval --gt
--pred` end to end on the same set written as JSON files.

    python benchmarks/coco_vs_pycocotools.py [--images 5000] [--categories 80] [--seed 0] [--repeats 1] [--json]

The set has what COCOeval distinguishes: crowd boxes, images without ground truth, all three area ranges,
integer boxes (tied IoUs), scores rounded to 2 decimals (tied scores) and images with more than 100
detections (so maxDets cuts). Each side is timed on parsed inputs (dicts in memory): index building, evaluate,
accumulate and summarize. Needs pycocotools (in the dev extra).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def synthetic_coco(images: int, categories: int, seed: int) -> tuple[dict, list[dict]]:
    """About 3.5 ground-truth boxes and 79 detections per image, 10 % of images without ground truth."""
    rng = np.random.default_rng(seed)
    cat_ids = list(range(1, categories + 1))
    image_list = [{"id": i + 1, "width": 640, "height": 480} for i in range(images)]
    anns, dets = [], []
    for img in image_list:
        n_gt = 0 if rng.random() < 0.1 else int(rng.integers(1, 7))
        gts = []
        for _ in range(n_gt):
            w, h = np.exp(rng.uniform(np.log(4), np.log(300), 2))
            x, y = rng.uniform(0, 400, 2)
            box = [float(x), float(y), float(w), float(h)]
            if rng.random() < 0.3:
                box = [float(round(v)) for v in box]
            ann = {"id": len(anns) + 1, "image_id": img["id"], "category_id": int(rng.choice(cat_ids)),
                   "bbox": box, "area": box[2] * box[3], "iscrowd": int(rng.random() < 0.05)}
            anns.append(ann)
            gts.append(ann)
        n_det = int(rng.integers(150, 250)) if rng.random() < 0.1 else int(rng.integers(40, 90))
        for _ in range(n_det):
            if gts and rng.random() < 0.5:
                g = gts[int(rng.integers(len(gts)))]
                b = g["bbox"]
                jitter = rng.normal(0, 0.08, 4) * np.array([b[2], b[3], b[2], b[3]])
                box = [b[0] + jitter[0], b[1] + jitter[1], max(b[2] + jitter[2], 1.0), max(b[3] + jitter[3], 1.0)]
                cat = g["category_id"] if rng.random() < 0.8 else int(rng.choice(cat_ids))
                score = 0.3 + 0.7 * rng.random()
            else:
                box = [*rng.uniform(0, 400, 2), *np.exp(rng.uniform(np.log(3), np.log(250), 2))]
                cat, score = int(rng.choice(cat_ids)), 0.7 * rng.random()
            dets.append({"image_id": img["id"], "category_id": cat, "bbox": [float(v) for v in box],
                         "score": round(float(score), 2)})
    gt = {"images": image_list, "annotations": anns,
          "categories": [{"id": c, "name": f"cat{c}"} for c in cat_ids]}
    return gt, dets


def run_pycocotools(gt: dict, dets: list[dict]):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = gt
        coco.createIndex()
        ev = COCOeval(coco, coco.loadRes(dets), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--categories", type=int, default=80)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per side (the minimum is reported)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    try:
        import pycocotools  # noqa: F401
    except ImportError:
        raise SystemExit("pycocotools is not installed: pip install pycocotools (it is in the dev extra)") from None
    from dlc.runtime.coco import coco_evaluate

    gt, dets = synthetic_coco(args.images, args.categories, args.seed)
    print(f"{len(gt['images'])} images, {len(gt['categories'])} categories, {len(gt['annotations'])} ground-truth "
          f"boxes, {len(dets)} detections", file=sys.stderr)
    dlc_times, ref_times = [], []
    for _ in range(args.repeats):  # interleaved, each on its own copy (pycocotools changes what it is given)
        g, d = copy.deepcopy(gt), copy.deepcopy(dets)
        t = time.perf_counter()
        ours = coco_evaluate(g, d)
        dlc_times.append(time.perf_counter() - t)
        g, d = copy.deepcopy(gt), copy.deepcopy(dets)
        t = time.perf_counter()
        ref = run_pycocotools(g, d)
        ref_times.append(time.perf_counter() - t)
    stats_diff = float(np.max(np.abs(np.asarray(ours.stats) - np.asarray(ref.stats))))
    precision_diff = float(np.max(np.abs(ours.precision - ref.eval["precision"])))
    recall_diff = float(np.max(np.abs(ours.recall - ref.eval["recall"])))
    with tempfile.TemporaryDirectory() as tmp:
        gt_path, dt_path = Path(tmp) / "gt.json", Path(tmp) / "dt.json"
        gt_path.write_text(json.dumps(gt))
        dt_path.write_text(json.dumps(dets))
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "dlc.compiler.cli", "eval", "--gt", str(gt_path), "--pred",
                               str(dt_path), "--json"], capture_output=True, text=True, cwd=ROOT)
        cli_seconds = time.perf_counter() - t
        if proc.returncode != 0:
            raise SystemExit(proc.stderr[-2000:])
    result = {"images": len(gt["images"]), "categories": len(gt["categories"]), "ground_truth": len(gt["annotations"]),
              "detections": len(dets), "dlc_seconds": min(dlc_times), "pycocotools_seconds": min(ref_times),
              "speedup": min(ref_times) / min(dlc_times), "max_abs_diff": {"stats": stats_diff,
                                                                             "precision": precision_diff,
                                                                             "recall": recall_diff},
              "identical": stats_diff == 0 and precision_diff == 0 and recall_diff == 0,
              "dlc_eval_cli_seconds": cli_seconds, "threads": os.environ.get("OMP_NUM_THREADS"),
              "ap": ours.stats[0]}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"coco_evaluate {result['dlc_seconds']:.2f} s, pycocotools COCOeval {result['pycocotools_seconds']:.2f} s: "
          f"{result['speedup']:.1f}x")
    print(f"largest difference: stats {stats_diff:.1e}, precision {precision_diff:.1e}, recall {recall_diff:.1e}"
          f" ({'identical' if result['identical'] else 'NOT identical'}); AP@[.5:.95] {ours.stats[0]:.4f}")
    print(f"dlc eval --gt gt.json --pred dt.json (end to end, JSON parsing included): {cli_seconds:.1f} s")
    return 0 if result["identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
