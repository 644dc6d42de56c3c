"""The `data:` section's datasets, loaded into memory at the model's input size, split into train and val."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import limits
from ..errors import Diagnostic, DlcError
from .lazy import AUTO_LAZY_BYTES, DEFAULT_CACHE_MB, LazyImages, build_store, subset
from .synthetic import make_shapes

CLASSIFICATION_DATASETS = ("synthetic", "digits", "imagefolder")
DETECTION_DATASETS = ("synthetic_detection", "coco", "yolo")  # loaded by data/detection.py
SEGMENTATION_DATASETS = ("synthetic_segmentation", "segmentation")  # loaded by data/segmentation.py
DATASETS = CLASSIFICATION_DATASETS + DETECTION_DATASETS + SEGMENTATION_DATASETS
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}


@dataclass
class Dataset:
    images: np.ndarray  # float32 N×C×H×W in [0, 1] (or a LazyImages that reads them per batch)
    labels: np.ndarray  # int64 N
    classes: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx) -> Dataset:
        return Dataset(subset(self.images, idx), self.labels[idx], list(self.classes))


FILE_DATASETS = ("imagefolder", "coco", "yolo", "segmentation")  # read from image files (lazily, if asked)

# data: keys that only some data sets read; given to another, they would be ignored, so they are refused.
DATASET_KEYS = {"root": ("imagefolder", "yolo", "segmentation"),
                "samples": ("synthetic", "synthetic_detection", "synthetic_segmentation"),
                "num_classes": ("synthetic", "synthetic_detection", "synthetic_segmentation"),
                "difficulty": ("synthetic",),
                "ignore_index": SEGMENTATION_DATASETS, "palette": ("segmentation",),
                **{key: FILE_DATASETS for key in ("load", "cache_mb", "on_bad_image")}}


def unused_data_keys(section: Any, file: str) -> list[Diagnostic]:
    """A diagnostic for each key of data: that its dataset does not read (e.g. samples on an imagefolder)."""
    kind = section.get("dataset")
    if kind not in DATASETS:
        return []
    diags = []
    for key, kinds in DATASET_KEYS.items():
        if key in section and kind not in kinds:
            line = section.line_of(key) if hasattr(section, "line_of") else None
            diags.append(Diagnostic(f"'data.{key}' is only read by dataset {' / '.join(kinds)}, not {kind!r}",
                                    file=file, line=line, hint=f"remove {key}, or change data.dataset"))
    return diags


def _interp_matrix(src: int, dst: int) -> np.ndarray:
    """Bilinear resampling weights (dst × src), pixel centres aligned (align_corners=False)."""
    pos = (np.arange(dst) + 0.5) * src / dst - 0.5
    pos = np.clip(pos, 0, src - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, src - 1)
    frac = pos - lo
    m = np.zeros((dst, src), np.float32)
    m[np.arange(dst), lo] += 1 - frac
    m[np.arange(dst), hi] += frac
    return m


def resize(images: np.ndarray, h: int, w: int) -> np.ndarray:
    """Bilinear resize of a batch N×C×H×W to h×w (two small matrix products)."""
    if images.shape[2:] == (h, w):
        return images
    a = _interp_matrix(images.shape[2], h)
    b = _interp_matrix(images.shape[3], w)
    return np.einsum("ih,nchw,jw->ncij", a, images, b, optimize=True).astype(np.float32)


def match_channels(images: np.ndarray, c: int, where: str) -> np.ndarray:
    if images.shape[1] == c:
        return images
    if images.shape[1] == 1:
        return np.repeat(images, c, axis=1)
    if c == 1:
        return images.mean(axis=1, keepdims=True)
    raise DlcError(f"{where}: images have {images.shape[1]} channels, the model takes {c}")


def split(images: np.ndarray, labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified split: the same fraction of every class goes to validation. Returns (train idx, val idx)."""
    rng = np.random.default_rng([seed, 104729])
    train, val = [], []
    for k in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == k))
        n_val = int(round(len(idx) * val_fraction))
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def _digits() -> tuple[np.ndarray, np.ndarray, list[str]]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DlcError("dataset 'digits' needs scikit-learn, which ships the data: pip install 'dlc[digits]' "
                       "(or pip install scikit-learn)") from None
    d = load_digits()
    images = (d.images / 16.0).astype(np.float32)[:, None]
    return images, d.target.astype(np.int64), [str(t) for t in d.target_names]


def _check_regular_file(path: Path) -> None:
    """Refuse what is not a plain file before opening it: a FIFO named x.png would block the read forever, a
    device could be endless. Links are followed (a link to a plain file is fine)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise DlcError(Diagnostic("image file not found", file=str(path), hint="check the path")) from None
    except OSError as exc:
        raise DlcError(Diagnostic(f"cannot read image: {exc.strerror or exc}", file=str(path))) from None
    if not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else (
            "a socket" if stat.S_ISSOCK(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else
            "not a plain file")
        raise DlcError(Diagnostic(f"cannot read image: it is {kind}, not a regular file", file=str(path),
                                  hint="give image files only"))


def read_image(path: Path, c: int, h: int, w: int) -> tuple[np.ndarray, tuple[int, int]]:
    """One image file as float32 C×h×w in [0, 1] (grey for c == 1, else RGB; bilinear resize), and its original
    (width, height). A corrupt or unreadable file, or one that is not a regular file (a FIFO, a device), is a
    DlcError naming it. Grey images are repeated into 3 channels for an RGB model; colour images (RGBA, palette,
    CMYK ...) are converted to RGB, or to grey (L = 0.299 R + 0.587 G + 0.114 B) for a 1-channel model."""
    from PIL import Image, UnidentifiedImageError

    if c not in (1, 3):
        raise DlcError(f"{path}: image files are grey or RGB; the model input has {c} channels")
    _check_regular_file(path)
    try:
        with Image.open(path) as im:  # reads the header only; the pixels are decoded below
            size = im.size
            limits.check("image_pixels", size[0] * size[1], f"{path}: image {size[0]}×{size[1]}: pixels")
            im = im.convert("L" if c == 1 else "RGB").resize((w, h), Image.BILINEAR)
            array = np.asarray(im, dtype=np.float32) / 255.0
    except FileNotFoundError:
        raise DlcError(Diagnostic("image file not found", file=str(path), hint="check the path")) from None
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DlcError(Diagnostic(f"cannot read image: {exc}", file=str(path),
                                  hint="remove or replace the file")) from None
    return (array[None] if c == 1 else array.transpose(2, 0, 1)), size


def class_folders(root: Path) -> list[str]:
    """An ImageFolder's class names: its sub-folders (hidden ones skipped) in sorted order, which is also the
    class index: the k-th name is output k."""
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def image_folder_root(cfg: dict[str, Any], base_dir: Path) -> Path:
    """data.root, relative to the YAML file's folder unless absolute."""
    root = Path(str(cfg["root"]))
    return root if root.is_absolute() else base_dir / root


def image_size(path: Path, what: str = "image") -> tuple[int, int]:
    """(width, height) from the file's header, without decoding the pixels; a DlcError naming an unreadable file
    (`what`: the word the message uses, e.g. mask)."""
    from PIL import Image, UnidentifiedImageError

    _check_regular_file(path)
    try:
        with Image.open(path) as im:
            return im.size
    except FileNotFoundError:
        raise DlcError(Diagnostic(f"{what} file not found", file=str(path), hint="check the path")) from None
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DlcError(Diagnostic(f"cannot read {what}: {exc}", file=str(path),
                                  hint="remove or replace the file")) from None


class ImageCollector:
    """The image files of one set, decoded now (data.load: memory) or per batch (lazy: only their headers are
    read here). `auto` reads lazily once the decoded set would pass 1 GiB. With data.on_bad_image: skip, a file
    that cannot be read is left out here (add returns None) and counted; with error, it raises."""

    def __init__(self, cfg: dict[str, Any], shape: tuple[int, int, int], count: int):
        self.shape = tuple(int(v) for v in shape)
        mode = cfg.get("load", "auto")
        self.lazy = mode in ("lazy", "memmap") or (
            mode == "auto" and count * 4 * int(np.prod(self.shape)) > AUTO_LAZY_BYTES)
        # memmap: the trainer passes its output folder (elsewhere, e.g. dlc eval, such a set is read lazily)
        self.store_dir = cfg.get("_store_dir") if mode == "memmap" else None
        self.on_bad = cfg.get("on_bad_image", "error")
        self.cache_mb = float(cfg.get("cache_mb", DEFAULT_CACHE_MB))
        self.paths: list[Path] = []
        self.arrays: list[np.ndarray] = []
        self.skipped: list[str] = []

    def add(self, path: Path) -> tuple[int, int] | None:
        """Take one file; its original (width, height), or None when it is unreadable and skipped."""
        try:
            if self.lazy:
                size = image_size(path)
            else:
                array, size = read_image(path, *self.shape)
                self.arrays.append(array)
        except DlcError as exc:
            if self.on_bad != "skip":
                raise
            self.skipped.append(str(exc))
            return None
        self.paths.append(path)
        return size

    def finish(self, where: str):
        """The images: a float32 N×C×H×W array, or a LazyImages."""
        import logging

        if self.skipped:
            logging.getLogger("dlc").warning("%s: skipped %d unreadable image(s) (data.on_bad_image: skip), e.g. %s",
                                             where, len(self.skipped), self.skipped[0])
        if self.store_dir is not None:
            return build_store(self.paths, self.shape, Path(self.store_dir), self.on_bad)
        if self.lazy:
            return LazyImages(self.paths, self.shape, self.cache_mb, self.on_bad)
        return np.stack(self.arrays) if self.arrays else np.empty((0, *self.shape), np.float32)


def _image_folder(root: Path, c: int, h: int, w: int, cfg: dict[str, Any] | None = None
                  ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    if not root.is_dir():
        raise DlcError(f"data.root: '{root}' is not a directory (expected one sub-folder of images per class)")
    classes = class_folders(root)
    if len(classes) < 2:
        raise DlcError(f"data.root: '{root}' needs at least two class sub-folders, found {classes or 'none'}")
    files = [(k, p) for k, name in enumerate(classes)
             for p in sorted(p for p in (root / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)]
    images = ImageCollector(cfg or {}, (c, h, w), len(files))
    labels = [k for k, path in files if images.add(path) is not None]
    if not labels:
        raise DlcError(f"data.root: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under '{root}'")
    return images.finish(f"data.root '{root}'"), np.asarray(labels, np.int64), classes


def load_dataset(cfg: dict[str, Any], input_shape: tuple[int, int, int], num_outputs: int,
                 base_dir: Path) -> tuple[Dataset, Dataset]:
    """(train, val) at the model's input size, images in [0, 1]."""
    c, h, w = input_shape
    kind = cfg["dataset"]
    seed = cfg.get("seed", 0)
    if kind in DETECTION_DATASETS:
        raise DlcError(f"dataset '{kind}' is a detection set (boxes, not one label per image): it trains a model "
                       f"with a detect layer; pick one of {', '.join(CLASSIFICATION_DATASETS)} for a classifier")
    if kind in SEGMENTATION_DATASETS:
        raise DlcError(f"dataset '{kind}' is a segmentation set (a class per pixel): it trains a model whose output "
                       f"is class scores per pixel; pick one of {', '.join(CLASSIFICATION_DATASETS)} for a "
                       "classifier")
    if kind == "synthetic":
        num_classes = cfg.get("num_classes", num_outputs)
        images, labels, classes = make_shapes(cfg.get("samples", 2000), num_classes, input_shape, seed,
                                              difficulty=cfg.get("difficulty", "easy"))
    elif kind == "digits":
        images, labels, classes = _digits()
    else:
        root = image_folder_root(cfg, base_dir)
        if (root / "train").is_dir() and (root / "val").is_dir():
            tr = _image_folder(root / "train", c, h, w, cfg)
            va = _image_folder(root / "val", c, h, w, cfg)
            if tr[2] != va[2]:
                raise DlcError(f"data.root: train/ and val/ under '{root}' have different classes")
            return Dataset(tr[0], tr[1], tr[2]), Dataset(va[0], va[1], va[2])
        images, labels, classes = _image_folder(root, c, h, w, cfg)
    if not isinstance(images, LazyImages):  # (files are read at the input's size and channels already)
        images = match_channels(resize(images, h, w), c, f"dataset '{kind}'")
    if len(classes) > num_outputs:
        raise DlcError(f"dataset '{kind}' has {len(classes)} classes but the model's output has only "
                       f"{num_outputs} values; set the last layer's 'out' to {len(classes)}")
    data = Dataset(images, labels, classes)
    train_idx, val_idx = split(images, labels, cfg.get("val_fraction", 0.2), seed)
    return data.subset(train_idx), data.subset(val_idx)
