# cython: language_level=3
"""Native elementwise activation, dropout and softmax kernels of the CPU training backend.

Every kernel reads float32 arrays of any shape as flat C-contiguous memoryviews and writes into `out`
(a float32 array of the same shape, allocated when not given, returned either way). `out` may be one of
the inputs: each element is read before it is written, so the kernels work in place. Loops run without
the GIL, on an OpenMP thread team once an array has more than `_PARALLEL_MIN` elements.

The arithmetic is float32, written as in `activation_ref.py` (same formulas, same order), so relu, leaky
relu, dropout and the sigmoid/tanh backward passes agree with it bit for bit; the others differ by a few
ulp, since `exp` here is `dlc_exp_nonpos` below (within 1 ulp), `tanh` is libm's and numpy has its own.
Softmax sums in double.

    relu        y = x < 0 ? 0 : x (NaN passes)   dx = y > 0 ? dy : 0
    leaky_relu  y = x > 0 ? x : slope * x         dx = x > 0 ? dy : slope * dy
    sigmoid     y = 1 / (1 + e^-x) for x >= 0, e^x / (1 + e^x) otherwise (no overflow)
                dx = dy * (y * (1 - y))
    tanh        dx = dy * (1 - y * y)
    silu        y = x * s, s = sigmoid(x)        dx = dy * (s * (1 + x * (1 - s)))
    gelu        y = x * P, P = (1 + erf(x / sqrt 2)) / 2 (the exact form, ONNX Gelu's default)
                dx = dy * (P + x * e^(-x^2 / 2) / sqrt(2 pi))
    clip        y = x < lo ? lo : (x > hi ? hi : x)   dx = lo < x < hi ? dy : 0   (relu6: lo 0, hi 6)
    hard_sigmoid  t = alpha * x + beta, y = t < 0 ? 0 : (t > 1 ? 1 : t)   dx = 0 < t < 1 ? dy * alpha : 0
    hard_swish  y = x * hard_sigmoid(x) with alpha 1/6, beta 1/2
                dx = dy * (t <= 0 ? 0 : (t >= 1 ? 1 : t + alpha * x))
    prelu       per channel c (axis 1): y = x > 0 ? x : slope[c] * x   dx as leaky_relu with slope[c]
                dslope[c] = sum over x <= 0 of dy * x, summed in double
    dropout     y = (x * mask) / (1 - ratio)     dx = (dy * mask) / (1 - ratio)
    softmax     over axis 1 of (N, C, ...):      y = e^(x - max) / sum_c e^(x - max)
                dx = y * (dy - sum_c dy * y)
"""

import numpy as np

from cython.parallel cimport prange
from libc.math cimport erff, expf, tanhf

# Below this many elements a thread team costs more than it saves.
cdef Py_ssize_t _PARALLEL_MIN = 32768
# Softmax works on blocks of this many spatial positions of one sample (stack scratch per block).
cdef enum:
    _SOFTMAX_BLOCK = 256


# ---------------------------------------------------------------------------------------------------------
# Argument handling (Python level, once per call)


cdef object _as_f32(x):
    """`x` as a C-contiguous float32 array; a no-op for one already."""
    return np.asarray(x, dtype=np.float32, order="C")


cdef object _out_for(arr, out, str fn):
    """A fresh output like `arr`, or `out` after checking it can take the result."""
    if out is None:
        return np.empty(arr.shape, dtype=np.float32)
    if (
        not isinstance(out, np.ndarray)
        or out.dtype != np.float32
        or out.shape != arr.shape
        or not out.flags.c_contiguous
        or not out.flags.writeable
    ):
        got = f"{out.dtype} {out.shape}" if isinstance(out, np.ndarray) else type(out).__name__
        raise ValueError(f"{fn}: out must be a writable C-contiguous float32 array of shape {arr.shape}, got {got}")
    return out


cdef tuple _pair(a, b, str fn, str a_name, str b_name):
    a_arr, b_arr = _as_f32(a), _as_f32(b)
    if a_arr.shape != b_arr.shape:
        raise ValueError(f"{fn}: {a_name} {a_arr.shape} and {b_name} {b_arr.shape} must have the same shape")
    return a_arr, b_arr


cdef float _keep_scale(ratio, str fn) except? -1:
    r = float(ratio)
    if not 0.0 <= r < 1.0:
        raise ValueError(f"{fn}: ratio must be in [0, 1), got {ratio!r}")
    return <float>(1.0 - r)


cdef object _mask_for(mask, shape, str fn):
    m = np.asarray(mask, order="C")
    if m.dtype == np.bool_:
        m = m.view(np.uint8)
    if m.dtype != np.uint8:
        raise ValueError(f"{fn}: mask must be a uint8 (or bool) array of 0 and 1, got {m.dtype}")
    if m.shape != shape:
        raise ValueError(f"{fn}: mask {m.shape} must have the shape of the data {shape}")
    return m


# ---------------------------------------------------------------------------------------------------------
# Scalar functions, float32 throughout
#
# libm's expf is a function call, so a loop around it runs one element at a time. `dlc_exp_nonpos` is e^x
# for x <= 0 (the only exponentials sigmoid, silu and softmax need) written as plain arithmetic: Cody-Waite
# range reduction x = n ln2 + r, |r| <= ln2 / 2, and Cephes' degree-6 polynomial for e^r, within 1 ulp of
# the true value. Every choice is a select on integer bits: GCC will not if-convert float compares feeding
# float arithmetic (under the default -ftrapping-math), and one branch would keep the loops scalar. With
# none, the loops below vectorize (SSE2 is enough), about 4x faster than calling expf.

cdef extern from *:
    """
    #include <math.h>
    #include <stdint.h>
    #include <string.h>

    static inline uint32_t dlc_f2u(float f) { uint32_t u; memcpy(&u, &f, sizeof u); return u; }
    static inline float dlc_u2f(uint32_t u) { float f; memcpy(&f, &u, sizeof f); return f; }

    /* e^x for x <= 0 (x > 0 is read as -x); NaN gives NaN, x <= -104 gives 0 (as e^-104 rounds to). */
    static inline float dlc_exp_nonpos(float x) {
        uint32_t mag = dlc_f2u(x) & 0x7fffffffu;
        uint32_t nan_mask = 0u - (uint32_t)(mag > 0x7f800000u);
        uint32_t clamped = mag < 0x42d00000u ? mag : 0x42d00000u;              /* |x| <= 104 */
        float xr = dlc_u2f((clamped & ~nan_mask) | (mag & nan_mask) | 0x80000000u);  /* NaN kept */
        float xn = dlc_u2f((clamped & ~nan_mask) | 0x80000000u);                   /* NaN -> -0 */
        float n = (xn * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  /* round(x / ln2) */
        float r = xr - n * 0.693359375f;
        r = r - n * -2.12194440e-4f;
        float z = r * r;
        float y = (((((1.9875691500e-4f * r + 1.3981999507e-3f) * r + 8.3334519073e-3f) * r
                     + 4.1665795894e-2f) * r + 1.6666665459e-1f) * r + 5.0000001201e-1f) * z + r + 1.0f;
        /* y 2^n as y 2^k1 2^k2 with k1, k2 >= -75: both factors are normal floats, and only the last
           product rounds, into the subnormals when e^x is that small. */
        int32_t k = (int32_t)n;
        int32_t k1 = k / 2;
        return (y * dlc_u2f((uint32_t)(k1 + 127) << 23)) * dlc_u2f((uint32_t)(k - k1 + 127) << 23);
    }

    /* 1 / (1 + e) for x >= 0 and e / (1 + e) for x < 0, e = e^-|x|: neither overflows. The sign bit picks
       (-0 gives 1/2 either way). */
    static inline float dlc_sigmoid(float x) {
        float e = dlc_exp_nonpos(-fabsf(x));
        float d = 1.0f + e;
        float pos = 1.0f / d, neg = e / d;
        uint32_t neg_mask = 0u - (dlc_f2u(x) >> 31);
        return dlc_u2f((dlc_f2u(neg) & neg_mask) | (dlc_f2u(pos) & ~neg_mask));
    }
    """
    float dlc_exp_nonpos(float x) noexcept nogil
    float dlc_sigmoid(float x) noexcept nogil


cdef inline float _silu_grad(float dy, float x) noexcept nogil:
    cdef float s = dlc_sigmoid(x)
    return dy * (s * (<float>1 + x * (<float>1 - s)))


# ---------------------------------------------------------------------------------------------------------
# Elementwise kernels


def relu_forward(x, out=None):
    """y = max(x, 0); NaN stays NaN."""
    x_arr = _as_f32(x)
    out_arr = _out_for(x_arr, out, "relu_forward")
    cdef const float[::1] xv = x_arr.reshape(-1)
    cdef float[::1] ov = out_arr.reshape(-1)
    cdef Py_ssize_t i, n = xv.shape[0]
    cdef float v
    for i in prange(n, nogil=True, schedule="static", use_threads_if=n > _PARALLEL_MIN):
        v = xv[i]
        ov[i] = 0 if v < 0 else v
    return out_arr


def relu_backward(dy, y, out=None):
    """dx = dy where y > 0, else 0 (`y` is relu's output)."""
    dy_arr, y_arr = _pair(dy, y, "relu_backward", "dy", "y")
    out_arr = _out_for(dy_arr, out, "relu_backward")
    cdef const float[::1] dv = dy_arr.reshape(-1), yv = y_arr.reshape(-1)
    cdef float[::1] ov = out_arr.reshape(-1)
    cdef Py_ssize_t i, n = dv.shape[0]
    cdef float d
    for i in prange(n, nogil=True, schedule="static", use_threads_if=n > _PARALLEL_MIN):
        d = dv[i]  # loaded unconditionally: a load inside the select would keep the loop scalar
        ov[i] = d if yv[i] > 0 else 0
    return out_arr


def leaky_relu_forward(x, slope, out=None):
    """y = x where x > 0, else slope * x."""
    x_arr = _as_f32(x)
    out_arr = _out_for(x_arr, out, "leaky_relu_forward")
    cdef const float[::1] xv = x_arr.reshape(-1)
    cdef float[::1] ov = out_arr.reshape(-1)
    cdef float a = <float>float(slope), v, av
    cdef Py_ssize_t i, n = xv.shape[0]
    for i in prange(n, nogil=True, schedule="static", use_threads_if=n > _PARALLEL_MIN):
        v = xv[i]
        av = a * v  # both sides computed, so the select has no work inside it and the loop vectorizes
        ov[i] = v if v > 0 else av
    return out_arr


def leaky_relu_backward(dy, x, slope, out=None):
    """dx = dy where x > 0, else slope * dy (`x` is leaky_relu's input)."""
    dy_arr, x_arr = _pair(dy, x, "leaky_relu_backward", "dy", "x")
    out_arr = _out_for(dy_arr, out, "leaky_relu_backward")
    cdef const float[::1] dv = dy_arr.reshape(-1), xv = x_arr.reshape(-1)
    cdef float[::1] ov = out_arr.reshape(-1)
    cdef float a = <float>float(slope), d, ad
    cdef Py_ssize_t i, n = dv.shape[0]
    for i in prange(n, nogil=True, schedule="static", use_threads_if=n > _PARALLEL_MIN):
        d = dv[i]
        ad = a * d
        ov[i] = d if xv[i] > 0 else ad
    return out_arr


def sigmoid_forward(x, out=None):
    """y = 1 / (1 + e^-x), in a form that never overflows."""
    x_arr = _as_f32(x)
    out_arr = _out_for(x_arr, out, "sigmoid_forward")
    cdef const float[::1] xv = x_arr.reshape(-1)
    cdef float[::1] ov = out_arr.reshape(-1)
    cdef Py_ssize_t i, n = xv.shape[0]
    for i in prange(n, nogil=True, schedule="static", use_threads_if=n > _PARALLEL_MIN):
        ov[i] = dlc_sigmoid(xv[i])
    return out_arr


def sigmoid_backward(dy, y, out=None):
    """dx = dy * y * (1 - y) (`y` is sigmoid's output)."""
    dy_arr, y_arr = _pair(dy, y, "sigmoid_backward", "dy", "y")
    out_arr = _out_for(dy_arr, out, "sigmoid_backward")
    cdef const float[::1] dv = dy_arr.reshape(-1), yv = y_arr.reshape(-1)
    cdef float[::1] ov = out_arr.reshape(-1)
    cdef Py_ssize_t i, n = dv.shape[0]
    for i in prange(n, nogil=True, schedule="static", use_threads_if=n > _PARALLEL_MIN):
        ov[i] = dv[i] * (yv[i] * (<float>1 - yv[i]))
    return out_arr


def tanh_forward(x, out=None):
    """y = tanh(x)."""
    x_arr = _as_f32(x)
    out_arr = _out_for(x_arr, out, "tanh_forward")
    cdef const float[::1] xv = x_arr.reshape(-1)
    cdef float[::1] ov = out_arr.reshape(-1)
    cdef Py_ssize_t i, n = xv.shape[0]
    for i in prange(n, nogil=True, schedule="static", use_threads_if=n > _PARALLEL_MIN):
        ov[i] = tanhf(xv[i])
    return out_arr


def tanh_backward(dy, y, out=None):
    """dx = dy * (1 - y^2) (`y` is tanh's output)."""
    dy_arr, y_arr = _pair(dy, y, "tanh_backward", "dy", "y")
    out_arr = _out_for(dy_arr, out, "tanh_backward")
    cdef const float[::1] dv = dy_arr.reshape(-1), yv = y_arr.reshape(-1)
    cdef float[::1] ov = out_arr.reshape(-1)
    cdef Py_ssize_t i, n = dv.shape[0]
    for i in prange(n, nogil=True, schedule="static", use_threads_if=n > _PARALLEL_MIN):
        ov[i] = dv[i] * (<float>1 - yv[i] * yv[i])
    return out_arr


def silu_forward(x, out=None):
    """y = x * sigmoid(x) (also called swish)."""
    x_arr = _as_f32(x)
    out_arr = _out_for(x_arr, out, "silu_forward")
    cdef const float[::1] xv = x_arr.reshape(-1)
    cdef float[::1] ov = out_arr.reshape(-1)
    cdef Py_ssize_t i, n = xv.shape[0]
    for i in prange(n, nogil=True, schedule="static", use_threads_if=n > _PARALLEL_MIN):
        ov[i] = xv[i] * dlc_sigmoid(xv[i])
    return out_arr


def silu_backward(dy, x, out=None):
    """dx = dy * s * (1 + x * (1 - s)), s = sigmoid(x) (`x` is silu's input)."""
    dy_arr, x_arr = _pair(dy, x, "silu_backward", "dy", "x")
    out_arr = _out_for(dy_arr, out, "silu_backward")
    cdef const float[::1] dv = dy_arr.reshape(-1), xv = x_arr.reshape(-1)
    cdef float[::1] ov = out_arr.reshape(-1)
    cdef Py_ssize_t i, n = dv.shape[0]
    for i in prange(n, nogil=True, schedule="static", use_threads_if=n > _PARALLEL_MIN):
        ov[i] = _silu_grad(dv[i], xv[i])
    return out_arr


cdef float _SQRT_HALF = <float>0.7071067811865476
cdef float _INV_SQRT_2PI = <float>0.3989422804014327


cdef inline float _gelu(float x) noexcept nogil:
    return x * (<float>0.5 * (<float>1 + erff(x * _SQRT_HALF)))


cdef inline float _gelu_grad(float dy, float x) noexcept nogil:
    cdef float p = <float>0.5 * (<float>1 + erff(x * _SQRT_HALF))
    return dy * (p + x * (expf(<float>-0.5 * x * x) * _INV_SQRT_2PI))


def gelu_forward(x, out=None):
    """y = x * (1 + erf(x / sqrt 2)) / 2 (GELU, the exact form)."""
    x_arr = _as_f32(x)
    out_arr = _out_for(x_arr, out, "gelu_forward")
    cdef const float[::1] xv = x_arr.reshape(-1)
    cdef float[::1] ov = out_arr.reshape(-1)
    cdef Py_ssize_t i, n = xv.shape[0]
    for i in prange(n, nogil=True, schedule="static", use_threads_if=n > _PARALLEL_MIN):
        ov[i] = _gelu(xv[i])
    return out_arr


def gelu_backward(dy, x, out=None):
    """dx = dy * (P + x * phi(x)), P the normal CDF and phi its density (`x` is gelu's input)."""
    dy_arr, x_arr = _pair(dy, x, "gelu_backward", "dy", "x")
    out_arr = _out_for(dy_arr, out, "gelu_backward")
    cdef const float[::1] dv = dy_arr.reshape(-1), xv = x_arr.reshape(-1)
    cdef float[::1] ov = out_arr.reshape(-1)
    cdef Py_ssize_t i, n = dv.shape[0]
    for i in prange(n, nogil=True, schedule="static", use_threads_if=n > _PARALLEL_MIN):
        ov[i] = _gelu_grad(dv[i], xv[i])
    return out_arr


def clip_forward(x, lo, hi, out=None):
    """y = x clamped to [lo, hi] (relu6 with lo 0, hi 6); NaN stays NaN."""
    x_arr = _as_f32(x)
    cdef float a = <float>float(lo), b = <float>float(hi)
    if not a <= b:
        raise ValueError(f"clip_forward: lo {lo!r} must not exceed hi {hi!r}")
    out_arr = _out_for(x_arr, out, "clip_forward")
    cdef const float[::1] xv = x_arr.reshape(-1)
    cdef float[::1] ov = out_arr.reshape(-1)
    cdef Py_ssize_t i, n = xv.shape[0]
    cdef float v, w
    for i in prange(n, nogil=True, schedule="static", use_threads_if=n > _PARALLEL_MIN):
        v = xv[i]
        w = a if v < a else v
        ov[i] = b if w > b else w
    return out_arr


def clip_backward(dy, x, lo, hi, out=None):
    """dx = dy where lo < x < hi, else 0 (`x` is clip's input)."""
    dy_arr, x_arr = _pair(dy, x, "clip_backward", "dy", "x")
    out_arr = _out_for(dy_arr, out, "clip_backward")
    cdef const float[::1] dv = dy_arr.reshape(-1), xv = x_arr.reshape(-1)
    cdef float[::1] ov = out_arr.reshape(-1)
    cdef float a = <float>float(lo), b = <float>float(hi), d, v
    cdef Py_ssize_t i, n = dv.shape[0]
    for i in prange(n, nogil=True, schedule="static", use_threads_if=n > _PARALLEL_MIN):
        d = dv[i]
        v = xv[i]
        ov[i] = d if (v > a) & (v < b) else 0
    return out_arr


def hard_sigmoid_forward(x, alpha, beta, out=None):
    """y = max(0, min(1, alpha * x + beta)) (ONNX HardSigmoid; PyTorch's is alpha 1/6, beta 1/2)."""
    x_arr = _as_f32(x)
    out_arr = _out_for(x_arr, out, "hard_sigmoid_forward")
    cdef const float[::1] xv = x_arr.reshape(-1)
    cdef float[::1] ov = out_arr.reshape(-1)
    cdef float a = <float>float(alpha), c = <float>float(beta), t
    cdef Py_ssize_t i, n = xv.shape[0]
    for i in prange(n, nogil=True, schedule="static", use_threads_if=n > _PARALLEL_MIN):
        t = a * xv[i] + c
        t = 0 if t < 0 else t
        ov[i] = 1 if t > 1 else t
    return out_arr


def hard_sigmoid_backward(dy, x, alpha, beta, out=None):
    """dx = alpha * dy where 0 < alpha * x + beta < 1, else 0 (`x` is hard_sigmoid's input)."""
    dy_arr, x_arr = _pair(dy, x, "hard_sigmoid_backward", "dy", "x")
    out_arr = _out_for(dy_arr, out, "hard_sigmoid_backward")
    cdef const float[::1] dv = dy_arr.reshape(-1), xv = x_arr.reshape(-1)
    cdef float[::1] ov = out_arr.reshape(-1)
    cdef float a = <float>float(alpha), c = <float>float(beta), t, ad
    cdef Py_ssize_t i, n = dv.shape[0]
    for i in prange(n, nogil=True, schedule="static", use_threads_if=n > _PARALLEL_MIN):
        t = a * xv[i] + c
        ad = dv[i] * a
        ov[i] = ad if (t > 0) & (t < 1) else 0
    return out_arr


# hard_swish's hard sigmoid: ONNX HardSwish's alpha (1/6 rounded to float32) and beta.
cdef float _HSWISH_ALPHA = <float>(1.0 / 6.0)
cdef float _HSWISH_BETA = 0.5


def hard_swish_forward(x, out=None):
    """y = x * max(0, min(1, x / 6 + 1/2)) (ONNX HardSwish, PyTorch's Hardswish)."""
    x_arr = _as_f32(x)
    out_arr = _out_for(x_arr, out, "hard_swish_forward")
    cdef const float[::1] xv = x_arr.reshape(-1)
    cdef float[::1] ov = out_arr.reshape(-1)
    cdef float a = _HSWISH_ALPHA, c = _HSWISH_BETA, v, t
    cdef Py_ssize_t i, n = xv.shape[0]
    for i in prange(n, nogil=True, schedule="static", use_threads_if=n > _PARALLEL_MIN):
        v = xv[i]
        t = a * v + c
        t = 0 if t < 0 else t
        t = 1 if t > 1 else t
        ov[i] = v * t
    return out_arr


def hard_swish_backward(dy, x, out=None):
    """dx = dy * (0 where t <= 0, 1 where t >= 1, else t + x / 6), t = x / 6 + 1/2 (`x` is the input)."""
    dy_arr, x_arr = _pair(dy, x, "hard_swish_backward", "dy", "x")
    out_arr = _out_for(dy_arr, out, "hard_swish_backward")
    cdef const float[::1] dv = dy_arr.reshape(-1), xv = x_arr.reshape(-1)
    cdef float[::1] ov = out_arr.reshape(-1)
    cdef float a = _HSWISH_ALPHA, c = _HSWISH_BETA, v, t, g
    cdef Py_ssize_t i, n = dv.shape[0]
    for i in prange(n, nogil=True, schedule="static", use_threads_if=n > _PARALLEL_MIN):
        v = xv[i]
        t = a * v + c
        g = t + a * v
        g = 0 if t <= 0 else g
        g = 1 if t >= 1 else g
        ov[i] = dv[i] * g
    return out_arr


# ---------------------------------------------------------------------------------------------------------
# PReLU: a learned slope per channel (axis 1). The input is viewed as (N, C, S), S = H * W (1 for (N, C)).


cdef tuple _prelu_args(x, slope, str fn):
    x_arr = _as_f32(x)
    s_arr = _as_f32(slope).reshape(-1)
    if x_arr.ndim < 2:
        raise ValueError(f"{fn}: expected (N, C) or (N, C, H, W) input, got shape {x_arr.shape}")
    if s_arr.shape[0] != x_arr.shape[1]:
        raise ValueError(f"{fn}: slope has {s_arr.shape[0]} values for {x_arr.shape[1]} channels")
    return x_arr, s_arr


cdef double _prelu_grad_channel(const float[::1] dy, const float[::1] x, float[::1] out, float a, Py_ssize_t c,
                                Py_ssize_t N, Py_ssize_t C, Py_ssize_t S) noexcept nogil:
    """dx for channel c of every sample, written to `out`; returns sum over x <= 0 of dy * x."""
    cdef Py_ssize_t n, s, at
    cdef double total = 0.0
    cdef float d, v, ad
    for n in range(N):
        at = (n * C + c) * S
        for s in range(S):
            d = dy[at + s]
            v = x[at + s]
            ad = a * d
            out[at + s] = d if v > 0 else ad
            total += <double>d * (0.0 if v > 0 else <double>v)  # the product in double, as the reference
    return total


def prelu_forward(x, slope, out=None):
    """y = x where x > 0, else slope[c] * x, c the channel (axis 1) of (N, C) or (N, C, H, W) input."""
    x_arr, s_arr = _prelu_args(x, slope, "prelu_forward")
    out_arr = _out_for(x_arr, out, "prelu_forward")
    cdef Py_ssize_t N, C, S
    N, C, S = _ncs(x_arr.shape, "prelu_forward")
    if x_arr.size == 0:
        return out_arr
    cdef const float[::1] xv = x_arr.reshape(-1), sv = s_arr
    cdef float[::1] ov = out_arr.reshape(-1)
    cdef Py_ssize_t t, s, at
    cdef float a, v, av
    for t in prange(N * C, nogil=True, schedule="static", use_threads_if=N * C * S > _PARALLEL_MIN):
        a = sv[t % C]
        at = t * S
        for s in range(S):
            v = xv[at + s]
            av = a * v
            ov[at + s] = v if v > 0 else av
    return out_arr


def prelu_backward(dy, x, slope, out=None):
    """(dx, dslope): dx = dy where x > 0, else slope[c] * dy; dslope[c] = sum over x <= 0 of dy * x (double)."""
    x_arr, s_arr = _prelu_args(x, slope, "prelu_backward")
    dy_arr, x_arr = _pair(dy, x_arr, "prelu_backward", "dy", "x")
    out_arr = _out_for(dy_arr, out, "prelu_backward")
    cdef Py_ssize_t N, C, S
    N, C, S = _ncs(x_arr.shape, "prelu_backward")
    total = np.zeros(C, dtype=np.float64)
    if x_arr.size == 0:
        return out_arr, total.astype(np.float32)
    cdef const float[::1] dv = dy_arr.reshape(-1), xv = x_arr.reshape(-1), sv = s_arr
    cdef float[::1] ov = out_arr.reshape(-1)
    cdef double[::1] tv = total
    cdef Py_ssize_t c
    for c in prange(C, nogil=True, schedule="static", use_threads_if=N * C * S > _PARALLEL_MIN):
        tv[c] = _prelu_grad_channel(dv, xv, ov, sv[c], c, N, C, S)
    return out_arr, total.astype(np.float32)


cdef object _masked_scale(x, mask, ratio, out, str fn):
    """(x * mask) / (1 - ratio), the one formula of dropout's forward and backward."""
    x_arr = _as_f32(x)
    cdef float keep = _keep_scale(ratio, fn)
    m_arr = _mask_for(mask, x_arr.shape, fn)
    out_arr = _out_for(x_arr, out, fn)
    cdef const float[::1] xv = x_arr.reshape(-1)
    cdef const unsigned char[::1] mv = m_arr.reshape(-1)
    cdef float[::1] ov = out_arr.reshape(-1)
    cdef Py_ssize_t i, n = xv.shape[0]
    for i in prange(n, nogil=True, schedule="static", use_threads_if=n > _PARALLEL_MIN):
        ov[i] = (xv[i] * <float>mv[i]) / keep
    return out_arr


def dropout_forward(x, mask, ratio, out=None):
    """y = x * mask / (1 - ratio); `mask` is a uint8 (or bool) array of 0/1 drawn by the caller.

    `ratio` must be in [0, 1). With ratio 0 and a mask of ones this copies `x`.
    """
    return _masked_scale(x, mask, ratio, out, "dropout_forward")


def dropout_backward(dy, mask, ratio, out=None):
    """dx = dy * mask / (1 - ratio), with the mask of the forward pass."""
    return _masked_scale(dy, mask, ratio, out, "dropout_backward")


# ---------------------------------------------------------------------------------------------------------
# Softmax over axis 1. The input is viewed as (N, C, S), S = H * W (1 for (N, C)); a task is one sample n
# and a block of up to _SOFTMAX_BLOCK spatial positions, so the inner loops run over contiguous memory
# (one row when S = 1).


cdef void _softmax_block(const float[::1] x, float[::1] out, Py_ssize_t base, Py_ssize_t C,
                         Py_ssize_t S, Py_ssize_t width) noexcept nogil:
    cdef float mx[_SOFTMAX_BLOCK]
    cdef float tf[_SOFTMAX_BLOCK]
    cdef double total[_SOFTMAX_BLOCK]
    cdef Py_ssize_t c, s, at
    cdef float v, e
    for s in range(width):
        mx[s] = x[base + s]
        total[s] = 0.0
    for c in range(1, C):
        at = base + c * S
        for s in range(width):
            v = x[at + s]
            mx[s] = v if v > mx[s] else mx[s]
    for c in range(C):
        at = base + c * S
        for s in range(width):
            e = dlc_exp_nonpos(x[at + s] - mx[s])
            out[at + s] = e
            total[s] += e
    for s in range(width):
        tf[s] = <float>total[s]
    for c in range(C):
        at = base + c * S
        for s in range(width):
            out[at + s] = out[at + s] / tf[s]


cdef void _softmax_row(const float[::1] x, float[::1] out, Py_ssize_t base, Py_ssize_t C) noexcept nogil:
    """The S = 1 case ((N, C) input): one contiguous row. The exp loop stores and the sum runs after it,
    since a running double sum inside it would keep that loop from vectorizing."""
    cdef Py_ssize_t c
    cdef float m = x[base], v, tf
    cdef double total = 0.0
    for c in range(1, C):
        v = x[base + c]
        m = v if v > m else m
    for c in range(C):
        out[base + c] = dlc_exp_nonpos(x[base + c] - m)
    for c in range(C):
        total += out[base + c]
    tf = <float>total
    for c in range(C):
        out[base + c] = out[base + c] / tf


cdef void _softmax_grad_row(const float[::1] dy, const float[::1] y, float[::1] out, Py_ssize_t base,
                            Py_ssize_t C) noexcept nogil:
    cdef Py_ssize_t c
    cdef double dot = 0.0
    cdef float d
    for c in range(C):
        dot += <double>dy[base + c] * <double>y[base + c]
    d = <float>dot
    for c in range(C):
        out[base + c] = y[base + c] * (dy[base + c] - d)


cdef void _softmax_grad_block(const float[::1] dy, const float[::1] y, float[::1] out, Py_ssize_t base,
                              Py_ssize_t C, Py_ssize_t S, Py_ssize_t width) noexcept nogil:
    cdef double dot[_SOFTMAX_BLOCK]
    cdef float d
    cdef Py_ssize_t c, s, at
    for s in range(width):
        dot[s] = 0.0
    for c in range(C):
        at = base + c * S
        for s in range(width):
            dot[s] += <double>dy[at + s] * <double>y[at + s]
    for c in range(C):
        at = base + c * S
        for s in range(width):
            d = <float>dot[s]
            out[at + s] = y[at + s] * (dy[at + s] - d)


cdef tuple _ncs(shape, str fn):
    if len(shape) < 2:
        raise ValueError(f"{fn}: expected (N, C) or (N, C, H, W) input, got shape {shape}")
    return shape[0], shape[1], int(np.prod(shape[2:], dtype=np.int64))


def softmax_forward(x, out=None):
    """Softmax over axis 1 of (N, C) or (N, C, H, W) input, max-subtracted, summed in double."""
    x_arr = _as_f32(x)
    out_arr = _out_for(x_arr, out, "softmax_forward")
    cdef Py_ssize_t N, C, S
    N, C, S = _ncs(x_arr.shape, "softmax_forward")
    if x_arr.size == 0:
        return out_arr
    cdef const float[::1] xv = x_arr.reshape(-1)
    cdef float[::1] ov = out_arr.reshape(-1)
    cdef Py_ssize_t blocks = (S + _SOFTMAX_BLOCK - 1) // _SOFTMAX_BLOCK, t, n, s0, width
    for t in prange(N * blocks, nogil=True, schedule="static", use_threads_if=N * C * S > _PARALLEL_MIN):
        n = t // blocks
        s0 = (t % blocks) * _SOFTMAX_BLOCK
        width = S - s0 if S - s0 < _SOFTMAX_BLOCK else _SOFTMAX_BLOCK
        if S == 1:
            _softmax_row(xv, ov, n * C, C)
        else:
            _softmax_block(xv, ov, n * C * S + s0, C, S, width)
    return out_arr


def softmax_backward(dy, y, out=None):
    """dx = y * (dy - sum_c dy * y) over axis 1 (`y` is softmax's output); the sum is in double."""
    dy_arr, y_arr = _pair(dy, y, "softmax_backward", "dy", "y")
    out_arr = _out_for(dy_arr, out, "softmax_backward")
    cdef Py_ssize_t N, C, S
    N, C, S = _ncs(dy_arr.shape, "softmax_backward")
    if dy_arr.size == 0:
        return out_arr
    cdef const float[::1] dv = dy_arr.reshape(-1), yv = y_arr.reshape(-1)
    cdef float[::1] ov = out_arr.reshape(-1)
    cdef Py_ssize_t blocks = (S + _SOFTMAX_BLOCK - 1) // _SOFTMAX_BLOCK, t, n, s0, width
    for t in prange(N * blocks, nogil=True, schedule="static", use_threads_if=N * C * S > _PARALLEL_MIN):
        n = t // blocks
        s0 = (t % blocks) * _SOFTMAX_BLOCK
        width = S - s0 if S - s0 < _SOFTMAX_BLOCK else _SOFTMAX_BLOCK
        if S == 1:
            _softmax_grad_row(dv, yv, ov, n * C, C)
        else:
            _softmax_grad_block(dv, yv, ov, n * C * S + s0, C, S, width)
    return out_arr
