# cython: language_level=3
# distutils: extra_compile_args = -fno-trapping-math
# (-fno-trapping-math lets gcc vectorise the IoU matrix rows; it changes no value, only FP-exception flags.)
"""Native box kernels: pairwise IoU/GIoU/DIoU/CIoU, greedy NMS (single-class and batched) and Soft-NMS.

Boxes are xyxy float32 (x1, y1, x2, y2). Every IoU is computed in double precision by `_iou`, the
one formula all kernels share, and matches `boxes_ref.py` bit for bit:

    w = max(0, min(x2a, x2b) - max(x1a, x1b)), h likewise, inter = w * h
    area = max(0, x2 - x1) * max(0, y2 - y1)        (inverted boxes have area 0)
    union = area_a + area_b - inter
    iou = inter / union if union > 0 else 0           (NaN anywhere gives 0)

A NaN coordinate makes that box's area NaN (the clamp below lets NaN through on purpose), so every
union it takes part in is NaN and its IoU is 0. Input validation for users lives in `dlc.runtime.boxes`;
the checks here only guard memory safety.

Greedy NMS uses a uniform grid over the kept boxes. Only boxes with a finite area > 0 ("participants",
whose coordinates are then all finite) can have IoU > 0 with anything; every other box has IoU exactly 0
with every box, so for a threshold >= 0 it is kept and suppresses nothing. Two participants with IoU > 0
overlap strictly on both axes, and the cell of a coordinate is a monotone function of it, so they share at
least one grid cell: looking only at the kept boxes in the candidate's cells finds every box that the
plain greedy scan would find, and the result is identical to it. The threshold narrows the cells further
(see `_query_range`: for a threshold >= 0.5 a single cell, read by the candidate or, in a sparse class,
written by the kept box; see `_greedy_class`), and `_suppresses` skips most divisions; both are exact, and the tests check the result against the plain greedy reference on adversarial inputs.
Scores are ordered by an LSD radix sort on (descending score, index) keys (`_order_desc`).
"""

import numpy as np

cimport numpy as cnp
from cython.parallel cimport prange
from libc.math cimport atan2, exp, fabs, sqrt
from libc.stdint cimport int32_t, int64_t, uint8_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memcpy, memset

cnp.import_array()

# Below this many box pairs a thread team costs more than it saves.
cdef Py_ssize_t _PARALLEL_MIN_PAIRS = 4096
# Up to this many boxes a class is scanned without a grid (building one costs more).
cdef Py_ssize_t _GRID_MIN = 48
# Samples taken to estimate the typical box size (the median) that sets the cell size.
cdef enum:
    _SAMPLES = 96

KIND_IOU = 0
KIND_GIOU = 1
KIND_DIOU = 2
KIND_CIOU = 3
SOFT_LINEAR = 0
SOFT_GAUSSIAN = 1

cdef double _INF = float("inf")
cdef double _FOUR_OVER_PI2 = 4.0 / (3.141592653589793 * 3.141592653589793)


cdef extern from *:
    """
    /* Plain C selects: Cython would expand `a if c else b` into if/else, which keeps gcc from
       vectorising the IoU matrix rows. Same semantics as the Cython expressions they replace. */
    static inline double dlc_min(double a, double b) { return a < b ? a : b; }
    static inline double dlc_max(double a, double b) { return a > b ? a : b; }
    static inline double dlc_nonneg(double d) { return d < 0.0 ? 0.0 : d; }
    static inline double dlc_select(int c, double a, double b) { return c ? a : b; }
    /* IoU of box a with box b (areas aa, ba), 0 for a zero union or NaN; the union goes to *u. One copy of
       the arithmetic for every kind of the vectorised matrix row (inlined, so it still vectorises). */
    static inline double dlc_iou(double ax1, double ay1, double ax2, double ay2, double aa,
                                 double bx1, double by1, double bx2, double by2, double ba, double* u) {
        double w = dlc_min(ax2, bx2) - dlc_max(ax1, bx1);
        double h = dlc_min(ay2, by2) - dlc_max(ay1, by1);
        double inter = dlc_nonneg(w) * dlc_nonneg(h);
        double uni = aa + ba - inter;
        double q = dlc_select(uni > 0.0, inter / uni, 0.0);
        *u = uni;
        return dlc_select(q == q, q, 0.0);
    }
    """
    double _min "dlc_min"(double a, double b) noexcept nogil
    double _max "dlc_max"(double a, double b) noexcept nogil
    double _nonneg "dlc_nonneg"(double d) noexcept nogil
    double _select "dlc_select"(bint c, double a, double b) noexcept nogil
    double _iou_u "dlc_iou"(double ax1, double ay1, double ax2, double ay2, double aa, double bx1, double by1,
                            double bx2, double by2, double ba, double* u) noexcept nogil


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


cdef inline double _iou_kind(int kind, double ax1, double ay1, double ax2, double ay2, double area_a, double ang_a,
                             double bx1, double by1, double bx2, double by2, double area_b,
                             double ang_b) noexcept nogil:
    """IoU (kind 0), GIoU (1), DIoU (2) or CIoU (3), in the exact operation order of boxes_ref.box_iou_ref.

    A penalty whose denominator is not > 0 (enclosing area or diagonal 0, CIoU's 1 - iou + v at 0) is 0,
    and any NaN result is 0.
    """
    cdef double w = _clamp0((ax2 if ax2 < bx2 else bx2) - (ax1 if ax1 > bx1 else bx1))
    cdef double h = _clamp0((ay2 if ay2 < by2 else by2) - (ay1 if ay1 > by1 else by1))
    cdef double inter = w * h
    cdef double union = area_a + area_b - inter
    cdef double iou = 0.0, cw, ch, c, dx, dy, d, v, den, r
    if union > 0.0:
        iou = inter / union
        if iou != iou:
            iou = 0.0
    if kind == 0:
        return iou
    cw = _clamp0((ax2 if ax2 > bx2 else bx2) - (ax1 if ax1 < bx1 else bx1))
    ch = _clamp0((ay2 if ay2 > by2 else by2) - (ay1 if ay1 < by1 else by1))
    if kind == 1:
        c = cw * ch
        r = iou - (c - union) / c if c > 0.0 else iou
    else:
        c = cw * cw + ch * ch
        dx = (ax1 + ax2) / 2.0 - (bx1 + bx2) / 2.0
        dy = (ay1 + ay2) / 2.0 - (by1 + by2) / 2.0
        d = dx * dx + dy * dy
        r = iou - d / c if c > 0.0 else iou
        if kind == 3:
            v = _FOUR_OVER_PI2 * ((ang_b - ang_a) * (ang_b - ang_a))
            den = 1.0 - iou + v
            if den > 0.0:
                r = r - (v / den) * v
    return 0.0 if r != r else r


cdef void _areas(const float[:, ::1] boxes, double* out) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(boxes.shape[0]):
        out[i] = _area(boxes[i, 0], boxes[i, 1], boxes[i, 2], boxes[i, 3])


cdef void _angles(const float[:, ::1] boxes, double[::1] out) noexcept nogil:
    """CIoU's aspect-ratio angle atan(w / h), as atan2 of the clamped sides (0 for w = h = 0)."""
    cdef Py_ssize_t i
    for i in range(boxes.shape[0]):
        out[i] = atan2(_clamp0(<double>boxes[i, 2] - boxes[i, 0]), _clamp0(<double>boxes[i, 3] - boxes[i, 1]))


cdef void _iou_row(int kind, double ax1, double ay1, double ax2, double ay2, double aa, double ga,
                   const double* b, Py_ssize_t m, float* out) noexcept nogil:
    """One row of the IoU-family matrix against the columns in `b` (8 rows of m: x1, y1, x2, y2, area,
    angle, centre x, centre y). The same operations as `_iou_kind`, written without branches (every
    quotient is computed, then selected) so that the compiler vectorises the loop; the values are
    identical, and a quotient that is not selected never reaches the output."""
    cdef const double* bx1 = b
    cdef const double* by1 = b + m
    cdef const double* bx2 = b + 2 * m
    cdef const double* by2 = b + 3 * m
    cdef const double* ba = b + 4 * m
    cdef const double* bg = b + 5 * m
    cdef const double* bcx = b + 6 * m
    cdef const double* bcy = b + 7 * m
    cdef double acx = (ax1 + ax2) / 2.0, acy = (ay1 + ay2) / 2.0
    cdef double union, q, iou, cw, ch, c, r, dx, dy, d, v, den
    cdef Py_ssize_t j
    if kind == 0:
        for j in range(m):
            out[j] = <float>_iou_u(ax1, ay1, ax2, ay2, aa, bx1[j], by1[j], bx2[j], by2[j], ba[j], &union)
    elif kind == 1:
        for j in range(m):
            iou = _iou_u(ax1, ay1, ax2, ay2, aa, bx1[j], by1[j], bx2[j], by2[j], ba[j], &union)
            cw = _max(ax2, bx2[j]) - _min(ax1, bx1[j])
            ch = _max(ay2, by2[j]) - _min(ay1, by1[j])
            c = _nonneg(cw) * _nonneg(ch)
            r = iou - (c - union) / c
            r = _select(c > 0.0, r, iou)
            out[j] = <float>_select(r == r, r, 0.0)
    else:
        for j in range(m):
            iou = _iou_u(ax1, ay1, ax2, ay2, aa, bx1[j], by1[j], bx2[j], by2[j], ba[j], &union)
            cw = _max(ax2, bx2[j]) - _min(ax1, bx1[j])
            ch = _max(ay2, by2[j]) - _min(ay1, by1[j])
            cw = _nonneg(cw)
            ch = _nonneg(ch)
            c = cw * cw + ch * ch
            dx = acx - bcx[j]
            dy = acy - bcy[j]
            d = dx * dx + dy * dy
            r = iou - d / c
            r = _select(c > 0.0, r, iou)
            if kind == 3:
                v = _FOUR_OVER_PI2 * ((bg[j] - ga) * (bg[j] - ga))
                den = 1.0 - iou + v
                q = r - (v / den) * v
                r = _select(den > 0.0, q, r)
            out[j] = <float>_select(r == r, r, 0.0)


def box_iou(const float[:, ::1] a, const float[:, ::1] b, int kind=0):
    """Pairwise IoU (kind 0), GIoU (1), DIoU (2) or CIoU (3) of xyxy boxes `a` (N, 4) and `b` (M, 4), float32 (N, M)."""
    if a.shape[1] != 4 or b.shape[1] != 4:
        raise ValueError(f"box_iou: boxes must be (N, 4), got a with {a.shape[1]} and b with {b.shape[1]} columns")
    if kind < 0 or kind > 3:
        raise ValueError(f"box_iou: kind must be 0..3, got {kind}")
    cdef Py_ssize_t n = a.shape[0], m = b.shape[0], i, j
    out_arr = np.empty((n, m), dtype=np.float32)
    if n == 0 or m == 0:
        return out_arr
    cdef float[:, ::1] out = out_arr
    cdef double[::1] area_a = np.empty(n, dtype=np.float64)
    cdef double[::1] ang_a = np.zeros(n, dtype=np.float64)
    cdef double[::1] cols = np.empty(8 * m, dtype=np.float64)
    with nogil:
        _areas(a, &area_a[0])
        _areas(b, &cols[4 * m])
        if kind == 3:
            _angles(a, ang_a)
            _angles(b, cols[5 * m:6 * m])
        for j in range(m):
            cols[j] = b[j, 0]
            cols[m + j] = b[j, 1]
            cols[2 * m + j] = b[j, 2]
            cols[3 * m + j] = b[j, 3]
            cols[6 * m + j] = (<double>b[j, 0] + <double>b[j, 2]) / 2.0
            cols[7 * m + j] = (<double>b[j, 1] + <double>b[j, 3]) / 2.0
        if n * m > _PARALLEL_MIN_PAIRS:
            for i in prange(n, schedule="dynamic", chunksize=16):
                _iou_row(kind, a[i, 0], a[i, 1], a[i, 2], a[i, 3], area_a[i], ang_a[i], &cols[0], m, &out[i, 0])
        else:
            for i in range(n):
                _iou_row(kind, a[i, 0], a[i, 1], a[i, 2], a[i, 3], area_a[i], ang_a[i], &cols[0], m, &out[i, 0])
    return out_arr


def box_angles(const float[:, ::1] boxes):
    """atan2(max(0, w), max(0, h)) per box: the libm values CIoU uses, for the reference to share."""
    out = np.empty(boxes.shape[0], dtype=np.float64)
    cdef double[::1] o = out
    with nogil:
        _angles(boxes, o)
    return out


# ---------------------------------------------------------------------------------------------------------
# Score order: a stable LSD radix sort on (descending score key, index)


cdef inline uint64_t _desc_key(float f, Py_ssize_t i) noexcept nogil:
    """A uint64 whose ascending order is descending score, then ascending index; -0.0 ranks as +0.0."""
    cdef uint32_t u
    if f == 0.0:
        f = 0.0
    memcpy(&u, &f, 4)
    # Map IEEE bits to an unsigned order (negatives reversed), then flip it for descending scores.
    u = u ^ (<uint32_t>0xFFFFFFFF if (u >> 31) else <uint32_t>0x80000000)
    u = ~u
    return ((<uint64_t>u) << 32) | <uint64_t>i


cdef Py_ssize_t _order_desc(const float* s, Py_ssize_t n, int64_t* out, uint64_t* a, uint64_t* b) noexcept nogil:
    """Indices of the non-NaN scores by descending score, ties to the lower index; returns their count.

    LSD radix sort of the 32-bit keys in three passes of 11, 11 and 10 bits (a pass whose digit is the
    same for every key is skipped); the index rides in the low half of each 64-bit item.
    """
    cdef Py_ssize_t i, j, cnt = 0, pass_
    cdef uint64_t v
    cdef uint64_t* tmp
    cdef Py_ssize_t hist[3][2048]
    cdef Py_ssize_t total, h
    cdef int shift, d
    cdef bint trivial
    memset(&hist[0][0], 0, sizeof(hist))
    for i in range(n):  # keys and all three digit histograms in one pass
        if s[i] != s[i]:
            continue
        v = _desc_key(s[i], i)
        a[cnt] = v
        cnt += 1
        v = v >> 32
        hist[0][v & 2047] += 1
        hist[1][(v >> 11) & 2047] += 1
        hist[2][(v >> 22) & 1023] += 1
    if cnt <= 32:
        for i in range(1, cnt):  # insertion sort: the full 64-bit value orders by key, then index
            v = a[i]
            j = i - 1
            while j >= 0 and a[j] > v:
                a[j + 1] = a[j]
                j -= 1
            a[j + 1] = v
    else:
        # Input is in index order and every pass is stable, so equal keys stay in index order.
        for pass_ in range(3):
            shift = 32 + 11 * pass_
            trivial = False
            total = 0
            for d in range(2048):
                h = hist[pass_][d]
                if h == cnt:
                    trivial = True
                    break
                hist[pass_][d] = total  # counts become start positions
                total += h
            if trivial:
                continue
            for i in range(cnt):
                d = (a[i] >> shift) & 2047
                b[hist[pass_][d]] = a[i]
                hist[pass_][d] += 1
            tmp = a
            a = b
            b = tmp
    for i in range(cnt):
        out[i] = <int64_t>(a[i] & <uint64_t>0xFFFFFFFFu)
    return cnt


def order_desc(const float[::1] scores):
    """Indices of the non-NaN `scores` by descending score (ties: lower index first), int64."""
    cdef Py_ssize_t n = scores.shape[0], cnt = 0
    if n >= 2**31:
        raise ValueError("order_desc: at most 2**31 - 1 scores")
    out = np.empty(n, dtype=np.int64)
    if n == 0:
        return out
    cdef int64_t[::1] o = out
    cdef uint64_t[::1] a = np.empty(n, dtype=np.uint64)
    cdef uint64_t[::1] b = np.empty(n, dtype=np.uint64)
    with nogil:
        cnt = _order_desc(&scores[0], n, &o[0], &a[0], &b[0])
    return out[:cnt]


# ---------------------------------------------------------------------------------------------------------
# Greedy NMS over one segment of boxes in score order, with a uniform grid over the kept boxes


cdef struct Entry:
    float x1, y1, x2, y2
    double area


cdef enum:
    _CHUNK = 6  # entries per chunk of a cell's list: one dependent load per chunk, not per entry


cdef struct Chunk:
    Entry e[_CHUNK]
    int32_t n     # entries used
    int32_t next  # the cell's next (older) chunk, or -1


cdef struct Work:
    Py_ssize_t n_cap          # capacity of the per-box buffers below
    Py_ssize_t cells_cap      # capacity of head
    Py_ssize_t arena_cap
    # per call: score order, sort keys, kept indices
    int64_t* order
    uint64_t* ka
    uint64_t* kb
    int64_t* keep
    # the boxes gathered by class (class c: slots cstart[c]:cstart[c + 1]), each class in score order:
    # xyxy, area and score-order position; and a kept flag per score-order position
    float* gx
    double* ga
    int32_t* pos
    Py_ssize_t* cstart
    uint8_t* kept
    # per kept box of the class being scanned, for the linear scan and the big list
    float* kx1
    float* ky1
    float* kx2
    float* ky2
    double* karea
    Py_ssize_t* big
    # the grid: per cell, a list of chunks of the kept boxes that cover it, newest chunk first
    Chunk* arena
    int32_t* head


cdef int _grow(void** p, size_t size) noexcept nogil:
    cdef void* q = realloc(p[0], size if size > 0 else 1)
    if q == NULL:
        return -1
    p[0] = q
    return 0


cdef int _work_reserve(Work* w, Py_ssize_t n, Py_ssize_t ncls) noexcept nogil:
    """Make the buffers big enough for n boxes in ncls classes; returns 0, or -1 when out of memory."""
    cdef Py_ssize_t cells = 2 * n + 64 + ncls
    cdef int bad = 0
    if n < 1:
        n = 1
    if n > w.n_cap:
        bad |= _grow(<void**>&w.order, n * sizeof(int64_t))
        bad |= _grow(<void**>&w.ka, n * sizeof(uint64_t))
        bad |= _grow(<void**>&w.kb, n * sizeof(uint64_t))
        bad |= _grow(<void**>&w.keep, n * sizeof(int64_t))
        bad |= _grow(<void**>&w.gx, 4 * n * sizeof(float))
        bad |= _grow(<void**>&w.ga, n * sizeof(double))
        bad |= _grow(<void**>&w.kept, n * sizeof(uint8_t))
        bad |= _grow(<void**>&w.pos, n * sizeof(int32_t))
        bad |= _grow(<void**>&w.kx1, n * sizeof(float))
        bad |= _grow(<void**>&w.ky1, n * sizeof(float))
        bad |= _grow(<void**>&w.kx2, n * sizeof(float))
        bad |= _grow(<void**>&w.ky2, n * sizeof(float))
        bad |= _grow(<void**>&w.karea, n * sizeof(double))
        bad |= _grow(<void**>&w.big, n * sizeof(Py_ssize_t))
        if bad:
            w.n_cap = 0  # some buffers grew, some did not: grow them all again next time
            return -1
        w.n_cap = n
    if cells > w.cells_cap:
        bad |= _grow(<void**>&w.head, cells * sizeof(int32_t))
        bad |= _grow(<void**>&w.cstart, (cells + 1) * sizeof(Py_ssize_t))
        if bad:
            w.cells_cap = 0
            return -1
        w.cells_cap = cells
    if n > w.arena_cap:
        if _grow(<void**>&w.arena, n * sizeof(Chunk)):
            w.arena_cap = 0
            return -1
        w.arena_cap = n
    return 0


cdef void _work_free(Work* w) noexcept nogil:
    free(w.order)
    free(w.ka)
    free(w.kb)
    free(w.keep)
    free(w.gx)
    free(w.ga)
    free(w.kept)
    free(w.pos)
    free(w.cstart)
    free(w.kx1)
    free(w.ky1)
    free(w.kx2)
    free(w.ky2)
    free(w.karea)
    free(w.big)
    free(w.arena)
    free(w.head)
    memset(w, 0, sizeof(Work))


# One set of buffers is kept between calls: fresh ones cost page faults on every call (a tenth of the time
# for 10k boxes). A call that finds them busy (another thread inside NMS) uses its own. Buffers for more
# than _CACHE_MAX_BOXES boxes are not kept.
cdef Work _shared
cdef bint _shared_busy = False
cdef Py_ssize_t _CACHE_MAX_BOXES = 1 << 20


cdef Work* _acquire(Work* local):
    """Called with the GIL held, which makes the busy flag's test-and-set atomic."""
    global _shared_busy
    if not _shared_busy:
        _shared_busy = True
        return &_shared
    memset(local, 0, sizeof(Work))
    return local


cdef void _release(Work* w):
    global _shared_busy
    if w == &_shared:
        if _shared.n_cap > _CACHE_MAX_BOXES:
            _work_free(&_shared)
        _shared_busy = False
    else:
        _work_free(w)


cdef inline bint _suppresses(float x1, float y1, float x2, float y2, double area,
                             float bx1, float by1, float bx2, float by2, double barea, double thr) noexcept nogil:
    """_iou(...) > thr, exactly, for thr >= 0 and boxes of finite positive area.

    Pairs that do not overlap on an axis (same min/max as _iou, in exact float32) have IoU 0. Otherwise
    inter and union are computed as in _iou, and the division is skipped when inter is clearly above or
    below thr * union: fl(inter / union) > thr whenever inter > thr * union * (1 + 1e-12), as rounding
    moves a quotient by far less than that margin, and likewise below.
    """
    cdef double w, h, inter, union, p
    if not (((x2 if x2 < bx2 else bx2) > (x1 if x1 > bx1 else bx1))
            & ((y2 if y2 < by2 else by2) > (y1 if y1 > by1 else by1))):
        return False
    w = <double>(x2 if x2 < bx2 else bx2) - <double>(x1 if x1 > bx1 else bx1)
    h = <double>(y2 if y2 < by2 else by2) - <double>(y1 if y1 > by1 else by1)
    inter = w * h
    union = area + barea - inter
    p = thr * union
    if union > 0.0 and p > 1e-290:  # p normal: its relative rounding error is 2**-53
        if inter > p * 1.000000000001:
            return True
        if inter < p * 0.999999999999:
            return False
    return _iou(x1, y1, x2, y2, area, bx1, by1, bx2, by2, barea) > thr


cdef inline Py_ssize_t _cell(double v, double origin, double scale, Py_ssize_t g) noexcept nogil:
    """Grid column/row of coordinate v: monotone in v, clamped to [0, g - 1]."""
    cdef double d = (v - origin) * scale
    if not (d > 0.0):
        return 0
    if d >= <double>g:
        return g - 1
    return <Py_ssize_t>d


cdef inline bint _participant(double area) noexcept nogil:
    return area > 0.0 and area < _INF


cdef double _median(double* v, Py_ssize_t n) noexcept nogil:
    """The element of rank n // 2 of v[0:n] (reorders v): quickselect, O(n) on average."""
    cdef Py_ssize_t lo = 0, hi = n - 1, i, j, k = n // 2
    cdef double pivot, tmp
    while lo < hi:
        pivot = v[(lo + hi) // 2]
        i = lo
        j = hi
        while i <= j:
            while v[i] < pivot:
                i += 1
            while v[j] > pivot:
                j -= 1
            if i <= j:
                tmp = v[i]
                v[i] = v[j]
                v[j] = tmp
                i += 1
                j -= 1
        if k <= j:
            hi = j
        elif k >= i:
            lo = i
        else:
            break
    return v[k]


cdef Py_ssize_t _grid_size(double extent, double cell, double maxc) noexcept nogil:
    cdef double g = extent / cell if cell > 0.0 else 1.0
    if not (g >= 1.0):
        return 1
    if g > maxc:
        return <Py_ssize_t>maxc
    return <Py_ssize_t>g


cdef inline void _query_range(float lo, float hi, double tt, double origin, double scale, Py_ssize_t g,
                              Py_ssize_t* q_lo, Py_ssize_t* q_hi) noexcept nogil:
    """Cells on one axis that a kept box with IoU > threshold must cover, for a candidate spanning [lo, hi].

    IoU > t needs inter > t * union >= t * area_cand, and inter <= (overlap on this axis) * (candidate's
    extent on the other), so the overlap on this axis exceeds t * size: the kept box has k_lo < A = hi - t *
    size and k_hi > B = lo + t * size. It covers the cells of [k_lo, k_hi], which meet [cell(B), cell(A)]
    (t < 1/2) or contain cell(A) (t >= 1/2, when B >= A). `tt` is the threshold shrunk by 2e-6 relative,
    which absorbs IoU's and A's rounding; where the coordinates are too large next to the size for that
    margin to be safe, the plain range [cell(lo), cell(hi)] is used (any overlapping box shares a cell).
    """
    cdef double size = <double>hi - lo, a, b
    cdef double lim = (fabs(<double>lo) + fabs(<double>hi)) * 1e-9
    if tt * size > lim:
        a = hi - tt * size
        b = lo + tt * size
        q_hi[0] = _cell(a, origin, scale, g)
        q_lo[0] = _cell(b, origin, scale, g) if b < a else q_hi[0]
    else:
        q_lo[0] = _cell(lo, origin, scale, g)
        q_hi[0] = _cell(hi, origin, scale, g)


cdef int _greedy_class(Work* w, Py_ssize_t s, Py_ssize_t e_, double thr, double tt, bint use_grid,
                       Py_ssize_t gw, Py_ssize_t gh, double bx0, double by0, double sx, double sy,
                       Py_ssize_t big_cells) noexcept nogil:
    """Greedy NMS over the gathered boxes s:e_, all of one class and in score order; sets w.kept[t] (t their
    score-order positions, w.pos) for the participants it keeps. Returns 0, or -1 when out of memory.

    Classes run one at a time, so one class's grid, boxes and kept boxes stay in cache. The grid: each
    kept box is stored in every cell it covers, and a candidate reads only the cells that `_query_range`
    names (for a threshold >= 0.5 one cell). In a sparse class (no more boxes than cells) most boxes are
    kept, so the roles swap: a kept box is stored only in the cells `_query_range` names for it, and a
    candidate reads every cell it covers. That is exact too: IoU is symmetric, so the bound that
    `_query_range` proves for a suppressing kept box holds for the candidate it suppresses, whose cells
    then meet the kept box's. A kept box that would fill more than `big_cells` cells goes to the `big`
    list instead, checked by every candidate. A cell's entries form a list of chunks taken from one arena
    in keep order: only kept boxes cost memory and time, with no pass over all boxes to reserve slots.
    """
    cdef Py_ssize_t p, k, cx, cy, nkp = 0, nbig = 0, nent = 0, need, cap
    cdef Py_ssize_t cx1, cx2, cy1, cy2, qx1 = 0, qx2 = 0, qy1 = 0, qy2 = 0
    cdef int32_t e, j
    cdef float x1, y1, x2, y2
    cdef double area
    cdef bint suppressed, sparse
    cdef const float* g
    cdef Entry* ent
    cdef Chunk* ch_
    cdef Chunk* grown
    # Local copies of the buffers: the kept flags are bytes, which may alias anything, so fields read
    # through `w` would be reloaded after every store.
    cdef const float* gx = w.gx
    cdef const double* ga = w.ga
    cdef uint8_t* kept = w.kept
    cdef const int32_t* pos = w.pos
    cdef int32_t* head = w.head
    cdef Chunk* arena = w.arena
    cdef float* kx1 = w.kx1
    cdef float* ky1 = w.ky1
    cdef float* kx2 = w.kx2
    cdef float* ky2 = w.ky2
    cdef double* karea = w.karea
    cdef Py_ssize_t* big = w.big
    cdef Py_ssize_t arena_cap = w.arena_cap
    use_grid = use_grid and e_ - s > _GRID_MIN  # a grid costs more than it saves on a small class
    sparse = e_ - s <= gw * gh
    if use_grid:
        memset(head, 0xFF, gw * gh * sizeof(int32_t))  # every cell's list empty (-1)
    for p in range(s, e_):
        area = ga[p]
        if not _participant(area):  # already kept: see _greedy_nms
            continue
        g = gx + 4 * p
        x1 = g[0]
        y1 = g[1]
        x2 = g[2]
        y2 = g[3]
        suppressed = False
        if use_grid and sparse:
            qx1 = _cell(x1, bx0, sx, gw)
            qx2 = _cell(x2, bx0, sx, gw)
            qy1 = _cell(y1, by0, sy, gh)
            qy2 = _cell(y2, by0, sy, gh)
        elif use_grid:
            _query_range(x1, x2, tt, bx0, sx, gw, &qx1, &qx2)
            _query_range(y1, y2, tt, by0, sy, gh, &qy1, &qy2)
        if not use_grid or (qx2 - qx1 + 1) * (qy2 - qy1 + 1) > nkp:
            for k in range(nkp):
                if _suppresses(x1, y1, x2, y2, area, kx1[k], ky1[k], kx2[k], ky2[k], karea[k], thr):
                    suppressed = True
                    break
        else:
            cy = qy1
            while not suppressed and cy <= qy2:
                for cx in range(qx1, qx2 + 1):
                    e = head[cy * gw + cx]
                    while e >= 0 and not suppressed:
                        ch_ = &arena[e]
                        for j in range(ch_.n):
                            ent = &ch_.e[j]
                            if _suppresses(x1, y1, x2, y2, area, ent.x1, ent.y1, ent.x2, ent.y2, ent.area, thr):
                                suppressed = True
                                break
                        e = ch_.next
                    if suppressed:
                        break
                cy += 1
            k = 0
            while not suppressed and k < nbig:
                e = <int32_t>big[k]
                suppressed = _suppresses(x1, y1, x2, y2, area, kx1[e], ky1[e], kx2[e], ky2[e], karea[e], thr)
                k += 1
        if suppressed:
            continue
        kept[pos[p]] = 1
        kx1[nkp] = x1
        ky1[nkp] = y1
        kx2[nkp] = x2
        ky2[nkp] = y2
        karea[nkp] = area
        if use_grid:
            if sparse:
                _query_range(x1, x2, tt, bx0, sx, gw, &cx1, &cx2)
                _query_range(y1, y2, tt, by0, sy, gh, &cy1, &cy2)
            else:
                cx1 = _cell(x1, bx0, sx, gw)
                cx2 = _cell(x2, bx0, sx, gw)
                cy1 = _cell(y1, by0, sy, gh)
                cy2 = _cell(y2, by0, sy, gh)
            need = nent + (cx2 - cx1 + 1) * (cy2 - cy1 + 1)  # at most one new chunk per cell
            if need - nent > big_cells:
                big[nbig] = nkp
                nbig += 1
            else:
                if need > arena_cap:
                    if need > 0x7FFFFFFF:  # chunks are linked by int32 positions
                        return -1
                    cap = 2 * arena_cap if 2 * arena_cap > need else need
                    if cap > 0x7FFFFFFF:
                        cap = 0x7FFFFFFF
                    grown = <Chunk*>realloc(arena, cap * sizeof(Chunk))
                    if grown == NULL:
                        return -1
                    arena = w.arena = grown
                    arena_cap = w.arena_cap = cap
                for cy in range(cy1, cy2 + 1):
                    for cx in range(cx1, cx2 + 1):
                        e = head[cy * gw + cx]
                        if e < 0 or arena[e].n == _CHUNK:  # start a new chunk in front
                            arena[nent].n = 0
                            arena[nent].next = e
                            e = <int32_t>nent
                            head[cy * gw + cx] = e
                            nent += 1
                        ch_ = &arena[e]
                        ent = &ch_.e[ch_.n]
                        ch_.n += 1
                        ent.x1 = x1
                        ent.y1 = y1
                        ent.x2 = x2
                        ent.y2 = y2
                        ent.area = area
        nkp += 1
    return 0


cdef Py_ssize_t _greedy_nms(const float[:, ::1] boxes, const int64_t* order,
                            Py_ssize_t m, const int64_t* cls, Py_ssize_t ncls, double thr, double cell_scale,
                            Py_ssize_t big_cells, Work* w, int64_t* keep) noexcept nogil:
    """Greedy NMS over boxes order[0:m] (best score first); writes kept indices to `keep` in that order.

    With `cls` (class numbers in [0, ncls)), only boxes of the same class suppress each other; NULL means
    one class. The boxes are gathered in score order, the participants grouped by class (stably, so each
    class stays in score order) and every class scanned on its own by `_greedy_class`; one pass over the
    kept flags then lists the kept boxes of all classes in the global score order, with no merge and no
    coordinate offsets. All classes share one grid geometry: cells are `cell_scale` times the median box
    size (sampled) over the bounds of all participants, with at most about 2 * participants / ncls cells.
    Returns how many were kept, or -1 when out of memory.
    """
    cdef Py_ssize_t t, i, c, k, nkeep = 0, npart = 0, nsamp = 0, step, next_sample = 0, total, h
    cdef Py_ssize_t gw = 1, gh = 1
    cdef double bx0 = _INF, by0 = _INF, bx1 = -_INF, by1 = -_INF, ex, ey, sx = 0, sy = 0, maxc, f
    cdef double cw, ch, tt
    cdef double sw[_SAMPLES]
    cdef double sh[_SAMPLES]
    cdef bint use_grid
    cdef float* g
    if m == 0:
        return 0
    if ncls < 1:
        ncls = 1
    if thr < 0.0:  # every IoU (>= 0) is > thr: the best box of each class suppresses the rest of it
        if cls == NULL:
            keep[0] = order[0]
            return 1
        for c in range(ncls):
            w.head[c] = 0
        for t in range(m):
            if w.head[cls[order[t]]] == 0:
                w.head[cls[order[t]]] = 1
                keep[nkeep] = order[t]
                nkeep += 1
        return nkeep
    tt = (thr if thr < 1.0 else 1.0) * (1.0 - 2e-6)
    step = m // _SAMPLES + 1
    # Class c's boxes go to slots cstart[c]:cstart[c + 1] (counted here, placed by the gather below).
    memset(w.cstart, 0, (ncls + 1) * sizeof(Py_ssize_t))
    if cls == NULL:
        w.cstart[1] = m
    else:
        for t in range(m):
            w.cstart[cls[order[t]] + 1] += 1
    total = 0
    for c in range(ncls):  # counts become start positions, kept in cstart[c + 1] while class c fills up
        h = w.cstart[c + 1]
        w.cstart[c + 1] = total
        total += h
    for t in range(m):  # gather the boxes grouped by class, each class in score order: scanned sequentially
        i = order[t]
        c = (cls[i] if cls != NULL else 0) + 1
        k = w.cstart[c]
        w.cstart[c] = k + 1
        w.pos[k] = <int32_t>t
        g = w.gx + 4 * k
        g[0] = boxes[i, 0]
        g[1] = boxes[i, 1]
        g[2] = boxes[i, 2]
        g[3] = boxes[i, 3]
        w.ga[k] = _area(g[0], g[1], g[2], g[3])
        if not _participant(w.ga[k]):  # IoU 0 with every box: kept, and never suppresses
            w.kept[t] = 1
            continue
        w.kept[t] = 0
        npart += 1
        if g[0] < bx0:
            bx0 = g[0]
        if g[1] < by0:
            by0 = g[1]
        if g[2] > bx1:
            bx1 = g[2]
        if g[3] > by1:
            by1 = g[3]
        if t >= next_sample and nsamp < _SAMPLES:  # every step-th position (a counter, not a division)
            next_sample = (t // step + 1) * step
            sw[nsamp] = <double>g[2] - g[0]
            sh[nsamp] = <double>g[3] - g[1]
            nsamp += 1
    use_grid = npart > _GRID_MIN
    if use_grid:
        ex = bx1 - bx0  # > 0: participants have x2 > x1, all finite
        ey = by1 - by0
        cw = _median(sw, nsamp) * cell_scale if nsamp > 0 else ex
        ch = _median(sh, nsamp) * cell_scale if nsamp > 0 else ey
        maxc = <double>((2 * npart + 64) // ncls)  # cells per class: <= w.cells_cap
        if maxc < 1.0:
            maxc = 1.0
        gw = _grid_size(ex, cw, maxc)
        gh = _grid_size(ey, ch, maxc)
        if <double>gw * <double>gh > maxc:  # too many cells (tiny boxes spread far apart): coarser grid
            f = sqrt(maxc / (<double>gw * <double>gh))
            gw = _grid_size(<double>gw * f, 1.0, maxc)
            gh = _grid_size(<double>gh * f, 1.0, maxc)
        sx = gw / ex
        sy = gh / ey
    for c in range(ncls):
        if w.cstart[c + 1] > w.cstart[c]:
            if _greedy_class(w, w.cstart[c], w.cstart[c + 1], thr, tt, use_grid, gw, gh, bx0, by0, sx, sy,
                             big_cells) != 0:
                return -1
    for t in range(m):  # branch-free: whether a box is kept is as good as random here
        keep[nkeep] = order[t]
        nkeep += w.kept[t]
    return nkeep


def _check_nms_args(const float[:, ::1] boxes, const float[::1] scores, str name):
    if boxes.shape[1] != 4:
        raise ValueError(f"{name}: boxes must be (N, 4), got {boxes.shape[1]} columns")
    if scores.shape[0] != boxes.shape[0]:
        raise ValueError(f"{name}: scores has {scores.shape[0]} entries for {boxes.shape[0]} boxes")
    if boxes.shape[0] >= 2**31:
        raise ValueError(f"{name}: at most 2**31 - 1 boxes")


def _check_grid_args(double cell_scale, Py_ssize_t big_cells):
    if not cell_scale > 0.0 or big_cells < 1:
        raise ValueError(f"grid: need cell_scale > 0 and big_cells >= 1, got {cell_scale} and {big_cells}")


def nms(const float[:, ::1] boxes, const float[::1] scores, double iou_threshold, double cell_scale=0.5,
        Py_ssize_t big_cells=64):
    """Greedy NMS over xyxy boxes (N, 4); returns kept indices (int64) in descending score order.

    Ties in score go to the lower index; NaN scores are dropped; a candidate is suppressed when its IoU
    with any already-kept box is strictly greater than `iou_threshold`. `cell_scale` and `big_cells` tune the
    grid (see `_greedy_nms`); results do not depend on them.
    """
    _check_nms_args(boxes, scores, "nms")
    _check_grid_args(cell_scale, big_cells)
    cdef Py_ssize_t n = boxes.shape[0], cnt, nkeep = 0
    if n == 0:
        return np.empty(0, dtype=np.int64)
    cdef Work local
    cdef Work* w = _acquire(&local)
    cdef int status = 0
    with nogil:
        if _work_reserve(w, n, 1) != 0:
            status = -1
        else:
            cnt = _order_desc(&scores[0], n, w.order, w.ka, w.kb)
            nkeep = _greedy_nms(boxes, w.order, cnt, NULL, 1, iou_threshold, cell_scale, big_cells, w,
                                w.keep)
            if nkeep < 0:
                status = -1
    cdef int64_t[::1] o
    try:
        out = np.empty(nkeep if status == 0 else 0, dtype=np.int64)
        o = out
        if status == 0 and nkeep > 0:
            memcpy(&o[0], w.keep, nkeep * sizeof(int64_t))
    finally:
        _release(w)
    if status != 0:
        raise MemoryError("nms: out of memory")
    return out


def batched_nms(const float[:, ::1] boxes, const float[::1] scores, const int64_t[::1] classes,
                Py_ssize_t num_classes, double iou_threshold, double cell_scale=1.0,
                Py_ssize_t big_cells=64):
    """Greedy NMS within each class; kept indices of all classes in descending score order (ties: lower index).

    `classes` holds dense class numbers in [0, num_classes). The boxes are grouped by class and each class
    is scanned on its own grid (see `_greedy_nms`): classes are kept apart natively, with no coordinate
    offsets, and the kept boxes come out in the global score order without a merge. Each class gets fewer
    cells than a single-class grid, and they are sparser, so the default cells are twice as large.
    """
    _check_nms_args(boxes, scores, "batched_nms")
    _check_grid_args(cell_scale, big_cells)
    if classes.shape[0] != boxes.shape[0]:
        raise ValueError(f"batched_nms: classes has {classes.shape[0]} entries for {boxes.shape[0]} boxes")
    cdef Py_ssize_t n = boxes.shape[0], cnt, t, nout = 0
    if n == 0:
        return np.empty(0, dtype=np.int64)
    if num_classes < 1 or num_classes > n + 1024:
        raise ValueError(f"batched_nms: num_classes must be in [1, {n + 1024}], got {num_classes}")
    cdef Work local
    cdef Work* w = _acquire(&local)
    cdef int status = 0
    with nogil:
        if _work_reserve(w, n, num_classes) != 0:
            status = -1
        else:
            cnt = _order_desc(&scores[0], n, w.order, w.ka, w.kb)
            for t in range(n):  # memory safety: class numbers index the grid's cell blocks
                if classes[t] < 0 or classes[t] >= num_classes:
                    status = -2
                    break
        if status == 0:
            nout = _greedy_nms(boxes, w.order, cnt, &classes[0], num_classes, iou_threshold,
                               cell_scale, big_cells, w, w.keep)
            if nout < 0:
                status = -1
                nout = 0
    cdef int64_t[::1] o
    try:
        out = np.empty(nout, dtype=np.int64)
        o = out
        if nout > 0:
            memcpy(&o[0], w.keep, nout * sizeof(int64_t))
    finally:
        _release(w)
    if status == -2:
        raise ValueError("batched_nms: classes must lie in [0, num_classes)")
    if status != 0:
        raise MemoryError("batched_nms: out of memory")
    return out


# ---------------------------------------------------------------------------------------------------------
# Soft-NMS


def soft_nms(const float[:, ::1] boxes, const float[::1] scores, double iou_threshold, double sigma,
             int method, double score_threshold):
    """Soft-NMS (Bodla et al. 2017): returns (indices int64, rescored float32) in the order selected.

    Repeatedly selects the highest current score (ties: lower index) and decays every remaining score by
    w = 1 - iou when iou > iou_threshold (linear, method 0) or w = exp(-iou**2 / sigma) (gaussian, method 1);
    a weight of exactly 0 gives a score of 0 (no inf * 0). NaN scores are dropped, and so is every box
    whose score is, or decays to, below `score_threshold`. O(N^2) time.
    """
    _check_nms_args(boxes, scores, "soft_nms")
    if method != 0 and method != 1:
        raise ValueError(f"soft_nms: method must be 0 (linear) or 1 (gaussian), got {method}")
    cdef Py_ssize_t n = boxes.shape[0], r = 0, i, j, k, wr, no = 0
    idx_out = np.empty(n, dtype=np.int64)
    sc_out = np.empty(n, dtype=np.float32)
    if n == 0:
        return idx_out, sc_out
    cdef int64_t[::1] oi = idx_out
    cdef float[::1] osc = sc_out
    cdef int64_t[::1] idx = np.empty(n, dtype=np.int64)
    cdef double[::1] cur = np.empty(n, dtype=np.float64)
    cdef float[:, ::1] xy = np.empty((4, n), dtype=np.float32)
    cdef double[::1] ar = np.empty(n, dtype=np.float64)
    cdef double s, best, iou, wgt
    cdef float px1, py1, px2, py2
    cdef double pa
    with nogil:
        for i in range(n):
            s = scores[i]
            if s != s or s < score_threshold:
                continue
            idx[r] = i
            cur[r] = s
            xy[0, r] = boxes[i, 0]
            xy[1, r] = boxes[i, 1]
            xy[2, r] = boxes[i, 2]
            xy[3, r] = boxes[i, 3]
            ar[r] = _area(boxes[i, 0], boxes[i, 1], boxes[i, 2], boxes[i, 3])
            r += 1
        while r > 0:
            j = 0
            best = cur[0]
            for k in range(1, r):  # the survivors stay in index order, so the first maximum is the lowest index
                if cur[k] > best:
                    best = cur[k]
                    j = k
            oi[no] = idx[j]
            osc[no] = <float>best
            no += 1
            px1 = xy[0, j]
            py1 = xy[1, j]
            px2 = xy[2, j]
            py2 = xy[3, j]
            pa = ar[j]
            wr = 0
            for k in range(r):
                if k == j:
                    continue
                s = cur[k]
                iou = _iou(px1, py1, px2, py2, pa, xy[0, k], xy[1, k], xy[2, k], xy[3, k], ar[k])
                if method == 0:
                    if iou > iou_threshold:
                        wgt = 1.0 - iou
                        s = 0.0 if wgt == 0.0 else s * wgt
                elif iou > 0.0:  # exp(-0) = 1 leaves the score as it is
                    wgt = exp(-(iou * iou) / sigma)
                    s = 0.0 if wgt == 0.0 else s * wgt
                if s < score_threshold:
                    continue
                idx[wr] = idx[k]
                cur[wr] = s
                xy[0, wr] = xy[0, k]
                xy[1, wr] = xy[1, k]
                xy[2, wr] = xy[2, k]
                xy[3, wr] = xy[3, k]
                ar[wr] = ar[k]
                wr += 1
            r = wr
    return idx_out[:no].copy(), sc_out[:no].copy()
