"""COCO-format detection files: loading with validation, and bbox evaluation equal to pycocotools' COCOeval.

`coco_evaluate(gt, detections)` reproduces COCOeval(iouType="bbox").evaluate(); accumulate(); summarize()
with numpy only (pycocotools is used by the tests, never here):

- images are the GT file's `images` (sorted ids), categories its `categories` (sorted ids); GT annotations and
  detections whose image or category is not listed are left out, as pycocotools does. A detection whose
  image is not in the GT is an error, as in pycocotools' loadRes.
- per image and category, detections are sorted by descending score (np.argsort(-scores, kind="mergesort"):
  ties keep file order) and cut to the 100 best; GT is `ignore` when `iscrowd` is set, and also, per area
  range, when its `area` field lies outside the range (bounds inclusive).
- matching per IoU threshold t: each detection, best score first, takes the GT with the highest IoU >= t
  that is free (a crowd GT is never used up), preferring regular GT over ignored GT; equal IoUs go to the
  later GT, as in pycocotools' loop. A detection matched to an ignored GT is ignored, and an unmatched
  detection whose area (w*h) is outside the area range is ignored.
- IoU is pycocotools' bbIou in float64: a crowd GT's union is the detection's area. It is computed here
  rather than with dlc.runtime.box_iou because that returns float32, and rounding an IoU near one of the
  thresholds (0.55, 0.6, ...) would flip a match and move a statistic by far more than 1e-4.
- precision: cumulative TP/FP over all images in score order, made monotone from the right and read at the
  101 recall thresholds (np.searchsorted(..., side="left"); 0 past the highest recall reached); -1 where
  a category has no non-ignored GT in the area range. Statistics are means over entries > -1, -1 if none.

Deliberate differences, on inputs pycocotools mishandles or rejects: a GT annotation with id 0 matches like
any other (pycocotools stores GT ids as match flags, so a match to id 0 counts as a false positive); GT
without `iscrowd` is not crowd and GT without `area` uses w*h (pycocotools raises KeyError); an empty
detection list is evaluated (all AP 0) instead of failing on `anns[0]`.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dlc.compiler.errors import DlcError

__all__ = ["CocoDetections", "CocoEvalResult", "CocoGroundTruth", "CocoReport", "STAT_NAMES", "coco_evaluate",
           "coco_report", "coco_to_arrays",
           "load_coco_detections", "load_coco_gt"]

# Built exactly as pycocotools' Params.setDetParams (np.arange would drift).
IOU_THRESHOLDS = np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1, endpoint=True)
RECALL_THRESHOLDS = np.linspace(0.0, 1.00, int(np.round((1.00 - 0.0) / 0.01)) + 1, endpoint=True)
MAX_DETS = (1, 10, 100)
AREA_RANGES = ((0.0, 1e5**2), (0.0, 32.0**2), (32.0**2, 96.0**2), (96.0**2, 1e5**2))
AREA_LABELS = ("all", "small", "medium", "large")
MAX_COORD = 1e12  # larger box values are bad data, and would overflow float32 in the VOC metrics

# (ap, iou threshold or None for .50:.95, area label, maxDets) for the 12 statistics, in pycocotools' order.
_STATS = ((1, None, "all", 100), (1, 0.5, "all", 100), (1, 0.75, "all", 100), (1, None, "small", 100),
          (1, None, "medium", 100), (1, None, "large", 100), (0, None, "all", 1), (0, None, "all", 10),
          (0, None, "all", 100), (0, None, "small", 100), (0, None, "medium", 100), (0, None, "large", 100))


def _stat_line(ap: int, iou: float | None, area: str, max_dets: int) -> str:
    """The label part of one line of pycocotools' summarize(), without ' = value'."""
    title, kind = ("Average Precision", "(AP)") if ap else ("Average Recall", "(AR)")
    iou_str = f"{IOU_THRESHOLDS[0]:0.2f}:{IOU_THRESHOLDS[-1]:0.2f}" if iou is None else f"{iou:0.2f}"
    return f" {title:<18} {kind} @[ IoU={iou_str:<9} | area={area:>6s} | maxDets={max_dets:>3d} ]"


STAT_NAMES: tuple[str, ...] = tuple(_stat_line(*s) for s in _STATS)


@dataclass
class CocoGroundTruth:
    """A validated COCO instances file: boxes are xywh float64, one row per kept annotation."""

    source: str
    image_ids: np.ndarray  # (I,) int64, sorted unique: the images evaluated
    category_ids: np.ndarray  # (K,) int64, sorted unique
    category_names: list[str]
    ann_image: np.ndarray  # (N,) int64
    ann_category: np.ndarray  # (N,) int64
    boxes: np.ndarray  # (N, 4) float64 xywh
    areas: np.ndarray  # (N,) float64, the `area` field
    iscrowd: np.ndarray  # (N,) bool


@dataclass
class CocoDetections:
    """Validated detection results (the COCO results format), xywh float64."""

    source: str
    image: np.ndarray  # (D,) int64
    category: np.ndarray  # (D,) int64
    boxes: np.ndarray  # (D, 4) float64 xywh
    scores: np.ndarray  # (D,) float64


@dataclass
class CocoEvalResult:
    """COCO bbox evaluation. `precision` is T×R×K×A×M and `recall` T×K×A×M, as pycocotools' eval[...]."""

    stats: list[float]
    precision: np.ndarray
    recall: np.ndarray
    category_ids: list[int]
    category_names: list[str]
    per_category: dict[str, float]  # AP@[.5:.95] (all areas, 100 dets) by category name (ids if names repeat)
    num_images: int
    num_gt: int
    num_detections: int
    names: tuple[str, ...] = field(default=STAT_NAMES)

    def summary(self) -> str:
        """The 12 lines pycocotools' summarize() prints."""
        return "\n".join(f"{name} = {value:0.3f}" for name, value in zip(self.names, self.stats))

    def to_dict(self) -> dict[str, Any]:
        return {"stats": dict(zip(("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs",
                                   "ARm", "ARl"), self.stats)),
                "names": list(self.names), "per_category": self.per_category, "num_images": self.num_images,
                "num_gt": self.num_gt, "num_detections": self.num_detections}


# ---------------------------------------------------------------------------------------------- loading


def _read_json(path: Path, what: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise DlcError(f"{path}: {what} file not found") from None
    except IsADirectoryError:
        raise DlcError(f"{path}: is a folder; pass the {what} JSON file") from None
    except UnicodeDecodeError:
        raise DlcError(f"{path}: not a UTF-8 JSON file") from None
    except json.JSONDecodeError as exc:
        raise DlcError(f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    except (OSError, RecursionError) as exc:
        raise DlcError(f"{path}: cannot read {what} file ({exc})") from None


def _show(v: Any, limit: int) -> str:
    """A value as JSON for an error message, cut to `limit` characters."""
    return json.dumps(v, default=str)[:limit]


def _is_real(v: Any) -> bool:
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:  # an integer too large for a float
        return False


def _int_id(v: Any, where: str, key: str) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not -(2**63) <= v < 2**63:
        raise DlcError(f"{where}: '{key}' must be a (64-bit) integer, got {_show(v, 40)}")
    return int(v)


def _bbox(v: Any, where: str) -> list[float]:
    if not isinstance(v, list) or len(v) != 4 or not all(_is_real(x) for x in v):
        raise DlcError(f"{where}: 'bbox' must be [x, y, width, height] with 4 finite numbers, got "
                       f"{_show(v, 60)}")
    if max(abs(x) for x in v) > MAX_COORD:
        raise DlcError(f"{where}: 'bbox' {_show(v, 60)} has a value beyond ±{MAX_COORD:g}; boxes are in pixels")
    if v[2] < 0 or v[3] < 0:
        raise DlcError(f"{where}: 'bbox' {v} has a negative width or height; COCO boxes are "
                       "[x, y, width, height], not [x1, y1, x2, y2]")
    return v


def _entry(items: list, i: int, source: str, what: str, keys: tuple[str, ...]) -> dict:
    item = items[i]
    if not isinstance(item, dict):
        raise DlcError(f"{source}: {what} {i} is not a JSON object")
    for key in keys:
        if key not in item:
            raise DlcError(f"{source}: {what} {i} has no '{key}'")
    return item


def load_coco_gt(gt: dict | str | Path) -> CocoGroundTruth:
    """Read and validate a COCO instances file (or its already-parsed dict)."""
    source = str(gt) if isinstance(gt, (str, Path)) else "ground truth"
    data = _read_json(Path(gt), "ground-truth") if isinstance(gt, (str, Path)) else gt
    if not isinstance(data, dict):
        raise DlcError(f"{source}: expected a COCO instances object with 'images', 'annotations' and "
                       "'categories'")
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise DlcError(f"{source}: no '{key}' list; a COCO instances file has 'images', 'annotations' and "
                           "'categories'")
        if not isinstance(data[key], list):
            raise DlcError(f"{source}: '{key}' must be a list")
    images = data["images"]
    image_ids = [_int_id(_entry(images, i, source, "image", ("id",))["id"], f"{source}: image {i}", "id")
                 for i in range(len(images))]
    cats = data["categories"]
    cat_names: dict[int, str] = {}
    for i in range(len(cats)):
        c = _entry(cats, i, source, "category", ("id",))
        cid = _int_id(c["id"], f"{source}: category {i}", "id")
        if cid in cat_names:
            raise DlcError(f"{source}: category {i} repeats id {cid}; category ids must be unique")
        cat_names[cid] = str(c.get("name", cid))
    image_set, cat_set = set(image_ids), set(cat_names)
    anns = data["annotations"]
    rows: list[tuple[int, int, list[float], float, bool]] = []
    seen_ids: set[int] = set()
    for i in range(len(anns)):
        a = _entry(anns, i, source, "annotation", ("image_id", "category_id", "bbox"))
        where = f"{source}: annotation {i}"
        img = _int_id(a["image_id"], where, "image_id")
        cat = _int_id(a["category_id"], where, "category_id")
        box = _bbox(a["bbox"], where)
        if "id" in a:
            # pycocotools indexes annotations by id: a repeated id silently replaces the earlier annotation
            ann_id = _int_id(a["id"], where, "id")
            if ann_id in seen_ids:
                raise DlcError(f"{where} repeats annotation id {ann_id}; annotation ids must be unique")
            seen_ids.add(ann_id)
        area = a.get("area", box[2] * box[3])
        if not _is_real(area) or area < 0:
            raise DlcError(f"{where}: 'area' must be a finite number >= 0, got {_show(area, 40)}")
        crowd = a.get("iscrowd", 0)
        if crowd not in (0, 1) or not isinstance(crowd, (int, bool)):
            raise DlcError(f"{where}: 'iscrowd' must be 0 or 1, got {_show(crowd, 40)}")
        if img in image_set and cat in cat_set:
            rows.append((img, cat, box, float(area), bool(crowd)))
    cat_ids = np.array(sorted(cat_set), dtype=np.int64)
    return CocoGroundTruth(
        source=source, image_ids=np.array(sorted(image_set), dtype=np.int64), category_ids=cat_ids,
        category_names=[cat_names[int(c)] for c in cat_ids],
        ann_image=np.array([r[0] for r in rows], dtype=np.int64),
        ann_category=np.array([r[1] for r in rows], dtype=np.int64),
        boxes=np.array([r[2] for r in rows], dtype=np.float64).reshape(-1, 4),
        areas=np.array([r[3] for r in rows], dtype=np.float64),
        iscrowd=np.array([r[4] for r in rows], dtype=bool))


def _detection_arrays(data: list, gt: CocoGroundTruth) -> tuple[np.ndarray, ...] | None:
    """(image, category, boxes, scores) of the kept detections when every entry is well formed, else None.

    The vectorized check accepts exactly what the entry-by-entry check accepts, only faster."""
    try:
        img = [d["image_id"] for d in data]
        cat = [d["category_id"] for d in data]
        box = [d["bbox"] for d in data]
        score = [d["score"] for d in data]
    except (KeyError, TypeError, IndexError):
        return None
    if not data:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 4)), np.zeros(0)
    if set(map(type, img)) | set(map(type, cat)) != {int} or not set(map(type, score)) <= {int, float}:
        return None
    if set(map(type, box)) != {list} or not set(map(type, itertools.chain.from_iterable(box))) <= {int, float}:
        return None
    try:
        img_a, cat_a = np.array(img, np.int64), np.array(cat, np.int64)
        box_a, score_a = np.array(box, np.float64), np.array(score, np.float64)
    except (ValueError, OverflowError):  # ragged boxes, huge numbers
        return None
    if box_a.shape != (len(data), 4) or not (np.isfinite(box_a).all() and np.isfinite(score_a).all()):
        return None
    if (box_a[:, 2:] < 0).any() or (np.abs(box_a) > MAX_COORD).any() or not np.isin(img_a, gt.image_ids).all():
        return None
    keep = np.isin(cat_a, gt.category_ids)
    return img_a[keep], cat_a[keep], box_a[keep], score_a[keep]


def load_coco_detections(detections: list | str | Path, gt: CocoGroundTruth) -> CocoDetections:
    """Read and validate COCO results (a list of {image_id, category_id, bbox, score}) against `gt`.

    Detections of categories not in the GT's `categories` are left out (as in pycocotools); a detection on
    an image the GT does not list is an error."""
    source = str(detections) if isinstance(detections, (str, Path)) else "detections"
    data = _read_json(Path(detections), "detections") if isinstance(detections, (str, Path)) else detections
    if not isinstance(data, list):
        hint = (" (this looks like a ground-truth file; pass it with --gt)"
                if isinstance(data, dict) and "annotations" in data else "")
        raise DlcError(f"{source}: expected a JSON list of detections "
                       f"{{image_id, category_id, bbox, score}}{hint}")
    fast = _detection_arrays(data, gt)
    if fast is not None:
        return CocoDetections(source, *fast)
    # something is off: find the first bad entry, checking one at a time
    image_set, cat_set = set(gt.image_ids.tolist()), set(gt.category_ids.tolist())
    rows: list[tuple[int, int, list[float], float]] = []
    for i in range(len(data)):
        d = _entry(data, i, source, "entry", ("image_id", "category_id", "bbox", "score"))
        where = f"{source}: entry {i}"
        img = _int_id(d["image_id"], where, "image_id")
        cat = _int_id(d["category_id"], where, "category_id")
        box = _bbox(d["bbox"], where)
        if not _is_real(d["score"]):
            raise DlcError(f"{where}: 'score' must be a finite number, got {_show(d['score'], 40)}")
        if img not in image_set:
            raise DlcError(f"{where}: image_id {img} is not an image of the ground truth {gt.source}; "
                           "detections must refer to the GT's images")
        if cat in cat_set:
            rows.append((img, cat, box, float(d["score"])))
    return CocoDetections(
        source=source, image=np.array([r[0] for r in rows], dtype=np.int64),
        category=np.array([r[1] for r in rows], dtype=np.int64),
        boxes=np.array([r[2] for r in rows], dtype=np.float64).reshape(-1, 4),
        scores=np.array([r[3] for r in rows], dtype=np.float64))


# ------------------------------------------------------------------------------------------- evaluation


def _iou_xywh(d: np.ndarray, g: np.ndarray, crowd: np.ndarray) -> np.ndarray:
    """pycocotools' bbIou on broadcastable (..., 4) xywh boxes, in float64."""
    w = np.minimum(d[..., 2] + d[..., 0], g[..., 2] + g[..., 0]) - np.maximum(d[..., 0], g[..., 0])
    h = np.minimum(d[..., 3] + d[..., 1], g[..., 3] + g[..., 1]) - np.maximum(d[..., 1], g[..., 1])
    inter = w * h
    da = d[..., 2] * d[..., 3]
    union = np.where(crowd, da, da + g[..., 2] * g[..., 3] - inter)
    overlap = (w > 0) & (h > 0)
    return np.where(overlap, inter / np.where(overlap, union, 1.0), 0.0)


def coco_iou(dt: np.ndarray, gt: np.ndarray, iscrowd: np.ndarray) -> np.ndarray:
    """(D, G) IoU of xywh boxes as pycocotools computes it: a crowd GT's union is the detection's area."""
    dt, gt = np.asarray(dt, np.float64).reshape(-1, 4), np.asarray(gt, np.float64).reshape(-1, 4)
    return _iou_xywh(dt[:, None, :], gt[None, :, :], np.asarray(iscrowd, bool)[None, :])


_CHUNK_CELLS = 1 << 21


def _last_argmax(x: np.ndarray) -> np.ndarray:
    """argmax over the last axis that returns the last of equal maxima (pycocotools' `<` test keeps it)."""
    return x.shape[-1] - 1 - np.argmax(x[..., ::-1], axis=-1)


def _match_all(gt: CocoGroundTruth, g_sorted: np.ndarray, g_group: np.ndarray, dt: CocoDetections,
               d_sorted: np.ndarray, d_group: np.ndarray, n_groups: int) -> tuple[np.ndarray, np.ndarray]:
    """Greedy COCO matching for every (image, category) group and area range at once.

    Groups and area ranges are independent; within one, detections are matched one at a time in score order.
    So the loop runs over the detection rank (at most 100 steps) and each step handles every (group, area
    range) that has a detection of that rank, with the group's GT padded to a power of two. Returns
    (matched, on_ignored_gt), both (A, T, len(d_sorted)) bool, indexed like `d_sorted`."""
    T, A, N = len(IOU_THRESHOLDS), len(AREA_RANGES), len(d_sorted)
    matched = np.zeros((A, T, N), dtype=bool)
    on_ignored = np.zeros((A, T, N), dtype=bool)
    g_count = np.bincount(g_group, minlength=n_groups)
    d_count = np.bincount(d_group, minlength=n_groups)
    g_first = np.r_[0, np.cumsum(g_count)[:-1]]
    d_first = np.r_[0, np.cumsum(d_count)[:-1]]
    live = np.flatnonzero((g_count > 0) & (d_count > 0))
    if live.size == 0:
        return matched, on_ignored
    crowd_s, area_s = gt.iscrowd[g_sorted], gt.areas[g_sorted]
    boxes_g, boxes_d = gt.boxes[g_sorted], dt.boxes[d_sorted]
    thr = np.minimum(IOU_THRESHOLDS, 1 - 1e-10)[None, :, None]
    # within a group, regular GT first then ignored GT (stable), separately for each area range
    ignore = [crowd_s | (area_s < lo) | (area_s > hi) for lo, hi in AREA_RANGES]
    perm = [np.lexsort((np.arange(len(g_sorted)), ig, g_group)) for ig in ignore]
    pad = 1 << np.ceil(np.log2(g_count[live])).astype(np.int64)
    chunks = []
    for width in np.unique(pad).tolist():
        same = live[pad == width]
        step = max(1, _CHUNK_CELLS // (A * T * width))  # bounds the (groups, T, width) work arrays
        chunks += [(same[i:i + step], width) for i in range(0, len(same), step)]
    for groups, width in chunks:
        B = len(groups) * A
        grp = np.tile(groups, A)
        area_idx = np.repeat(np.arange(A), len(groups))
        order = np.argsort(-d_count[grp], kind="stable")  # most detections first: the active ones are a prefix
        grp, area_idx = grp[order], area_idx[order]
        cols = np.arange(width)
        valid = cols[None, :] < g_count[grp][:, None]
        pos = np.where(valid, g_first[grp][:, None] + cols[None, :], 0)
        gidx = np.stack([perm[a] for a in range(A)])[area_idx[:, None], pos]  # (B, width) into g_sorted
        ign = np.stack(ignore)[area_idx[:, None], gidx] & valid
        crowd = crowd_s[gidx] & valid
        gbox = boxes_g[gidx]
        taken = np.zeros((B, T, width), dtype=bool)
        n_regular_mask = valid & ~ign
        counts = d_count[grp]
        for r in range(int(counts[0])):
            n = int(np.count_nonzero(counts > r))
            di = d_first[grp[:n]] + r
            iou = _iou_xywh(boxes_d[di][:, None, :], gbox[:n], crowd[:n])
            iou = np.where(valid[:n], iou, -1.0)
            free = ~taken[:n] | crowd[:n, None, :]
            cand = np.where((iou[:, None, :] >= thr) & free, iou[:, None, :], -1.0)  # (n, T, width)
            reg = np.where(n_regular_mask[:n, None, :], cand, -1.0)
            igd = np.where(ign[:n, None, :], cand, -1.0)
            best_reg, best_ign = _last_argmax(reg), _last_argmax(igd)
            ok_reg = reg.max(axis=-1) >= 0
            ok_ign = ~ok_reg & (igd.max(axis=-1) >= 0)
            best = np.where(ok_reg, best_reg, best_ign)
            hit = ok_reg | ok_ign  # (n, T)
            b_hit, t_hit = np.nonzero(hit)
            taken[b_hit, t_hit, best[b_hit, t_hit]] = True
            matched[area_idx[:n, None], np.arange(T)[None, :], di[:, None]] = hit
            on_ignored[area_idx[:n, None], np.arange(T)[None, :], di[:, None]] = ok_ign
    return matched, on_ignored


def _mean_defined(x: np.ndarray) -> float:
    x = x[x > -1]
    return float(np.mean(x)) if x.size else -1.0


def coco_evaluate(gt: dict | str | Path | CocoGroundTruth, detections: list | str | Path | CocoDetections,
                  iou_type: str = "bbox") -> CocoEvalResult:
    """COCO bbox evaluation of `detections` against `gt`, equal to pycocotools' COCOeval.

    Args:
        gt: a COCO instances JSON file, its parsed dict, or a loaded CocoGroundTruth.
        detections: a COCO results JSON file (a list of {image_id, category_id, bbox [x, y, w, h], score}),
            the parsed list, or loaded CocoDetections.
        iou_type: only "bbox" is supported.

    Raises:
        DlcError: on an unreadable or malformed file (naming the entry and key), or another iou_type.
    """
    if iou_type != "bbox":
        raise DlcError(f"coco_evaluate: iou_type '{iou_type}' is not supported; only 'bbox' is")
    gt = gt if isinstance(gt, CocoGroundTruth) else load_coco_gt(gt)
    dt = detections if isinstance(detections, CocoDetections) else load_coco_detections(detections, gt)
    T, R, K, A, M = len(IOU_THRESHOLDS), len(RECALL_THRESHOLDS), len(gt.category_ids), len(AREA_RANGES), len(MAX_DETS)
    # GT by (category, image, file order); detections by (category, image, descending score, file order),
    # which is pycocotools' mergesort within an image and its image-by-image concatenation
    g_sorted = np.lexsort((np.arange(len(gt.ann_image)), gt.ann_image, gt.ann_category))
    d_sorted = np.lexsort((np.arange(len(dt.image)), -dt.scores, dt.image, dt.category))
    pair_dtype = np.dtype([("c", np.int64), ("i", np.int64)])
    g_pairs = np.rec.fromarrays([gt.ann_category[g_sorted], gt.ann_image[g_sorted]], dtype=pair_dtype)
    d_pairs = np.rec.fromarrays([dt.category[d_sorted], dt.image[d_sorted]], dtype=pair_dtype)
    keys = np.unique(np.concatenate([g_pairs, d_pairs]))
    g_group = np.searchsorted(keys, g_pairs)
    d_group = np.searchsorted(keys, d_pairs)
    # rank of each detection within its group; pycocotools keeps the best 100 per image and category
    d_first = np.r_[0, np.flatnonzero(d_group[1:] != d_group[:-1]) + 1] if len(d_group) else np.zeros(0, int)
    rank = np.arange(len(d_group)) - np.repeat(d_first, np.diff(np.r_[d_first, len(d_group)]))
    keep = rank < MAX_DETS[-1]
    d_sorted, d_group, rank = d_sorted[keep], d_group[keep], rank[keep]
    matched, on_ignored = _match_all(gt, g_sorted, g_group, dt, d_sorted, d_group, len(keys))

    d_area = dt.boxes[d_sorted, 2] * dt.boxes[d_sorted, 3]
    d_cat = dt.category[d_sorted]
    scores = dt.scores[d_sorted]
    g_cat, g_area, g_crowd = gt.ann_category[g_sorted], gt.areas[g_sorted], gt.iscrowd[g_sorted]
    precision = -np.ones((T, R, K, A, M))
    recall = -np.ones((T, K, A, M))
    d_bounds = np.searchsorted(d_cat, gt.category_ids, side="left"), np.searchsorted(d_cat, gt.category_ids, "right")
    for a, (lo, hi) in enumerate(AREA_RANGES):
        out_of_range = (d_area < lo) | (d_area > hi)
        ignored = on_ignored[a] | (~matched[a] & out_of_range[None, :])
        tp_all, fp_all = matched[a] & ~ignored, ~matched[a] & ~ignored
        g_regular = ~(g_crowd | (g_area < lo) | (g_area > hi))
        n_gt = np.bincount(np.searchsorted(gt.category_ids, g_cat[g_regular]), minlength=K)
        for k in range(K):
            if n_gt[k] == 0:
                continue  # -1: no GT to find
            s, e = d_bounds[0][k], d_bounds[1][k]
            for m, max_det in enumerate(MAX_DETS):
                sel = np.flatnonzero(rank[s:e] < max_det) + s
                order = sel[np.argsort(-scores[sel], kind="mergesort")]
                tp_sum = np.cumsum(tp_all[:, order], axis=1, dtype=np.float64)
                fp_sum = np.cumsum(fp_all[:, order], axis=1, dtype=np.float64)
                nd = len(order)
                if nd == 0:
                    precision[:, :, k, a, m], recall[:, k, a, m] = 0.0, 0.0
                    continue
                rc = tp_sum / n_gt[k]
                pr = tp_sum / (fp_sum + tp_sum + np.spacing(1))
                pr = np.maximum.accumulate(pr[:, ::-1], axis=1)[:, ::-1]
                recall[:, k, a, m] = rc[:, -1]
                q = np.zeros((T, R))
                for t in range(T):
                    idx = np.searchsorted(rc[t], RECALL_THRESHOLDS, side="left")
                    inside = idx < nd
                    q[t, inside] = pr[t, idx[inside]]
                precision[:, :, k, a, m] = q
    stats = []
    for ap, iou, area, max_det in _STATS:
        a, m = AREA_LABELS.index(area), MAX_DETS.index(max_det)
        s = precision if ap else recall
        if iou is not None:
            s = s[np.where(iou == IOU_THRESHOLDS)[0]]
        stats.append(_mean_defined(s[:, :, :, a, m] if ap else s[:, :, a, m]))
    names = gt.category_names
    if len(set(names)) < len(names):  # repeated names would collide as keys: fall back to the ids
        names = [str(c) for c in gt.category_ids.tolist()]
    per_category = {name: _mean_defined(precision[:, :, k, 0, 2]) for k, name in enumerate(names)}
    return CocoEvalResult(stats=stats, precision=precision, recall=recall,
                          category_ids=gt.category_ids.tolist(), category_names=list(gt.category_names),
                          per_category=per_category, num_images=len(gt.image_ids), num_gt=len(gt.ann_image),
                          num_detections=len(dt.image))


def _group(image: np.ndarray, category: np.ndarray) -> dict[tuple[int, int], np.ndarray]:
    """Indices per (image, category), each in file order."""
    if len(image) == 0:
        return {}
    order = np.lexsort((np.arange(len(image)), category, image))
    keys = np.stack([image[order], category[order]], axis=1)
    starts = np.flatnonzero(np.r_[True, np.any(keys[1:] != keys[:-1], axis=1)])
    ends = np.r_[starts[1:], len(order)]
    return {(int(keys[s, 0]), int(keys[s, 1])): order[s:e] for s, e in zip(starts, ends)}


# ------------------------------------------------------------------------------ VOC metrics from COCO files


def coco_to_arrays(gt: CocoGroundTruth, dt: CocoDetections) -> tuple[list, list]:
    """Per GT image (sorted ids): (boxes xyxy, labels, crowd) and (boxes xyxy, scores, labels), the inputs of
    dlc.runtime.metrics.evaluate_detections. Labels index gt.category_ids; crowd GT becomes `difficult`."""
    label_of = {c: i for i, c in enumerate(gt.category_ids.tolist())}

    def xyxy(b: np.ndarray) -> np.ndarray:
        return np.concatenate([b[:, :2], b[:, :2] + b[:, 2:]], axis=1).astype(np.float32)

    g_groups, d_groups = _group(gt.ann_image, np.zeros_like(gt.ann_image)), _group(dt.image, np.zeros_like(dt.image))
    empty = np.zeros(0, dtype=np.int64)
    gts, preds = [], []
    for img in gt.image_ids.tolist():
        g, d = g_groups.get((img, 0), empty), d_groups.get((img, 0), empty)
        gts.append((xyxy(gt.boxes[g]), np.array([label_of[c] for c in gt.ann_category[g].tolist()], np.int64),
                    gt.iscrowd[g]))
        preds.append((xyxy(dt.boxes[d]), dt.scores[d],
                      np.array([label_of[c] for c in dt.category[d].tolist()], np.int64)))
    return gts, preds


@dataclass
class CocoReport:
    """COCO statistics plus VOC-style mAP (all-point and 11-point) and P/R/F1 from the same two files."""

    coco: CocoEvalResult
    voc: dict[str, Any]  # evaluate_detections' result (all_point), with curves
    voc07_map: float | None
    voc07_ap: list[float | None]

    def to_dict(self) -> dict[str, Any]:
        from .metrics import metrics_to_json

        voc = metrics_to_json(self.voc)
        for row, ap07, name in zip(voc["per_class"], self.voc07_ap, self.coco.category_names):
            row.update(name=name, ap_voc07=ap07)
        return {"coco": self.coco.to_dict(), "voc": {**voc, "map_voc07": self.voc07_map}}

    def summary(self) -> str:
        v = self.voc

        def fmt(x: float | None) -> str:
            return "n/a" if x is None else f"{x:.3f}"

        return "\n".join([
            self.coco.summary(),
            f" mAP@{v['iou_threshold']:g} (VOC all-point) = {fmt(v['map'])}   mAP@{v['iou_threshold']:g} "
            f"(VOC07 11-point) = {fmt(self.voc07_map)}",
            f" at score >= {v['score_threshold']:g}: TP {v['tp']}  FP {v['fp']}  FN {v['fn']}  "
            f"precision {v['precision']:.3f}  recall {v['recall']:.3f}  F1 {v['f1']:.3f}",
        ])


def coco_report(gt: dict | str | Path, detections: list | str | Path, iou_threshold: float = 0.5,
                score_threshold: float = 0.5) -> CocoReport:
    """Evaluate COCO files both ways: COCOeval statistics and VOC metrics (crowd GT counted as difficult)."""
    from .metrics import average_precision, evaluate_detections

    g = load_coco_gt(gt)
    d = load_coco_detections(detections, g)
    gts, preds = coco_to_arrays(g, d)
    voc = evaluate_detections(gts, preds, max(len(g.category_ids), 1), iou_threshold, score_threshold)
    ap07 = [average_precision(c["recall"], c["precision"], "voc07") if row["ap"] is not None else None
            for row, c in zip(voc["per_class"], voc["curves"])]
    defined = [a for a in ap07 if a is not None]
    return CocoReport(coco=coco_evaluate(g, d), voc=voc, voc07_map=float(np.mean(defined)) if defined else None,
                      voc07_ap=ap07)
