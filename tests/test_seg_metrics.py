"""Segmentation metrics from one confusion matrix, on hand-made cases with answers worked out by hand, and
against a plain per-class numpy reference written from mmsegmentation's definitions."""

import numpy as np
import pytest

from dlc.runtime.segmentation_metrics import confusion_matrix, segmentation_metrics


def test_hand_made_case():
    target = np.array([[0, 0, 1, 1],
                       [0, 2, 2, 255]])
    pred = np.array([[0, 1, 1, 1],
                     [0, 2, 0, 2]])
    m = confusion_matrix(pred, target, 3)
    np.testing.assert_array_equal(m, [[2, 1, 0], [0, 2, 0], [1, 0, 1]])
    r = segmentation_metrics(m, ["a", "b", "c"])
    assert r["pixels"] == 7  # the ignored pixel counts for nothing, whatever was predicted there
    assert r["pixel_accuracy"] == pytest.approx(5 / 7)
    iou = [2 / 4, 2 / 3, 1 / 2]  # a: TP 2, label 3, pred 3; b: 2, 2, 3; c: 1, 2, 1
    assert [r["per_class"][k]["iou"] for k in "abc"] == pytest.approx(iou)
    assert r["miou"] == pytest.approx(np.mean(iou))
    assert r["mean_accuracy"] == pytest.approx(np.mean([2 / 3, 1, 1 / 2]))
    assert r["mdice"] == pytest.approx(np.mean([4 / 6, 4 / 5, 2 / 3]))
    assert r["fwiou"] == pytest.approx(3 / 7 * iou[0] + 2 / 7 * iou[1] + 2 / 7 * iou[2])


def test_absent_classes_are_left_out_of_the_means():
    target = np.array([0, 0, 1, 1])
    pred = np.array([0, 0, 1, 0])
    r = segmentation_metrics(confusion_matrix(pred, target, 4))
    assert r["per_class"]["2"]["iou"] is None and r["per_class"]["3"]["accuracy"] is None
    assert r["miou"] == pytest.approx(np.mean([2 / 3, 1 / 2]))
    # a class that is only predicted (never true) has IoU 0, which does count
    r = segmentation_metrics(confusion_matrix(np.array([0, 0, 1, 3]), target, 4))
    assert r["per_class"]["3"]["iou"] == 0 and r["per_class"]["3"]["accuracy"] is None
    assert r["miou"] == pytest.approx(np.mean([1.0, 1 / 2, 0.0]))


def test_against_a_per_class_reference_on_random_maps():
    rng = np.random.default_rng(0)
    c = 5
    target = rng.integers(0, c, (4, 30, 40))
    target[rng.random(target.shape) < 0.1] = 255
    pred = np.where(rng.random(target.shape) < 0.7, np.where(target == 255, 0, target), rng.integers(0, c, target.shape))
    # matrices add: batch by batch equals the whole set
    m = sum(confusion_matrix(pred[i], target[i], c) for i in range(4))
    np.testing.assert_array_equal(m, confusion_matrix(pred, target, c))
    r = segmentation_metrics(m)
    valid = target != 255
    ious, accs, dices = [], [], []
    for k in range(c):
        t, p = (target == k) & valid, (pred == k) & valid
        inter, union = (t & p).sum(), (t | p).sum()
        ious.append(inter / union)
        accs.append(inter / t.sum())
        dices.append(2 * inter / (t.sum() + p.sum()))
    assert r["miou"] == pytest.approx(np.mean(ious), rel=1e-12)
    assert r["mean_accuracy"] == pytest.approx(np.mean(accs), rel=1e-12)
    assert r["mdice"] == pytest.approx(np.mean(dices), rel=1e-12)
    assert r["pixel_accuracy"] == pytest.approx((pred == target)[valid].mean(), rel=1e-12)
    freq = np.array([((target == k) & valid).sum() for k in range(c)]) / valid.sum()
    assert r["fwiou"] == pytest.approx((freq * np.array(ious)).sum(), rel=1e-12)


def test_bad_inputs():
    with pytest.raises(ValueError, match="differ in shape"):
        confusion_matrix(np.zeros(3, int), np.zeros(4, int), 2)
    with pytest.raises(ValueError, match="target classes"):
        confusion_matrix(np.zeros(3, int), np.array([0, 1, 5]), 2)
