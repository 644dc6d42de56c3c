"""VOC-style detection metrics: AP on hand-computed curves, evaluate_detections against a plain Python
reference of the VOC devkit's matching, and the PR-curve plot."""

import numpy as np
import pytest

from dlc.compiler.errors import DlcError
from dlc.runtime.metrics import average_precision, evaluate_detections, metrics_to_json, plot_pr_curves


def test_average_precision_hand_computed():
    rec, prec = [0.25, 0.25, 0.5, 0.75], [1.0, 0.5, 2 / 3, 0.75]
    # envelope: 1 up to recall .25, then .75 up to .75, then nothing: .25 * 1 + .5 * .75
    assert average_precision(rec, prec, "all_point") == pytest.approx(0.625, abs=1e-12)
    # 11 points: t = 0, .1, .2 -> 1; t = .3 ... .7 -> .75; t = .8, .9, 1 -> 0
    assert average_precision(rec, prec, "voc07") == pytest.approx((3 + 5 * 0.75) / 11, abs=1e-12)
    # recall 0.3 reaches the 0.3 level exactly (np.arange(0, 1.1, 0.1) would give 0.30000000000000004)
    assert average_precision([0.3], [1.0], "voc07") == pytest.approx(4 / 11, abs=1e-12)
    assert average_precision([0.3], [1.0], "all_point") == pytest.approx(0.3, abs=1e-12)
    assert average_precision([1.0], [1.0], "voc07") == pytest.approx(1.0)
    assert average_precision([], [], "all_point") == 0.0
    with pytest.raises(DlcError, match="method must be one of"):
        average_precision(rec, prec, "coco")
    with pytest.raises(DlcError, match="recall has 4 points but precision has 1"):
        average_precision(rec, [1.0])


def iou_py(a, b):
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def reference(gt, preds, num_classes, thr, score_thr):
    """The VOC devkit's per-class loop, in plain Python (ignored detections kept as tp = fp = 0)."""
    out = []
    for c in range(num_classes):
        dets = [(float(s), i, [float(v) for v in box]) for i, (b, ss, ll) in enumerate(preds)
                for box, s, lab in zip(b, ss, ll) if lab == c]
        dets.sort(key=lambda d: -d[0])
        gtc = [[([float(v) for v in box], bool(d)) for box, lab, d in zip(*g) if lab == c] for g in gt]
        used = [[False] * len(g) for g in gtc]
        npos = sum(not d for g in gtc for _, d in g)
        tp, fp = [], []
        for _, i, box in dets:
            best, jbest = -1.0, -1
            for j, (g, _) in enumerate(gtc[i]):
                o = iou_py(box, g)
                if o > best:
                    best, jbest = o, j
            t = f = 0
            if best >= thr:
                if not gtc[i][jbest][1]:
                    if not used[i][jbest]:
                        t, used[i][jbest] = 1, True
                    else:
                        f = 1
            else:
                f = 1
            tp.append(t)
            fp.append(f)
        ctp = np.cumsum(tp).tolist()
        cfp = np.cumsum(fp).tolist()
        rec = [x / npos if npos else 0.0 for x in ctp]
        prec = [x / max(x + y, 1e-300) for x, y in zip(ctp, cfp)]
        mrec, mpre = [0.0, *rec, 1.0], [0.0, *prec, 0.0]
        for k in range(len(mpre) - 2, -1, -1):
            mpre[k] = max(mpre[k], mpre[k + 1])
        ap_all = sum((mrec[k] - mrec[k - 1]) * mpre[k] for k in range(1, len(mrec)) if mrec[k] != mrec[k - 1])
        ap_07 = sum(max([p for r, p in zip(rec, prec) if r >= k / 10], default=0.0) for k in range(11)) / 11
        n_tp = sum(t for (s, _, _), t in zip(dets, tp) if s >= score_thr)
        n_fp = sum(f for (s, _, _), f in zip(dets, fp) if s >= score_thr)
        out.append({"npos": npos, "ap_all": ap_all if npos else None, "ap_07": ap_07 if npos else None,
                    "tp": n_tp, "fp": n_fp})
    return out


def random_set(seed, n_images=25, num_classes=4):
    rng = np.random.default_rng(seed)
    gt, preds = [], []
    for i in range(n_images):
        m = 0 if i % 6 == 5 else int(rng.integers(1, 7))
        xy = rng.uniform(0, 200, (m, 2))
        wh = rng.uniform(8, 80, (m, 2))
        boxes = np.concatenate([xy, xy + wh], 1).astype(np.float32)
        labels = rng.integers(0, num_classes - 1, m)  # the last class never has GT
        difficult = rng.random(m) < 0.15
        gt.append((boxes, labels, difficult))
        k = int(rng.integers(0, 12))
        src = rng.integers(0, max(m, 1), k)
        jitter = rng.normal(0, 6, (k, 4))
        pb = boxes[src] + jitter if m else rng.uniform(0, 200, (k, 4))
        pb = np.concatenate([np.minimum(pb[:, :2], pb[:, 2:]), np.maximum(pb[:, :2], pb[:, 2:])], 1)
        pl = np.where(rng.random(k) < 0.8, labels[src] if m else 0, rng.integers(0, num_classes, k))
        scores = np.round(rng.random(k), 2)  # ties
        preds.append((pb.astype(np.float32), scores, pl))
    return gt, preds


@pytest.mark.parametrize("seed, thr, score_thr", [(0, 0.5, 0.5), (1, 0.5, 0.3), (2, 0.7, 0.6), (3, 0.3, 0.0)])
def test_matches_python_reference(seed, thr, score_thr):
    gt, preds = random_set(seed)
    ref = reference(gt, preds, 4, thr, score_thr)
    for method, key in (("all_point", "ap_all"), ("voc07", "ap_07")):
        res = evaluate_detections(gt, preds, 4, iou_threshold=thr, score_threshold=score_thr, method=method)
        for row, r in zip(res["per_class"], ref):
            assert row["num_gt"] == r["npos"] and row["tp"] == r["tp"] and row["fp"] == r["fp"]
            assert row["fn"] == r["npos"] - r["tp"]
            if r[key] is None:
                assert row["ap"] is None
            else:
                assert row["ap"] == pytest.approx(r[key], abs=1e-12)
        defined = [r[key] for r in ref if r[key] is not None]
        assert res["map"] == pytest.approx(np.mean(defined), abs=1e-12)
        assert res["ap"][3] is None  # class 3 has no GT
    tp, fp = sum(r["tp"] for r in ref), sum(r["fp"] for r in ref)
    npos = sum(r["npos"] for r in ref)
    assert (res["tp"], res["fp"], res["fn"]) == (tp, fp, npos - tp)
    p, rc = tp / (tp + fp), tp / npos
    assert res["precision"] == pytest.approx(p) and res["recall"] == pytest.approx(rc)
    assert res["f1"] == pytest.approx(2 * p * rc / (p + rc))
    assert 0 < res["map"] < 1


def test_hand_example_duplicates_difficult_and_misses():
    gt = [(np.array([[0, 0, 10, 10], [20, 20, 30, 30], [50, 50, 60, 60]], np.float32), np.array([0, 0, 0]),
           np.array([False, False, True])),
          (np.array([[0, 0, 10, 10]], np.float32), np.array([1]))]
    preds = [(np.array([[0, 0, 10, 10], [0, 0, 10, 11], [50, 50, 60, 60], [100, 100, 110, 110], [20, 20, 30, 30]],
                       np.float32), np.array([0.9, 0.8, 0.7, 0.6, 0.4]), np.array([0, 0, 0, 0, 0])),
             (np.zeros((0, 4), np.float32), np.zeros(0), np.zeros(0, np.int64))]
    res = evaluate_detections(gt, preds, 2, iou_threshold=0.5, score_threshold=0.5)
    c0, c1 = res["per_class"]
    # class 0, by score: TP, duplicate FP, difficult (ignored), FP, TP (0.4 is below the score threshold)
    assert (c0["num_gt"], c0["tp"], c0["fp"], c0["fn"]) == (2, 1, 2, 1)
    assert c0["precision"] == pytest.approx(1 / 3) and c0["recall"] == pytest.approx(0.5)
    np.testing.assert_allclose(res["curves"][0]["recall"], [0.5, 0.5, 0.5, 1.0])
    np.testing.assert_allclose(res["curves"][0]["precision"], [1, 0.5, 1 / 3, 0.5])
    assert c0["ap"] == pytest.approx(0.5 * 1 + 0.5 * 0.5)
    assert (c1["num_gt"], c1["tp"], c1["fn"], c1["ap"], c1["f1"]) == (1, 0, 1, 0.0, 0.0)
    assert res["map"] == pytest.approx(0.375)
    voc07 = evaluate_detections(gt, preds, 2, method="voc07")
    assert voc07["ap"][0] == pytest.approx((6 * 1 + 5 * 0.5) / 11)
    # IoU exactly 0.5 counts (>=)
    half = [(np.array([[0, 0, 10, 10]], np.float32), np.array([0]))]
    hit = [(np.array([[0, 0, 20, 10]], np.float32), np.array([0.9]), np.array([0]))]
    assert evaluate_detections(half, hit, 1)["tp"] == 1
    # at threshold 0 a prediction on an image without GT of its class is still a FP
    lonely = [(np.zeros((0, 4), np.float32), np.zeros(0, np.int64)), *half]
    res = evaluate_detections(lonely, [hit[0], hit[0]], 1, iou_threshold=0.0)
    assert (res["tp"], res["fp"]) == (1, 1)


def test_json_and_plot(tmp_path):
    gt, preds = random_set(4)
    res = evaluate_detections(gt, preds, 4)
    import json

    data = json.loads(json.dumps(metrics_to_json(res)))
    assert data["map"] == pytest.approx(res["map"]) and "curves" not in data
    path = tmp_path / "pr.png"
    plot_pr_curves(res, path, "random set", ["a", "b", "c", "d"])
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


@pytest.mark.parametrize("gt, preds, message", [
    ([(np.zeros((1, 4)), [0])], [], "1 ground-truth images but 0 prediction images"),
    ([(np.zeros((1, 4)), [5])], [(np.zeros((0, 4)), [], [])], "gt[0] labels: label 5 is outside 0..2"),
    ([(np.zeros((1, 3)), [0])], [(np.zeros((0, 4)), [], [])], "gt[0] boxes: expected shape (N, 4) xyxy"),
    ([(np.zeros((1, 4)), [0])], [(np.zeros((2, 4)), [0.5], [0, 0])], "preds[0]: 1 scores for 2 boxes"),
    ([(np.zeros((1, 4)), [0])], [(np.zeros((1, 4)), [np.nan], [0])], "preds[0]: scores must be finite"),
    ([(np.zeros((1, 4)), [0.5])], [(np.zeros((0, 4)), [], [])], "labels must be integers"),
])
def test_bad_inputs_raise_dlc_error(gt, preds, message):
    with pytest.raises(DlcError) as exc:
        evaluate_detections(gt, preds, 3)
    assert message in str(exc.value)
