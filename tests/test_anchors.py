"""k-means anchors over box sizes with distance 1 - IoU, their fit report, and the split over scales."""

import logging

import numpy as np
import pytest

from dlc.compiler.data.detection import make_detection_shapes
from dlc.compiler.detect.anchors import anchor_fit, kmeans_anchors, split_anchors
from dlc.compiler.errors import DlcError

PLANTED = np.array([[8, 10], [30, 18], [60, 80]], np.float64)


def planted_boxes(seed=0, n=200, spread=0.05):
    rng = np.random.default_rng(seed)
    wh = np.concatenate([size * rng.uniform(1 - spread, 1 + spread, (n, 2)) for size in PLANTED])
    return rng.permutation(wh)


def iou_direct(a, b):
    """Centre-aligned IoU of two (w, h), written out."""
    inter = min(a[0], b[0]) * min(a[1], b[1])
    return inter / (a[0] * a[1] + b[0] * b[1] - inter)


def test_kmeans_recovers_planted_sizes():
    wh = planted_boxes()
    anchors, mean_iou = kmeans_anchors(wh, 3, seed=1)
    assert anchors.dtype == np.float32 and anchors.shape == (3, 2)
    np.testing.assert_allclose(anchors, PLANTED, rtol=0.03)
    assert mean_iou > 0.9
    assert mean_iou == pytest.approx(np.mean([max(iou_direct(b, a) for a in anchors) for b in wh]), rel=1e-6)
    # sorted by area, and every seed finds the same well-separated clusters
    areas = anchors.prod(1)
    assert (np.diff(areas) > 0).all()
    for seed in range(4):
        np.testing.assert_allclose(kmeans_anchors(wh, 3, seed=seed)[0], anchors, rtol=1e-6)


def test_kmeans_is_deterministic_and_better_than_fewer_anchors():
    data = make_detection_shapes(300, 4, (3, 48, 48), seed=3)
    boxes = np.concatenate(data.boxes)
    wh = boxes[:, 2:] - boxes[:, :2]
    a1, m1 = kmeans_anchors(wh, 6, seed=7)
    a2, m2 = kmeans_anchors(wh, 6, seed=7)
    np.testing.assert_array_equal(a1, a2)
    assert m1 == m2
    _, m_few = kmeans_anchors(wh, 2, seed=7)
    assert m1 > m_few > 0.3
    # one anchor: the median box of the whole set is a fixed point of the iteration
    one, _ = kmeans_anchors(wh, 1)
    np.testing.assert_allclose(one[0], np.median(wh, axis=0), rtol=1e-6)


def test_kmeans_ties_and_duplicates():
    # exactly k distinct sizes, heavily repeated: the anchors are those sizes and fit perfectly
    wh = np.array([[4, 4]] * 10 + [[16, 8]] * 5, np.float32)
    anchors, mean_iou = kmeans_anchors(wh, 2)
    np.testing.assert_array_equal(anchors, [[4, 4], [16, 8]])
    assert mean_iou == 1.0
    with pytest.raises(DlcError, match="only 2 distinct sizes, fewer than the 3 anchors"):
        kmeans_anchors(wh, 3)
    # a box exactly between two anchors (IoU 0.5 with both) counts for the first one
    fit = anchor_fit(np.array([[2, 2]]), np.array([[2, 1], [1, 2]]))
    assert fit["per_anchor_count"] == [1, 0] and fit["mean_best_iou"] == 0.5 and fit["recall_at_0.5"] == 0.0


def test_kmeans_errors_and_invalid_boxes(caplog):
    with pytest.raises(DlcError, match="2 valid boxes are fewer than the 3 anchors"):
        kmeans_anchors(np.array([[1, 2], [3, 4]]), 3)
    with pytest.raises(DlcError, match="none of the 2 boxes has a positive, finite width and height"):
        kmeans_anchors(np.array([[0, 2], [3, -1]]), 1)
    with pytest.raises(DlcError, match=r"\(N, 2\) array"):
        kmeans_anchors(np.zeros((4, 3)), 1)
    with pytest.raises(DlcError, match="k must be a positive integer"):
        kmeans_anchors(planted_boxes(), 0)
    wh = np.concatenate([planted_boxes(), [[0, 5], [np.nan, 3], [4, -2]]])
    with caplog.at_level(logging.WARNING, logger="dlc.detect"):
        anchors, _ = kmeans_anchors(wh, 3, seed=1)
    assert "ignoring 3 of 603 boxes" in caplog.text
    np.testing.assert_allclose(anchors, PLANTED, rtol=0.03)


def test_anchor_fit_matches_a_direct_computation():
    rng = np.random.default_rng(5)
    wh = rng.uniform(2, 40, (50, 2))
    anchors = np.array([[5, 6], [12, 30], [30, 12], [35, 35]], np.float64)
    fit = anchor_fit(wh, anchors)
    best = [max(iou_direct(b, a) for a in anchors) for b in wh]
    which = [int(np.argmax([iou_direct(b, a) for a in anchors])) for b in wh]
    assert fit["mean_best_iou"] == pytest.approx(np.mean(best), rel=1e-12)
    assert fit["recall_at_0.5"] == pytest.approx(np.mean(np.array(best) > 0.5), rel=1e-12)
    assert fit["per_anchor_count"] == [which.count(k) for k in range(4)]
    with pytest.raises(DlcError, match="anchors must be a"):
        anchor_fit(wh, np.array([[1, 0]]))


def test_split_anchors_over_scales():
    anchors = np.array([[30, 40], [2, 3], [10, 14], [5, 4], [60, 50], [12, 8]], np.float32)
    assert split_anchors(anchors, 3) == [[[2, 3], [5, 4]], [[12, 8], [10, 14]], [[30, 40], [60, 50]]]
    assert split_anchors(anchors, 1) == [[[2, 3], [5, 4], [12, 8], [10, 14], [30, 40], [60, 50]]]
    with pytest.raises(DlcError, match="6 anchors do not split evenly over 4 scales"):
        split_anchors(anchors, 4)
