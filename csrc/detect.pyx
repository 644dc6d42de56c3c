# cython: language_level=3
"""Native YOLO-style decode of raw detection head maps (see detect_ref.py for the formulas and layout).

`decode(maps, anchors, strides, num_classes)` returns (N, K, 5 + C) float32 rows (x1, y1, x2, y2, objectness,
class probabilities...), scale by scale, anchor-major, then row, then column. Each (image, anchor) plane is
one unit of work on an OpenMP thread team; sigmoids are worked in double precision and rounded once.
"""

import numpy as np

from cython.parallel cimport prange
from libc.math cimport exp


cdef inline double _sigmoid(double v) nogil:
    if v >= 0:
        return 1.0 / (1.0 + exp(-v))
    cdef double e = exp(v)
    return e / (1.0 + e)


cdef void _decode_scale(const float[:, :, :, ::1] raw, const double[:, ::1] anchors, double sh, double sw,
                        float[:, :, ::1] out, Py_ssize_t offset, Py_ssize_t d) noexcept nogil:
    cdef Py_ssize_t n = raw.shape[0], h = raw.shape[2], w = raw.shape[3]
    cdef Py_ssize_t a = anchors.shape[0]
    cdef Py_ssize_t unit, b, ai, y, x, j, k, c0
    cdef double sx, sy, sw2, sh2, cx, cy, bw, bh
    for unit in prange(n * a, schedule="static"):
        b = unit // a
        ai = unit % a
        c0 = ai * d
        for y in range(h):
            for x in range(w):
                k = offset + (ai * h + y) * w + x
                sx = _sigmoid(raw[b, c0, y, x])
                sy = _sigmoid(raw[b, c0 + 1, y, x])
                sw2 = 2.0 * _sigmoid(raw[b, c0 + 2, y, x])
                sh2 = 2.0 * _sigmoid(raw[b, c0 + 3, y, x])
                cx = (2.0 * sx - 0.5 + x) * sw
                cy = (2.0 * sy - 0.5 + y) * sh
                bw = sw2 * sw2 * anchors[ai, 0]
                bh = sh2 * sh2 * anchors[ai, 1]
                out[b, k, 0] = <float>(cx - bw / 2)
                out[b, k, 1] = <float>(cy - bh / 2)
                out[b, k, 2] = <float>(cx + bw / 2)
                out[b, k, 3] = <float>(cy + bh / 2)
                for j in range(4, d):
                    out[b, k, j] = <float>_sigmoid(raw[b, c0 + j, y, x])


def decode(maps, anchors, strides, int num_classes):
    """maps: per scale float32 (N, A·(5+C), H, W); anchors: per scale (A, 2) [w, h] in input pixels;
    strides: per scale (sh, sw). Returns float32 (N, K, 5 + C)."""
    cdef Py_ssize_t d = 5 + num_classes
    if len(maps) == 0 or len(maps) != len(anchors) or len(maps) != len(strides):
        raise ValueError(f"decode: need one map, one anchor set and one stride per scale, got {len(maps)}, "
                         f"{len(anchors)}, {len(strides)}")
    prepared, total = [], 0
    n = None
    for i, (m, anc, st) in enumerate(zip(maps, anchors, strides)):
        raw = np.ascontiguousarray(m, dtype=np.float32)
        anc = np.ascontiguousarray(anc, dtype=np.float64).reshape(-1, 2)
        if raw.ndim != 4 or raw.shape[1] != anc.shape[0] * d:
            raise ValueError(f"decode: map {i} must be (N, {anc.shape[0]}·{d}, H, W) for {anc.shape[0]} anchors "
                             f"and {num_classes} classes, got {raw.shape}")
        if n is None:
            n = raw.shape[0]
        elif raw.shape[0] != n:
            raise ValueError(f"decode: map {i} has batch {raw.shape[0]}, map 0 has {n}")
        prepared.append((raw, anc, float(st[0]), float(st[1]), total))
        total += anc.shape[0] * raw.shape[2] * raw.shape[3]
    out = np.empty((n, total, d), dtype=np.float32)
    cdef float[:, :, ::1] o = out
    for raw, anc, sh, sw, offset in prepared:
        _decode_scale(raw, anc, sh, sw, o, offset, d)
    return out
