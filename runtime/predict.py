"""`dlc predict`: run a dlc-compiled classifier or detector on image files.

Everything needed comes from the ONNX file's "dlc" metadata: the input size and normalisation, the class names
and, for detectors, the post-processing defaults. Images are read like the training data (grey or RGB, bilinear
resize to the input size); detections are mapped back to the original image's pixels.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dlc.compiler.atomic import write_bytes, write_json
from dlc.compiler.data.datasets import IMAGE_SUFFIXES, read_image
from dlc.compiler.errors import Diagnostic, DlcError

from .session import Session

# Distinct colours for boxes (tab10), cycled by class index.
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf"]


@dataclass
class ImageResult:
    path: str
    width: int
    height: int
    top: list[dict[str, Any]] = field(default_factory=list)  # classifier: [{label, class_id, score}] best first
    detections: list[dict[str, Any]] = field(default_factory=list)  # detector: [{box xyxy, score, label, class_id}]
    drawn: str | None = None  # the PNG written by write_outputs

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"image": self.path, "width": self.width, "height": self.height}
        if self.detections or not self.top:
            d["detections"] = self.detections
        if self.top:
            d["top"] = self.top
        if self.drawn:
            d["drawn"] = self.drawn
        return d


def expand_images(items: list[Path]) -> list[Path]:
    """Image files named directly, plus the image files inside named folders (sorted, not recursive)."""
    files: list[Path] = []
    for item in items:
        if item.is_dir():
            found = sorted(p for p in item.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise DlcError(f"{item}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in this folder")
            files += found
        elif item.exists():
            files.append(item)
        else:
            raise DlcError(f"{item}: no such image file or folder")
    if not files:
        raise DlcError("give at least one image file or folder")
    return files


def _metadata(session: Session, model: Path) -> dict[str, Any]:
    meta = session.metadata
    if not meta or "input" not in meta:
        raise DlcError(f"{model}: the ONNX file has no dlc metadata (input size, normalisation, classes); "
                       "predict works on models made by `dlc compile`, `dlc prune` or `dlc import`")
    return meta


def _probabilities(values: np.ndarray) -> np.ndarray:
    """Class scores as probabilities: rows that already are distributions (a final softmax) are kept."""
    v = values.astype(np.float64)
    if np.all(v >= 0) and np.allclose(v.sum(axis=1), 1.0, atol=1e-3):
        return v
    e = np.exp(v - v.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


ON_ERROR = ("skip", "stop")


def predict(model: str | Path, images: list[Path], device: str = "auto", batch: int = 16, top_k: int = 5,
            conf_threshold: float | None = None, iou_threshold: float | None = None,
            max_detections: int | None = None, on_error: str = "stop") -> tuple[list[ImageResult], dict[str, Any]]:
    """Run the model on every image; returns one result per image and a summary (task, provider, settings).

    An image that cannot be read (corrupt, not an image, not a regular file) stops the run with a DlcError
    naming it when `on_error` is "stop"; with "skip" it is left out and listed in summary["skipped"] as
    {image, error}, and only when no image at all could be read is it a DlcError (listing every one)."""
    if on_error not in ON_ERROR:
        raise DlcError(f"--on-error must be one of {', '.join(ON_ERROR)}, got '{on_error}'")
    model = Path(model)
    session = Session(model, device=device)
    meta = _metadata(session, model)
    c, h, w = meta["input"]["shape"]
    mean = np.asarray(meta["input"].get("mean") or [0.0] * c, np.float32)[None, :, None, None]
    std = np.asarray(meta["input"].get("std") or [1.0] * c, np.float32)[None, :, None, None]
    classes = meta.get("classes")
    detection = meta.get("task") == "detection"
    settings: dict[str, Any] = {}
    if detection:
        settings = dict(meta.get("postprocess") or {})
        embedded = meta.get("embedded_nms")
        if embedded:  # the graph holds NMS: its settings are fixed, only a stricter --conf applies
            if iou_threshold is not None or (max_detections or 0) > embedded["max_detections"] or (
                    conf_threshold is not None and conf_threshold < embedded["conf_threshold"]):
                raise DlcError(f"{model}: NMS is inside this model (conf {embedded['conf_threshold']:g}, IoU "
                               f"{embedded['iou_threshold']:g}, at most {embedded['max_detections']} per image): "
                               "--iou, a lower --conf or a higher --max-det cannot apply; export the model again "
                               "with other settings, or without embed_nms")
            settings = {k: embedded[k] for k in ("conf_threshold", "iou_threshold", "max_detections",
                                                 "class_agnostic")}
        for key, value in (("conf_threshold", conf_threshold), ("iou_threshold", iou_threshold),
                           ("max_detections", max_detections)):
            if value is not None:
                settings[key] = value
    results: list[ImageResult] = []
    skipped: list[dict[str, str]] = []
    failures = []
    for start in range(0, len(images), batch):
        chunk, arrays, sizes = [], [], []
        for p in images[start:start + batch]:
            try:
                array, size = read_image(p, c, h, w)
            except DlcError as exc:
                if on_error == "stop":
                    raise
                failures += exc.diagnostics
                skipped.append({"image": str(p), "error": "; ".join(d.message for d in exc.diagnostics)})
                continue
            chunk.append(p)
            arrays.append(array)
            sizes.append(size)
        if not chunk:
            continue
        x = ((np.stack(arrays) - mean) / std).astype(np.float32)
        outputs = session.run(x)
        output = next(iter(outputs.values()))
        if detection:
            per_image = _detections(outputs, settings, meta.get("embedded_nms"))
        for k, (path, (w0, h0)) in enumerate(zip(chunk, sizes)):
            r = ImageResult(str(path), int(w0), int(h0))
            if detection:
                boxes, scores, labels = per_image[k]
                scale = np.array([w0 / w, h0 / h, w0 / w, h0 / h], np.float64)
                for box, score, label in zip(boxes, scores, labels):
                    xyxy = np.clip(box.astype(np.float64) * scale, 0, [w0, h0, w0, h0])
                    r.detections.append({"box": [round(float(v), 2) for v in xyxy], "score": round(float(score), 5),
                                         "class_id": int(label), "label": _name(classes, int(label))})
            else:
                probs = _probabilities(output[k:k + 1].reshape(1, -1))[0]
                for j in np.argsort(-probs, kind="stable")[:top_k]:
                    r.top.append({"label": _name(classes, int(j)), "class_id": int(j),
                                  "score": round(float(probs[j]), 5)})
            results.append(r)
    if not results:
        raise DlcError(failures + [Diagnostic(f"none of the {len(images)} image(s) could be read; nothing written")])
    summary = {"model": str(model), "task": "detection" if detection else "classification",
               "provider": session.provider, "images": len(results), "settings": settings, "skipped": skipped}
    return results, summary


def _detections(outputs: dict[str, np.ndarray], settings: dict[str, Any], embedded: dict | None):
    """NMS inside the model: its detections (a stricter --conf filters them); else dlc's NMS on the raw rows."""
    from .detect import embedded_detections, postprocess

    if embedded:
        return embedded_detections(outputs, embedded, settings.get("conf_threshold"), settings.get("max_detections"))
    return postprocess(next(iter(outputs.values())), **settings)


def _name(classes: list[str] | None, k: int) -> str:
    return classes[k] if classes and 0 <= k < len(classes) else str(k)


def draw(result: ImageResult, out_path: Path) -> None:
    """The original image with boxes and labels (detector) or the top class (classifier), written as PNG."""
    from PIL import Image, ImageDraw

    with Image.open(result.path) as im:
        canvas = im.convert("RGB")
    pen = ImageDraw.Draw(canvas)
    width = max(1, round(max(canvas.size) / 200))
    for d in result.detections:
        colour = PALETTE[d["class_id"] % len(PALETTE)]
        x1, y1, x2, y2 = d["box"]
        pen.rectangle([x1, y1, x2, y2], outline=colour, width=width)
        text = f"{d['label']} {d['score']:.2f}"
        tx, ty = x1, max(0.0, y1 - 11)
        box = pen.textbbox((tx, ty), text)
        pen.rectangle(box, fill=colour)
        pen.text((tx, ty), text, fill="white")
    if result.top:
        best = result.top[0]
        text = f"{best['label']} {best['score']:.2f}"
        box = pen.textbbox((2, 2), text)
        pen.rectangle(box, fill="black")
        pen.text((2, 2), text, fill="white")
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    write_bytes(out_path, buffer.getvalue())


def write_outputs(results: list[ImageResult], summary: dict[str, Any], out_dir: Path,
                  images: bool = True) -> Path:
    """DIR/predictions.json and, with `images`, one DIR/<name>.png per input (names made unique)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    used: set[str] = set()
    for r in results if images else []:
        stem = Path(r.path).stem
        name, k = f"{stem}.png", 1
        while name in used:
            k += 1
            name = f"{stem}_{k}.png"
        used.add(name)
        draw(r, out_dir / name)
        r.drawn = str(out_dir / name)
    return write_json(out_dir / "predictions.json", {**summary, "results": [r.to_dict() for r in results]})
