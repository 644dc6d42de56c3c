"""Anchor sizes from the training boxes: k-means over (w, h) with distance 1 - IoU, as in YOLOv2.

Boxes are compared aligned at a common centre, so only their sizes matter: IoU = min(w1, w2)·min(h1, h2) /
(w1·h1 + w2·h2 - min(w1, w2)·min(h1, h2)). Unlike Euclidean k-means this does not let large boxes dominate.
"""

from __future__ import annotations

import logging

import numpy as np

from ..errors import DlcError

log = logging.getLogger("dlc.detect")


def wh_iou(wh: np.ndarray, anchors: np.ndarray) -> np.ndarray:
    """IoU (N × K) of centre-aligned boxes of sizes wh (N × 2) and anchors (K × 2)."""
    wh = np.asarray(wh, np.float64)
    anchors = np.asarray(anchors, np.float64)
    inter = np.minimum(wh[:, None, 0], anchors[None, :, 0]) * np.minimum(wh[:, None, 1], anchors[None, :, 1])
    union = (wh[:, 0] * wh[:, 1])[:, None] + (anchors[:, 0] * anchors[:, 1])[None] - inter
    return inter / union


def _valid_wh(wh: np.ndarray, what: str) -> np.ndarray:
    wh = np.asarray(wh)
    if wh.ndim != 2 or wh.shape[1] != 2 or wh.dtype.kind not in "fiu":
        raise DlcError(f"{what}: box sizes must be a real (N, 2) array of (w, h), got shape {wh.shape}")
    wh = wh.astype(np.float64)
    ok = np.isfinite(wh).all(1) & (wh > 0).all(1)
    if not ok.all():
        if not ok.any():
            raise DlcError(f"{what}: none of the {len(wh)} boxes has a positive, finite width and height")
        log.warning("%s: ignoring %d of %d boxes with a non-positive or non-finite width or height",
                    what, int((~ok).sum()), len(wh))
    return wh[ok]


def kmeans_anchors(wh: np.ndarray, k: int, seed: int = 0, iters: int = 300) -> tuple[np.ndarray, float]:
    """k anchor sizes (float32 (k, 2), sorted by area ascending) and the mean IoU of each box with its best
    anchor. k-means++ initialisation (each next centre drawn with probability proportional to (1 - IoU)^2 to
    the nearest chosen one) from `seed`; cluster centres are the median (w, h) of their boxes."""
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise DlcError(f"kmeans_anchors: k must be a positive integer, got {k!r}")
    wh = _valid_wh(wh, "kmeans_anchors")
    if len(wh) < k:
        raise DlcError(f"kmeans_anchors: {len(wh)} valid boxes are fewer than the {k} anchors asked for; "
                       f"use fewer anchors or more data")
    distinct = np.unique(wh, axis=0)
    if len(distinct) < k:
        raise DlcError(f"kmeans_anchors: the boxes have only {len(distinct)} distinct sizes, fewer than the {k} "
                       f"anchors asked for; use fewer anchors")
    rng = np.random.default_rng([seed, 2718])
    # k-means++ over the distinct sizes so that a chosen size is never drawn twice
    centres = [distinct[rng.integers(len(distinct))]]
    near = 1 - wh_iou(distinct, np.asarray(centres))[:, 0]
    for _ in range(1, k):
        p = near ** 2
        total = p.sum()
        # all remaining distance zero cannot happen (more distinct sizes than centres), but stay safe
        pick = rng.choice(len(distinct), p=p / total) if total > 0 else int(np.argmax(near))
        centres.append(distinct[pick])
        near = np.minimum(near, 1 - wh_iou(distinct, distinct[pick][None])[:, 0])
    centres = np.asarray(centres)
    assign = None
    for _ in range(iters):
        iou = wh_iou(wh, centres)
        new = iou.argmax(1)  # ties go to the lowest-index centre: deterministic
        if assign is not None and np.array_equal(new, assign):
            break
        assign = new
        for j in range(k):
            members = wh[assign == j]
            if len(members):
                centres[j] = np.median(members, axis=0)
            else:  # an empty cluster takes the box its nearest anchor fits worst
                worst = int(np.argmin(iou.max(1)))
                centres[j] = wh[worst]
                iou[worst] = 0
                iou[worst, j] = 1
    order = np.argsort(centres[:, 0] * centres[:, 1], kind="stable")
    centres = centres[order]
    return centres.astype(np.float32), float(wh_iou(wh, centres).max(1).mean())


def anchor_fit(wh: np.ndarray, anchors: np.ndarray) -> dict:
    """How well anchors fit boxes: mean best IoU, the fraction of boxes whose best anchor IoU is > 0.5, and how
    many boxes each anchor fits best."""
    wh = _valid_wh(wh, "anchor_fit")
    anchors = np.asarray(anchors, np.float64)
    if anchors.ndim != 2 or anchors.shape[1] != 2 or len(anchors) == 0 or not (anchors > 0).all():
        raise DlcError(f"anchor_fit: anchors must be a (K, 2) array of positive (w, h), got {anchors.tolist()}")
    iou = wh_iou(wh, anchors)
    best = iou.max(1)
    return {"mean_best_iou": float(best.mean()), "recall_at_0.5": float((best > 0.5).mean()),
            "per_anchor_count": np.bincount(iou.argmax(1), minlength=len(anchors)).tolist()}


def split_anchors(anchors: np.ndarray, num_scales: int) -> list[list[list[float]]]:
    """Anchors sorted by area and split evenly over num_scales, the smallest to the finest stride:
    [[[w, h], ...] per scale]."""
    anchors = np.asarray(anchors, np.float64)
    if anchors.ndim != 2 or anchors.shape[1] != 2:
        raise DlcError(f"split_anchors: anchors must be a (K, 2) array of (w, h), got shape {anchors.shape}")
    if num_scales < 1 or len(anchors) % num_scales:
        raise DlcError(f"split_anchors: {len(anchors)} anchors do not split evenly over {num_scales} scales; "
                       f"use a multiple of {num_scales} anchors")
    anchors = anchors[np.argsort(anchors[:, 0] * anchors[:, 1], kind="stable")]
    per = len(anchors) // num_scales
    return [[[float(w), float(h)] for w, h in anchors[s * per:(s + 1) * per]] for s in range(num_scales)]
