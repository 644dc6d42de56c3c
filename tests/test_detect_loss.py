"""The detection loss: anchor assignment, IoU-variant values against a scalar reference, and every gradient
(GIoU, DIoU, CIoU with its aspect term, smooth-L1, BCE, focal, class weights, empty images) against float64
central finite differences."""

import math

import numpy as np
import pytest

from dlc.compiler.detect.loss import LossConfig, bce_logits, box_loss, detection_loss, focal_logits
from dlc.compiler.detect.targets import build_targets

from helpers import numeric_grad


def _scalar_metric(kind, p, t):
    """GIoU / DIoU / CIoU of two (cx, cy, w, h) boxes, written out with Python floats (CIoU as Zheng et al.)."""
    a = (p[0] - p[2] / 2, p[1] - p[3] / 2, p[0] + p[2] / 2, p[1] + p[3] / 2)
    b = (t[0] - t[2] / 2, t[1] - t[3] / 2, t[0] + t[2] / 2, t[1] + t[3] / 2)
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = p[2] * p[3] + t[2] * t[3] - inter
    iou = inter / union
    cw, ch = max(a[2], b[2]) - min(a[0], b[0]), max(a[3], b[3]) - min(a[1], b[1])
    if kind == "giou":
        return iou - (cw * ch - union) / (cw * ch)
    d = iou - ((p[0] - t[0]) ** 2 + (p[1] - t[1]) ** 2) / (cw ** 2 + ch ** 2)
    if kind == "diou":
        return d
    v = 4 / math.pi ** 2 * (math.atan(t[2] / t[3]) - math.atan(p[2] / p[3])) ** 2
    return d - v / (v - iou + 1) * v


def _boxes(rng, n):
    return np.concatenate([rng.uniform(-0.5, 1.5, (n, 2)), rng.uniform(0.3, 3.0, (n, 2))], axis=1)


@pytest.mark.parametrize("kind", ["giou", "diou", "ciou", "smooth_l1"])
def test_box_loss_values_and_gradients(kind):
    rng = np.random.default_rng(0)
    p, t = _boxes(rng, 12), _boxes(rng, 12)
    p[0] = t[0] + [4, 0.3, 0.2, -0.1]  # disjoint: IoU 0, only the penalty terms pull
    loss, grad = box_loss(kind, p, t)
    if kind == "smooth_l1":
        d = np.abs(p - t)
        want = np.where(d < 0.1, 0.5 * d ** 2 / 0.1, d - 0.05).sum(1)
    else:
        want = [1 - _scalar_metric(kind, pi, ti) for pi, ti in zip(p, t)]
    np.testing.assert_allclose(loss, want, rtol=1e-6, atol=1e-6)
    numeric = numeric_grad(lambda q: box_loss(kind, q, t)[0].sum(), p.copy())
    np.testing.assert_allclose(grad, numeric, rtol=1e-5, atol=1e-7)
    assert np.abs(grad[0]).sum() > 0


def test_ciou_aspect_term_has_gradient_even_when_centres_and_areas_agree():
    t = np.array([[0.5, 0.5, 2.0, 1.0]])
    p = np.array([[0.5, 0.5, 1.0, 2.0]])  # same centre and area, other aspect ratio
    _, g_diou = box_loss("diou", p, t)
    _, g_ciou = box_loss("ciou", p, t)
    numeric = numeric_grad(lambda q: box_loss("ciou", q, t)[0].sum(), p.copy())
    np.testing.assert_allclose(g_ciou, numeric, rtol=1e-5, atol=1e-8)
    assert not np.allclose(g_ciou[0, 2:], g_diou[0, 2:])


def test_bce_and_focal_gradients():
    rng = np.random.default_rng(1)
    x = rng.normal(0, 3, 40)
    t = (rng.random(40) < 0.3).astype(np.float64)
    t[::5] = rng.uniform(0, 1, 8)  # soft targets, as obj_target: iou gives
    loss, grad = bce_logits(x, t)
    p = 1 / (1 + np.exp(-x))
    np.testing.assert_allclose(loss, -(t * np.log(p) + (1 - t) * np.log(1 - p)), rtol=1e-10)
    for gamma, alpha in ((1.5, 0.25), (2.0, 0.5), (0.5, 0.9)):
        loss, grad = focal_logits(x, t, gamma, alpha)
        numeric = numeric_grad(lambda q, g=gamma, a=alpha: focal_logits(q, t, g, a)[0].sum(), x.copy())
        np.testing.assert_allclose(grad, numeric, rtol=1e-5, atol=1e-8)
    # gamma 0 and alpha 0.5 is half the BCE
    np.testing.assert_allclose(focal_logits(x, t, 0.0, 0.5)[0], 0.5 * bce_logits(x, t)[0], rtol=1e-12)


ANCHORS = [[[6, 8], [12, 10]], [[20, 24], [30, 18]]]
STRIDES = [(8, 8), (16, 16)]


def test_targets_assign_centre_cell_neighbours_and_fallback():
    gt = [(np.array([[10.0, 20.0, 22.0, 30.0]]), np.array([2]))]  # centre (16, 25), 12×10: anchor 1 of scale 0
    plain = build_targets(gt, ANCHORS, STRIDES, [(4, 4), (2, 2)], anchor_t=1.5, neighbor_cells=False)
    assert len(plain[0]) == 1 and len(plain[1]) == 0
    s = plain[0]
    assert (s.b[0], s.a[0], s.gy[0], s.gx[0], s.label[0]) == (0, 1, 3, 2, 2)
    np.testing.assert_allclose(s.tbox[0], [0.0, 0.125, 1.5, 1.25])
    np.testing.assert_allclose(s.anchor[0], [1.5, 1.25])
    near = build_targets(gt, ANCHORS, STRIDES, [(4, 4), (2, 2)], anchor_t=1.5)[0]
    # x = 2.0 cells (fraction 0 < 0.5: the left neighbour too), y = 3.125 (fraction < 0.5: the row above)
    assert sorted(zip(near.gy.tolist(), near.gx.tolist())) == [(2, 2), (3, 1), (3, 2)]
    np.testing.assert_allclose(near.tbox[:, :2][np.argsort(near.gx * 10 + near.gy)], [[1.0, 0.125], [0.0, 1.125],
                                                                                         [0.0, 0.125]])
    # a box far from every anchor shape still gets its best anchor by IoU (scale 1, anchor 0: 20×24)
    odd = [(np.array([[0.0, 0.0, 3.0, 60.0]]), np.array([0]))]
    t = build_targets(odd, ANCHORS, STRIDES, [(8, 8), (4, 4)], anchor_t=4.0, neighbor_cells=False)
    assert [len(x) for x in t] == [0, 1] and t[1].a[0] == 0
    # an image with no boxes: no positives anywhere
    empty = build_targets([(np.zeros((0, 4)), np.zeros(0, np.int64))], ANCHORS, STRIDES, [(4, 4), (2, 2)])
    assert [len(x) for x in empty] == [0, 0]


def _case(seed=0):
    rng = np.random.default_rng(seed)
    maps = [rng.normal(0, 1, (2, 2 * 8, 3, 3)), rng.normal(0, 1, (2, 2 * 8, 2, 2))]
    gt = [(np.array([[3.0, 4.0, 15.0, 20.0], [9.0, 6.0, 30.0, 27.0], [1.0, 1.0, 3.0, 30.0]]), np.array([0, 2, 1])),
          (np.zeros((0, 4)), np.zeros(0, np.int64))]  # an empty image
    return maps, gt


@pytest.mark.parametrize("box, obj, weights", [
    ("ciou", "bce", None), ("giou", "focal", [1.0, 2.0, 0.5]), ("diou", "bce", [0.5, 1.0, 3.0]),
    ("smooth_l1", "focal", [2.0, 0.0, 1.0]),
])
def test_detection_loss_gradients_match_finite_differences(box, obj, weights):
    maps, gt = _case()
    # obj_target one: every channel's gradient is then a plain derivative (iou mode: the next test)
    cfg = LossConfig(box_loss=box, obj_loss=obj, class_weights=weights, box_gain=0.3, cls_gain=0.7,
                     obj_target="one")
    total, parts, grads = detection_loss(maps, gt, ANCHORS, STRIDES, 3, cfg)
    assert total == pytest.approx(0.3 * parts["box"] + parts["obj"] + 0.7 * parts["cls"])
    assert parts["box"] > 0 and parts["cls"] > 0
    for i in range(2):
        def f(q, i=i):
            mm = list(maps)
            mm[i] = q
            return detection_loss(mm, gt, ANCHORS, STRIDES, 3, cfg)[0]

        numeric = numeric_grad(f, maps[i].copy())
        np.testing.assert_allclose(grads[i], numeric, rtol=1e-5, atol=1e-8)


def test_detection_loss_of_a_batch_without_boxes_is_objectness_only():
    maps = [m.astype(np.float32) for m in _case(1)[0]]
    empty = [(np.zeros((0, 4)), np.zeros(0, np.int64))] * 2
    total, parts, grads = detection_loss(maps, empty, ANCHORS, STRIDES, 3)
    assert parts["box"] == 0 and parts["cls"] == 0
    obj = [m.reshape(2, 2, 8, *m.shape[2:])[:, :, 4] for m in maps]
    want = sum(np.mean(np.logaddexp(0, o.astype(np.float64))) for o in obj)  # BCE against 0 = softplus
    assert total == pytest.approx(want, rel=1e-9)
    assert all(g.dtype == np.float32 for g in grads)
    g = grads[0].reshape(2, 2, 8, 3, 3)
    assert np.all(g[:, :, [0, 1, 2, 3, 5, 6, 7]] == 0) and np.all(g[:, :, 4] > 0)


def test_iou_objectness_target_is_held_fixed():
    """obj_target: iou: the objectness channels' gradient matches finite differences (the IoU target does not
    move with them), the box and class channels get exactly the gradient of obj_target: one, and the
    positives' targets are their boxes' IoU (below 1, so the objectness loss there differs)."""
    maps, gt = _case(2)
    one = detection_loss(maps, gt, ANCHORS, STRIDES, 3, LossConfig(obj_target="one"))
    iou = detection_loss(maps, gt, ANCHORS, STRIDES, 3, LossConfig())
    assert LossConfig().obj_target == "iou"
    assert iou[1]["box"] == one[1]["box"] and iou[1]["cls"] == one[1]["cls"] and iou[1]["obj"] != one[1]["obj"]
    for i in range(2):
        g_one = one[2][i].reshape(2, 2, 8, *maps[i].shape[2:])
        g_iou = iou[2][i].reshape(2, 2, 8, *maps[i].shape[2:])
        np.testing.assert_array_equal(g_iou[:, :, [0, 1, 2, 3, 5, 6, 7]], g_one[:, :, [0, 1, 2, 3, 5, 6, 7]])
        obj = maps[i].reshape(2, 2, 8, *maps[i].shape[2:])[:, :, 4].copy()

        def f(q, i=i):
            mm = [m.copy() for m in maps]
            mm[i].reshape(2, 2, 8, *mm[i].shape[2:])[:, :, 4] = q
            return detection_loss(mm, gt, ANCHORS, STRIDES, 3, LossConfig(obj_target="iou"))[0]

        np.testing.assert_allclose(g_iou[:, :, 4], numeric_grad(f, obj), rtol=1e-5, atol=1e-8)
