"""The grid NMS, batched NMS, Soft-NMS, GIoU/DIoU/CIoU and filter_detections (dlc.runtime.boxes) against the
numpy references in dlc._C.boxes_ref, hand-computed values, torch formulas and onnxruntime."""

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dlc._C import boxes as native
from dlc._C.boxes_ref import (
    batched_nms_ref,
    box_iou_ref,
    filter_detections_ref,
    nms_ref,
    soft_nms_ref,
)
from dlc.compiler.errors import DlcError
from dlc.runtime import batched_nms, box_iou, filter_detections, nms, soft_nms

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
KINDS = ["iou", "giou", "diou", "ciou"]


def random_boxes(rng, n, extent=1000.0, lo=10.0, hi=100.0):
    xy = rng.uniform(0, extent, size=(n, 2))
    wh = rng.uniform(lo, hi, size=(n, 2))
    return np.hstack([xy, xy + wh]).astype(np.float32)


def clustered_boxes(rng, objects, per_object, jitter=4.0):
    xy = rng.uniform(0, 900, size=(objects, 2))
    wh = rng.uniform(20, 100, size=(objects, 2))
    xy = np.repeat(xy, per_object, axis=0) + rng.normal(0, jitter, size=(objects * per_object, 2))
    wh = np.repeat(wh, per_object, axis=0) * rng.uniform(0.85, 1.15, size=(objects * per_object, 2))
    return np.hstack([xy, xy + wh]).astype(np.float32)


def greedy_fast(boxes, scores, thr):
    """Plain greedy NMS, vectorised over the kept boxes, with `_iou_one`'s float64 operations in the same
    order (so identical IoU values): an independent check of the grid for inputs too big for nms_ref."""
    b = boxes.astype(np.float64)
    area = np.maximum(0.0, b[:, 2] - b[:, 0]) * np.maximum(0.0, b[:, 3] - b[:, 1])
    order = sorted((i for i in range(len(scores)) if not np.isnan(scores[i])), key=lambda i: -scores[i])
    keep = []
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        for i in order:
            if keep:
                k = b[keep]
                w = np.maximum(0.0, np.minimum(b[i, 2], k[:, 2]) - np.maximum(b[i, 0], k[:, 0]))
                h = np.maximum(0.0, np.minimum(b[i, 3], k[:, 3]) - np.maximum(b[i, 1], k[:, 1]))
                inter = w * h
                union = area[i] + area[keep] - inter
                iou = np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)
                iou[np.isnan(iou)] = 0.0
                if (iou > thr).any():
                    continue
            keep.append(i)
    return np.asarray(keep, dtype=np.int64)


# ---------------------------------------------------------------------------------------------------------
# Grid NMS: identical to the plain greedy scan on every input


scales = st.sampled_from([1.0, 1e-30, 1e-6, 1e6, 1e30, 3e37])
offsets = st.sampled_from([0.0, -1e6, 5e5, -1e30])


@st.composite
def grid_cases(draw):
    """Enough boxes (> 48 with a positive area) for the grid to be built, at wild scales and offsets,
    with duplicates, degenerate, NaN and inf boxes mixed in, and tied or infinite scores."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    n = draw(st.integers(50, 260))
    layout = draw(st.sampled_from(["random", "clustered", "duplicates", "mixed-size"]))
    if layout == "random":
        boxes = random_boxes(rng, n, extent=draw(st.sampled_from([50.0, 1000.0])))
    elif layout == "clustered":
        boxes = clustered_boxes(
            rng, draw(st.integers(1, 6)), n, jitter=draw(st.sampled_from([0.0, 1.0, 5.0]))
        )[:n]
    elif layout == "duplicates":
        boxes = np.repeat(random_boxes(rng, draw(st.integers(1, 5))), n, axis=0)[:n]
    else:  # a few huge boxes among tiny ones: the "always check" list
        boxes = random_boxes(rng, n, extent=1000.0, lo=0.5, hi=4.0)
        big = rng.random(n) < 0.1
        boxes[big] = random_boxes(rng, int(big.sum()), extent=200.0, lo=300.0, hi=900.0)
    with np.errstate(over="ignore"):  # 3e37 * 1000 overflows float32 to inf: one more adversarial case
        boxes = (boxes.astype(np.float64) * draw(scales) + draw(offsets)).astype(np.float32)
    special = rng.random(n)
    boxes[special < 0.03, 0] = np.nan
    boxes[(special >= 0.03) & (special < 0.05), 2] = np.inf
    boxes[(special >= 0.05) & (special < 0.07), 0] = -np.inf
    inverted = (special >= 0.07) & (special < 0.1)
    boxes[inverted] = boxes[inverted][:, [2, 3, 0, 1]]
    if draw(st.booleans()):
        scores = rng.choice(
            np.array([0.0, -0.0, 0.25, 0.5, 1.0, np.inf, -np.inf, np.nan], dtype=np.float32), n
        )
    else:
        scores = rng.random(n).astype(np.float32)
    return boxes, scores


grid_thresholds = st.sampled_from([0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0, -0.5, 1.5, 5e-324, 1e-300]) | st.floats(
    0.0, 1.0
)


@SETTINGS
@given(grid_cases(), grid_thresholds)
def test_grid_nms_matches_greedy_reference(case, thr):
    boxes, scores = case
    got = nms(boxes, scores, thr)
    np.testing.assert_array_equal(got, nms_ref(boxes, scores, thr))


@pytest.mark.parametrize("cell_scale, big_cells", [(1.0, 64), (0.05, 1), (0.3, 4), (7.0, 64), (1e9, 64)])
def test_grid_tuning_never_changes_the_result(cell_scale, big_cells):
    rng = np.random.default_rng(3)
    boxes = np.vstack([random_boxes(rng, 1500), clustered_boxes(rng, 20, 50)])
    scores = rng.random(len(boxes)).astype(np.float32)
    for thr in (0.0, 0.3, 0.5, 0.8):
        expected = greedy_fast(boxes, scores, thr)
        np.testing.assert_array_equal(native.nms(boxes, scores, thr, cell_scale, big_cells), expected)


def test_grid_nms_large_inputs_match_plain_greedy():
    rng = np.random.default_rng(4)
    for boxes in (random_boxes(rng, 3000), clustered_boxes(rng, 30, 100)):
        scores = rng.random(len(boxes)).astype(np.float32)
        for thr in (0.45, 0.7):
            np.testing.assert_array_equal(nms(boxes, scores, thr), greedy_fast(boxes, scores, thr))


def test_thresholds_at_the_extremes():
    rng = np.random.default_rng(5)
    boxes = clustered_boxes(rng, 5, 40)
    scores = rng.random(len(boxes)).astype(np.float32)
    best = int(np.argmax(scores))
    assert nms(boxes, scores, -0.01).tolist() == [best]  # every IoU (>= 0) exceeds a negative threshold
    assert sorted(nms(boxes, scores, 1.0).tolist()) == list(range(len(boxes)))  # IoU <= 1: none suppressed
    zero = nms(boxes, scores, 0.0)  # any positive overlap suppresses
    iou = box_iou(boxes[zero], boxes[zero])
    np.fill_diagonal(iou, 0)
    assert (iou == 0).all()
    np.testing.assert_array_equal(zero, nms_ref(boxes, scores, 0.0))


def test_many_identical_boxes_keep_the_lowest_index():
    boxes = np.tile(np.array([[10, 10, 20, 20]], dtype=np.float32), (500, 1))
    scores = np.full(500, 0.5, dtype=np.float32)
    scores[[7, 300]] = 0.9
    assert nms(boxes, scores, 0.5).tolist() == [7]
    assert batched_nms(boxes, scores, np.arange(500) % 3, 0.5).tolist() == [7, 300, 2]  # classes 1, 0, 2


def test_infinite_scores_rank_first_and_last():
    boxes = random_boxes(np.random.default_rng(6), 60, extent=5000.0)  # far apart: nothing suppressed
    scores = np.linspace(0, 1, 60).astype(np.float32)
    scores[10], scores[20] = -np.inf, np.inf
    keep = nms(boxes, scores, 0.5)
    assert keep[0] == 20 and keep[-1] == 10 and len(keep) == 60
    # -0.0 and 0.0 are the same score: the lower index first
    s = np.array([-0.0, 0.0, 0.0, -0.0], dtype=np.float32)
    far = np.array([[0, 0, 1, 1], [5, 5, 6, 6], [9, 9, 10, 10], [20, 20, 21, 21]], dtype=np.float32)
    assert nms(far, s[::-1].copy(), 0.5).tolist() == [0, 1, 2, 3]


# ---------------------------------------------------------------------------------------------------------
# batched_nms


@SETTINGS
@given(
    grid_cases(),
    st.sampled_from([0.0, 0.3, 0.5, 0.7, 1.0, -0.1]),
    st.integers(1, 9),
    st.integers(0, 2**32 - 1),
)
def test_batched_nms_matches_per_class_reference(case, thr, num_classes, seed):
    boxes, scores = case
    classes = np.random.default_rng(seed).integers(-4, num_classes, size=len(boxes))
    np.testing.assert_array_equal(
        batched_nms(boxes, scores, classes, thr), batched_nms_ref(boxes, scores, classes, thr)
    )


@pytest.mark.parametrize("dtype", [np.int8, np.uint8, np.int16, np.int32, np.int64, np.uint32, np.uint64])
def test_batched_nms_class_dtypes(dtype):
    rng = np.random.default_rng(7)
    boxes = clustered_boxes(rng, 8, 30)
    scores = rng.random(len(boxes)).astype(np.float32)
    labels = rng.integers(0, 4, size=len(boxes))
    expected = batched_nms_ref(boxes, scores, labels, 0.5)
    info = np.iinfo(dtype)
    for ids in (labels, labels * (info.max // 4) + (info.min if info.min < 0 else 0)):  # wide, sparse ids
        np.testing.assert_array_equal(batched_nms(boxes, scores, ids.astype(dtype), 0.5), expected)


def test_batched_nms_is_exact_where_coordinate_offsets_fail():
    # torchvision's trick offsets class c by c * (max coordinate + 1): at 3e37 the offsets overflow float32
    # to inf, and near 1e7 they round the boxes. Grouping natively has neither problem.
    rng = np.random.default_rng(8)
    for scale in (3e37, 1e7):
        boxes = (clustered_boxes(rng, 6, 20).astype(np.float64) / 1000 * scale).astype(np.float32)
        scores = rng.random(len(boxes)).astype(np.float32)
        classes = rng.integers(0, 80, size=len(boxes))
        got = batched_nms(boxes, scores, classes, 0.5)
        np.testing.assert_array_equal(got, batched_nms_ref(boxes, scores, classes, 0.5))
        per_class = [np.flatnonzero(classes == c) for c in np.unique(classes)]
        for members in per_class:
            mine = [i for i in got if classes[i] == classes[members[0]]]
            assert mine == members[nms(boxes[members], scores[members], 0.5)].tolist()


def greedy_fast_batched(boxes, scores, classes, thr):
    """Per-class `greedy_fast`, merged by descending score (ties: lower index): the batched NMS result."""
    members = [np.flatnonzero(classes == c) for c in np.unique(classes)]
    kept = np.concatenate([m[greedy_fast(boxes[m], scores[m], thr)] for m in members])
    return kept[np.lexsort((kept, -scores[kept].astype(np.float64)))]


@pytest.mark.parametrize("cell_scale", [0.1, 1.0, 8.0])
def test_batched_nms_many_classes_at_scale(cell_scale):
    # 40 classes of ~100 boxes each get their own grids: with small cells a class has fewer boxes than cells
    # (kept boxes stored once, candidates read all their cells), with large ones more (the other way round);
    # with many cells per box and no big list, one cell's list overflows its chunk and the arena grows.
    rng = np.random.default_rng(11)
    boxes = np.vstack([random_boxes(rng, 2000), clustered_boxes(rng, 20, 100)])
    scores = rng.random(len(boxes)).astype(np.float32)
    classes = rng.integers(0, 40, size=len(boxes))
    for thr in (0.0, 0.3, 0.5, 0.8):
        expected = greedy_fast_batched(boxes, scores, classes, thr)
        got = native.batched_nms(boxes, scores, classes.astype(np.int64), 40, thr, cell_scale, 10**6)
        np.testing.assert_array_equal(got, expected)
        if cell_scale == 1.0:
            np.testing.assert_array_equal(batched_nms(boxes, scores, classes, thr), expected)


@pytest.mark.parametrize("cell_scale", [0.1, 2.0])
def test_single_class_grid_both_layouts_without_big_list(cell_scale):
    # 3000 boxes: with cell_scale 0.1 the grid has more cells than boxes, with 2.0 far fewer (dozens of
    # kept boxes per cell, chained over several chunks)
    rng = np.random.default_rng(12)
    boxes = np.vstack([random_boxes(rng, 2000), clustered_boxes(rng, 10, 100)])
    scores = rng.random(len(boxes)).astype(np.float32)
    for thr in (0.0, 0.5, 0.8):
        got = native.nms(boxes, scores, thr, cell_scale, 10**6)
        np.testing.assert_array_equal(got, greedy_fast(boxes, scores, thr))


def test_grid_arena_grows_when_kept_boxes_fill_many_cells():
    # 6000 boxes over 72 x 72 cells of ~14 px, each kept box stored in the ~25 cells it covers: ~26000 chunks,
    # more than any other test's boxes, so the chunk arena is reallocated in the middle of the scan
    rng = np.random.default_rng(13)
    boxes = random_boxes(rng, 6000)
    scores = rng.random(len(boxes)).astype(np.float32)
    by_score = np.lexsort((np.arange(len(boxes)), -scores.astype(np.float64)))
    np.testing.assert_array_equal(native.nms(boxes, scores, 1.0, 0.25, 10**6), by_score)  # nothing suppressed
    np.testing.assert_array_equal(native.nms(boxes, scores, 0.7, 0.25, 10**6), greedy_fast(boxes, scores, 0.7))


def test_batched_nms_hand_values():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [0, 0, 10, 10], [50, 50, 60, 60]], dtype=np.float32)
    scores = np.array([0.9, 0.8, 0.85, 0.1], dtype=np.float32)
    assert batched_nms(boxes, scores, [0, 0, 1, 1], 0.5).tolist() == [
        0,
        2,
        3,
    ]  # 1 suppressed by 0 (same class)
    assert batched_nms(boxes, scores, [0, 1, 2, 3], 0.5).tolist() == [0, 2, 1, 3]
    assert nms(boxes, scores, 0.5).tolist() == [0, 3]
    assert batched_nms([], [], [], 0.5).shape == (0,)


@pytest.fixture(scope="module")
def ort_nms():
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper

    node = helper.make_node(
        "NonMaxSuppression",
        ["boxes", "scores", "max_out", "iou", "score_thr"],
        ["selected"],
        center_point_box=0,
    )
    graph = helper.make_graph(
        [node],
        "nms",
        [
            helper.make_tensor_value_info("boxes", TensorProto.FLOAT, [1, None, 4]),
            helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, None, None]),
            helper.make_tensor_value_info("max_out", TensorProto.INT64, [1]),
            helper.make_tensor_value_info("iou", TensorProto.FLOAT, [1]),
            helper.make_tensor_value_info("score_thr", TensorProto.FLOAT, [1]),
        ],
        [helper.make_tensor_value_info("selected", TensorProto.INT64, [None, 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])

    def run(boxes, class_scores, thr):
        return session.run(
            None,
            {
                "boxes": boxes[None],
                "scores": class_scores[None].astype(np.float32),
                "max_out": np.array([len(boxes)], dtype=np.int64),
                "iou": np.array([thr], dtype=np.float32),
                "score_thr": np.array([-0.5], dtype=np.float32),  # ORT keeps score > this: drops the -1 rows
            },
        )[0]

    return run


@pytest.mark.parametrize("seed", range(6))
def test_batched_nms_matches_onnxruntime_per_class_rows(ort_nms, seed):
    rng = np.random.default_rng(seed)
    boxes = np.vstack([clustered_boxes(rng, 10, 30), random_boxes(rng, 200, extent=300.0)])
    n, num_classes = len(boxes), 7
    scores = (rng.permutation(n) / n).astype(np.float32)  # distinct: no ties
    classes = rng.integers(0, num_classes, size=n)
    rows = np.full((num_classes, n), -1.0, dtype=np.float32)
    rows[classes, np.arange(n)] = scores
    iou = box_iou_ref(boxes, boxes).astype(np.float64)
    for thr in (0.3, 0.5, 0.7):
        if np.any(np.abs(iou - thr) < 2e-6):  # ORT's IoU is float32: skip thresholds within rounding
            continue
        selected = ort_nms(boxes, rows, thr)
        got = batched_nms(boxes, scores, classes, thr)
        assert sorted(got.tolist()) == sorted(selected[:, 2].tolist())
        assert (classes[selected[:, 2]] == selected[:, 1]).all()


# ---------------------------------------------------------------------------------------------------------
# Soft-NMS


@SETTINGS
@given(
    grid_cases(),
    st.sampled_from(["linear", "gaussian"]),
    st.sampled_from([0.0, 0.3, 0.5]),
    st.sampled_from([0.1, 0.5, 2.0]),
    st.sampled_from([0.0, 0.001, 0.3, -np.inf]),
)
def test_soft_nms_matches_reference(case, method, thr, sigma, score_thr):
    boxes, scores = case
    boxes, scores = boxes[:120], scores[:120]
    idx, sc = soft_nms(boxes, scores, thr, sigma, method, score_thr)
    ref_idx, ref_sc = soft_nms_ref(boxes, scores, thr, sigma, method, score_thr)
    assert idx.dtype == np.int64 and sc.dtype == np.float32
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_array_equal(sc, ref_sc)
    assert not np.isnan(sc).any()
    if (scores[~np.isnan(scores)] >= 0).all():  # decaying only lowers non-negative scores
        assert (sc[:-1] >= sc[1:]).all()  # selected in non-increasing decayed score


def soft_nms_vectorised(boxes, scores, thr, sigma, method, score_thr):
    """An independent Soft-NMS written the way mmcv's is (arrays, argmax, vectorised weights)."""
    idx = np.arange(len(scores))
    s = scores.astype(np.float64)
    keep = ~np.isnan(s) & (s >= score_thr)
    idx, s = idx[keep], s[keep]
    out_i, out_s = [], []
    while len(idx):
        j = int(np.argmax(s))  # first maximum: the lowest index, as idx stays sorted
        out_i.append(idx[j])
        out_s.append(s[j])
        iou = box_iou(boxes[idx[j]][None], boxes[idx]).astype(np.float64)[0]
        w = np.where(iou > thr, 1 - iou, 1.0) if method == "linear" else np.exp(-(iou**2) / sigma)
        s = s * w
        rest = (np.arange(len(idx)) != j) & (s >= score_thr)
        idx, s = idx[rest], s[rest]
    return np.array(out_i, dtype=np.int64), np.array(out_s, dtype=np.float32)


@pytest.mark.parametrize("method", ["linear", "gaussian"])
def test_soft_nms_against_an_independent_implementation(method):
    rng = np.random.default_rng(11)
    boxes = np.vstack([clustered_boxes(rng, 6, 25), random_boxes(rng, 100, extent=400.0)])
    scores = rng.random(len(boxes)).astype(np.float32)
    idx, sc = soft_nms(boxes, scores, 0.3, 0.5, method, 0.05)
    # the independent version rounds IoU to float32, so the decayed scores agree to float32 precision
    ref_idx, ref_sc = soft_nms_vectorised(boxes, scores, 0.3, 0.5, method, 0.05)
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_allclose(sc, ref_sc, rtol=1e-5)


def test_soft_nms_hand_values():
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 5], [20, 20, 30, 30]], dtype=np.float32)  # IoU(0, 1) = 0.5
    scores = np.array([0.9, 0.8, 0.7], dtype=np.float32)
    idx, sc = soft_nms(boxes, scores, 0.3, 0.5, "linear", 0.001)
    assert idx.tolist() == [0, 2, 1]
    np.testing.assert_allclose(sc, [0.9, 0.7, 0.8 * 0.5], rtol=1e-7)
    idx, sc = soft_nms(boxes, scores, method="gaussian", sigma=0.5)
    assert idx.tolist() == [0, 2, 1]
    np.testing.assert_allclose(sc, [0.9, 0.7, 0.8 * math.exp(-0.25 / 0.5)], rtol=1e-7)
    # linear below its threshold leaves the score alone; a decayed score under score_threshold is dropped
    assert soft_nms(boxes, scores, 0.6, method="linear")[0].tolist() == [0, 1, 2]
    assert soft_nms(boxes, scores, 0.3, 0.5, "linear", 0.5)[0].tolist() == [0, 2]
    # identical boxes: linear weight 0 gives score 0 (also for +inf, never NaN)
    twins = np.array([[0, 0, 4, 4], [0, 0, 4, 4]], dtype=np.float32)
    idx, sc = soft_nms(twins, np.array([np.inf, np.inf], dtype=np.float32), 0.3, 0.5, "linear", 0.0)
    assert idx.tolist() == [0, 1] and sc.tolist() == [np.inf, 0.0]
    empty = soft_nms(np.zeros((0, 4)), np.zeros(0))
    assert empty[0].shape == (0,) and empty[0].dtype == np.int64 and empty[1].dtype == np.float32


# ---------------------------------------------------------------------------------------------------------
# GIoU, DIoU, CIoU


@SETTINGS
@given(grid_cases(), st.sampled_from(KINDS))
def test_iou_kinds_match_reference(case, kind):
    boxes, _ = case
    a, b = boxes[:70], boxes[-40:]
    got = box_iou(a, b, kind)
    np.testing.assert_array_equal(got, box_iou_ref(a, b, kind))
    assert not np.isnan(got).any()
    if kind in ("iou", "giou"):
        assert ((got >= -1) & (got <= 1)).all()
    else:  # diou >= -1 and ciou >= -2 hold for proper boxes (an inverted box's centre may lie outside)
        with np.errstate(invalid="ignore", over="ignore"):
            proper_a = (a[:, 2] > a[:, 0]) & (a[:, 3] > a[:, 1]) & np.isfinite(a).all(1)
            proper_b = (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1]) & np.isfinite(b).all(1)
        sub = got[proper_a][:, proper_b]
        assert ((sub >= (-1 if kind == "diou" else -2)) & (sub <= 1)).all()


def torchvision_kinds(a, b, xp=np):
    """torchvision.ops' generalized/distance/complete box IoU, written out as torchvision writes them (eps
    included), in numpy (xp=np) or in torch (xp=torch): the definitions the native kernel follows."""
    maximum, minimum = (np.maximum, np.minimum) if xp is np else (xp.max, xp.min)
    eps = 1e-7
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    lt = maximum(a[:, None, :2], b[:, :2])
    rb = minimum(a[:, None, 2:], b[:, 2:])
    inter = (rb - lt).clip(min=0).prod(2)
    union = area_a[:, None] + area_b - inter
    iou = inter / union
    lti = minimum(a[:, None, :2], b[:, :2])
    rbi = maximum(a[:, None, 2:], b[:, 2:])
    whi = (rbi - lti).clip(min=0)
    giou = iou - (whi[..., 0] * whi[..., 1] - union) / (whi[..., 0] * whi[..., 1])
    diag = whi[..., 0] ** 2 + whi[..., 1] ** 2 + eps
    ca = (a[:, :2] + a[:, 2:]) / 2
    cb = (b[:, :2] + b[:, 2:]) / 2
    dist = ((ca[:, None, :] - cb[None, :, :]) ** 2).sum(-1)
    diou = iou - dist / diag
    wa, ha = a[:, 2] - a[:, 0], a[:, 3] - a[:, 1]
    wb, hb = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    v = (4 / (xp.pi**2)) * (xp.arctan(wb / hb)[None, :] - xp.arctan(wa / ha)[:, None]) ** 2
    alpha = v / (1 - iou + v + eps)
    ciou = diou - alpha * v
    return {"iou": iou, "giou": giou, "diou": diou, "ciou": ciou}


def _torchvision_boxes():
    rng = np.random.default_rng(12)
    a = np.vstack([random_boxes(rng, 150, extent=300.0, lo=1.0, hi=120.0), clustered_boxes(rng, 3, 10)])
    b = np.vstack([random_boxes(rng, 90, extent=300.0, lo=1.0, hi=120.0), a[:5], a[:3] + 0.5])
    return a, b


def test_iou_kinds_match_torchvision_definitions():
    a, b = _torchvision_boxes()
    expected = torchvision_kinds(a.astype(np.float64), b.astype(np.float64))
    for kind in KINDS:
        np.testing.assert_allclose(box_iou(a, b, kind), expected[kind], rtol=1e-5, atol=2e-6)


def test_numpy_torchvision_definitions_match_torch():
    """The numpy transcription above gives what the same formulas give in torch (skipped without torch)."""
    torch = pytest.importorskip("torch")
    a, b = _torchvision_boxes()
    ours = torchvision_kinds(a.astype(np.float64), b.astype(np.float64))
    theirs = torchvision_kinds(torch.from_numpy(a.astype(np.float64)), torch.from_numpy(b.astype(np.float64)), torch)
    for kind in KINDS:
        np.testing.assert_allclose(ours[kind], theirs[kind].numpy(), rtol=1e-12, atol=1e-15)


def test_iou_kinds_hand_values_and_degenerate_boxes():
    a = np.array([[0, 0, 2, 2]], dtype=np.float32)
    b = np.array([[1, 1, 3, 3], [4, 0, 6, 2], [0, 0, 2, 2], [0, 0, 4, 1]], dtype=np.float32)
    # [1,1,3,3]: iou 1/7, enclosing 3x3 = 9 -> giou 1/7 - 2/9; centres (1,1), (2,2): d² 2, c² 18
    # [4,0,6,2]: iou 0, enclosing 6x2 -> giou -(12 - 8) / 12; centres 4 apart, c² 40
    # [0,0,4,1]: inter 2, union 6, enclosing 4x2 = 8 -> giou 1/3 - 2/8
    np.testing.assert_allclose(
        box_iou(a, b, "giou")[0], [1 / 7 - 2 / 9, -1 / 3, 1.0, 1 / 3 - 2 / 8], rtol=1e-6
    )
    np.testing.assert_allclose(box_iou(a, b, "diou")[0, :3], [1 / 7 - 2 / 18, -16 / 40, 1.0], rtol=1e-6)
    # same aspect ratio -> v = 0 -> ciou == diou; for [0,0,4,1]: v = 4/pi² (atan(4) - atan(1))²
    v = 4 / math.pi**2 * (math.atan(4) - math.atan(1)) ** 2
    iou = 2 / 6
    diou = iou - (1.0 + 0.25) / (16 + 4)
    np.testing.assert_allclose(
        box_iou(a, b, "ciou")[0], [1 / 7 - 2 / 18, -16 / 40, 1.0, diou - v / (1 - iou + v) * v], rtol=1e-6
    )
    # degenerate: zero-area boxes at one point (enclosing area and diagonal 0) give 0 for every kind
    point = np.array([[3, 3, 3, 3], [3, 3, 3, 3]], dtype=np.float32)
    for kind in KINDS:
        assert (box_iou(point, point, kind) == 0).all()
    # two separate points: enclosing area > 0, union 0 -> giou -1; diou = -d² / c² = -1
    two = np.array([[0, 0, 0, 0]], dtype=np.float32), np.array([[3, 4, 3, 4]], dtype=np.float32)
    assert box_iou(*two, "giou")[0, 0] == -1 and box_iou(*two, "diou")[0, 0] == -1
    # NaN coordinates give 0; infinite ones never NaN
    odd = np.array(
        [[np.nan, 0, 1, 1], [0, 0, np.inf, 1], [-np.inf, -np.inf, np.inf, np.inf]], dtype=np.float32
    )
    both = np.vstack([odd, b])
    for kind in KINDS:
        out = box_iou(both, both, kind)
        assert not np.isnan(out).any()
        assert (out[0] == 0).all() and (out[:, 0] == 0).all()
        np.testing.assert_array_equal(out, box_iou_ref(both, both, kind))


def test_iou_kinds_parallel_path():
    rng = np.random.default_rng(13)
    a, b = random_boxes(rng, 300), random_boxes(rng, 257)
    for kind in KINDS:
        np.testing.assert_array_equal(box_iou(a, b, kind), box_iou_ref(a, b, kind))


# ---------------------------------------------------------------------------------------------------------
# filter_detections


@SETTINGS
@given(
    grid_cases(),
    st.integers(0, 2**32 - 1),
    st.fixed_dictionaries(
        {
            "iou_threshold": st.sampled_from([0.3, 0.45, 0.7]),
            "score_threshold": st.sampled_from([0.0, 0.2, -np.inf]),
            "pre_nms_top_k": st.sampled_from([None, 1, 30]),
            "max_detections": st.sampled_from([None, 1, 10]),
            "class_agnostic": st.booleans(),
            "soft": st.sampled_from([None, None, "linear", "gaussian"]),
        }
    ),
)
def test_filter_detections_matches_reference(case, seed, options):
    boxes, scores = case
    classes = np.random.default_rng(seed).integers(0, 5, size=len(boxes))
    keep, kept_scores = filter_detections(boxes, scores, classes, return_scores=True, **options)
    ref_keep, ref_scores = filter_detections_ref(boxes, scores, classes, **options)
    np.testing.assert_array_equal(keep, ref_keep)
    np.testing.assert_array_equal(kept_scores, ref_scores)
    assert keep.dtype == np.int64 and kept_scores.dtype == np.float32
    if options["soft"] is None:
        np.testing.assert_array_equal(kept_scores, scores[keep])
    if options["max_detections"] is not None:
        assert len(keep) <= options["max_detections"]


def test_filter_detections_hand_values():
    boxes = np.array(
        [[0, 0, 10, 10], [1, 1, 11, 11], [0, 0, 10, 10], [50, 50, 60, 60], [80, 80, 90, 90]], dtype=np.float32
    )
    scores = np.array([0.9, 0.8, 0.85, 0.3, 0.2], dtype=np.float32)
    classes = np.array([0, 0, 1, 1, 1])
    assert filter_detections(boxes, scores, classes).tolist() == [0, 2, 3, 4]
    assert filter_detections(boxes, scores, classes, class_agnostic=True).tolist() == [0, 3, 4]
    assert filter_detections(boxes, scores).tolist() == [0, 3, 4]  # no classes: agnostic
    assert filter_detections(boxes, scores, classes, score_threshold=0.3).tolist() == [0, 2]  # strict >
    assert filter_detections(boxes, scores, classes, max_detections=2).tolist() == [0, 2]
    # top-2 before NMS: boxes 0 and 2, one class each
    assert filter_detections(boxes, scores, classes, pre_nms_top_k=2).tolist() == [0, 2]
    assert filter_detections(boxes, scores, classes, iou_threshold=0.9).tolist() == [0, 2, 1, 3, 4]
    keep, s = filter_detections(boxes, scores, soft="linear", iou_threshold=0.5, return_scores=True)
    # box 1 (IoU 81/119 with box 0) decays to 0.256; box 2 (IoU 1) to 0, and stays, last
    assert keep.tolist() == [0, 3, 1, 4, 2]
    np.testing.assert_allclose(s, [0.9, 0.3, 0.8 * (1 - 81 / 119), 0.2, 0.0], rtol=1e-6)
    assert filter_detections(
        boxes, scores, soft="linear", iou_threshold=0.5, score_threshold=0.1
    ).tolist() == [0, 3, 1, 4]
    assert filter_detections(np.zeros((0, 4)), np.zeros(0), np.zeros(0, dtype=np.int64)).shape == (0,)
    nan_scores = scores.copy()
    nan_scores[0] = np.nan
    assert filter_detections(boxes, nan_scores, classes, score_threshold=-np.inf).tolist() == [2, 1, 3, 4]


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: box_iou(np.zeros((2, 4)), np.zeros((2, 4)), "dice"), r"kind must be one of iou, giou"),
        (
            lambda: batched_nms(np.zeros((2, 4)), np.zeros(2), np.zeros(2), 0.5),
            r"class_ids must hold integers",
        ),
        (
            lambda: batched_nms(np.zeros((2, 4)), np.zeros(2), [0, 1, 2], 0.5),
            r"class_ids must have shape \(2,\)",
        ),
        (lambda: soft_nms(np.zeros((2, 4)), np.zeros(2), method="hard"), r"'linear' or 'gaussian'"),
        (lambda: soft_nms(np.zeros((2, 4)), np.zeros(2), sigma=0.0), r"sigma must be > 0"),
        (lambda: soft_nms(np.zeros((2, 4)), np.zeros(2), score_threshold=float("nan")), r"score_threshold"),
        (lambda: filter_detections(np.zeros((2, 4)), np.zeros(2), pre_nms_top_k=0), r"pre_nms_top_k must be"),
        (
            lambda: filter_detections(np.zeros((2, 4)), np.zeros(2), max_detections=2.5),
            r"max_detections must",
        ),
        (lambda: filter_detections(np.zeros((2, 4)), np.zeros(2), soft="hard"), r"'linear' or 'gaussian'"),
        (lambda: filter_detections(np.zeros((2, 4)), np.zeros(3)), r"one entry per box"),
        (lambda: nms(np.zeros((2, 4)), np.zeros(2), True), r"iou_threshold must be a finite"),
    ],
)
def test_input_validation(call, message):
    with pytest.raises(DlcError, match=message):
        call()


def test_concurrent_calls_agree_with_sequential_ones():
    # nms keeps one set of work buffers between calls; a call that finds them in use (another thread is
    # inside the kernel, which runs without the GIL) must use its own and still give the same answer.
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(14)
    cases = []
    for k in range(8):
        boxes = random_boxes(rng, 1500) if k % 2 else clustered_boxes(rng, 15, 100)
        cases.append((boxes, rng.random(len(boxes)).astype(np.float32), rng.integers(0, 5, size=len(boxes))))
    expected = [(nms(b, s, 0.5), batched_nms(b, s, c, 0.5)) for b, s, c in cases]
    with ThreadPoolExecutor(4) as pool:
        results = list(
            pool.map(lambda case: (nms(case[0], case[1], 0.5), batched_nms(*case, 0.5)), cases * 3)
        )
    for (single, batched), (want_single, want_batched) in zip(results, expected * 3):
        np.testing.assert_array_equal(single, want_single)
        np.testing.assert_array_equal(batched, want_batched)


@pytest.mark.parametrize("n", [0, 1, 7, 33, 1000, 20000])
def test_native_score_order_is_a_stable_descending_sort(n):
    rng = np.random.default_rng(n)
    special = np.array([0, -0.0, 1, -1, np.inf, -np.inf, np.nan, 0.5, -2.5e-40, 3e38], dtype=np.float32)
    for scores in (
        rng.random(n).astype(np.float32),
        rng.choice(special, n),
        np.full(n, 0.25, dtype=np.float32),
    ):
        valid = np.flatnonzero(~np.isnan(scores))
        # -s + 0.0 turns -0.0 into 0.0: the two zeros are one score, ties to the lower index
        expected = valid[np.argsort(-scores[valid].astype(np.float64) + 0.0, kind="stable")]
        np.testing.assert_array_equal(native.order_desc(scores), expected)
