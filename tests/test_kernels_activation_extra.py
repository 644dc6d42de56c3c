"""Native clip (relu6), hard_sigmoid, hard_swish and prelu kernels (dlc._C.activation) against the numpy
references, and the references' backward passes against central finite differences in float64."""

import numpy as np
import pytest

from dlc._C import activation as act
from dlc._C import activation_ref as ref

from helpers import numeric_grad

RNG = np.random.default_rng(20240612)
SHAPES = [(7,), (5, 9), (2, 3, 4, 5), (4, 16, 32, 32)]  # the last is past the parallel threshold
ARGS = {"clip": (0.0, 6.0), "hard_sigmoid": (0.2, 0.5), "hard_swish": ()}
KINKS = {"clip": (0.0, 6.0), "hard_sigmoid": (-2.5, 2.5), "hard_swish": (-3.0, 3.0)}


def _normal(shape, scale=4.0, dtype=np.float32):
    return (RNG.standard_normal(shape) * scale).astype(dtype)


def _away_from(kinks, shape, margin=0.05):
    """float64 inputs in [-8, 8], none within `margin` of a kink: a finite-difference step never crosses one."""
    x = RNG.uniform(-8, 8, size=shape)
    for k in kinks:
        near = np.abs(x - k) < margin
        x[near] = k + np.where(x[near] >= k, margin, -margin) * 2
    return x


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", list(ARGS))
def test_forward_and_backward_match_reference(name, shape):
    x, dy = _normal(shape), _normal(shape, 1.0)
    x.reshape(-1)[:4] = KINKS[name] * 2  # the kinks themselves
    got = getattr(act, f"{name}_forward")(x, *ARGS[name])
    assert got.dtype == np.float32 and got.shape == x.shape
    np.testing.assert_array_equal(got, getattr(ref, f"{name}_forward_ref")(x, *ARGS[name]))
    got = getattr(act, f"{name}_backward")(dy, x, *ARGS[name])
    assert got.dtype == np.float32 and got.shape == x.shape
    np.testing.assert_array_equal(got, getattr(ref, f"{name}_backward_ref")(dy, x, *ARGS[name]))


def test_in_place_and_clip_values():
    x = np.array([-1.0, 0.0, 3.0, 6.0, 7.0, np.nan], np.float32)
    np.testing.assert_array_equal(act.clip_forward(x, 0, 6), [0, 0, 3, 6, 6, np.nan])
    np.testing.assert_array_equal(act.clip_backward(np.ones_like(x), x, 0, 6), [0, 0, 1, 0, 0, 0])
    y = x.copy()
    assert act.clip_forward(y, -0.5, 0.5, out=y) is y
    np.testing.assert_array_equal(y, [-0.5, 0, 0.5, 0.5, 0.5, np.nan])
    with pytest.raises(ValueError, match="lo"):
        act.clip_forward(x, 1.0, 0.0)
    # hard_swish agrees with PyTorch's definition x * relu6(x + 3) / 6
    z = np.linspace(-5, 5, 41).astype(np.float32)
    np.testing.assert_allclose(act.hard_swish_forward(z), z * np.clip(z + 3, 0, 6) / 6, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("shape", [(5, 3), (2, 3, 4, 5), (4, 16, 32, 32), (300, 200)])
def test_prelu_matches_reference(shape):
    x, dy = _normal(shape), _normal(shape, 1.0)
    slope = RNG.uniform(-0.5, 0.5, shape[1]).astype(np.float32)
    got = act.prelu_forward(x, slope)
    np.testing.assert_array_equal(got, ref.prelu_forward_ref(x, slope))
    dx, dslope = act.prelu_backward(dy, x, slope)
    want_dx, want_dslope = ref.prelu_backward_ref(dy, x, slope)
    assert dx.dtype == dslope.dtype == np.float32 and dslope.shape == (shape[1],)
    np.testing.assert_array_equal(dx, want_dx)
    np.testing.assert_allclose(dslope, want_dslope, rtol=1e-6, atol=1e-6)  # both sum in double, in any order
    with pytest.raises(ValueError, match="channels"):
        act.prelu_forward(x, slope[:-1])


# ---------------------------------------------------------------------------------------------------------
# The references' backward passes against central finite differences (float64)


@pytest.mark.parametrize("name", list(ARGS))
def test_reference_backward_matches_finite_differences(name):
    shape = (3, 4, 5)
    x = _away_from(KINKS[name], shape)
    r = RNG.standard_normal(shape)

    def f(v):
        return float((r * getattr(ref, f"{name}_forward_ref")(v, *ARGS[name])).sum())

    analytic = getattr(ref, f"{name}_backward_ref")(r, x, *ARGS[name])
    np.testing.assert_allclose(analytic, numeric_grad(f, x.copy()), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("shape", [(4, 3), (2, 3, 4, 2)])
def test_prelu_reference_backward_matches_finite_differences(shape):
    x = _away_from((0.0,), shape)
    slope = RNG.uniform(-0.5, 0.5, shape[1])
    r = RNG.standard_normal(shape)
    dx, dslope = ref.prelu_backward_ref(r, x, slope)
    np.testing.assert_allclose(
        dx,
        numeric_grad(lambda v: float((r * ref.prelu_forward_ref(v, slope)).sum()), x.copy()),
        rtol=1e-6,
        atol=1e-8,
    )
    numeric = numeric_grad(lambda s: float((r * ref.prelu_forward_ref(x, s)).sum()), slope.copy())
    np.testing.assert_allclose(dslope, numeric, rtol=1e-6, atol=1e-8)
