"""Segmentation data: a built-in synthetic set of shapes with exact per-pixel masks, a folder reader (images/
and masks/ with the same file stems), and a batch loader whose augmentation moves masks with the pixels.

Conventions: images are float32 N×C×H×W in [0, 1] at the model's input size (bilinear resize, as everywhere);
masks are uint8 N×H×W of class indices at the same size (nearest-neighbour resize, so no index is ever blended
into another), with `ignore_index` (255 unless data.ignore_index says otherwise) marking pixels that count for
neither the loss nor the metrics. The original size of every image is kept, so predictions can be drawn back
onto it.

Masks on disk are single-channel PNGs whose pixel values are class indices: 8- or 16-bit grey, or a palette
('P') PNG as in Pascal VOC, whose stored values are the indices and whose palette only colours them. An RGB
mask needs data.palette (one [r, g, b] per class); a colour found in no entry is an error naming the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import Diagnostic, DlcError
from .augment import AugmentConfig, augment
from .datasets import (
    IMAGE_SUFFIXES,
    SEGMENTATION_DATASETS,
    ImageCollector,
    _check_regular_file,
    image_size,
)
from .detection import _random_split as random_split
from .detection import (
    _render_shapes,  # the scenes are the detection set's; only the labels differ
    _resolve,
    read_names_file,
)
from .lazy import read_subset, subset
from .loader import BatchLoader
from .synthetic import SHAPES

DEFAULT_IGNORE = 255
MASK_SUFFIXES = (".png", ".bmp", ".tif", ".tiff")  # lossless formats only: a JPEG mask blurs its indices


@dataclass
class SegmentationDataset:
    images: np.ndarray  # float32 N×C×H×W in [0, 1], at the model's input size
    masks: np.ndarray  # uint8 N×H×W class indices; ignore_index marks pixels that do not count
    classes: list[str]
    ignore_index: int = DEFAULT_IGNORE
    sizes: list[tuple[int, int]] | None = None  # original (width, height) of each image
    names: list[str] | None = None  # file stems (synthetic: "000001", ...)

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, idx) -> SegmentationDataset:
        idx = [int(i) for i in np.atleast_1d(idx)]
        return SegmentationDataset(subset(self.images, idx), subset(self.masks, idx), list(self.classes), self.ignore_index,
                                   None if self.sizes is None else [self.sizes[i] for i in idx],
                                   None if self.names is None else [self.names[i] for i in idx])

    def pixel_counts(self) -> np.ndarray:
        """Pixels of each class over the set (ignored pixels left out): the basis of `class_weights: balanced`.
        A lazily read set is counted 256 masks at a time."""
        n = len(self.classes)
        counts = np.zeros(n, np.int64)
        for a in range(0, len(self.masks), 256):
            chunk = self.masks[a:a + 256]
            valid = chunk[chunk != self.ignore_index]
            counts += np.bincount(valid.ravel(), minlength=n)[:n]
        return counts


class LazyMasks:
    """The masks of a lazily read segmentation set (data.load: lazy or memmap): each mask file is read, checked
    (class range, palette) and resized when its batch needs it, like its image. Masks are labels, so a bad one
    is always an error naming the file, whatever data.on_bad_image says."""

    def __init__(self, paths: list[Path], shape: tuple[int, int], classes: int, ignore_index: int,
                 palette: np.ndarray | None, index: np.ndarray | None = None):
        self.paths, self.hw, self.classes, self.ignore_index, self.palette = paths, shape, classes, ignore_index, palette
        self.index = np.arange(len(paths)) if index is None else np.asarray(index, np.int64)

    def __len__(self) -> int:
        return len(self.index)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), *self.hw)

    dtype = np.dtype(np.uint8)
    ndim = 3

    def take(self, idx) -> LazyMasks:
        return LazyMasks(self.paths, self.hw, self.classes, self.ignore_index, self.palette,
                         self.index[np.asarray(idx)])

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, (int, np.integer)):
            return self._mask(int(self.index[key]))
        positions = np.arange(len(self))[key] if isinstance(key, slice) else np.asarray(key, np.int64)
        if not len(positions):
            return np.empty((0, *self.hw), np.uint8)
        return np.stack([self._mask(int(self.index[p])) for p in positions.ravel()])

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        x = self[:]
        return x if dtype is None else x.astype(dtype)

    def _mask(self, i: int) -> np.ndarray:
        path = self.paths[i]
        mask = read_mask(path, self.palette)
        _check_classes(mask, path, self.classes, self.ignore_index)
        return resize_mask(mask, *self.hw).astype(np.uint8)


def _check_classes(mask: np.ndarray, path: Path, classes: int, ignore_index: int) -> None:
    bad = (mask >= classes) & (mask != ignore_index)
    if bad.any():
        y, x = np.argwhere(bad)[0]
        raise DlcError(Diagnostic(f"pixel ({x}, {y}) has class {mask[y, x]}, not in 0..{classes - 1} "
                                  f"({classes} classes) nor the ignore index {ignore_index}",
                                  file=str(path), hint="fix the mask, or add the class to data.classes"))



# ---------------------------------------------------------------------------------------------------------------
# the synthetic set


def make_segmentation_shapes(samples: int, num_classes: int, shape: tuple[int, int, int], seed: int = 0,
                             max_objects: int = 4, min_size: float = 0.2, max_size: float = 0.6
                             ) -> SegmentationDataset:
    """The detection set's scenes (1..max_objects shapes per image over a textured, noisy background) with the
    exact mask of what is drawn: class 0 is the background, class k the k-th shape (disc, square, triangle, ...),
    so num_classes counts the background. Deterministic by seed."""

    if not 2 <= num_classes <= len(SHAPES) + 1:
        raise DlcError(f"synthetic_segmentation has 2 to {len(SHAPES) + 1} classes (background included), "
                       f"asked for {num_classes}")
    if not 1 <= max_objects <= 64:
        raise DlcError(f"synthetic_segmentation: max_objects must be in [1, 64], got {max_objects}")
    data, objects = _render_shapes(samples, num_classes - 1, tuple(shape), seed, max_objects, min_size, max_size)
    masks = np.zeros(objects.shape, np.uint8)
    for i in range(samples):
        lookup = np.concatenate([data.labels[i] + 1, [0]]).astype(np.uint8)  # object j -> class; -1 -> background
        masks[i] = lookup[objects[i]]
    h, w = shape[1:]
    return SegmentationDataset(data.images, masks, ["background", *SHAPES[:num_classes - 1]], DEFAULT_IGNORE,
                               [(w, h)] * samples, [f"{i + 1:06d}" for i in range(samples)])


# ---------------------------------------------------------------------------------------------------------------
# folders of images and masks


def read_mask(path: Path, palette: np.ndarray | None = None) -> np.ndarray:
    """A mask file as int64 H×W class indices at its own size (see the module notes for the formats)."""
    from PIL import Image, UnidentifiedImageError

    from .. import limits

    _check_regular_file(path)
    try:
        with Image.open(path) as im:
            limits.check("image_pixels", im.size[0] * im.size[1], f"{path}: mask {im.size[0]}×{im.size[1]}: pixels")
            mode = im.mode
            if mode in ("1", "L", "P", "I", "I;16", "I;16B", "I;16L"):
                return np.asarray(im if mode != "1" else im.convert("L"), dtype=np.int64)
            if palette is None:
                raise DlcError(Diagnostic(f"mask is a {mode} image; masks are single-channel class indices "
                                          "(grey or palette PNG)", file=str(path),
                                          hint="save the class index of every pixel, or give data.palette "
                                               "(one [r, g, b] per class) to map colours to classes"))
            rgb = np.asarray(im.convert("RGB"), dtype=np.int64)
    except FileNotFoundError:
        raise DlcError(Diagnostic("mask file not found", file=str(path), hint="check the path")) from None
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DlcError(Diagnostic(f"cannot read mask: {exc}", file=str(path),
                                  hint="remove or replace the file")) from None
    code = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
    keys = (palette[:, 0] << 16) | (palette[:, 1] << 8) | palette[:, 2]
    order = np.argsort(keys)
    pos = np.clip(np.searchsorted(keys[order], code), 0, len(keys) - 1)
    found = keys[order][pos] == code
    if not found.all():
        y, x = np.argwhere(~found)[0]
        r, g, b = rgb[y, x]
        raise DlcError(Diagnostic(f"pixel ({x}, {y}) has colour [{r}, {g}, {b}], which is in no data.palette "
                                  "entry", file=str(path), hint="add the colour to data.palette, or fix the mask"))
    return order[pos]


def resize_mask(mask: np.ndarray, h: int, w: int) -> np.ndarray:
    """Nearest-neighbour resize (pixel centres: source index floor((i + 0.5) · H0 / h)), so every pixel keeps a
    class that was there."""
    h0, w0 = mask.shape
    if (h0, w0) == (h, w):
        return mask
    rows = np.minimum(((np.arange(h) + 0.5) * h0 / h).astype(np.int64), h0 - 1)
    cols = np.minimum(((np.arange(w) + 0.5) * w0 / w).astype(np.int64), w0 - 1)
    return mask[rows[:, None], cols[None, :]]


def _files_by_stem(folder: Path, suffixes, what: str) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.suffix.lower() in suffixes and not p.name.startswith("."):
            if p.stem in found:
                raise DlcError(Diagnostic(f"two {what} share the stem '{p.stem}' ({found[p.stem].name}, {p.name})",
                                          file=str(folder), hint="keep one file per stem"))
            found[p.stem] = p
    return found


def _load_folder(images_dir: Path, masks_dir: Path, classes: list[str], input_shape: tuple[int, int, int],
                 ignore_index: int, palette: np.ndarray | None, cfg: dict | None = None) -> SegmentationDataset:
    c, h, w = input_shape
    for folder, what in ((images_dir, "images"), (masks_dir, "masks")):
        if not folder.is_dir():
            raise DlcError(f"data.root: {what} folder '{folder}' not found (a segmentation set has images/ and "
                           "masks/ with the same file stems)")
    images_by_stem = _files_by_stem(images_dir, IMAGE_SUFFIXES, "images")
    if not images_by_stem:
        raise DlcError(f"data.root: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in '{images_dir}'")
    masks_by_stem = _files_by_stem(masks_dir, MASK_SUFFIXES, "masks")
    images = ImageCollector(cfg or {}, input_shape, len(images_by_stem))
    masks, sizes, names = [], [], []
    for stem, path in images_by_stem.items():
        mask_path = masks_by_stem.get(stem)
        if mask_path is None:
            raise DlcError(Diagnostic(f"image has no mask: expected {masks_dir / (stem + '.png')}", file=str(path),
                                      hint="add the mask, or remove the image"))
        size = images.add(path)
        if size is None:  # unreadable, and data.on_bad_image: skip (its mask goes too)
            continue
        mask = None if images.lazy else read_mask(mask_path, palette)  # lazy: read with its batch
        mask_size = image_size(mask_path, "mask") if mask is None else (mask.shape[1], mask.shape[0])
        if mask_size != size:
            raise DlcError(Diagnostic(f"mask is {mask_size[0]}×{mask_size[1]} but its image {path.name} is "
                                      f"{size[0]}×{size[1]}", file=str(mask_path),
                                      hint="a mask must have its image's size, pixel for pixel"))
        if mask is None:
            masks.append(mask_path)
        else:
            _check_classes(mask, mask_path, len(classes), ignore_index)
            masks.append(resize_mask(mask, h, w).astype(np.uint8))
        sizes.append(size)
        names.append(stem)
    extra = sorted(set(masks_by_stem) - set(images_by_stem))
    if extra:
        raise DlcError(Diagnostic(f"{len(extra)} mask(s) without an image, e.g. {masks_by_stem[extra[0]].name}",
                                  file=str(masks_dir), hint="add the images, or remove the masks"))
    if not masks:
        raise DlcError(f"data.root: no readable images in '{images_dir}'")
    stacked = LazyMasks(masks, (h, w), len(classes), ignore_index, palette) if images.lazy else np.stack(masks)
    return SegmentationDataset(images.finish(str(images_dir)), stacked, list(classes), ignore_index, sizes, names)


def segmentation_classes(cfg: dict, base_dir: Path) -> list[str] | None:
    """data.classes, else root/classes.txt (one name per line), else None (the model's width decides)."""
    classes = cfg.get("classes")
    if isinstance(classes, list):
        return [str(n) for n in classes]
    path = _resolve(base_dir, classes) if isinstance(classes, str) else (
        _resolve(base_dir, cfg["root"]) / "classes.txt" if cfg.get("root") else None)
    if path is None or (classes is None and not path.is_file()):
        return None
    return read_names_file(path)


def _palette(cfg: dict, n: int) -> np.ndarray | None:
    palette = cfg.get("palette")
    if palette is None:
        return None
    ok = (isinstance(palette, list) and len(palette) == n
          and all(isinstance(p, list) and len(p) == 3 and all(isinstance(v, int) and 0 <= v <= 255 for v in p)
                  for p in palette))
    if not ok:
        raise DlcError(f"data.palette must list one [r, g, b] (0..255) per class ({n} classes), got {palette!r}")
    array = np.asarray(palette, np.int64)
    if len({tuple(p) for p in palette}) != n:
        raise DlcError("data.palette gives the same colour to two classes")
    return array


def load_segmentation_dataset(cfg: dict, input_shape: tuple[int, int, int], base_dir: Path,
                              num_outputs: int | None = None) -> tuple[SegmentationDataset, SegmentationDataset]:
    """(train, val) of a segmentation `data:` section at the model's input size. Paths are relative to base_dir,
    the YAML file's folder. num_outputs (the model's channels) names the classes when the data does not."""
    input_shape = tuple(int(s) for s in input_shape)
    base_dir = Path(base_dir)
    kind = cfg.get("dataset")
    seed = int(cfg.get("seed", 0))
    val_fraction = float(cfg.get("val_fraction", 0.2))
    ignore_index = int(cfg.get("ignore_index", DEFAULT_IGNORE))
    if kind == "synthetic_segmentation":
        data = make_segmentation_shapes(int(cfg.get("samples", 1000)), int(cfg.get("num_classes", 4)),
                                        input_shape, seed, int(cfg.get("max_objects", 4)))
        data.ignore_index = ignore_index
        return _random_split(data, val_fraction, seed, kind)
    if kind != "segmentation":
        raise DlcError(f"dataset {kind!r} is not a segmentation dataset ({', '.join(SEGMENTATION_DATASETS)})")
    if not cfg.get("root"):
        raise DlcError("dataset segmentation needs 'root': a folder with images/ and masks/ (or images/train, "
                       "images/val beside masks/train, masks/val)")
    root = _resolve(base_dir, cfg["root"])
    classes = segmentation_classes(cfg, base_dir)
    if classes is None:
        if num_outputs is None:
            raise DlcError("dataset segmentation needs the class names: data.classes, or a classes.txt in "
                           f"'{root}'")
        classes = [f"class{k}" for k in range(num_outputs)]
    palette = _palette(cfg, len(classes))
    if (root / "images" / "train").is_dir() and (root / "images" / "val").is_dir():
        return (_load_folder(root / "images" / "train", root / "masks" / "train", classes, input_shape,
                             ignore_index, palette, cfg),
                _load_folder(root / "images" / "val", root / "masks" / "val", classes, input_shape,
                             ignore_index, palette, cfg))
    data = _load_folder(root / "images", root / "masks", classes, input_shape, ignore_index, palette, cfg)
    return _random_split(data, val_fraction, seed, kind)


def _random_split(data: SegmentationDataset, val_fraction: float, seed: int, what: str
                  ) -> tuple[SegmentationDataset, SegmentationDataset]:
    """The detection sets' split; an empty validation split is refused too (mIoU of nothing is no score)."""
    n_val = int(round(len(data) * val_fraction))
    if n_val >= len(data) or n_val == 0:
        raise DlcError(f"dataset '{what}': val_fraction {val_fraction} of {len(data)} images leaves "
                       f"{'no training' if n_val else 'no validation'} images")
    return random_split(data, val_fraction, seed, what)


# ---------------------------------------------------------------------------------------------------------------
# batches with mask-aware augmentation


def augment_segmentation(x: np.ndarray, masks: np.ndarray, cfg: AugmentConfig, rng: np.random.Generator,
                         ignore_index: int, pca=None) -> tuple[np.ndarray, np.ndarray]:
    """Mirror (half of the images) and crop (a random H×W window out of the image padded by crop_pad pixels:
    images padded with zeros, masks with ignore_index, so the padding counts for nothing), with every mask
    pixel moved exactly as its image pixel; PCA colour touches the images only."""
    n, _, h, w = x.shape
    if cfg.mirror:
        flip = rng.random(n) < 0.5
        x, masks = x.copy(), masks.copy()
        x[flip] = x[flip, :, :, ::-1]
        masks[flip] = masks[flip, :, ::-1]
    if cfg.crop_pad > 0:
        p = cfg.crop_pad
        padded = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))
        padded_masks = np.pad(masks, ((0, 0), (p, p), (p, p)), constant_values=ignore_index)
        dy = rng.integers(0, 2 * p + 1, n)
        dx = rng.integers(0, 2 * p + 1, n)
        rows = (dy[:, None] + np.arange(h)[None, :])[:, :, None]
        cols = (dx[:, None] + np.arange(w)[None, :])[:, None, :]
        batch = np.arange(n)[:, None, None]
        x = padded[batch, :, rows, cols].transpose(0, 3, 1, 2)
        masks = padded_masks[batch, rows, cols]
    if cfg.pca_color > 0 and pca is not None:
        x = augment(x, AugmentConfig(pca_color=cfg.pca_color), rng, pca)
    return np.ascontiguousarray(x, dtype=np.float32), np.ascontiguousarray(masks)


class SegmentationLoader(BatchLoader):
    """BatchLoader for segmentation: yields (x normalised B×C×H×W, masks int64 B×H×W), with the same background
    prefetch and (seed, epoch, iteration) determinism."""

    def make_batch(self, epoch: int, index: int, order: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        idx = order[index * self.batch_size:(index + 1) * self.batch_size]
        x, idx = read_subset(self.data.images, idx)
        masks = self.data.masks[idx]
        if self.augment_cfg.active:
            rng = self.batch_rng(epoch, index)
            x, masks = augment_segmentation(x, masks, self.augment_cfg, rng, self.data.ignore_index, self.pca)
        x = (x - self.mean) * self.inv_std
        return np.ascontiguousarray(x, dtype=np.float32), masks.astype(np.int64)
