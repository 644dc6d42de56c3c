# cython: language_level=3
"""Native classification losses of the CPU training backend: softmax cross-entropy and focal loss.

Both take logits (N, K) float32 and labels (N,) int64 and return (loss: float, dlogits: float32 (N, K)),
dlogits being the gradient of the returned scalar. Each row is worked in double precision: a stable
log-softmax (lse = max + log sum e^(z - max)), the row's loss, and its gradient. Rows run on an OpenMP
thread team when N * K is large; their losses are summed afterwards in row order, so the result does not
depend on the number of threads. `loss_ref.py` holds the same formulas in numpy.

With class weights w (w = 1 without them) and W = sum_i w[y_i], as PyTorch's CrossEntropyLoss(weight=w,
label_smoothing=eps, reduction="mean"):

    loss = (1 - eps) / W * sum_i w[y_i] * (lse_i - z[i, y_i])  +  eps / (K W) * sum_i sum_k w[k] * (lse_i - z[i, k])
    dlogits[i, j] = (a_i p[i, j] - (1 - eps) w[y_i] [j == y_i] - eps / K w[j]) / W,
    a_i = (1 - eps) w[y_i] + eps / K sum_k w[k]

Focal loss (Lin et al., 2017), multi-class, with p_t = p[i, y_i]:

    loss = sum_i -w[y_i] (1 - p_t)^gamma log p_t / W
    dlogits[i, j] = alpha_i (p[i, j] - [j == y_i]) / W,
    alpha_i = w[y_i] ((1 - p_t)^gamma - gamma (1 - p_t)^(gamma - 1) p_t log p_t)

Both gradients go through `_row_grad`, and with gamma = 0 every focal coefficient is exactly the
cross-entropy one, so focal_loss(gamma=0) equals softmax_cross_entropy bit for bit.
"""

import numpy as np

from cython.parallel cimport prange
from libc.math cimport exp, expm1, log, pow
from libc.stdint cimport int64_t

# Below this many logits a thread team costs more than it saves.
cdef Py_ssize_t _PARALLEL_MIN = 32768


# ---------------------------------------------------------------------------------------------------------
# Argument handling (Python level, once per call)


cdef tuple _prepare(logits, labels, class_weights, str fn):
    """Checked (z float32 (N, K), y int64 (N,), w float64 (K,), W = sum_i w[y_i])."""
    z = np.asarray(logits, dtype=np.float32, order="C")
    if z.ndim != 2 or z.shape[0] == 0 or z.shape[1] == 0:
        raise ValueError(f"{fn}: logits must be a non-empty (N, K) array, got shape {z.shape}")
    n, k = z.shape
    y = np.asarray(labels)
    if y.shape != (n,):
        raise ValueError(f"{fn}: labels must have shape ({n},) to match logits {z.shape}, got {y.shape}")
    if y.dtype.kind not in "iu":
        raise ValueError(f"{fn}: labels must be integer class indices, got dtype {y.dtype}")
    bad = np.flatnonzero((y < 0) | (y >= k))
    if bad.size:
        row = int(bad[0])
        raise ValueError(f"{fn}: label {int(y[row])} at row {row} is out of range for {k} classes (0..{k - 1})")
    y = np.ascontiguousarray(y, dtype=np.int64)
    if class_weights is None:
        w = np.ones(k, dtype=np.float64)
    else:
        w = np.asarray(class_weights, dtype=np.float64)
        if w.shape != (k,):
            raise ValueError(f"{fn}: class_weights must have shape ({k},), one per class, got {w.shape}")
        if not (np.isfinite(w).all() and (w >= 0).all()):
            raise ValueError(f"{fn}: class_weights must be finite and non-negative")
        w = np.ascontiguousarray(w)
    total_w = float(w[y].sum())
    if not total_w > 0:
        raise ValueError(f"{fn}: the class weights of this batch's labels sum to 0; the mean is undefined")
    return z, y, w, total_w


cdef object _grad_out(out, shape, str fn):
    if out is None:
        return np.empty(shape, dtype=np.float32)
    if (
        not isinstance(out, np.ndarray)
        or out.dtype != np.float32
        or out.shape != shape
        or not out.flags.c_contiguous
        or not out.flags.writeable
    ):
        got = f"{out.dtype} {out.shape}" if isinstance(out, np.ndarray) else type(out).__name__
        raise ValueError(f"{fn}: out must be a writable C-contiguous float32 array of shape {shape}, got {got}")
    return out


# ---------------------------------------------------------------------------------------------------------
# One row, in double precision


cdef inline double _row_lse(const float[:, ::1] z, Py_ssize_t i) noexcept nogil:
    """log sum_j e^z[i, j], as max + log sum e^(z - max)."""
    cdef Py_ssize_t j, K = z.shape[1]
    cdef double m = z[i, 0], total = 0.0
    for j in range(1, K):
        if z[i, j] > m:
            m = z[i, j]
    for j in range(K):
        total += exp(z[i, j] - m)
    return m + log(total)


cdef inline void _row_grad(const float[:, ::1] z, Py_ssize_t i, double lse, double a, double b,
                           Py_ssize_t yi, double s, const double[::1] w, double total_w,
                           float[:, ::1] g) noexcept nogil:
    """g[i, j] = (a p_j - b [j == yi] - s w[j]) / total_w, p_j = e^(z[i, j] - lse); s = 0 skips its term."""
    cdef Py_ssize_t j
    cdef double v
    for j in range(z.shape[1]):
        v = a * exp(z[i, j] - lse)
        if j == yi:
            v = v - b
        if s != 0.0:
            v = v - s * w[j]
        g[i, j] = <float>(v / total_w)


cdef inline double _ce_row(const float[:, ::1] z, Py_ssize_t i, Py_ssize_t yi, const double[::1] w,
                           double sum_w, double eps, double total_w, float[:, ::1] g) noexcept nogil:
    """Row i's (unnormalised) loss; writes its gradient row."""
    cdef Py_ssize_t j, K = z.shape[1]
    cdef double lse = _row_lse(z, i)
    cdef double b = (1.0 - eps) * w[yi]
    cdef double s = eps / K
    cdef double loss = b * (lse - z[i, yi]), smooth = 0.0
    if eps != 0.0:
        for j in range(K):
            smooth += w[j] * (lse - z[i, j])
        loss += s * smooth
    _row_grad(z, i, lse, b + s * sum_w, b, yi, s, w, total_w, g)
    return loss


cdef inline double _focal_row(const float[:, ::1] z, Py_ssize_t i, Py_ssize_t yi, const double[::1] w,
                              double gamma, double total_w, float[:, ::1] g) noexcept nogil:
    """Row i's (unnormalised) focal loss; writes its gradient row."""
    cdef double lse = _row_lse(z, i)
    cdef double nll = lse - z[i, yi]           # -log p_t >= 0
    cdef double log_pt = -nll
    cdef double q = -expm1(log_pt)             # 1 - p_t, accurate when p_t is near 1
    cdef double mod = pow(q, gamma)            # (1 - p_t)^gamma; pow(q, 0) = 1 even for q = 0
    cdef double dmod = 0.0                     # gamma (1 - p_t)^(gamma - 1) p_t log p_t, -> 0 as p_t -> 1
    if q > 0.0:
        dmod = gamma * mod * (log_pt / q) * exp(log_pt)
    cdef double alpha = -(w[yi] * (dmod - mod))
    _row_grad(z, i, lse, alpha, alpha, yi, 0.0, w, total_w, g)
    return w[yi] * mod * nll


# ---------------------------------------------------------------------------------------------------------
# Public kernels


def softmax_cross_entropy(logits, labels, class_weights=None, label_smoothing=0.0, out=None):
    """Mean softmax cross-entropy of logits (N, K) against int labels (N,): (loss, dlogits (N, K)).

    As PyTorch's CrossEntropyLoss: `class_weights` (K,) give the weighted mean sum_i w[y_i] l_i / sum_i
    w[y_i]; `label_smoothing` eps in [0, 1] mixes the one-hot target with the uniform eps / K, the
    smoothing term weighted by w[k] and normalised by the same sum. Labels outside 0..K-1 raise ValueError.
    `out` takes dlogits.
    """
    fn = "softmax_cross_entropy"
    z_arr, y_arr, w_arr, total_w = _prepare(logits, labels, class_weights, fn)
    cdef double eps = float(label_smoothing)
    if not 0.0 <= eps <= 1.0:
        raise ValueError(f"{fn}: label_smoothing must be in [0, 1], got {label_smoothing!r}")
    g_arr = _grad_out(out, z_arr.shape, fn)
    cdef const float[:, ::1] z = z_arr
    cdef const int64_t[::1] y = y_arr
    cdef const double[::1] w = w_arr
    cdef float[:, ::1] g = g_arr
    cdef double sum_w = float(w_arr.sum())
    cdef double tw = total_w
    rows_arr = np.empty(z.shape[0], dtype=np.float64)
    cdef double[::1] rows = rows_arr
    cdef Py_ssize_t i, n = z.shape[0]
    for i in prange(n, nogil=True, schedule="static", use_threads_if=n * z.shape[1] > _PARALLEL_MIN):
        rows[i] = _ce_row(z, i, y[i], w, sum_w, eps, tw, g)
    return float(rows_arr.sum()) / total_w, g_arr


def focal_loss(logits, labels, gamma=2.0, class_weights=None, out=None):
    """Mean multi-class focal loss of logits (N, K) against int labels (N,): (loss, dlogits (N, K)).

    FL_i = -w[y_i] (1 - p_t)^gamma log p_t, averaged as sum_i FL_i / sum_i w[y_i] (/ N without weights).
    gamma = 0 gives exactly `softmax_cross_entropy`. `out` takes dlogits.
    """
    fn = "focal_loss"
    z_arr, y_arr, w_arr, total_w = _prepare(logits, labels, class_weights, fn)
    cdef double gm = float(gamma)
    if not 0.0 <= gm < float("inf"):
        raise ValueError(f"{fn}: gamma must be a finite number >= 0, got {gamma!r}")
    g_arr = _grad_out(out, z_arr.shape, fn)
    cdef const float[:, ::1] z = z_arr
    cdef const int64_t[::1] y = y_arr
    cdef const double[::1] w = w_arr
    cdef float[:, ::1] g = g_arr
    cdef double tw = total_w
    rows_arr = np.empty(z.shape[0], dtype=np.float64)
    cdef double[::1] rows = rows_arr
    cdef Py_ssize_t i, n = z.shape[0]
    for i in prange(n, nogil=True, schedule="static", use_threads_if=n * z.shape[1] > _PARALLEL_MIN):
        rows[i] = _focal_row(z, i, y[i], w, gm, tw, g)
    return float(rows_arr.sum()) / total_w, g_arr
