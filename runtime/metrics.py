"""Detection metrics on in-memory arrays: VOC-style average precision, precision/recall/F1, PR curves.

Matching follows the PASCAL VOC devkit (VOCevaldet.m), per class over the whole set:

- predictions of a class are visited in descending score order (a stable sort: equal scores keep image order,
  then their order within the image);
- each takes the GT box of its class in its image with the highest IoU (the first on equal IoUs), whether or
  not that GT is already matched;
- IoU >= iou_threshold counts, as in the devkit (`ovmax >= minoverlap`) and pycocotools; py-faster-rcnn's
  voc_eval.py uses `>` instead, which only differs when an IoU equals the threshold exactly;
- the best GT is difficult (ignored): the prediction is ignored, neither TP nor FP; else a free GT makes it a
  TP and marks the GT matched, an already matched GT makes it a FP (a duplicate); below the threshold, FP.

Boxes are xyxy in continuous coordinates (no VOC "+1" pixel), IoU from dlc.runtime.box_iou. Precision,
recall and F1 that would divide by zero are 0 (scikit-learn's zero_division=0).
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from dlc.compiler.errors import DlcError

from .boxes import box_iou

__all__ = ["average_precision", "evaluate_detections", "metrics_to_json", "plot_pr_curves"]

METHODS = ("all_point", "voc07")


def average_precision(recall: ArrayLike, precision: ArrayLike, method: str = "all_point") -> float:
    """Area under a PR curve given as points in descending score order (recall non-decreasing).

    all_point (VOC2010+): the area under the monotone precision envelope, precision at recall r being the
    best precision at any recall >= r. voc07: the mean over the 11 recall levels 0, 0.1, ..., 1 (exactly
    k/10) of the best precision at recall >= that level (0 where the curve never gets there).
    """
    if method not in METHODS:
        raise DlcError(f"average_precision: method must be one of {', '.join(METHODS)}, got '{method}'")
    rec = np.asarray(recall, dtype=np.float64).reshape(-1)
    prec = np.asarray(precision, dtype=np.float64).reshape(-1)
    if rec.shape != prec.shape:
        raise DlcError(f"average_precision: recall has {rec.size} points but precision has {prec.size}")
    if rec.size == 0:
        return 0.0
    if method == "voc07":
        total = 0.0
        for t in np.arange(11) / 10:
            above = prec[rec >= t]
            total += float(above.max()) if above.size else 0.0
        return total / 11
    mrec = np.concatenate([[0.0], rec, [1.0]])
    mpre = np.concatenate([[0.0], prec, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    step = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[step + 1] - mrec[step]) * mpre[step + 1]))


def _array(x: Any, where: str, ndim: int, dtype: type) -> np.ndarray:
    try:
        arr = np.asarray(x, dtype=dtype)
    except (TypeError, ValueError):
        raise DlcError(f"{where}: not an array of numbers") from None
    if arr.size == 0:
        arr = arr.reshape((0, 4) if ndim == 2 else (0,))
    if arr.ndim != ndim or (ndim == 2 and arr.shape[1] != 4):
        raise DlcError(f"{where}: expected shape {'(N, 4) xyxy' if ndim == 2 else '(N,)'}, got {arr.shape}")
    return arr


def _labels(x: Any, where: str, n: int, num_classes: int) -> np.ndarray:
    arr = np.asarray(x)
    if arr.size and arr.dtype.kind not in "iu" and not (arr.dtype.kind == "f" and np.all(arr == np.round(arr))):
        raise DlcError(f"{where}: labels must be integers, got dtype {arr.dtype}")
    arr = _array(arr, where, 1, np.int64)
    if arr.shape[0] != n:
        raise DlcError(f"{where}: {arr.shape[0]} labels for {n} boxes")
    bad = arr[(arr < 0) | (arr >= num_classes)]
    if bad.size:
        raise DlcError(f"{where}: label {int(bad[0])} is outside 0..{num_classes - 1} (num_classes={num_classes})")
    return arr


def _parse(gt: Sequence, preds: Sequence, num_classes: int):
    if len(gt) != len(preds):
        raise DlcError(f"evaluate_detections: {len(gt)} ground-truth images but {len(preds)} prediction images")
    gts, pds = [], []
    for i, item in enumerate(gt):
        where = f"gt[{i}]"
        if not isinstance(item, (tuple, list)) or len(item) not in (2, 3):
            raise DlcError(f"{where}: expected (boxes, labels) or (boxes, labels, difficult)")
        boxes = _array(item[0], f"{where} boxes", 2, np.float32)
        labels = _labels(item[1], f"{where} labels", len(boxes), num_classes)
        difficult = np.zeros(len(boxes), dtype=bool)
        if len(item) == 3 and item[2] is not None:
            difficult = _array(item[2], f"{where} difficult", 1, bool)
            if len(difficult) != len(boxes):
                raise DlcError(f"{where}: {len(difficult)} difficult flags for {len(boxes)} boxes")
        gts.append((boxes, labels, difficult))
    for i, item in enumerate(preds):
        where = f"preds[{i}]"
        if not isinstance(item, (tuple, list)) or len(item) != 3:
            raise DlcError(f"{where}: expected (boxes, scores, labels)")
        boxes = _array(item[0], f"{where} boxes", 2, np.float32)
        scores = _array(item[1], f"{where} scores", 1, np.float64)
        if len(scores) != len(boxes):
            raise DlcError(f"{where}: {len(scores)} scores for {len(boxes)} boxes")
        if not np.all(np.isfinite(scores)):
            raise DlcError(f"{where}: scores must be finite numbers")
        pds.append((boxes, scores, _labels(item[2], f"{where} labels", len(boxes), num_classes)))
    return gts, pds


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else 0.0


def _prf(tp: int, fp: int, n_gt: int) -> dict[str, float]:
    p, r = _ratio(tp, tp + fp), _ratio(tp, n_gt)
    return {"precision": p, "recall": r, "f1": _ratio(2 * p * r, p + r)}


def _flatten(items: list, n_fields: int) -> tuple[np.ndarray, ...]:
    """Concatenate per-image arrays; the first array returned is each row's image index."""
    image = np.repeat(np.arange(len(items)), [len(it[0]) for it in items])
    if not items:
        return (image, np.zeros((0, 4), np.float32)) + tuple(np.zeros(0) for _ in range(n_fields - 1))
    return (image,) + tuple(np.concatenate([it[f] for it in items]) for f in range(n_fields))


def _match_class(g_img, g_box, g_diff, p_img, p_box, p_score, iou_threshold: float):
    """Sorted scores with TP / FP flags (ignored predictions removed) and the GT count, for one class.

    Rows are in image order (then their order within the image), so per-image groups are contiguous."""
    n_gt = int(np.count_nonzero(~g_diff))
    k = len(p_img)
    # no GT of the class in the image: -inf, as the devkit's initial ovmax, so that no threshold matches
    best_iou, best_gt, best_diff = np.full(k, -np.inf), np.full(k, -1), np.zeros(k, dtype=bool)
    if k and len(g_img):
        images, p_start = np.unique(p_img, return_index=True)
        p_end = np.r_[p_start[1:], k]
        g_start = np.searchsorted(g_img, images, side="left")
        g_end = np.searchsorted(g_img, images, side="right")
        for ps, pe, gs, ge in zip(p_start, p_end, g_start, g_end):
            if gs == ge:
                continue
            iou = box_iou(p_box[ps:pe], g_box[gs:ge]).astype(np.float64)
            j = np.argmax(iou, axis=1)  # the first best on equal IoUs, as the devkit's max()
            best_iou[ps:pe] = iou[np.arange(pe - ps), j]
            best_gt[ps:pe] = j + gs
            best_diff[ps:pe] = g_diff[gs:ge][j]
    order = np.argsort(-p_score, kind="mergesort")
    s, ov, gi, dg = p_score[order], best_iou[order], best_gt[order], best_diff[order]
    hit = ov >= iou_threshold
    keep = ~(hit & dg)
    # among the hits on one GT, only the first in score order is a TP; later ones are duplicates (FP)
    first = np.zeros(len(s), dtype=bool)
    hit_idx = np.flatnonzero(hit & ~dg)
    _, first_pos = np.unique(gi[hit_idx], return_index=True)
    first[hit_idx[first_pos]] = True
    return s[keep], first[keep], ~first[keep], n_gt


def evaluate_detections(gt: Sequence, preds: Sequence, num_classes: int, iou_threshold: float = 0.5,
                        score_threshold: float = 0.5, method: str = "all_point") -> dict[str, Any]:
    """VOC-style detection metrics over a set of images.

    Args:
        gt: per image `(boxes (M, 4) xyxy, labels (M,) int)`, optionally with a third item `difficult`
            (M,) bool: difficult (or crowd) GT neither counts as missed nor makes a prediction a FP.
        preds: per image `(boxes (K, 4) xyxy, scores (K,), labels (K,) int)`.
        num_classes: labels lie in 0..num_classes-1.
        iou_threshold: IoU >= this matches.
        score_threshold: TP/FP/FN, precision, recall and F1 count the predictions with score >= this.
        method: "all_point" or "voc07" (11-point) for the AP.

    Returns:
        {"map": mean AP over the classes with GT (None if none), "ap": [AP or None per class],
        "per_class": [{"class", "num_gt", "ap", "tp", "fp", "fn", "precision", "recall", "f1"}],
        overall "tp", "fp", "fn", "precision", "recall", "f1" (summed over classes), "num_images", the settings,
        and "curves": per class {"recall", "precision", "scores"} arrays in descending score order.}
    """
    if method not in METHODS:
        raise DlcError(f"evaluate_detections: method must be one of {', '.join(METHODS)}, got '{method}'")
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise DlcError(f"evaluate_detections: num_classes must be a positive integer, got {num_classes!r}")
    for name, v in (("iou_threshold", iou_threshold), ("score_threshold", score_threshold)):
        if not isinstance(v, (int, float)) or not math.isfinite(v):
            raise DlcError(f"evaluate_detections: {name} must be a finite number, got {v!r}")
    gts, pds = _parse(gt, preds, int(num_classes))
    g_img, g_box, g_lab, g_diff = _flatten(gts, 3)
    p_img, p_box, p_score, p_lab = _flatten(pds, 3)
    g_diff, g_lab, p_lab = g_diff.astype(bool), g_lab.astype(np.int64), p_lab.astype(np.int64)
    per_class, curves, aps = [], [], []
    totals = {"tp": 0, "fp": 0, "fn": 0}
    for c in range(int(num_classes)):
        gc, pc = g_lab == c, p_lab == c
        scores, tp, fp, n_gt = _match_class(g_img[gc], g_box[gc], g_diff[gc], p_img[pc], p_box[pc],
                                            p_score[pc].astype(np.float64), float(iou_threshold))
        ctp, cfp = np.cumsum(tp), np.cumsum(fp)
        recall = ctp / n_gt if n_gt else np.zeros(len(ctp))
        precision = ctp / np.maximum(ctp + cfp, 1)
        ap = average_precision(recall, precision, method) if n_gt else None
        above = int(np.count_nonzero(scores >= score_threshold))  # scores are sorted descending
        n_tp = int(ctp[above - 1]) if above else 0
        n_fp = above - n_tp
        row = {"class": c, "num_gt": n_gt, "ap": ap, "tp": n_tp, "fp": n_fp, "fn": n_gt - n_tp,
               **_prf(n_tp, n_fp, n_gt)}
        per_class.append(row)
        curves.append({"recall": recall, "precision": precision, "scores": scores})
        aps.append(ap)
        for key in totals:
            totals[key] += row[key]
    defined = [a for a in aps if a is not None]
    return {"method": method, "iou_threshold": float(iou_threshold), "score_threshold": float(score_threshold),
            "num_classes": int(num_classes), "num_images": len(gts),
            "map": float(np.mean(defined)) if defined else None, "ap": aps, "per_class": per_class,
            **totals, **_prf(totals["tp"], totals["fp"], totals["tp"] + totals["fn"]), "curves": curves}


def metrics_to_json(result: dict[str, Any]) -> dict[str, Any]:
    """`evaluate_detections`' result without the curve arrays, ready for json.dumps."""
    return {k: v for k, v in result.items() if k != "curves"}


def plot_pr_curves(result: dict[str, Any], path: str | Path, title: str,
                   class_names: Sequence[str] | None = None) -> None:
    """One precision-recall curve per class with GT (AP in the legend), written atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dlc.compiler.atomic import write_bytes

    fig, ax = plt.subplots(figsize=(6, 5))
    for row, curve in zip(result["per_class"], result["curves"]):
        if row["ap"] is None:
            continue
        name = class_names[row["class"]] if class_names is not None else f"class {row['class']}"
        # start at recall 0 with the first precision so a curve with one point still draws
        rec = np.concatenate([[0.0], curve["recall"]]) if len(curve["recall"]) else np.array([0.0])
        prec = np.concatenate([curve["precision"][:1], curve["precision"]]) if len(curve["precision"]) else \
            np.array([0.0])
        ax.plot(rec, prec, label=f"{name} (AP {row['ap']:.3f})")
    map_text = f"mAP {result['map']:.3f}" if result["map"] is not None else "no ground truth"
    ax.set_title(f"{title}\n{map_text}, IoU ≥ {result['iou_threshold']:g}, {result['method']}")
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1.0)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small", loc="best")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    write_bytes(path, buf.getvalue())
