"""run.py of a dlc bundle: runs the model on images with nothing of dlc (onnxruntime, numpy and Pillow only).

    python run.py IMAGES... [--json out.json] [--conf C] [--max-det N]
    python run.py --check            # the parity sample: the model's output on sample_input.npy equals expected

Preprocessing follows the model's metadata (`preprocessing`: channel order, bilinear resize, scale, mean/std);
a detector without NMS inside is post-processed with the numpy NMS below (dlc's rules: score = objectness ×
best class probability, kept when strictly above the threshold, greedy per-class NMS, best score first).
This file is copied into bundles as is: it must not import dlc.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def read_manifest() -> dict:
    return json.loads((HERE / "manifest.json").read_text())


def session(model: Path):
    import onnxruntime as ort

    return ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])


def preprocess(path: Path, meta: dict) -> tuple[np.ndarray, tuple[int, int]]:
    from PIL import Image

    pre = meta["preprocessing"]
    h, w = pre["resize"]["size"]
    grey = pre["channel_order"] == "grey"
    with Image.open(path) as im:
        size = im.size
        im = im.convert("L" if grey else "RGB").resize((w, h), Image.BILINEAR)
        scale = float(pre["scale"])
        pixels = np.asarray(im, dtype=np.float32)
        # dlc reads pixels as float32 / 255; multiplying by a rounded 1/255 would differ in the last bit
        array = pixels / 255.0 if abs(scale - 1 / 255) < 1e-9 else pixels * np.float32(scale)
    chw = array[None] if grey else array.transpose(2, 0, 1)
    return chw, size


def normalise(batch: np.ndarray, meta: dict) -> np.ndarray:
    c = batch.shape[1]
    mean = np.asarray(meta["preprocessing"].get("mean") or [0.0] * c, np.float32)[None, :, None, None]
    std = np.asarray(meta["preprocessing"].get("std") or [1.0] * c, np.float32)[None, :, None, None]
    return ((batch - mean) / std).astype(np.float32)


def iou_one_to_many(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    x1 = np.maximum(box[0], boxes[:, 0])
    y1 = np.maximum(box[1], boxes[:, 1])
    x2 = np.minimum(box[2], boxes[:, 2])
    y2 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    union = area + areas - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def nms(rows: np.ndarray, conf: float, iou: float, max_det: int, agnostic: bool):
    """One image's decoded rows (K, 5 + C) -> (boxes, scores, labels), best score first."""
    labels = rows[:, 5:].argmax(1)
    scores = rows[:, 4] * rows[np.arange(len(rows)), 5 + labels]
    cand = np.flatnonzero(scores > np.float32(conf))
    order = cand[np.argsort(-scores[cand], kind="stable")]
    boxes = rows[:, :4].astype(np.float64)
    kept: list[int] = []
    alive = np.ones(len(order), bool)
    for i, idx in enumerate(order):
        if not alive[i]:
            continue
        kept.append(int(idx))
        rest = order[i + 1:]
        same = np.ones(len(rest), bool) if agnostic else labels[rest] == labels[idx]
        over = iou_one_to_many(boxes[idx], boxes[rest]) > iou
        alive[i + 1:] &= ~(same & over)
    kept = kept[:max_det]
    return rows[kept, :4], scores[kept], labels[kept]


def detections(outputs: dict, meta: dict, conf: float | None, max_det: int | None):
    embedded = meta.get("embedded_nms")
    post = meta.get("postprocess") or {}
    if embedded:
        if embedded["layout"] == "efficient_nms":
            num = outputs["num_detections"].reshape(-1)
            boxes, scores, labels = (outputs["detection_boxes"], outputs["detection_scores"],
                                     outputs["detection_classes"])
        else:
            rows, num = outputs["detections"], outputs["num_detections"].reshape(-1)
            boxes, scores, labels = rows[:, :, :4], rows[:, :, 4], rows[:, :, 5]
        out = []
        for i, k in enumerate(num.astype(int)):
            b, s, lab = boxes[i, :k], scores[i, :k], labels[i, :k].astype(np.int64)
            if conf is not None and conf > embedded["conf_threshold"]:
                keep = s > np.float32(conf)
                b, s, lab = b[keep], s[keep], lab[keep]
            if max_det is not None:
                b, s, lab = b[:max_det], s[:max_det], lab[:max_det]
            out.append((b, s, lab))
        return out
    raw = next(iter(outputs.values()))
    c = post.get("conf_threshold", 0.25) if conf is None else conf
    m = post.get("max_detections", 100) if max_det is None else max_det
    return [nms(r, c, post.get("iou_threshold", 0.45), m, post.get("class_agnostic", False)) for r in raw]


def probabilities(values: np.ndarray) -> np.ndarray:
    v = values.astype(np.float64)
    if np.all(v >= 0) and np.allclose(v.sum(axis=1), 1.0, atol=1e-3):
        return v
    e = np.exp(v - v.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def predict(images: list[Path], conf: float | None, max_det: int | None, top_k: int = 5) -> list[dict]:
    manifest = read_manifest()
    meta = manifest["metadata"]
    sess = session(HERE / "model.onnx")
    names = [o.name for o in sess.get_outputs()]
    classes = meta.get("classes")
    h, w = meta["preprocessing"]["resize"]["size"]
    results = []
    for start in range(0, len(images), 16):
        chunk = images[start:start + 16]
        read, ok = [], []
        for path in chunk:
            try:
                read.append(preprocess(path, meta))
                ok.append(path)
            except Exception as exc:  # noqa: BLE001 - any unreadable image is named, and the run goes on
                results.append({"image": str(path), "error": f"cannot read image: {exc}"})
        if not read:
            continue
        x = normalise(np.stack([a for a, _ in read]), meta)
        outputs = dict(zip(names, sess.run(None, {sess.get_inputs()[0].name: x})))
        if meta.get("task") == "detection":
            per_image = detections(outputs, meta, conf, max_det)
        for k, (path, (_, (w0, h0))) in enumerate(zip(ok, read)):
            r = {"image": str(path), "width": int(w0), "height": int(h0)}
            if meta.get("task") == "detection":
                boxes, scores, labels = per_image[k]
                scale = np.array([w0 / w, h0 / h, w0 / w, h0 / h], np.float64)
                r["detections"] = []
                for box, score, label in zip(boxes, scores, labels):
                    xyxy = np.clip(box.astype(np.float64) * scale, 0, [w0, h0, w0, h0])
                    r["detections"].append({"box": [round(float(v), 2) for v in xyxy], "score": round(float(score), 5),
                                            "class_id": int(label), "label": _name(classes, int(label))})
            else:
                probs = probabilities(next(iter(outputs.values()))[k:k + 1].reshape(1, -1))[0]
                r["top"] = [{"label": _name(classes, int(j)), "class_id": int(j), "score": round(float(probs[j]), 5)}
                            for j in np.argsort(-probs, kind="stable")[:top_k]]
            results.append(r)
    return results


def _name(classes, k: int) -> str:
    return classes[k] if classes and 0 <= k < len(classes) else str(k)


def check() -> int:
    """The model's output on the bundle's sample input against the expected output saved at packaging."""
    manifest = read_manifest()
    sess = session(HERE / "model.onnx")
    x = np.load(HERE / "sample_input.npy", allow_pickle=False)
    expected = np.load(HERE / "expected_output.npz", allow_pickle=False)
    names = [o.name for o in sess.get_outputs()]
    got = dict(zip(names, sess.run(None, {sess.get_inputs()[0].name: x})))
    rtol = float(manifest.get("parity_rtol", 1e-4))
    worst = 0.0
    for name in expected.files:
        want = expected[name].astype(np.float64)
        scale = float(np.abs(want).max(initial=0.0)) or 1.0
        err = float(np.abs(got[name].astype(np.float64) - want).max(initial=0.0)) / scale
        worst = max(worst, err)
        if not err <= rtol:
            print(f"parity check FAILED: output '{name}' differs by {err:.3g} of its scale (allowed {rtol:g})")
            return 1
    print(f"parity check passed: {len(expected.files)} output(s) within {worst:.2g} of their scale "
          f"(allowed {rtol:g})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run this bundle's model on images (onnxruntime, numpy, Pillow).")
    parser.add_argument("images", nargs="*", type=Path, help="image files or folders")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    parser.add_argument("--conf", type=float, help="detectors: score threshold (default: the model's)")
    parser.add_argument("--max-det", type=int, help="detectors: detections per image (default: the model's)")
    parser.add_argument("--check", action="store_true", help="run the parity sample and exit")
    args = parser.parse_args(argv)
    if args.check:
        return check()
    files: list[Path] = []
    for item in args.images:
        files += sorted(p for p in item.iterdir() if p.is_file()) if item.is_dir() else [item]
    if not files:
        parser.error("give at least one image file or folder (or --check)")
    results = predict(files, args.conf, args.max_det)
    text = json.dumps({"results": results}, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
