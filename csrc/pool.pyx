# cython: language_level=3
"""Native pooling kernels for the CPU training backend: max, average and global average, forward and backward.

Tensors are float32 NCHW. Geometry follows ONNX: kernel (kh, kw), stride (sh, sw), pads (top, left, bottom,
right). The caller gives the output size (OH, OW), which already accounts for ceil mode. Output (oh, ow)
looks at the window

    rows [oh*sh - top, oh*sh - top + kh),  columns [ow*sw - left, ow*sw - left + kw)

in input coordinates. Only real input elements take part; in ceil mode a window may run past the padded
input on the bottom/right, and is clipped.

- Max pooling: the value and the flat index h*W + w (int32) of the first maximum in row-major window order;
  a NaN is the maximum (the first NaN wins; PyTorch, which agrees everywhere else, takes the last one).
  A window with no real element gives 0 and index -1, and no gradient. The backward pass scatter-adds dy
  to those indices.
- Average pooling: the sum of the real elements, in float32 and row-major window order, divided by
    count_include_pad=False: the number of real elements in the window,
    count_include_pad=True:  the window's area clipped to the padded extent [-top, H + bottom) (PyTorch),
  and 0 where that divisor is 0.
- Global average pooling: the plane's mean, summed in double.

Every kernel works on one (n, c) plane at a time and `prange` splits the N*C planes over threads, so no
two threads ever write the same element. `pool_ref.py` holds the numpy references the tests compare against.
"""

import numpy as np

cimport numpy as cnp
from cython.parallel cimport prange
from libc.string cimport memset

cnp.import_array()

ctypedef cnp.int32_t i32

# Below this many inner-loop steps in total a thread team costs more than it saves.
cdef Py_ssize_t _PARALLEL_MIN_WORK = 32768


cdef struct Geom:
    Py_ssize_t H, W, OH, OW, kh, kw, sh, sw, pt, pl, pb, pr


cdef inline Py_ssize_t _min(Py_ssize_t a, Py_ssize_t b) noexcept nogil:
    return a if a < b else b


cdef inline Py_ssize_t _max(Py_ssize_t a, Py_ssize_t b) noexcept nogil:
    return a if a > b else b


# ---------------------------------------------------------------------------------------------------------
# Argument handling (Python level): shapes and geometry are checked here, so the loops only read memory
# they own whatever the caller passes.


def _ints(fn, name, value, n, minimum):
    try:
        t = tuple(int(v) for v in value)
    except TypeError:
        raise ValueError(f"{fn}: {name} must be {n} integers, got {value!r}") from None
    if len(t) != n or any(v < minimum for v in t):
        raise ValueError(f"{fn}: {name} must be {n} integers >= {minimum}, got {value!r}")
    return t


def _nchw(fn, name, a, ndim=4, dtype=np.float32):
    a = np.ascontiguousarray(a, dtype=dtype)
    if a.ndim != ndim:
        raise ValueError(f"{fn}: {name} must be {ndim}-D (N, C, H, W), got shape {a.shape}")
    return a


cdef Geom _geometry(fn, Py_ssize_t H, Py_ssize_t W, kernel, stride, pads, out_hw) except *:
    cdef Geom g
    g.H, g.W = H, W
    g.kh, g.kw = _ints(fn, "kernel", kernel, 2, 1)
    g.sh, g.sw = _ints(fn, "stride", stride, 2, 1)
    g.pt, g.pl, g.pb, g.pr = _ints(fn, "pads", pads, 4, 0)
    g.OH, g.OW = _ints(fn, "out_hw", out_hw, 2, 0)
    return g


# ---------------------------------------------------------------------------------------------------------
# Max pooling


cdef inline Py_ssize_t _window_argmax(const float* xp, Py_ssize_t W, Py_ssize_t h0, Py_ssize_t h1,
                                      Py_ssize_t w0, Py_ssize_t w1) noexcept nogil:
    """Flat index of the first maximum of rows [h0, h1) x columns [w0, w1) (non-empty), or of its first NaN.

    The scan is branch-free (a max, an integer select, a NaN flag): on real data the comparison goes
    either way, and a mispredicted branch costs more than the whole window. Only a window that holds a
    NaN is scanned again, for its first NaN.
    """
    cdef Py_ssize_t ih, iw, idx, best_i = h0 * W + w0
    cdef float v, best = xp[best_i]
    cdef bint gt, has_nan = False
    cdef const float* row
    for ih in range(h0, h1):
        row = xp + ih * W
        for iw in range(w0, w1):
            v = row[iw]
            idx = ih * W + iw
            gt = v > best  # strictly: equal values keep the first
            best = v if v > best else best
            best_i = best_i + ((idx - best_i) & -(<Py_ssize_t>gt))
            has_nan = has_nan | (v != v)
    if has_nan:
        for ih in range(h0, h1):
            row = xp + ih * W
            for iw in range(w0, w1):
                if row[iw] != row[iw]:
                    return ih * W + iw
    return best_i


cdef void _maxpool_plane(const float* xp, float* yp, i32* ap, Geom g) noexcept nogil:
    cdef Py_ssize_t oh, ow, o, i, h0, h1, w0, w1
    for oh in range(g.OH):
        h0 = oh * g.sh - g.pt
        h1 = _min(h0 + g.kh, g.H)
        h0 = _max(h0, 0)
        for ow in range(g.OW):
            w0 = ow * g.sw - g.pl
            w1 = _min(w0 + g.kw, g.W)
            w0 = _max(w0, 0)
            o = oh * g.OW + ow
            if h0 >= h1 or w0 >= w1:
                yp[o] = 0.0
                ap[o] = -1
            else:
                i = _window_argmax(xp, g.W, h0, h1, w0, w1)
                yp[o] = xp[i]
                ap[o] = <i32>i


def maxpool_forward(x, kernel, stride, pads, out_hw):
    """Max pooling of x (N, C, H, W): returns y float32 (N, C, OH, OW) and argmax int32 (flat h*W + w, or -1)."""
    x = _nchw("maxpool_forward", "x", x)
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], P = N * C, p
    cdef Geom g = _geometry("maxpool_forward", x.shape[2], x.shape[3], kernel, stride, pads, out_hw)
    y = np.empty((N, C, g.OH, g.OW), dtype=np.float32)
    argmax = np.empty((N, C, g.OH, g.OW), dtype=np.int32)
    cdef const float[:, ::1] xv = x.reshape(P, g.H * g.W)
    cdef float[:, ::1] yv = y.reshape(P, g.OH * g.OW)
    cdef i32[:, ::1] av = argmax.reshape(P, g.OH * g.OW)
    with nogil:
        if P * g.OH * g.OW * g.kh * g.kw >= _PARALLEL_MIN_WORK:
            for p in prange(P, schedule="static"):
                _maxpool_plane(&xv[p, 0], &yv[p, 0], &av[p, 0], g)
        else:
            for p in range(P):
                _maxpool_plane(&xv[p, 0], &yv[p, 0], &av[p, 0], g)
    return y, argmax


cdef void _maxpool_backward_plane(const float* dyp, const i32* ap, float* dxp, Py_ssize_t HW,
                                  Py_ssize_t OHW) noexcept nogil:
    cdef Py_ssize_t o, a
    memset(dxp, 0, HW * sizeof(float))
    for o in range(OHW):
        a = ap[o]
        if a >= 0 and a < HW:  # -1: a window with no real element
            dxp[a] += dyp[o]


def maxpool_backward(dy, argmax, in_hw):
    """Gradient of max pooling: dy (N, C, OH, OW) scatter-added to the argmax positions of dx (N, C, H, W)."""
    dy = _nchw("maxpool_backward", "dy", dy)
    argmax = _nchw("maxpool_backward", "argmax", argmax, dtype=np.int32)
    if argmax.shape != dy.shape:
        raise ValueError(f"maxpool_backward: argmax shape {argmax.shape} differs from dy shape {dy.shape}")
    H, W = _ints("maxpool_backward", "in_hw", in_hw, 2, 0)
    cdef Py_ssize_t N = dy.shape[0], C = dy.shape[1], P = N * C, HW = H * W, OHW = dy.shape[2] * dy.shape[3], p
    dx = np.empty((N, C, H, W), dtype=np.float32)
    cdef const float[:, ::1] dyv = dy.reshape(P, OHW)
    cdef const i32[:, ::1] av = argmax.reshape(P, OHW)
    cdef float[:, ::1] dxv = dx.reshape(P, HW)
    with nogil:
        if P * (HW + OHW) >= _PARALLEL_MIN_WORK:
            for p in prange(P, schedule="static"):
                _maxpool_backward_plane(&dyv[p, 0], &av[p, 0], &dxv[p, 0], HW, OHW)
        else:
            for p in range(P):
                _maxpool_backward_plane(&dyv[p, 0], &av[p, 0], &dxv[p, 0], HW, OHW)
    return dx


# ---------------------------------------------------------------------------------------------------------
# Average pooling


cdef inline void _avg_window(Geom g, Py_ssize_t oh, Py_ssize_t ow, bint count_include_pad,
                             Py_ssize_t* h0, Py_ssize_t* h1, Py_ssize_t* w0, Py_ssize_t* w1,
                             Py_ssize_t* divisor) noexcept nogil:
    """The real rows [h0, h1) and columns [w0, w1) of window (oh, ow) and its divisor."""
    cdef Py_ssize_t hs = oh * g.sh - g.pt, ws = ow * g.sw - g.pl
    cdef Py_ssize_t he = _min(hs + g.kh, g.H + g.pb), we = _min(ws + g.kw, g.W + g.pr)
    h0[0] = _max(hs, 0)
    h1[0] = _max(_min(he, g.H), h0[0])
    w0[0] = _max(ws, 0)
    w1[0] = _max(_min(we, g.W), w0[0])
    if count_include_pad:
        divisor[0] = _max(he - hs, 0) * _max(we - ws, 0)
    else:
        divisor[0] = (h1[0] - h0[0]) * (w1[0] - w0[0])


cdef void _avgpool_plane(const float* xp, float* yp, Geom g, bint count_include_pad) noexcept nogil:
    cdef Py_ssize_t oh, ow, ih, iw, h0, h1, w0, w1, div
    cdef float s
    cdef const float* row
    for oh in range(g.OH):
        for ow in range(g.OW):
            _avg_window(g, oh, ow, count_include_pad, &h0, &h1, &w0, &w1, &div)
            s = 0.0
            for ih in range(h0, h1):
                row = xp + ih * g.W
                for iw in range(w0, w1):
                    s = s + row[iw]
            yp[oh * g.OW + ow] = s / <float>div if div > 0 else 0.0


def avgpool_forward(x, kernel, stride, pads, out_hw, count_include_pad):
    """Average pooling of x (N, C, H, W) into float32 (N, C, OH, OW); see the module docstring for divisors."""
    x = _nchw("avgpool_forward", "x", x)
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], P = N * C, p
    cdef Geom g = _geometry("avgpool_forward", x.shape[2], x.shape[3], kernel, stride, pads, out_hw)
    cdef bint cip = bool(count_include_pad)
    y = np.empty((N, C, g.OH, g.OW), dtype=np.float32)
    cdef const float[:, ::1] xv = x.reshape(P, g.H * g.W)
    cdef float[:, ::1] yv = y.reshape(P, g.OH * g.OW)
    with nogil:
        if P * g.OH * g.OW * g.kh * g.kw >= _PARALLEL_MIN_WORK:
            for p in prange(P, schedule="static"):
                _avgpool_plane(&xv[p, 0], &yv[p, 0], g, cip)
        else:
            for p in range(P):
                _avgpool_plane(&xv[p, 0], &yv[p, 0], g, cip)
    return y


cdef void _avgpool_backward_plane(const float* dyp, float* dxp, Geom g, bint count_include_pad) noexcept nogil:
    cdef Py_ssize_t oh, ow, ih, iw, h0, h1, w0, w1, div
    cdef float gv
    cdef float* row
    memset(dxp, 0, g.H * g.W * sizeof(float))
    for oh in range(g.OH):
        for ow in range(g.OW):
            _avg_window(g, oh, ow, count_include_pad, &h0, &h1, &w0, &w1, &div)
            if div <= 0:
                continue
            gv = dyp[oh * g.OW + ow] / <float>div
            for ih in range(h0, h1):
                row = dxp + ih * g.W
                for iw in range(w0, w1):
                    row[iw] = row[iw] + gv


def avgpool_backward(dy, in_hw, kernel, stride, pads, count_include_pad):
    """Gradient of average pooling: dy (N, C, OH, OW) -> dx float32 (N, C, H, W)."""
    dy = _nchw("avgpool_backward", "dy", dy)
    H, W = _ints("avgpool_backward", "in_hw", in_hw, 2, 0)
    cdef Py_ssize_t N = dy.shape[0], C = dy.shape[1], P = N * C, p
    cdef Geom g = _geometry("avgpool_backward", H, W, kernel, stride, pads, dy.shape[2:])
    cdef bint cip = bool(count_include_pad)
    dx = np.empty((N, C, H, W), dtype=np.float32)
    cdef const float[:, ::1] dyv = dy.reshape(P, g.OH * g.OW)
    cdef float[:, ::1] dxv = dx.reshape(P, g.H * g.W)
    with nogil:
        if P * (g.OH * g.OW * g.kh * g.kw + g.H * g.W) >= _PARALLEL_MIN_WORK:
            for p in prange(P, schedule="static"):
                _avgpool_backward_plane(&dyv[p, 0], &dxv[p, 0], g, cip)
        else:
            for p in range(P):
                _avgpool_backward_plane(&dyv[p, 0], &dxv[p, 0], g, cip)
    return dx


# ---------------------------------------------------------------------------------------------------------
# Global average pooling


cdef inline float _plane_mean(const float* xp, Py_ssize_t HW) noexcept nogil:
    """Mean of HW floats, summed in double by four accumulators in a fixed order (0 for an empty plane)."""
    cdef double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0
    cdef Py_ssize_t i = 0
    if HW == 0:
        return 0.0
    while i + 4 <= HW:
        s0 += xp[i]
        s1 += xp[i + 1]
        s2 += xp[i + 2]
        s3 += xp[i + 3]
        i += 4
    while i < HW:
        s0 += xp[i]
        i += 1
    return <float>(((s0 + s1) + (s2 + s3)) / <double>HW)


def global_avgpool_forward(x):
    """Mean of each (n, c) plane of x (N, C, H, W): float32 (N, C, 1, 1); an empty plane gives 0."""
    x = _nchw("global_avgpool_forward", "x", x)
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], P = N * C, HW = x.shape[2] * x.shape[3], p
    y = np.empty((N, C, 1, 1), dtype=np.float32)
    cdef const float[:, ::1] xv = x.reshape(P, HW)
    cdef float[::1] yv = y.reshape(P)
    with nogil:
        if P * HW >= _PARALLEL_MIN_WORK:
            for p in prange(P, schedule="static"):
                yv[p] = _plane_mean(&xv[p, 0], HW)
        else:
            for p in range(P):
                yv[p] = _plane_mean(&xv[p, 0], HW)
    return y


cdef inline void _fill(float* dxp, Py_ssize_t HW, float v) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(HW):
        dxp[i] = v


def global_avgpool_backward(dy, in_hw):
    """Gradient of global average pooling: dy (N, C, 1, 1) spread as dy / (H*W) over dx (N, C, H, W)."""
    dy = _nchw("global_avgpool_backward", "dy", dy)
    if dy.shape[2:] != (1, 1):
        raise ValueError(f"global_avgpool_backward: dy must be (N, C, 1, 1), got shape {dy.shape}")
    H, W = _ints("global_avgpool_backward", "in_hw", in_hw, 2, 0)
    cdef Py_ssize_t N = dy.shape[0], C = dy.shape[1], P = N * C, HW = H * W, p
    dx = np.empty((N, C, H, W), dtype=np.float32)
    cdef const float[::1] dyv = dy.reshape(P)
    cdef float[:, ::1] dxv = dx.reshape(P, HW)
    if HW == 0:
        return dx
    with nogil:
        if P * HW >= _PARALLEL_MIN_WORK:
            for p in prange(P, schedule="static"):
                _fill(&dxv[p, 0], HW, dyv[p] / <float>HW)
        else:
            for p in range(P):
                _fill(&dxv[p, 0], HW, dyv[p] / <float>HW)
    return dx
