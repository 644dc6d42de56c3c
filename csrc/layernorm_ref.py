"""Pure-numpy references for the kernels in `layernorm.pyx`, written for reading, not for speed.

Same names with `_ref`, same arguments, the same formulas (see `layernorm.pyx`): sums in float64, statistics
rounded to the input's dtype, element-wise work in the input's dtype, so the gradient tests can run them in
float64.
"""

import numpy as np


def _per_channel(v, x: np.ndarray) -> np.ndarray:
    return np.asarray(v, dtype=x.dtype).reshape((1, -1) + (1,) * (x.ndim - 2))


def layernorm_forward_ref(x, gamma, beta, eps):
    """y, mean, invstd: every position normalised over its channels (axis 1)."""
    x = np.asarray(x)
    x64 = x.astype(np.float64)
    mean = x64.mean(axis=1).astype(x.dtype)
    var = ((x64 - np.expand_dims(mean, 1)) ** 2).mean(axis=1)
    invstd = (1.0 / np.sqrt(var + eps)).astype(x.dtype)
    xhat = (x - np.expand_dims(mean, 1)) * np.expand_dims(invstd, 1)
    return xhat * _per_channel(gamma, x) + _per_channel(beta, x), mean, invstd


def layernorm_backward_ref(dy, x, gamma, mean, invstd):
    """dx, dgamma, dbeta."""
    dy, x = np.asarray(dy), np.asarray(x)
    mean, invstd = np.expand_dims(np.asarray(mean, x.dtype), 1), np.expand_dims(np.asarray(invstd, x.dtype), 1)
    xhat = (x - mean) * invstd
    g = dy * _per_channel(gamma, x)
    c = x.shape[1]
    a = (g.astype(np.float64).sum(axis=1, keepdims=True) / c).astype(x.dtype)
    b = ((g.astype(np.float64) * xhat).sum(axis=1, keepdims=True) / c).astype(x.dtype)
    dx = (g - a - xhat * b) * invstd
    axes = (0, *range(2, x.ndim))
    dgamma = (dy.astype(np.float64) * xhat).sum(axis=axes).astype(x.dtype)
    dbeta = dy.astype(np.float64).sum(axis=axes).astype(x.dtype)
    return dx, dgamma, dbeta
