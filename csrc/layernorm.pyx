# cython: language_level=3
"""Native layer normalization over channels (ConvNeXt's LayerNorm2d) for the CPU training backend.

x is float32 (N, C) or (N, C, *spatial), C-contiguous. Each position (n, s) is normalised over its C channels,
which lie S = prod(spatial) floats apart; gamma and beta are per channel. Sums are in double:

    forward   mean[n, s] = sum_c x / C,  var = sum_c (x - mean)^2 / C  (biased, two passes),
              invstd = 1 / sqrt(var + eps)  (mean and invstd returned as float32 (N, S)),
              xhat = (x - mean) * invstd,  y = xhat * gamma[c] + beta[c]   (float32)
    backward  g = dy * gamma[c],  a = sum_c g / C,  b = sum_c g * xhat / C   (double, then float32),
              dx = (g - a - xhat * b) * invstd;  dgamma[c] = sum_{n,s} dy * xhat,  dbeta[c] = sum_{n,s} dy

`prange` splits the samples over threads; per-channel sums of the backward are taken per sample and added
in numpy (in double), so no two threads write the same memory. `layernorm_ref.py` holds the numpy references.
"""

import numpy as np

from libc.math cimport sqrt
from libc.stdlib cimport free, malloc
from cython.parallel cimport prange

cdef Py_ssize_t _PARALLEL_MIN_ELEMENTS = 32768


def _ncs(fn, name, x):
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim < 2:
        raise ValueError(f"{fn}: {name} must be (N, C) or (N, C, H, W), got shape {x.shape}")
    return x.reshape(x.shape[0], x.shape[1], int(np.prod(x.shape[2:])))


def _per_channel(fn, name, v, Py_ssize_t C):
    v = np.ascontiguousarray(v, dtype=np.float32).reshape(-1)
    if v.shape[0] != C:
        raise ValueError(f"{fn}: {name} must hold one value per channel ({C}), got {v.shape[0]}")
    return v


cdef int _forward_sample(const float* x, float* y, float* mean_out, float* inv_out, const float* g,
                         const float* b, Py_ssize_t C, Py_ssize_t S, double eps) noexcept nogil:
    """One sample: statistics over the C channels of each of its S positions. Returns -1 when out of memory."""
    cdef double* acc = <double*>malloc(S * sizeof(double))
    cdef Py_ssize_t c, s
    cdef float m, k
    if acc == NULL:
        return -1
    for s in range(S):
        acc[s] = 0.0
    for c in range(C):
        for s in range(S):
            acc[s] += x[c * S + s]
    for s in range(S):
        mean_out[s] = <float>(acc[s] / C)
        acc[s] = 0.0
    for c in range(C):
        for s in range(S):
            acc[s] += (<double>x[c * S + s] - mean_out[s]) * (<double>x[c * S + s] - mean_out[s])
    for s in range(S):
        inv_out[s] = <float>(1.0 / sqrt(acc[s] / C + eps))
    for c in range(C):
        for s in range(S):
            y[c * S + s] = ((x[c * S + s] - mean_out[s]) * inv_out[s]) * g[c] + b[c]
    free(acc)
    return 0


cdef int _backward_sample(const float* dy, const float* x, float* dx, const float* mean, const float* inv,
                          const float* g, double* dgamma, double* dbeta, Py_ssize_t C,
                          Py_ssize_t S) noexcept nogil:
    cdef double* a = <double*>malloc(2 * S * sizeof(double))
    cdef double* bsum
    cdef Py_ssize_t c, s
    cdef float xhat, gy, fa, fb
    cdef double dg, db
    if a == NULL:
        return -1
    bsum = a + S
    for s in range(S):
        a[s] = 0.0
        bsum[s] = 0.0
    for c in range(C):
        dg = 0.0
        db = 0.0
        for s in range(S):
            xhat = (x[c * S + s] - mean[s]) * inv[s]
            gy = dy[c * S + s] * g[c]
            a[s] += gy
            bsum[s] += <double>gy * xhat
            dg += <double>dy[c * S + s] * xhat
            db += dy[c * S + s]
        dgamma[c] = dg
        dbeta[c] = db
    for c in range(C):
        for s in range(S):
            fa = <float>(a[s] / C)
            fb = <float>(bsum[s] / C)
            xhat = (x[c * S + s] - mean[s]) * inv[s]
            dx[c * S + s] = (dy[c * S + s] * g[c] - fa - xhat * fb) * inv[s]
    free(a)
    return 0


def layernorm_forward(x, gamma, beta, double eps):
    """Channel layer norm of x (N, C, ...): y (float32, x's shape), mean and invstd (float32, x's shape without
    the channel axis)."""
    shape = np.shape(x)
    fn = "layernorm_forward"
    x3 = _ncs(fn, "x", x)
    cdef Py_ssize_t N = x3.shape[0], C = x3.shape[1], S = x3.shape[2], n
    if C == 0:
        raise ValueError(f"{fn}: x of shape {shape} has no channels")
    gv_ = _per_channel(fn, "gamma", gamma, C)
    bv_ = _per_channel(fn, "beta", beta, C)
    y3 = np.empty((N, C, S), dtype=np.float32)
    mean = np.empty((N, S), dtype=np.float32)
    invstd = np.empty((N, S), dtype=np.float32)
    cdef const float[:, :, ::1] xv = x3
    cdef float[:, :, ::1] yv = y3
    cdef float[:, ::1] mv = mean, iv = invstd
    cdef const float[::1] gv = gv_, bv = bv_
    cdef int failed = 0
    if N * S == 0:
        return y3.reshape(shape), mean.reshape((N,) + shape[2:]), invstd.reshape((N,) + shape[2:])
    for n in prange(N, nogil=True, schedule="static", use_threads_if=N * C * S >= _PARALLEL_MIN_ELEMENTS):
        if _forward_sample(&xv[n, 0, 0], &yv[n, 0, 0], &mv[n, 0], &iv[n, 0], &gv[0], &bv[0], C, S, eps) != 0:
            failed += 1
    if failed:
        raise MemoryError(f"{fn}: no memory for the per-position sums")
    return y3.reshape(shape), mean.reshape((N,) + shape[2:]), invstd.reshape((N,) + shape[2:])


def layernorm_backward(dy, x, gamma, mean, invstd):
    """dx (float32, x's shape), dgamma and dbeta (float32 (C,)) of the channel layer norm."""
    shape = np.shape(x)
    fn = "layernorm_backward"
    x3 = _ncs(fn, "x", x)
    dy3 = _ncs(fn, "dy", dy)
    if dy3.shape != x3.shape:
        raise ValueError(f"{fn}: dy shape {np.shape(dy)} differs from x shape {shape}")
    cdef Py_ssize_t N = x3.shape[0], C = x3.shape[1], S = x3.shape[2], n
    gv_ = _per_channel(fn, "gamma", gamma, C)
    m2 = np.ascontiguousarray(mean, dtype=np.float32).reshape(N, S)
    i2 = np.ascontiguousarray(invstd, dtype=np.float32).reshape(N, S)
    dx3 = np.empty((N, C, S), dtype=np.float32)
    dgamma_n = np.zeros((N, C), dtype=np.float64)
    dbeta_n = np.zeros((N, C), dtype=np.float64)
    cdef const float[:, :, ::1] xv = x3, dyv = dy3
    cdef float[:, :, ::1] dxv = dx3
    cdef const float[:, ::1] mv = m2, iv = i2
    cdef const float[::1] gv = gv_
    cdef double[:, ::1] dgv = dgamma_n, dbv = dbeta_n
    cdef int failed = 0
    if N * S == 0:
        return dx3.reshape(shape), np.zeros(C, np.float32), np.zeros(C, np.float32)
    for n in prange(N, nogil=True, schedule="static", use_threads_if=N * C * S >= _PARALLEL_MIN_ELEMENTS):
        if _backward_sample(&dyv[n, 0, 0], &xv[n, 0, 0], &dxv[n, 0, 0], &mv[n, 0], &iv[n, 0], &gv[0],
                            &dgv[n, 0], &dbv[n, 0], C, S) != 0:
            failed += 1
    if failed:
        raise MemoryError(f"{fn}: no memory for the per-position sums")
    return dx3.reshape(shape), dgamma_n.sum(axis=0).astype(np.float32), dbeta_n.sum(axis=0).astype(np.float32)
