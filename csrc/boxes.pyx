# cython: language_level=3
"""Native box kernels: pairwise IoU and greedy non-maximum suppression.

Boxes are xyxy float32 (x1, y1, x2, y2). Every IoU is computed in double precision by `_iou`, the
one formula both kernels share, and matches `boxes_ref.py` bit for bit:

    w = max(0, min(x2a, x2b) - max(x1a, x1b)), h likewise, inter = w * h
    area = max(0, x2 - x1) * max(0, y2 - y1)        (inverted boxes have area 0)
    union = area_a + area_b - inter
    iou = inter / union if union > 0 else 0           (NaN anywhere gives 0)

A NaN coordinate makes that box's area NaN (the clamp below lets NaN through on purpose), so every
union it takes part in is NaN and its IoU is 0. Input validation for users lives in `dlc.runtime.boxes`;
the checks here only guard memory safety.
"""

import numpy as np

cimport numpy as cnp
from cython.parallel cimport prange

cnp.import_array()

# Below this many box pairs a thread team costs more than it saves.
cdef Py_ssize_t _PARALLEL_MIN_PAIRS = 4096


cdef inline double _clamp0(double d) noexcept nogil:
    """max(0, d) that keeps NaN (NaN < 0 is false), as numpy.maximum does."""
    return 0.0 if d < 0.0 else d


cdef inline double _area(double x1, double y1, double x2, double y2) noexcept nogil:
    return _clamp0(x2 - x1) * _clamp0(y2 - y1)


cdef inline double _iou(double ax1, double ay1, double ax2, double ay2, double area_a,
                        double bx1, double by1, double bx2, double by2, double area_b) noexcept nogil:
    cdef double w = _clamp0((ax2 if ax2 < bx2 else bx2) - (ax1 if ax1 > bx1 else bx1))
    cdef double h = _clamp0((ay2 if ay2 < by2 else by2) - (ay1 if ay1 > by1 else by1))
    cdef double inter = w * h
    cdef double union = area_a + area_b - inter
    cdef double iou
    if not (union > 0.0):
        return 0.0
    iou = inter / union
    if iou != iou:  # NaN (e.g. inf / inf): count as no overlap
        return 0.0
    return iou


cdef void _areas(const float[:, ::1] boxes, double[::1] out) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(boxes.shape[0]):
        out[i] = _area(boxes[i, 0], boxes[i, 1], boxes[i, 2], boxes[i, 3])


cdef inline void _iou_row(Py_ssize_t i, const float[:, ::1] a, const float[:, ::1] b,
                          const double[::1] area_a, const double[::1] area_b,
                          float[:, ::1] out) noexcept nogil:
    cdef Py_ssize_t j
    cdef double ax1 = a[i, 0], ay1 = a[i, 1], ax2 = a[i, 2], ay2 = a[i, 3], aa = area_a[i]
    for j in range(b.shape[0]):
        out[i, j] = <float>_iou(ax1, ay1, ax2, ay2, aa, b[j, 0], b[j, 1], b[j, 2], b[j, 3], area_b[j])


def box_iou(const float[:, ::1] a, const float[:, ::1] b):
    """Pairwise IoU of xyxy boxes `a` (N, 4) and `b` (M, 4) as a float32 (N, M) array."""
    if a.shape[1] != 4 or b.shape[1] != 4:
        raise ValueError(f"box_iou: boxes must be (N, 4), got a with {a.shape[1]} and b with {b.shape[1]} columns")
    cdef Py_ssize_t n = a.shape[0], m = b.shape[0], i
    out_arr = np.empty((n, m), dtype=np.float32)
    if n == 0 or m == 0:
        return out_arr
    cdef float[:, ::1] out = out_arr
    cdef double[::1] area_a = np.empty(n, dtype=np.float64)
    cdef double[::1] area_b = np.empty(m, dtype=np.float64)
    with nogil:
        _areas(a, area_a)
        _areas(b, area_b)
        if n * m > _PARALLEL_MIN_PAIRS:
            for i in prange(n, schedule="static"):
                _iou_row(i, a, b, area_a, area_b, out)
        else:
            for i in range(n):
                _iou_row(i, a, b, area_a, area_b, out)
    return out_arr


cdef Py_ssize_t _greedy_nms(const float[:, ::1] boxes, const double[::1] areas, const cnp.int64_t[::1] order,
                            double iou_threshold, float[:, ::1] kept_xyxy, double[::1] kept_area,
                            cnp.int64_t[::1] keep) noexcept nogil:
    """Walk `order` (best score first); keep a box unless its IoU with a kept box is > threshold.

    Kept boxes are copied into `kept_xyxy` (one row per coordinate, so the scan reads four contiguous
    streams) and `kept_area`. With a threshold >= 0 a pair that does not overlap on an axis has IoU 0,
    which suppresses nothing, so the scan skips it before the full IoU; that shortcut changes no result.
    Returns how many indices were written to `keep`.
    """
    cdef Py_ssize_t t, k, idx, nkeep = 0
    cdef float x1, y1, x2, y2
    cdef double area
    cdef bint suppressed, overlap, skip_disjoint = iou_threshold >= 0.0
    cdef const float[::1] kx1 = kept_xyxy[0], ky1 = kept_xyxy[1], kx2 = kept_xyxy[2], ky2 = kept_xyxy[3]
    for t in range(order.shape[0]):
        idx = order[t]
        x1 = boxes[idx, 0]
        y1 = boxes[idx, 1]
        x2 = boxes[idx, 2]
        y2 = boxes[idx, 3]
        area = areas[idx]
        suppressed = False
        for k in range(nkeep):
            # Same min/max as _iou, in float32 (exact): not overlapping on an axis means IoU 0. `&`, not
            # `and`: one branch instead of two, and it is almost always taken the same way.
            overlap = (((x2 if x2 < kx2[k] else kx2[k]) > (x1 if x1 > kx1[k] else kx1[k]))
                       & ((y2 if y2 < ky2[k] else ky2[k]) > (y1 if y1 > ky1[k] else ky1[k])))
            if skip_disjoint and not overlap:
                continue
            if _iou(x1, y1, x2, y2, area, kx1[k], ky1[k], kx2[k], ky2[k], kept_area[k]) > iou_threshold:
                suppressed = True
                break
        if not suppressed:
            kept_xyxy[0, nkeep] = x1
            kept_xyxy[1, nkeep] = y1
            kept_xyxy[2, nkeep] = x2
            kept_xyxy[3, nkeep] = y2
            kept_area[nkeep] = area
            keep[nkeep] = idx
            nkeep += 1
    return nkeep


def nms(const float[:, ::1] boxes, const float[::1] scores, double iou_threshold):
    """Greedy NMS over xyxy boxes (N, 4); returns kept indices (int64) in descending score order.

    Ties in score go to the lower index; NaN scores are dropped; a candidate is suppressed when its IoU
    with any already-kept box is strictly greater than `iou_threshold`.
    """
    if boxes.shape[1] != 4:
        raise ValueError(f"nms: boxes must be (N, 4), got {boxes.shape[1]} columns")
    if scores.shape[0] != boxes.shape[0]:
        raise ValueError(f"nms: scores has {scores.shape[0]} entries for {boxes.shape[0]} boxes")
    cdef Py_ssize_t n = boxes.shape[0], nkeep
    if n == 0:
        return np.empty(0, dtype=np.int64)
    s = np.asarray(scores)
    valid = np.flatnonzero(~np.isnan(s))
    order_arr = np.ascontiguousarray(valid[np.argsort(-s[valid], kind="stable")], dtype=np.int64)
    keep_arr = np.empty(order_arr.shape[0], dtype=np.int64)
    cdef const cnp.int64_t[::1] order = order_arr
    cdef cnp.int64_t[::1] keep = keep_arr
    cdef double[::1] areas = np.empty(n, dtype=np.float64)
    cdef float[:, ::1] kept_xyxy = np.empty((4, order_arr.shape[0]), dtype=np.float32)
    cdef double[::1] kept_area = np.empty(order_arr.shape[0], dtype=np.float64)
    with nogil:
        _areas(boxes, areas)
        nkeep = _greedy_nms(boxes, areas, order, iou_threshold, kept_xyxy, kept_area, keep)
    return keep_arr[:nkeep].copy()
