"""Pure-numpy references for the kernels in `boxes.pyx`, written for reading, not for speed.

The tests compare the native kernels against these functions exactly: the same float64 arithmetic in
the same order, so the results agree bit for bit.
"""

import math

import numpy as np


def _as_boxes(x) -> np.ndarray:
    """xyxy boxes as float64, after the float32 rounding the native kernels see."""
    return np.asarray(x, dtype=np.float32).reshape(-1, 4).astype(np.float64)


def _areas(boxes: np.ndarray) -> np.ndarray:
    """max(0, x2 - x1) * max(0, y2 - y1); np.maximum lets NaN through, so a NaN coordinate gives area NaN."""
    return np.maximum(0.0, boxes[:, 2] - boxes[:, 0]) * np.maximum(0.0, boxes[:, 3] - boxes[:, 1])


def _angles(boxes: np.ndarray) -> np.ndarray:
    """CIoU's aspect angle atan(w / h) per box, as math.atan2 of the clamped sides: the same libm call
    the native kernel makes, so the values agree bit for bit (0 for w = h = 0, NaN for a NaN side)."""
    with np.errstate(invalid="ignore"):
        w = np.maximum(0.0, boxes[:, 2] - boxes[:, 0])
        h = np.maximum(0.0, boxes[:, 3] - boxes[:, 1])
    return np.array([math.atan2(float(x), float(y)) for x, y in zip(w, h)], dtype=np.float64)


def box_iou_ref(a, b, kind: str = "iou") -> np.ndarray:
    """Pairwise IoU (or GIoU, DIoU, CIoU) of xyxy boxes `a` (N, 4) and `b` (M, 4): a float32 (N, M) array.

    IoU is computed in float64 as
        w = max(0, min(x2a, x2b) - max(x1a, x1b)), h likewise, inter = w * h,
        area = max(0, x2 - x1) * max(0, y2 - y1)   (inverted boxes have area 0),
        union = area_a + area_b - inter,
        iou = inter / union if union > 0 else 0,
    and a NaN result (from a NaN coordinate, or inf / inf) is 0. With cw, ch the clamped sides of the
    enclosing box (max(x2a, x2b) - min(x1a, x1b), ...):
        giou = iou - (C - union) / C with C = cw * ch, or iou when C is not > 0;
        diou = iou - d / c with c = cw * cw + ch * ch and d the squared distance of the centres
               ((x1 + x2) / 2 ...), or iou when c is not > 0;
        ciou = diou - (v / (1 - iou + v)) * v with v = 4 / pi^2 * (angle_b - angle_a)^2 (see `_angles`),
               or diou when 1 - iou + v is not > 0;
    and any NaN result is 0. The result is rounded to float32.
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
        if kind == "iou":
            return iou.astype(np.float32)
        cw = np.maximum(
            0.0, np.maximum(a[:, None, 2], b[None, :, 2]) - np.minimum(a[:, None, 0], b[None, :, 0])
        )
        ch = np.maximum(
            0.0, np.maximum(a[:, None, 3], b[None, :, 3]) - np.minimum(a[:, None, 1], b[None, :, 1])
        )
        if kind == "giou":
            c = cw * ch
            r = np.where(c > 0, iou - (c - union) / np.where(c > 0, c, 1.0), iou)
        elif kind in ("diou", "ciou"):
            c = cw * cw + ch * ch
            dx = (a[:, None, 0] + a[:, None, 2]) / 2.0 - (b[None, :, 0] + b[None, :, 2]) / 2.0
            dy = (a[:, None, 1] + a[:, None, 3]) / 2.0 - (b[None, :, 1] + b[None, :, 3]) / 2.0
            d = dx * dx + dy * dy
            r = np.where(c > 0, iou - d / np.where(c > 0, c, 1.0), iou)
            if kind == "ciou":
                diff = _angles(b)[None, :] - _angles(a)[:, None]
                v = (4.0 / (math.pi * math.pi)) * (diff * diff)
                den = 1.0 - iou + v
                r = np.where(den > 0, r - (v / np.where(den > 0, den, 1.0)) * v, r)
        else:
            raise ValueError(f"unknown kind {kind!r}")
        r[np.isnan(r)] = 0.0
    return r.astype(np.float32)


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
    candidates = _order_ref(scores)
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


def _order_ref(scores: np.ndarray) -> list[int]:
    """Non-NaN score indices by descending score, ties to the lower index (Python's sort is stable)."""
    return sorted((i for i in range(len(scores)) if not np.isnan(scores[i])), key=lambda i: -scores[i])


def batched_nms_ref(boxes, scores, class_ids, iou_threshold: float) -> np.ndarray:
    """`nms_ref` within each class separately; all kept indices merged by descending score, ties to the
    lower index."""
    scores = np.asarray(scores, dtype=np.float32).reshape(-1)
    class_ids = np.asarray(class_ids).reshape(-1)
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    kept: list[int] = []
    for c in np.unique(class_ids):
        members = np.flatnonzero(class_ids == c)
        kept += members[nms_ref(boxes[members], scores[members], iou_threshold)].tolist()
    kept_scores = scores[kept] if kept else np.zeros(0, dtype=np.float32)
    return np.asarray(_order_ref_subset(kept, kept_scores), dtype=np.int64)


def _order_ref_subset(indices: list[int], values: np.ndarray) -> list[int]:
    """`indices` by descending `values`, ties to the lower index; -0.0 and 0.0 are equal."""
    pairs = sorted(zip(indices, (float(v) for v in values)), key=lambda p: (-p[1], p[0]))
    return [i for i, _ in pairs]


def soft_nms_ref(
    boxes, scores, iou_threshold: float, sigma: float, method: str, score_threshold: float
) -> tuple[np.ndarray, np.ndarray]:
    """Soft-NMS (Bodla et al. 2017) as a plain loop over Python floats.

    Drops NaN scores and scores below `score_threshold`; then, until no box is left: select the highest
    current score (ties: lower index), emit it, and multiply every other remaining score by w = 1 - iou
    if iou > iou_threshold ("linear") or by w = math.exp(-(iou * iou) / sigma) if iou > 0 ("gaussian";
    iou = 0 gives w = 1 anyway); w = 0 sets the score to 0; scores now below `score_threshold` are
    dropped. Returns (indices int64, scores float32) in the order selected.
    """
    boxes = _as_boxes(boxes)
    scores = np.asarray(scores, dtype=np.float32).reshape(-1)
    with np.errstate(invalid="ignore", over="ignore"):
        areas = _areas(boxes)
    alive = [(i, float(scores[i])) for i in range(len(scores)) if not (scores[i] != scores[i])]
    alive = [(i, s) for i, s in alive if not s < score_threshold]
    out_idx: list[int] = []
    out_score: list[float] = []
    while alive:
        j = 0
        for k in range(1, len(alive)):
            if alive[k][1] > alive[j][1]:
                j = k
        top, top_score = alive[j]
        out_idx.append(top)
        out_score.append(top_score)
        box, area = [float(v) for v in boxes[top]], float(areas[top])
        rest = []
        for k, (i, s) in enumerate(alive):
            if k == j:
                continue
            iou = _iou_one(box, area, [float(v) for v in boxes[i]], float(areas[i]))
            if method == "linear":
                if iou > iou_threshold:
                    w = 1.0 - iou
                    s = 0.0 if w == 0.0 else s * w
            elif iou > 0.0:
                w = math.exp(-(iou * iou) / sigma)
                s = 0.0 if w == 0.0 else s * w
            if not s < score_threshold:
                rest.append((i, s))
        alive = rest
    return np.asarray(out_idx, dtype=np.int64), np.asarray(out_score, dtype=np.float64).astype(np.float32)


def filter_detections_ref(
    boxes,
    scores,
    class_ids=None,
    *,
    iou_threshold: float = 0.45,
    score_threshold: float = 0.0,
    pre_nms_top_k: int | None = None,
    max_detections: int | None = None,
    class_agnostic: bool = False,
    soft: str | None = None,
    sigma: float = 0.5,
) -> tuple[np.ndarray, np.ndarray]:
    """`dlc.runtime.boxes.filter_detections` spelt out: (kept indices, their scores)."""
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    scores = np.asarray(scores, dtype=np.float32).reshape(-1)
    with np.errstate(over="ignore"):
        thr32 = np.float32(score_threshold)
    cand = [i for i in range(len(scores)) if scores[i] > thr32]
    if pre_nms_top_k is not None:
        cand = sorted(_order_ref_subset(cand, scores[cand])[:pre_nms_top_k])
    cand = np.asarray(cand, dtype=np.int64)
    classes = (
        np.zeros(len(scores), dtype=np.int64)
        if class_ids is None or class_agnostic
        else np.asarray(class_ids).reshape(-1)
    )
    picked: list[int] = []
    values: list[float] = []
    for c in np.unique(classes[cand]):
        members = cand[classes[cand] == c]
        if soft is None:
            local = nms_ref(boxes[members], scores[members], iou_threshold)
            picked += members[local].tolist()
            values += scores[members[local]].tolist()
        else:
            local, rescored = soft_nms_ref(
                boxes[members], scores[members], iou_threshold, sigma, soft, score_threshold
            )
            picked += members[local].tolist()
            values += rescored.tolist()
    pairs = sorted(zip(picked, values), key=lambda p: (-p[1], p[0]))[:max_detections]
    return (
        np.asarray([p[0] for p in pairs], dtype=np.int64),
        np.asarray([p[1] for p in pairs], dtype=np.float32),
    )
