"""Pure-numpy references for the kernels in `activation.pyx`, written for reading, not for speed.

Each function computes in the dtype of its input (float32 in, float32 out; float64 for gradient checks),
with the same formulas in the same order as the native kernels, and returns a new array.
"""

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
