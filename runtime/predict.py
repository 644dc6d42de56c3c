"""`dlc predict`: run a dlc-compiled classifier, detector or segmentation model on image files.

Everything needed comes from the ONNX file's "dlc" metadata: the input size and normalisation, the class names
and, for detectors, the post-processing defaults. Images are read like the training data (grey or RGB, bilinear
resize to the input size); detections are mapped back to the original image's pixels, and a segmentation
model's class scores are resized bilinearly to the original size before the argmax (a class map from an ArgMax
inside the graph is resized nearest-neighbour), so every mask has its image's size.
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
    mask: np.ndarray | None = None  # segmentation: uint8 class map at the original size (height × width)
    classes: list[str] | None = None  # segmentation: the class names, for the per-class pixel shares
    files: dict[str, str] = field(default_factory=dict)  # segmentation: mask, colour and overlay PNGs

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"image": self.path, "width": self.width, "height": self.height}
        if self.mask is not None:
            counts = np.bincount(self.mask.ravel(), minlength=len(self.classes or []))
            d["segmentation"] = {"pixels": {_name(self.classes, k): int(n) for k, n in enumerate(counts) if n},
                                 **self.files}
            return d
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
    segmentation = meta.get("task") == "segmentation"
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
            if segmentation:
                r.mask = _full_size_mask(output[k], int(w0), int(h0), len(classes or []) or None, model)
                r.classes = classes
            elif detection:
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
    summary = {"model": str(model), "task": meta.get("task") or "classification",
               "provider": session.provider, "images": len(results), "settings": settings, "skipped": skipped}
    return results, summary


def _detections(outputs: dict[str, np.ndarray], settings: dict[str, Any], embedded: dict | None):
    """NMS inside the model: its detections (a stricter --conf filters them); else dlc's NMS on the raw rows."""
    from .detect import embedded_detections, postprocess

    if embedded:
        return embedded_detections(outputs, embedded, settings.get("conf_threshold"), settings.get("max_detections"))
    return postprocess(next(iter(outputs.values())), **settings)


def _full_size_mask(output: np.ndarray, w0: int, h0: int, num_classes: int | None, model: Path) -> np.ndarray:
    """One image's class map at its original size: scores C×h×w resized bilinearly (pixel centres aligned), then
    the argmax; a class map h×w (ArgMax in the graph) resized nearest-neighbour."""
    from dlc.compiler.data.datasets import resize
    from dlc.compiler.data.segmentation import resize_mask

    if output.ndim == 3 and output.shape[0] > 1 and np.issubdtype(output.dtype, np.floating):
        if num_classes and output.shape[0] != num_classes:
            raise DlcError(f"{model}: the model outputs {output.shape[0]} channels for {num_classes} classes")
        scores = resize(output[None].astype(np.float32), h0, w0)[0]
        return scores.argmax(axis=0).astype(np.uint8)
    labels = output[0] if output.ndim == 3 else output
    if labels.ndim != 2:
        raise DlcError(f"{model}: a segmentation model's output must be classes×H×W scores or an H×W class map, "
                       f"got {output.shape}")
    return resize_mask(labels.astype(np.int64), h0, w0).astype(np.uint8)


def class_colours(n: int) -> np.ndarray:
    """Pascal VOC's colour map (n × 3 uint8): class 0 black, then distinct colours from the bits of the index."""
    colours = np.zeros((max(n, 1), 3), np.uint8)
    for k in range(n):
        c, r, g, b = k, 0, 0, 0
        for shift in range(7, -1, -1):
            r |= (c & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        colours[k] = (r, g, b)
    return colours


def draw_segmentation(result: ImageResult, out_dir: Path, stem: str, pictures: bool = True) -> None:
    """DIR/<stem>_mask.png (class indices, 8-bit grey: the exact answer) and, with `pictures`,
    DIR/<stem>_colour.png (each class in its VOC colour) and DIR/<stem>.png (the image with the colours laid
    over it at half opacity; background pixels left as they are)."""
    from PIL import Image

    mask = result.mask
    colours = class_colours(int(mask.max()) + 1 if result.classes is None else max(len(result.classes), 1))
    colour = colours[mask]
    with Image.open(result.path) as im:
        image = np.asarray(im.convert("RGB"), np.float32)
    blended = np.where((mask > 0)[..., None], 0.5 * image + 0.5 * colour, image)
    written = (("_mask", mask), ("_colour", colour), ("", np.rint(blended).astype(np.uint8)))
    for suffix, array in written if pictures else written[:1]:
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG")
        path = out_dir / f"{stem}{suffix}.png"
        write_bytes(path, buffer.getvalue())
        result.files[{"_mask": "mask", "_colour": "colour", "": "overlay"}[suffix]] = str(path)
    result.drawn = str(out_dir / f"{stem}.png") if pictures else None


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
    for r in results if images or any(r.mask is not None for r in results) else []:
        stem = Path(r.path).stem
        name, k = stem, 1
        while name in used:
            k += 1
            name = f"{stem}_{k}"
        used.add(name)
        if r.mask is not None:  # the index mask is a segmentation model's answer: written even without pictures
            draw_segmentation(r, out_dir, name, pictures=images)
        else:
            draw(r, out_dir / f"{name}.png")
            r.drawn = str(out_dir / f"{name}.png")
    return write_json(out_dir / "predictions.json", {**summary, "results": [r.to_dict() for r in results]})
