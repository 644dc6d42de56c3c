"""Native conv2d forward and backward (dlc._C.conv) against the plain numpy reference, the reference's
gradients against finite differences, and the forward against onnxruntime's Conv."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dlc._C import conv as native
from dlc._C.conv import conv2d_backward, conv2d_forward
from dlc._C.conv_ref import conv2d_backward_ref, conv2d_forward_ref


@dataclass(frozen=True)
class Case:
    n: int
    c: int
    hw: tuple[int, int]
    o: int
    kernel: tuple[int, int]
    stride: tuple[int, int] = (1, 1)
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    bias: bool = True

    def out_hw(self) -> tuple[int, int]:
        (h, w), (kh, kw), (sh, sw), (dh, dw) = self.hw, self.kernel, self.stride, self.dilation
        top, left, bottom, right = self.pads
        return (h + top + bottom - ((kh - 1) * dh + 1)) // sh + 1, (
            w + left + right - ((kw - 1) * dw + 1)
        ) // sw + 1

    def geometry(self) -> tuple:
        return self.stride, self.pads, self.dilation, self.groups

    def arrays(self, seed: int = 0, dtype=np.float32):
        rng = np.random.default_rng(seed)
        x = rng.standard_normal((self.n, self.c, *self.hw)).astype(dtype)
        w = rng.standard_normal((self.o, self.c // self.groups, *self.kernel)).astype(dtype)
        b = rng.standard_normal(self.o).astype(dtype) if self.bias else None
        dy = rng.standard_normal((self.n, self.o, *self.out_hw())).astype(dtype)
        return x, w, b, dy


CASES = {
    "3x3 pad 1": Case(2, 3, (8, 8), 4, (3, 3), pads=(1, 1, 1, 1)),
    "3x5 stride (2,3) asymmetric pads": Case(2, 3, (9, 11), 5, (3, 5), stride=(2, 3), pads=(1, 2, 0, 1)),
    "1x7 batch 1 no bias": Case(1, 2, (6, 13), 3, (1, 7), pads=(0, 3, 0, 3), bias=False),
    "7x1 stride 2 not dividing": Case(2, 2, (12, 5), 3, (7, 1), stride=(2, 1), pads=(3, 0, 2, 0)),
    "dilation 2": Case(2, 3, (10, 9), 4, (3, 3), stride=(1, 2), pads=(2, 2, 2, 1), dilation=(2, 2)),
    "dilation (2,3) stride 3": Case(
        1, 2, (13, 14), 3, (2, 3), stride=(3, 3), pads=(1, 0, 2, 3), dilation=(2, 3)
    ),
    "groups 2": Case(2, 4, (7, 7), 6, (3, 3), pads=(1, 1, 1, 1), groups=2),
    "groups 2 stride 2 asymmetric": Case(3, 6, (9, 8), 4, (3, 2), stride=(2, 2), pads=(0, 1, 1, 0), groups=2),
    "depthwise": Case(2, 4, (8, 8), 4, (3, 3), pads=(1, 1, 1, 1), groups=4),
    "depthwise O=2C stride 2 dilation": Case(
        3, 3, (9, 10), 6, (3, 3), (2, 2), (0, 1, 1, 2), (2, 1), 3, False
    ),
    "depthwise 5x5 stride 2 batch 1": Case(
        1, 5, (11, 11), 5, (5, 5), stride=(2, 2), pads=(2, 2, 2, 2), groups=5
    ),
    "depthwise O=3C 1x3 stride (1,3)": Case(
        2, 2, (5, 10), 6, (1, 3), stride=(1, 3), pads=(0, 1, 0, 0), groups=2
    ),
    "same width, pads top/left only": Case(2, 3, (6, 7), 4, (3, 3), pads=(0, 2, 2, 0)),
    "same width, pads bottom/right only": Case(1, 2, (5, 6), 3, (3, 3), pads=(2, 0, 0, 2)),
    "same width, dilation 2": Case(2, 2, (7, 9), 3, (3, 3), pads=(2, 2, 2, 2), dilation=(2, 2)),
    "same width, one column": Case(2, 2, (5, 1), 2, (3, 3), pads=(1, 1, 1, 1)),
    "same width, kernel taller than the input": Case(1, 1, (2, 4), 2, (5, 3), pads=(2, 1, 2, 1)),
    "1x1 fast path": Case(2, 5, (6, 7), 3, (1, 1)),
    "1x1 fast path groups 2 batch 1": Case(1, 4, (5, 3), 6, (1, 1), groups=2, bias=False),
    "1x1 stride 2": Case(2, 4, (7, 6), 5, (1, 1), stride=(2, 2)),
    "1x1 padded": Case(2, 3, (4, 5), 2, (1, 1), pads=(1, 0, 0, 2)),
    "one input channel 5x5 pad 2": Case(3, 1, (12, 12), 6, (5, 5), pads=(2, 2, 2, 2)),
    "kernel as large as the input": Case(2, 3, (5, 4), 2, (5, 4)),
    "pads wider than the kernel": Case(2, 2, (3, 4), 3, (2, 2), pads=(3, 2, 3, 4)),
    "stride larger than the kernel": Case(2, 2, (10, 11), 3, (2, 2), stride=(3, 4), pads=(0, 0, 1, 1)),
    # 3×3 stride 1, for the Winograd path: odd output sizes (half tiles), one tile, several images per task,
    # rows wider than two AVX-512 vectors, more output than input channels and the reverse
    "3x3 odd map 8 to 16 channels": Case(2, 8, (7, 9), 16, (3, 3), pads=(1, 1, 1, 1)),
    "3x3 one output pixel": Case(3, 5, (3, 3), 6, (3, 3)),
    "3x3 2x2 map padded": Case(2, 4, (2, 2), 3, (3, 3), pads=(1, 1, 1, 1), bias=False),
    "3x3 batch 9 small maps": Case(9, 6, (6, 5), 7, (3, 3), pads=(1, 1, 1, 1)),
    "3x3 rows of 70 pixels": Case(1, 3, (5, 70), 4, (3, 3), pads=(1, 1, 1, 1)),
    "3x3 odd left pad 17 wide": Case(2, 9, (6, 17), 5, (3, 3), pads=(0, 1, 2, 0)),
}
ids = list(CASES)


def assert_close(got: np.ndarray, want: np.ndarray, rtol: float = 1e-4) -> None:
    """Elementwise rtol, plus an absolute floor scaled to the array, for sums that cancel to near zero."""
    assert got.shape == want.shape
    scale = float(np.abs(want).max()) if want.size else 0.0
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * scale + 1e-6)


# ---------------------------------------------------------------------------------------------------------
# Native kernels against the reference, along each way through the kernels

# "team": OpenBLAS's sgemm called inside the OpenMP team; "numpy": np.matmul on whole chunks of the batch;
# "winograd": F(2×2, 3×3) on every 3×3 stride-1 ungrouped conv (the others take the team path). The tiny
# budgets force one output row per band, one image per chunk and one tile row per Winograd band.
PATHS = {
    "team": {"team_blas": True, "winograd": "never"},
    "team, one row per band": {"team_blas": True, "band_bytes": 1, "winograd": "never"},
    "numpy": {"team_blas": False},
    "numpy, one image per chunk": {"team_blas": False, "col_bytes": 1},
    "winograd": {"team_blas": True, "winograd": "always"},
    "winograd, one tile row per band": {"team_blas": True, "winograd": "always", "wino_bytes": 1},
}


@contextmanager
def kernel_path(name: str):
    options = PATHS[name]
    if options["team_blas"] and native.blas_info() is None:
        pytest.skip("numpy's OpenBLAS sgemm was not found: only the numpy path runs here")
    previous = native.set_options(**options)
    try:
        yield
    finally:
        native.set_options(**previous)


def reference(case: Case, x, w, b, dy):
    """The float64 reference forward and backward of the float32 inputs."""
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    b64 = None if b is None else b.astype(np.float64)
    y = conv2d_forward_ref(x64, w64, b64, *case.geometry(), case.out_hw())
    grads = conv2d_backward_ref(x64, w64, dy.astype(np.float64), *case.geometry(), True, case.bias)
    return y, grads


def check_against_reference(case: Case, seed: int) -> None:
    x, w, b, dy = case.arrays(seed)
    y_ref, grads_ref = reference(case, x, w, b, dy)
    y = conv2d_forward(x, w, b, *case.geometry(), case.out_hw())
    assert y.dtype == np.float32 and y.flags.c_contiguous
    assert_close(y, y_ref)
    grads = conv2d_backward(x, w, dy, *case.geometry(), True, case.bias)
    for name, got, want in zip(("dx", "dw", "db"), grads, grads_ref):
        if want is None:
            assert got is None, name
        else:
            assert got.dtype == np.float32 and got.flags.c_contiguous, name
            assert_close(got, want)


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("name", ids)
def test_matches_reference(name, path):
    with kernel_path(path):
        check_against_reference(CASES[name], seed=1)


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("name", ids)
def test_input_gradient_alone_matches_reference(name, path):
    """conv2d_backward_input (conv_transpose's forward): dx without the weight gradient, from the shape alone."""
    case = CASES[name]
    x, w, b, dy = case.arrays(seed=3)
    _, (dx_ref, _, _) = reference(case, x, w, b, dy)
    with kernel_path(path):
        dx = native.conv2d_backward_input(dy, w, x.shape, *case.geometry())
    assert dx.dtype == np.float32 and dx.shape == x.shape and dx.flags.c_contiguous
    assert_close(dx, dx_ref)


@pytest.mark.parametrize("path", ["team", "numpy"])
@pytest.mark.parametrize("name", ["3x3 pad 1", "depthwise", "1x1 fast path", "groups 2"])
def test_backward_flags(name, path):
    case = CASES[name]
    x, w, _, dy = case.arrays(seed=2)
    with kernel_path(path):
        dx_all, dw_all, db_all = conv2d_backward(x, w, dy, *case.geometry())
        dx, dw, db = conv2d_backward(x, w, dy, *case.geometry(), need_dx=False, need_db=False)
    assert dx is None and db is None
    assert dx_all is not None and db_all is not None
    assert_close(dw, dw_all, rtol=1e-6)
    dx_ref, _, db_ref = conv2d_backward_ref(x, w, dy, *case.geometry(), need_dx=False, need_db=False)
    assert dx_ref is None and db_ref is None


def test_blas_threads_restored():
    """The team path runs OpenBLAS on one thread while the OpenMP team calls it, then puts the count back."""
    info = native.blas_info()
    if info is None:
        pytest.skip("numpy's OpenBLAS sgemm was not found")
    case = CASES["3x3 pad 1"]
    x, w, b, dy = case.arrays()
    before = info["threads"]
    with kernel_path("team"):
        conv2d_forward(x, w, b, *case.geometry(), case.out_hw())
        conv2d_backward(x, w, dy, *case.geometry())
        with pytest.raises(ValueError):
            conv2d_forward(x, w, b, *case.geometry(), (1, 1))
    assert native.blas_info()["threads"] == before


@pytest.mark.parametrize("path", ["winograd", "winograd, one tile row per band"])
def test_winograd_gradients_are_derivatives_of_its_forward(path):
    """J = <y, dy> is linear in x and in w, so a central difference with a unit step is exact up to float32
    rounding: it must equal <dx, v> and <dw, u> from the Winograd backward."""
    case = Case(3, 12, (11, 10), 16, (3, 3), pads=(1, 1, 1, 1))
    x, w, b, dy = case.arrays(seed=5)
    rng = np.random.default_rng(6)
    v = rng.standard_normal(x.shape).astype(np.float32)
    u = rng.standard_normal(w.shape).astype(np.float32)

    def objective(xx, ww):
        y = conv2d_forward(xx, ww, b, *case.geometry(), case.out_hw())
        return float(np.sum(y.astype(np.float64) * dy)), float(np.sum(np.abs(y.astype(np.float64) * dy)))

    with kernel_path(path):
        dx, dw, _ = conv2d_backward(x, w, dy, *case.geometry())
        (jp, scale), (jm, _) = objective(x + v, w), objective(x - v, w)
        assert abs((jp - jm) / 2 - float(np.sum(dx * v, dtype=np.float64))) <= 1e-5 * scale
        (jp, scale), (jm, _) = objective(x, w + u), objective(x, w - u)
        assert abs((jp - jm) / 2 - float(np.sum(dw * u, dtype=np.float64))) <= 1e-5 * scale


def test_winograd_auto_matches_reference_where_it_is_chosen():
    """The default ("auto") sends a ResNet-sized 3×3 layer to Winograd; its results are the reference's."""
    if native.blas_info() is None:
        pytest.skip("numpy's OpenBLAS sgemm was not found")
    case = Case(4, 16, (16, 16), 24, (3, 3), pads=(1, 1, 1, 1))
    previous = native.set_options(team_blas=True, winograd="auto")
    try:
        assert native.algorithm((4, 16, 16, 16), (24, 16, 3, 3), *case.geometry()) == "winograd"
        check_against_reference(case, seed=7)
    finally:
        native.set_options(**previous)


def test_algorithm_names_the_route():
    if native.blas_info() is None:
        pytest.skip("numpy's OpenBLAS sgemm was not found")
    previous = native.set_options(team_blas=True, winograd="auto")
    resnet = ((1, 1), (1, 1, 1, 1), (1, 1), 1)
    try:
        assert native.algorithm((64, 16, 32, 32), (16, 16, 3, 3), *resnet) == "winograd"
        assert native.algorithm((64, 3, 32, 32), (16, 3, 3, 3), *resnet) == "im2col"  # too few channels
        assert native.algorithm((64, 64, 4, 4), (64, 64, 3, 3), *resnet) == "im2col"  # 4 px map
        assert native.algorithm((2, 32, 6, 6), (32, 32, 3, 3), *resnet) == "im2col"  # 18 tiles in all
        assert native.algorithm((64, 16, 32, 32), (16, 16, 3, 3), (2, 2), (1, 1, 1, 1), (1, 1), 1) == "im2col"
        assert native.algorithm((64, 16, 32, 32), (16, 1, 3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 16) == "depthwise"
        native.set_options(winograd="always")
        assert native.algorithm((64, 3, 32, 32), (16, 3, 3, 3), *resnet) == "winograd"
        assert native.algorithm((64, 16, 32, 32), (16, 16, 3, 3), (1, 1), (1, 1, 1, 1), (2, 2), 1) == "im2col"
        native.set_options(winograd="never")
        assert native.algorithm((64, 16, 32, 32), (16, 16, 3, 3), *resnet) == "im2col"
        native.set_options(team_blas=False, winograd="always")  # Winograd needs the in-team sgemm
        assert native.algorithm((64, 16, 32, 32), (16, 16, 3, 3), *resnet) == "numpy"
        with pytest.raises(ValueError, match="winograd must be one of"):
            native.set_options(winograd="sometimes")
        with pytest.raises(ValueError, match="do not fit groups"):
            native.algorithm((1, 4, 8, 8), (4, 3, 3, 3), *resnet)
    finally:
        native.set_options(**previous)


@st.composite
def random_cases(draw) -> Case:
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    c = groups * draw(st.integers(1, 3))
    if groups > 1 and draw(st.booleans()):  # depthwise
        c = groups
    o = groups * draw(st.integers(1, 3))
    kernel = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    extent = [(k - 1) * d + 1 for k, d in zip(kernel, dilation)]
    if draw(st.booleans()):  # stride 1, pads adding up to the kernel extent - 1: output as large as the input
        stride = (1, 1)
        top, left = draw(st.integers(0, extent[0] - 1)), draw(st.integers(0, extent[1] - 1))
        pads = (top, left, extent[0] - 1 - top, extent[1] - 1 - left)
    else:
        stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
        pads = tuple(draw(st.integers(0, 3)) for _ in range(4))
    h = draw(st.integers(max(1, extent[0] - pads[0] - pads[2]), 9))
    w = draw(st.integers(max(1, extent[1] - pads[1] - pads[3]), 9))
    bias = draw(st.booleans())
    return Case(draw(st.integers(1, 3)), c, (h, w), o, kernel, stride, pads, dilation, groups, bias)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_cases(), st.integers(0, 2**16), st.sampled_from(list(PATHS)))
def test_random_geometry_matches_reference(case, seed, path):
    with kernel_path(path):
        check_against_reference(case, seed)


# ---------------------------------------------------------------------------------------------------------
# The reference backward against central finite differences of the reference forward (float64)


@pytest.mark.parametrize("name", ids)
def test_reference_gradients_match_finite_differences(name):
    case = CASES[name]
    x, w, b, _ = case.arrays(seed=4, dtype=np.float64)
    rng = np.random.default_rng(5)
    projection = rng.standard_normal((case.n, case.o, *case.out_hw()))

    def loss(x_, w_, b_):
        return float(np.sum(projection * conv2d_forward_ref(x_, w_, b_, *case.geometry(), case.out_hw())))

    dx, dw, db = conv2d_backward_ref(x, w, projection, *case.geometry(), True, case.bias)
    eps = 1e-3

    def check(array: np.ndarray, grad: np.ndarray, evaluate) -> None:
        flat = array.reshape(-1)
        picks = rng.choice(flat.size, size=min(flat.size, 24), replace=False)
        for i in picks:
            keep = flat[i]
            flat[i] = keep + eps
            up = evaluate()
            flat[i] = keep - eps
            down = evaluate()
            flat[i] = keep
            np.testing.assert_allclose(grad.reshape(-1)[i], (up - down) / (2 * eps), rtol=1e-6, atol=1e-8)

    check(x, dx, lambda: loss(x, w, b))
    check(w, dw, lambda: loss(x, w, b))
    if b is not None:
        check(b, db, lambda: loss(x, w, b))


# ---------------------------------------------------------------------------------------------------------
# Errors


def test_rejects_inconsistent_geometry():
    case = CASES["3x3 pad 1"]
    x, w, b, dy = case.arrays()
    with pytest.raises(ValueError, match="out_hw"):
        conv2d_forward(x, w, b, *case.geometry(), (7, 8))
    with pytest.raises(ValueError, match="groups"):
        conv2d_forward(x, w, b, (1, 1), (1, 1, 1, 1), (1, 1), 2, case.out_hw())
    with pytest.raises(ValueError, match="bias"):
        conv2d_forward(x, w, b[:2], *case.geometry(), case.out_hw())
    with pytest.raises(ValueError, match="dy must have shape"):
        conv2d_backward(x, w, dy[:, :2], *case.geometry())
    with pytest.raises(ValueError, match="does not fit"):
        conv2d_forward(x[:, :, :1, :1], w, b, (1, 1), (0, 0, 0, 0), (1, 1), 1, (1, 1))


def test_empty_batch_and_no_channels():
    case = Case(0, 3, (5, 5), 4, (3, 3), pads=(1, 1, 1, 1))
    x, w, b, dy = case.arrays()
    assert conv2d_forward(x, w, b, *case.geometry(), case.out_hw()).shape == (0, 4, 5, 5)
    dx, dw, db = conv2d_backward(x, w, dy, *case.geometry())
    assert dx.shape == x.shape
    np.testing.assert_array_equal(dw, np.zeros_like(w))
    np.testing.assert_array_equal(db, np.zeros(4, dtype=np.float32))
    x0, w0 = np.zeros((2, 0, 5, 5), np.float32), np.zeros((4, 0, 3, 3), np.float32)
    y = conv2d_forward(x0, w0, b, *case.geometry(), case.out_hw())
    np.testing.assert_array_equal(y, np.broadcast_to(b[None, :, None, None], (2, 4, 5, 5)))


def test_concurrent_calls_from_python_threads():
    """Scratch buffers are per Python thread and the OpenBLAS thread count is restored by the last caller."""
    cases = [
        Case(4, 8, (12, 12), 8, (3, 3), pads=(1, 1, 1, 1)),
        Case(4, 6, (10, 9), 4, (5, 3), stride=(2, 1)),
    ]
    inputs = [case.arrays(seed=i) for i, case in enumerate(cases)]

    def run(i: int):
        case, (x, w, b, dy) = cases[i % 2], inputs[i % 2]
        return conv2d_forward(x, w, b, *case.geometry(), case.out_hw()), conv2d_backward(
            x, w, dy, *case.geometry()
        )

    serial = [run(i) for i in range(2)]
    before = native.blas_info()
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(run, range(16)))
    for i, (y, grads) in enumerate(results):
        y_ref, grads_ref = serial[i % 2]
        np.testing.assert_array_equal(y, y_ref)
        for got, want in zip(grads, grads_ref):
            np.testing.assert_array_equal(got, want)  # deterministic: same sums in the same order
    if before is not None:
        assert native.blas_info()["threads"] == before["threads"]


def test_accepts_other_dtypes_and_layouts():
    case = CASES["3x5 stride (2,3) asymmetric pads"]
    x, w, b, dy = case.arrays()
    want = conv2d_forward(x, w, b, *case.geometry(), case.out_hw())
    got = conv2d_forward(
        np.asfortranarray(x.astype(np.float64)), w[:, ::1], list(b), *case.geometry(), case.out_hw()
    )
    np.testing.assert_array_equal(got, want)


# ---------------------------------------------------------------------------------------------------------
# The forward against onnxruntime's Conv


def ort_conv(case: Case, x: np.ndarray, w: np.ndarray, b: np.ndarray | None) -> np.ndarray:
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(w, "w")] + ([numpy_helper.from_array(b, "b")] if b is not None else [])
    node = helper.make_node(
        "Conv",
        ["x", "w"] + (["b"] if b is not None else []),
        ["y"],
        kernel_shape=list(case.kernel),
        strides=list(case.stride),
        pads=[case.pads[0], case.pads[1], case.pads[2], case.pads[3]],  # ONNX: begins (top, left), then ends
        dilations=list(case.dilation),
        group=case.groups,
    )
    graph = helper.make_graph(
        [node],
        "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [case.n, case.o, *case.out_hw()])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


@pytest.mark.parametrize(
    "name",
    [
        "3x3 pad 1",
        "3x5 stride (2,3) asymmetric pads",
        "dilation (2,3) stride 3",
        "groups 2 stride 2 asymmetric",
        "depthwise O=2C stride 2 dilation",
        "1x1 fast path",
        "pads wider than the kernel",
    ],
)
def test_forward_matches_onnxruntime(name):
    case = CASES[name]
    x, w, b, _ = case.arrays(seed=6)
    assert_close(conv2d_forward(x, w, b, *case.geometry(), case.out_hw()), ort_conv(case, x, w, b))


# ---------------------------------------------------------------------------------------------------------
# Shapes of the model zoo at training batch sizes: the parallel paths with many tasks


@pytest.mark.parametrize(
    "case",
    [
        Case(8, 16, (32, 32), 16, (3, 3), pads=(1, 1, 1, 1), bias=False),
        Case(8, 16, (32, 32), 32, (1, 1), stride=(2, 2), bias=False),
        Case(8, 6, (14, 14), 16, (5, 5)),
        Case(8, 32, (16, 16), 32, (3, 3), stride=(2, 2), pads=(1, 1, 1, 1), groups=32, bias=False),
        Case(8, 32, (16, 16), 64, (1, 1), bias=False),
    ],
    ids=["resnet 3x3", "resnet projection", "lenet conv2", "mobilenet depthwise", "mobilenet pointwise"],
)
def test_model_shapes_match_reference(case):
    x, w, b, dy = case.arrays(seed=7)
    y = conv2d_forward(x, w, b, *case.geometry(), case.out_hw())
    assert_close(y, conv2d_forward_ref(x, w, b, *case.geometry(), case.out_hw()))
    got = conv2d_backward(x, w, dy, *case.geometry(), True, case.bias)
    want = conv2d_backward_ref(x, w, dy, *case.geometry(), True, case.bias)
    for g, r in zip(got, want):
        if r is None:
            assert g is None
        else:
            assert_close(g, r)
