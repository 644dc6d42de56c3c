"""Pure-numpy reference for the kernel in `detect.pyx`: YOLO-style decode of raw head maps, written for
reading, not for speed.

A head map holds A anchors × (5 + C) channels per cell, channel a·(5 + C) + j with j = 0..3 the box (tx, ty,
tw, th), j = 4 the objectness and j = 5.. the class logits. With s = sigmoid(raw), the cell (gx, gy), the
scale's stride (sh, sw) and the anchor (aw, ah) in input pixels:

    cx = (2 s_x − 0.5 + gx) · sw        w = (2 s_w)² · aw        obj = s_o
    cy = (2 s_y − 0.5 + gy) · sh        h = (2 s_h)² · ah        cls = s_c

and the row written is (cx − w/2, cy − h/2, cx + w/2, cy + h/2, obj, cls...). Rows are ordered scale by
scale, then anchor, then cell row, then cell column: k = offset + (a·H + y)·W + x.
"""

import numpy as np


def decode_ref(maps, anchors, strides, num_classes: int) -> np.ndarray:
    """maps: per scale (N, A·(5+C), H, W); anchors: per scale (A, 2) [w, h] pixels; strides: per scale
    (sh, sw). Returns (N, K, 5 + C) float64, K = Σ A·H·W."""
    rows = []
    d = 5 + num_classes
    for raw, anc, (sh, sw) in zip(maps, anchors, strides):
        raw = np.asarray(raw, np.float64)
        anc = np.asarray(anc, np.float64)
        n, ch, h, w = raw.shape
        a = ch // d
        s = 1.0 / (1.0 + np.exp(-raw.reshape(n, a, d, h, w)))
        gy, gx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        cx = (2 * s[:, :, 0] - 0.5 + gx) * sw
        cy = (2 * s[:, :, 1] - 0.5 + gy) * sh
        bw = (2 * s[:, :, 2]) ** 2 * anc[None, :, 0, None, None]
        bh = (2 * s[:, :, 3]) ** 2 * anc[None, :, 1, None, None]
        out = np.concatenate([np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], axis=2),
                              s[:, :, 4:]], axis=2)  # (N, A, D, H, W)
        rows.append(out.transpose(0, 1, 3, 4, 2).reshape(n, a * h * w, d))
    return np.concatenate(rows, axis=1)
