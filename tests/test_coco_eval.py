"""COCO bbox evaluation against pycocotools' COCOeval, and validation of COCO files."""

import contextlib
import copy
import io
import json

import numpy as np
import pytest

from dlc.compiler.errors import DlcError
from dlc.runtime.coco import STAT_NAMES, coco_evaluate, coco_iou


def synthetic(seed, n_images=30, cat_ids=(1, 3, 7, 9), crowd_rate=0.1, many_dets=(2, 5)):
    """Random GT and detections covering what COCOeval distinguishes.

    Images without GT, a category without detections (9), crowd GT, an `area` field unlike w*h, all three
    area ranges, integer boxes (equal IoUs), scores rounded to 2 decimals (ties), and >100 detections on
    some images so that maxDets cuts."""
    rng = np.random.default_rng(seed)
    images = [{"id": 100 + 3 * i, "width": 640, "height": 480} for i in range(n_images)]
    categories = [{"id": c, "name": f"cat{c}"} for c in cat_ids]
    anns, dets = [], []
    for i, img in enumerate(images):
        n_gt = 0 if i % 7 == 3 else int(rng.integers(1, 8))
        gts = []
        for _ in range(n_gt):
            w, h = np.exp(rng.uniform(np.log(4), np.log(300), 2))
            x, y = rng.uniform(0, 400, 2)
            box = [float(x), float(y), float(w), float(h)]
            if rng.random() < 0.5:
                box = [float(round(v)) for v in box]
            crowd = int(rng.random() < crowd_rate)
            area = box[2] * box[3] * (float(rng.uniform(0.5, 1.0)) if rng.random() < 0.5 else 1.0)
            ann = {"id": len(anns) + 1, "image_id": img["id"], "category_id": int(rng.choice(cat_ids)),
                   "bbox": box, "area": area, "iscrowd": crowd}
            anns.append(ann)
            gts.append(ann)
        n_det = int(rng.integers(330, 400)) if i in many_dets else int(rng.integers(0, 15))
        for _ in range(n_det):
            cat = int(rng.choice(cat_ids[:-1]))
            score = 0.7 * rng.random()
            if gts and rng.random() < 0.7:
                ann = gts[int(rng.integers(len(gts)))]
                g = ann["bbox"]
                jitter = rng.normal(0, 0.08, 4) * np.array([g[2], g[3], g[2], g[3]])
                box = [g[0] + jitter[0], g[1] + jitter[1], max(g[2] + jitter[2], 1.0), max(g[3] + jitter[3], 1.0)]
                if ann["category_id"] != cat_ids[-1] and rng.random() < 0.8:
                    cat = ann["category_id"]
                    score = 0.3 + 0.7 * rng.random()
            else:
                box = [*rng.uniform(0, 400, 2), *np.exp(rng.uniform(np.log(3), np.log(250), 2))]
            if rng.random() < 0.5:
                box = [float(round(v)) for v in box]
            dets.append({"image_id": img["id"], "category_id": cat, "bbox": [float(v) for v in box],
                         "score": round(float(score), 2)})
    return {"images": images, "annotations": anns, "categories": categories}, dets


def pycoco(gt, dets):
    coco = pytest.importorskip("pycocotools.coco")
    cocoeval = pytest.importorskip("pycocotools.cocoeval")
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        ref_gt = coco.COCO()
        ref_gt.dataset = copy.deepcopy(gt)
        ref_gt.createIndex()
        ref = cocoeval.COCOeval(ref_gt, ref_gt.loadRes(copy.deepcopy(dets)), "bbox")
        ref.evaluate()
        ref.accumulate()
        ref.summarize()
    return ref, printed.getvalue()


@pytest.mark.parametrize("seed, crowd_rate", [(0, 0.1), (1, 0.25), (2, 0.0), (3, 0.1)])
def test_matches_pycocotools(seed, crowd_rate):
    gt, dets = synthetic(seed, crowd_rate=crowd_rate)
    ref, printed = pycoco(gt, dets)
    res = coco_evaluate(gt, dets)
    np.testing.assert_allclose(res.stats, ref.stats, atol=1e-4, rtol=0)
    np.testing.assert_allclose(res.precision, ref.eval["precision"], atol=1e-9, rtol=0)
    np.testing.assert_allclose(res.recall, ref.eval["recall"], atol=1e-9, rtol=0)
    assert res.summary() == "\n".join(line for line in printed.splitlines() if line.startswith(" Average"))
    # category 9 gets no detections: its AP is 0 where it has GT
    ap9 = ref.eval["precision"][:, :, 3, 0, 2]
    assert res.per_category["cat9"] == pytest.approx(np.mean(ap9[ap9 > -1]) if (ap9 > -1).any() else -1)
    assert 0 < res.stats[0] < 1 and res.stats[5] > -1


def test_max_dets_and_area_ranges_matter():
    gt, dets = synthetic(5, n_images=12, many_dets=(0, 1, 2, 3))
    ref, _ = pycoco(gt, dets)
    res = coco_evaluate(gt, dets)
    np.testing.assert_allclose(res.stats, ref.stats, atol=1e-4, rtol=0)
    np.testing.assert_allclose(res.precision, ref.eval["precision"], atol=1e-9, rtol=0)
    assert res.stats[6] < res.stats[7] < res.stats[8]  # AR@1 < AR@10 < AR@100
    assert len({round(s, 4) for s in res.stats[3:6]}) == 3  # small / medium / large all populated


def test_small_work_chunks_give_the_same_result(monkeypatch):
    import dlc.runtime.coco as coco

    gt, dets = synthetic(6, n_images=20)
    ref, _ = pycoco(gt, dets)
    monkeypatch.setattr(coco, "_CHUNK_CELLS", 64)  # many chunks of a few groups each
    np.testing.assert_allclose(coco.coco_evaluate(gt, dets).precision, ref.eval["precision"], atol=1e-12, rtol=0)


def test_detections_of_unknown_categories_are_left_out():
    gt, dets = synthetic(10, n_images=10)
    extra = [{**d, "category_id": 999} for d in dets[:20]]
    assert coco_evaluate(gt, dets + extra).stats == coco_evaluate(gt, dets).stats
    ref, _ = pycoco(gt, dets + extra)
    np.testing.assert_allclose(coco_evaluate(gt, dets + extra).stats, ref.stats, atol=1e-12, rtol=0)


def test_files_and_summary(tmp_path):
    gt, dets = synthetic(7, n_images=10)
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "dt.json").write_text(json.dumps(dets))
    from_files = coco_evaluate(tmp_path / "gt.json", str(tmp_path / "dt.json"))
    in_memory = coco_evaluate(gt, dets)
    assert from_files.stats == in_memory.stats
    d = from_files.to_dict()
    assert list(d["stats"].values()) == from_files.stats and d["names"] == list(STAT_NAMES)
    assert STAT_NAMES[1] == " Average Precision  (AP) @[ IoU=0.50      | area=   all | maxDets=100 ]"
    json.dumps(d)  # JSON-safe


def test_hand_example_with_crowd():
    # one image: a regular GT and a crowd GT; a detection inside the crowd region is ignored, not a FP
    gt = {"images": [{"id": 1}], "categories": [{"id": 1, "name": "a"}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "area": 100},
                          {"id": 2, "image_id": 1, "category_id": 1, "bbox": [50, 50, 100, 100], "area": 1e4,
                           "iscrowd": 1}]}
    dets = [{"image_id": 1, "category_id": 1, "bbox": [60, 60, 10, 10], "score": 0.9},
            {"image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "score": 0.8}]
    res = coco_evaluate(gt, dets)
    assert res.stats[0] == pytest.approx(1.0) and res.stats[8] == pytest.approx(1.0)
    # crowd IoU uses the detection's area as the union: [60,60,10,10] lies inside, so IoU = 1
    iou = coco_iou(np.array([[60.0, 60, 10, 10]]), np.array([[50.0, 50, 100, 100]]), np.array([True]))
    assert iou[0, 0] == 1.0
    # without crowd the first detection is a false positive and the big GT is missed: precision 0.5 up to
    # recall 0.5, i.e. at 51 of the 101 recall thresholds
    gt["annotations"][1]["iscrowd"] = 0
    res = coco_evaluate(gt, dets)
    assert res.stats[1] == pytest.approx(0.5 * 51 / 101) and res.stats[8] == pytest.approx(0.5)


def test_hand_cases_match_pycocotools():
    def ann(i, img, box, crowd=0, cat=1):
        return {"id": i, "image_id": img, "category_id": cat, "bbox": box, "area": box[2] * box[3], "iscrowd": crowd}

    def det(img, box, score, cat=1):
        return {"image_id": img, "category_id": cat, "bbox": box, "score": score}

    gt = {"images": [{"id": i} for i in (1, 2, 3, 4)], "categories": [{"id": 1}, {"id": 2}],
          "annotations": [
              # image 1: det 1 has equal IoU (0.6) with both GT and must take the later one, leaving A to det 2
              ann(1, 1, [0, 0, 10, 10]), ann(2, 1, [5, 0, 10, 10]),
              # image 2: IoU exactly 0.5 matches at the 0.5 threshold only
              ann(3, 2, [0, 0, 10, 10]),
              # image 3: a regular GT is preferred to a crowd GT with a higher IoU; the crowd takes many
              ann(4, 3, [0, 0, 100, 100]), ann(5, 3, [0, 0, 200, 200], crowd=1),
              # image 4: a large GT and a small unmatched detection (ignored for area=large)
              ann(6, 4, [0, 0, 120, 120], cat=2)]}
    dets = [det(1, [2.5, 0, 10, 10], 0.9), det(1, [0, 0, 10, 10], 0.8),
            det(2, [0, 0, 20, 10], 0.7),
            det(3, [0, 0, 110, 110], 0.95), det(3, [100, 100, 50, 50], 0.9), det(3, [0, 0, 150, 150], 0.6),
            det(4, [0, 0, 118, 121], 0.5, cat=2), det(4, [300, 300, 10, 10], 0.99, cat=2)]
    ref, _ = pycoco(gt, dets)
    res = coco_evaluate(gt, dets)
    np.testing.assert_allclose(res.precision, ref.eval["precision"], atol=1e-12, rtol=0)
    np.testing.assert_allclose(res.stats, ref.stats, atol=1e-12, rtol=0)
    t = list(np.round(np.linspace(0.5, 0.95, 10), 2))
    # category 1 has 4 regular GT: all found at IoU 0.5 (both image 1 detections are TP only because the tie
    # goes to the later GT); the image 2 detection (IoU exactly 0.5) is lost from 0.55 on
    assert res.recall[t.index(0.5), 0, 0, 2] == pytest.approx(4 / 4)
    assert res.recall[t.index(0.55), 0, 0, 2] == pytest.approx(3 / 4)
    # category 2, area=large: the small FP ranked first is ignored, precision stays 1
    assert res.precision[0, :, 1, 3, 2] == pytest.approx(np.ones(101))
    assert res.precision[0, 0, 1, 0, 2] == pytest.approx(0.5)


def test_empty_detections_give_zero_ap():
    gt, _ = synthetic(8, n_images=5)
    res = coco_evaluate(gt, [])
    assert res.stats[0] == 0.0 and res.stats[8] == 0.0 and res.num_detections == 0


@pytest.mark.parametrize("mutate, message", [
    (lambda g, d: d[3].pop("score"), "dt.json: entry 3 has no 'score'"),
    (lambda g, d: d[0].update(image_id=99999), "dt.json: entry 0: image_id 99999 is not an image of the ground"),
    (lambda g, d: d[1].update(bbox=[1, 2, 3]), "dt.json: entry 1: 'bbox' must be [x, y, width, height]"),
    (lambda g, d: d[2].update(score="high"), "dt.json: entry 2: 'score' must be a finite number"),
    (lambda g, d: d[2].update(bbox=[10, 10, -5, 4]), "negative width or height"),
    (lambda g, d: g["annotations"][4].pop("bbox"), "gt.json: annotation 4 has no 'bbox'"),
    (lambda g, d: g["annotations"][1].update(id=1), "gt.json: annotation 1 repeats annotation id 1"),
    (lambda g, d: g.pop("categories"), "gt.json: no 'categories' list"),
    (lambda g, d: g["annotations"][0].update(iscrowd=2), "'iscrowd' must be 0 or 1"),
])
def test_bad_files_raise_dlc_error(tmp_path, mutate, message):
    gt, dets = synthetic(9, n_images=6)
    mutate(gt, dets)
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "dt.json").write_text(json.dumps(dets))
    with pytest.raises(DlcError) as exc:
        coco_evaluate(tmp_path / "gt.json", tmp_path / "dt.json")
    assert message in str(exc.value).replace(str(tmp_path) + "/", "")


def test_unreadable_files(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "gt.json").write_text(json.dumps({"images": [], "annotations": [], "categories": []}))
    with pytest.raises(DlcError, match="bad.json: not valid JSON"):
        coco_evaluate(tmp_path / "bad.json", [])
    with pytest.raises(DlcError, match="missing.json: ground-truth file not found"):
        coco_evaluate(tmp_path / "missing.json", [])
    with pytest.raises(DlcError, match="looks like a ground-truth file"):
        coco_evaluate(tmp_path / "gt.json", tmp_path / "gt.json")


def test_cli_eval(tmp_path):
    from typer.testing import CliRunner

    from dlc.compiler.cli import app

    gt, dets = synthetic(11, n_images=15)
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "dt.json").write_text(json.dumps(dets))
    args = ["eval", "--gt", str(tmp_path / "gt.json"), "--pred", str(tmp_path / "dt.json")]
    runner = CliRunner()
    expected = coco_evaluate(gt, dets)
    result = runner.invoke(app, [*args, "--plot", str(tmp_path / "pr.png")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    for line in expected.summary().splitlines():
        assert line in result.stdout
    assert "mAP@0.5 (VOC all-point) = " in result.stdout and "(VOC07 11-point)" in result.stdout
    assert (tmp_path / "pr.png").read_bytes()[:4] == b"\x89PNG"
    data = json.loads(runner.invoke(app, [*args, "--json", "--iou", "0.6", "--score", "0.3"]).stdout)
    assert list(data["coco"]["stats"].values()) == pytest.approx(expected.stats, abs=1e-12)
    voc = data["voc"]
    assert voc["iou_threshold"] == 0.6 and voc["score_threshold"] == 0.3
    assert [r["name"] for r in voc["per_class"]] == ["cat1", "cat3", "cat7", "cat9"]
    assert voc["tp"] + voc["fn"] == sum(1 for a in gt["annotations"] if not a["iscrowd"])
    assert 0 < voc["map"] < 1 and 0 < voc["map_voc07"] < 1

    (tmp_path / "bad.json").write_text(json.dumps([{"image_id": gt["images"][0]["id"], "bbox": [0, 0, 1, 1]}]))
    bad = runner.invoke(app, ["eval", "--gt", str(tmp_path / "gt.json"), "--pred", str(tmp_path / "bad.json")])
    assert bad.exit_code == 2 and "bad.json: entry 0 has no 'category_id'" in bad.stderr
    assert "Traceback" not in bad.output
    missing = runner.invoke(app, ["eval", "--gt", str(tmp_path / "gt.json")])
    assert missing.exit_code == 2 and "pass both --gt" in missing.stderr
