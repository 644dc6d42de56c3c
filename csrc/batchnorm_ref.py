"""Pure-numpy references for the kernels in `batchnorm.pyx`, written for reading, not for speed.

Same names with `_ref`, same arguments, and the same formulas in the same order (see `batchnorm.pyx`):
sums in float64, per-channel constants computed in float64 and rounded to the input's dtype, element-wise
work in the input's dtype. They keep the input's dtype, so the gradient tests can run them in float64.
"""

import numpy as np


def _axes(x: np.ndarray) -> tuple[int, ...]:
    """The axes a channel's statistics run over: N and every spatial axis."""
    return (0, *range(2, x.ndim))


def _per_channel(v, x: np.ndarray) -> np.ndarray:
    """A (C,) vector shaped to broadcast against x (N, C, ...)."""
    return np.asarray(v).reshape((1, -1) + (1,) * (x.ndim - 2))


def _relu(y):
    return np.where(y < 0, np.zeros_like(y), y)  # NaN passes, as relu_forward


def batchnorm_forward_train_ref(x, gamma, beta, eps, relu=False):
    """y, mean, invstd: batch statistics per channel (biased variance), y = x * scale + shift (then ReLU)."""
    x = np.asarray(x)
    axes = _axes(x)
    x64 = x.astype(np.float64)
    mean = x64.mean(axis=axes)
    var = ((x64 - _per_channel(mean, x)) ** 2).mean(axis=axes)
    invstd = 1.0 / np.sqrt(var + eps)
    scale = np.asarray(gamma, dtype=np.float64) * invstd
    shift = np.asarray(beta, dtype=np.float64) - mean * scale
    y = x * _per_channel(scale.astype(x.dtype), x) + _per_channel(shift.astype(x.dtype), x)
    return (_relu(y) if relu else y), mean.astype(x.dtype), invstd.astype(x.dtype)


def batchnorm_forward_eval_ref(x, gamma, beta, running_mean, running_var, eps, relu=False):
    """y = x * scale + shift with scale = gamma / sqrt(running_var + eps), shift = beta - running_mean * scale."""
    x = np.asarray(x)
    scale = np.asarray(gamma, dtype=np.float64) / np.sqrt(np.asarray(running_var, dtype=np.float64) + eps)
    shift = np.asarray(beta, dtype=np.float64) - np.asarray(running_mean, dtype=np.float64) * scale
    y = x * _per_channel(scale.astype(x.dtype), x) + _per_channel(shift.astype(x.dtype), x)
    return _relu(y) if relu else y


def batchnorm_backward_ref(dy, x, gamma, mean, invstd, y=None):
    """dx, dgamma, dbeta of training-mode batch norm, through the batch statistics; with `y` (a fused ReLU's
    output) dy is masked by y > 0 first."""
    dy, x = np.asarray(dy), np.asarray(x)
    if y is not None:
        dy = np.where(np.asarray(y) > 0, dy, np.zeros_like(dy))
    axes = _axes(x)
    m = x.size // x.shape[1]
    mean, invstd = np.asarray(mean, dtype=x.dtype), np.asarray(invstd, dtype=x.dtype)
    xm = x.astype(np.float64) - _per_channel(mean.astype(np.float64), x)
    sum_dy = dy.sum(axis=axes, dtype=np.float64)
    sum_dyxm = (dy * xm).sum(axis=axes)
    invstd64 = invstd.astype(np.float64)
    dy_mean = (sum_dy / m).astype(x.dtype)
    proj = (invstd64 * invstd64 * sum_dyxm / m).astype(x.dtype)
    k = (np.asarray(gamma, dtype=np.float64) * invstd64).astype(x.dtype)
    dx = (dy - _per_channel(dy_mean, x) - (x - _per_channel(mean, x)) * _per_channel(proj, x)) * _per_channel(
        k, x
    )
    return dx, (sum_dyxm * invstd64).astype(x.dtype), sum_dy.astype(x.dtype)
