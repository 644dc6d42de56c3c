"""Native box_iou and nms (dlc.runtime.boxes) against the plain numpy references and onnxruntime."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dlc._C.boxes_ref import box_iou_ref, nms_ref
from dlc.runtime.boxes import box_iou, nms

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Coordinates on a coarse grid make exact ties, identical boxes, touching edges and zero-area boxes common.
grid = st.integers(-40, 40).map(lambda v: v / 4)
extent = st.integers(-8, 80).map(lambda v: v / 4)  # negative: inverted box, 0: zero area


def xywh_to_xyxy(xywh: np.ndarray) -> np.ndarray:
    out = xywh.astype(np.float32).copy()
    out[:, 2] = xywh[:, 0] + xywh[:, 2]
    out[:, 3] = xywh[:, 1] + xywh[:, 3]
    return out


@st.composite
def box_sets(draw, max_boxes: int = 60) -> np.ndarray:
    """(N, 4) float32 xyxy boxes, either scattered or clustered around a few objects."""
    n = draw(st.integers(0, max_boxes))
    if draw(st.booleans()):
        rows = draw(st.lists(st.tuples(grid, grid, extent, extent), min_size=n, max_size=n))
        xywh = np.array(rows, dtype=np.float64).reshape(-1, 4)
    else:
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        objects = rng.uniform(0, 100, size=(draw(st.integers(1, 5)), 4)) * [1, 1, 0.3, 0.3] + [0, 0, 5, 5]
        xywh = objects[rng.integers(0, len(objects), size=n)]
        xywh = xywh + rng.normal(0, draw(st.sampled_from([0.0, 0.5, 2.0])), size=xywh.shape)
    return xywh_to_xyxy(xywh)


@st.composite
def scored_boxes(draw, max_boxes: int = 60) -> tuple[np.ndarray, np.ndarray]:
    boxes = draw(box_sets(max_boxes))
    n = len(boxes)
    if draw(st.booleans()):  # few distinct values: many ties
        values = st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0, np.inf, -np.inf, np.nan])
    else:
        values = st.floats(-10, 10, width=32) | st.sampled_from([np.nan, np.inf, -np.inf])
    scores = np.array(draw(st.lists(values, min_size=n, max_size=n)), dtype=np.float32)
    return boxes, scores


thresholds = st.sampled_from([0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0]) | st.floats(-0.5, 1.5)


# ---------------------------------------------------------------------------------------------------------
# The references themselves, on values worked out by hand


def test_reference_iou_hand_values():
    a = np.array([[0, 0, 2, 2], [0, 0, 1, 1], [5, 5, 6, 6]], dtype=np.float32)
    b = np.array([[1, 1, 3, 3], [0, 0, 2, 2]], dtype=np.float32)
    expected = np.array([[1 / 7, 1.0], [0.0, 0.25], [0.0, 0.0]], dtype=np.float32)
    np.testing.assert_array_equal(box_iou_ref(a, b), expected)
    np.testing.assert_array_equal(box_iou(a, b), expected)


def test_reference_nms_hand_values():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 10, 9]], dtype=np.float32)
    scores = np.array([0.9, 0.8, 0.7, 0.95], dtype=np.float32)
    # IoU(3, 0) = 0.9, IoU(3, 1) = 72/118, IoU(0, 1) = 81/119
    for thr, expected in [(0.5, [3, 2]), (0.6, [3, 2]), (0.7, [3, 1, 2]), (0.95, [3, 0, 1, 2])]:
        np.testing.assert_array_equal(nms_ref(boxes, scores, thr), expected)
        np.testing.assert_array_equal(nms(boxes, scores, thr), expected)


# ---------------------------------------------------------------------------------------------------------
# Native kernels against the references


@SETTINGS
@given(box_sets(), box_sets())
def test_box_iou_matches_reference(a, b):
    got = box_iou(a, b)
    assert got.dtype == np.float32 and got.shape == (len(a), len(b))
    np.testing.assert_array_equal(got, box_iou_ref(a, b))
    assert not np.isnan(got).any()
    assert ((got >= 0) & (got <= 1)).all()


@SETTINGS
@given(scored_boxes(), thresholds)
def test_nms_matches_reference(case, thr):
    boxes, scores = case
    got = nms(boxes, scores, thr)
    assert got.dtype == np.int64 and got.ndim == 1
    np.testing.assert_array_equal(got, nms_ref(boxes, scores, thr))


@SETTINGS
@given(scored_boxes(), st.floats(0, 1))
def test_nms_invariants(case, thr):
    boxes, scores = case
    keep = nms(boxes, scores, thr)
    assert len(set(keep.tolist())) == len(keep)
    assert not np.isnan(scores[keep]).any()
    s = scores[keep]
    # descending score; equal scores in ascending index order
    assert all(s[i] > s[i + 1] or (s[i] == s[i + 1] and keep[i] < keep[i + 1]) for i in range(len(keep) - 1))
    iou = box_iou(boxes[keep], boxes[keep])
    np.fill_diagonal(iou, 0)
    assert (iou <= np.float32(thr) + 1e-6).all()  # no two kept boxes overlap past the threshold
    # every non-NaN-score box that was dropped overlaps a kept box with a higher rank
    dropped = set(np.flatnonzero(~np.isnan(scores)).tolist()) - set(keep.tolist())
    for i in dropped:
        assert box_iou_ref(boxes[i : i + 1], boxes[keep]).max() >= np.float32(thr)


def test_box_iou_parallel_path_matches_reference():
    rng = np.random.default_rng(0)
    a = xywh_to_xyxy(rng.uniform([0, 0, -2, -2], [100, 100, 30, 30], size=(300, 4)))
    b = xywh_to_xyxy(rng.uniform([0, 0, -2, -2], [100, 100, 30, 30], size=(257, 4)))
    a[::17, 1] = np.nan
    b[::13, 2] = np.inf
    got = box_iou(a, b)
    np.testing.assert_array_equal(got, box_iou_ref(a, b))
    assert not np.isnan(got).any()
    assert (got[::17] == 0).all()


def test_nms_large_clustered_matches_reference():
    rng = np.random.default_rng(1)
    centers = rng.uniform(0, 500, size=(20, 2))
    sizes = rng.uniform(10, 60, size=(20, 2))
    obj = rng.integers(0, 20, size=1000)
    xy = centers[obj] + rng.normal(0, 3, size=(1000, 2))
    wh = sizes[obj] * rng.uniform(0.8, 1.2, size=(1000, 2))
    boxes = xywh_to_xyxy(np.hstack([xy, wh]))
    scores = rng.random(1000).astype(np.float32)
    for thr in (0.3, 0.5, 0.7):
        np.testing.assert_array_equal(nms(boxes, scores, thr), nms_ref(boxes, scores, thr))


# ---------------------------------------------------------------------------------------------------------
# Edge cases


def test_empty_inputs():
    empty = np.zeros((0, 4), dtype=np.float32)
    some = np.array([[0, 0, 1, 1], [1, 1, 2, 3]], dtype=np.float32)
    for a, b, shape in [(empty, some, (0, 2)), (some, empty, (2, 0)), (empty, empty, (0, 0))]:
        out = box_iou(a, b)
        assert out.shape == shape and out.dtype == np.float32
        assert box_iou_ref(a, b).shape == shape
    keep = nms(empty, np.zeros(0, dtype=np.float32), 0.5)
    assert keep.shape == (0,) and keep.dtype == np.int64
    assert nms([], [], 0.5).shape == (0,)
    assert nms_ref(empty, np.zeros(0), 0.5).shape == (0,)


def test_identical_boxes():
    boxes = np.tile(np.array([[1.5, 2.0, 7.25, 9.0]], dtype=np.float32), (5, 1))
    iou = box_iou(boxes, boxes)
    assert (iou == 1.0).all()
    assert nms(boxes, np.full(5, 0.3, dtype=np.float32), 0.5).tolist() == [0]
    assert nms(boxes, np.array([0.1, 0.3, 0.3, 0.2, 0.3], dtype=np.float32), 0.5).tolist() == [1]
    # IoU 1 is not > 1: with threshold 1 nothing is suppressed
    assert nms(boxes, np.full(5, 0.3, dtype=np.float32), 1.0).tolist() == [0, 1, 2, 3, 4]


def test_zero_area_and_inverted_boxes():
    degenerate = np.array(
        [[1, 1, 1, 5], [1, 1, 5, 1], [3, 3, 3, 3], [5, 5, 1, 1], [5, 1, 1, 5], [1, 5, 5, 1]], dtype=np.float32
    )
    normal = np.array([[0, 0, 6, 6], [2, 2, 4, 4]], dtype=np.float32)
    both = np.vstack([degenerate, normal])
    iou = box_iou(degenerate, both)
    assert (iou == 0).all()
    np.testing.assert_array_equal(iou, box_iou_ref(degenerate, both))
    scores = np.linspace(1, 0.1, len(both)).astype(np.float32)
    # the degenerate boxes rank first yet suppress nothing, and are not suppressed by the normal ones
    assert nms(both, scores, 0.0).tolist() == [0, 1, 2, 3, 4, 5, 6]  # box 7 lies inside box 6: IoU 1/9 > 0
    assert nms(both, scores, 0.2).tolist() == list(range(8))


def test_nan_scores_are_dropped():
    boxes = np.array([[0, 0, 1, 1], [10, 10, 11, 11], [20, 20, 21, 21], [0, 0, 1, 1]], dtype=np.float32)
    scores = np.array([np.nan, 0.5, np.nan, 0.1], dtype=np.float32)
    # box 0 has a NaN score: dropped, and so it does not suppress its twin, box 3
    assert nms(boxes, scores, 0.5).tolist() == [1, 3]
    assert nms(boxes, np.full(4, np.nan, dtype=np.float32), 0.5).tolist() == []
    assert nms_ref(boxes, scores, 0.5).tolist() == [1, 3]


def test_nan_coordinates_give_zero_iou():
    boxes = np.array(
        [[0, 0, 10, 10], [np.nan, 0, 10, 10], [0, 0, 10, np.nan], [0, 0, 10, 10]], dtype=np.float32
    )
    iou = box_iou(boxes, boxes)
    assert not np.isnan(iou).any()
    np.testing.assert_array_equal(iou[1:3], 0)
    np.testing.assert_array_equal(iou[:, 1:3], 0)
    assert iou[0, 3] == 1.0
    np.testing.assert_array_equal(iou, box_iou_ref(boxes, boxes))
    scores = np.array([0.9, 0.8, 0.7, 0.6], dtype=np.float32)
    # the NaN boxes neither suppress nor are suppressed; box 3 is suppressed by box 0
    assert nms(boxes, scores, 0.5).tolist() == [0, 1, 2]
    assert nms(boxes, scores[::-1].copy(), 0.5).tolist() == [3, 2, 1]
    assert nms_ref(boxes, scores, 0.5).tolist() == [0, 1, 2]


def test_inf_scores_are_ordinary():
    boxes = np.array([[0, 0, 1, 1], [5, 5, 6, 6], [0, 0, 1, 1], [9, 9, 10, 10]], dtype=np.float32)
    scores = np.array([-np.inf, 0.0, np.inf, -np.inf], dtype=np.float32)
    assert nms(boxes, scores, 0.5).tolist() == [2, 1, 3]
    assert nms(boxes, scores, 1.0).tolist() == [2, 1, 0, 3]
    assert nms_ref(boxes, scores, 1.0).tolist() == [2, 1, 0, 3]


def test_infinite_coordinates_give_no_nan():
    boxes = np.array([[-np.inf, 0, np.inf, 1], [0, 0, 1, 1], [0, -np.inf, 1, 1]], dtype=np.float32)
    iou = box_iou(boxes, boxes)
    assert not np.isnan(iou).any()
    np.testing.assert_array_equal(iou, box_iou_ref(boxes, boxes))


def test_ties_go_to_lower_index():
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 10.5], [20, 0, 30, 10], [20, 0, 30, 10.5]], dtype=np.float32)
    scores = np.array([0.5, 0.5, 0.5, 0.5], dtype=np.float32)
    assert nms(boxes, scores, 0.5).tolist() == [0, 2]
    assert nms(boxes, scores, 0.99).tolist() == [0, 1, 2, 3]
    assert nms(boxes[::-1].copy(), scores, 0.5).tolist() == [0, 2]


def test_accepts_array_likes_and_other_dtypes():
    boxes64 = np.array([[0, 0, 2, 2], [1, 1, 3, 3], [0, 0, 2, 2.1]], dtype=np.float64)
    scores = [3, 2, 1]
    expected = nms(boxes64.astype(np.float32), np.array(scores, dtype=np.float32), 0.5)
    assert nms(boxes64, scores, 0.5).tolist() == expected.tolist() == [0, 1]
    assert nms(boxes64.tolist(), np.array(scores, dtype=np.int32), np.float32(0.5)).tolist() == [0, 1]
    assert nms(np.asfortranarray(boxes64), scores, 0.5).tolist() == [0, 1]
    strided = np.zeros((3, 8))
    strided[:, ::2] = boxes64
    assert nms(strided[:, ::2], scores, 0.5).tolist() == [0, 1]  # non-contiguous view
    iou = box_iou(boxes64.tolist(), boxes64.astype(np.float16))
    assert iou.dtype == np.float32 and iou.shape == (3, 3)
    assert iou[0, 1] == np.float32(1 / 7)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: box_iou(np.zeros((3, 5)), np.zeros((2, 4))), r"a must have shape \(N, 4\).*\(3, 5\)"),
        (lambda: box_iou(np.zeros((3, 4)), np.zeros(4)), r"b must have shape \(N, 4\).*\(4,\)"),
        (lambda: box_iou(np.zeros((2, 2, 4)), np.zeros((2, 4))), r"a must have shape.*\(2, 2, 4\)"),
        (lambda: box_iou(np.array([["a", "b", "c", "d"]]), np.zeros((1, 4))), r"a must hold real numbers"),
        (lambda: nms(np.zeros((3, 3)), np.zeros(3), 0.5), r"boxes must have shape \(N, 4\).*\(3, 3\)"),
        (lambda: nms(np.zeros((3, 4)), np.zeros((3, 1)), 0.5), r"scores must have shape \(N,\).*\(3, 1\)"),
        (lambda: nms(np.zeros((3, 4)), np.zeros(2), 0.5), r"one entry per box.*\(3, 4\).*\(2,\)"),
        (lambda: nms(np.zeros((3, 4)), np.zeros(3), float("nan")), r"iou_threshold must be a finite"),
        (lambda: nms(np.zeros((3, 4)), np.zeros(3), float("inf")), r"iou_threshold must be a finite"),
        (lambda: nms(np.zeros((3, 4)), np.zeros(3), "0.5"), r"iou_threshold must be a finite"),
        (lambda: nms(np.zeros((3, 4)), np.zeros(3), None), r"iou_threshold must be a finite"),
    ],
)
def test_input_validation(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# ---------------------------------------------------------------------------------------------------------
# Against onnxruntime's NonMaxSuppression operator


@pytest.fixture(scope="module")
def ort_nms():
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [
            helper.make_node(
                "NonMaxSuppression",
                ["boxes", "scores", "max_out", "iou_threshold"],
                ["selected"],
                center_point_box=0,
            )
        ],
        "nms",
        [
            helper.make_tensor_value_info("boxes", TensorProto.FLOAT, [1, None, 4]),
            helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, 1, None]),
            helper.make_tensor_value_info("max_out", TensorProto.INT64, [1]),
            helper.make_tensor_value_info("iou_threshold", TensorProto.FLOAT, [1]),
        ],
        [helper.make_tensor_value_info("selected", TensorProto.INT64, [None, 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])

    def run(boxes: np.ndarray, scores: np.ndarray, thr: float) -> np.ndarray:
        # ORT reads [y1, x1, y2, x2]; IoU is unchanged by swapping the axes, so xyxy gives the same answer.
        selected = session.run(
            None,
            {
                "boxes": boxes[None].astype(np.float32),
                "scores": scores[None, None].astype(np.float32),
                "max_out": np.array([len(boxes)], dtype=np.int64),
                "iou_threshold": np.array([thr], dtype=np.float32),
            },
        )[0]
        return selected[:, 2]

    return run


@pytest.mark.parametrize("seed", range(12))
def test_nms_matches_onnxruntime(ort_nms, seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 400))
    if seed % 2:  # clustered: a few objects, many jittered boxes each
        objects = rng.uniform([0, 0, 10, 10], [200, 200, 60, 60], size=(max(1, n // 20), 4))
        xywh = objects[rng.integers(0, len(objects), size=n)] + rng.normal(0, 3, size=(n, 4))
        xywh[:, 2:] = np.abs(xywh[:, 2:]) + 1
    else:
        xywh = rng.uniform([0, 0, 1, 1], [300, 300, 60, 60], size=(n, 4))
    boxes = xywh_to_xyxy(xywh)
    scores = rng.permutation(n).astype(np.float32) / n  # distinct: no ties
    iou = box_iou_ref(boxes, boxes).astype(np.float64)
    checked = 0
    for thr in (0.2, 0.45, 0.5, 0.7, 0.9, 0.3333, 0.6123, 0.8123):
        # ORT computes IoU in float32; keep clear of pairs within rounding distance of the threshold
        if np.any(np.abs(iou - thr) < 2e-6):
            continue
        checked += 1
        expected = ort_nms(boxes, scores, thr)
        got = nms(boxes, scores, thr)
        np.testing.assert_array_equal(np.sort(got), np.sort(expected))
        np.testing.assert_array_equal(got, expected)  # ORT also lists them by descending score
    assert checked >= 4
