"""Semantic-segmentation metrics, every figure from one confusion matrix (mmsegmentation's definitions).

The matrix counts pixels: row = true class, column = predicted class; pixels whose target is the ignore index
are left out before counting. From it, per class c with TP = M[c, c], label area = row sum, predicted area =
column sum:

- IoU_c = TP / (label area + predicted area − TP); Dice_c = 2 TP / (label area + predicted area);
  class accuracy_c = TP / label area. A class that never occurs in the labels (nor, for IoU and Dice, in the
  predictions) has NaN there and is left out of the means, as mmsegmentation's nanmean;
- pixel accuracy (aAcc) = Σ TP / Σ label area;
- mIoU, mean class accuracy (mAcc), mDice: the NaN-skipping means;
- frequency-weighted IoU = Σ_c (label area_c / Σ label area) · IoU_c over the classes that occur.

Matrices add, so a whole validation set is counted batch by batch.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["confusion_matrix", "segmentation_metrics"]


def confusion_matrix(pred: np.ndarray, target: np.ndarray, num_classes: int, ignore_index: int = 255
                     ) -> np.ndarray:
    """int64 C×C pixel counts (rows: true class, columns: prediction) of integer arrays of one shape."""
    pred, target = np.asarray(pred), np.asarray(target)
    if pred.shape != target.shape:
        raise ValueError(f"predictions {pred.shape} and targets {target.shape} differ in shape")
    valid = target != ignore_index
    t = target[valid].astype(np.int64)
    p = pred[valid].astype(np.int64)
    if t.size and (t.min() < 0 or t.max() >= num_classes):
        raise ValueError(f"target classes must be in 0..{num_classes - 1} (or the ignore index {ignore_index})")
    if p.size and (p.min() < 0 or p.max() >= num_classes):
        raise ValueError(f"predicted classes must be in 0..{num_classes - 1}")
    return np.bincount(t * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def _nanmean(x: np.ndarray) -> float:
    x = x[~np.isnan(x)]
    return float(x.mean()) if x.size else float("nan")


def segmentation_metrics(matrix: np.ndarray, classes: list[str] | None = None) -> dict[str, Any]:
    """All figures of a confusion matrix (see the module notes); per-class lists follow the class order, NaN
    written as None so the result is plain JSON."""
    m = np.asarray(matrix, np.float64)
    tp = np.diag(m)
    label_area, pred_area = m.sum(1), m.sum(0)
    union = label_area + pred_area - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
        dice = np.where(label_area + pred_area > 0, 2 * tp / (label_area + pred_area), np.nan)
        acc = np.where(label_area > 0, tp / label_area, np.nan)
    total = label_area.sum()
    freq = label_area / total if total > 0 else np.zeros_like(label_area)
    present = label_area > 0
    names = classes if classes is not None else [str(k) for k in range(len(m))]

    def plain(x: np.ndarray) -> list[float | None]:
        return [None if np.isnan(v) else float(v) for v in x]

    return {
        "pixel_accuracy": float(tp.sum() / total) if total > 0 else float("nan"),
        "mean_accuracy": _nanmean(acc),
        "miou": _nanmean(iou),
        "fwiou": float((freq[present] * iou[present]).sum()) if total > 0 else float("nan"),
        "mdice": _nanmean(dice),
        "per_class": {name: {"iou": i, "dice": d, "accuracy": a, "pixels": int(n)}
                      for name, i, d, a, n in zip(names, plain(iou), plain(dice), plain(acc), label_area)},
        "pixels": int(total),
    }
