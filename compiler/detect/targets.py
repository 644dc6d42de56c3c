"""Anchor assignment for the detect layer's loss (YOLOv5 style), vectorised over boxes with numpy.

For each ground-truth box and each scale, the anchors whose shape is close enough — max(w/aw, aw/w, h/ah,
ah/h) < anchor_t — are positive at the cell holding the box centre and, with `neighbor_cells`, at the one or
two neighbouring cells nearest the centre (the decoded centre 2·s − 0.5 reaches from −0.5 to 1.5 cells, so a
neighbour can still predict it). A box that matches no anchor on any scale takes its best anchor by
centred-shape IoU, so no box is dropped. Several boxes may claim one (anchor, cell): each keeps its own box
and class terms; the objectness target there is 1 either way.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class ScaleTargets:
    """The positives of one scale: P entries, each (image b, anchor a, cell gy, gx) with its box target in
    grid units relative to the cell (tx, ty, tw, th; tx, ty in (−0.5, 1.5)), its anchor in grid units and
    its class."""

    b: np.ndarray  # (P,) int64
    a: np.ndarray
    gy: np.ndarray
    gx: np.ndarray
    tbox: np.ndarray  # (P, 4) float64
    anchor: np.ndarray  # (P, 2) float64, grid units
    label: np.ndarray  # (P,) int64

    def __len__(self) -> int:
        return len(self.b)


def _wh_iou(wh: np.ndarray, anchors: np.ndarray) -> np.ndarray:
    """IoU of centred boxes: (M, 2) against (A, 2) -> (M, A)."""
    inter = np.minimum(wh[:, None, 0], anchors[None, :, 0]) * np.minimum(wh[:, None, 1], anchors[None, :, 1])
    return inter / (wh[:, None].prod(-1) + anchors[None].prod(-1) - inter)


def build_targets(gt: list[tuple[np.ndarray, np.ndarray]], anchors: list, strides: list, grids: list,
                  anchor_t: float = 4.0, neighbor_cells: bool = True) -> list[ScaleTargets]:
    """gt: per image (boxes (M, 4) xyxy input pixels, labels (M,)); anchors: per scale (A, 2) [w, h] pixels;
    strides: per scale (sh, sw); grids: per scale (H, W). Returns one ScaleTargets per scale."""
    counts = [len(np.asarray(b).reshape(-1, 4)) for b, _ in gt]
    boxes = (np.concatenate([np.asarray(b, np.float64).reshape(-1, 4) for b, _ in gt])
             if gt else np.zeros((0, 4)))
    labels = np.concatenate([np.asarray(lab, np.int64).reshape(-1) for _, lab in gt]) if gt else np.zeros(0, np.int64)
    image = np.repeat(np.arange(len(gt)), counts)
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2  # (M, 2) x, y
    wh = np.maximum(boxes[:, 2:] - boxes[:, :2], 1e-6)
    m = len(boxes)
    anchors = [np.asarray(a, np.float64).reshape(-1, 2) for a in anchors]
    # (scale, gt, anchor) matches by shape ratio.
    matches = []
    matched_any = np.zeros(m, bool)
    for anc in anchors:
        r = wh[:, None, :] / anc[None]
        ok = np.maximum(r, 1 / r).max(-1) < anchor_t  # (M, A)
        matches.append(ok)
        matched_any |= ok.any(1)
    if m and not matched_any.all():  # the unmatched boxes take their best anchor over all scales
        flat = np.concatenate(anchors)
        scale_of = np.repeat(np.arange(len(anchors)), [len(a) for a in anchors])
        first = np.concatenate([[0], np.cumsum([len(a) for a in anchors])[:-1]])
        lost = np.flatnonzero(~matched_any)
        best = _wh_iou(wh[lost], flat).argmax(1)
        for s in np.unique(scale_of[best]):
            sel = scale_of[best] == s
            matches[s][lost[sel], best[sel] - first[s]] = True
    out = []
    for s, (anc, (sh, sw), (h, w)) in enumerate(zip(anchors, strides, grids)):
        gi, ai = np.nonzero(matches[s])
        g = centre[gi] / np.array([sw, sh])  # centre in grid units (x, y)
        cell = np.floor(g)
        frac = g - cell
        offsets = [np.zeros((len(gi), 2))]
        keep = [np.ones(len(gi), bool)]
        if neighbor_cells:
            size = np.array([w, h], np.float64)
            for axis in (0, 1):
                for step, near in ((-1, frac[:, axis] < 0.5), (1, frac[:, axis] > 0.5)):
                    off = np.zeros((len(gi), 2))
                    off[:, axis] = step
                    inside = (cell[:, axis] + step >= 0) & (cell[:, axis] + step < size[axis])
                    offsets.append(off)
                    keep.append(near & inside)
        rows = np.concatenate([np.flatnonzero(k) for k in keep])
        off = np.concatenate([o[k] for o, k in zip(offsets, keep)])
        cells = cell[rows] + off
        cells[:, 0] = np.clip(cells[:, 0], 0, w - 1)  # centres on the image border
        cells[:, 1] = np.clip(cells[:, 1], 0, h - 1)
        gidx = gi[rows]
        tbox = np.concatenate([g[rows] - cells, wh[gidx] / np.array([sw, sh])], axis=1)
        out.append(ScaleTargets(
            b=image[gidx].astype(np.int64), a=ai[rows].astype(np.int64), gy=cells[:, 1].astype(np.int64),
            gx=cells[:, 0].astype(np.int64), tbox=tbox, anchor=anc[ai[rows]] / np.array([sw, sh]),
            label=labels[gidx]))
    return out
