"""Native softmax cross-entropy and focal loss (dlc._C.loss) against the numpy references, a direct
computation, PyTorch and onnxruntime; the references' gradients against central finite differences."""

import numpy as np
import pytest

from dlc._C.loss import focal_loss, softmax_cross_entropy
from dlc._C.loss_ref import focal_loss_ref, softmax_cross_entropy_ref

from helpers import TORCH_FIXTURES, numeric_grad

RNG = np.random.default_rng(1234)
SIZES = [(1, 2), (8, 10), (64, 10), (33, 7), (512, 100)]  # the last is past the parallel threshold


def _batch(n: int, k: int, scale: float = 3.0):
    logits = (RNG.standard_normal((n, k)) * scale).astype(np.float32)
    labels = RNG.integers(0, k, size=n)
    weights = RNG.uniform(0.2, 3.0, size=k)
    return logits, labels, weights


def _check_against_reference(got, want, loss_rtol=1e-12):
    (loss, grad), (want_loss, want_grad) = got, want
    assert isinstance(loss, float)
    assert grad.dtype == np.float32 and grad.shape == want_grad.shape
    np.testing.assert_allclose(loss, want_loss, rtol=loss_rtol)
    # dlogits is rounded to float32 once; everything before that is double
    np.testing.assert_allclose(grad, want_grad, rtol=1e-6, atol=1e-9)


# ---------------------------------------------------------------------------------------------------------
# Native kernels against the references (worked in float64 on the same float32 logits)


@pytest.mark.parametrize("n, k", SIZES)
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("eps", [0.0, 0.1, 1.0])
def test_cross_entropy_matches_reference(n, k, weighted, eps):
    logits, labels, weights = _batch(n, k)
    w = weights if weighted else None
    got = softmax_cross_entropy(logits, labels, class_weights=w, label_smoothing=eps)
    want = softmax_cross_entropy_ref(logits.astype(np.float64), labels, class_weights=w, label_smoothing=eps)
    _check_against_reference(got, want)


@pytest.mark.parametrize("n, k", SIZES)
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0, 2.0, 5.0])
def test_focal_loss_matches_reference(n, k, weighted, gamma):
    logits, labels, weights = _batch(n, k)
    w = weights if weighted else None
    got = focal_loss(logits, labels, gamma=gamma, class_weights=w)
    want = focal_loss_ref(logits.astype(np.float64), labels, gamma=gamma, class_weights=w)
    _check_against_reference(got, want, loss_rtol=1e-10)  # 1 - p_t: expm1 there, a subtraction here


@pytest.mark.parametrize("n, k", SIZES)
@pytest.mark.parametrize("weighted", [False, True])
def test_focal_loss_with_gamma_zero_is_cross_entropy_exactly(n, k, weighted):
    logits, labels, weights = _batch(n, k)
    w = weights if weighted else None
    loss, grad = focal_loss(logits, labels, gamma=0.0, class_weights=w)
    ce_loss, ce_grad = softmax_cross_entropy(logits, labels, class_weights=w)
    assert loss == ce_loss
    np.testing.assert_array_equal(grad, ce_grad)


def test_cross_entropy_direct_computation():
    """Against log-softmax written out without the max shift (the logits are small)."""
    logits, labels, weights = _batch(16, 5, scale=1.0)
    z = logits.astype(np.float64)
    nll = np.log(np.exp(z).sum(axis=1)) - z[np.arange(16), labels]
    loss, _ = softmax_cross_entropy(logits, labels)
    np.testing.assert_allclose(loss, nll.mean(), rtol=1e-12)
    loss, _ = softmax_cross_entropy(logits, labels, class_weights=weights)
    np.testing.assert_allclose(loss, (weights[labels] * nll).sum() / weights[labels].sum(), rtol=1e-12)
    # smoothing: the target puts 1 - eps + eps / K on the label and eps / K on every other class
    target = np.full(z.shape, 0.2 / 5)
    target[np.arange(16), labels] += 0.8
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    loss, _ = softmax_cross_entropy(logits, labels, label_smoothing=0.2)
    np.testing.assert_allclose(loss, -(target * logp).sum(axis=1).mean(), rtol=1e-12)


def test_hand_values():
    two = np.zeros((1, 2), dtype=np.float32)  # p = (1/2, 1/2)
    loss, grad = softmax_cross_entropy(two, [0])
    assert loss == pytest.approx(np.log(2), rel=1e-15)
    np.testing.assert_array_equal(grad, [[-0.5, 0.5]])
    loss, grad = focal_loss(two, [1], gamma=2.0)  # -(1 - 1/2)^2 log(1/2)
    assert loss == pytest.approx(0.25 * np.log(2), rel=1e-15)
    c = 2 * 0.5 * 0.5 * np.log(0.5) - 0.25  # gamma (1 - p)^(gamma - 1) p log p - (1 - p)^gamma
    np.testing.assert_allclose(grad, [[c * (0 - 0.5), c * (1 - 0.5)]], rtol=1e-7)  # c ([j == y] - p_j)


# ---------------------------------------------------------------------------------------------------------
# The references' gradients against central finite differences (float64)


def _check_gradient(loss_of, z: np.ndarray, analytic: np.ndarray, h: float = 1e-6) -> None:
    """`analytic` against the central difference of the scalar loss_of(z) at every element."""
    np.testing.assert_allclose(analytic, numeric_grad(loss_of, z.copy(), h), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("eps", [0.0, 0.15])
def test_cross_entropy_reference_gradient(weighted, eps):
    logits, labels, weights = _batch(5, 4, scale=2.0)
    z, w = logits.astype(np.float64), (weights if weighted else None)
    _, grad = softmax_cross_entropy_ref(z, labels, class_weights=w, label_smoothing=eps)
    _check_gradient(lambda v: softmax_cross_entropy_ref(v, labels, w, eps)[0], z, grad)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0, 3.5])
def test_focal_loss_reference_gradient(weighted, gamma):
    logits, labels, weights = _batch(5, 4, scale=2.0)
    z, w = logits.astype(np.float64), (weights if weighted else None)
    _, grad = focal_loss_ref(z, labels, gamma=gamma, class_weights=w)
    _check_gradient(lambda v: focal_loss_ref(v, labels, gamma, w)[0], z, grad)


# ---------------------------------------------------------------------------------------------------------
# Extreme logits


@pytest.mark.parametrize("loss_fn", ["ce", "ce_smooth", "focal", "focal_half"])
def test_extreme_logits_stay_finite(loss_fn):
    logits = np.array(
        [[100, -100, 0], [-100, 100, 100], [-100, -100, -100], [1e4, -1e4, 0], [0, 0, 100]], dtype=np.float32
    )
    labels = np.array([0, 0, 2, 0, 1])
    weights = np.array([1.0, 2.0, 0.5])
    native = {
        "ce": lambda z, y: softmax_cross_entropy(z, y, weights),
        "ce_smooth": lambda z, y: softmax_cross_entropy(z, y, weights, 0.1),
        "focal": lambda z, y: focal_loss(z, y, 2.0, weights),
        "focal_half": lambda z, y: focal_loss(z, y, 0.5),
    }[loss_fn]
    reference = {
        "ce": lambda z, y: softmax_cross_entropy_ref(z, y, weights),
        "ce_smooth": lambda z, y: softmax_cross_entropy_ref(z, y, weights, 0.1),
        "focal": lambda z, y: focal_loss_ref(z, y, 2.0, weights),
        "focal_half": lambda z, y: focal_loss_ref(z, y, 0.5),
    }[loss_fn]

    def call(z, y):
        return native(z, y), reference(z.astype(np.float64), y)

    (loss, grad), want = call(logits, labels)  # the references see float64 logits
    assert np.isfinite(loss) and np.isfinite(grad).all()
    _check_against_reference((loss, grad), want, loss_rtol=1e-12)
    # a confident right answer has (almost) no loss and no gradient
    (loss, grad), _ = call(logits[:1], labels[:1])
    assert loss < 1e-40 or loss_fn == "ce_smooth"
    if loss_fn != "ce_smooth":
        assert np.abs(grad).max() < 1e-40


def test_confident_focal_gradient_limit():
    """p_t rounding to 1 in double: (1 - p_t)^(gamma - 1) would be 1/0 for gamma < 1; the limit is 0."""
    z = np.array([[60.0, 0.0], [0.0, 40.0]], dtype=np.float32)
    for gamma in (0.25, 0.5, 1.0, 2.0):
        loss, grad = focal_loss(z, [0, 1], gamma=gamma)
        assert np.isfinite(loss) and np.isfinite(grad).all()
        assert loss < 1e-10 and np.abs(grad).max() < 1e-10


# ---------------------------------------------------------------------------------------------------------
# Argument checks and output buffers


@pytest.mark.parametrize("fn", [softmax_cross_entropy, focal_loss])
@pytest.mark.parametrize(
    "labels, message",
    [
        ([0, 3, 1], r"label 3 at row 1 is out of range for 3 classes \(0..2\)"),
        ([0, 1, -1], r"label -1 at row 2 is out of range"),
        ([0.0, 1.0, 2.0], r"labels must be integer class indices, got dtype float64"),
        ([0, 1], r"labels must have shape \(3,\)"),
    ],
)
def test_bad_labels(fn, labels, message):
    with pytest.raises(ValueError, match=message):
        fn(np.zeros((3, 3), dtype=np.float32), labels)


@pytest.mark.parametrize(
    "call, message",
    [
        (
            lambda z: softmax_cross_entropy(z, [0, 1], class_weights=[1.0, 2.0]),
            r"class_weights must have shape \(3,\)",
        ),
        (lambda z: focal_loss(z, [0, 1], class_weights=[1.0, -1.0, 1.0]), r"finite and non-negative"),
        (lambda z: softmax_cross_entropy(z, [0, 1], class_weights=[0.0, 0.0, 1.0]), r"sum to 0"),
        (
            lambda z: softmax_cross_entropy(z, [0, 1], label_smoothing=1.5),
            r"label_smoothing must be in \[0, 1\]",
        ),
        (lambda z: focal_loss(z, [0, 1], gamma=-1.0), r"gamma must be a finite number >= 0"),
        (lambda z: focal_loss(z, [0, 1], gamma=float("nan")), r"gamma must be"),
        (lambda z: softmax_cross_entropy(z[0], [0]), r"logits must be a non-empty \(N, K\) array"),
        (lambda z: softmax_cross_entropy(z[:0], []), r"non-empty"),
        (lambda z: focal_loss(z, [0, 1], out=np.zeros((2, 3))), r"out must be.*float32"),
    ],
)
def test_argument_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call(np.zeros((2, 3), dtype=np.float32))


def test_out_buffer_and_input_conversion():
    logits, labels, weights = _batch(6, 4)
    loss, grad = softmax_cross_entropy(logits, labels, weights, 0.1)
    buf = np.full_like(logits, np.nan)
    loss2, grad2 = softmax_cross_entropy(logits, labels, weights, 0.1, out=buf)
    assert grad2 is buf and loss2 == loss
    np.testing.assert_array_equal(buf, grad)
    # float64 logits, int32 labels, a list of weights, a Fortran-ordered array: the same answer
    loss3, grad3 = softmax_cross_entropy(
        np.asfortranarray(logits.astype(np.float64)), labels.astype(np.int32), list(weights), 0.1
    )
    assert loss3 == loss
    np.testing.assert_array_equal(grad3, grad)


# ---------------------------------------------------------------------------------------------------------
# Against PyTorch (CrossEntropyLoss with weights and label smoothing; focal loss through autograd): torch's values
# and gradients stored in tests/fixtures/torch_onnx/torch_losses.npz (by tests/fixtures/make_torch_fixtures.py),
# and the same computed live where torch is installed


@pytest.fixture(scope="module")
def torch_losses():
    with np.load(TORCH_FIXTURES / "torch_losses.npz", allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_cross_entropy_matches_stored_pytorch(torch_losses, weighted, eps):
    r = torch_losses
    loss, grad = softmax_cross_entropy(r["logits"], r["labels"], r["weights"] if weighted else None, eps)
    np.testing.assert_allclose(loss, r[f"ce_w{int(weighted)}_eps{eps}_loss"], rtol=1e-12)
    np.testing.assert_allclose(grad, r[f"ce_w{int(weighted)}_eps{eps}_grad"], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("gamma", [0.5, 2.0])
def test_focal_loss_matches_stored_pytorch_autograd(torch_losses, weighted, gamma):
    r = torch_losses
    loss, grad = focal_loss(r["logits"], r["labels"], gamma, r["weights"] if weighted else None)
    np.testing.assert_allclose(loss, r[f"focal_w{int(weighted)}_gamma{gamma}_loss"], rtol=1e-10)
    np.testing.assert_allclose(grad, r[f"focal_w{int(weighted)}_gamma{gamma}_grad"], rtol=1e-6, atol=1e-9)


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch")


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_cross_entropy_matches_pytorch(torch, weighted, eps):
    logits, labels, weights = _batch(24, 6)
    z = torch.tensor(logits.astype(np.float64), requires_grad=True)
    w = torch.tensor(weights) if weighted else None
    expected = torch.nn.CrossEntropyLoss(weight=w, label_smoothing=eps)(z, torch.tensor(labels))
    expected.backward()
    loss, grad = softmax_cross_entropy(logits, labels, weights if weighted else None, eps)
    np.testing.assert_allclose(loss, expected.item(), rtol=1e-12)
    np.testing.assert_allclose(grad, z.grad.numpy(), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("gamma", [0.5, 2.0])
def test_focal_loss_matches_pytorch_autograd(torch, weighted, gamma):
    logits, labels, weights = _batch(24, 6)
    z = torch.tensor(logits.astype(np.float64), requires_grad=True)
    y = torch.tensor(labels)
    w = torch.tensor(weights) if weighted else torch.ones(6, dtype=torch.float64)
    log_pt = torch.log_softmax(z, dim=1).gather(1, y[:, None])[:, 0]
    expected = (-w[y] * (1 - log_pt.exp()) ** gamma * log_pt).sum() / w[y].sum()
    expected.backward()
    loss, grad = focal_loss(logits, labels, gamma, weights if weighted else None)
    np.testing.assert_allclose(loss, expected.item(), rtol=1e-10)
    np.testing.assert_allclose(grad, z.grad.numpy(), rtol=1e-6, atol=1e-9)


# ---------------------------------------------------------------------------------------------------------
# Against onnxruntime's SoftmaxCrossEntropyLoss operator


@pytest.fixture(scope="module")
def ort_sce():
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper

    def session(weighted: bool):
        inputs = [
            helper.make_tensor_value_info("scores", TensorProto.FLOAT, [None, None]),
            helper.make_tensor_value_info("labels", TensorProto.INT64, [None]),
        ]
        if weighted:
            inputs.append(helper.make_tensor_value_info("weights", TensorProto.FLOAT, [None]))
        node = helper.make_node(
            "SoftmaxCrossEntropyLoss", [i.name for i in inputs], ["loss"], reduction="mean"
        )
        graph = helper.make_graph(
            [node], "sce", inputs, [helper.make_tensor_value_info("loss", TensorProto.FLOAT, [])]
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
        onnx.checker.check_model(model)
        return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])

    sessions = {False: session(False), True: session(True)}

    def run(logits, labels, weights=None) -> float:
        feeds = {"scores": logits, "labels": labels.astype(np.int64)}
        if weights is not None:
            feeds["weights"] = weights.astype(np.float32)
        return float(sessions[weights is not None].run(None, feeds)[0])

    return run


@pytest.mark.parametrize("n, k", [(8, 10), (64, 10), (100, 3)])
@pytest.mark.parametrize("weighted", [False, True])
def test_cross_entropy_matches_onnxruntime(ort_sce, n, k, weighted):
    logits, labels, weights = _batch(n, k)
    weights = weights.astype(np.float32).astype(np.float64)  # the weights ORT sees
    w = weights if weighted else None
    loss, _ = softmax_cross_entropy(logits, labels, class_weights=w)
    np.testing.assert_allclose(loss, ort_sce(logits, labels, w), rtol=2e-6)  # ORT works in float32
