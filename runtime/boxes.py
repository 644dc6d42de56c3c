"""Box post-processing for detection models: pairwise IoU and greedy non-maximum suppression.

Both functions run native (Cython) kernels from `dlc._C.boxes`; `dlc._C.boxes_ref` holds the plain numpy
references they are tested against.

Semantics, shared by both functions:

- Boxes are xyxy (x1, y1, x2, y2). Any float array-like is accepted and converted to C-contiguous
  float32; the arithmetic itself is done in float64.
- IoU = inter / union, with inter = max(0, min(x2a, x2b) - max(x1a, x1b)) * max(0, min(y2a, y2b) -
  max(y1a, y1b)), area = max(0, x2 - x1) * max(0, y2 - y1), union = area_a + area_b - inter, and
  IoU = 0 when union is not > 0.
- Zero-area and inverted boxes (x2 <= x1 or y2 <= y1) have area 0 and IoU 0 with everything, themselves
  included.
- A box with a NaN coordinate has IoU 0 with everything: it never suppresses and is never suppressed
  (for thresholds >= 0). Outputs never contain NaN.
- Empty input returns empty output of the right shape and dtype.
"""

from __future__ import annotations

import math
import numbers

import numpy as np
from numpy.typing import ArrayLike

from dlc._C import boxes as _native

__all__ = ["box_iou", "nms"]


def _boxes_arg(x: ArrayLike, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.dtype.kind not in "fiub":
        raise ValueError(f"{name} must hold real numbers, got dtype {arr.dtype}")
    if arr.ndim == 1 and arr.shape[0] == 0:
        arr = arr.reshape(0, 4)  # an empty list means no boxes
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise ValueError(f"{name} must have shape (N, 4) in xyxy order, got shape {arr.shape}")
    return np.ascontiguousarray(arr, dtype=np.float32)


def box_iou(a: ArrayLike, b: ArrayLike) -> np.ndarray:
    """Pairwise intersection-over-union of two sets of xyxy boxes.

    Args:
        a: boxes of shape (N, 4), xyxy.
        b: boxes of shape (M, 4), xyxy.

    Returns:
        float32 array of shape (N, M); entry [i, j] is IoU(a[i], b[j]) in [0, 1], never NaN.
        Identical non-degenerate boxes give exactly 1.

    Raises:
        ValueError: when `a` or `b` is not (K, 4).
    """
    return _native.box_iou(_boxes_arg(a, "a"), _boxes_arg(b, "b"))


def nms(boxes: ArrayLike, scores: ArrayLike, iou_threshold: float) -> np.ndarray:
    """Greedy non-maximum suppression, with torchvision's argument order.

    Visits boxes from the highest score down (equal scores: lower index first) and keeps a box unless its
    IoU with a box already kept is strictly greater than `iou_threshold`. Boxes whose score is NaN are
    dropped; +inf and -inf are ordinary scores.

    Args:
        boxes: shape (N, 4), xyxy.
        scores: shape (N,).
        iou_threshold: a finite number; pairs with IoU > iou_threshold suppress each other.

    Returns:
        int64 array of the kept indices into `boxes`, in descending score order (ties: lower index first).

    Raises:
        ValueError: on a wrong shape, mismatched N, or a non-finite threshold.
    """
    boxes_arr = _boxes_arg(boxes, "boxes")
    scores_arr = np.asarray(scores)
    if scores_arr.dtype.kind not in "fiub":
        raise ValueError(f"scores must hold real numbers, got dtype {scores_arr.dtype}")
    if scores_arr.ndim != 1:
        raise ValueError(f"scores must have shape (N,), got shape {scores_arr.shape}")
    if scores_arr.shape[0] != boxes_arr.shape[0]:
        raise ValueError(
            f"scores must have one entry per box: boxes has shape {boxes_arr.shape}, "
            f"scores has shape {scores_arr.shape}"
        )
    if not isinstance(iou_threshold, numbers.Real) or not math.isfinite(iou_threshold):
        raise ValueError(f"iou_threshold must be a finite number, got {iou_threshold!r}")
    scores_f32 = np.ascontiguousarray(scores_arr, dtype=np.float32)
    return _native.nms(boxes_arr, scores_f32, float(iou_threshold))
