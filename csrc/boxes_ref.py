"""Pure-numpy references for the kernels in `boxes.pyx`, written for reading, not for speed.

The tests compare the native kernels against these functions exactly: the same float64 arithmetic in
the same order, so the results agree bit for bit.
"""

import numpy as np


def _as_boxes(x) -> np.ndarray:
    """xyxy boxes as float64, after the float32 rounding the native kernels see."""
    return np.asarray(x, dtype=np.float32).reshape(-1, 4).astype(np.float64)


def _areas(boxes: np.ndarray) -> np.ndarray:
    """max(0, x2 - x1) * max(0, y2 - y1); np.maximum lets NaN through, so a NaN coordinate gives area NaN."""
    return np.maximum(0.0, boxes[:, 2] - boxes[:, 0]) * np.maximum(0.0, boxes[:, 3] - boxes[:, 1])


def box_iou_ref(a, b) -> np.ndarray:
    """Pairwise IoU of xyxy boxes `a` (N, 4) and `b` (M, 4): a float32 (N, M) array.

    Computed in float64 as
        w = max(0, min(x2a, x2b) - max(x1a, x1b)), h likewise, inter = w * h,
        area = max(0, x2 - x1) * max(0, y2 - y1)   (inverted boxes have area 0),
        union = area_a + area_b - inter,
        iou = inter / union if union > 0 else 0,
    and a NaN result (from a NaN coordinate, or inf / inf) is 0. The result is rounded to float32.
    """
    a, b = _as_boxes(a), _as_boxes(b)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        w = np.maximum(
            0.0, np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0])
        )
        h = np.maximum(
            0.0, np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1])
        )
        inter = w * h
        union = _areas(a)[:, None] + _areas(b)[None, :] - inter
        iou = np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)
    iou[np.isnan(iou)] = 0.0
    return iou.astype(np.float32)


def _iou_one(box: np.ndarray, area: float, other: np.ndarray, other_area: float) -> float:
    """The same formula as `box_iou_ref`, for one pair, in Python floats (IEEE double)."""
    w = max(0.0, min(box[2], other[2]) - max(box[0], other[0]))
    h = max(0.0, min(box[3], other[3]) - max(box[1], other[1]))
    inter = w * h
    union = area + other_area - inter
    if not union > 0:
        return 0.0
    iou = inter / union
    return 0.0 if iou != iou else iou


def nms_ref(boxes, scores, iou_threshold: float) -> np.ndarray:
    """Greedy non-maximum suppression over xyxy boxes (N, 4); returns kept indices as int64.

    Candidates are visited by score, highest first, ties to the lower index; boxes with a NaN score are
    dropped; +inf and -inf are ordinary scores. A candidate is kept unless its IoU (as in `box_iou_ref`,
    in float64) with some already-kept box is strictly greater than `iou_threshold`. The result lists
    the kept indices in the order they were kept, i.e. by descending score.
    """
    boxes = _as_boxes(boxes)
    scores = np.asarray(scores, dtype=np.float32).reshape(-1)
    with np.errstate(invalid="ignore", over="ignore"):
        areas = _areas(boxes)
    # Python's sort is stable, so equal scores stay in index order.
    candidates = sorted((i for i in range(len(scores)) if not np.isnan(scores[i])), key=lambda i: -scores[i])
    keep: list[int] = []
    for i in candidates:
        # math on Python floats: NaN compares false and inf - inf gives NaN, exactly as in C.
        box = [float(v) for v in boxes[i]]
        overlaps = (
            _iou_one(box, float(areas[i]), [float(v) for v in boxes[k]], float(areas[k])) > iou_threshold
            for k in keep
        )
        if not any(overlaps):
            keep.append(i)
    return np.asarray(keep, dtype=np.int64)
