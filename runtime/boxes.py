"""Box post-processing for detection models: IoU family, greedy NMS (single-class and batched), Soft-NMS,
and `filter_detections`, the one call that turns decoded detector outputs into kept detections.

Every function runs native (Cython) kernels from `dlc._C.boxes`; `dlc._C.boxes_ref` holds the plain numpy
references they are tested against (bit for bit).

Semantics, shared by all functions:

- Boxes are xyxy (x1, y1, x2, y2). Any real array-like is accepted and converted to C-contiguous float32;
  the arithmetic itself is done in float64.
- IoU = inter / union, with inter = max(0, min(x2a, x2b) - max(x1a, x1b)) * max(0, min(y2a, y2b) -
  max(y1a, y1b)), area = max(0, x2 - x1) * max(0, y2 - y1), union = area_a + area_b - inter, and
  IoU = 0 when union is not > 0.
- Zero-area and inverted boxes (x2 <= x1 or y2 <= y1) have area 0 and IoU 0 with everything, themselves
  included. So does a box with an infinite area.
- A box with a NaN coordinate has IoU 0 with everything: it never suppresses and is never suppressed
  (for thresholds >= 0). Outputs never contain NaN.
- Scores: NaN scores are dropped. +inf ranks first and -inf last; both are otherwise ordinary (a -inf box
  is kept when nothing suppresses it). -0.0 and +0.0 are equal scores. Equal scores go to the lower index.
- Suppression is strict: a box is suppressed when its IoU with a kept box is **greater than** the
  threshold. A negative threshold therefore keeps only the best box; a threshold >= 1 keeps every box.
- Returned indices are int64, in descending score order (ties: lower index first).
- Empty input returns empty output of the right shape and dtype.

User errors raise `BoxError`, a `DlcError` that is also a `ValueError`.
"""

from __future__ import annotations

import math
import numbers

import numpy as np
from numpy.typing import ArrayLike

from dlc._C import boxes as _native
from dlc.compiler.errors import DlcError

__all__ = ["BoxError", "batched_nms", "box_iou", "filter_detections", "nms", "soft_nms"]

IOU_KINDS = {
    "iou": _native.KIND_IOU,
    "giou": _native.KIND_GIOU,
    "diou": _native.KIND_DIOU,
    "ciou": _native.KIND_CIOU,
}
SOFT_METHODS = {"linear": _native.SOFT_LINEAR, "gaussian": _native.SOFT_GAUSSIAN}
_MAX_BOXES = 2**31 - 1  # the native sort packs indices into 32 bits


class BoxError(DlcError, ValueError):
    """A bad argument to a box function (shape, dtype, threshold)."""


def _boxes_arg(x: ArrayLike, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.dtype.kind not in "fiub":
        raise BoxError(f"{name} must hold real numbers, got dtype {arr.dtype}")
    if arr.ndim == 1 and arr.shape[0] == 0:
        arr = arr.reshape(0, 4)  # an empty list means no boxes
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise BoxError(f"{name} must have shape (N, 4) in xyxy order, got shape {arr.shape}")
    if arr.shape[0] > _MAX_BOXES:
        raise BoxError(f"{name} has {arr.shape[0]} boxes; at most {_MAX_BOXES} are supported")
    return np.ascontiguousarray(arr, dtype=np.float32)


def _scores_arg(scores: ArrayLike, boxes: np.ndarray) -> np.ndarray:
    arr = np.asarray(scores)
    if arr.dtype.kind not in "fiub":
        raise BoxError(f"scores must hold real numbers, got dtype {arr.dtype}")
    if arr.ndim == 1 and arr.shape[0] == 0:
        arr = arr.reshape(0)
    if arr.ndim != 1:
        raise BoxError(f"scores must have shape (N,), got shape {arr.shape}")
    if arr.shape[0] != boxes.shape[0]:
        raise BoxError(
            f"scores must have one entry per box: boxes has shape {boxes.shape}, scores has shape {arr.shape}"
        )
    return np.ascontiguousarray(arr, dtype=np.float32)


def _finite_arg(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise BoxError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _count_arg(value: object, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise BoxError(f"{name} must be a positive integer or None, got {value!r}")
    return int(value)


def _dense_classes(class_ids: ArrayLike, n: int) -> tuple[np.ndarray, int]:
    """Class ids of any integer dtype as dense int64 numbers in [0, C), and C; no coordinate tricks."""
    arr = np.asarray(class_ids)
    if arr.ndim == 1 and arr.shape[0] == 0:
        arr = arr.reshape(0).astype(np.int64)
    if arr.dtype.kind not in "iu":
        raise BoxError(f"class_ids must hold integers, got dtype {arr.dtype}")
    if arr.ndim != 1 or arr.shape[0] != n:
        raise BoxError(f"class_ids must have shape ({n},), one per box, got shape {arr.shape}")
    if n == 0:
        return np.zeros(0, dtype=np.int64), 1
    lo, hi = int(arr.min()), int(arr.max())
    if hi - lo < n + 1024:  # a small range: shift it (cheap, no sort)
        if arr.dtype == np.uint64:
            dense = (arr - np.uint64(lo)).astype(np.int64)
        elif lo == 0:
            dense = arr.astype(np.int64, copy=False)
        else:
            dense = arr.astype(np.int64) - lo
        return np.ascontiguousarray(dense), hi - lo + 1
    uniq, inverse = np.unique(arr, return_inverse=True)
    return np.ascontiguousarray(inverse.reshape(-1), dtype=np.int64), len(uniq)


def box_iou(a: ArrayLike, b: ArrayLike, kind: str = "iou") -> np.ndarray:
    """Pairwise IoU, GIoU, DIoU or CIoU of two sets of xyxy boxes, as in torchvision.ops.

    - "iou": inter / union (see the module docstring).
    - "giou": iou - (C - union) / C, C the area of the smallest enclosing box (generalized_box_iou).
    - "diou": iou - d² / c², d the distance between the centres, c the enclosing box's diagonal
      (distance_box_iou).
    - "ciou": diou - alpha * v, v = 4 / pi² * (atan(w_b / h_b) - atan(w_a / h_a))², alpha = v / (1 - iou + v)
      (complete_box_iou).

    Degenerate cases give numbers, never NaN: a penalty whose denominator is not > 0 is 0 (two zero-area
    boxes at one point: C = 0 and c = 0, so giou = diou = iou = 0; identical boxes: 1 - iou + v = 0, so
    ciou = diou = 1); the aspect angle of a box with w = h = 0 is 0 (atan2(0, 0)); any pair with a NaN
    coordinate, or whose value would be NaN (inf - inf), gives 0. torchvision instead adds eps = 1e-7 to
    c² and to 1 - iou + v, and returns NaN for those cases; on ordinary boxes the two agree to float32
    rounding. Zero-area and inverted boxes use clamped sizes (max(0, x2 - x1)), as in the IoU.

    Args:
        a: boxes of shape (N, 4), xyxy.
        b: boxes of shape (M, 4), xyxy.
        kind: "iou", "giou", "diou" or "ciou".

    Returns:
        float32 array of shape (N, M): IoU in [0, 1], GIoU and DIoU in [-1, 1], CIoU in [-2, 1] (for
        inverted boxes DIoU and CIoU can be lower: their centres use the raw coordinates, as torchvision's).
    """
    if kind not in IOU_KINDS:
        raise BoxError(f"box_iou: kind must be one of {', '.join(IOU_KINDS)}, got {kind!r}")
    return _native.box_iou(_boxes_arg(a, "a"), _boxes_arg(b, "b"), IOU_KINDS[kind])


def nms(boxes: ArrayLike, scores: ArrayLike, iou_threshold: float) -> np.ndarray:
    """Greedy non-maximum suppression, with torchvision's argument order.

    Visits boxes from the highest score down (equal scores: lower index first) and keeps a box unless its
    IoU with a box already kept is strictly greater than `iou_threshold`. Boxes whose score is NaN are
    dropped. The result equals the plain greedy scan exactly; a uniform grid over the kept boxes limits
    each candidate's comparisons to the kept boxes that can reach its IoU threshold.

    Args:
        boxes: shape (N, 4), xyxy.
        scores: shape (N,).
        iou_threshold: a finite number; pairs with IoU > iou_threshold suppress each other.

    Returns:
        int64 array of the kept indices into `boxes`, in descending score order (ties: lower index first).
    """
    boxes_arr = _boxes_arg(boxes, "boxes")
    scores_arr = _scores_arg(scores, boxes_arr)
    thr = _finite_arg(iou_threshold, "iou_threshold")
    return _native.nms(boxes_arr, scores_arr, thr)


def batched_nms(
    boxes: ArrayLike, scores: ArrayLike, class_ids: ArrayLike, iou_threshold: float
) -> np.ndarray:
    """Greedy NMS within each class: boxes of different classes never suppress each other.

    Boxes are grouped by class natively (exact for any coordinates, unlike offsetting boxes by class), each
    class runs the same greedy NMS as `nms`, and the kept indices of all classes are merged in descending
    score order (ties: lower index first).

    Args:
        boxes: shape (N, 4), xyxy.
        scores: shape (N,).
        class_ids: shape (N,), any integer dtype (need not be contiguous or start at 0).
        iou_threshold: a finite number.

    Returns:
        int64 array of the kept indices.
    """
    boxes_arr = _boxes_arg(boxes, "boxes")
    scores_arr = _scores_arg(scores, boxes_arr)
    dense, num_classes = _dense_classes(class_ids, boxes_arr.shape[0])
    thr = _finite_arg(iou_threshold, "iou_threshold")
    return _native.batched_nms(boxes_arr, scores_arr, dense, num_classes, thr)


def _soft_args(iou_threshold: float, sigma: float, method: str, score_threshold: float) -> tuple:
    if method not in SOFT_METHODS:
        raise BoxError(f"soft-NMS method must be 'linear' or 'gaussian', got {method!r}")
    thr = _finite_arg(iou_threshold, "iou_threshold")
    sig = _finite_arg(sigma, "sigma")
    if sig <= 0:
        raise BoxError(f"sigma must be > 0, got {sigma!r}")
    if (
        isinstance(score_threshold, bool)
        or not isinstance(score_threshold, numbers.Real)
        or math.isnan(score_threshold)
    ):
        raise BoxError(f"score_threshold must be a number (or -inf), got {score_threshold!r}")
    return thr, sig, SOFT_METHODS[method], float(score_threshold)


def soft_nms(
    boxes: ArrayLike,
    scores: ArrayLike,
    iou_threshold: float = 0.3,
    sigma: float = 0.5,
    method: str = "gaussian",
    score_threshold: float = 0.001,
) -> tuple[np.ndarray, np.ndarray]:
    """Soft-NMS (Bodla et al. 2017): decay the scores of overlapping boxes instead of dropping them.

    Repeatedly selects the box with the highest current score (ties: lower index) and multiplies the score
    of every remaining box by a weight of its IoU with the selected one:

    - "linear": w = 1 - iou when iou > iou_threshold, else 1;
    - "gaussian": w = exp(-iou² / sigma) (iou_threshold unused), the convention of the paper and of mmcv;
      some codebases write exp(-iou² / (2 sigma²)) instead: pass sigma' = 2 sigma² to get theirs.

    A weight of exactly 0 sets the score to 0 (so +inf * 0 gives 0, not NaN). NaN scores are dropped, and
    so is every box whose score is, or decays to, below `score_threshold` (a score equal to it stays).
    Scores are decayed in float64. Scores are meant to be non-negative (a negative score is multiplied the
    same way, which moves it towards 0). O(N²) time: meant for the few hundred boxes left after a score
    threshold.

    Returns:
        (indices int64, scores float32): the boxes in the order selected, with their decayed scores
        (non-increasing when the scores are non-negative).
    """
    boxes_arr = _boxes_arg(boxes, "boxes")
    scores_arr = _scores_arg(scores, boxes_arr)
    thr, sig, meth, score_thr = _soft_args(iou_threshold, sigma, method, score_threshold)
    return _native.soft_nms(boxes_arr, scores_arr, thr, sig, meth, score_thr)


def _merge_by_score(idx: np.ndarray, score: np.ndarray) -> np.ndarray:
    """Positions that order (idx, score) pairs by descending score, ties to the lower index."""
    return np.lexsort((idx, -score.astype(np.float64)))


def filter_detections(
    boxes: ArrayLike,
    scores: ArrayLike,
    class_ids: ArrayLike | None = None,
    *,
    iou_threshold: float = 0.45,
    score_threshold: float = 0.0,
    pre_nms_top_k: int | None = None,
    max_detections: int | None = None,
    class_agnostic: bool = False,
    soft: str | None = None,
    sigma: float = 0.5,
    return_scores: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Post-process one image's decoded detections: score threshold, top-k, NMS, detection cap.

    Steps, in order:
    1. keep boxes with score **> score_threshold** (strict, as torchvision's detection heads, YOLOv5 and
       mmdetection do, and like them in float32: score_threshold is rounded to float32 first; NaN scores
       are always dropped, and -inf ones too since -inf > -inf is false);
    2. `pre_nms_top_k`: keep the k best of those (over all classes; ties: lower index);
    3. NMS with `iou_threshold`: per class (`batched_nms`) unless `class_agnostic` or `class_ids` is None;
       with `soft` = "linear" or "gaussian", Soft-NMS (`soft_nms`, per class likewise) with `sigma`, where
       boxes whose decayed score falls below `score_threshold` are dropped;
    4. `max_detections`: keep the first that many.

    Returns:
        int64 indices into `boxes` in descending (for Soft-NMS: decayed) score order, ties to the lower
        index; with `return_scores`, also their float32 scores (the decayed ones for Soft-NMS).
    """
    boxes_arr = _boxes_arg(boxes, "boxes")
    scores_arr = _scores_arg(scores, boxes_arr)
    n = boxes_arr.shape[0]
    if class_ids is not None:
        dense, num_classes = _dense_classes(class_ids, n)
    thr = _finite_arg(iou_threshold, "iou_threshold")
    if (
        isinstance(score_threshold, bool)
        or not isinstance(score_threshold, numbers.Real)
        or math.isnan(score_threshold)
    ):
        raise BoxError(f"score_threshold must be a number (or -inf), got {score_threshold!r}")
    top_k = _count_arg(pre_nms_top_k, "pre_nms_top_k")
    max_det = _count_arg(max_detections, "max_detections")
    if soft is not None:
        _soft_args(thr, sigma, soft, score_threshold)
    per_class = class_ids is not None and not class_agnostic

    # compared in float32, as torch-based detectors do: a score of 0.3 is not above a threshold of 0.3
    with np.errstate(over="ignore"):
        cand = np.flatnonzero(scores_arr > np.float32(score_threshold))
    if top_k is not None and len(cand) > top_k:
        best = _native.order_desc(np.ascontiguousarray(scores_arr[cand]))[:top_k]
        cand = np.sort(cand[best])
    sub_boxes = np.ascontiguousarray(boxes_arr[cand])
    sub_scores = np.ascontiguousarray(scores_arr[cand])
    if soft is None:
        if per_class:
            local = _native.batched_nms(
                sub_boxes, sub_scores, np.ascontiguousarray(dense[cand]), num_classes, thr
            )
        else:
            local = _native.nms(sub_boxes, sub_scores, thr)
        out_scores = sub_scores[local]
    else:
        meth, score_thr = SOFT_METHODS[soft], float(score_threshold)
        if per_class:
            groups = [np.flatnonzero(dense[cand] == c) for c in np.unique(dense[cand])]
        else:
            groups = [np.arange(len(cand))]
        picked, rescored = [np.zeros(0, dtype=np.int64)], [np.zeros(0, dtype=np.float32)]
        for g in groups:
            idx, sc = _native.soft_nms(
                np.ascontiguousarray(sub_boxes[g]),
                np.ascontiguousarray(sub_scores[g]),
                thr,
                float(sigma),
                meth,
                score_thr,
            )
            picked.append(g[idx])
            rescored.append(sc)
        local, out_scores = np.concatenate(picked), np.concatenate(rescored)
        order = _merge_by_score(local, out_scores)
        local, out_scores = local[order], out_scores[order]
    keep = cand[local].astype(np.int64)
    if max_det is not None:
        keep, out_scores = keep[:max_det], out_scores[:max_det]
    return (keep, np.asarray(out_scores, dtype=np.float32)) if return_scores else keep
