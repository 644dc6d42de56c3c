"""Datasets, augmentation and the background loader."""

import numpy as np
import pytest

from dlc.compiler.data.augment import AugmentConfig, augment, pca_basis
from dlc.compiler.data.datasets import Dataset, load_dataset, resize, split
from dlc.compiler.data.loader import BatchLoader
from dlc.compiler.data.synthetic import make_shapes
from dlc.compiler.errors import DlcError


def test_synthetic_is_deterministic_and_balanced():
    a = make_shapes(120, 6, (3, 16, 16), seed=1)
    b = make_shapes(120, 6, (3, 16, 16), seed=1)
    c = make_shapes(120, 6, (3, 16, 16), seed=2)
    np.testing.assert_array_equal(a[0], b[0])
    assert not np.array_equal(a[0], c[0])
    assert a[0].dtype == np.float32 and a[0].min() >= 0 and a[0].max() <= 1
    assert np.bincount(a[1]).tolist() == [20] * 6


def test_synthetic_hard_is_deterministic_smaller_fainter_and_cluttered():
    easy = make_shapes(300, 10, (3, 32, 32), seed=3)
    hard = make_shapes(300, 10, (3, 32, 32), seed=3, difficulty="hard")
    np.testing.assert_array_equal(make_shapes(300, 10, (3, 32, 32), seed=3, difficulty="easy")[0], easy[0])
    np.testing.assert_array_equal(make_shapes(300, 10, (3, 32, 32), seed=3, difficulty="hard")[0], hard[0])
    np.testing.assert_array_equal(hard[1], easy[1])  # the same labels, drawn the same way
    assert hard[0].dtype == np.float32 and hard[0].min() >= 0 and hard[0].max() <= 1

    def separation(images):
        # how far the brightest and darkest tenth of each image lie apart, over its noise: the shape's contrast
        flat = images.reshape(len(images), -1)
        hi, lo = np.quantile(flat, 0.95, axis=1), np.quantile(flat, 0.05, axis=1)
        return float(np.median(hi - lo))

    assert separation(hard[0]) < separation(easy[0])
    # a nearest-class-mean classifier on raw pixels: above chance on easy (0.17), at chance on hard (0.10)
    def centroid_accuracy(images, labels):
        x = images.reshape(len(images), -1)
        means = np.stack([x[:200][labels[:200] == k].mean(axis=0) for k in range(10)])
        d = ((x[200:, None, :] - means[None]) ** 2).sum(axis=2)
        return float((d.argmin(axis=1) == labels[200:]).mean())

    assert centroid_accuracy(*hard[:2]) < centroid_accuracy(*easy[:2])
    with pytest.raises(ValueError, match="difficulty must be one of"):
        make_shapes(10, 3, (3, 8, 8), difficulty="medium")


def test_difficulty_is_checked_and_read_by_the_synthetic_set_only():
    from helpers import errors_of

    base = "model:\n  name: t\n  input: {shape: [3, 8, 8]}\n  layers:\n    - {name: f, type: flatten}\n" \
           "    - {name: fc, type: linear, out: 3}\ndata: {dataset: DATA}\n"
    assert any("'data.difficulty' must be one of easy, hard, got 'hardest'" in e
               for e in errors_of(base.replace("DATA", "synthetic, difficulty: hardest")))
    assert any("'data.difficulty' is only read by dataset synthetic, not 'digits'" in e
               for e in errors_of(base.replace("DATA", "digits, difficulty: hard")))
    train, _ = load_dataset({"dataset": "synthetic", "samples": 40, "difficulty": "hard"}, (3, 16, 16), 3, ".")
    np.testing.assert_array_equal(train.images, load_dataset({"dataset": "synthetic", "samples": 40,
                                                              "difficulty": "hard"}, (3, 16, 16), 3, ".")[0].images)
    assert not np.array_equal(train.images, load_dataset({"dataset": "synthetic", "samples": 40}, (3, 16, 16),
                                                         3, ".")[0].images)


def test_resize_keeps_constant_images_and_mean():
    x = np.full((2, 1, 8, 8), 0.25, np.float32)
    np.testing.assert_allclose(resize(x, 28, 28), 0.25, rtol=1e-6)
    ramp = np.tile(np.linspace(0, 1, 8, dtype=np.float32), (1, 1, 8, 1))
    assert abs(resize(ramp, 16, 16).mean() - ramp.mean()) < 1e-6


def test_stratified_split():
    labels = np.repeat(np.arange(4), 25)
    tr, va = split(None, labels, 0.2, seed=0)
    assert len(set(tr) & set(va)) == 0 and len(tr) + len(va) == 100
    assert np.bincount(labels[va]).tolist() == [5, 5, 5, 5]


def test_mirror_and_crop():
    rng = np.random.default_rng(0)
    x = rng.random((64, 2, 6, 5)).astype(np.float32)
    y = augment(x, AugmentConfig(mirror=True), np.random.default_rng(1))
    flipped = np.array([np.array_equal(y[i], x[i, :, :, ::-1]) for i in range(64)])
    kept = np.array([np.array_equal(y[i], x[i]) for i in range(64)])
    assert np.all(flipped | kept) and 16 < flipped.sum() < 48
    y = augment(x, AugmentConfig(crop_pad=2), np.random.default_rng(1))
    assert y.shape == x.shape
    for i in range(8):  # every crop is a shifted window of the zero-padded image
        padded = np.pad(x[i], ((0, 0), (2, 2), (2, 2)))
        assert any(np.array_equal(y[i], padded[:, dy:dy + 6, dx:dx + 5]) for dy in range(5) for dx in range(5))


def test_pca_colour_shift_follows_the_principal_axis():
    rng = np.random.default_rng(0)
    base = rng.random((200, 1, 4, 4))
    x = np.concatenate([base, base * 0.5, base * 0.1], axis=1).astype(np.float32) * 0.5 + 0.2
    values, vectors = pca_basis(x)
    y = augment(x, AugmentConfig(pca_color=0.5), np.random.default_rng(3), (values, vectors))
    shift = (y - x)[:, :, 0, 0]
    top = vectors[:, np.argmax(values)]
    along = np.abs(shift @ top) / np.linalg.norm(shift, axis=1).clip(1e-12)
    assert np.median(along) > 0.99  # the shift lies along the dominant colour direction


def test_loader_is_deterministic_and_resumable():
    images, labels, classes = make_shapes(100, 4, (3, 8, 8), 0)
    data = Dataset(images, labels, classes)
    loader = BatchLoader(data, 16, [0.5] * 3, [0.25] * 3, seed=3, augment_cfg=AugmentConfig(True, 1))
    full = list(loader.epoch(2))
    assert len(full) == len(loader) == 6
    again = list(loader.epoch(2))
    tail = list(loader.epoch(2, start=4))
    for (a, la), (b, lb) in zip(full, again):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(la, lb)
    np.testing.assert_array_equal(full[4][0], tail[0][0])
    other = list(loader.epoch(3))
    assert not np.array_equal(full[0][1], other[0][1])  # a new order every epoch


def test_loader_reports_worker_errors():
    data = Dataset(np.zeros((10, 1, 4, 4), np.float32), np.zeros(10, np.int64), ["a"])
    loader = BatchLoader(data, 4, [0.0], [1.0])
    loader.make_batch = lambda *a: (_ for _ in ()).throw(ValueError("boom"))
    with pytest.raises(ValueError, match="boom"):
        list(loader.epoch(0))


def test_digits_and_imagefolder(tmp_path):
    train, val = load_dataset({"dataset": "digits", "val_fraction": 0.2}, (1, 28, 28), 10, tmp_path)
    assert train.images.shape[1:] == (1, 28, 28) and len(train) + len(val) == 1797
    from PIL import Image
    for k, name in enumerate(["cat", "dog"]):
        (tmp_path / "imgs" / name).mkdir(parents=True)
        for i in range(5):
            Image.fromarray(np.full((10, 12, 3), 40 * k + i, np.uint8)).save(tmp_path / "imgs" / name / f"{i}.png")
    train, val = load_dataset({"dataset": "imagefolder", "root": "imgs", "val_fraction": 0.2}, (3, 8, 8), 2,
                              tmp_path)
    assert train.classes == ["cat", "dog"] and len(train) == 8 and len(val) == 2
    assert train.images.shape == (8, 3, 8, 8)
    (tmp_path / "imgs" / "dog" / "bad.png").write_bytes(b"not a png")
    with pytest.raises(DlcError, match="bad.png.*cannot read image"):
        load_dataset({"dataset": "imagefolder", "root": "imgs"}, (3, 8, 8), 2, tmp_path)
