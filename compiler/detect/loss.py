"""The detect layer's training loss and its gradients with respect to the raw head maps (numpy, float64).

    total = box_gain · L_box + obj_gain · L_obj + cls_gain · L_cls

- L_box: mean over all positives of the batch of 1 − IoU-variant (giou, diou, ciou) or smooth-L1 (β = 0.1) on
  the decoded box in grid units (centre relative to the cell, w = (2·s_w)²·anchor_w / stride). CIoU's
  trade-off α = v / (v − IoU + 1) is differentiated too, so the gradient is the exact one of the loss reported.
- L_obj: BCE (or sigmoid focal loss, α_t (1 − p_t)^γ · BCE) of every anchor-cell's objectness against 0,
  except at positives: there the decoded box's IoU with its target (obj_target: iou, the default, as YOLOv5:
  confidence then ranks boxes by how well they fit, which NMS and mAP reward; the IoU is a target, held
  fixed, so the gradient is the one with the target frozen; the largest IoU wins where several boxes share
  a cell), or 1 (obj_target: one: the loss is then a plain function of the maps). Mean per scale, summed
  over scales.
- L_cls: BCE of each class logit at the positives against the one-hot class, each positive weighted by the
  class weight of its box, mean over positives × classes (skipped for one class).

Everything is normalised per batch; an image without boxes contributes only objectness terms. Positives come
from targets.build_targets. The gradients are vectorised: a gather of the positive rows, closed-form
derivatives, and one scatter-add per scale.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .targets import build_targets

SMOOTH_L1_BETA = 0.1
EPS = 1e-7


@dataclass
class LossConfig:
    box_loss: str = "ciou"
    obj_loss: str = "bce"
    focal_gamma: float = 1.5
    focal_alpha: float = 0.25
    class_weights: list[float] | None = None
    box_gain: float = 0.05
    obj_gain: float = 1.0
    cls_gain: float = 0.5
    anchor_t: float = 4.0
    neighbor_cells: bool = True
    obj_target: str = "iou"

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any]) -> LossConfig:
        return cls(**{k: attrs[k] for k in cls.__dataclass_fields__ if k in attrs})


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # stable for any x


# --- elementwise terms on logits -----------------------------------------------------------------------------
def bce_logits(x: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-element BCE of sigmoid(x) against t, and its derivative in x."""
    loss = np.maximum(x, 0) - x * t + np.log1p(np.exp(-np.abs(x)))
    return loss, _sigmoid(x) - t


def focal_logits(x: np.ndarray, t: np.ndarray, gamma: float, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Sigmoid focal loss α_t (1 − p_t)^γ BCE (Lin et al., 2017) and its derivative in x."""
    bce, dbce = bce_logits(x, t)
    p = _sigmoid(x)
    q = np.clip(1 - (p * t + (1 - p) * (1 - t)), 0.0, 1.0)  # 1 − p_t
    a_t = alpha * t + (1 - alpha) * (1 - t)
    mod = q ** gamma
    # d(1 − p_t)/dx = −(2t − 1) p (1 − p)
    dq = -(2 * t - 1) * p * (1 - p)
    dmod = gamma * np.power(np.maximum(q, 1e-12), gamma - 1) * dq if gamma > 0 else 0.0
    return a_t * mod * bce, a_t * (dmod * bce + mod * dbce)


# --- box regression ---------------------------------------------------------------------------------------
def _plain_iou(p: np.ndarray, t: np.ndarray) -> np.ndarray:
    """IoU of matching (cx, cy, w, h) rows."""
    iw = np.minimum(p[:, 0] + p[:, 2] / 2, t[:, 0] + t[:, 2] / 2) - np.maximum(p[:, 0] - p[:, 2] / 2,
                                                                           t[:, 0] - t[:, 2] / 2)
    ih = np.minimum(p[:, 1] + p[:, 3] / 2, t[:, 1] + t[:, 3] / 2) - np.maximum(p[:, 1] - p[:, 3] / 2,
                                                                           t[:, 1] - t[:, 3] / 2)
    inter = np.maximum(iw, 0) * np.maximum(ih, 0)
    return inter / (p[:, 2] * p[:, 3] + t[:, 2] * t[:, 3] - inter + EPS)


def box_loss(kind: str, p: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-box loss between predicted and target (cx, cy, w, h) rows and its gradient in the prediction:
    1 − IoU variant for giou/diou/ciou, smooth-L1 summed over the four values for smooth_l1."""
    if kind == "smooth_l1":
        d = p - t
        small = np.abs(d) < SMOOTH_L1_BETA
        loss = np.where(small, 0.5 * d * d / SMOOTH_L1_BETA, np.abs(d) - 0.5 * SMOOTH_L1_BETA)
        return loss.sum(1), np.where(small, d / SMOOTH_L1_BETA, np.sign(d))
    px, py, pw, ph = p.T
    tx, ty, tw, th = t.T
    ax1, ax2, ay1, ay2 = px - pw / 2, px + pw / 2, py - ph / 2, py + ph / 2
    bx1, bx2, by1, by2 = tx - tw / 2, tx + tw / 2, ty - th / 2, ty + th / 2
    iw_raw = np.minimum(ax2, bx2) - np.maximum(ax1, bx1)
    ih_raw = np.minimum(ay2, by2) - np.maximum(ay1, by1)
    iw, ih = np.maximum(iw_raw, 0), np.maximum(ih_raw, 0)
    inter = iw * ih
    union = pw * ph + tw * th - inter + EPS
    iou = inter / union
    cw = np.maximum(ax2, bx2) - np.minimum(ax1, bx1)
    ch = np.maximum(ay2, by2) - np.minimum(ay1, by1)
    zero = np.zeros_like(px)
    # Upstream gradients of the metric m (loss = 1 − m): g_m = −1.
    g_iou = -np.ones_like(px)
    g_union, g_cw, g_ch, g_px, g_py, g_pw, g_ph = zero.copy(), zero.copy(), zero.copy(), zero.copy(), \
        zero.copy(), zero.copy(), zero.copy()
    metric = iou
    if kind == "giou":
        c_area = cw * ch + EPS
        metric = iou - (c_area - union) / c_area  # = iou − 1 + union / c_area
        g_union += -1 / c_area
        g_c_area = union / c_area ** 2
        g_cw += g_c_area * ch
        g_ch += g_c_area * cw
    elif kind in ("diou", "ciou"):
        c2 = cw ** 2 + ch ** 2 + EPS
        rho2 = (px - tx) ** 2 + (py - ty) ** 2
        metric = iou - rho2 / c2
        g_rho2 = 1 / c2
        g_c2 = -rho2 / c2 ** 2
        g_px += g_rho2 * 2 * (px - tx)
        g_py += g_rho2 * 2 * (py - ty)
        g_cw += g_c2 * 2 * cw
        g_ch += g_c2 * 2 * ch
        if kind == "ciou":
            k = 4 / np.pi ** 2
            diff = np.arctan(tw / th) - np.arctan(pw / ph)
            v = k * diff ** 2
            den = v - iou + 1 + EPS
            alpha = v / den
            metric = metric - alpha * v
            g_term = np.ones_like(px)  # d(−m)/d(α v) = 1
            g_v = g_term * (alpha + v * (1 + EPS - iou) / den ** 2)
            g_iou += g_term * v ** 2 / den ** 2  # d(α v)/d iou = v² / den²
            g_diff = g_v * 2 * k * diff
            r2 = pw ** 2 + ph ** 2
            g_pw += -g_diff * ph / r2
            g_ph += g_diff * pw / r2
    # iou = inter / union, union = pw·ph + tw·th − inter
    g_union += -g_iou * inter / union ** 2
    g_inter = g_iou / union - g_union
    g_pw += g_union * ph
    g_ph += g_union * pw
    g_iw = g_inter * ih * (iw_raw > 0)
    g_ih = g_inter * iw * (ih_raw > 0)
    # iw = min(ax2, bx2) − max(ax1, bx1); cw = max(ax2, bx2) − min(ax1, bx1)
    g_ax2 = g_iw * (ax2 <= bx2) + g_cw * (ax2 > bx2)
    g_ax1 = -g_iw * (ax1 >= bx1) - g_cw * (ax1 < bx1)
    g_ay2 = g_ih * (ay2 <= by2) + g_ch * (ay2 > by2)
    g_ay1 = -g_ih * (ay1 >= by1) - g_ch * (ay1 < by1)
    g_px += g_ax1 + g_ax2
    g_py += g_ay1 + g_ay2
    g_pw += (g_ax2 - g_ax1) / 2
    g_ph += (g_ay2 - g_ay1) / 2
    return 1 - metric, np.stack([g_px, g_py, g_pw, g_ph], axis=1)


# --- the whole loss --------------------------------------------------------------------------------------
def detection_loss(maps: list[np.ndarray], gt: list[tuple[np.ndarray, np.ndarray]], anchors: list,
                   strides: list, num_classes: int, cfg: LossConfig | None = None
                   ) -> tuple[float, dict[str, float], list[np.ndarray]]:
    """maps: per scale raw head maps (N, A·(5+C), H, W); gt: per image (boxes xyxy pixels, labels);
    anchors per scale (A, 2) pixels; strides per scale (sh, sw). Returns (total, {box, obj, cls}, gradient
    of total per map, in each map's dtype)."""
    cfg = cfg or LossConfig()
    d = 5 + num_classes
    grids = [m.shape[2:] for m in maps]
    targets = build_targets(gt, anchors, strides, grids, cfg.anchor_t, cfg.neighbor_cells)
    total_pos = sum(len(t) for t in targets)
    weights = None if cfg.class_weights is None else np.asarray(cfg.class_weights, np.float64)
    l_box = l_obj = l_cls = 0.0
    grads = []
    for raw_in, tg in zip(maps, targets):
        n, ch, h, w = raw_in.shape
        a = ch // d
        raw = np.asarray(raw_in, np.float64).reshape(n, a, d, h, w)
        grad = np.zeros_like(raw)
        by_cell = grad.transpose(0, 1, 3, 4, 2)  # (N, A, H, W, D) view
        obj = raw[:, :, 4]
        t_obj = np.zeros_like(obj)
        if len(tg):
            pr = raw.transpose(0, 1, 3, 4, 2)[tg.b, tg.a, tg.gy, tg.gx]  # (P, D)
            s = _sigmoid(pr[:, :4])
            pbox = np.concatenate([2 * s[:, :2] - 0.5, (2 * s[:, 2:]) ** 2 * tg.anchor], axis=1)
            lb, gb = box_loss(cfg.box_loss, pbox, tg.tbox)
            if cfg.obj_target == "iou":  # the box's IoU with its target, held fixed (no gradient through it)
                np.maximum.at(t_obj, (tg.b, tg.a, tg.gy, tg.gx), np.clip(_plain_iou(pbox, tg.tbox), 0.0, 1.0))
            else:
                t_obj[tg.b, tg.a, tg.gy, tg.gx] = 1.0
            l_box += lb.sum() / total_pos
            gb *= cfg.box_gain / total_pos
            ds = s * (1 - s)
            g_pos = np.zeros_like(pr)
            g_pos[:, :2] = gb[:, :2] * 2 * ds[:, :2]
            g_pos[:, 2:4] = gb[:, 2:] * 8 * s[:, 2:] * ds[:, 2:] * tg.anchor
            if num_classes > 1:
                t_cls = np.zeros((len(tg), num_classes))
                t_cls[np.arange(len(tg)), tg.label] = 1.0
                lc, gc = bce_logits(pr[:, 5:], t_cls)
                wr = np.ones((len(tg), 1)) if weights is None else weights[tg.label][:, None]
                norm = total_pos * num_classes
                l_cls += (wr * lc).sum() / norm
                g_pos[:, 5:] = cfg.cls_gain * wr * gc / norm
            np.add.at(by_cell, (tg.b, tg.a, tg.gy, tg.gx), g_pos)
        # objectness over every anchor-cell
        if cfg.obj_loss == "focal":
            lo, go = focal_logits(obj, t_obj, cfg.focal_gamma, cfg.focal_alpha)
        else:
            lo, go = bce_logits(obj, t_obj)
        l_obj += lo.mean()
        grad[:, :, 4] += cfg.obj_gain * go / obj.size
        grads.append(grad.reshape(raw_in.shape).astype(raw_in.dtype if raw_in.dtype.kind == "f" else np.float32))
    parts = {"box": float(l_box), "obj": float(l_obj), "cls": float(l_cls)}
    total = cfg.box_gain * parts["box"] + cfg.obj_gain * parts["obj"] + cfg.cls_gain * parts["cls"]
    return float(total), parts, grads
