"""Per-pixel losses of a segmentation model and their gradients with respect to the logits (N×C×H×W).

Every loss skips the pixels whose target is the ignore index: they add nothing to the loss and get a zero
gradient. Class weights multiply each pixel's term by the weight of its true class, and the sum is divided by
the sum of those weights (as PyTorch's weighted cross-entropy), so the loss scale does not depend on them.

- cross_entropy: −log softmax(z)_t.
- focal: −(1 − p_t)^γ log p_t (Lin et al.); γ = 0 is cross-entropy.
- dice: 1 − the mean over classes of the soft Dice score (2 Σ p_c g_c + 1) / (Σ p_c + Σ g_c + 1), summed over
  every valid pixel of the batch; with class weights, a weighted mean over classes.
- ce_dice: cross_entropy + dice_weight · dice.

The arithmetic runs in the logits' dtype (float32 in training, float64 in the finite-difference tests).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SEGMENTATION_LOSSES = ("cross_entropy", "focal", "dice", "ce_dice")
DICE_SMOOTH = 1.0


@dataclass
class SegmentationLoss:
    kind: str = "cross_entropy"
    class_weights: np.ndarray | None = None  # (C,) or None
    ignore_index: int = 255
    focal_gamma: float = 2.0
    dice_weight: float = 1.0

    def __call__(self, logits: np.ndarray, target: np.ndarray) -> tuple[float, np.ndarray]:
        return segmentation_loss(logits, target, self)


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _pixel_terms(p: np.ndarray, target: np.ndarray, valid: np.ndarray, cfg: SegmentationLoss
                 ) -> tuple[float, np.ndarray]:
    """Cross-entropy or focal loss (weighted mean over valid pixels) and its gradient."""
    n, c = p.shape[:2]
    t = np.where(valid, target, 0)
    onehot = np.zeros_like(p)
    np.put_along_axis(onehot, t[:, None], 1.0, axis=1)
    w = valid.astype(p.dtype)
    if cfg.class_weights is not None:
        w = w * np.asarray(cfg.class_weights, p.dtype)[t]
    total = w.sum()
    if total <= 0:
        return 0.0, np.zeros_like(p)
    q = np.take_along_axis(p, t[:, None], axis=1)[:, 0]  # probability of the true class
    tiny = np.finfo(p.dtype).tiny
    logq = np.log(np.maximum(q, tiny))
    if cfg.kind == "focal" and cfg.focal_gamma != 0:
        g = cfg.focal_gamma
        one_minus = np.maximum(1 - q, np.finfo(p.dtype).eps * 1e-3)
        loss = -(one_minus ** g) * logq
        # d loss / d z_j = (g (1 − q)^(g−1) q log q − (1 − q)^g) (δ_tj − p_j)
        coeff = g * one_minus ** (g - 1) * q * logq - one_minus ** g
        grad = coeff[:, None] * (onehot - p)
    else:
        loss = -logq
        grad = p - onehot
    scale = (w / total).astype(p.dtype)
    return float((loss * w).sum() / total), grad * scale[:, None]


def _dice(p: np.ndarray, target: np.ndarray, valid: np.ndarray, cfg: SegmentationLoss) -> tuple[float, np.ndarray]:
    c = p.shape[1]
    t = np.where(valid, target, 0)
    g = np.zeros_like(p)
    np.put_along_axis(g, t[:, None], 1.0, axis=1)
    m = valid[:, None].astype(p.dtype)
    pm, gm = p * m, g * m
    axes = (0, 2, 3)
    inter = (pm * gm).sum(axis=axes)
    denom = pm.sum(axis=axes) + gm.sum(axis=axes) + DICE_SMOOTH
    score = (2 * inter + DICE_SMOOTH) / denom
    cw = (np.ones(c, p.dtype) if cfg.class_weights is None else np.asarray(cfg.class_weights, p.dtype))
    cw = cw / cw.sum()
    loss = 1.0 - float((cw * score).sum())
    # d score_c / d p_c(pixel) = (2 g (denom) − (2 I + s)) / denom², on valid pixels
    dscore = (2 * gm * denom[None, :, None, None] - (2 * inter + DICE_SMOOTH)[None, :, None, None]) \
        / (denom ** 2)[None, :, None, None]
    dp = -(cw[None, :, None, None] * dscore) * m
    # back through the softmax: dz_j = p_j (dp_j − Σ_k p_k dp_k)
    return loss, p * (dp - (p * dp).sum(axis=1, keepdims=True))


def segmentation_loss(logits: np.ndarray, target: np.ndarray, cfg: SegmentationLoss) -> tuple[float, np.ndarray]:
    """(loss, d loss / d logits) for logits N×C×H×W and integer targets N×H×W."""
    if logits.ndim != 4 or target.shape != (logits.shape[0], *logits.shape[2:]):
        raise ValueError(f"logits {logits.shape} and targets {target.shape} do not pair up (N×C×H×W, N×H×W)")
    target = np.asarray(target).astype(np.int64, copy=False)
    valid = target != cfg.ignore_index
    c = logits.shape[1]
    if np.any(valid & ((target < 0) | (target >= c))):
        bad = int(target[valid & ((target < 0) | (target >= c))][0])
        raise ValueError(f"target class {bad} is outside 0..{c - 1}")
    p = _softmax(logits)
    if cfg.kind == "dice":
        return _dice(p, target, valid, cfg)
    loss, grad = _pixel_terms(p, target, valid, cfg)
    if cfg.kind == "ce_dice":
        d_loss, d_grad = _dice(p, target, valid, cfg)
        return loss + cfg.dice_weight * d_loss, grad + cfg.dice_weight * d_grad
    return loss, grad


def balanced_weights(pixel_counts: np.ndarray) -> np.ndarray:
    """scikit-learn's 'balanced' weights from pixel frequencies: total / (C · count_c); 0 for an absent class."""
    counts = np.asarray(pixel_counts, np.float64)
    c = len(counts)
    return np.where(counts > 0, counts.sum() / (c * np.maximum(counts, 1)), 0.0).astype(np.float32)
