"""Data sets larger than memory: image files read per batch (data.load: lazy) with a bounded cache, the same
values as reading them up front, unreadable files skipped and counted or stopping the run, and each rank of a
data-parallel run reading only its shard."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from dlc.compiler.data import BatchLoader
from dlc.compiler.data.datasets import load_dataset
from dlc.compiler.data.detection import load_detection_dataset
from dlc.compiler.data.lazy import LazyImages
from dlc.compiler.data.segmentation import LazyMasks, load_segmentation_dataset
from dlc.compiler.errors import DlcError
from dlc.compiler.frontend import load_model
from dlc.compiler.train.checkpoint import read_checkpoint
from dlc.compiler.train.trainer import Trainer

from helpers import errors_of


def _folder(root, per_class=12, classes=("a", "b", "c"), size=(11, 9), seed=0):
    """An imagefolder of random RGB PNGs at another size than the model's (so resizing is exercised)."""
    rng = np.random.default_rng(seed)
    for name in classes:
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i:03d}.png")
    return root


def _truncate(path):
    path.write_bytes(path.read_bytes()[:60])  # a PNG header and a cut-off image: the header reads, pixels do not


MODEL = """model:
  name: lazy
  input: {shape: [3, 8, 8], mean: 0.5, std: 0.25}
  layers:
    - {name: c1, type: conv, out: 4, kernel: 3, pad: 1}
    - {name: bn1, type: batchnorm}
    - {name: r1, type: relu}
    - {name: f, type: flatten}
    - {name: fc, type: linear, out: 3}
data: {dataset: imagefolder, root: imgs, seed: 1, augment: {mirror: true, crop: 1}, LOAD}
train: {base_lr: 0.05, batch_size: 8, epochs: 2, seed: 5}
"""


def _model(tmp_path, load: str):
    path = tmp_path / f"m_{abs(hash(load))}.yaml"
    path.write_text(MODEL.replace("LOAD", load))
    return path


def test_lazy_reading_gives_the_in_memory_values_bit_for_bit(tmp_path):
    _folder(tmp_path / "imgs")
    cfg = {"dataset": "imagefolder", "root": "imgs", "seed": 1}
    mem_train, mem_val = load_dataset({**cfg, "load": "memory"}, (3, 8, 8), 3, tmp_path)
    lazy_train, lazy_val = load_dataset({**cfg, "load": "lazy"}, (3, 8, 8), 3, tmp_path)
    assert isinstance(lazy_train.images, LazyImages) and isinstance(mem_train.images, np.ndarray)
    assert lazy_train.images.shape == mem_train.images.shape
    np.testing.assert_array_equal(lazy_train.images[:], mem_train.images)
    np.testing.assert_array_equal(lazy_val.images[np.array([2, 0])], mem_val.images[[2, 0]])
    np.testing.assert_array_equal(lazy_train.labels, mem_train.labels)
    assert mem_train.images.std() > 0.1  # random pixels: a wrong file or order would not match


def test_training_on_a_lazy_set_equals_training_in_memory(tmp_path):
    _folder(tmp_path / "imgs")
    runs = {}
    for load in ("load: memory", "load: lazy, cache_mb: 0"):
        Trainer(load_model(_model(tmp_path, load)), tmp_path / load[6:10], progress=False).run()
        runs[load] = read_checkpoint(tmp_path / load[6:10] / "checkpoint.safetensors")[0]
    a, b = runs.values()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert np.abs(a["fc.weight"]).max() > 0.01


def test_the_cache_is_bounded_and_shared_by_subsets(tmp_path):
    _folder(tmp_path / "imgs", per_class=20)
    train, val = load_dataset({"dataset": "imagefolder", "root": "imgs", "load": "lazy", "cache_mb": 0.002},
                              (3, 8, 8), 3, tmp_path)
    per_image = 3 * 8 * 8  # uint8
    train.images[:]
    val.images[:]
    shared = train.images.shared
    assert shared is val.images.shared
    assert 0 < shared.bytes <= 2000 and len(shared.cache) == 2000 // per_image  # the most recent ones only
    again = train.images[np.array([len(train) - 1])]  # evicted or not, the values are the same
    np.testing.assert_array_equal(again, train.images[len(train) - 1][None])


def test_each_rank_reads_only_its_shard(tmp_path):
    _folder(tmp_path / "imgs", per_class=16)
    read = []
    for rank in (0, 1):
        train, _ = load_dataset({"dataset": "imagefolder", "root": "imgs", "load": "lazy"}, (3, 8, 8), 3, tmp_path)
        loader = BatchLoader(train, 4, [0.5] * 3, [0.25] * 3, seed=2)
        loader.shard(rank, 2)
        for _ in loader.epoch(0):
            pass
        read.append(set(train.images.shared.cache))
    assert read[0] and read[1] and not read[0] & read[1]
    assert len(read[0]) + len(read[1]) == len(loader) * 8  # every global batch, nothing more


def test_an_unreadable_image_stops_the_run_by_default_and_names_the_file(tmp_path):
    _folder(tmp_path / "imgs")
    _truncate(tmp_path / "imgs" / "b" / "005.png")
    with pytest.raises(DlcError, match=r"imgs/b/005\.png.*cannot read image.*on_bad_image: skip"):
        Trainer(load_model(_model(tmp_path, "load: lazy")), tmp_path / "out", progress=False).run()


def test_skip_leaves_unreadable_images_out_and_counts_them(tmp_path):
    root = _folder(tmp_path / "imgs")
    bad = [root / "a" / "001.png", root / "b" / "003.png", root / "c" / "007.png", root / "c" / "009.png"]
    for path in bad:
        _truncate(path)
    trainer = Trainer(load_model(_model(tmp_path, "load: lazy, on_bad_image: skip")), tmp_path / "out",
                      progress=False)
    train = trainer.train_set.images
    bad_in_train = sum(train.paths[i] in bad for i in train.index)
    assert 1 <= bad_in_train < len(bad)  # this seed's split puts some in each
    assert not any(p in bad for p in (trainer.val_set.images.paths[i] for i in trainer.val_set.images.index))
    result = trainer.run()
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert result.stopped == "completed"
    assert 1 <= metrics["epochs"][-1]["unreadable_images"] <= bad_in_train
    assert metrics["val_samples"] + len(trainer.train_set) == 36 - (len(bad) - bad_in_train)
    assert all("cannot read image" in line for line in train.bad_files())


def test_skip_when_reading_up_front(tmp_path, caplog):
    root = _folder(tmp_path / "imgs")
    (root / "a" / "002.png").write_bytes(b"not an image")
    train, val = load_dataset({"dataset": "imagefolder", "root": "imgs", "load": "memory", "on_bad_image": "skip"},
                              (3, 8, 8), 3, tmp_path)
    assert len(train) + len(val) == 35 and "skipped 1 unreadable image" in caplog.text
    with pytest.raises(DlcError, match=r"002\.png"):
        load_dataset({"dataset": "imagefolder", "root": "imgs", "load": "memory"}, (3, 8, 8), 3, tmp_path)


def test_yolo_and_segmentation_sets_read_lazily_alike(tmp_path):
    rng = np.random.default_rng(3)
    (tmp_path / "y" / "images").mkdir(parents=True)
    (tmp_path / "y" / "labels").mkdir()
    (tmp_path / "s" / "images").mkdir(parents=True)
    (tmp_path / "s" / "masks").mkdir()
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(tmp_path / "y" / "images" / f"{i}.png")
        (tmp_path / "y" / "labels" / f"{i}.txt").write_text("0 0.5 0.5 0.4 0.3\n")
        Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(tmp_path / "s" / "images" / f"{i}.png")
        Image.fromarray(rng.integers(0, 2, (12, 10), dtype=np.uint8)).save(tmp_path / "s" / "masks" / f"{i}.png")
    y = {"dataset": "yolo", "root": "y", "classes": ["x"], "val_fraction": 0.34}
    s = {"dataset": "segmentation", "root": "s", "classes": ["bg", "fg"], "val_fraction": 0.34}
    for cfg, load in ((y, lambda c: load_detection_dataset(c, (3, 8, 8), tmp_path)),
                      (s, lambda c: load_segmentation_dataset(c, (3, 8, 8), tmp_path, 2))):
        mem, lazy = load({**cfg, "load": "memory"}), load({**cfg, "load": "lazy"})
        for a, b in zip(mem, lazy):
            assert isinstance(b.images, LazyImages)
            np.testing.assert_array_equal(a.images, b.images[:])
            if cfg is s:  # the masks are read with their batch as well
                assert isinstance(b.masks, LazyMasks)
                np.testing.assert_array_equal(a.masks, np.asarray(b.masks))
                np.testing.assert_array_equal(a.pixel_counts(), b.pixel_counts())
                assert a.pixel_counts().min() > 0
    # a mask with a class the data does not have is found when its batch is read, and named
    Image.fromarray(np.full((12, 10), 7, np.uint8)).save(tmp_path / "s" / "masks" / "3.png")
    train, val = load_segmentation_dataset({**s, "load": "lazy"}, (3, 8, 8), tmp_path, 2)
    with pytest.raises(DlcError, match=r"3\.png.*has class 7, not in 0\.\.1"):
        np.asarray(train.masks), np.asarray(val.masks)


def test_load_settings_are_checked():
    base = "model:\n  name: t\n  input: {shape: [3, 8, 8]}\n  layers:\n    - {name: f, type: flatten}\n" \
           "    - {name: fc, type: linear, out: 3}\ndata: {dataset: DATA}\n"
    assert any("'data.load' must be one of auto, memory, lazy" in e
               for e in errors_of(base.replace("DATA", "imagefolder, root: x, load: sometimes")))
    assert any("'data.on_bad_image' must be one of error, skip" in e
               for e in errors_of(base.replace("DATA", "imagefolder, root: x, on_bad_image: ignore")))
    assert any("'data.load' is only read by dataset imagefolder / coco / yolo / segmentation" in e
               for e in errors_of(base.replace("DATA", "synthetic, load: lazy")))


def test_memmap_store_is_built_once_and_read_by_memory_map(tmp_path):
    _folder(tmp_path / "imgs")
    _truncate(tmp_path / "imgs" / "c" / "004.png")
    model = _model(tmp_path, "load: memmap, on_bad_image: skip")
    first = Trainer(load_model(model), tmp_path / "out", progress=False)
    folder = tmp_path / "out" / "data_store"
    store = next(p for p in folder.glob("images-*.npy") if not p.name.endswith(".bad.npy"))
    assert store.with_name(store.name[:-4] + ".bad.npy").is_file()
    stamp = store.stat().st_mtime_ns
    images = first.train_set.images
    assert isinstance(images.store, np.memmap) and int(images.bad_mask.sum()) == 1  # the whole set's one bad file
    lazy_train, _ = load_dataset({"dataset": "imagefolder", "root": "imgs", "seed": 1, "load": "lazy",
                                  "on_bad_image": "skip"}, (3, 8, 8), 3, tmp_path)
    stored, kept = images.read(np.arange(len(images)))
    decoded, kept_lazy = lazy_train.images.read(np.arange(len(images)))
    np.testing.assert_array_equal(kept, kept_lazy)
    np.testing.assert_array_equal(stored, decoded)  # the same pixels as decoding the files
    assert first.run().stopped == "completed"
    again = Trainer(load_model(model), tmp_path / "out", progress=False)  # reused, not rebuilt
    assert store.stat().st_mtime_ns == stamp and isinstance(again.train_set.images.store, np.memmap)
    assert not list(folder.glob(".*.tmp"))
