# cython: language_level=3
"""Native 2-D convolution for the CPU training backend: float32, NCHW, forward and backward.

Shapes: x (N, C, H, W), w (O, C/G, KH, KW), b (O,) or None, y and dy (N, O, OH, OW), G = groups.
`pads` is ONNX's (top, left, bottom, right), possibly asymmetric; `out_hw` comes from the caller and is
checked against OH = (H + top + bottom - ((KH - 1) * dh + 1)) // sh + 1 (and likewise OW).
`conv_ref.py` holds the numpy references the tests compare against.

The column matrix of image n over a band of output rows is col (C*KH*KW, L), L = band rows * OW,
col[(c*KH + kh)*KW + kw, p] = x[n, c, oh*sh + kh*dh - top, ow*sw + kw*dw - left] (0 in the padding).
Group g owns rows g*Kg:(g+1)*Kg of it (Kg = C/G*KH*KW), and with P = OH*OW:

    forward    y[n, g]   (Og, L)  = w[g] (Og, Kg) @ col[g]                  (+ b)
    backward   dw[g].T   (Kg, Og) += col[g] @ dy[n, g].T                     (summed over n and bands)
               dcol[g]   (Kg, L)  = w[g].T @ dy[n, g]     then col2im: dx[n] += dcol scattered back
               db = dy summed over n, OH, OW                                 (in double)

Ways through, chosen per call:

- BLAS inside the thread team (the usual one). One `prange` over images (forward: over image x band
  tasks) does everything for its task: im2col of one band into a per-thread buffer that stays in cache,
  sgemm, col2im, with no transposes. The sgemm is the one numpy's bundled OpenBLAS exports, called
  single-threaded (OpenBLAS's own pool is set to one thread for the duration), so the OpenMP team is the
  only pool at work. Alternating between an OpenMP team and OpenBLAS's pool, chunk after chunk, is what
  this avoids: each pool's idle threads spin while the other works, and on two cores that costs more
  than the convolution itself.
- numpy (when that sgemm cannot be found, e.g. a numpy built against another BLAS): im2col of a chunk of
  the batch into col (C*KH*KW, nb*P) in a prange, np.matmul on it, a prange transpose to NCHW; the
  backward likewise with col2im parallel over (image, channel) planes. Chunks keep col under
  `col_bytes` (at least one image).
- 1×1 kernel, stride 1, no padding: x[n] already is the column matrix (no im2col, no col2im).
- depthwise (G == C > 1, any multiplier O/C): direct loops, one (image, channel) plane per task, since
  per-group GEMMs would be (O/C, KH*KW) products. (C == 1 with G == 1 has the same structure but its one
  GEMM per band is faster than the loops.)

No two tasks write the same element: forward tasks own their output rows, backward tasks own an image's
dx and a per-thread slice of the dw accumulators, summed after the loop.
"""

import ctypes
import glob
import os
import threading

import numpy as np

cimport numpy as cnp
from cython.parallel cimport prange, threadid
from libc.stdint cimport int64_t, uintptr_t
from libc.string cimport memcpy, memset

cnp.import_array()

cdef extern from *:
    """
    #ifdef _OPENMP
    #include <omp.h>
    static int dlc_conv_max_threads(void) { return omp_get_max_threads(); }
    #else
    static int dlc_conv_max_threads(void) { return 1; }
    #endif
    """
    int dlc_conv_max_threads() noexcept nogil

# Threads of the team path: each holds its own column buffers and calls OpenBLAS at the same time as the
# others, and OpenBLAS keeps a fixed table of per-call buffers (sized for its MAX_THREADS, 64 in numpy's
# wheels); staying well below it leaves room for numpy's own calls.
cdef int _TEAM_THREADS_MAX = 32


cdef int _team_threads() noexcept nogil:
    cdef int t = dlc_conv_max_threads()
    return 1 if t < 1 else (_TEAM_THREADS_MAX if t > _TEAM_THREADS_MAX else t)

# ---------------------------------------------------------------------------------------------------------
# Tuning (see `set_options`)

# Per-thread column buffer for one band of one image in the BLAS-in-team path: small enough to stay in L2.
cdef Py_ssize_t _band_bytes = 512 * 1024
# Bands with at most this many output channels per group are kept under _SMALL_GEMM_MACS per GEMM.
cdef Py_ssize_t _SMALL_GEMM_MAX_OUT = 32
cdef Py_ssize_t _SMALL_GEMM_MACS = 950000
cdef bint _SMALL_GEMM_BACKWARD = True
# Column matrix of one batch chunk in the numpy path.
cdef Py_ssize_t _col_bytes = 8 * 1024 * 1024
# Scratch buffers are kept per thread between calls up to this size each: a fresh large buffer costs a
# page fault per 4 KiB on every call.
cdef Py_ssize_t _KEEP_BYTES_MAX = 64 * 1024 * 1024
cdef bint _use_team_blas = True
# Winograd F(2x2, 3x3) (winograd.pxi) — 0: never; 1: where it measures faster; 2: wherever it applies.
cdef int _wino_mode = 1
# Per-thread transformed input and output of one band of tile rows: within L2.
cdef Py_ssize_t _wino_bytes = 1024 * 1024

# ---------------------------------------------------------------------------------------------------------
# numpy's bundled OpenBLAS, called from C


cdef enum:
    ROW_MAJOR = 101
    NO_TRANS = 111
    TRANS = 112

ctypedef void (*sgemm64_t)(int, int, int, int64_t, int64_t, int64_t, float, const float*, int64_t,
                           const float*, int64_t, float, float*, int64_t) noexcept nogil
ctypedef void (*sgemm32_t)(int, int, int, int, int, int, float, const float*, int,
                           const float*, int, float, float*, int) noexcept nogil
ctypedef void (*set_threads_t)(int) noexcept nogil
ctypedef int (*get_threads_t)() noexcept nogil

cdef sgemm64_t _sgemm64 = NULL
cdef sgemm32_t _sgemm32 = NULL
cdef set_threads_t _blas_set_threads = NULL
cdef get_threads_t _blas_get_threads = NULL
cdef int _blas_saved_threads = 0
cdef int _blas_depth = 0  # nesting of `_blas_single_enter` (guarded by the GIL)
_blas_lib = None  # keeps the ctypes handle alive
_blas_path = None


cdef void* _symbol(lib, str name):
    f = getattr(lib, name, None)
    if f is None:
        return NULL
    return <void*><uintptr_t>ctypes.cast(f, ctypes.c_void_p).value


def _find_openblas():
    """Path of the scipy-openblas library inside the numpy installation, or None."""
    root = os.path.dirname(np.__file__)
    for folder in (os.path.join(root, os.pardir, "numpy.libs"), os.path.join(root, ".dylibs"), root):
        found = sorted(glob.glob(os.path.join(folder, "*scipy_openblas*")))
        if found:
            return os.path.abspath(found[0])
    return None


cdef void _load_blas():
    """Look up cblas_sgemm and the thread-count calls in numpy's OpenBLAS (ILP64 or LP32 naming).

    Anything unexpected leaves the pointers NULL, and the kernels use np.matmul instead.
    """
    global _sgemm64, _sgemm32, _blas_set_threads, _blas_get_threads, _blas_lib, _blas_path
    try:
        path = _find_openblas()
        if path is None:
            return
        lib = ctypes.CDLL(path)
        for suffix, wide in (("64_", True), ("", False)):
            gemm = _symbol(lib, f"scipy_cblas_sgemm{suffix}")
            set_t = _symbol(lib, f"scipy_openblas_set_num_threads{suffix}")
            get_t = _symbol(lib, f"scipy_openblas_get_num_threads{suffix}")
            if gemm != NULL and set_t != NULL and get_t != NULL:
                if wide:
                    _sgemm64 = <sgemm64_t>gemm
                else:
                    _sgemm32 = <sgemm32_t>gemm
                _blas_set_threads = <set_threads_t>set_t
                _blas_get_threads = <get_threads_t>get_t
                _blas_lib, _blas_path = lib, path
                return
    except Exception:
        return


_load_blas()


cdef inline bint _team_blas() noexcept:
    return _use_team_blas and (_sgemm64 != NULL or _sgemm32 != NULL)


cdef inline void _gemm(int ta, int tb, Py_ssize_t m, Py_ssize_t n, Py_ssize_t k, const float* a, Py_ssize_t lda,
                       const float* b, Py_ssize_t ldb, float beta, float* c, Py_ssize_t ldc) noexcept nogil:
    """C (m, n) = op(A) @ op(B) + beta * C, row-major."""
    if _sgemm64 != NULL:
        _sgemm64(ROW_MAJOR, ta, tb, m, n, k, 1.0, a, lda, b, ldb, beta, c, ldc)
    else:
        _sgemm32(ROW_MAJOR, ta, tb, <int>m, <int>n, <int>k, 1.0, a, <int>lda, b, <int>ldb, beta, c, <int>ldc)


cdef void _blas_single_enter():
    """OpenBLAS to one thread while the OpenMP team calls it (restored by `_blas_single_exit`)."""
    global _blas_depth, _blas_saved_threads
    if _blas_depth == 0:
        _blas_saved_threads = _blas_get_threads()
        if _blas_saved_threads != 1:
            _blas_set_threads(1)
    _blas_depth += 1


cdef void _blas_single_exit():
    global _blas_depth
    _blas_depth -= 1
    if _blas_depth == 0 and _blas_saved_threads != 1:
        _blas_set_threads(_blas_saved_threads)


_WINO_MODES = ("never", "auto", "always")


def set_options(team_blas=None, band_bytes=None, col_bytes=None, winograd=None, wino_bytes=None):
    """Change how the kernels run (for tests and benchmarks); returns the previous settings as a dict.

    team_blas: call OpenBLAS's sgemm inside the OpenMP team (if it was found) rather than np.matmul.
    band_bytes: per-thread column buffer of the team path; col_bytes: column matrix of the numpy path.
    winograd: "auto" (3×3 stride-1 convolutions where it measures faster), "always" (wherever it applies) or
    "never"; it needs the in-team sgemm. wino_bytes: per-thread transformed input and output of one band.
    """
    global _use_team_blas, _band_bytes, _col_bytes, _wino_mode, _wino_bytes
    previous = {"team_blas": _use_team_blas, "band_bytes": _band_bytes, "col_bytes": _col_bytes,
                "winograd": _WINO_MODES[_wino_mode], "wino_bytes": _wino_bytes}
    if winograd is not None:
        if winograd not in _WINO_MODES:
            raise ValueError(f"conv: winograd must be one of {_WINO_MODES}, got {winograd!r}")
        _wino_mode = _WINO_MODES.index(winograd)
    if wino_bytes is not None:
        _wino_bytes = max(1, int(wino_bytes))
    if team_blas is not None:
        _use_team_blas = bool(team_blas)
    if band_bytes is not None:
        _band_bytes = max(1, int(band_bytes))
    if col_bytes is not None:
        _col_bytes = max(1, int(col_bytes))
    return previous


def blas_info():
    """Where the in-team sgemm comes from, or None when only the numpy path is available."""
    if _sgemm64 == NULL and _sgemm32 == NULL:
        return None
    return {"library": _blas_path, "int64": _sgemm64 != NULL, "threads": _blas_get_threads()}


# ---------------------------------------------------------------------------------------------------------
# Scratch


_scratch = threading.local()


cdef object _workspace(str name, Py_ssize_t size, dtype=np.float32):
    """A 1-D array of `size` elements, reused across calls on this thread (contents undefined)."""
    bufs = getattr(_scratch, "bufs", None)
    if bufs is None:
        bufs = _scratch.bufs = {}
    buf = bufs.get(name)
    if buf is None or buf.shape[0] < size or buf.dtype != dtype:
        buf = np.empty(max(size, 1), dtype=dtype)
        if buf.nbytes <= _KEEP_BYTES_MAX:
            bufs[name] = buf
    return buf[:size]


cdef inline float* _fptr(a) except? NULL:
    """Data pointer of a C-contiguous float32 array, NULL for None."""
    if a is None:
        return NULL
    return <float*>cnp.PyArray_DATA(<cnp.ndarray>a)


# ---------------------------------------------------------------------------------------------------------
# Geometry, im2col and col2im


cdef struct Geom:
    Py_ssize_t N, C, H, W, O, G, Og, Cg, Kg, KH, KW, sh, sw, dh, dw, pt, pl, OH, OW
    bint pointwise  # 1×1, stride 1, no padding: x[n] is its own column matrix
    const Py_ssize_t* cols  # (off, lo, hi) per kernel column, from `_column_table`


cdef inline void _ow_range(const Geom* g, Py_ssize_t kw, Py_ssize_t* off, Py_ssize_t* lo,
                           Py_ssize_t* hi) noexcept nogil:
    """Output columns ow in [lo, hi) read input column ow*sw + off, which lies inside [0, W)."""
    off[0] = g.cols[3 * kw]
    lo[0] = g.cols[3 * kw + 1]
    hi[0] = g.cols[3 * kw + 2]


cdef object _column_table(Geom* g):
    """Fill in g.cols: (off, lo, hi) of `_ow_range` for each kernel column, worked out once per call (the
    divisions would otherwise run for every row that im2col and col2im touch). Keep the array alive."""
    table = np.empty(3 * g.KW, dtype=np.intp)
    cdef Py_ssize_t[::1] t = table
    cdef Py_ssize_t kw, o, a, b
    for kw in range(g.KW):
        o = kw * g.dw - g.pl
        a = 0 if o >= 0 else (-o + g.sw - 1) // g.sw
        b = 0 if g.W - 1 - o < 0 else (g.W - 1 - o) // g.sw + 1
        a = min(a, g.OW)
        b = max(min(b, g.OW), a)
        t[3 * kw] = o
        t[3 * kw + 1] = a
        t[3 * kw + 2] = b
    g.cols = &t[0]
    return table


cdef inline bint _same_width(const Geom* g) noexcept nogil:
    """Stride 1 and OW == W: consecutive output rows read consecutive input rows at one column shift, so a
    run of rows is one contiguous block in both x and col (the columns that fall in the padding wrap into
    the neighbouring row and are fixed up afterwards)."""
    return g.sh == 1 and g.sw == 1 and g.OW == g.W


cdef inline void _im2col_rows_same(const float* xplane, float* dst, const Geom* g, Py_ssize_t kh,
                                   Py_ssize_t off, Py_ssize_t lo, Py_ssize_t hi, Py_ssize_t oh0,
                                   Py_ssize_t oh1) noexcept nogil:
    """`_im2col_row` for `_same_width` geometry with at least one valid column (lo < hi)."""
    cdef Py_ssize_t W = g.W, shift = kh * g.dh - g.pt, oa, ob, ra, rb, oh, ow
    cdef float* row
    oa = oh0 if oh0 > -shift else -shift  # output rows [oa, ob) read input rows oa + shift ... inside [0, H)
    ob = oh1 if oh1 < g.H - shift else g.H - shift
    if ob <= oa:
        memset(dst, 0, (oh1 - oh0) * W * sizeof(float))
        return
    if oa > oh0:
        memset(dst, 0, (oa - oh0) * W * sizeof(float))
    if oh1 > ob:
        memset(dst + (ob - oh0) * W, 0, (oh1 - ob) * W * sizeof(float))
    ra = oa
    rb = ob
    # A block starting at input row 0 with off < 0 would read before the plane, one ending at row H with
    # off > 0 after it: those rows are copied on their own.
    if off < 0 and oa + shift == 0:
        memcpy(dst + (oa - oh0) * W + lo, xplane + off + lo, (hi - lo) * sizeof(float))
        ra += 1
    if off > 0 and ob + shift == g.H and rb > ra:
        memcpy(dst + (ob - 1 - oh0) * W + lo, xplane + (ob - 1 + shift) * W + off + lo, (hi - lo) * sizeof(float))
        rb -= 1
    if rb > ra:
        memcpy(dst + (ra - oh0) * W, xplane + (ra + shift) * W + off, (rb - ra) * W * sizeof(float))
    if lo > 0 or hi < W:
        for oh in range(oa, ob):
            row = dst + (oh - oh0) * W
            for ow in range(lo):
                row[ow] = 0.0
            for ow in range(hi, W):
                row[ow] = 0.0


cdef inline void _im2col_row(const float* xplane, float* dst, const Geom* g, Py_ssize_t kh, Py_ssize_t kw,
                             Py_ssize_t oh0, Py_ssize_t oh1) noexcept nogil:
    """dst[(oh - oh0)*OW + ow] = x[oh*sh + kh*dh - pt, ow*sw + kw*dw - pl] for oh in [oh0, oh1), 0 in the padding."""
    cdef Py_ssize_t oh, ow, ih, off, lo, hi, sw = g.sw, OW = g.OW
    cdef float* row
    cdef const float* src
    _ow_range(g, kw, &off, &lo, &hi)
    if lo < hi and _same_width(g):
        _im2col_rows_same(xplane, dst, g, kh, off, lo, hi, oh0, oh1)
        return
    for oh in range(oh0, oh1):
        row = dst + (oh - oh0) * OW
        ih = oh * g.sh + kh * g.dh - g.pt
        if ih < 0 or ih >= g.H:
            memset(row, 0, OW * sizeof(float))
            continue
        src = xplane + ih * g.W + off
        for ow in range(lo):
            row[ow] = 0.0
        if sw != 1:
            for ow in range(lo, hi):
                row[ow] = src[ow * sw]
        elif hi - lo >= 64:
            memcpy(row + lo, src + lo, (hi - lo) * sizeof(float))
        else:  # short rows: a call to memcpy costs more than the copy
            for ow in range(lo, hi):
                row[ow] = src[ow]
        for ow in range(hi, OW):
            row[ow] = 0.0


cdef inline void _col2im_rows_same(float* src, float* dxplane, const Geom* g, Py_ssize_t kh, Py_ssize_t off,
                                   Py_ssize_t lo, Py_ssize_t hi, Py_ssize_t oh0, Py_ssize_t oh1) noexcept nogil:
    """One dcol row (output rows [oh0, oh1)) added into the dx plane for `_same_width` geometry, lo < hi.

    The entries of `src` in the padding columns are zeroed first (src is scratch), so that the block add
    can run over them: they land on valid pixels of the neighbouring rows and add nothing.
    """
    cdef Py_ssize_t W = g.W, shift = kh * g.dh - g.pt, oa, ob, ra, rb, oh, ow, i, n
    cdef float* row
    cdef float* dst
    oa = oh0 if oh0 > -shift else -shift
    ob = oh1 if oh1 < g.H - shift else g.H - shift
    if ob <= oa:
        return
    ra = oa
    rb = ob
    if off < 0 and oa + shift == 0:
        row = src + (oa - oh0) * W
        dst = dxplane + off
        for ow in range(lo, hi):
            dst[ow] += row[ow]
        ra += 1
    if off > 0 and ob + shift == g.H and rb > ra:
        row = src + (ob - 1 - oh0) * W
        dst = dxplane + (ob - 1 + shift) * W + off
        for ow in range(lo, hi):
            dst[ow] += row[ow]
        rb -= 1
    if rb <= ra:
        return
    if lo > 0 or hi < W:
        for oh in range(ra, rb):
            row = src + (oh - oh0) * W
            for ow in range(lo):
                row[ow] = 0.0
            for ow in range(hi, W):
                row[ow] = 0.0
    row = src + (ra - oh0) * W
    dst = dxplane + (ra + shift) * W + off
    n = (rb - ra) * W
    for i in range(n):
        dst[i] += row[i]


cdef inline void _col2im_plane(float* dcol, Py_ssize_t ld, float* dxplane, const Geom* g,
                               Py_ssize_t oh0, Py_ssize_t oh1) noexcept nogil:
    """dx plane += the KH*KW rows of dcol (from `dcol`, `ld` apart) that im2col took from it, rows [oh0, oh1).

    dcol is scratch: the `_same_width` path zeroes its padding entries.
    """
    cdef Py_ssize_t kh, kw, oh, ow, ih, off, lo, hi, sw = g.sw, OW = g.OW
    cdef const float* src
    cdef float* dst
    for kh in range(g.KH):
        for kw in range(g.KW):
            _ow_range(g, kw, &off, &lo, &hi)
            if lo >= hi:
                continue
            if _same_width(g):
                _col2im_rows_same(dcol + (kh * g.KW + kw) * ld, dxplane, g, kh, off, lo, hi, oh0, oh1)
                continue
            for oh in range(oh0, oh1):
                ih = oh * g.sh + kh * g.dh - g.pt
                if ih < 0 or ih >= g.H:
                    continue
                src = dcol + (kh * g.KW + kw) * ld + (oh - oh0) * OW
                dst = dxplane + ih * g.W + off
                if sw == 1:
                    for ow in range(lo, hi):
                        dst[ow] += src[ow]
                else:
                    for ow in range(lo, hi):
                        dst[ow * sw] += src[ow]


cdef inline void _im2col_band(const float* xn, float* col, const Geom* g, Py_ssize_t oh0,
                              Py_ssize_t oh1) noexcept nogil:
    """col (C*KH*KW, L) of image xn over output rows [oh0, oh1), on the calling thread."""
    cdef Py_ssize_t c, kh, kw, L = (oh1 - oh0) * g.OW
    for c in range(g.C):
        for kh in range(g.KH):
            for kw in range(g.KW):
                _im2col_row(xn + c * g.H * g.W, col + ((c * g.KH + kh) * g.KW + kw) * L, g, kh, kw, oh0, oh1)


# ---------------------------------------------------------------------------------------------------------
# BLAS inside the team


cdef inline void _forward_task(const float* xn, const float* w, const float* bias, float* yn, float* col,
                               const Geom* g, Py_ssize_t oh0, Py_ssize_t oh1) noexcept nogil:
    """Output rows [oh0, oh1) of image n: yn[g] = w[g] @ col[g] (+ bias)."""
    cdef Py_ssize_t P = g.OH * g.OW, L = (oh1 - oh0) * g.OW, gi, o, p, ldb, gstride
    cdef const float* b
    cdef float* dst
    cdef float bv
    if g.pointwise:
        b = xn + oh0 * g.OW
        ldb = P
        gstride = g.Cg * P
    else:
        _im2col_band(xn, col, g, oh0, oh1)
        b = col
        ldb = L
        gstride = g.Kg * L
    for gi in range(g.G):
        _gemm(NO_TRANS, NO_TRANS, g.Og, L, g.Kg, w + gi * g.Og * g.Kg, g.Kg, b + gi * gstride, ldb,
              0.0, yn + gi * g.Og * P + oh0 * g.OW, P)
    if bias != NULL:
        for o in range(g.O):
            bv = bias[o]
            dst = yn + o * P + oh0 * g.OW
            for p in range(L):
                dst[p] = dst[p] + bv


cdef void _forward_team(const float* x, const float* w, const float* bias, float* y, float* col,
                        Py_ssize_t ldcol, Geom g, Py_ssize_t bh, int threads) noexcept nogil:
    """One task per (image, band of bh output rows); thread t uses col[t*ldcol:]."""
    cdef Py_ssize_t nbands = (g.OH + bh - 1) // bh, t, n, oh0, oh1
    for t in prange(g.N * nbands, schedule="dynamic", num_threads=threads):
        n = t // nbands
        oh0 = (t % nbands) * bh
        oh1 = oh0 + bh if oh0 + bh < g.OH else g.OH
        _forward_task(x + n * g.C * g.H * g.W, w, bias, y + n * g.O * g.OH * g.OW,
                      col + threadid() * ldcol, &g, oh0, oh1)


cdef inline void _backward_image(const float* xn, const float* w, const float* dyn, float* dxn, float* col,
                                 float* dcol, float* dwT, double* dbacc, const Geom* g,
                                 Py_ssize_t bh) noexcept nogil:
    """Image n, band by band: dwT[g] += col[g] @ dyn[g].T (if dwT; without it, no im2col either);
    dxn = col2im(w[g].T @ dyn[g]) (if dxn); dbacc[o] += sum(dyn[o]) (if dbacc)."""
    cdef Py_ssize_t P = g.OH * g.OW, HW = g.H * g.W, KK = g.KH * g.KW
    cdef Py_ssize_t oh0, oh1, L, gi, c, lda, gstride, o, p
    cdef const float* a
    cdef const float* dyg
    cdef double s
    if dbacc != NULL:
        for o in range(g.O):
            s = 0.0
            for p in range(P):
                s = s + dyn[o * P + p]
            dbacc[o] += s
    if dxn != NULL and not g.pointwise:
        memset(dxn, 0, g.C * HW * sizeof(float))
    oh0 = 0
    while oh0 < g.OH:
        oh1 = oh0 + bh if oh0 + bh < g.OH else g.OH
        L = (oh1 - oh0) * g.OW
        if g.pointwise:
            a = xn + oh0 * g.OW
            lda = P
            gstride = g.Cg * P
        else:
            if dwT != NULL:
                _im2col_band(xn, col, g, oh0, oh1)
            a = col
            lda = L
            gstride = g.Kg * L
        for gi in range(g.G):
            dyg = dyn + gi * g.Og * P + oh0 * g.OW
            if dwT != NULL:
                _gemm(NO_TRANS, TRANS, g.Kg, g.Og, L, a + gi * gstride, lda, dyg, P, 1.0, dwT + gi * g.Kg * g.Og,
                      g.Og)
            if dxn == NULL:
                continue
            if g.pointwise:
                _gemm(TRANS, NO_TRANS, g.Kg, L, g.Og, w + gi * g.Og * g.Kg, g.Kg, dyg, P,
                      0.0, dxn + gi * g.Cg * P + oh0 * g.OW, P)
            else:
                _gemm(TRANS, NO_TRANS, g.Kg, L, g.Og, w + gi * g.Og * g.Kg, g.Kg, dyg, P,
                      0.0, dcol + gi * g.Kg * L, L)
        if dxn != NULL and not g.pointwise:
            for c in range(g.C):
                _col2im_plane(dcol + c * KK * L, L, dxn + c * HW, g, oh0, oh1)
        oh0 = oh1


cdef void _backward_team(const float* x, const float* w, const float* dy, float* dx, float* col,
                         float* dcol, Py_ssize_t ldcol, float* dwT, double* dbacc, Geom g, Py_ssize_t bh,
                         int threads) noexcept nogil:
    """One task per image; thread t uses col[t*ldcol:], dcol[t*ldcol:] and the accumulators dwT[t], dbacc[t].

    A static schedule gives each thread the same images on every call, so dw is summed in the same order
    and comes out bit for bit the same from run to run (for a given number of threads).
    """
    cdef Py_ssize_t n, tid, wsize = g.G * g.Kg * g.Og
    for n in prange(g.N, schedule="static", num_threads=threads):
        tid = threadid()
        _backward_image(NULL if x == NULL else x + n * g.C * g.H * g.W, w, dy + n * g.O * g.OH * g.OW,
                        NULL if dx == NULL else dx + n * g.C * g.H * g.W,
                        col + tid * ldcol, NULL if dcol == NULL else dcol + tid * ldcol,
                        NULL if dwT == NULL else dwT + tid * wsize, NULL if dbacc == NULL else dbacc + tid * g.O,
                        &g, bh)


# ---------------------------------------------------------------------------------------------------------
# numpy path: whole chunks of the batch


cdef void _im2col_chunk(const float* x, Py_ssize_t nb, float* col, Geom g) noexcept nogil:
    """col (C*KH*KW, nb*P) from nb images at x; one task per (channel, image, kernel offset) row segment."""
    cdef Py_ssize_t P = g.OH * g.OW, KK = g.KH * g.KW, ld = nb * P
    cdef Py_ssize_t t, c, n, k
    # Tasks ordered channel, image, offset: consecutive tasks read the same input plane.
    for t in prange(g.C * nb * KK, schedule="static"):
        c = t // (nb * KK)
        n = (t // KK) % nb
        k = t % KK
        _im2col_row(x + (n * g.C + c) * g.H * g.W, col + (c * KK + k) * ld + n * P, &g, k // g.KW, k % g.KW,
                    0, g.OH)


cdef void _col2im_chunk(float* dcol, Py_ssize_t nb, float* dx, Geom g) noexcept nogil:
    """dx (nb, C, H, W) from dcol (C*KH*KW, nb*P); each task owns one (image, channel) plane."""
    cdef Py_ssize_t t, P = g.OH * g.OW, ld = nb * P, KK = g.KH * g.KW
    for t in prange(nb * g.C, schedule="static"):
        memset(dx + t * g.H * g.W, 0, g.H * g.W * sizeof(float))
        _col2im_plane(dcol + (t % g.C) * KK * ld + (t // g.C) * P, ld, dx + t * g.H * g.W, &g, 0, g.OH)


cdef void _unfold_rows(const float* yT, Py_ssize_t nb, Py_ssize_t O, Py_ssize_t P, const float* bias,
                       float* y) noexcept nogil:
    """y[n, o, :] = yT[o, n*P:(n+1)*P] (+ bias[o]) for nb images; yT is (O, nb*P)."""
    cdef Py_ssize_t t, o, p
    cdef const float* src
    cdef float* dst
    cdef float bv
    for t in prange(nb * O, schedule="static"):
        o = t % O
        src = yT + o * nb * P + (t // O) * P
        dst = y + t * P
        if bias == NULL:
            memcpy(dst, src, P * sizeof(float))
        else:
            bv = bias[o]
            for p in range(P):
                dst[p] = src[p] + bv


cdef void _fold_rows(const float* dy, Py_ssize_t nb, Py_ssize_t O, Py_ssize_t P, float* dyT) noexcept nogil:
    """dyT[o, n*P:(n+1)*P] = dy[n, o, :] for nb images: the inverse of `_unfold_rows` without bias."""
    cdef Py_ssize_t t
    for t in prange(nb * O, schedule="static"):
        memcpy(dyT + (t % O) * nb * P + (t // O) * P, dy + t * P, P * sizeof(float))


cdef void _bias_add(float* y, Py_ssize_t N, Py_ssize_t O, Py_ssize_t P, const float* bias) noexcept nogil:
    cdef Py_ssize_t t, p
    cdef float bv
    cdef float* dst
    for t in prange(N * O, schedule="static"):
        bv = bias[t % O]
        dst = y + t * P
        for p in range(P):
            dst[p] = dst[p] + bv


cdef void _bias_grad(const float* dy, Py_ssize_t N, Py_ssize_t O, Py_ssize_t P, float* db) noexcept nogil:
    """db[o] = the sum of dy[:, o], accumulated in double."""
    cdef Py_ssize_t o, n, p
    cdef double acc
    cdef const float* src
    for o in prange(O, schedule="static"):
        acc = 0.0
        for n in range(N):
            src = dy + (n * O + o) * P
            for p in range(P):
                acc = acc + src[p]
        db[o] = <float>acc


# ---------------------------------------------------------------------------------------------------------
# Depthwise: G == C, output channel o reads input channel o // m (m = O / C).


cdef inline void _dw_forward_plane(const float* xplane, const float* wk, float bv, float* yplane,
                                   const Geom* g) noexcept nogil:
    """One output plane: the bias, then for each kernel offset a scaled, shifted copy of the input plane."""
    cdef Py_ssize_t kh, kw, oh, ow, ih, off, lo, hi, sw = g.sw, OW = g.OW
    cdef const float* src
    cdef float* dst
    cdef float wv
    for ow in range(g.OH * OW):
        yplane[ow] = bv
    for kh in range(g.KH):
        for kw in range(g.KW):
            wv = wk[kh * g.KW + kw]
            _ow_range(g, kw, &off, &lo, &hi)
            for oh in range(g.OH):
                ih = oh * g.sh + kh * g.dh - g.pt
                if ih < 0 or ih >= g.H:
                    continue
                src = xplane + ih * g.W + off
                dst = yplane + oh * OW
                if sw == 1:
                    for ow in range(lo, hi):
                        dst[ow] = dst[ow] + wv * src[ow]
                else:
                    for ow in range(lo, hi):
                        dst[ow] = dst[ow] + wv * src[ow * sw]


cdef void _dw_forward(const float* x, const float* w, const float* bias, float* y, Geom g) noexcept nogil:
    """One task per output plane (n, o)."""
    cdef Py_ssize_t m = g.O // g.C, t, o
    for t in prange(g.N * g.O, schedule="static"):
        o = t % g.O
        _dw_forward_plane(x + ((t // g.O) * g.C + o // m) * g.H * g.W, w + o * g.KH * g.KW,
                          0.0 if bias == NULL else bias[o], y + t * g.OH * g.OW, &g)


cdef inline void _dw_input_plane(const float* dyplane, const float* wk, float* dxplane,
                                 const Geom* g) noexcept nogil:
    """Add one output plane's contribution to its input plane's gradient (the transpose of the forward)."""
    cdef Py_ssize_t kh, kw, oh, ow, ih, off, lo, hi, sw = g.sw, OW = g.OW
    cdef const float* src
    cdef float* dst
    cdef float wv
    for kh in range(g.KH):
        for kw in range(g.KW):
            wv = wk[kh * g.KW + kw]
            _ow_range(g, kw, &off, &lo, &hi)
            for oh in range(g.OH):
                ih = oh * g.sh + kh * g.dh - g.pt
                if ih < 0 or ih >= g.H:
                    continue
                src = dyplane + oh * OW
                dst = dxplane + ih * g.W + off
                if sw == 1:
                    for ow in range(lo, hi):
                        dst[ow] = dst[ow] + wv * src[ow]
                else:
                    for ow in range(lo, hi):
                        dst[ow * sw] = dst[ow * sw] + wv * src[ow]


cdef void _dw_backward_input(const float* dy, const float* w, float* dx, Geom g) noexcept nogil:
    """dx plane (n, c) gathers from the m output planes of channel c; one task per input plane."""
    cdef Py_ssize_t m = g.O // g.C, P = g.OH * g.OW, t, c, j
    for t in prange(g.N * g.C, schedule="static"):
        c = t % g.C
        memset(dx + t * g.H * g.W, 0, g.H * g.W * sizeof(float))
        for j in range(m):
            _dw_input_plane(dy + ((t // g.C) * g.O + c * m + j) * P, w + (c * m + j) * g.KH * g.KW,
                            dx + t * g.H * g.W, &g)


cdef inline void _dw_weight_plane(const float* xplane, const float* dyplane, double* acc,
                                  const Geom* g) noexcept nogil:
    """acc[k*OW + ow] += the products that kernel offset k contributes to output column ow."""
    cdef Py_ssize_t kh, kw, oh, ow, ih, off, lo, hi, sw = g.sw, OW = g.OW
    cdef const float* src
    cdef const float* dyrow
    cdef double* a
    for kh in range(g.KH):
        for kw in range(g.KW):
            _ow_range(g, kw, &off, &lo, &hi)
            a = acc + (kh * g.KW + kw) * OW
            for oh in range(g.OH):
                ih = oh * g.sh + kh * g.dh - g.pt
                if ih < 0 or ih >= g.H:
                    continue
                src = xplane + ih * g.W + off
                dyrow = dyplane + oh * OW
                if sw == 1:
                    for ow in range(lo, hi):
                        a[ow] = a[ow] + <double>dyrow[ow] * <double>src[ow]
                else:
                    for ow in range(lo, hi):
                        a[ow] = a[ow] + <double>dyrow[ow] * <double>src[ow * sw]


cdef void _dw_backward_weight(const float* x, const float* dy, double* acc, float* dw, Geom g) noexcept nogil:
    """dw[o, kh, kw] = sum over n, oh, ow of dy[n, o, oh, ow] * x[n, o // m, ih, iw]; one task per o.

    Each task sums elementwise into its own rows of `acc` (O, KH*KW, OW), in double, so that the inner
    loop vectorises, and reduces each row at the end.
    """
    cdef Py_ssize_t m = g.O // g.C, P = g.OH * g.OW, KK = g.KH * g.KW, o, n, k, ow
    cdef double* a
    cdef double s
    for o in prange(g.O, schedule="static"):
        a = acc + o * KK * g.OW
        for k in range(KK * g.OW):
            a[k] = 0.0
        for n in range(g.N):
            _dw_weight_plane(x + (n * g.C + o // m) * g.H * g.W, dy + (n * g.O + o) * P, a, &g)
        for k in range(KK):
            s = 0.0
            for ow in range(g.OW):
                s = s + a[k * g.OW + ow]
            dw[o * KK + k] = <float>s


# ---------------------------------------------------------------------------------------------------------
# Python entry points


cdef tuple _pair(v, str name):
    t = tuple(int(i) for i in v)
    if len(t) != 2 or min(t) < 1:
        raise ValueError(f"conv: {name} must be two positive integers, got {v!r}")
    return t


cdef Geom _geometry(x, w, stride, pads, dilation, groups, out_hw) except *:
    """Check shapes and geometry; raise ValueError on anything inconsistent."""
    cdef Geom g
    if x.ndim != 4 or w.ndim != 4:
        raise ValueError(f"conv: x and w must be 4-D, got x {x.shape} and w {w.shape}")
    N, C, H, W = x.shape
    O, Cg, KH, KW = w.shape
    G = int(groups)
    if G < 1 or C % G or O % G or Cg != C // G or KH < 1 or KW < 1:
        raise ValueError(f"conv: x {x.shape} and w {w.shape} do not fit groups={groups}")
    sh, sw = _pair(stride, "stride")
    dh, dw = _pair(dilation, "dilation")
    p = tuple(int(i) for i in pads)
    if len(p) != 4 or min(p) < 0:
        raise ValueError(f"conv: pads must be four non-negative integers (top, left, bottom, right), got {pads!r}")
    oh = (H + p[0] + p[2] - ((KH - 1) * dh + 1)) // sh + 1
    ow = (W + p[1] + p[3] - ((KW - 1) * dw + 1)) // sw + 1
    if oh < 1 or ow < 1:
        raise ValueError(f"conv: the kernel does not fit the padded input (x {x.shape}, w {w.shape}, pads {p})")
    if out_hw is not None and tuple(int(i) for i in out_hw) != (oh, ow):
        raise ValueError(f"conv: out_hw {tuple(out_hw)} does not match the geometry, which gives {(oh, ow)}")
    g.N, g.C, g.H, g.W, g.O, g.G = N, C, H, W, O, G
    g.Og, g.Cg, g.Kg, g.KH, g.KW = O // G, Cg, Cg * KH * KW, KH, KW
    g.sh, g.sw, g.dh, g.dw = sh, sw, dh, dw
    g.pt, g.pl = p[0], p[1]
    g.OH, g.OW = oh, ow
    g.pointwise = KH == 1 and KW == 1 and sh == 1 and sw == 1 and oh == H and ow == W and p[0] == 0 and p[1] == 0
    return g


cdef inline bint _is_depthwise(const Geom* g) noexcept:
    return g.G > 1 and g.G == g.C and g.Cg == 1 and g.O % g.C == 0


cdef Py_ssize_t _band_rows(const Geom* g, bint small_gemm):
    """Output rows per band of the team path, bands of equal size as far as they go.

    A band's column matrix stays within `_band_bytes` (L2). With few output channels per group, bands are
    also kept under one million multiply-adds per GEMM, where OpenBLAS switches to its small-matrix
    kernels: no packing of the column matrix and no separate pass to clear the output (measured 20-30%
    faster for 16x144 weights, no gain with 64 output channels).
    """
    cdef Py_ssize_t row_bytes = g.C * g.KH * g.KW * g.OW * sizeof(float)
    cdef Py_ssize_t rows = _band_bytes // row_bytes if row_bytes > 0 else g.OH
    cdef Py_ssize_t per_row = g.Og * g.Kg * g.OW, small, nbands
    if small_gemm and g.Og <= _SMALL_GEMM_MAX_OUT and per_row > 0:
        small = _SMALL_GEMM_MACS // per_row
        if 1 <= small < rows:
            rows = small
    rows = max(1, min(rows, g.OH))
    nbands = (g.OH + rows - 1) // rows
    return (g.OH + nbands - 1) // nbands


cdef Py_ssize_t _chunk_images(const Geom* g):
    """Images per chunk of the numpy path, so that col stays within `_col_bytes` (at least one)."""
    cdef Py_ssize_t per_image = g.C * g.KH * g.KW * g.OH * g.OW * sizeof(float)
    cdef Py_ssize_t nb = _col_bytes // per_image if per_image > 0 else g.N
    return max(1, min(g.N, nb))


cdef object _f32(a):
    return np.ascontiguousarray(a, dtype=np.float32)


include "winograd.pxi"


def conv2d_forward(x, w, b, stride, pads, dilation, groups, out_hw):
    """y (N, O, OH, OW) float32 = conv(x, w) + b; see the module docstring for the conventions."""
    x = _f32(x)
    w = _f32(w)
    cdef Geom g = _geometry(x, w, stride, pads, dilation, groups, out_hw)
    columns = _column_table(&g)
    cdef Py_ssize_t P = g.OH * g.OW, img = g.C * g.H * g.W, K = g.Kg, G = g.G, Og = g.Og, Cg = g.Cg
    cdef Py_ssize_t n0, nb, gi, bh, ldcol
    cdef int threads
    if b is not None:
        b = _f32(b)
        if b.shape != (g.O,):
            raise ValueError(f"conv: bias must have shape ({g.O},), got {b.shape}")
    y = np.empty((g.N, g.O, g.OH, g.OW), dtype=np.float32)
    if y.size == 0:
        return y
    if x.size == 0:  # no input pixels (C == 0 or an all-padding input): only the bias
        y[...] = 0.0 if b is None else b[:, None, None]
        return y
    cdef const float* xp = _fptr(x)
    cdef const float* wp = _fptr(w)
    cdef const float* bp = _fptr(b)
    cdef float* yp = _fptr(y)
    cdef float* colp

    if _is_depthwise(&g):
        with nogil:
            _dw_forward(xp, wp, bp, yp, g)
        return y

    if _use_winograd(&g):
        return _wino_forward(x, w, b, g)

    if _team_blas():
        bh = _band_rows(&g, True)
        ldcol = 0 if g.pointwise else g.C * g.KH * g.KW * bh * g.OW
        threads = _team_threads()
        col = _workspace("col", max(1, threads * ldcol))
        colp = _fptr(col)
        _blas_single_enter()
        try:
            with nogil:
                _forward_team(xp, wp, bp, yp, colp, ldcol, g, bh, threads)
        finally:
            _blas_single_exit()
        return y

    w2 = w.reshape(g.O, K)
    if g.pointwise:
        x3 = x.reshape(g.N, g.C, P)
        y3 = y.reshape(g.N, g.O, P)
        for gi in range(G):
            np.matmul(w2[gi * Og:(gi + 1) * Og], x3[:, gi * Cg:(gi + 1) * Cg], out=y3[:, gi * Og:(gi + 1) * Og])
        if bp != NULL:
            with nogil:
                _bias_add(yp, g.N, g.O, P, bp)
        return y

    nb = _chunk_images(&g)
    col = _workspace("col", G * K * nb * P)
    yT = _workspace("rows", g.O * nb * P)
    colp = _fptr(col)
    cdef float* yTp = _fptr(yT)
    for n0 in range(0, g.N, nb):
        nb = min(nb, g.N - n0)
        colv = col[:G * K * nb * P].reshape(G * K, nb * P)
        yTv = yT[:g.O * nb * P].reshape(g.O, nb * P)
        with nogil:
            _im2col_chunk(xp + n0 * img, nb, colp, g)
        for gi in range(G):
            np.matmul(w2[gi * Og:(gi + 1) * Og], colv[gi * K:(gi + 1) * K], out=yTv[gi * Og:(gi + 1) * Og])
        with nogil:
            _unfold_rows(yTp, nb, g.O, P, bp, yp + n0 * g.O * P)
    return y


def _pointwise_input_grad(w2, dy, dx, Py_ssize_t G):
    """dx = w.T @ dy per group for a 1×1 stride-1 unpadded conv (the numpy path): w2 is w as (O, C/G)."""
    cdef Py_ssize_t N = dy.shape[0], O = dy.shape[1], C = dx.shape[1], Og = O // G, Cg = C // G, gi
    dy3 = dy.reshape(N, O, -1)
    dx3 = dx.reshape(N, C, -1)
    for gi in range(G):
        np.matmul(w2[gi * Og:(gi + 1) * Og].T, dy3[:, gi * Og:(gi + 1) * Og], out=dx3[:, gi * Cg:(gi + 1) * Cg])


class _Shape:
    """Stands for an input array where only its shape matters (the geometry check reads .ndim and .shape)."""

    def __init__(self, shape):
        self.shape = tuple(int(v) for v in shape)
        self.ndim = len(self.shape)


def algorithm(x_shape, w_shape, stride, pads, dilation, groups):
    """The route conv2d_forward and conv2d_backward take for these shapes under the current settings:
    "depthwise", "winograd", "im2col" (sgemm inside the OpenMP team; 1×1 ones skip the column copy) or
    "numpy" (np.matmul on chunks of the batch)."""
    cdef Geom g = _geometry(_Shape(x_shape), _Shape(w_shape), stride, pads, dilation, groups, None)
    if _is_depthwise(&g):
        return "depthwise"
    if _use_winograd(&g):
        return "winograd"
    return "im2col" if _team_blas() else "numpy"


def conv2d_backward_input(dy, w, x_shape, stride, pads, dilation, groups):
    """dx alone, (N, C, H, W) = x_shape, for y = conv(x, w) and the upstream gradient dy: no weight gradient
    and no im2col of an input. This is conv_transpose's forward, which used to compute (and drop) both."""
    w = _f32(w)
    dy = _f32(dy)
    cdef Geom g = _geometry(_Shape(x_shape), w, stride, pads, dilation, groups, None)
    columns = _column_table(&g)  # col2im reads it through g.cols: keep it alive for the call
    cdef Py_ssize_t P = g.OH * g.OW, img = g.C * g.H * g.W, K = g.Kg, G = g.G, Og = g.Og, Cg = g.Cg
    cdef Py_ssize_t n0, nb, gi
    if dy.shape != (g.N, g.O, g.OH, g.OW):
        raise ValueError(f"conv: dy must have shape {(g.N, g.O, g.OH, g.OW)}, got {dy.shape}")
    dx = np.empty(tuple(x_shape), dtype=np.float32)
    if dx.size == 0:
        return dx
    if dy.size == 0:
        dx[...] = 0.0
        return dx
    cdef const float* wp = _fptr(w)
    cdef const float* dyp = _fptr(dy)
    cdef float* dxp = _fptr(dx)
    cdef float* dcolp
    cdef float* dyTp
    cdef float* colp
    cdef int threads
    cdef Py_ssize_t bh, ldcol
    if _is_depthwise(&g):
        with nogil:
            _dw_backward_input(dyp, wp, dxp, g)
        return dx
    if _team_blas():  # one image per task inside the OpenMP team, as the training backward runs
        threads = _team_threads()
        bh = _band_rows(&g, _SMALL_GEMM_BACKWARD)
        ldcol = 0 if g.pointwise else g.C * g.KH * g.KW * bh * g.OW
        col = _workspace("col", max(1, threads * ldcol))
        dcol = _workspace("dcol", max(1, threads * ldcol))
        colp = _fptr(col)
        dcolp = NULL if g.pointwise else _fptr(dcol)
        _blas_single_enter()
        try:
            with nogil:
                _backward_team(NULL, wp, dyp, dxp, colp, dcolp, ldcol, NULL, NULL, g, bh, threads)
        finally:
            _blas_single_exit()
        return dx
    w2 = w.reshape(g.O, K)
    if g.pointwise:
        _pointwise_input_grad(w2, dy, dx, g.G)
        return dx
    nb = _chunk_images(&g)
    dcol = _workspace("dcol", G * K * nb * P)
    dyT = _workspace("rows", g.O * nb * P)
    dcolp = _fptr(dcol)
    dyTp = _fptr(dyT)
    for n0 in range(0, g.N, nb):
        nb = min(nb, g.N - n0)
        dyTv = dyT[:g.O * nb * P].reshape(g.O, nb * P)
        dcolv = dcol[:G * K * nb * P].reshape(G * K, nb * P)
        with nogil:
            _fold_rows(dyp + n0 * g.O * P, nb, g.O, P, dyTp)
        for gi in range(G):
            np.matmul(w2[gi * Og:(gi + 1) * Og].T, dyTv[gi * Og:(gi + 1) * Og], out=dcolv[gi * K:(gi + 1) * K])
        with nogil:
            _col2im_chunk(dcolp, nb, dxp + n0 * img, g)
    return dx


def conv2d_backward(x, w, dy, stride, pads, dilation, groups, need_dx=True, need_db=True):
    """(dx or None, dw, db or None) for y = conv(x, w) + b and the upstream gradient dy (N, O, OH, OW)."""
    x = _f32(x)
    w = _f32(w)
    dy = _f32(dy)
    cdef Geom g = _geometry(x, w, stride, pads, dilation, groups, None)
    columns = _column_table(&g)
    cdef Py_ssize_t P = g.OH * g.OW, img = g.C * g.H * g.W, K = g.Kg, G = g.G, Og = g.Og, Cg = g.Cg
    cdef Py_ssize_t n0, nb, gi, bh, ldcol
    cdef int threads
    if dy.shape != (g.N, g.O, g.OH, g.OW):
        raise ValueError(f"conv: dy must have shape {(g.N, g.O, g.OH, g.OW)}, got {dy.shape}")
    dx = np.empty(x.shape, dtype=np.float32) if need_dx else None
    dw = np.empty(w.shape, dtype=np.float32)
    db = np.empty(g.O, dtype=np.float32) if need_db else None
    cdef const float* xp = _fptr(x)
    cdef const float* wp = _fptr(w)
    cdef const float* dyp = _fptr(dy)
    cdef float* dxp = _fptr(dx)
    cdef float* dwp = _fptr(dw)
    cdef float* dbp = _fptr(db)
    cdef float* colp
    cdef float* dcolp = NULL
    cdef float* dyTp
    cdef float* dwTp
    cdef double* accp
    cdef double* dbaccp = NULL
    cdef bint team = _team_blas() and not _is_depthwise(&g)
    if dbp != NULL and not team:
        with nogil:
            _bias_grad(dyp, g.N, g.O, P, dbp)
    if x.size == 0 or dy.size == 0:
        if db is not None:
            db[...] = 0.0
        if dx is not None:
            dx[...] = 0.0
        dw[...] = 0.0
        return dx, dw, db

    if _is_depthwise(&g):
        acc = _workspace("acc", g.O * g.KH * g.KW * g.OW, np.float64)
        accp = <double*>cnp.PyArray_DATA(<cnp.ndarray>acc)
        with nogil:
            _dw_backward_weight(xp, dyp, accp, dwp, g)
            if dxp != NULL:
                _dw_backward_input(dyp, wp, dxp, g)
        return dx, dw, db

    if _use_winograd(&g):
        return _wino_backward(x, w, dy, g, need_dx, need_db)

    if team:
        threads = _team_threads()
        bh = _band_rows(&g, _SMALL_GEMM_BACKWARD)
        ldcol = 0 if g.pointwise else g.C * g.KH * g.KW * bh * g.OW
        col = _workspace("col", max(1, threads * ldcol))
        colp = _fptr(col)
        if dxp != NULL and not g.pointwise:
            dcol = _workspace("dcol", max(1, threads * ldcol))
            dcolp = _fptr(dcol)
        dwT = _workspace("dwT", threads * G * K * Og).reshape(threads, G, K, Og)
        dwT[...] = 0.0
        dwTp = _fptr(dwT)
        if dbp != NULL:  # db is summed in the same loop, per thread, in double
            dbacc = _workspace("dbacc", threads * g.O, np.float64).reshape(threads, g.O)
            dbacc[...] = 0.0
            dbaccp = <double*>cnp.PyArray_DATA(<cnp.ndarray>dbacc)
        _blas_single_enter()
        try:
            with nogil:
                _backward_team(xp, wp, dyp, dxp, colp, dcolp, ldcol, dwTp, dbaccp, g, bh, threads)
        finally:
            _blas_single_exit()
        dw.reshape(G, Og, K)[...] = dwT.sum(axis=0).transpose(0, 2, 1)
        if dbp != NULL:
            db[...] = dbacc.sum(axis=0)
        return dx, dw, db

    w2 = w.reshape(g.O, K)
    if g.pointwise and dxp != NULL:
        _pointwise_input_grad(w2, dy, dx, g.G)

    nb = _chunk_images(&g)
    col = _workspace("col", G * K * nb * P)
    dyT = _workspace("rows", g.O * nb * P)
    colp = _fptr(col)
    dyTp = _fptr(dyT)
    if dxp != NULL and not g.pointwise:
        dcol = _workspace("dcol", G * K * nb * P)
        dcolp = _fptr(dcol)
    # dw is accumulated transposed, (K, Og) per group: col @ dyT.T runs faster in OpenBLAS than dyT @ col.T.
    dwT = _workspace("dwT", G * K * Og).reshape(G, K, Og)
    part = _workspace("part", K * Og).reshape(K, Og) if nb < g.N else None
    for n0 in range(0, g.N, nb):
        nb = min(nb, g.N - n0)
        colv = col[:G * K * nb * P].reshape(G * K, nb * P)
        dyTv = dyT[:g.O * nb * P].reshape(g.O, nb * P)
        with nogil:
            _im2col_chunk(xp + n0 * img, nb, colp, g)
            _fold_rows(dyp + n0 * g.O * P, nb, g.O, P, dyTp)
        for gi in range(G):
            if n0 == 0:
                np.matmul(colv[gi * K:(gi + 1) * K], dyTv[gi * Og:(gi + 1) * Og].T, out=dwT[gi])
            else:
                np.matmul(colv[gi * K:(gi + 1) * K], dyTv[gi * Og:(gi + 1) * Og].T, out=part)
                dwT[gi] += part
        if dcolp != NULL:
            dcolv = dcol[:G * K * nb * P].reshape(G * K, nb * P)
            for gi in range(G):
                np.matmul(w2[gi * Og:(gi + 1) * Og].T, dyTv[gi * Og:(gi + 1) * Og], out=dcolv[gi * K:(gi + 1) * K])
            with nogil:
                _col2im_chunk(dcolp, nb, dxp + n0 * img, g)
    dw.reshape(G, Og, K)[...] = dwT.transpose(0, 2, 1)
    return dx, dw, db
