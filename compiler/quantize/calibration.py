"""Calibration data: the data section's TRAINING split, through exactly the training preprocessing, and the
tensor ranges onnxruntime's calibrators compute from it once per run.

Training (compiler/train/trainer.py) loads `load_dataset` / `load_detection_dataset` at the model's input size
(images in [0, 1]) and its BatchLoader normalises with (x - mean) / std. Calibration does the same without the
augmentation, taking the mean/std by the rule the evaluator (runtime/evaluate.py) uses for the validation split
— the ONNX file's dlc metadata, else the YAML's model.input, else none — so calibration, evaluation and training
all see one preprocessing. `samples` images are drawn from the training split by a fixed seed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod

from ..errors import Diagnostic, DlcError

METHODS = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
           "percentile": CalibrationMethod.Percentile}
CALIBRATION_BATCH = 16
CHUNK_BATCHES = 4  # feed the calibrator this many batches at a time: bounded memory, same ranges
SAMPLE_SEED = 0


@dataclass
class CalibrationSet:
    """Normalised training images for calibration, and where they came from."""

    input_name: str
    images: np.ndarray  # float32 N×C×H×W, normalised as in training
    batch: int  # images per calibration run (the model's fixed batch, else CALIBRATION_BATCH)
    dataset: str
    train_images: int  # size of the training split the samples were drawn from
    normalization: str  # "onnx metadata", "yaml model.input" or "none"
    mean: list[float]
    std: list[float]
    notes: list[str] = field(default_factory=list)

    def reader(self, start: int = 0, stop: int | None = None) -> ArrayReader:
        return ArrayReader(self.input_name, self.images[start:stop], self.batch)

    def describe(self) -> dict:
        return {"samples": int(len(self.images)), "split": "train", "dataset": self.dataset,
                "train_images": self.train_images, "normalization": self.normalization, "mean": self.mean,
                "std": self.std}


class ArrayReader(CalibrationDataReader):
    """onnxruntime's reader protocol over an array: one {input: batch} dict per get_next, then None."""

    def __init__(self, input_name: str, images: np.ndarray, batch: int):
        self.input_name, self.images, self.batch = input_name, images, max(int(batch), 1)
        self._next = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._next >= len(self.images):
            return None
        x = self.images[self._next:self._next + self.batch]
        self._next += self.batch
        return {self.input_name: np.ascontiguousarray(x, dtype=np.float32)}

    def rewind(self) -> None:
        self._next = 0

    def __len__(self) -> int:
        return -(-len(self.images) // self.batch)


def data_spec(data, where: str):
    """The data spec calibration reads: a DataSpec, or a YAML path with a `data:` section. None is the error
    "missing calibration data", said once, clearly."""
    from dlc.runtime.evaluate import DataSpec, read_data_spec

    if isinstance(data, DataSpec):
        return data
    if data is None:
        raise DlcError(Diagnostic("INT8 quantization needs calibration images and a validation split: give "
                                  "--data model.yaml (a YAML file with a data: section, e.g. the model's own)",
                                  file=where))
    path = Path(data)
    if not path.is_file():
        raise DlcError(Diagnostic("calibration data file not found", file=str(path), hint="check the --data path"))
    try:
        return read_data_spec(path)
    except DlcError as exc:
        msgs = [d for d in exc.diagnostics]
        if any("no 'data:' section" in d.message for d in msgs):
            raise DlcError(Diagnostic("no 'data:' section to calibrate INT8 with: add one (the data the model "
                                      "was trained on) or give --data with a YAML file that has it",
                                      file=str(path))) from None
        raise


def calibration_set(model: onnx.ModelProto, spec, samples: int) -> CalibrationSet:
    """`samples` images of the spec's training split, normalised as training normalised them."""
    from dlc.runtime.evaluate import _input_shape, _normalization
    from dlc.runtime.session import Session

    from ..data.datasets import DETECTION_DATASETS

    session = Session(model.SerializeToString(), device="cpu")
    meta = session.metadata
    if len(session.inputs) != 1:
        raise DlcError(f"INT8 calibration feeds one image input; this model has {len(session.inputs)} inputs")
    shape = _input_shape(session, meta)
    source, mean, std, notes = _normalization(session, meta, spec, shape[0])
    kind = spec.data.get("dataset")
    detector = (meta or {}).get("task") == "detection"
    try:
        if detector or kind in DETECTION_DATASETS:
            if not detector or kind not in DETECTION_DATASETS:
                raise DlcError(f"the model is {'a detector' if detector else 'a classifier'} but {spec.file}'s "
                               f"data section holds '{kind}'; give the data the model was trained on")
            from ..data.detection import load_detection_dataset

            train = load_detection_dataset(spec.data, shape, spec.base_dir)[0]
            images = train.images
        else:
            from ..data import load_dataset

            out_shape = session.outputs[0].shape
            if len(out_shape) != 2 or not isinstance(out_shape[1], int):
                raise DlcError(f"a classifier's first output must be N×classes to calibrate against its data; "
                               f"'{session.outputs[0].name}' has shape {out_shape}")
            images = load_dataset(spec.data, shape, int(out_shape[1]), spec.base_dir)[0].images
    except DlcError as exc:
        raise DlcError([Diagnostic(f"calibration data: {d.format()}", file=spec.file)
                        for d in exc.diagnostics]) from None
    if len(images) == 0:
        raise DlcError(Diagnostic("the training split is empty: no images to calibrate with", file=spec.file))
    rng = np.random.default_rng(SAMPLE_SEED)
    idx = np.sort(rng.choice(len(images), size=min(samples, len(images)), replace=False))
    m = np.asarray(mean, np.float32)[None, :, None, None]
    inv = 1.0 / np.asarray(std, np.float32)[None, :, None, None]
    x = np.ascontiguousarray((images[idx] - m) * inv, dtype=np.float32)
    dim0 = session.inputs[0].shape[0]
    batch = dim0 if isinstance(dim0, int) and dim0 > 0 else CALIBRATION_BATCH
    if samples > len(images):
        notes.append(f"asked for {samples} calibration samples, the training split has {len(images)}: used all")
    return CalibrationSet(session.inputs[0].name, x, batch, str(kind), int(len(images)), source, mean, std, notes)


def calibrate(pre_path: Path, cal: CalibrationSet, method: str, percentile: float, cache_path: Path,
              work_dir: Path) -> float:
    """Compute every tensor's range once with onnxruntime's calibrator and save it where quantize_static reads
    it (`calibration_cache_path`), so each candidate format reuses one calibration. Returns the seconds taken."""
    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    from .formats import quiet_ort

    started = time.perf_counter()
    # the op types quantize_static calibrates by default, so the ranges cover whatever any candidate quantizes
    op_types = sorted(set(QLinearOpsRegistry) | set(QDQRegistry))
    extra = {"percentile": percentile} if method == "percentile" else {}
    with quiet_ort():
        calibrator = create_calibrator(Path(pre_path), op_types, augmented_model_path=str(work_dir / "augmented.onnx"),
                                       calibrate_method=METHODS[method], extra_options=extra)
        step = cal.batch * CHUNK_BATCHES
        for start in range(0, len(cal.images), step):
            calibrator.collect_data(cal.reader(start, start + step))
        ranges = calibrator.compute_data()
    save_tensors_data(ranges, cache_path)
    return time.perf_counter() - started
