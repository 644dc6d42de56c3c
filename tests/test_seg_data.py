"""Segmentation data: the synthetic set's exact masks, the images/ + masks/ folder reader and its errors, and
augmentation that moves every mask pixel with its image pixel."""

import numpy as np
import pytest
from PIL import Image

from dlc.compiler.data.augment import AugmentConfig
from dlc.compiler.data.detection import _render_shapes
from dlc.compiler.data.segmentation import (
    SegmentationDataset,
    SegmentationLoader,
    augment_segmentation,
    load_segmentation_dataset,
    make_segmentation_shapes,
    read_mask,
    resize_mask,
)
from dlc.compiler.errors import DlcError


def test_synthetic_masks_are_the_drawn_objects_classes():
    data = make_segmentation_shapes(30, 5, (3, 40, 48), seed=2)
    scenes, objects = _render_shapes(30, 4, (3, 40, 48), 2, 4, 0.2, 0.6)
    assert data.classes == ["background", "disc", "square", "triangle", "plus"]
    assert data.masks.shape == (30, 40, 48) and data.masks.dtype == np.uint8
    np.testing.assert_array_equal(data.images, scenes.images)
    for i in range(30):
        expect = np.where(objects[i] >= 0, scenes.labels[i][np.maximum(objects[i], 0)] + 1, 0)
        np.testing.assert_array_equal(data.masks[i], expect)
    # every class shows up, and an object's pixels differ from the background in the image
    assert (data.pixel_counts() > 0).all()
    again = make_segmentation_shapes(30, 5, (3, 40, 48), seed=2)
    np.testing.assert_array_equal(again.masks, data.masks)
    assert not np.array_equal(make_segmentation_shapes(30, 5, (3, 40, 48), seed=3).masks, data.masks)


def test_synthetic_split_and_class_count_limits():
    train, val = load_segmentation_dataset({"dataset": "synthetic_segmentation", "samples": 50, "val_fraction": 0.2},
                                           (1, 32, 32), ".")
    assert len(train) == 40 and len(val) == 10 and train.images.shape[1] == 1
    assert train.classes == ["background", "disc", "square", "triangle"]
    with pytest.raises(DlcError, match="2 to 13 classes"):
        make_segmentation_shapes(5, 14, (3, 16, 16))


def test_resize_mask_is_nearest_and_keeps_only_existing_classes():
    mask = np.random.default_rng(0).integers(0, 5, (7, 9))
    out = resize_mask(mask, 20, 4)
    assert out.shape == (20, 4) and set(np.unique(out)) <= set(np.unique(mask))
    # pixel centres: row i of 20 reads source row floor((i + 0.5) * 7 / 20)
    for i in range(20):
        for j in range(4):
            assert out[i, j] == mask[int((i + 0.5) * 7 / 20), int((j + 0.5) * 9 / 4)]
    np.testing.assert_array_equal(resize_mask(mask, 14, 18)[::2, ::2], mask)


def _write_set(root, n=4, size=(20, 16), classes=3, palette_mode=False, rng=None):
    rng = rng or np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir(parents=True)
    masks = []
    for i in range(n):
        w, h = size
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(img).save(root / "images" / f"im{i}.png")
        mask = rng.integers(0, classes, (h, w)).astype(np.uint8)
        mask[0, 0] = 255  # ignored
        if palette_mode:
            im = Image.new("P", (w, h))
            im.putdata(mask.ravel().tolist())
            im.putpalette([v for k in range(256) for v in (k * 40 % 256, k * 90 % 256, k * 10 % 256)])
            im.save(root / "masks" / f"im{i}.png")
        else:
            Image.fromarray(mask).save(root / "masks" / f"im{i}.png")
        masks.append(mask)
    return masks


@pytest.mark.parametrize("palette_mode", [False, True])
def test_folder_reader_reads_grey_and_palette_masks_as_indices(tmp_path, palette_mode):
    masks = _write_set(tmp_path / "set", n=5, size=(20, 16), palette_mode=palette_mode)
    (tmp_path / "set" / "classes.txt").write_text("sky\nroad\ncar\n")
    if palette_mode:
        assert Image.open(tmp_path / "set" / "masks" / "im0.png").mode == "P"
    train, val = load_segmentation_dataset({"dataset": "segmentation", "root": "set", "val_fraction": 0.4},
                                           (3, 16, 20), tmp_path)
    assert train.classes == ["sky", "road", "car"] and len(train) == 3 and len(val) == 2
    for data in (train, val):
        for k, name in enumerate(data.names):
            np.testing.assert_array_equal(data.masks[k], masks[int(name[2:])])
            assert data.sizes[k] == (20, 16)


def test_folder_reader_resizes_masks_nearest_with_their_images(tmp_path):
    masks = _write_set(tmp_path / "set", n=2, size=(10, 8))
    train, val = load_segmentation_dataset({"dataset": "segmentation", "root": "set", "val_fraction": 0.5,
                                            "classes": ["a", "b", "c"]}, (3, 16, 20), tmp_path)
    both = {**dict(zip(train.names, train.masks)), **dict(zip(val.names, val.masks))}
    for name, mask in both.items():
        np.testing.assert_array_equal(mask, resize_mask(masks[int(name[2:])], 16, 20))


def test_rgb_masks_map_through_the_palette(tmp_path):
    palette = [[0, 0, 0], [255, 0, 0], [0, 128, 255]]
    idx = np.random.default_rng(1).integers(0, 3, (6, 7))
    Image.fromarray(np.asarray(palette, np.uint8)[idx]).save(tmp_path / "m.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "m.png", np.asarray(palette)), idx)
    with pytest.raises(DlcError, match="RGB image; masks are single-channel"):
        read_mask(tmp_path / "m.png")
    rgb = np.asarray(palette, np.uint8)[idx]
    rgb[2, 3] = [1, 2, 3]
    Image.fromarray(rgb).save(tmp_path / "m2.png")
    with pytest.raises(DlcError, match=r"m2.png.*pixel \(3, 2\) has colour \[1, 2, 3\]"):
        read_mask(tmp_path / "m2.png", np.asarray(palette))


def test_folder_errors_name_the_file(tmp_path):
    cfg = {"dataset": "segmentation", "root": "set", "classes": ["a", "b", "c"]}
    _write_set(tmp_path / "set", n=3)
    (tmp_path / "set" / "masks" / "im1.png").unlink()
    with pytest.raises(DlcError, match=r"im1.png.*image has no mask"):
        load_segmentation_dataset(cfg, (3, 16, 20), tmp_path)
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(tmp_path / "set" / "masks" / "im1.png")
    with pytest.raises(DlcError, match=r"masks/im1.png.*mask is 5×5 but its image im1.png is 20×16"):
        load_segmentation_dataset(cfg, (3, 16, 20), tmp_path)
    bad = np.zeros((16, 20), np.uint8)
    bad[3, 4] = 7
    Image.fromarray(bad).save(tmp_path / "set" / "masks" / "im1.png")
    with pytest.raises(DlcError, match=r"im1.png.*pixel \(4, 3\) has class 7, not in 0..2"):
        load_segmentation_dataset(cfg, (3, 16, 20), tmp_path)
    (tmp_path / "set" / "masks" / "im1.png").write_bytes(b"not a png")
    with pytest.raises(DlcError, match=r"im1.png.*cannot read mask"):
        load_segmentation_dataset(cfg, (3, 16, 20), tmp_path)
    with pytest.raises(DlcError, match="needs the class names"):
        load_segmentation_dataset({"dataset": "segmentation", "root": "set"}, (3, 16, 20), tmp_path)


def test_mirror_and_crop_move_mask_pixels_with_image_pixels():
    rng = np.random.default_rng(5)
    n, h, w = 16, 12, 14
    # each pixel's image value encodes its own position, and the mask holds the same code mod 200
    code = (np.arange(h)[:, None] * w + np.arange(w)[None, :] + 1).astype(np.float32)
    x = np.broadcast_to(code / (h * w + 1), (n, 3, h, w)).copy()
    masks = np.broadcast_to((code % 200).astype(np.uint8), (n, h, w)).copy()
    out_x, out_m = augment_segmentation(x, masks, AugmentConfig(mirror=True, crop_pad=3), rng, 255)
    moved = 0
    for i in range(n):
        img_code = np.rint(out_x[i, 0] * (h * w + 1)).astype(np.int64)
        pad = img_code == 0  # zero padding in the image ...
        np.testing.assert_array_equal(out_m[i][pad], 255)  # ... is ignored in the mask
        np.testing.assert_array_equal(out_m[i][~pad], img_code[~pad] % 200)
        moved += not np.array_equal(out_m[i], masks[i])
    assert moved >= n // 2  # the augmentation did move things


def test_loader_yields_int64_masks_and_is_deterministic():
    data = make_segmentation_shapes(12, 3, (3, 16, 16), seed=1)
    cfg = AugmentConfig(mirror=True, crop_pad=2)
    a = SegmentationLoader(data, 4, [0.5] * 3, [0.25] * 3, seed=3, augment_cfg=cfg)
    b = SegmentationLoader(data, 4, [0.5] * 3, [0.25] * 3, seed=3, augment_cfg=cfg)
    for (xa, ma), (xb, mb) in zip(a.epoch(1), b.epoch(1)):
        assert ma.dtype == np.int64 and ma.shape == (4, 16, 16) and xa.shape == (4, 3, 16, 16)
        np.testing.assert_array_equal(ma, mb)
        np.testing.assert_array_equal(xa, xb)
    plain = SegmentationLoader(data, 4, [0.0] * 3, [1.0] * 3, shuffle=False)
    x, m = next(iter(plain.epoch(0)))
    np.testing.assert_array_equal(m, data.masks[:4])
    np.testing.assert_allclose(x, data.images[:4])


def test_pixel_counts_leave_out_ignored_pixels():
    masks = np.array([[[0, 1, 255], [2, 2, 255]]], np.uint8)
    data = SegmentationDataset(np.zeros((1, 1, 2, 3), np.float32), masks, ["a", "b", "c"])
    np.testing.assert_array_equal(data.pixel_counts(), [1, 1, 2])
