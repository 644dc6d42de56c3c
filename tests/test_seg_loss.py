"""Segmentation losses against float64 finite differences and against plain per-pixel references."""

import numpy as np
import pytest

from dlc.compiler.segment.loss import SegmentationLoss, balanced_weights, segmentation_loss

from helpers import numeric_grad


def _case(seed=0, n=2, c=4, h=3, w=5, ignore=255):
    rng = np.random.default_rng(seed)
    # logits of varied magnitude, not saturated
    logits = rng.normal(0, 1.5, (n, c, h, w)) * rng.uniform(0.3, 2.0, (n, 1, h, w))
    target = rng.integers(0, c, (n, h, w))
    target[rng.random((n, h, w)) < 0.2] = ignore
    return logits, target


CONFIGS = [
    SegmentationLoss("cross_entropy"),
    SegmentationLoss("cross_entropy", class_weights=np.array([0.2, 1.0, 3.0, 0.7])),
    SegmentationLoss("focal", focal_gamma=2.0),
    SegmentationLoss("focal", focal_gamma=0.5, class_weights=np.array([1.0, 2.0, 0.5, 1.5])),
    SegmentationLoss("dice"),
    SegmentationLoss("dice", class_weights=np.array([0.1, 1.0, 2.0, 1.0])),
    SegmentationLoss("ce_dice", dice_weight=0.7),
    SegmentationLoss("cross_entropy", ignore_index=2),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.kind}-w{c.class_weights is not None}-i{c.ignore_index}")
def test_gradients_match_finite_differences(cfg):
    logits, target = _case(1, ignore=cfg.ignore_index)
    loss, grad = segmentation_loss(logits, target, cfg)
    assert np.isfinite(loss) and loss > 0
    num = numeric_grad(lambda z: segmentation_loss(z, target, cfg)[0], logits.copy())
    scale = np.abs(num).max()
    assert scale > 1e-4
    np.testing.assert_allclose(grad, num, atol=1e-7 * max(scale, 1), rtol=1e-5)
    ignored = target == cfg.ignore_index
    assert ignored.any()
    np.testing.assert_array_equal(grad.transpose(0, 2, 3, 1)[ignored], 0)


def _log_softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def test_cross_entropy_and_focal_equal_a_per_pixel_loop():
    logits, target = _case(2)
    weights = np.array([0.5, 1.0, 2.0, 4.0])
    logp = _log_softmax(logits)
    for kind, gamma in (("cross_entropy", 0.0), ("focal", 2.0)):
        num = den = 0.0
        for b in range(logits.shape[0]):
            for i in range(logits.shape[2]):
                for j in range(logits.shape[3]):
                    t = target[b, i, j]
                    if t == 255:
                        continue
                    lp = logp[b, t, i, j]
                    num += weights[t] * -((1 - np.exp(lp)) ** gamma) * lp
                    den += weights[t]
        loss, _ = segmentation_loss(logits, target, SegmentationLoss(kind, weights, focal_gamma=gamma))
        assert loss == pytest.approx(num / den, rel=1e-12)


def test_dice_equals_its_definition_and_is_small_for_a_near_perfect_prediction():
    logits, target = _case(3)
    valid = target != 255
    p = np.exp(_log_softmax(logits))
    scores = []
    for c in range(4):
        pc, gc = p[:, c][valid], (target[valid] == c).astype(float)
        scores.append((2 * (pc * gc).sum() + 1) / (pc.sum() + gc.sum() + 1))
    loss, _ = segmentation_loss(logits, target, SegmentationLoss("dice"))
    assert loss == pytest.approx(1 - np.mean(scores), rel=1e-12)
    perfect = np.where(np.eye(4)[np.where(valid, target, 0)].transpose(0, 3, 1, 2) > 0, 20.0, -20.0)
    assert segmentation_loss(perfect, target, SegmentationLoss("dice"))[0] < 0.05 < loss


def test_all_ignored_gives_zero_and_bad_targets_are_refused():
    logits, target = _case(4)
    loss, grad = segmentation_loss(logits, np.full_like(target, 255), SegmentationLoss())
    assert loss == 0 and not grad.any()
    target[0, 0, 0] = 9
    with pytest.raises(ValueError, match="target class 9"):
        segmentation_loss(logits, target, SegmentationLoss())


def test_balanced_weights_follow_pixel_frequencies():
    w = balanced_weights([300, 100, 0, 200])
    np.testing.assert_allclose(w, [600 / (4 * 300), 600 / (4 * 100), 0, 600 / (4 * 200)], rtol=1e-6)
