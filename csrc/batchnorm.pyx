# cython: language_level=3
"""Native batch-normalization kernels for the CPU training backend: training forward, inference forward, backward.

x is float32 (N, C) or (N, C, *spatial), C-contiguous; statistics are per channel over the M = N * spatial
elements of that channel. With every sum taken in double precision:

    training forward   mean = sum(x) / M,  var = sum((x - mean)^2) / M  (biased, two passes),
                       invstd = 1 / sqrt(var + eps),  mean and invstd returned as float32 (C,),
                       scale = gamma * invstd,  shift = beta - mean * scale   (double, then float32),
                       y = x * scale + shift   (float32)
    inference forward  scale = gamma / sqrt(running_var + eps),  shift = beta - running_mean * scale,
                       y = x * scale + shift
    backward           (from the float32 mean and invstd the forward returned)
                       dbeta = sum(dy),  dgamma = invstd * sum(dy * (x - mean)),
                       dx = (dy - dbeta / M - (x - mean) * (invstd^2 * sum(dy * (x - mean)) / M)) * gamma * invstd
                       with the three per-channel constants rounded to float32 and the rest in float32.

With `relu=True` the forwards apply the following ReLU in the same pass (y = y < 0 ? 0 : y, as relu_forward),
and backward given that output `y` masks dy first (dy = y > 0 ? dy : 0, as relu_backward): the same numbers as
the two ops one after the other, without one more pass over the tensor each way.

The caller updates running statistics (with the unbiased variance) itself. `prange` splits the channels
over threads: each thread reads and writes only its own channels. `batchnorm_ref.py` holds the numpy
references the tests compare against.
"""

import numpy as np

from libc.math cimport sqrt
from cython.parallel cimport prange

cdef extern from *:
    """
    #include <stdint.h>
    #include <string.h>
    /* relu_backward's dy where y > 0, else 0, without a branch: a branch on the sign of y mispredicts half the
       time on real activations (the fused backward ran 3.7x slower than the two passes with one) and keeps
       the loop from vectorizing. NaN dy where y <= 0 gives 0, as relu_backward does. */
    static inline float dlc_relu_mask(float d, float y) {
        uint32_t bits;
        float out;
        memcpy(&bits, &d, sizeof bits);
        bits &= (uint32_t)0 - (uint32_t)(y > 0.0f);
        memcpy(&out, &bits, sizeof out);
        return out;
    }
    """
    float dlc_relu_mask(float d, float y) noexcept nogil


# Below this many elements a thread team costs more than it saves.
cdef Py_ssize_t _PARALLEL_MIN_ELEMENTS = 32768


# ---------------------------------------------------------------------------------------------------------
# Argument handling


def _ncs(fn, name, x):
    """x as a float32 C-contiguous (N, C, S) array (S = 1 for 2-D input)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim < 2:
        raise ValueError(f"{fn}: {name} must be (N, C) or (N, C, H, W), got shape {x.shape}")
    return x.reshape(x.shape[0], x.shape[1], int(np.prod(x.shape[2:])))


def _per_channel(fn, name, v, Py_ssize_t C):
    v = np.ascontiguousarray(v, dtype=np.float32).reshape(-1)
    if v.shape[0] != C:
        raise ValueError(f"{fn}: {name} must hold one value per channel ({C}), got {v.shape[0]}")
    return v


# ---------------------------------------------------------------------------------------------------------
# Per-channel loops. A channel is N runs of S contiguous floats, `stride` = C * S apart.


cdef inline double _sum(const float* p, Py_ssize_t n) noexcept nogil:
    """Sum of n floats in double: four accumulators in a fixed order (deterministic, and not one long chain)."""
    cdef double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0
    cdef Py_ssize_t i = 0
    while i + 4 <= n:
        s0 += p[i]
        s1 += p[i + 1]
        s2 += p[i + 2]
        s3 += p[i + 3]
        i += 4
    while i < n:
        s0 += p[i]
        i += 1
    return (s0 + s1) + (s2 + s3)


cdef inline double _sum_sq_dev(const float* p, Py_ssize_t n, double mean) noexcept nogil:
    """Sum of (p[i] - mean)^2 in double."""
    cdef double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0, d0, d1, d2, d3
    cdef Py_ssize_t i = 0
    while i + 4 <= n:
        d0 = p[i] - mean
        d1 = p[i + 1] - mean
        d2 = p[i + 2] - mean
        d3 = p[i + 3] - mean
        s0 += d0 * d0
        s1 += d1 * d1
        s2 += d2 * d2
        s3 += d3 * d3
        i += 4
    while i < n:
        d0 = p[i] - mean
        s0 += d0 * d0
        i += 1
    return (s0 + s1) + (s2 + s3)


cdef inline void _sum_dy_dyxm(const float* dy, const float* x, Py_ssize_t n, double mean,
                              double* sum_dy, double* sum_dyxm) noexcept nogil:
    """Adds sum(dy) and sum(dy * (x - mean)), in double, to the two totals."""
    cdef double a0 = 0.0, a1 = 0.0, a2 = 0.0, a3 = 0.0, b0 = 0.0, b1 = 0.0, b2 = 0.0, b3 = 0.0
    cdef Py_ssize_t i = 0
    while i + 4 <= n:
        a0 += dy[i]
        a1 += dy[i + 1]
        a2 += dy[i + 2]
        a3 += dy[i + 3]
        b0 += dy[i] * (x[i] - mean)
        b1 += dy[i + 1] * (x[i + 1] - mean)
        b2 += dy[i + 2] * (x[i + 2] - mean)
        b3 += dy[i + 3] * (x[i + 3] - mean)
        i += 4
    while i < n:
        a0 += dy[i]
        b0 += dy[i] * (x[i] - mean)
        i += 1
    sum_dy[0] += (a0 + a1) + (a2 + a3)
    sum_dyxm[0] += (b0 + b1) + (b2 + b3)


cdef inline void _sum_dy_dyxm_masked(const float* dy, const float* x, const float* y, Py_ssize_t n, double mean,
                                     double* sum_dy, double* sum_dyxm) noexcept nogil:
    """_sum_dy_dyxm of dy masked by the ReLU output y (dy where y > 0, else 0)."""
    cdef double a0 = 0.0, a1 = 0.0, a2 = 0.0, a3 = 0.0, b0 = 0.0, b1 = 0.0, b2 = 0.0, b3 = 0.0
    cdef float d0, d1, d2, d3
    cdef Py_ssize_t i = 0
    while i + 4 <= n:
        d0 = dlc_relu_mask(dy[i], y[i])
        d1 = dlc_relu_mask(dy[i + 1], y[i + 1])
        d2 = dlc_relu_mask(dy[i + 2], y[i + 2])
        d3 = dlc_relu_mask(dy[i + 3], y[i + 3])
        a0 += d0
        a1 += d1
        a2 += d2
        a3 += d3
        b0 += d0 * (x[i] - mean)
        b1 += d1 * (x[i + 1] - mean)
        b2 += d2 * (x[i + 2] - mean)
        b3 += d3 * (x[i + 3] - mean)
        i += 4
    while i < n:
        d0 = dlc_relu_mask(dy[i], y[i])
        a0 += d0
        b0 += d0 * (x[i] - mean)
        i += 1
    sum_dy[0] += (a0 + a1) + (a2 + a3)
    sum_dyxm[0] += (b0 + b1) + (b2 + b3)


cdef inline void _affine(const float* x, float* y, Py_ssize_t n, float scale, float shift) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        y[i] = x[i] * scale + shift


cdef inline void _affine_relu(const float* x, float* y, Py_ssize_t n, float scale, float shift) noexcept nogil:
    cdef Py_ssize_t i
    cdef float v
    for i in range(n):
        v = x[i] * scale + shift
        y[i] = 0.0 if v < 0 else v  # relu_forward's rule: NaN passes


cdef void _train_channel(const float* x, float* y, Py_ssize_t N, Py_ssize_t S, Py_ssize_t stride,
                         float gamma, float beta, double eps, float* mean_out, float* invstd_out,
                         bint relu) noexcept nogil:
    cdef Py_ssize_t n, M = N * S
    cdef double total = 0.0, mean, var, invstd, scale
    for n in range(N):
        total += _sum(x + n * stride, S)
    mean = total / M
    total = 0.0
    for n in range(N):
        total += _sum_sq_dev(x + n * stride, S, mean)
    var = total / M
    invstd = 1.0 / sqrt(var + eps)
    mean_out[0] = <float>mean
    invstd_out[0] = <float>invstd
    scale = gamma * invstd
    for n in range(N):
        if relu:
            _affine_relu(x + n * stride, y + n * stride, S, <float>scale, <float>(beta - mean * scale))
        else:
            _affine(x + n * stride, y + n * stride, S, <float>scale, <float>(beta - mean * scale))


cdef void _backward_channel(const float* dy, const float* x, const float* yr, float* dx, Py_ssize_t N,
                            Py_ssize_t S, Py_ssize_t stride, float gamma, float mean, float invstd,
                            float* dgamma_out, float* dbeta_out) noexcept nogil:
    """One channel's gradient; with `yr` (the fused ReLU's output, else NULL) dy is masked by yr > 0."""
    cdef Py_ssize_t n, i, M = N * S
    cdef double sum_dy = 0.0, sum_dyxm = 0.0
    cdef float dy_mean, proj, k, d
    cdef const float* dyp
    cdef const float* xp
    cdef const float* yp
    cdef float* dxp
    for n in range(N):
        if yr != NULL:
            _sum_dy_dyxm_masked(dy + n * stride, x + n * stride, yr + n * stride, S, mean, &sum_dy, &sum_dyxm)
        else:
            _sum_dy_dyxm(dy + n * stride, x + n * stride, S, mean, &sum_dy, &sum_dyxm)
    dbeta_out[0] = <float>sum_dy
    dgamma_out[0] = <float>(sum_dyxm * invstd)
    dy_mean = <float>(sum_dy / M)
    proj = <float>(<double>invstd * invstd * sum_dyxm / M)
    k = <float>(<double>gamma * invstd)
    for n in range(N):
        dyp = dy + n * stride
        xp = x + n * stride
        dxp = dx + n * stride
        if yr != NULL:
            yp = yr + n * stride
            for i in range(S):
                d = dlc_relu_mask(dyp[i], yp[i])
                dxp[i] = (d - dy_mean - (xp[i] - mean) * proj) * k
        else:
            for i in range(S):
                dxp[i] = (dyp[i] - dy_mean - (xp[i] - mean) * proj) * k


# ---------------------------------------------------------------------------------------------------------
# Entry points


def batchnorm_forward_train(x, gamma, beta, double eps, bint relu=False):
    """Training-mode batch norm of x (N, C, ...): returns y (float32, x's shape), mean and invstd (float32 (C,)).
    With relu, y is the following ReLU's output (mean and invstd stay the batch norm's)."""
    shape = np.shape(x)
    x3 = _ncs("batchnorm_forward_train", "x", x)
    cdef Py_ssize_t N = x3.shape[0], C = x3.shape[1], S = x3.shape[2], c
    if N * S == 0 and C > 0:
        raise ValueError(f"batchnorm_forward_train: no values per channel in x of shape {shape}")
    g = _per_channel("batchnorm_forward_train", "gamma", gamma, C)
    b = _per_channel("batchnorm_forward_train", "beta", beta, C)
    y3 = np.empty((N, C, S), dtype=np.float32)
    mean = np.empty(C, dtype=np.float32)
    invstd = np.empty(C, dtype=np.float32)
    cdef const float[:, :, ::1] xv = x3
    cdef float[:, :, ::1] yv = y3
    cdef const float[::1] gv = g, bv = b
    cdef float[::1] mv = mean, iv = invstd
    with nogil:
        if N * C * S >= _PARALLEL_MIN_ELEMENTS:
            for c in prange(C, schedule="static"):
                _train_channel(&xv[0, c, 0], &yv[0, c, 0], N, S, C * S, gv[c], bv[c], eps, &mv[c], &iv[c],
                               relu)
        else:
            for c in range(C):
                _train_channel(&xv[0, c, 0], &yv[0, c, 0], N, S, C * S, gv[c], bv[c], eps, &mv[c], &iv[c],
                               relu)
    return y3.reshape(shape), mean, invstd


def batchnorm_forward_eval(x, gamma, beta, running_mean, running_var, double eps, bint relu=False):
    """Inference-mode batch norm of x (N, C, ...) with running statistics: y float32 of x's shape (with relu:
    the following ReLU's output)."""
    shape = np.shape(x)
    fn = "batchnorm_forward_eval"
    x3 = _ncs(fn, "x", x)
    cdef Py_ssize_t N = x3.shape[0], C = x3.shape[1], S = x3.shape[2], c, n
    g = _per_channel(fn, "gamma", gamma, C).astype(np.float64)
    scale_d = g / np.sqrt(_per_channel(fn, "running_var", running_var, C).astype(np.float64) + eps)
    shift_d = _per_channel(fn, "beta", beta, C) - _per_channel(fn, "running_mean", running_mean, C) * scale_d
    y3 = np.empty((N, C, S), dtype=np.float32)
    cdef const float[:, :, ::1] xv = x3
    cdef float[:, :, ::1] yv = y3
    cdef const float[::1] sv = scale_d.astype(np.float32), hv = shift_d.astype(np.float32)
    with nogil:
        if N * C * S >= _PARALLEL_MIN_ELEMENTS:
            for c in prange(C, schedule="static"):
                for n in range(N):
                    if relu:
                        _affine_relu(&xv[n, c, 0], &yv[n, c, 0], S, sv[c], hv[c])
                    else:
                        _affine(&xv[n, c, 0], &yv[n, c, 0], S, sv[c], hv[c])
        else:
            for c in range(C):
                for n in range(N):
                    if relu:
                        _affine_relu(&xv[n, c, 0], &yv[n, c, 0], S, sv[c], hv[c])
                    else:
                        _affine(&xv[n, c, 0], &yv[n, c, 0], S, sv[c], hv[c])
    return y3.reshape(shape)


def batchnorm_backward(dy, x, gamma, mean, invstd, y=None):
    """Training-mode batch-norm gradient: returns dx (float32, x's shape), dgamma and dbeta (float32 (C,)).
    With `y` (the output of a fused ReLU, batchnorm_forward_train(..., relu=True)), dy is the ReLU's upstream
    gradient and is masked by y > 0 first."""
    shape = np.shape(x)
    fn = "batchnorm_backward"
    x3 = _ncs(fn, "x", x)
    dy3 = _ncs(fn, "dy", dy)
    if dy3.shape != x3.shape:
        raise ValueError(f"{fn}: dy shape {np.shape(dy)} differs from x shape {shape}")
    y3 = x3 if y is None else _ncs(fn, "y", y)
    if y3.shape != x3.shape:
        raise ValueError(f"{fn}: y shape {np.shape(y)} differs from x shape {shape}")
    cdef Py_ssize_t N = x3.shape[0], C = x3.shape[1], S = x3.shape[2], c
    g = _per_channel(fn, "gamma", gamma, C)
    m = _per_channel(fn, "mean", mean, C)
    s = _per_channel(fn, "invstd", invstd, C)
    dx3 = np.empty((N, C, S), dtype=np.float32)
    dgamma = np.empty(C, dtype=np.float32)
    dbeta = np.empty(C, dtype=np.float32)
    if N * S == 0:
        dgamma[:] = 0
        dbeta[:] = 0
        return dx3.reshape(shape), dgamma, dbeta
    cdef const float[:, :, ::1] xv = x3, dyv = dy3, yv = y3
    cdef const float* yp = NULL if y is None else &yv[0, 0, 0]
    cdef float[:, :, ::1] dxv = dx3
    cdef const float[::1] gv = g, mv = m, iv = s
    cdef float[::1] dgv = dgamma, dbv = dbeta
    with nogil:
        if N * C * S >= _PARALLEL_MIN_ELEMENTS:
            for c in prange(C, schedule="static"):
                _backward_channel(&dyv[0, c, 0], &xv[0, c, 0], NULL if yp == NULL else yp + c * S, &dxv[0, c, 0],
                                  N, S, C * S, gv[c], mv[c], iv[c], &dgv[c], &dbv[c])
        else:
            for c in range(C):
                _backward_channel(&dyv[0, c, 0], &xv[0, c, 0], NULL if yp == NULL else yp + c * S, &dxv[0, c, 0],
                                  N, S, C * S, gv[c], mv[c], iv[c], &dgv[c], &dbv[c])
    return dx3.reshape(shape), dgamma, dbeta
