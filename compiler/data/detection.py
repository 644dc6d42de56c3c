"""Detection data: a built-in synthetic set of several shapes per image with exact boxes, COCO and YOLO loaders,
and a batch loader whose augmentation moves boxes with the pixels.

Conventions: images are float32 N×C×H×W in [0, 1] at the model's input size; boxes are float32 xyxy in pixels
of the stored image, with pixel (i, j) covering [j, j+1) × [i, i+1), so a box of whole pixels x1..x2-1 is
(x1, y1, x2, y2). Loaded images get a plain bilinear resize (no letterbox) to the input size, and boxes are
scaled by the same factors (x · W/w0, y · H/h0), which is exact for that geometry.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from ..errors import Diagnostic, DlcError
from .augment import AugmentConfig, augment
from .datasets import IMAGE_SUFFIXES, ImageCollector
from .lazy import read_subset, subset
from .loader import BatchLoader
from .synthetic import SHAPES, _mask

log = logging.getLogger("dlc.data")

CROP_MIN_SCALE = 0.6  # detection crop: a random square-scaled window of 60–100 % of each side
CROP_MIN_VISIBLE = 0.4  # a box keeps less than this fraction of its area inside the crop: dropped


@dataclass
class DetectionDataset:
    images: np.ndarray  # float32 N×C×H×W in [0, 1], at the model's input size
    boxes: list[np.ndarray]  # per image, float32 (M, 4) xyxy in pixels of the stored image
    labels: list[np.ndarray]  # per image, int64 (M,) class index 0..C-1
    classes: list[str]
    image_ids: list[int]  # COCO image ids (synthetic / YOLO: 1..N)
    iscrowd: list[np.ndarray] | None = None  # per image bool (M,); crowd boxes are not training targets

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, idx) -> DetectionDataset:
        idx = np.arange(len(self))[idx] if not isinstance(idx, np.ndarray) or idx.dtype == bool else idx
        idx = [int(i) for i in np.atleast_1d(idx)]
        return DetectionDataset(
            subset(self.images, idx), [self.boxes[i] for i in idx], [self.labels[i] for i in idx], list(self.classes),
            [self.image_ids[i] for i in idx], None if self.iscrowd is None else [self.iscrowd[i] for i in idx])

    def crowd(self, i: int) -> np.ndarray:
        """The crowd flags of image i (all False where the set has none)."""
        return np.zeros(len(self.labels[i]), bool) if self.iscrowd is None else self.iscrowd[i]

    def to_coco(self) -> dict:
        """The set as a COCO instances dict (category id = class index + 1), e.g. as ground truth for COCO mAP."""
        h, w = self.images.shape[2:]
        images, annotations = [], []
        for i, image_id in enumerate(self.image_ids):
            images.append({"id": int(image_id), "width": int(w), "height": int(h), "file_name": f"{image_id}.png"})
            crowd = self.crowd(i)
            for box, label, flag in zip(self.boxes[i], self.labels[i], crowd):
                bw, bh = float(box[2] - box[0]), float(box[3] - box[1])
                annotations.append({
                    "id": len(annotations) + 1, "image_id": int(image_id), "category_id": int(label) + 1,
                    "bbox": [float(box[0]), float(box[1]), bw, bh], "area": bw * bh, "iscrowd": int(flag)})
        categories = [{"id": k + 1, "name": name} for k, name in enumerate(self.classes)]
        return {"images": images, "annotations": annotations, "categories": categories}


# ---------------------------------------------------------------------------------------------------------------
# synthetic shapes


def _tight_boxes(masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Tight xyxy pixel boxes of masks (..., H, W) and whether each mask is non-empty."""
    h, w = masks.shape[-2:]
    rows = masks.any(axis=-1)  # (..., H)
    cols = masks.any(axis=-2)  # (..., W)
    y1 = rows.argmax(-1)
    y2 = h - rows[..., ::-1].argmax(-1)
    x1 = cols.argmax(-1)
    x2 = w - cols[..., ::-1].argmax(-1)
    return np.stack([x1, y1, x2, y2], -1).astype(np.float32), rows.any(-1)


def _render_shapes(samples: int, num_classes: int, shape: tuple[int, int, int], seed: int, max_objects: int,
                   min_size: float, max_size: float) -> tuple[DetectionDataset, np.ndarray]:
    """The synthetic set and its object map (N×H×W int8: the index in the image's boxes of the object seen at
    each pixel, -1 for background), from which every box can be recomputed."""
    c, h, w = shape
    n, k = samples, max_objects
    rng = np.random.default_rng([seed, 4099])
    count = rng.integers(1, k + 1, n)
    cls = rng.integers(0, num_classes, (n, k))
    radius = (rng.uniform(min_size, max_size, (n, k)) * min(h, w) / 2).astype(np.float32)
    cy = rng.uniform(radius, h - radius).astype(np.float32)
    cx = rng.uniform(radius, w - radius).astype(np.float32)
    colour = rng.uniform(0.5, 1.0, (n, k, c)).astype(np.float32)
    yy = np.arange(h, dtype=np.float32)[None, :, None] + 0.5
    xx = np.arange(w, dtype=np.float32)[None, None, :] + 0.5
    # the map of which slot is on top at each pixel, and each slot's pixel count (as drawn and still visible)
    top = np.full((n, h, w), -1, np.int8)
    drawn = np.zeros((n, k), np.int64)
    seen = np.zeros((n, k), np.int64)
    for j in range(k):
        active = np.flatnonzero(j < count)
        u = (xx - cx[active, j, None, None]) / radius[active, j, None, None]
        v = (yy - cy[active, j, None, None]) / radius[active, j, None, None]
        m = np.zeros((len(active), h, w), bool)
        for q in range(num_classes):
            sel = cls[active, j] == q
            if sel.any():
                m[sel] = _mask(SHAPES[q], u[sel], v[sel])
        if j > 0:
            # skip a placement that would hide more than half of an earlier object
            img, _, _ = np.nonzero(m)
            under = top[active][m].astype(np.int64)
            hit = under >= 0
            covered = np.bincount(img[hit] * k + under[hit], minlength=len(active) * k).reshape(-1, k)
            ok = ((seen[active] - covered) * 2 >= drawn[active]).all(1)
            active, m, covered = active[ok], m[ok], covered[ok]
            seen[active] -= covered
        sub = top[active]
        sub[m] = j
        top[active] = sub
        drawn[active, j] = seen[active, j] = m.sum((1, 2))
    present = seen > 0
    # the kept objects of each image, in drawing order, are its boxes; renumber the map to match
    remap = np.where(present, np.cumsum(present, axis=1) - 1, -1).astype(np.int8)
    boxes = np.zeros((n, k, 4), np.float32)
    images = np.empty((n, c, h, w), np.float32)
    # background: a per-image grey level, a soft sinusoidal texture and pixel noise; objects are flat colours
    base = rng.uniform(0.0, 0.35, (n, c, 1, 1)).astype(np.float32)
    freq = rng.uniform(0.05, 0.3, (n, 2)).astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi, n).astype(np.float32)
    texture = np.float32(0.06) * np.sin(freq[:, 0, None, None] * yy + freq[:, 1, None, None] * xx
                                        + phase[:, None, None])
    np.add(base, texture[:, None], out=images)
    objects = np.full((n, h, w), -1, np.int8)
    for j in range(k):
        mask = top == j
        boxes[:, j] = _tight_boxes(mask)[0]
        objects[mask] = np.broadcast_to(remap[:, j, None, None], mask.shape)[mask]
        for ch in range(c):
            np.copyto(images[:, ch], np.broadcast_to(colour[:, j, ch, None, None], mask.shape), where=mask)
    images += rng.standard_normal(images.shape, dtype=np.float32) * np.float32(0.04)
    np.clip(images, 0, 1, out=images)
    data = DetectionDataset(images, [boxes[i][present[i]] for i in range(n)],
                            [cls[i][present[i]].astype(np.int64) for i in range(n)],
                            list(SHAPES[:num_classes]), list(range(1, n + 1)))
    return data, objects


def make_detection_shapes(samples: int, num_classes: int, shape: tuple[int, int, int], seed: int = 0,
                          max_objects: int = 4, min_size: float = 0.15, max_size: float = 0.5) -> DetectionDataset:
    """1..max_objects shapes per image (the classification set's disc, square, triangle, ...), each of a random
    size (a fraction of the image side in [min_size, max_size]), place and colour over a textured, noisy
    background. A later shape that would hide more than half of an earlier one is not drawn; boxes are the tight
    bounds of each object's visible pixels. Deterministic by seed."""
    if not 1 <= num_classes <= len(SHAPES):
        raise DlcError(f"synthetic_detection has 1 to {len(SHAPES)} classes, asked for {num_classes}")
    if not 1 <= max_objects <= 64:
        raise DlcError(f"synthetic_detection: max_objects must be in [1, 64], got {max_objects}")
    if not 0 < min_size <= max_size <= 1:
        raise DlcError(f"synthetic_detection: need 0 < min_size <= max_size <= 1, got {min_size}, {max_size}")
    return _render_shapes(samples, num_classes, tuple(shape), seed, max_objects, min_size, max_size)[0]


# ---------------------------------------------------------------------------------------------------------------
# COCO and YOLO files


def _clip_boxes(boxes: np.ndarray, w0: float, h0: float) -> tuple[np.ndarray, np.ndarray]:
    """Boxes clipped to the image and the mask of those still non-empty."""
    boxes = boxes.copy()
    boxes[:, 0::2] = np.clip(boxes[:, 0::2], 0, w0)
    boxes[:, 1::2] = np.clip(boxes[:, 1::2], 0, h0)
    return boxes, (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])


def _resolve(base_dir: Path, value: Any) -> Path:
    path = Path(str(value))
    return path if path.is_absolute() else base_dir / path


def _safe_child(folder: Path, name: Any, where: str) -> Path:
    """folder/name, refusing names that could leave the folder (absolute paths, '..')."""
    if not isinstance(name, str) or not name:
        raise DlcError(Diagnostic(f"{where}: 'file_name' must be a non-empty string, got {name!r}"))
    parts = PurePosixPath(name.replace("\\", "/"))
    if not parts.parts or parts.is_absolute() or ":" in parts.parts[0] or ".." in parts.parts:
        raise DlcError(Diagnostic(f"{where}: file_name {name!r} leaves the images folder",
                                  hint="use a path relative to the images folder, without '..'"))
    return folder.joinpath(*parts.parts)


def _number_list(value: Any, n: int) -> bool:
    return (isinstance(value, list) and len(value) == n
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) for v in value))


def _load_coco(images_dir: Path, ann_file: Path, input_shape: tuple[int, int, int],
               categories: list[tuple[int, str]] | None = None, cfg: dict | None = None
               ) -> tuple[DetectionDataset, list[tuple[int, str]]]:
    c, h, w = input_shape
    f = str(ann_file)
    if not ann_file.is_file():
        raise DlcError(Diagnostic("COCO annotation file not found", file=f, hint="check data.annotations"))
    if not images_dir.is_dir():
        raise DlcError(Diagnostic(f"images folder '{images_dir}' not found", file=f, hint="check data.images"))
    try:
        doc = json.loads(ann_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:  # RecursionError: nested too deep
        line = getattr(exc, "lineno", None)
        raise DlcError(Diagnostic(f"not valid JSON: {exc}", file=f, line=line)) from None
    if not isinstance(doc, dict) or not all(isinstance(doc.get(k), list) for k in ("images", "categories")):
        raise DlcError(Diagnostic("a COCO instances file needs 'images' and 'categories' lists", file=f))
    anns = doc.get("annotations", [])
    if not isinstance(anns, list):
        raise DlcError(Diagnostic("'annotations' must be a list", file=f))
    cats = []
    for cat in doc["categories"]:
        if not (isinstance(cat, dict) and isinstance(cat.get("id"), int) and isinstance(cat.get("name"), str)):
            raise DlcError(Diagnostic(f"category {cat!r} needs an integer 'id' and a string 'name'", file=f))
        cats.append((cat["id"], cat["name"]))
    cats.sort()
    if len({i for i, _ in cats}) != len(cats):
        raise DlcError(Diagnostic("category ids are not unique", file=f))
    if not cats:
        raise DlcError(Diagnostic("no categories", file=f))
    if categories is not None and cats != categories:
        raise DlcError(Diagnostic("categories differ from the training annotations' (ids and names must match)",
                                  file=f))
    cat_index = {cid: k for k, (cid, _) in enumerate(cats)}
    entries: dict[int, dict] = {}
    for im in doc["images"]:
        if not (isinstance(im, dict) and isinstance(im.get("id"), int)):
            raise DlcError(Diagnostic(f"image entry {str(im)[:80]} needs an integer 'id'", file=f))
        if im["id"] in entries:
            raise DlcError(Diagnostic(f"image id {im['id']} appears twice", file=f))
        entries[im["id"]] = im
    per_image: dict[int, list[tuple[list[float], int, bool]]] = {i: [] for i in entries}
    for a in anns:
        aid = a.get("id") if isinstance(a, dict) else None
        where = f"annotation id {aid}"
        if not isinstance(a, dict):
            raise DlcError(Diagnostic(f"annotation {a!r} must be a mapping", file=f))
        if not isinstance(a.get("image_id"), int) or a["image_id"] not in entries:
            raise DlcError(Diagnostic(f"{where}: unknown image_id {a.get('image_id')!r}", file=f))
        if not isinstance(a.get("category_id"), int) or a["category_id"] not in cat_index:
            raise DlcError(Diagnostic(f"{where}: unknown category_id {a.get('category_id')!r}", file=f,
                                      hint=f"known ids: {', '.join(str(i) for i, _ in cats)}"))
        if not _number_list(a.get("bbox"), 4):
            raise DlcError(Diagnostic(f"{where}: 'bbox' must be 4 finite numbers [x, y, w, h], got "
                                      f"{a.get('bbox')!r}", file=f))
        per_image[a["image_id"]].append((a["bbox"], cat_index[a["category_id"]], bool(a.get("iscrowd", 0))))
    images = ImageCollector(cfg or {}, input_shape, len(entries))
    boxes, labels, crowds, ids = [], [], [], []
    dropped = resized = 0
    for image_id, im in entries.items():
        path = _safe_child(images_dir, im.get("file_name"), f"{f}: image id {image_id}")
        size = images.add(path)
        if size is None:  # unreadable, and data.on_bad_image: skip
            continue
        # boxes are in the frame of the listed width/height; a file resized since then still lines up
        w0, h0 = size
        if isinstance(im.get("width"), int) and isinstance(im.get("height"), int) and im["width"] > 0 < im["height"]:
            resized += (im["width"], im["height"]) != size
            w0, h0 = im["width"], im["height"]
        rows = per_image[image_id]
        xywh = np.asarray([r[0] for r in rows], np.float64).reshape(-1, 4)
        xyxy = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1)
        xyxy, keep = _clip_boxes(xyxy, w0, h0)
        dropped += int((~keep).sum())
        scale = np.array([w / w0, h / h0, w / w0, h / h0])
        boxes.append((xyxy[keep] * scale).astype(np.float32))
        labels.append(np.asarray([r[1] for r in rows], np.int64)[keep])
        crowds.append(np.asarray([r[2] for r in rows], bool)[keep])
        ids.append(image_id)
    if not ids:
        raise DlcError(Diagnostic("no images listed" if not entries else "no readable images", file=f))
    if dropped:
        log.warning("%s: dropped %d boxes that are empty once clipped to their image", f, dropped)
    if resized:
        log.warning("%s: %d images differ in size from their width/height entries; boxes were scaled from the "
                    "listed size", f, resized)
    return DetectionDataset(images.finish(f), boxes, labels, [name for _, name in cats], ids, crowds), cats


def read_names_file(path: Path) -> list[str]:
    """A class names file: one name per line, blank lines skipped; a missing or empty file is an error naming it."""
    if not path.is_file():
        raise DlcError(Diagnostic("class names file not found", file=str(path), hint="check data.classes"))
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not names:
        raise DlcError(Diagnostic("class names file is empty (one name per line)", file=str(path)))
    return names


def _yolo_classes(cfg: dict, base_dir: Path) -> list[str]:
    classes = cfg.get("classes")
    if isinstance(classes, str):
        classes = read_names_file(_resolve(base_dir, classes))
    if not (isinstance(classes, list) and classes and all(isinstance(n, str) for n in classes)):
        raise DlcError("dataset yolo needs 'classes': a list of class names or a file with one name per line")
    return classes


def _load_yolo(images_dir: Path, labels_dir: Path, classes: list[str], input_shape: tuple[int, int, int],
               cfg: dict | None = None) -> DetectionDataset:
    c, h, w = input_shape
    if not images_dir.is_dir():
        raise DlcError(f"data.root: images folder '{images_dir}' not found")
    files = sorted(p for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DlcError(f"data.root: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in '{images_dir}'")
    if not labels_dir.is_dir():
        raise DlcError(f"data.root: labels folder '{labels_dir}' not found (one .txt of boxes per image)")
    images = ImageCollector(cfg or {}, input_shape, len(files))
    boxes, labels, ids = [], [], []
    dropped = 0
    for number, path in enumerate(files, 1):
        size = images.add(path)
        if size is None:  # unreadable, and data.on_bad_image: skip
            continue
        w0, h0 = size
        label_file = labels_dir / (path.stem + ".txt")
        rows: list[list[float]] = []
        if label_file.is_file():  # no label file: an image without objects, as in YOLO
            try:
                text = label_file.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError) as exc:
                raise DlcError(Diagnostic(f"cannot read label file: {exc}", file=str(label_file))) from None
            for lineno, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                fields = line.split()
                try:
                    values = [float(v) for v in fields]
                except ValueError:
                    values = []
                if len(values) != 5 or not all(np.isfinite(values)) or values[0] != int(values[0]):
                    raise DlcError(Diagnostic(f"expected 'class cx cy w h' (class an integer, the rest "
                                              f"normalised numbers), got {line.strip()!r}",
                                              file=str(label_file), line=lineno))
                if not 0 <= values[0] < len(classes):
                    raise DlcError(Diagnostic(f"class {int(values[0])} is not in 0..{len(classes) - 1} "
                                              f"({len(classes)} classes)", file=str(label_file), line=lineno))
                rows.append(values)
        arr = np.asarray(rows, np.float64).reshape(-1, 5)
        # normalised centre/size -> pixels of the original image; clip there so the drop count is honest
        cxcy, wh = arr[:, 1:3] * [w0, h0], arr[:, 3:5] * [w0, h0]
        xyxy, keep = _clip_boxes(np.concatenate([cxcy - wh / 2, cxcy + wh / 2], 1), w0, h0)
        dropped += int((~keep).sum())
        boxes.append((xyxy[keep] * [w / w0, h / h0, w / w0, h / h0]).astype(np.float32))
        labels.append(arr[keep, 0].astype(np.int64))
        ids.append(number)
    if dropped:
        log.warning("%s: dropped %d boxes that are empty once clipped to their image", labels_dir, dropped)
    if not ids:
        raise DlcError(f"data.root: no readable images in '{images_dir}'")
    return DetectionDataset(images.finish(str(images_dir)), boxes, labels, list(classes), ids)


def _random_split(data: DetectionDataset, val_fraction: float, seed: int, what: str
                  ) -> tuple[DetectionDataset, DetectionDataset]:
    order = np.random.default_rng([seed, 104729]).permutation(len(data))
    n_val = int(round(len(data) * val_fraction))
    if n_val >= len(data):
        raise DlcError(f"dataset '{what}': val_fraction {val_fraction} leaves no training images "
                       f"out of {len(data)}")
    return data.subset(np.sort(order[n_val:])), data.subset(np.sort(order[:n_val]))


def load_detection_dataset(cfg: dict, input_shape: tuple[int, int, int], base_dir: Path
                           ) -> tuple[DetectionDataset, DetectionDataset]:
    """(train, val) of a detection `data:` section, images at the model's input size (plain bilinear resize,
    boxes scaled alike). Paths are relative to base_dir, the YAML file's folder."""
    input_shape = tuple(int(s) for s in input_shape)
    base_dir = Path(base_dir)
    kind = cfg.get("dataset")
    seed = int(cfg.get("seed", 0))
    val_fraction = float(cfg.get("val_fraction", 0.2))
    if kind == "synthetic_detection":
        data = make_detection_shapes(int(cfg.get("samples", 2000)), int(cfg.get("num_classes", 3)), input_shape,
                                     seed, int(cfg.get("max_objects", 4)))
        return _random_split(data, val_fraction, seed, kind)
    if kind == "coco":
        for key in ("images", "annotations"):
            if not cfg.get(key):
                raise DlcError(f"dataset coco needs '{key}' (the images folder and the instances JSON file)")
        train, cats = _load_coco(_resolve(base_dir, cfg["images"]),
                                 _resolve(base_dir, cfg["annotations"]), input_shape, cfg=cfg)
        if cfg.get("val_annotations"):
            val_images = cfg.get("val_images") or cfg["images"]
            val, _ = _load_coco(_resolve(base_dir, val_images),
                                _resolve(base_dir, cfg["val_annotations"]), input_shape, cats, cfg)
            return train, val
        return _random_split(train, val_fraction, seed, kind)
    if kind == "yolo":
        if not cfg.get("root"):
            raise DlcError("dataset yolo needs 'root': a folder with images/ and labels/")
        root = _resolve(base_dir, cfg["root"])
        classes = _yolo_classes(cfg, base_dir)
        if (root / "images" / "train").is_dir() and (root / "images" / "val").is_dir():
            # the Ultralytics layout: images/{train,val} beside labels/{train,val}
            return (_load_yolo(root / "images" / "train", root / "labels" / "train", classes, input_shape, cfg),
                    _load_yolo(root / "images" / "val", root / "labels" / "val", classes, input_shape, cfg))
        data = _load_yolo(root / "images", root / "labels", classes, input_shape, cfg)
        return _random_split(data, val_fraction, seed, kind)
    raise DlcError(f"dataset {kind!r} is not a detection dataset (synthetic_detection, coco, yolo)")


# ---------------------------------------------------------------------------------------------------------------
# batches with box-aware augmentation


def mirror_boxes(boxes: np.ndarray, width: float) -> np.ndarray:
    """xyxy boxes of a horizontally flipped image: x1' = W - x2, x2' = W - x1."""
    out = boxes.copy()
    out[:, 0] = width - boxes[:, 2]
    out[:, 2] = width - boxes[:, 0]
    return out


def _crop_matrix(start: np.ndarray, size: np.ndarray, dst: int, src: int) -> np.ndarray:
    """Bilinear weights (n × dst × src) sampling the windows [start, start + size) of a src-pixel axis at dst
    evenly spaced pixel centres (align_corners=False, as datasets.resize)."""
    n = len(start)
    pos = start[:, None] + (np.arange(dst) + 0.5)[None] * (size / dst)[:, None] - 0.5
    pos = np.clip(pos, 0, src - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, src - 1)
    frac = (pos - lo).astype(np.float32)
    m = np.zeros((n, dst, src), np.float32)
    b, r = np.arange(n)[:, None], np.arange(dst)[None]
    m[b, r, lo] += 1 - frac  # no repeated index within one statement, so plain fancy += is exact
    m[b, r, hi] += frac
    return m


def augment_detection(x: np.ndarray, boxes: list[np.ndarray], labels: list[np.ndarray], cfg: AugmentConfig,
                      rng: np.random.Generator, pca: tuple[np.ndarray, np.ndarray] | None = None
                      ) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
    """Mirror (half of the images), crop (a random window of CROP_MIN_SCALE..1 of each side, same scale for
    both, resized back to H×W; boxes shifted, scaled, clipped, and dropped when less than CROP_MIN_VISIBLE of
    their area stays inside) and PCA colour, with boxes moved exactly as the pixels."""
    n, _, h, w = x.shape
    boxes = [b.astype(np.float32, copy=True) for b in boxes]
    labels = list(labels)
    if cfg.mirror:
        flip = rng.random(n) < 0.5
        x = x.copy()
        x[flip] = x[flip, :, :, ::-1]
        for i in np.flatnonzero(flip):
            boxes[i] = mirror_boxes(boxes[i], w)
    if cfg.crop_pad > 0:
        scale = rng.uniform(CROP_MIN_SCALE, 1.0, n)
        ch, cw = scale * h, scale * w
        y0 = rng.random(n) * (h - ch)
        x0 = rng.random(n) * (w - cw)
        a = _crop_matrix(y0, ch, h, h)
        b = _crop_matrix(x0, cw, w, w)
        x = np.matmul(np.matmul(a[:, None], x), b.transpose(0, 2, 1)[:, None])
        for i in range(n):
            bx = boxes[i].astype(np.float64)
            bx[:, 0::2] = (bx[:, 0::2] - x0[i]) * (w / cw[i])
            bx[:, 1::2] = (bx[:, 1::2] - y0[i]) * (h / ch[i])
            full = (bx[:, 2] - bx[:, 0]) * (bx[:, 3] - bx[:, 1])
            clipped, nonempty = _clip_boxes(bx, w, h)
            area = (clipped[:, 2] - clipped[:, 0]) * (clipped[:, 3] - clipped[:, 1])
            keep = nonempty & (area >= CROP_MIN_VISIBLE * full)
            boxes[i] = clipped[keep].astype(np.float32)
            labels[i] = labels[i][keep]
    if cfg.pca_color > 0 and pca is not None:
        x = augment(x, AugmentConfig(pca_color=cfg.pca_color), rng, pca)
    return np.ascontiguousarray(x, dtype=np.float32), boxes, labels


class DetectionLoader(BatchLoader):
    """BatchLoader for detection: yields (x normalised B×C×H×W, [(boxes (M, 4) xyxy pixels, labels (M,)), ...]),
    crowd boxes left out; same background prefetch and (seed, epoch, iteration) determinism."""

    def __init__(self, data: DetectionDataset, batch_size: int, mean, std, seed: int = 0,
                 augment_cfg: AugmentConfig | None = None, shuffle: bool = True, drop_last: bool = True,
                 prefetch: int = 2):
        super().__init__(data, batch_size, mean, std, seed, augment_cfg, shuffle, drop_last, prefetch)
        # crowd regions are never targets: filter them once
        self.targets = []
        for i in range(len(data)):
            keep = ~data.crowd(i)
            self.targets.append((data.boxes[i][keep].astype(np.float32), data.labels[i][keep].astype(np.int64)))

    def make_batch(self, epoch: int, index: int, order: np.ndarray
                   ) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
        idx = order[index * self.batch_size:(index + 1) * self.batch_size]
        x, idx = read_subset(self.data.images, idx)
        boxes = [self.targets[i][0] for i in idx]
        labels = [self.targets[i][1] for i in idx]
        if self.augment_cfg.active:
            rng = self.batch_rng(epoch, index)
            x, boxes, labels = augment_detection(x, boxes, labels, self.augment_cfg, rng, self.pca)
        x = (x - self.mean) * self.inv_std
        return np.ascontiguousarray(x, dtype=np.float32), [(b.copy(), lab.copy()) for b, lab in zip(boxes, labels)]
