"""Detection data timings: building the synthetic set, a loader epoch with box-aware augmentation, and k-means
anchors over its boxes (with how well they fit). Prints the best of --repeats runs; not a test.

    python benchmarks/det_data.py [--samples 2000] [--size 64] [--repeats 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from dlc.compiler.data.augment import AugmentConfig
from dlc.compiler.data.detection import DetectionLoader, make_detection_shapes
from dlc.compiler.detect.anchors import anchor_fit, kmeans_anchors


def best_of(repeats: int, fn) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    shape = (3, args.size, args.size)
    t_make, data = best_of(args.repeats, lambda: make_detection_shapes(args.samples, 3, shape, seed=0))
    loader = DetectionLoader(data, 64, [0.5] * 3, [0.25] * 3,
                             augment_cfg=AugmentConfig(mirror=True, crop_pad=1, pca_color=0.1))
    t_epoch, _ = best_of(args.repeats, lambda: sum(len(t) for _, t in loader.epoch(0)))
    boxes = np.concatenate(data.boxes)
    wh = boxes[:, 2:] - boxes[:, :2]
    t_kmeans, (anchors, _) = best_of(args.repeats, lambda: kmeans_anchors(wh, 9, seed=0))
    fit = anchor_fit(wh, anchors)
    result = {
        "images": args.samples, "shape": list(shape), "boxes": int(len(wh)),
        "synthetic_s": round(t_make, 3),
        "loader_epoch_s": round(t_epoch, 3), "loader_images_per_s": round(len(loader) * 64 / t_epoch),
        "kmeans9_s": round(t_kmeans, 3), "mean_best_iou": round(fit["mean_best_iou"], 4),
        "recall_at_0.5": round(fit["recall_at_0.5"], 4), "anchors": np.round(anchors, 1).tolist(),
    }
    if args.json:
        print(json.dumps(result))
        return
    print(f"synthetic_detection {args.samples}×{shape}: {t_make:.3f} s ({len(wh)} boxes)")
    print(f"loader epoch (batch 64, mirror + crop + pca_color): {t_epoch:.3f} s, "
          f"{result['loader_images_per_s']} images/s")
    print(f"k-means, 9 anchors: {t_kmeans:.3f} s; mean best IoU {fit['mean_best_iou']:.3f}, "
          f"recall@0.5 {fit['recall_at_0.5']:.3f}")
    print("anchors (w, h):", result["anchors"])


if __name__ == "__main__":
    main()
