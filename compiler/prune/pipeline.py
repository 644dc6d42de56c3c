"""Iterative prune -> fine-tune, the stage behind the `prune:` section, `dlc compile` and `dlc prune`.

Each of `steps` steps removes the same fraction of what is left (so the last step lands exactly on `amount`,
with the same widths as one shot), measures validation accuracy, fine-tunes with the Trainer into
OUT/prune/step_k/ and writes that step's pruned model there: pruned.safetensors (every tensor by node name, at
the pruned shapes) and model.onnx. Earlier results are never overwritten: the trained checkpoint stays where
training put it, and an interrupted fine-tune leaves the last finished step's files in place.

A structurally pruned graph no longer matches the YAML's widths, so the reusable artifact is the ONNX file:
`dlc import OUT/prune/step_k/model.onnx -o DIR` gives a YAML with the pruned widths and its weights, to
fine-tune further or compile again.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..analysis import summarize
from ..errors import DlcError
from ..graph import Graph
from .config import PruneConfig
from .structured import group_sizes
from .structured import prune as prune_structured


class BNSlimming:
    """Network slimming (Liu et al. 2017): an L1 subgradient on every batch-norm scale after each solver step,
    scale -= lr · lr_mult · bn_l1 · sign(scale), so unimportant channels drift to zero and importance bn_scale
    ranks them reliably."""

    def __init__(self, bn_l1: float):
        self.bn_l1 = float(bn_l1)

    def on_step(self, trainer, global_iteration: int) -> None:
        lr = trainer.schedule(global_iteration) * self.bn_l1
        for node in trainer.graph.nodes():
            if node.op == "batchnorm" and "scale" in node.params:
                s = node.params["scale"]
                s -= np.float32(lr * trainer.cfg.lr_mult_for(node.name)) * np.sign(s)  # in place: the solver's array


def training_callbacks(cfg: PruneConfig | None) -> list:
    """Callbacks the prune: section adds to the main training (network slimming)."""
    return [BNSlimming(cfg.bn_l1)] if cfg is not None and cfg.bn_l1 > 0 else []


@dataclass
class ValData:
    """The validation split, normalised once, for accuracy without fine-tuning (top-1; detectors: mAP@0.5)."""

    x: np.ndarray
    y: np.ndarray
    batch_size: int = 256
    classes: list[str] | None = None
    metric = "top-1"

    @classmethod
    def from_spec(cls, spec, graph: Graph) -> ValData | DetectionValData | SegmentationValData | None:
        """A classifier (one flat output of class scores) with classification data, a detector with detection
        data, or a segmentation model with segmentation data; None for anything else."""
        from ..data import load_dataset
        from ..ops.detect import detect_node

        out = graph.outputs[0]
        if detect_node(graph) is not None:
            return DetectionValData.from_spec(spec, graph)
        from ..data.datasets import SEGMENTATION_DATASETS

        if spec.data.raw.get("dataset") in SEGMENTATION_DATASETS:
            return SegmentationValData.from_spec(spec, graph)
        if len(graph.outputs) != 1 or len(graph.shapes[out] or ()) != 1 or "detection" in str(
                spec.data.raw.get("dataset")):
            return None
        _, val = load_dataset(spec.data.raw, spec.input.shape, int(graph.shapes[out][0]), Path(spec.file).parent)
        return cls(_normalised(val.images, spec), np.asarray(val.labels),
                   classes=list(val.classes))

    def accuracy(self, graph: Graph) -> float:
        from ..train.executor import Executor

        ex, out = Executor(graph), graph.outputs[0]
        correct = 0
        for i in range(0, len(self.y), self.batch_size):
            logits = ex.forward(self.x[i:i + self.batch_size])[out]
            correct += int((np.argmax(logits, axis=1) == self.y[i:i + self.batch_size]).sum())
        return correct / max(len(self.y), 1)

    def loss(self, graph: Graph, limit: int = 512) -> float:
        """Mean cross-entropy of the backend's logits on the first `limit` validation images: a continuous
        measure of damage, where accuracy on a few hundred images moves in steps."""
        from ..train.executor import Executor

        ex, out = Executor(graph), graph.outputs[0]
        n = min(limit, len(self.y))
        from dlc.runtime.evaluate import cross_entropy_sum

        total = 0.0
        for i in range(0, n, self.batch_size):
            j = min(i + self.batch_size, n)
            total += cross_entropy_sum(ex.forward(self.x[i:j])[out], self.y[i:j])
        return total / max(n, 1)


def damage_fn(val) -> Callable[[Graph], float] | None:
    """How much worse a pruned graph is, for the speed-target search: validation cross-entropy for a
    classifier, 1 - mAP@0.5 or 1 - mIoU otherwise; None without validation data."""
    if val is None:
        return None
    if hasattr(val, "loss"):
        return val.loss
    return lambda graph: 1.0 - val.accuracy(graph)


def _normalised(images: np.ndarray, spec) -> np.ndarray:
    """Validation images as the model sees them: (x − mean) / std of model.input, float32."""
    mean = np.asarray(spec.input.mean, np.float32)[None, :, None, None]
    std = np.asarray(spec.input.std, np.float32)[None, :, None, None]
    return np.ascontiguousarray((images - mean) / std, dtype=np.float32)


@dataclass
class DetectionValData:
    """A detector's validation split: `accuracy` is mAP@0.5 (VOC all-point) of the backend's decoded boxes after
    dlc's NMS at confidence 0.001, as the trainer's val_map."""

    x: np.ndarray
    gts: list
    batch_size: int = 64
    classes: list[str] | None = None
    metric = "mAP@0.5"

    @classmethod
    def from_spec(cls, spec, graph: Graph) -> DetectionValData | None:
        from ..data.datasets import DETECTION_DATASETS
        from ..data.detection import load_detection_dataset

        if spec.data.raw.get("dataset") not in DETECTION_DATASETS:
            return None
        _, val = load_detection_dataset(spec.data.raw, spec.input.shape, Path(spec.file).parent)
        gts = [(val.boxes[i], val.labels[i], val.crowd(i)) for i in range(len(val))]
        return cls(_normalised(val.images, spec), gts, classes=list(val.classes))

    def accuracy(self, graph: Graph) -> float:
        from dlc.runtime.detect import postprocess
        from dlc.runtime.metrics import evaluate_detections

        from ..ops.detect import bind_strides, detect_node
        from ..train.executor import Executor

        node = detect_node(graph)
        bind_strides(graph)
        a, ex, preds = node.attrs, Executor(graph), []
        for i in range(0, len(self.x), self.batch_size):
            rows = ex.forward(self.x[i:i + self.batch_size])[node.outputs[0]]
            preds += postprocess(rows, 0.001, a["iou_threshold"], a["max_detections"], a["class_agnostic"])
        return float(evaluate_detections(self.gts, preds, a["classes"], 0.5)["map"] or 0.0)


@dataclass
class SegmentationValData:
    """A segmentation model's validation split: `accuracy` is the mIoU of the backend's per-pixel argmax, as the
    trainer's val_miou (ignored pixels left out)."""

    x: np.ndarray
    masks: np.ndarray
    ignore_index: int
    batch_size: int = 32
    classes: list[str] | None = None
    metric = "mIoU"

    @classmethod
    def from_spec(cls, spec, graph: Graph) -> SegmentationValData | None:
        from ..data.segmentation import load_segmentation_dataset

        out = graph.outputs[0]
        if len(graph.outputs) != 1 or len(graph.shapes[out] or ()) != 3:
            return None
        _, val = load_segmentation_dataset(spec.data.raw, spec.input.shape, Path(spec.file).parent,
                                           int(graph.shapes[out][0]))
        return cls(_normalised(val.images, spec), val.masks, val.ignore_index,
                   classes=list(val.classes))

    def accuracy(self, graph: Graph) -> float:
        from dlc.runtime.segmentation_metrics import confusion_matrix, segmentation_metrics

        from ..train.executor import Executor

        ex, out = Executor(graph), graph.outputs[0]
        n = int(graph.shapes[out][0])
        matrix = np.zeros((n, n), np.int64)
        for i in range(0, len(self.x), self.batch_size):
            scores = ex.forward(self.x[i:i + self.batch_size])[out]
            matrix += confusion_matrix(scores.argmax(axis=1), self.masks[i:i + self.batch_size], n, self.ignore_index)
        return float(segmentation_metrics(matrix)["miou"])


@dataclass
class PruneResult:
    config: PruneConfig
    rows: list[dict[str, Any]]  # step 0: the model before pruning
    groups: list[dict[str, Any]] = field(default_factory=list)  # structured: channels per group, last step
    sparsity: dict[str, Any] | None = None  # unstructured: P1's sparsity_report (without per-layer rows)
    sizes: dict[str, Any] | None = None  # unstructured: file and compressed sizes, dense vs sparse
    fine_tuned: bool = False
    notes: list[str] = field(default_factory=list)
    checkpoint: str | None = None
    metric: str = "top-1"  # what val_accuracy holds: top-1 accuracy, or mAP@0.5 for detectors
    target: dict[str, Any] | None = None  # a speed target's search: speed_target.SearchResult.to_dict()

    @property
    def before(self) -> dict[str, Any]:
        return self.rows[0]

    @property
    def after(self) -> dict[str, Any]:
        return self.rows[-1]

    def to_dict(self) -> dict[str, Any]:
        return {"config": self.config.to_dict(), "fine_tuned": self.fine_tuned, "steps": self.rows[1:],
                "before": self.before, "after": self.after, "groups": self.groups, "sparsity": self.sparsity,
                "sizes": self.sizes, "notes": self.notes, "checkpoint": self.checkpoint, "metric": self.metric,
                "target": self.target}


def _row(graph: Graph, step: int, amount: float, params0: int | None, masks=None) -> dict[str, Any]:
    s = summarize(graph)
    if masks is not None:
        from .unstructured import sparsity_report

        sparsity = sparsity_report(graph, masks)["prunable"]["sparsity"]
    else:  # structured: the fraction of parameters removed
        sparsity = 1.0 - s.total_params / params0 if params0 else 0.0
    return {"step": step, "amount": amount, "params": s.total_params, "macs": s.total_macs, "sparsity": sparsity,
            "val_accuracy_pruned": None, "val_accuracy": None, "fine_tune_epochs": 0, "seconds": 0.0}


def _fine_tune(loaded, graph: Graph, cfg: PruneConfig, step_dir: Path, callbacks: list, progress: bool, console):
    from ..frontend import LoadedModel
    from ..train.trainer import Trainer

    config = dataclasses.replace(cfg.fine_tune, epochs=cfg.fine_tune_epochs, max_iter=None)
    trainer = Trainer(LoadedModel(loaded.spec, graph), step_dir, progress=progress, console=console, config=config,
                      callbacks=callbacks)
    for cb in callbacks:
        if hasattr(cb, "attach"):
            cb.attach(trainer)  # hold masks from the first step
    return trainer.run()


def _save_step(graph: Graph, step_dir: Path, info: dict[str, Any]) -> Path:
    from ..atomic import write_bytes
    from ..export_onnx import to_onnx
    from ..train.checkpoint import save_checkpoint

    path = save_checkpoint(step_dir / "pruned.safetensors", graph, info=info)
    write_bytes(step_dir / "model.onnx", to_onnx(graph).SerializeToString())
    return path


def run_prune(loaded, cfg: PruneConfig, out_dir: str | Path, progress: bool = False, console=None,
              val: ValData | None = None) -> PruneResult:
    """Prune `loaded.graph` in place, step by step, fine-tuning after each step when `cfg.fine_tune_epochs`
    and the spec's data allow it. Returns one row per step (step 0 = before pruning)."""
    graph = loaded.graph
    out_dir = Path(out_dir)
    has_data = loaded.spec.data is not None
    if val is None and has_data:
        val = ValData.from_spec(loaded.spec, graph)
    fine_tune = cfg.fine_tune_epochs > 0 and has_data and cfg.fine_tune is not None
    unstructured = cfg.method == "unstructured"
    notes = []
    if not fine_tune:
        notes.append("not fine-tuned: " + ("no data to fine-tune with (a data: section or --data)" if not has_data
                                           else "fine-tune epochs are 0") + "; accuracy may drop")
    gmp = unstructured and cfg.schedule == "gmp"
    if gmp and not fine_tune:
        notes.append("schedule gmp needs fine-tuning epochs: pruned in one shot instead")
        gmp = False

    params0 = summarize(graph).total_params
    rows = [_row(graph, 0, 0.0, params0, {} if unstructured else None)]
    rows[0]["val_accuracy"] = val.accuracy(graph) if val else None
    group_ratios, target = None, None
    if cfg.target is not None and not unstructured:
        group_ratios, target = _search_widths(graph, cfg, val, progress, console)
        cfg = dataclasses.replace(cfg, amount=target["channels_removed"])
    dense_onnx = None
    if unstructured:
        from ..export_onnx import to_onnx

        dense_onnx = to_onnx(graph).SerializeToString()
    sizes0 = group_sizes(graph) if not unstructured else None
    masks: dict[str, np.ndarray] | None = {} if unstructured else None
    groups: list[dict[str, Any]] = []
    checkpoint = None
    for k in range(1, cfg.steps + 1):
        t0 = time.perf_counter()
        amount = cfg.step_amount(cfg.amount, k)
        overrides = {p: cfg.step_amount(r, k) for p, r in cfg.layers.items()}
        callbacks: list = []
        if unstructured:
            from .unstructured import GradualPruner, MaskKeeper, apply_masks, magnitude_masks

            if gmp:
                previous = cfg.step_amount(cfg.amount, k - 1)
                callbacks.append(GradualPruner(amount, cfg.scope, overrides or None, cfg.exclude,
                                               initial_sparsity=previous, masks=masks))
            else:
                masks = magnitude_masks(graph, amount, cfg.scope, overrides or None, cfg.exclude, existing=masks)
                apply_masks(graph, masks)
                callbacks.append(MaskKeeper(masks))
        else:
            groups = prune_structured(graph, amount, cfg.importance, cfg.round_to, cfg.exclude, seed=k,
                                      overrides=overrides, original_sizes=sizes0, scope=cfg.scope,
                                      group_ratios={p: cfg.step_amount(r, k) for p, r in group_ratios.items()}
                                      if group_ratios else None)
            for g in groups:  # channels before any step, not before this one
                g["before"] = sizes0.get(g["producers"][0], g["before"])
        row = _row(graph, k, amount, params0, masks)
        row["val_accuracy_pruned"] = val.accuracy(graph) if val and not gmp else None
        row["val_accuracy"] = row["val_accuracy_pruned"]
        step_dir = out_dir / "prune" / f"step_{k}"
        if fine_tune:
            result = _fine_tune(loaded, graph, cfg, step_dir, callbacks, progress, console)
            if result.stopped == "interrupted":
                kept = f"step {k - 1}'s model in {out_dir / 'prune' / f'step_{k - 1}'}" if k > 1 else \
                    "the trained model (no pruning step finished)"
                raise DlcError(f"fine-tuning after pruning step {k} was interrupted; {kept} is kept")
            if gmp:
                masks = callbacks[0].masks
                row.update({k2: v for k2, v in _row(graph, k, amount, params0, masks).items()
                            if k2 in ("sparsity",)})
            row["fine_tune_epochs"] = len(result.history)
            row["val_accuracy"] = val.accuracy(graph) if val else None
        row["seconds"] = time.perf_counter() - t0
        info = {"step": k, "pruning": cfg.to_dict(), "val_accuracy": row["val_accuracy"]}
        checkpoint = str(_save_step(graph, step_dir, info))
        row["checkpoint"] = checkpoint
        rows.append(row)
    sparsity = sizes = None
    if unstructured:
        from ..export_onnx import to_onnx
        from .unstructured import size_report, sparsity_report

        report = sparsity_report(graph, masks)
        sparsity = {"prunable": report["prunable"], "all": report["all"], "note": report["note"]}
        sizes = size_report(dense_onnx, to_onnx(graph).SerializeToString())
        notes.append(report["note"])
    return PruneResult(cfg, rows, groups, sparsity, sizes, fine_tune, notes, checkpoint,
                       val.metric if val else "top-1", target)


def _search_widths(graph: Graph, cfg: PruneConfig, val, progress: bool, console):
    """({first producer: ratio}, the search's report) for cfg.target; a target out of reach is an error, before
    any fine-tuning time is spent."""
    from .speed_target import search

    def say(message: str) -> None:
        if progress and console is not None:
            console.print(f"[dim]speed target[/] {message}", highlight=False)

    t = cfg.target
    result = search(graph, t, cfg.importance, cfg.round_to, cfg.exclude, say=say, damage=damage_fn(val))
    if not result.reached:
        hints = ["ask for a smaller speed-up"]
        if cfg.round_to > 1:
            hints.append("a smaller round_to")
        if t.batch == 1:
            hints.append("a larger batch (fixed per-run costs weigh most at batch 1)")
        raise DlcError(f"cannot prune to {t.speedup:g}x at batch {t.batch} on {t.device}: {result.note}; "
                       + ", or ".join(hints))
    report = {**t.to_dict(), **result.to_dict()}
    kept, total = sum(result.widths.values()), sum(result.sizes.values())
    report["channels_removed"] = 1.0 - kept / total if total else 0.0
    return result.ratios(), report


def _cli_target(cfg: PruneConfig, ratio, speedup, batch, device, threads) -> None:
    """--target-speedup / --batch / --device / --threads on top of prune.target."""
    from dlc.runtime.session import DEVICES

    from .speed_target import SpeedTarget

    if speedup is not None:
        if speedup <= 1.0:
            raise DlcError(f"--target-speedup must be > 1 (e.g. 2.0: twice as fast as the unpruned model), got "
                           f"{speedup:g}")
        if ratio is not None:
            raise DlcError("--ratio and --target-speedup do not go together: the speed target chooses each "
                           "group's ratio")
        base = cfg.target or SpeedTarget(speedup)
        cfg.target = dataclasses.replace(base, speedup=float(speedup))
    elif cfg.target is not None and ratio is not None:
        cfg.target = None  # --ratio on the command line replaces the YAML's prune.target
    if cfg.target is None:
        given = [f for f, v in (("--batch", batch), ("--device", device), ("--threads", threads)) if v is not None]
        if given:
            raise DlcError(f"{', '.join(given)} set{'s' if len(given) == 1 else ''} where the speed target is "
                           "measured: give --target-speedup too (or prune.target in the YAML)")
        return
    if cfg.method != "structured":
        raise DlcError("a speed target needs --method structured: zeroed weights (unstructured) do not make "
                       "onnxruntime faster")
    if device is not None and device not in DEVICES:
        raise DlcError(f"--device must be one of {', '.join(DEVICES)}, got '{device}'")
    cfg.target = dataclasses.replace(cfg.target, batch=batch or cfg.target.batch, device=device or cfg.target.device,
                                     threads=threads or cfg.target.threads)


# --- `dlc prune`: a YAML or an ONNX file, data from the YAML or from --data ----------------------------------

def _data_yaml(path: Path, layer_names: list[str]):
    """(DataConfig, train: mapping or None) from a YAML file's data: and optional train: sections."""
    from ..errors import Diagnostic
    from ..sections import check_section
    from ..train.config import parse_data, parse_train
    from ..yaml_loader import load_yaml_file

    doc, _ = load_yaml_file(path)
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), dict):
        raise DlcError(Diagnostic("--data needs a YAML file with a 'data:' section (e.g. the model's own YAML, or "
                                  "one holding just data: and train:)", file=str(path)))
    diags = []
    for name in ("data", "train"):
        if name in doc:
            diags += check_section(name, doc[name], str(path), doc.line_of(name) if hasattr(doc, "line_of") else None)
    data, more = parse_data(doc["data"], str(path))
    diags += more
    train = doc.get("train") if isinstance(doc.get("train"), dict) else None
    if train is not None:
        diags += parse_train(train, str(path), layer_names)[1]
    if diags:
        raise DlcError(diags)
    return data, train


def load_for_pruning(model: Path, weights: Path | None = None, data: Path | None = None):
    """(LoadedModel, train: mapping or None) for `dlc prune`: a YAML (its weights, or a checkpoint) or an
    ONNX file; `data` (a YAML with data: and optional train:) replaces the model's own data and training."""
    from ..frontend import LoadedModel, load_model
    from ..spec import InputSpec, ModelSpec

    if model.suffix.lower() == ".onnx":
        from ..onnx_import import import_onnx
        from ..onnx_io import load_onnx

        graph = import_onnx(load_onnx(model), source=str(model))
        inp = graph.meta["input"]
        spec = ModelSpec(file=str(data or model), sha256="", name=graph.name,
                         input=InputSpec(inp["name"], tuple(inp["shape"]), list(inp["mean"]), list(inp["std"])))
        loaded, train = LoadedModel(spec, graph), None
    else:
        loaded = load_model(model)
        if weights is not None:
            from ..train.checkpoint import load_params_into, read_checkpoint
            from ..train.trainer import restore_anchors

            params, _, _, info = read_checkpoint(weights)
            load_params_into(loaded.graph, params, str(weights))
            restore_anchors(loaded.graph, info)  # a detector's anchors: auto, as training found them
        train = loaded.spec.sections.get("train")
    if data is not None:
        data_cfg, train = _data_yaml(Path(data), [n.name for n in loaded.graph.nodes()])
        loaded.spec = dataclasses.replace(loaded.spec, data=data_cfg, train=None)
    return loaded, train


def cli_config(loaded, train: dict | None, method: str | None = None, importance: str | None = None,
               ratio: float | None = None, scope: str | None = None, round_to: int | str | None = None,
               skip: list[str] | None = None, steps: int | None = None, epochs: int | None = None,
               lr: float | None = None, target_speedup: float | None = None, batch: int | None = None,
               device: str | None = None, threads: int | None = None) -> PruneConfig:
    """The YAML's prune: settings (if any) with the command line's flags on top; fine-tune epochs: the flag,
    else prune.fine_tune.epochs, else max(1, train epochs // 4); no data means no fine-tuning."""
    from ..errors import did_you_mean
    from .config import IMPORTANCE, METHODS, SCOPES, default_fine_tune_epochs, fine_tune_config

    base = loaded.prune or PruneConfig()
    cfg = dataclasses.replace(base, layers=dict(base.layers), exclude=list(base.exclude))
    if method is not None:
        if method not in METHODS:
            hint = " (the importance criterion is --importance)" if method in IMPORTANCE["structured"] else ""
            raise DlcError(f"--method must be one of {', '.join(METHODS)}, got '{method}'{hint}"
                           + (f"; {did_you_mean(method, METHODS)}" if did_you_mean(method, METHODS) else ""))
        if method != cfg.method:
            cfg.method, cfg.importance = method, IMPORTANCE[method][0]
    if importance is not None:
        cfg.importance = importance
    if cfg.importance not in IMPORTANCE[cfg.method]:
        raise DlcError(f"unknown importance method '{cfg.importance}' for {cfg.method} pruning: use one of "
                       f"{', '.join(IMPORTANCE[cfg.method])}")
    if ratio is not None:
        if not 0.0 <= ratio < 1.0:
            raise DlcError(f"--ratio must be in [0, 1) (the fraction removed), got {ratio}")
        cfg.amount = ratio
    if scope is not None:
        if scope not in SCOPES:
            raise DlcError(f"--scope must be one of {', '.join(SCOPES)}, got '{scope}'")
        cfg.scope = scope
    if round_to is not None:
        from .config import auto_round_to

        cfg.round_to_auto = round_to == "auto"
        if cfg.round_to_auto:
            cfg.round_to = auto_round_to()
        else:
            try:
                cfg.round_to = int(round_to)
            except ValueError:
                raise DlcError(f"--round-to is a channel multiple (an integer >= 1) or auto, got '{round_to}'") \
                    from None
            if cfg.round_to < 1:
                raise DlcError(f"--round-to must be at least 1, got {cfg.round_to}")
    if skip:
        from .structured import matches

        names = [n.name for n in loaded.graph.nodes()]
        for s in skip:
            if not any(matches(n, (s,)) for n in names):
                hint = did_you_mean(s, names)
                raise DlcError(f"--skip '{s}' matches no layer of the model" + (f"; {hint}" if hint else ""))
        cfg.exclude = list(skip)
    if steps is not None:
        cfg.steps = steps
    if cfg.method != "unstructured":
        cfg.schedule = "oneshot"
    _cli_target(cfg, ratio, target_speedup, batch, device, threads)
    if loaded.spec.data is None:
        cfg.fine_tune, cfg.fine_tune_epochs = None, 0
        return cfg
    section = loaded.spec.sections.get("prune") or {}
    ft, yaml_epochs, diags = fine_tune_config(train, section.get("fine_tune"), loaded.spec.file,
                                              [n.name for n in loaded.graph.nodes()])
    if diags:
        raise DlcError(diags)
    train_epochs = (train or {}).get("epochs")
    cfg.fine_tune_epochs = epochs if epochs is not None else yaml_epochs if yaml_epochs is not None else \
        default_fine_tune_epochs(train_epochs if isinstance(train_epochs, int) else None)
    cfg.fine_tune = dataclasses.replace(ft, base_lr=lr) if lr is not None else ft
    return cfg
