"""Accuracy of an ONNX model on a data set, run through onnxruntime (`dlc bench --data`).

The data set is dlc's own `data:` section (synthetic, digits, imagefolder) read from a YAML file, usually the
model's own YAML; the validation split is the one training used (same seed, same stratified split). Images are
normalised with the mean/std in the ONNX file's dlc metadata, or else the YAML's `model.input`, or else not at
all, and the result says which. Class names in the metadata map the data set's labels to output indices.
Detection models (metadata task == "detection") are scored by mAP@0.5, see `evaluate_detection`; segmentation
models (task == "segmentation") by mIoU, see `evaluate_segmentation`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dlc.compiler.errors import Diagnostic, DlcError

from .session import Session

EVAL_BATCH = 64


@dataclass
class DataSpec:
    """A `data:` section (validated) and, where the file has one, the model input's mean/std."""

    file: str
    data: dict[str, Any]
    base_dir: Path
    input_mean: list[float] | float | None = None
    input_std: list[float] | float | None = None


@dataclass
class Evaluation:
    """One model's score on the validation split. accuracy and macro_f1 are fractions in [0, 1]."""

    task: str
    metric: str
    accuracy: float
    macro_f1: float
    correct: int
    total: int
    normalization: str  # where mean/std came from: "onnx metadata", "yaml model.input" or "none"
    mean: list[float]
    std: list[float]
    notes: list[str] = field(default_factory=list)
    details: dict[str, Any] | None = None  # segmentation: every figure of runtime.segmentation_metrics
    loss: float | None = None  # classification: mean cross-entropy of the logits (it moves before accuracy does)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def read_data_spec(path: str | Path) -> DataSpec:
    """Read and validate the `data:` section of a YAML file (and model.input's mean/std if there is one)."""
    from dlc.compiler.train.config import parse_data
    from dlc.compiler.yaml_loader import load_yaml_file

    path = Path(path)
    doc, _ = load_yaml_file(path)
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), dict):
        raise DlcError(Diagnostic("no 'data:' section: --data needs a YAML file with one, e.g. the model's own "
                                  "YAML or `data: {dataset: digits}`", file=str(path)))
    cfg, diags = parse_data(doc["data"], str(path))
    if diags or cfg is None:
        raise DlcError(diags or [Diagnostic("invalid 'data:' section", file=str(path))])
    model_input = (doc.get("model") or {}).get("input") if isinstance(doc.get("model"), dict) else None
    mean = std = None
    if isinstance(model_input, dict):
        mean, std = model_input.get("mean", 0.0), model_input.get("std", 1.0)
    return DataSpec(str(path), dict(cfg.raw), path.parent, mean, std)


def _per_channel(value: Any, channels: int, what: str) -> list[float]:
    values = [value] * channels if isinstance(value, (int, float)) else list(value)
    if len(values) != channels:
        raise DlcError(f"{what} has {len(values)} values for an input of {channels} channels")
    return [float(v) for v in values]


def _input_shape(session: Session, meta: dict[str, Any] | None) -> tuple[int, int, int]:
    shape = (meta or {}).get("input", {}).get("shape")
    if not shape:
        if len(session.inputs) != 1:
            raise DlcError(f"{session.path}: accuracy needs a model with one image input, this one has "
                           f"{len(session.inputs)}")
        shape = session.inputs[0].shape[1:]
    if len(shape) != 3 or not all(isinstance(d, int) and d > 0 for d in shape):
        raise DlcError(f"{session.path}: accuracy needs a fixed C×H×W image input, the model takes {shape}")
    return tuple(int(d) for d in shape)


def _normalization(session: Session, meta: dict[str, Any] | None, spec: DataSpec,
                   channels: int) -> tuple[str, list[float], list[float], list[str]]:
    inp = (meta or {}).get("input", {})
    if "mean" in inp and "std" in inp:
        return ("onnx metadata", _per_channel(inp["mean"], channels, f"{session.path}: metadata input.mean"),
                _per_channel(inp["std"], channels, f"{session.path}: metadata input.std"), [])
    name = Path(session.path or "model").name
    if spec.input_mean is not None:
        note = f"{name} has no dlc metadata: normalised with model.input mean/std from {spec.file}"
        return ("yaml model.input", _per_channel(spec.input_mean, channels, f"{spec.file}: model.input.mean"),
                _per_channel(spec.input_std, channels, f"{spec.file}: model.input.std"), [note])
    note = (f"{name} has no dlc metadata and {spec.file} has no model.input: images fed unnormalised, in [0, 1]")
    return "none", [0.0] * channels, [1.0] * channels, [note]


class Evaluator:
    """Scores models on one data spec; the validation split is loaded once per input shape and class count."""

    def __init__(self, spec: DataSpec | str | Path, batch_size: int = EVAL_BATCH):
        self.spec = spec if isinstance(spec, DataSpec) else read_data_spec(spec)
        self.batch_size = batch_size
        self._cache: dict[tuple, Any] = {}

    def validation_set(self, input_shape: tuple[int, int, int], num_outputs: int):
        """The data section's validation split at this input size: a dlc.compiler.data.Dataset in [0, 1]."""
        from dlc.compiler.data import load_dataset

        key = (input_shape, num_outputs)
        if key not in self._cache:
            try:
                self._cache[key] = load_dataset(self.spec.data, input_shape, num_outputs, self.spec.base_dir)[1]
            except DlcError as exc:
                raise DlcError([Diagnostic(f"--data: {d.format()}", file=self.spec.file)
                                for d in exc.diagnostics]) from None
            if len(self._cache[key]) == 0:
                raise DlcError(f"{self.spec.file}: the validation split is empty: raise data.val_fraction")
        return self._cache[key]

    def evaluate(self, session: Session) -> Evaluation:
        meta = session.metadata
        task = (meta or {}).get("task")
        kind = self.spec.data.get("dataset")
        from dlc.compiler.data.datasets import DETECTION_DATASETS, SEGMENTATION_DATASETS

        data_task = ("detection" if kind in DETECTION_DATASETS else
                     "segmentation" if kind in SEGMENTATION_DATASETS else "classification")
        if (task or "classification") != data_task:
            raise DlcError(f"{session.path} is a {task or 'classification'} model but --data {self.spec.file} holds "
                           f"a {data_task} data set ('{kind}'); give the YAML of the data this model was trained on")
        if task == "detection":
            return evaluate_detection(session, self.spec)
        if task == "segmentation":
            return evaluate_segmentation(session, self.spec, self.batch_size)
        return self.classification(session, meta)

    def classification(self, session: Session, meta: dict[str, Any] | None) -> Evaluation:
        shape = _input_shape(session, meta)
        out_shape = session.outputs[0].shape
        if len(out_shape) != 2 or not isinstance(out_shape[1], int):
            raise DlcError(f"{session.path}: top-1 accuracy needs an N×classes output, the first output "
                           f"'{session.outputs[0].name}' has shape {out_shape}")
        num_outputs = int(out_shape[1])
        val = self.validation_set(shape, num_outputs)
        source, mean, std, notes = _normalization(session, meta, self.spec, shape[0])
        labels = _model_labels(val, (meta or {}).get("classes"), num_outputs, session.path)
        m = np.asarray(mean, np.float32)[None, :, None, None]
        inv = 1.0 / np.asarray(std, np.float32)[None, :, None, None]
        preds = np.empty(len(val), np.int64)
        nll = 0.0
        for start in range(0, len(val), self.batch_size):
            x = (val.images[start:start + self.batch_size] - m) * inv
            logits = next(iter(session.run(x.astype(np.float32)).values()))
            preds[start:start + len(x)] = logits.argmax(axis=1)
            nll += cross_entropy_sum(logits, labels[start:start + len(x)])
        correct = int((preds == labels).sum())
        return Evaluation("classification", "accuracy", correct / len(labels), macro_f1(labels, preds, num_outputs),
                          correct, len(labels), source, mean, std, notes, loss=nll / len(labels))


def _model_labels(val, model_classes: list | None, num_outputs: int, where: str | None) -> np.ndarray:
    """The data set's labels as the model's output indices: by class name when the model names its classes."""
    if not model_classes:
        if len(val.classes) > num_outputs:
            raise DlcError(f"{where}: the data set has {len(val.classes)} classes, the model outputs {num_outputs}")
        return val.labels
    index = {str(c): i for i, c in enumerate(model_classes)}
    missing = [c for c in val.classes if str(c) not in index]
    if missing:
        raise DlcError(f"{where}: data set classes {missing[:5]} are not among the model's classes "
                       f"{[str(c) for c in model_classes][:10]}; is --data the data the model was trained on?")
    lookup = np.array([index[str(c)] for c in val.classes], np.int64)
    return lookup[val.labels]


def cross_entropy_sum(logits: np.ndarray, labels: np.ndarray) -> float:
    """Sum over the rows of -log softmax(logits)[label], in float64 (log-sum-exp shifted by the row maximum).
    A model whose last layer is already a softmax gives the loss of those probabilities taken as logits:
    dlc's classifiers end in logits."""
    z = logits.astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(z).sum(axis=1))
    return float((log_norm - z[np.arange(len(labels)), labels]).sum())


def macro_f1(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> float:
    """Mean F1 over the classes present in `labels` (classes the data set lacks would only add zeros)."""
    cm = np.bincount(labels * num_classes + preds, minlength=num_classes ** 2).reshape(num_classes, num_classes)
    tp = np.diag(cm).astype(np.float64)
    predicted, actual = cm.sum(axis=0), cm.sum(axis=1)
    present = actual > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(predicted + actual > 0, 2 * tp / (predicted + actual), 0.0)
    return float(f1[present].mean())


MAP_CONF_THRESHOLD = 0.001  # mAP integrates the whole precision-recall curve: keep low-scoring detections


def detect_validation(session: Session, spec: DataSpec, conf_threshold: float | None = None):
    """Run a detector (metadata task == "detection") on the validation split of a detection `data:` section
    (synthetic_detection, coco, yolo). Returns (validation DetectionDataset, per-image (boxes, scores, labels),
    (normalisation source, mean, std, notes)). Decoded rows go through runtime.detect.postprocess with the
    metadata's NMS settings and, for evaluation, a confidence threshold of 0.001 unless given."""
    try:
        from dlc.compiler.data.detection import load_detection_dataset

        from .detect import postprocess
    except ImportError as exc:
        raise DlcError(f"{session.path}: evaluating a detector needs dlc's detection modules "
                       f"(dlc.runtime.detect), which did not load ({exc}); rebuild dlc (pip install -e .)") from None
    from dlc.compiler.data.datasets import DETECTION_DATASETS

    if spec.data.get("dataset") not in DETECTION_DATASETS:
        raise DlcError(f"{session.path} is a detector: --data {spec.file} must hold a detection data set "
                       f"({', '.join(DETECTION_DATASETS)}), not '{spec.data.get('dataset')}'")
    meta = session.metadata or {}
    shape = _input_shape(session, meta)
    normalization = _normalization(session, meta, spec, shape[0])
    _, mean, std, _ = normalization
    try:
        val = load_detection_dataset(spec.data, shape, spec.base_dir)[1]
    except DlcError as exc:
        raise DlcError([Diagnostic(f"--data: {d.format()}", file=spec.file) for d in exc.diagnostics]) from None
    if len(val.images) == 0:
        raise DlcError(f"{spec.file}: the validation split is empty: raise data.val_fraction")
    settings = {k: v for k, v in (meta.get("postprocess") or {}).items()
                if k in ("iou_threshold", "max_detections", "class_agnostic")}
    conf = MAP_CONF_THRESHOLD if conf_threshold is None else conf_threshold
    m = np.asarray(mean, np.float32)[None, :, None, None]
    inv = 1.0 / np.asarray(std, np.float32)[None, :, None, None]
    embedded = meta.get("embedded_nms")  # NMS inside the model: its own thresholds (a stricter conf filters)
    preds = []
    for start in range(0, len(val.images), EVAL_BATCH):
        x = ((val.images[start:start + EVAL_BATCH] - m) * inv).astype(np.float32)
        outputs = session.run(x)
        if embedded:
            from .detect import embedded_detections

            preds += embedded_detections(outputs, embedded, conf)
        else:
            preds += postprocess(next(iter(outputs.values())), conf_threshold=conf, **settings)
    return val, preds, normalization


def coco_results(val, preds) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The validation set as COCO ground truth and the predictions as COCO results (xywh, category = class + 1),
    in the validation images' pixels (the model's input size)."""
    results = []
    for image_id, (boxes, scores, labels) in zip(val.image_ids, preds):
        for (x1, y1, x2, y2), score, label in zip(np.asarray(boxes, np.float64), scores, labels):
            results.append({"image_id": int(image_id), "category_id": int(label) + 1,
                            "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)], "score": float(score)})
    return val.to_coco(), results


def evaluate_detection(session: Session, spec: DataSpec) -> Evaluation:
    """mAP@0.5 of a detector on the validation split (see detect_validation): runtime.metrics.evaluate_detections
    (VOC all-point AP, iou_threshold 0.5). In the result, `accuracy` holds the mAP, `macro_f1` the F1 at the
    metric's score threshold, `correct`/`total` true positives and ground-truth boxes."""
    from .metrics import evaluate_detections

    val, preds, (source, mean, std, notes) = detect_validation(session, spec)
    crowd = val.iscrowd or [np.zeros(len(b), bool) for b in val.boxes]
    gt = list(zip(val.boxes, val.labels, crowd))
    num_classes = len((session.metadata or {}).get("classes") or val.classes)
    result = evaluate_detections(gt, preds, num_classes, iou_threshold=0.5)
    n_gt = result["tp"] + result["fn"]
    return Evaluation("detection", "mAP@0.5", float(result["map"] or 0.0), float(result["f1"]), int(result["tp"]),
                      int(n_gt), source, mean, std, notes)


def segment_validation(session: Session, spec: DataSpec, batch_size: int = EVAL_BATCH):
    """Run a segmentation model on the validation split of a segmentation `data:` section. Returns (validation
    SegmentationDataset, predicted class maps N×H×W int64, (normalisation source, mean, std, notes)). The output
    is N×C×H×W scores (argmax over C) or, with the ArgMax inside the graph (export.embed_argmax), the class map."""
    from dlc.compiler.data.segmentation import load_segmentation_dataset

    meta = session.metadata or {}
    shape = _input_shape(session, meta)
    normalization = _normalization(session, meta, spec, shape[0])
    _, mean, std, _ = normalization
    classes = meta.get("classes")
    try:
        val = load_segmentation_dataset(spec.data, shape, spec.base_dir, len(classes) if classes else None)[1]
    except DlcError as exc:
        raise DlcError([Diagnostic(f"--data: {d.format()}", file=spec.file) for d in exc.diagnostics]) from None
    if classes and [str(c) for c in classes] != [str(c) for c in val.classes]:
        raise DlcError(f"{session.path}: the model's classes {list(classes)[:10]} are not the data set's "
                       f"{val.classes[:10]} (same names in the same order); is --data the data the model was "
                       "trained on?")
    m = np.asarray(mean, np.float32)[None, :, None, None]
    inv = 1.0 / np.asarray(std, np.float32)[None, :, None, None]
    preds = np.empty(val.masks.shape, np.int64)
    for start in range(0, len(val), batch_size):
        x = ((val.images[start:start + batch_size] - m) * inv).astype(np.float32)
        out = next(iter(session.run(x).values()))
        preds[start:start + len(x)] = class_map(out, len(val.classes), session.path)
    return val, preds, normalization


def class_map(output: np.ndarray, num_classes: int, where: Any) -> np.ndarray:
    """A segmentation model's output as class indices: N×C×H×W scores (argmax over C), or N×H×W / N×1×H×W
    indices already (ArgMax in the graph)."""
    if output.ndim == 4 and output.shape[1] > 1:
        if output.shape[1] != num_classes:
            raise DlcError(f"{where}: the model outputs {output.shape[1]} channels for {num_classes} classes")
        return output.argmax(axis=1)
    if output.ndim == 4:
        output = output[:, 0]
    if output.ndim != 3 or not np.issubdtype(output.dtype, np.integer):
        raise DlcError(f"{where}: a segmentation model's output must be N×classes×H×W scores or an N×H×W class "
                       f"map, got {output.dtype} {output.shape}")
    return output.astype(np.int64)


def evaluate_segmentation(session: Session, spec: DataSpec, batch_size: int = EVAL_BATCH) -> Evaluation:
    """mIoU of a segmentation model on the validation split (see segment_validation). In the result, `accuracy`
    holds the mIoU, `macro_f1` the mean Dice (per-class F1 of pixels), `correct`/`total` the correctly labelled
    and the counted (not ignored) pixels, and `details` every figure of runtime.segmentation_metrics."""
    from .segmentation_metrics import confusion_matrix, segmentation_metrics

    val, preds, (source, mean, std, notes) = segment_validation(session, spec, batch_size)
    n = len(val.classes)
    if preds.size and (preds.min() < 0 or preds.max() >= n):
        raise DlcError(f"{session.path}: the model predicts class {int(preds.max())}, outside 0..{n - 1}")
    matrix = confusion_matrix(preds, val.masks, n, val.ignore_index)
    m = segmentation_metrics(matrix, val.classes)
    return Evaluation("segmentation", "mIoU", m["miou"], m["mdice"], int(np.trace(matrix)), int(matrix.sum()),
                      source, mean, std, notes, {**m, "confusion_matrix": matrix.tolist()})
