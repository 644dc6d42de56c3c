"""Native activation, dropout and softmax kernels (dlc._C.activation) against the numpy references, and
the references' backward passes against central finite differences in float64."""

import numpy as np
import pytest

from dlc._C import activation as act
from dlc._C import activation_ref as ref

from helpers import numeric_grad

RNG = np.random.default_rng(20240611)
SHAPES = [(7,), (5, 9), (2, 3, 4, 5), (4, 16, 32, 32)]  # the last is past the parallel threshold
SMOOTH = ["sigmoid", "tanh", "silu"]  # exp / tanh from different libraries: a few ulp apart


def _normal(shape, scale=3.0, dtype=np.float32):
    return (RNG.standard_normal(shape) * scale).astype(dtype)


def _away_from_zero(shape, dtype=np.float64):
    """Inputs with |x| in [0.1, 2]: relu's kink is out of reach of a finite-difference step."""
    return (RNG.choice([-1.0, 1.0], size=shape) * RNG.uniform(0.1, 2.0, size=shape)).astype(dtype)


def _ulps(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    want32 = want.astype(np.float32)
    return np.abs(got.astype(np.float64) - want.astype(np.float64)) / np.spacing(np.abs(want32)).astype(
        np.float64
    )


def _forward(name, x, **kw):
    args = (x, 0.1) if name == "leaky_relu" else (x,)
    return getattr(act, f"{name}_forward")(*args, **kw), getattr(ref, f"{name}_forward_ref")(*args)


def _backward_args(name, x, dy):
    """(native args, reference args) of `name`'s backward pass; each takes what the executor keeps."""
    if name == "relu":
        return (dy, act.relu_forward(x)), (dy, ref.relu_forward_ref(x))
    if name == "leaky_relu":
        return (dy, x, 0.1), (dy, x, 0.1)
    if name == "silu":
        return (dy, x), (dy, x)
    y = getattr(ref, f"{name}_forward_ref")(x)  # sigmoid, tanh, softmax: from the output
    return (dy, y), (dy, y)


# ---------------------------------------------------------------------------------------------------------
# Native kernels against the references (float32)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", ["relu", "leaky_relu", *SMOOTH])
def test_elementwise_forward_matches_reference(name, shape):
    x = _normal(shape)
    got, want = _forward(name, x)
    assert got.dtype == np.float32 and got.shape == x.shape
    if name in SMOOTH:
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    else:
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", ["relu", "leaky_relu", *SMOOTH])
def test_elementwise_backward_matches_reference(name, shape):
    x, dy = _normal(shape), _normal(shape, 1.0)
    native_args, ref_args = _backward_args(name, x, dy)
    got = getattr(act, f"{name}_backward")(*native_args)
    want = getattr(ref, f"{name}_backward_ref")(*ref_args)
    assert got.dtype == np.float32 and got.shape == x.shape
    if name == "silu":  # recomputes sigmoid(x); 1 + x (1 - s) cancels near x = -1.28
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    else:
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(
    "shape", [(6, 10), (3, 4, 5, 7), (2, 3, 20, 20), (4, 16, 32, 32), (2, 1000), (40, 1000)]
)
def test_softmax_matches_reference(shape):
    x, dy = _normal(shape), _normal(shape, 1.0)
    y = act.softmax_forward(x)
    np.testing.assert_allclose(y, ref.softmax_forward_ref(x), rtol=2e-6, atol=1e-8)
    np.testing.assert_allclose(y.sum(axis=1), 1.0, rtol=1e-5)
    got = act.softmax_backward(dy, y)
    # The kernel sums dy * y in double; the float32 reference's sum is the less accurate of the two where
    # dy - sum cancels, so both are held against the float64 reference.
    exact = ref.softmax_backward_ref(dy.astype(np.float64), y.astype(np.float64))
    np.testing.assert_allclose(got, exact, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(ref.softmax_backward_ref(dy, y), exact, rtol=1e-5, atol=5e-7)


def test_sigmoid_within_three_ulp_of_exact():
    """The vectorized exp inside sigmoid, silu and softmax, against float64 on a dense grid."""
    x = np.concatenate([np.linspace(-104, 104, 400_001), [-1e-30, 0.0, -0.0, 1e-30, 88.7, -87.4, -103.3]])
    x = x.astype(np.float32)
    exact = 1 / (1 + np.exp(-x.astype(np.float64)))
    assert _ulps(act.sigmoid_forward(x), exact).max() <= 3  # exp (< 1), 1 + e and the division
    e = np.exp(np.minimum(x, 0).astype(np.float64))  # softmax over (x, 0): e^x / (e^x + 1)
    two = act.softmax_forward(np.stack([np.minimum(x, 0), np.zeros_like(x)], axis=1))
    assert _ulps(two[:, 0], e / (e + 1)).max() <= 3


# ---------------------------------------------------------------------------------------------------------
# The references' backward passes against central finite differences (float64)


def _check_gradient(f, x: np.ndarray, analytic: np.ndarray, h: float = 1e-6) -> None:
    """`analytic` against the central difference of the scalar f(x) at every element."""
    np.testing.assert_allclose(analytic, numeric_grad(f, x.copy(), h), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("name", ["relu", "leaky_relu", "sigmoid", "tanh", "silu"])
def test_reference_backward_matches_finite_differences(name):
    shape = (3, 4, 2)
    x = _away_from_zero(shape) if name in ("relu", "leaky_relu") else _normal(shape, 2.0, np.float64)
    r = RNG.standard_normal(shape)  # a random projection makes the scalar loss sum(r * f(x))
    fwd = getattr(ref, f"{name}_forward_ref")
    extra = (0.1,) if name == "leaky_relu" else ()
    _, ref_args = _backward_args(name, x, r)
    analytic = getattr(ref, f"{name}_backward_ref")(*ref_args)
    _check_gradient(lambda v: float((r * fwd(v, *extra)).sum()), x, analytic)


@pytest.mark.parametrize("shape", [(3, 5), (2, 3, 2, 2)])
def test_reference_softmax_backward_matches_finite_differences(shape):
    x, r = _normal(shape, 2.0, np.float64), RNG.standard_normal(shape)
    analytic = ref.softmax_backward_ref(r, ref.softmax_forward_ref(x))
    _check_gradient(lambda v: float((r * ref.softmax_forward_ref(v)).sum()), x, analytic)


def test_reference_dropout_backward_matches_finite_differences():
    x, r = _normal((4, 5), 1.0, np.float64), RNG.standard_normal((4, 5))
    mask = (RNG.random((4, 5)) > 0.4).astype(np.uint8)
    analytic = ref.dropout_backward_ref(r, mask, 0.4)
    _check_gradient(lambda v: float((r * ref.dropout_forward_ref(v, mask, 0.4)).sum()), x, analytic)


# ---------------------------------------------------------------------------------------------------------
# Extreme and special inputs


EXTREMES = np.array(
    [-np.inf, -1e30, -1e4, -100, -88.8, -20, -1e-3, -0.0, 0, 1e-3, 20, 88.8, 100, 1e4, 1e30, np.inf]
)


def test_extreme_inputs_give_finite_outputs():
    x = EXTREMES.astype(np.float32)
    finite = x[np.isfinite(x)]
    s = act.sigmoid_forward(x)
    assert np.isfinite(s).all() and (s >= 0).all() and (s <= 1).all()
    assert s[x == 100] == 1 and 0 < s[x == -100][0] < 1e-43 and s[x == -np.inf] == 0
    np.testing.assert_allclose(s, ref.sigmoid_forward_ref(x), rtol=1e-6, atol=1e-45)
    assert np.isfinite(act.sigmoid_backward(np.ones_like(x), s)).all()
    t = act.tanh_forward(x)
    assert np.isfinite(t).all() and t[x == 100] == 1 and t[x == -100] == -1
    y = act.silu_forward(finite)
    assert np.isfinite(y).all() and y[finite == 100] == 100 and -1e-40 < y[finite == -100][0] <= 0
    assert np.isfinite(act.silu_backward(np.ones_like(finite), finite)).all()
    np.testing.assert_array_equal(act.relu_forward(x), np.maximum(x, 0))


@pytest.mark.parametrize(
    "rows",
    [[[100, -100, 0]], [[-100, -100, -100]], [[100, 100, 100, 100]], [[1e4, -1e4], [-3e38, 3e38]]],
)
def test_softmax_extreme_rows(rows):
    x = np.array(rows, dtype=np.float32)
    y = act.softmax_forward(x)
    assert np.isfinite(y).all()
    np.testing.assert_allclose(y.sum(axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(y, ref.softmax_forward_ref(x), rtol=1e-6, atol=1e-38)
    g = act.softmax_backward(np.ones_like(x), y)
    assert np.isfinite(g).all()
    np.testing.assert_allclose(g, 0, atol=1e-6)  # the sum of a softmax is constant


def test_nan_propagates():
    x = np.array([np.nan, 1.0, -1.0], dtype=np.float32)
    for name in ["relu", "leaky_relu", *SMOOTH]:
        got, want = _forward(name, x)
        assert np.isnan(got[0]) and np.isnan(want[0]), name
        np.testing.assert_allclose(got[1:], want[1:], rtol=1e-6)
    y = act.softmax_forward(np.array([[0.0, np.nan, 1.0], [0.0, 1.0, 2.0]], dtype=np.float32))
    assert np.isnan(y[0]).all() and np.isfinite(y[1]).all()


# ---------------------------------------------------------------------------------------------------------
# Dropout with a fixed mask


@pytest.mark.parametrize("shape", [(10,), (3, 4, 5), (4, 16, 32, 32)])
def test_dropout_with_fixed_mask(shape):
    x, dy = _normal(shape), _normal(shape)
    mask = (np.random.default_rng(7).random(shape) >= 0.25).astype(np.uint8)
    y = act.dropout_forward(x, mask, 0.25)
    np.testing.assert_array_equal(y, ref.dropout_forward_ref(x, mask, 0.25))
    assert (y[mask == 0] == 0).all()
    np.testing.assert_array_equal(y[mask == 1], x[mask == 1] / np.float32(0.75))
    np.testing.assert_array_equal(
        act.dropout_backward(dy, mask, 0.25), ref.dropout_backward_ref(dy, mask, 0.25)
    )
    np.testing.assert_array_equal(act.dropout_forward(x, mask.astype(bool), 0.25), y)  # bool masks too


def test_dropout_ratio_zero_is_identity():
    x = _normal((3, 7))
    ones = np.ones(x.shape, dtype=np.uint8)
    np.testing.assert_array_equal(act.dropout_forward(x, ones, 0.0), x)
    np.testing.assert_array_equal(act.dropout_backward(x, ones, 0), x)
    np.testing.assert_array_equal(ref.dropout_forward_ref(x, ones, 0.0), x)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda x, m: act.dropout_forward(x, m, 1.0), r"ratio must be in \[0, 1\), got 1.0"),
        (lambda x, m: act.dropout_forward(x, m, -0.1), r"ratio must be in \[0, 1\)"),
        (lambda x, m: act.dropout_forward(x, m[:, :2], 0.5), r"mask \(3, 2\) must have the shape"),
        (lambda x, m: act.dropout_backward(x, m.astype(np.float32), 0.5), r"mask must be a uint8"),
    ],
)
def test_dropout_argument_errors(call, message):
    x = _normal((3, 4))
    with pytest.raises(ValueError, match=message):
        call(x, np.ones((3, 4), dtype=np.uint8))


# ---------------------------------------------------------------------------------------------------------
# Output buffers, in-place use, the parallel path, argument checks

UNARY = {
    "relu_forward": lambda x, dy, **kw: act.relu_forward(x, **kw),
    "leaky_relu_forward": lambda x, dy, **kw: act.leaky_relu_forward(x, 0.2, **kw),
    "sigmoid_forward": lambda x, dy, **kw: act.sigmoid_forward(x, **kw),
    "tanh_forward": lambda x, dy, **kw: act.tanh_forward(x, **kw),
    "silu_forward": lambda x, dy, **kw: act.silu_forward(x, **kw),
    "softmax_forward": lambda x, dy, **kw: act.softmax_forward(x, **kw),
    "relu_backward": lambda x, dy, **kw: act.relu_backward(dy, x, **kw),
    "leaky_relu_backward": lambda x, dy, **kw: act.leaky_relu_backward(dy, x, 0.2, **kw),
    "sigmoid_backward": lambda x, dy, **kw: act.sigmoid_backward(dy, x, **kw),
    "tanh_backward": lambda x, dy, **kw: act.tanh_backward(dy, x, **kw),
    "silu_backward": lambda x, dy, **kw: act.silu_backward(dy, x, **kw),
    "softmax_backward": lambda x, dy, **kw: act.softmax_backward(dy, x, **kw),
    "dropout_forward": lambda x, dy, **kw: act.dropout_forward(x, (dy > 0).astype(np.uint8), 0.3, **kw),
    "dropout_backward": lambda x, dy, **kw: act.dropout_backward(dy, (x > 0).astype(np.uint8), 0.3, **kw),
}


@pytest.mark.parametrize("name", list(UNARY))
def test_out_buffer_and_in_place(name):
    f = UNARY[name]
    x, dy = _normal((3, 4, 5)), _normal((3, 4, 5))
    want = f(x, dy)
    buf = np.full_like(x, np.nan)
    assert f(x, dy, out=buf) is buf
    np.testing.assert_array_equal(buf, want)
    # in place over the first operand of the formula (x for forward passes, dy for backward passes)
    first = x.copy() if name.endswith("forward") else dy.copy()
    args = (first, dy) if name.endswith("forward") else (x, first)
    assert f(*args, out=first) is first
    np.testing.assert_array_equal(first, want)


@pytest.mark.parametrize("name", list(UNARY))
def test_parallel_path_matches_serial(name):
    """A 4 x 16 x 32 x 32 batch in one call (threaded) equals its samples one at a time (serial)."""
    f = UNARY[name]
    x, dy = _normal((4, 16, 32, 32)), _normal((4, 16, 32, 32))
    whole = f(x, dy)
    parts = np.concatenate([f(x[i : i + 1], dy[i : i + 1]) for i in range(4)])
    np.testing.assert_array_equal(whole, parts)


def test_softmax_rows_parallel_matches_serial():
    """(N, C) input takes the row path; 40 x 1000 runs threaded, one row at a time serial."""
    x, dy = _normal((40, 1000)), _normal((40, 1000))
    y = act.softmax_forward(x)
    np.testing.assert_array_equal(y, np.concatenate([act.softmax_forward(x[i : i + 1]) for i in range(40)]))
    g = act.softmax_backward(dy, y)
    rows = [act.softmax_backward(dy[i : i + 1], y[i : i + 1]) for i in range(40)]
    np.testing.assert_array_equal(g, np.concatenate(rows))


def test_accepts_other_layouts_and_dtypes():
    x64 = RNG.standard_normal((5, 6))
    want = act.silu_forward(x64.astype(np.float32))
    np.testing.assert_array_equal(act.silu_forward(x64), want)
    np.testing.assert_array_equal(act.silu_forward(np.asfortranarray(x64)), want)
    np.testing.assert_array_equal(act.silu_forward(x64.astype(np.float32).T.copy().T), want)
    np.testing.assert_array_equal(act.relu_forward(np.float32(-2.0)), np.float32(0.0))
    assert act.sigmoid_forward(np.zeros((0, 3), dtype=np.float32)).shape == (0, 3)
    assert act.softmax_forward(np.zeros((0, 3, 2, 2), dtype=np.float32)).shape == (0, 3, 2, 2)


@pytest.mark.parametrize(
    "call, message",
    [
        (
            lambda: act.relu_forward(np.zeros(4, np.float32), out=np.zeros(4, np.float64)),
            r"out must be.*float32",
        ),
        (lambda: act.relu_forward(np.zeros(4, np.float32), out=np.zeros(5, np.float32)), r"shape \(4,\)"),
        (
            lambda: act.silu_forward(np.zeros((4, 4), np.float32), out=np.zeros((4, 8), np.float32)[:, ::2]),
            r"out",
        ),
        (lambda: act.tanh_forward(np.zeros(3, np.float32), out=[0.0, 0.0, 0.0]), r"got list"),
        (lambda: act.sigmoid_backward(np.zeros(3), np.zeros(4)), r"dy \(3,\) and y \(4,\)"),
        (lambda: act.softmax_forward(np.zeros(5)), r"\(N, C\) or \(N, C, H, W\)"),
        (lambda: act.softmax_backward(np.zeros((2, 3)), np.zeros((3, 2))), r"same shape"),
    ],
)
def test_argument_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()
