"""Detection post-processing: decode raw YOLO-style head maps and turn decoded rows into detections.

A dlc detector's ONNX output is already decoded: (N, K, 5 + C) rows of (x1, y1, x2, y2 in input pixels,
objectness, class probabilities), K = Σ A·H·W, scale by scale, anchor-major, then row, then column.
`postprocess` scores each row as objectness × its best class probability, keeps rows scoring above
`conf_threshold` (strictly), and runs per-class (or class-agnostic) NMS through `filter_detections`.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from dlc._C import detect as _native

from .boxes import filter_detections


def decode(maps: list[ArrayLike], anchors: list, strides: list, num_classes: int) -> np.ndarray:
    """Raw head maps, per scale (N, A·(5+C), H, W), to decoded rows (N, K, 5 + C) float32. anchors: per scale
    [[w, h], ...] in input pixels; strides: per scale (sh, sw) or one integer."""
    strides = [(s, s) if np.isscalar(s) else tuple(s) for s in strides]
    return _native.decode([np.asarray(m, np.float32) for m in maps], anchors, strides, int(num_classes))


def postprocess(decoded: ArrayLike, conf_threshold: float = 0.25, iou_threshold: float = 0.45,
                max_detections: int = 100, class_agnostic: bool = False
                ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per image (boxes (M, 4) float32 xyxy, scores (M,) float32, labels (M,) int64), best score first.
    score = objectness × best class probability; rows with score <= conf_threshold are dropped before NMS."""
    rows = np.asarray(decoded, np.float32)
    if rows.ndim != 3 or rows.shape[2] < 6:
        raise ValueError(f"postprocess: decoded rows must be (N, K, 5 + C) with C >= 1, got {rows.shape}")
    out = []
    for r in rows:
        cls = r[:, 5:]
        labels = cls.argmax(1).astype(np.int64)
        scores = r[:, 4] * cls[np.arange(len(r)), labels]
        kept = filter_detections(r[:, :4], scores, labels, iou_threshold=iou_threshold,
                                 score_threshold=conf_threshold, max_detections=max_detections,
                                 class_agnostic=class_agnostic)
        out.append((np.ascontiguousarray(r[kept, :4]), scores[kept].astype(np.float32), labels[kept]))
    return out


def embedded_detections(outputs: dict[str, np.ndarray], nms: dict, conf_threshold: float | None = None,
                        max_detections: int | None = None) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per image (boxes, scores, labels) from a model with NMS inside (dlc export embed_nms; `nms` is its
    metadata entry `embedded_nms`), in postprocess's form. A `conf_threshold` above the embedded one is applied
    here, which is exact: a box below it can only have suppressed boxes scoring lower still, and the capped list
    is sorted by score, so dropping its tail equals thresholding before NMS. A lower one cannot be recovered. A
    smaller `max_detections` keeps the first that many, likewise exact."""
    if nms.get("layout") == "efficient_nms":
        num = outputs["num_detections"].reshape(-1)
        boxes, scores = outputs["detection_boxes"], outputs["detection_scores"]
        labels = outputs["detection_classes"]
    else:
        rows, num = outputs["detections"], outputs["num_detections"].reshape(-1)
        boxes, scores, labels = rows[:, :, :4], rows[:, :, 4], rows[:, :, 5]
    out = []
    for i, k in enumerate(num.astype(np.int64)):
        b, s, lab = boxes[i, :k], scores[i, :k], labels[i, :k].astype(np.int64)
        if conf_threshold is not None and conf_threshold > float(nms.get("conf_threshold", 0.0)):
            keep = s > np.float32(conf_threshold)
            b, s, lab = b[keep], s[keep], lab[keep]
        if max_detections is not None:
            b, s, lab = b[:max_detections], s[:max_detections], lab[:max_detections]
        out.append((np.ascontiguousarray(b, np.float32), np.ascontiguousarray(s, np.float32), lab))
    return out
