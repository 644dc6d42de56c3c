"""Weight fillers: the statistics each promises, determinism by seed, and validation."""

import math

import numpy as np
import pytest

from dlc.compiler.errors import DlcError

from helpers import load


def weights(filler: str, out=64, cin=32, k=3, seed=0):
    m = load(f"- {{name: c, type: conv, out: {out}, kernel: {k}, weight_filler: {filler}}}", shape=(cin, 8, 8))
    return m.graph.node("c").params["weight"]


def std_tolerance(n: int, kurtosis: float, z: float = 5.0) -> float:
    """z standard errors of a sample standard deviation of n draws, relative to the true one:
    SE(s) / sigma = sqrt((kurtosis - 1) / (4 n)) (kurtosis 3 for a normal, 1.8 for a uniform)."""
    return z * math.sqrt((kurtosis - 1) / (4 * n))


def test_kaiming_default_std():
    w = weights("kaiming")
    assert w.dtype == np.float32 and w.shape == (64, 32, 3, 3)
    sigma = math.sqrt(2 / (32 * 9))
    assert std_tolerance(w.size, 3) < 0.03  # 5 standard errors of 0.5 % each
    assert abs(w.std() / sigma - 1) < std_tolerance(w.size, 3)
    assert abs(w.mean()) < 5 * sigma / math.sqrt(w.size)
    wide = weights("kaiming", cin=64)  # fan-in doubled: the std falls by sqrt(2)
    assert abs(wide.std() / math.sqrt(2 / (64 * 9)) - 1) < std_tolerance(wide.size, 3)


def test_xavier_bounds_and_std():
    w = weights("xavier")
    a = math.sqrt(6 / (32 * 9 + 64 * 9))
    assert w.max() <= a and w.min() >= -a
    assert w.max() > 0.99 * a and w.min() < -0.99 * a
    assert abs(w.std() / (a / math.sqrt(3)) - 1) < std_tolerance(w.size, 1.8)
    assert abs(w.mean()) < 5 * (a / math.sqrt(3)) / math.sqrt(w.size)


def test_gaussian_and_constant():
    w = weights("{type: gaussian, std: 0.05}")
    assert abs(w.std() / 0.05 - 1) < std_tolerance(w.size, 3)
    assert abs(w.mean()) < 5 * 0.05 / math.sqrt(w.size)
    w = weights("{type: gaussian, mean: 0.3, std: 0.02}")
    assert abs(w.mean() - 0.3) < 5 * 0.02 / math.sqrt(w.size)
    assert abs(w.std() / 0.02 - 1) < std_tolerance(w.size, 3)
    assert np.all(weights("{type: constant, value: 0.25}") == np.float32(0.25))


def test_bias_and_bn_defaults():
    m = load("- {name: c, type: conv, out: 4, kernel: 1}\n- {name: bn, type: batchnorm}")
    assert np.all(m.graph.node("c").params["bias"] == 0)
    bn = m.graph.node("bn").params
    assert np.all(bn["scale"] == 1) and np.all(bn["bias"] == 0) and np.all(bn["mean"] == 0) and np.all(bn["var"] == 1)


def test_initialisation_is_deterministic_and_per_layer():
    a = load("- {name: c1, type: conv, out: 4, kernel: 3}\n- {name: c2, type: conv, out: 4, kernel: 3}")
    b = load("- {name: c0, type: conv, out: 3, kernel: 1}\n- {name: c1, type: conv, out: 4, kernel: 3, inputs: input}")
    again = load("- {name: c1, type: conv, out: 4, kernel: 3}\n- {name: c2, type: conv, out: 4, kernel: 3}")
    w1 = a.graph.node("c1").params["weight"]
    np.testing.assert_array_equal(w1, again.graph.node("c1").params["weight"])
    np.testing.assert_array_equal(w1, b.graph.node("c1").params["weight"])  # other layers do not shift it
    assert not np.array_equal(w1, a.graph.node("c2").params["weight"][:, :3])


def test_bad_filler_is_a_clear_error():
    with pytest.raises(DlcError, match="unknown filler 'xavir'.*did you mean 'xavier'"):
        weights("xavir")
    with pytest.raises(DlcError, match="filler 'gaussian' has no option 'sd'"):
        weights("{type: gaussian, sd: 1}")
