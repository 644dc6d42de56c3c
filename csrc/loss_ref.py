"""Pure-numpy references for the kernels in `loss.pyx`, written for reading, not for speed.

They compute in the dtype of the logits (use float64 for gradient checks) and return
(loss: float, dlogits: array (N, K)); the native kernels return the same quantities, worked per row in
double precision, with dlogits rounded to float32.
"""

import numpy as np


def _log_softmax(z: np.ndarray) -> np.ndarray:
    """z - lse, lse = max + log sum e^(z - max), per row."""
    m = z.max(axis=1, keepdims=True)
    return z - (m + np.log(np.exp(z - m).sum(axis=1, keepdims=True)))


def _prepare(logits, labels, class_weights):
    z = np.asarray(logits)
    if not np.issubdtype(z.dtype, np.floating):
        z = z.astype(np.float64)
    n, k = z.shape
    y = np.asarray(labels, dtype=np.int64)
    if ((y < 0) | (y >= k)).any():
        bad = int(y[(y < 0) | (y >= k)][0])
        raise ValueError(f"label {bad} is out of range for {k} classes")
    w = np.ones(k, dtype=z.dtype) if class_weights is None else np.asarray(class_weights, dtype=z.dtype)
    return z, y, w, np.arange(n)


def softmax_cross_entropy_ref(logits, labels, class_weights=None, label_smoothing: float = 0.0):
    """Mean cross-entropy of logits (N, K) against labels (N,), as PyTorch's CrossEntropyLoss.

    The target of row i is t_i = (1 - eps) w[y_i] onehot(y_i) + eps / K w (w = 1 without class weights),
    the loss is sum_i -t_i . log softmax(z_i) / W, W = sum_i w[y_i], and its gradient is
    (p_i sum(t_i) - t_i) / W.
    """
    z, y, w, rows = _prepare(logits, labels, class_weights)
    k = z.shape[1]
    eps = label_smoothing
    logp = _log_softmax(z)
    target = eps / k * np.broadcast_to(w, z.shape).copy()
    target[rows, y] += (1 - eps) * w[y]
    total_w = w[y].sum()
    loss = -(target * logp).sum() / total_w
    grad = (np.exp(logp) * target.sum(axis=1, keepdims=True) - target) / total_w
    return float(loss), grad


def focal_loss_ref(logits, labels, gamma: float = 2.0, class_weights=None):
    """Mean multi-class focal loss: sum_i -w[y_i] (1 - p_t)^gamma log p_t / sum_i w[y_i].

    d/dz_ij = w[y_i] c_i ([j == y_i] - p_ij) / W with c_i = gamma (1 - p_t)^(gamma - 1) p_t log p_t
    - (1 - p_t)^gamma; the first term of c_i tends to 0 as p_t -> 1 and is taken as 0 there.
    """
    z, y, w, rows = _prepare(logits, labels, class_weights)
    logp = _log_softmax(z)
    p = np.exp(logp)
    log_pt, pt, wy = logp[rows, y], p[rows, y], w[y]
    total_w = wy.sum()
    q = 1 - pt
    loss = (-wy * q**gamma * log_pt).sum() / total_w
    with np.errstate(divide="ignore", invalid="ignore"):
        dmod = np.where(q > 0, gamma * q ** (gamma - 1) * pt * log_pt, 0.0)
    c = dmod - q**gamma
    onehot = np.zeros_like(z)
    onehot[rows, y] = 1
    grad = (wy * c)[:, None] * (onehot - p) / total_w
    return float(loss), grad
