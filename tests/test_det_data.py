"""Detection data: the synthetic shapes set, COCO and YOLO loaders, and box-aware augmentation in the loader."""

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dlc.compiler.data.augment import AugmentConfig
from dlc.compiler.data.datasets import load_dataset
from dlc.compiler.data.detection import (
    DetectionDataset,
    DetectionLoader,
    _render_shapes,
    load_detection_dataset,
    make_detection_shapes,
    mirror_boxes,
)
from dlc.compiler.errors import DlcError
from dlc.compiler.sections import check_section
from dlc.compiler.train.config import parse_data
from dlc.compiler.yaml_loader import load_yaml_text


def tight(mask):
    ys, xs = np.nonzero(mask)
    return [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


# ---------------------------------------------------------------------------------------------------------------
# synthetic set


def test_synthetic_boxes_are_tight_bounds_of_visible_object_pixels():
    data, objects = _render_shapes(60, 5, (3, 40, 56), seed=3, max_objects=4, min_size=0.15, max_size=0.5)
    assert data.images.shape == (60, 3, 40, 56) and data.images.dtype == np.float32
    assert 0 <= data.images.min() and data.images.max() <= 1
    for i in range(len(data)):
        boxes, labels = data.boxes[i], data.labels[i]
        assert boxes.dtype == np.float32 and labels.dtype == np.int64 and 1 <= len(boxes) <= 4
        assert set(np.unique(objects[i])) <= set(range(-1, len(boxes)))
        for b in range(len(boxes)):
            mask = objects[i] == b
            assert mask.sum() > 0
            assert boxes[b].tolist() == tight(mask)
            # an object is one flat colour plus noise, and far from the background's grey levels
            pixels = data.images[i][:, mask]
            assert pixels.mean(1).max() > 0.45 and pixels.std(1).max() < 0.08
    # the map agrees with the pixels: objects are bright, the background dark (up to noise)
    bright = data.images.mean(1) > 0.455
    assert ((objects >= 0) == bright).mean() > 0.97


def test_synthetic_is_deterministic_with_valid_counts_and_labels():
    a = make_detection_shapes(300, 4, (3, 32, 32), seed=5, max_objects=3)
    b = make_detection_shapes(300, 4, (3, 32, 32), seed=5, max_objects=3)
    c = make_detection_shapes(300, 4, (3, 32, 32), seed=6, max_objects=3)
    np.testing.assert_array_equal(a.images, b.images)
    assert all(np.array_equal(x, y) for x, y in zip(a.boxes, b.boxes))
    assert not np.array_equal(a.images, c.images)
    counts = np.array([len(x) for x in a.boxes])
    assert counts.min() == 1 and counts.max() == 3 and (counts > 1).mean() > 0.3
    labels = np.concatenate(a.labels)
    assert set(labels.tolist()) == {0, 1, 2, 3}
    assert a.classes == ["disc", "square", "triangle", "plus"] and a.image_ids == list(range(1, 301))
    sides = np.concatenate([np.maximum(x[:, 2] - x[:, 0], x[:, 3] - x[:, 1]) for x in a.boxes])
    assert sides.max() <= 0.5 * 32 + 1 and np.median(sides) > 0.15 * 32
    with pytest.raises(DlcError, match="max_objects"):
        make_detection_shapes(10, 2, (3, 16, 16), max_objects=0)


def test_synthetic_size_and_speed_sanity():
    data = make_detection_shapes(2000, 3, (3, 64, 64))  # must stay well under 2 s (see benchmarks/)
    assert data.images.shape == (2000, 3, 64, 64) and len(data.boxes) == 2000


def test_subset_and_to_coco_round_trip(tmp_path):
    data = make_detection_shapes(12, 3, (3, 24, 32), seed=1)
    data.iscrowd = [np.arange(len(b)) == 0 for b in data.boxes]
    sub = data.subset([3, 1])
    assert sub.image_ids == [4, 2] and np.array_equal(sub.images[0], data.images[3])
    assert np.array_equal(sub.boxes[1], data.boxes[1]) and sub.iscrowd[0][0]
    coco = data.to_coco()
    assert [c["id"] for c in coco["categories"]] == [1, 2, 3]
    first = [a for a in coco["annotations"] if a["image_id"] == 1]
    x1, y1, x2, y2 = data.boxes[0][0]
    assert first[0]["bbox"] == [x1, y1, x2 - x1, y2 - y1] and first[0]["area"] == (x2 - x1) * (y2 - y1)
    assert first[0]["category_id"] == data.labels[0][0] + 1 and first[0]["iscrowd"] == 1
    assert len({a["id"] for a in coco["annotations"]}) == sum(len(b) for b in data.boxes)
    # the dict is a valid COCO ground truth, and the COCO loader reads it back unchanged
    from pycocotools.coco import COCO
    gt = COCO()
    gt.dataset = coco
    gt.createIndex()
    assert len(gt.getAnnIds()) == len(coco["annotations"])
    for im, arr in zip(coco["images"], data.images):
        Image.fromarray((arr.transpose(1, 2, 0) * 255).round().astype(np.uint8)).save(tmp_path / im["file_name"])
    (tmp_path / "ann.json").write_text(json.dumps(coco))
    train, val = load_detection_dataset({"dataset": "coco", "images": ".", "annotations": "ann.json",
                                         "val_fraction": 0.0}, (3, 24, 32), tmp_path)
    assert len(val) == 0 and train.image_ids == data.image_ids and train.classes == data.classes
    for i in range(len(data)):
        np.testing.assert_allclose(train.boxes[i], data.boxes[i], atol=1e-5)
        assert np.array_equal(train.labels[i], data.labels[i]) and np.array_equal(train.iscrowd[i],
                                                                                   data.iscrowd[i])
    np.testing.assert_allclose(train.images, data.images, atol=0.5 / 255 + 1e-6)


# ---------------------------------------------------------------------------------------------------------------
# COCO


def save_png(path, w, h, value=128):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w, 3), value, np.uint8)).save(path)


def coco_files(tmp_path, anns=None, images=None, categories=None, name="ann.json"):
    save_png(tmp_path / "img" / "a.png", 40, 30)
    save_png(tmp_path / "img" / "sub" / "b.png", 20, 60)
    doc = {
        "images": images or [{"id": 7, "file_name": "a.png", "width": 40, "height": 30},
                             {"id": 9, "file_name": "sub/b.png", "width": 20, "height": 60}],
        "annotations": anns if anns is not None else [
            {"id": 1, "image_id": 7, "category_id": 3, "bbox": [4, 3, 10, 6], "iscrowd": 0},
            {"id": 2, "image_id": 7, "category_id": 5, "bbox": [30, 20, 20, 20], "iscrowd": 1},  # clipped
            {"id": 3, "image_id": 9, "category_id": 3, "bbox": [2, 6, 8, 30]},
            {"id": 4, "image_id": 9, "category_id": 5, "bbox": [25, 6, 8, 30]},  # outside: dropped
        ],
        "categories": categories or [{"id": 5, "name": "cat"}, {"id": 3, "name": "dog"}],
    }
    (tmp_path / name).write_text(json.dumps(doc))
    return {"dataset": "coco", "images": "img", "annotations": name, "val_fraction": 0.0}


def test_coco_boxes_scaled_to_the_input_size_with_crowd_flags(tmp_path, caplog):
    cfg = coco_files(tmp_path)
    with caplog.at_level(logging.WARNING, logger="dlc.data"):
        train, _ = load_detection_dataset(cfg, (3, 24, 32), tmp_path)
    assert "dropped 1 boxes" in caplog.text and "ann.json" in caplog.text
    assert train.classes == ["dog", "cat"] and train.image_ids == [7, 9]  # categories sorted by id
    assert train.images.shape == (2, 3, 24, 32) and abs(train.images.mean() - 128 / 255) < 1e-6
    sx, sy = 32 / 40, 24 / 30
    np.testing.assert_allclose(train.boxes[0], [[4 * sx, 3 * sy, 14 * sx, 9 * sy],
                                                [30 * sx, 20 * sy, 40 * sx, 30 * sy]], rtol=1e-6)
    assert train.labels[0].tolist() == [0, 1] and train.iscrowd[0].tolist() == [False, True]
    sx, sy = 32 / 20, 24 / 60
    np.testing.assert_allclose(train.boxes[1], [[2 * sx, 6 * sy, 10 * sx, 36 * sy]], rtol=1e-6)
    # the loader leaves crowd regions out of the targets
    loader = DetectionLoader(train, 2, [0, 0, 0], [1, 1, 1], shuffle=False)
    _, targets = next(iter(loader.epoch(0)))
    assert len(targets[0][0]) == 1 and targets[0][1].tolist() == [0]


def test_coco_validation_file_and_fraction_split(tmp_path):
    cfg = coco_files(tmp_path)
    coco_files(tmp_path, name="val.json")
    train, val = load_detection_dataset({**cfg, "val_annotations": "val.json"}, (1, 16, 16), tmp_path)
    assert len(train) == len(val) == 2 and val.images.shape == (2, 1, 16, 16)
    coco_files(tmp_path, name="other.json", categories=[{"id": 5, "name": "cat"}])
    with pytest.raises(DlcError, match="other.json.*categories differ"):
        load_detection_dataset({**cfg, "val_annotations": "other.json"}, (3, 16, 16), tmp_path)
    a, b = load_detection_dataset({**cfg, "val_fraction": 0.5, "seed": 2}, (3, 16, 16), tmp_path)
    assert len(a) == len(b) == 1 and sorted(a.image_ids + b.image_ids) == [7, 9]


def test_coco_boxes_follow_the_listed_image_size(tmp_path, caplog):
    images = [{"id": 7, "file_name": "a.png", "width": 20, "height": 15},  # the file is 40×30: resized since
              {"id": 9, "file_name": "sub/b.png"}]  # no size listed: the file's own
    anns = [{"id": 1, "image_id": 7, "category_id": 3, "bbox": [2, 3, 10, 6]},
            {"id": 2, "image_id": 9, "category_id": 3, "bbox": [2, 6, 8, 30]}]
    cfg = coco_files(tmp_path, anns=anns, images=images)
    with caplog.at_level(logging.WARNING, logger="dlc.data"):
        train, _ = load_detection_dataset(cfg, (3, 30, 40), tmp_path)
    assert "1 images differ in size" in caplog.text
    np.testing.assert_allclose(train.boxes[0], [[4, 6, 24, 18]], rtol=1e-6)
    np.testing.assert_allclose(train.boxes[1], [[4, 3, 20, 18]], rtol=1e-6)


@pytest.mark.parametrize("change, message", [
    ({"anns": [{"id": 11, "image_id": 7, "category_id": 4, "bbox": [0, 0, 1, 1]}]},
     r"ann.json: annotation id 11: unknown category_id 4 \(known ids: 3, 5\)"),
    ({"anns": [{"id": 12, "image_id": 8, "category_id": 3, "bbox": [0, 0, 1, 1]}]},
     "annotation id 12: unknown image_id 8"),
    ({"anns": [{"id": 13, "image_id": 7, "category_id": 3, "bbox": [0, 0, 1]}]},
     r"annotation id 13: 'bbox' must be 4 finite numbers"),
    ({"anns": [], "images": [{"id": 1, "file_name": "../a.png"}]}, "image id 1: file_name '../a.png' leaves the images folder"),
    ({"anns": [], "images": [{"id": 1, "file_name": "/etc/passwd"}]}, "file_name '/etc/passwd' leaves the images folder"),
    ({"anns": [], "images": [{"id": 1, "file_name": "missing.png"}]}, "missing.png: image file not found"),
])
def test_coco_errors_name_the_file_and_annotation(tmp_path, change, message):
    cfg = coco_files(tmp_path, **change)
    with pytest.raises(DlcError, match=message):
        load_detection_dataset(cfg, (3, 16, 16), tmp_path)


def test_coco_bad_json_and_corrupt_image(tmp_path):
    cfg = coco_files(tmp_path)
    (tmp_path / "bad.json").write_text('{"images": [\n  {"id": 1,}\n]}')
    with pytest.raises(DlcError, match=r"bad.json:2: not valid JSON"):
        load_detection_dataset({**cfg, "annotations": "bad.json"}, (3, 16, 16), tmp_path)
    with pytest.raises(DlcError, match=r"nothere.json: COCO annotation file not found"):
        load_detection_dataset({**cfg, "annotations": "nothere.json"}, (3, 16, 16), tmp_path)
    (tmp_path / "img" / "a.png").write_bytes(b"not a png at all")
    with pytest.raises(DlcError, match=r"a.png: cannot read image"):
        load_detection_dataset(cfg, (3, 16, 16), tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# YOLO


def yolo_files(root, lines, split=""):
    save_png(root / "images" / split / "p.png", 50, 40)
    save_png(root / "images" / split / "q.jpg", 20, 20)  # no label file: an image without objects
    (root / "labels" / split).mkdir(parents=True, exist_ok=True)
    (root / "labels" / split / "p.txt").write_text("\n".join(lines) + "\n")


def test_yolo_boxes_names_file_and_split_layouts(tmp_path, caplog):
    yolo_files(tmp_path / "ds", ["1 0.5 0.5 0.4 0.5", "", "0 0.1 0.1 0.4 0.4", "0 1.2 0.5 0.2 0.2"])
    (tmp_path / "names.txt").write_text("car\nbike\n\n")
    with caplog.at_level(logging.WARNING, logger="dlc.data"):
        train, val = load_detection_dataset({"dataset": "yolo", "root": "ds", "classes": "names.txt",
                                             "val_fraction": 0.0}, (3, 20, 25), tmp_path)
    assert "dropped 1 boxes" in caplog.text
    assert train.classes == ["car", "bike"] and len(train) == 2 and len(val) == 0
    # p.png is 50×40 resized to 25×20: scale 0.5 on both axes; the second box is clipped at the corner
    np.testing.assert_allclose(train.boxes[0], [[7.5, 5, 17.5, 15], [0, 0, 7.5, 6]], rtol=1e-6)
    assert train.labels[0].tolist() == [1, 0] and len(train.boxes[1]) == 0 and train.boxes[1].shape == (0, 4)
    yolo_files(tmp_path / "u", ["0 0.5 0.5 1 1"], "train")
    yolo_files(tmp_path / "u", ["0 0.5 0.5 0.5 0.5"], "val")
    train, val = load_detection_dataset({"dataset": "yolo", "root": "u", "classes": ["x"]}, (3, 8, 10), tmp_path)
    np.testing.assert_allclose(train.boxes[0], [[0, 0, 10, 8]])
    np.testing.assert_allclose(val.boxes[0], [[2.5, 2, 7.5, 6]])


@pytest.mark.parametrize("line, message", [
    ("0 0.5 0.5 0.2", "p.txt:2: expected 'class cx cy w h'"),
    ("a 0.5 0.5 0.2 0.2", "p.txt:2: expected 'class cx cy w h'"),
    ("0.5 0.5 0.5 0.2 0.2", "p.txt:2: expected 'class cx cy w h'"),
    ("0 0.5 nan 0.2 0.2", "p.txt:2: expected 'class cx cy w h'"),
    ("3 0.5 0.5 0.2 0.2", r"p.txt:2: class 3 is not in 0..1 \(2 classes\)"),
])
def test_yolo_bad_lines_name_file_and_line(tmp_path, line, message):
    yolo_files(tmp_path, ["0 0.5 0.5 0.2 0.2", line])
    with pytest.raises(DlcError, match=message):
        load_detection_dataset({"dataset": "yolo", "root": ".", "classes": ["a", "b"]}, (3, 8, 8), tmp_path)


def test_yolo_unreadable_label_file_and_missing_labels_folder(tmp_path):
    yolo_files(tmp_path, [])
    cfg = {"dataset": "yolo", "root": ".", "classes": ["a"]}
    (tmp_path / "labels" / "p.txt").write_bytes(b"0 0.5 \xff\xfe")
    with pytest.raises(DlcError, match="p.txt: cannot read label file"):
        load_detection_dataset(cfg, (3, 8, 8), tmp_path)
    (tmp_path / "labels" / "p.txt").unlink()
    (tmp_path / "labels").rmdir()
    with pytest.raises(DlcError, match="labels folder .* not found"):
        load_detection_dataset(cfg, (3, 8, 8), tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# loader and augmentation


def test_loader_is_deterministic_and_resumes_at_an_iteration():
    data = make_detection_shapes(40, 3, (3, 16, 16), seed=2)
    cfg = AugmentConfig(mirror=True, crop_pad=1, pca_color=0.1)
    a = DetectionLoader(data, 8, [0.5] * 3, [0.25] * 3, seed=4, augment_cfg=cfg)
    b = DetectionLoader(data, 8, [0.5] * 3, [0.25] * 3, seed=4, augment_cfg=cfg)
    first, again = list(a.epoch(1)), list(b.epoch(1))
    assert len(first) == len(a) == 5
    resumed = list(b.epoch(1, start=3))
    for (x, t), (y, u) in zip(first[3:] + first, resumed + again):
        np.testing.assert_array_equal(x, y)
        assert all(np.array_equal(p[0], q[0]) and np.array_equal(p[1], q[1]) for p, q in zip(t, u))
    assert len(resumed) == 2
    other = list(a.epoch(2))
    assert not np.array_equal(first[0][0], other[0][0])
    # no augmentation: normalised images and the stored targets, in order
    plain = DetectionLoader(data, 8, [0.5] * 3, [0.25] * 3, shuffle=False)
    x, targets = next(iter(plain.epoch(0)))
    np.testing.assert_allclose(x, (data.images[:8] - 0.5) / 0.25, rtol=1e-6)
    assert all(np.array_equal(t[0], data.boxes[i]) and t[1].dtype == np.int64 for i, t in enumerate(targets))


def rectangle_set(n, box, h=32, w=48):
    x1, y1, x2, y2 = box
    images = np.zeros((n, 1, h, w), np.float32)
    images[:, :, y1:y2, x1:x2] = 1
    boxes = [np.array([box], np.float32) for _ in range(n)]
    return DetectionDataset(images, boxes, [np.array([0]) for _ in range(n)], ["r"], list(range(1, n + 1)))


def test_mirror_moves_boxes_with_pixels_exactly():
    data = rectangle_set(32, (5, 8, 17, 20))
    loader = DetectionLoader(data, 32, [0], [1], augment_cfg=AugmentConfig(mirror=True), shuffle=False)
    x, targets = next(iter(loader.epoch(0)))
    flipped = 0
    for img, (boxes, labels) in zip(x, targets):
        assert boxes.tolist() == [tight(img[0] > 0.5)] and labels.tolist() == [0]
        flipped += boxes[0, 0] == 48 - 17
    assert 5 < flipped < 27
    np.testing.assert_array_equal(mirror_boxes(np.array([[1.0, 2, 4, 6]]), 10), [[6, 2, 9, 6]])


@pytest.mark.parametrize("box", [(10, 8, 30, 20), (0, 0, 7, 6), (40, 25, 48, 32)])
def test_crop_moves_boxes_with_pixels(box):
    data = rectangle_set(64, box)
    cfg = AugmentConfig(mirror=True, crop_pad=4)
    loader = DetectionLoader(data, 64, [0], [1], seed=1, augment_cfg=cfg, shuffle=False)
    x, targets = next(iter(loader.epoch(0)))
    area = (box[2] - box[0]) * (box[3] - box[1])
    kept, boxes_seen = 0, set()
    for img, (boxes, _) in zip(x, targets):
        on = img[0] > 0.5
        if len(boxes):
            kept += 1
            # the 0.5 level of a bilinearly resampled step lies on the box edge, so the lit pixels are the
            # pixels whose centres fall inside the box: within half a pixel on each side
            np.testing.assert_allclose(tight(on), boxes[0], atol=0.51)
            assert 0 <= boxes[0, 0] < boxes[0, 2] <= 48 and 0 <= boxes[0, 1] < boxes[0, 3] <= 32
            boxes_seen.add(tuple(np.round(boxes[0], 3)))
        else:  # dropped: under 40 % of the box (scaled by at most 1/0.6 per side) stays in view
            assert on.sum() <= 0.4 * area / 0.36 + 2 * (box[2] - box[0] + box[3] - box[1]) / 0.6
    assert kept >= 10 and len(boxes_seen) >= kept // 2  # boxes survive, and the crops differ
    if box == (10, 8, 30, 20):
        assert kept == 64  # a central box always keeps > 40 % of its area (0.6 ≥ its share of each side)


# ---------------------------------------------------------------------------------------------------------------
# YAML `data:` section


def data_section(text):
    return load_yaml_text("data:\n" + text, "m.yaml")["data"]


def check(text):
    section = data_section(text)
    diags = check_section("data", section, "m.yaml", 1)
    if not diags:
        diags = parse_data(section, "m.yaml")[1]
    return [d.format() for d in diags]


def test_data_section_detection_keys():
    assert check("  dataset: coco\n  images: img\n  annotations: a.json\n  val_annotations: v.json\n") == []
    assert check("  dataset: yolo\n  root: ds\n  classes: names.txt\n") == []
    assert check("  dataset: synthetic_detection\n  num_classes: 1\n  max_objects: 6\n") == []
    assert check("  dataset: coco\n  images: img\n") == [
        "m.yaml:2: dataset coco needs 'annotations': the images folder and the COCO instances JSON file, "
        "relative to this file"]
    assert check("  dataset: cocoo\n") == [
        "m.yaml:2: 'data.dataset' must be one of synthetic, digits, imagefolder, synthetic_detection, coco, yolo, "
        "synthetic_segmentation, segmentation, got 'cocoo' (did you mean 'coco'?)"]
    assert check("  dataset: yolo\n  root: ds\n") == [
        "m.yaml:2: dataset yolo needs 'classes': a list of class names or a file with one name per line"]
    assert check("  dataset: synthetic_detection\n  max_objects: 100\n") == [
        "m.yaml:3: 'data.max_objects' must be an integer in [1, 64], got 100"]
    assert check("  dataset: synthetic\n  max_objects: 3\n") == [
        "m.yaml:3: 'data.max_objects' is only used by dataset synthetic_detection / synthetic_segmentation, "
        "not 'synthetic'"]
    assert check("  dataset: yolo\n  root: ds\n  classes: [a, a]\n") == [
        "m.yaml:4: 'data.classes' has repeated names: ['a', 'a']"]
    assert check("  dataset: coco\n  images: 3\n  annotations: a.json\n") == [
        "m.yaml:3: 'data.images' must be a string, got 3"]
    with pytest.raises(DlcError, match="dataset 'coco' is a detection set"):
        load_dataset({"dataset": "coco"}, (3, 8, 8), 2, Path("."))
