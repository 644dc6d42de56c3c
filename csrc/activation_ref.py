"""Pure-numpy references for the kernels in `activation.pyx`, written for reading, not for speed.

Each function computes in the dtype of its input (float32 in, float32 out; float64 for gradient checks),
with the same formulas in the same order as the native kernels, and returns a new array.
"""

import math

import numpy as np


def _floating(x) -> np.ndarray:
    x = np.asarray(x)
    return x if np.issubdtype(x.dtype, np.floating) else x.astype(np.float64)


def relu_forward_ref(x) -> np.ndarray:
    """max(x, 0); NaN stays NaN."""
    x = _floating(x)
    return np.where(x < 0, x.dtype.type(0), x)


def relu_backward_ref(dy, y) -> np.ndarray:
    """dy where relu's output y > 0, else 0."""
    dy = _floating(dy)
    return np.where(np.asarray(y) > 0, dy, dy.dtype.type(0))


def leaky_relu_forward_ref(x, slope: float) -> np.ndarray:
    x = _floating(x)
    return np.where(x > 0, x, x.dtype.type(slope) * x)


def leaky_relu_backward_ref(dy, x, slope: float) -> np.ndarray:
    """dy where the input x > 0, else slope * dy."""
    dy = _floating(dy)
    return np.where(np.asarray(x) > 0, dy, dy.dtype.type(slope) * dy)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    """1 / (1 + e^-x) for x >= 0, e^x / (1 + e^x) otherwise: e^-|x| never overflows."""
    e = np.exp(-np.abs(x))
    one = x.dtype.type(1)
    return np.where(x >= 0, one / (one + e), e / (one + e))


def sigmoid_forward_ref(x) -> np.ndarray:
    return _sigmoid(_floating(x))


def sigmoid_backward_ref(dy, y) -> np.ndarray:
    """dy * y * (1 - y), y being sigmoid's output."""
    dy, y = _floating(dy), _floating(y)
    return dy * (y * (y.dtype.type(1) - y))


def tanh_forward_ref(x) -> np.ndarray:
    return np.tanh(_floating(x))


def tanh_backward_ref(dy, y) -> np.ndarray:
    """dy * (1 - y^2), y being tanh's output."""
    dy, y = _floating(dy), _floating(y)
    return dy * (y.dtype.type(1) - y * y)


def silu_forward_ref(x) -> np.ndarray:
    """x * sigmoid(x)."""
    x = _floating(x)
    return x * _sigmoid(x)


def silu_backward_ref(dy, x) -> np.ndarray:
    """dy * s * (1 + x (1 - s)), s = sigmoid(x), x being silu's input."""
    dy, x = _floating(dy), _floating(x)
    s = _sigmoid(x)
    one = x.dtype.type(1)
    return dy * (s * (one + x * (one - s)))


_erf = np.vectorize(math.erf, otypes=[np.float64])


def gelu_forward_ref(x) -> np.ndarray:
    """x * (1 + erf(x / sqrt 2)) / 2, the exact GELU (erf in double, the result in x's type)."""
    x = _floating(x)
    return (x * (0.5 * (1.0 + _erf(x.astype(np.float64) / math.sqrt(2.0))))).astype(x.dtype)


def gelu_backward_ref(dy, x) -> np.ndarray:
    """dy * (P + x * phi(x)): P = (1 + erf(x / sqrt 2)) / 2, phi = e^(-x^2/2) / sqrt(2 pi); x is gelu's input."""
    dy, x = _floating(dy), _floating(x)
    x64 = x.astype(np.float64)
    p = 0.5 * (1.0 + _erf(x64 / math.sqrt(2.0)))
    return (dy * (p + x64 * np.exp(-0.5 * x64 * x64) / math.sqrt(2.0 * math.pi))).astype(dy.dtype)


def dropout_forward_ref(x, mask, ratio: float) -> np.ndarray:
    """(x * mask) / (1 - ratio): kept elements scaled up so the expectation is unchanged."""
    x = _floating(x)
    return (x * np.asarray(mask).astype(x.dtype)) / x.dtype.type(1 - ratio)


def dropout_backward_ref(dy, mask, ratio: float) -> np.ndarray:
    """The same masked scaling, applied to the incoming gradient."""
    return dropout_forward_ref(dy, mask, ratio)


def softmax_forward_ref(x) -> np.ndarray:
    """Softmax over axis 1 of (N, C) or (N, C, H, W): e^(x - max) / sum e^(x - max)."""
    x = _floating(x)
    with np.errstate(over="ignore"):  # x - max may overflow to -inf, whose exp is the right 0
        e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def softmax_backward_ref(dy, y) -> np.ndarray:
    """y * (dy - sum_c dy * y) over axis 1, y being softmax's output."""
    dy, y = _floating(dy), _floating(y)
    return y * (dy - (dy * y).sum(axis=1, keepdims=True))


def clip_forward_ref(x, lo: float, hi: float) -> np.ndarray:
    """x clamped to [lo, hi] (relu6: lo 0, hi 6); NaN stays NaN."""
    x = _floating(x)
    t = x.dtype.type
    w = np.where(x < t(lo), t(lo), x)
    return np.where(w > t(hi), t(hi), w)


def clip_backward_ref(dy, x, lo: float, hi: float) -> np.ndarray:
    """dy where lo < x < hi (x being clip's input), else 0."""
    dy = _floating(dy)
    x = np.asarray(x)
    return np.where((x > x.dtype.type(lo)) & (x < x.dtype.type(hi)), dy, dy.dtype.type(0))


def _hard_sigmoid(x: np.ndarray, alpha: float, beta: float) -> tuple[np.ndarray, np.ndarray]:
    """(t, clamp(t, 0, 1)) with t = alpha * x + beta."""
    t = x.dtype.type(alpha) * x + x.dtype.type(beta)
    return t, np.minimum(np.maximum(t, x.dtype.type(0)), x.dtype.type(1))


def hard_sigmoid_forward_ref(x, alpha: float, beta: float) -> np.ndarray:
    """max(0, min(1, alpha * x + beta))."""
    return _hard_sigmoid(_floating(x), alpha, beta)[1]


def hard_sigmoid_backward_ref(dy, x, alpha: float, beta: float) -> np.ndarray:
    """alpha * dy where 0 < alpha * x + beta < 1, else 0."""
    dy, x = _floating(dy), _floating(x)
    t, _ = _hard_sigmoid(x, alpha, beta)
    return np.where((t > 0) & (t < 1), dy * dy.dtype.type(alpha), dy.dtype.type(0))


HARD_SWISH_ALPHA, HARD_SWISH_BETA = 1.0 / 6.0, 0.5


def hard_swish_forward_ref(x) -> np.ndarray:
    """x * hard_sigmoid(x) with alpha 1/6, beta 1/2."""
    x = _floating(x)
    return x * _hard_sigmoid(x, HARD_SWISH_ALPHA, HARD_SWISH_BETA)[1]


def hard_swish_backward_ref(dy, x) -> np.ndarray:
    """dy * (0 where t <= 0, 1 where t >= 1, else t + x / 6), t = x / 6 + 1/2."""
    dy, x = _floating(dy), _floating(x)
    a = x.dtype.type(HARD_SWISH_ALPHA)
    t, _ = _hard_sigmoid(x, HARD_SWISH_ALPHA, HARD_SWISH_BETA)
    g = np.where(t <= 0, x.dtype.type(0), np.where(t >= 1, x.dtype.type(1), t + a * x))
    return dy * g


def _per_channel(slope, x: np.ndarray) -> np.ndarray:
    """slope (C,) shaped to broadcast along axis 1 of (N, C, ...)."""
    return np.asarray(slope, dtype=x.dtype).reshape((1, -1) + (1,) * (x.ndim - 2))


def prelu_forward_ref(x, slope) -> np.ndarray:
    """x where x > 0, else slope[c] * x, c the channel (axis 1)."""
    x = _floating(x)
    return np.where(x > 0, x, _per_channel(slope, x) * x)


def prelu_backward_ref(dy, x, slope) -> tuple[np.ndarray, np.ndarray]:
    """(dx, dslope): dx = dy where x > 0, else slope[c] * dy; dslope[c] = sum over x <= 0 of dy * x."""
    dy, x = _floating(dy), _floating(x)
    dx = np.where(x > 0, dy, _per_channel(slope, x) * dy)
    axes = (0, *range(2, x.ndim))
    dslope = np.where(x > 0, 0.0, dy.astype(np.float64) * x).sum(axis=axes)
    return dx, dslope.astype(dy.dtype)
