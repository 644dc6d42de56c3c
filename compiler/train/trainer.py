"""The training loop behind `dlc train`: data, forward, loss, backward, solver, validation, early stopping,
checkpoints, metrics and curves.

Three tasks share the loop: classification (a flat output of class scores; softmax cross-entropy or focal
loss), detection (the output comes from a `detect` layer: the executor runs forward to the layer's raw head
maps, dlc.compiler.detect.loss gives their gradients, and backward starts there; validation decodes,
post-processes with NMS and reports mAP@0.5 as val_map) and semantic segmentation (a segmentation data set and
a C×H×W output of class scores per pixel at the input's size; dlc.compiler.segment.loss; validation counts
one confusion matrix and reports mIoU as val_miou).

Repeatable bit for bit: the data order, each batch's augmentation and each dropout mask are functions of
(seed, epoch, iteration), so a run resumed from any checkpoint continues exactly as if never stopped.
A checkpoint is written atomically after every epoch (and at Ctrl-C, at the end of the current iteration);
a NaN or inf loss stops the run without touching the last good checkpoint (metrics.json and curves.png still
get the history so far). The checkpoint records a fingerprint of everything training depends on (graph,
initial weights, data:, train:, network slimming, dlc version), so `dlc compile` can reuse an up-to-date one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import networkx as nx
import numpy as np

from dlc._C import loss as _loss

from .. import __version__
from ..atomic import write_json
from ..data import BatchLoader, load_dataset
from ..data.datasets import SEGMENTATION_DATASETS
from ..data.lazy import LazyImages, without_unreadable
from ..errors import DlcError
from ..frontend import LoadedModel
from ..ops import REGISTRY
from ..ops.detect import anchors_of, bind_strides, detect_node, strides_of
from .checkpoint import (
    check_solver_state,
    graph_tensors,
    load_params_into,
    read_checkpoint,
    save_checkpoint,
    short,
    validate_resume_info,
)
from .config import TrainConfig
from .distributed import GradientBuffer, World
from .executor import Executor
from .metrics import classification_report, plot_curves
from .schedule import LRSchedule
from .solver import Solver
from .transfer import apply_transfer, describe, frozen_layers

CHECKPOINT = "checkpoint.safetensors"
FINISHED = ("completed", "early_stopping", "max_iter")  # a checkpoint's 'stopped' when training ran to its end
STATE_KEYS = ("epoch", "iteration", "global_iteration", "history", "best_value", "best_epoch", "bad_epochs",
              "partial")


class TrainingDiverged(DlcError):
    collective = True  # data parallel: every rank raises it at the same step, and rank 0 reports it


class _NonFinite(Exception):
    """Raised inside the loop at a NaN/inf loss; run() turns it into TrainingDiverged with the right words."""


def training_fingerprint(loaded: LoadedModel, config: TrainConfig | None = None, callbacks=()) -> str:
    """sha256 of what the trained weights depend on: the graph (ops, attributes, wiring), its initial
    weights (fillers, model.seed, model.weights), the input normalisation, the data: section, the training
    settings, the callbacks' settings (network slimming) and the dlc version. Not the data files themselves,
    nor YAML comments or the prune/optimize/export sections. Call it before training touches the graph."""
    spec, graph = loaded.spec, loaded.graph
    cfg = config if config is not None else spec.train
    h = hashlib.sha256()

    def put(obj: Any) -> None:
        h.update(json.dumps(obj, sort_keys=True, default=repr).encode())
        h.update(b"\0")

    put({"dlc": __version__, "input": dataclasses.asdict(spec.input) if spec.input is not None else None,
         "inputs": list(graph.inputs), "outputs": list(graph.outputs),
         "data": spec.sections.get("data"),
         "train": dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else repr(cfg),
         "callbacks": [[type(cb).__name__, {k: v for k, v in sorted(vars(cb).items()) if not k.startswith("_")
                                             and isinstance(v, (int, float, str, bool, type(None)))}]
                       for cb in callbacks]})
    for node in graph.nodes():
        put([node.name, node.op, list(node.inputs), list(node.outputs), node.attrs, node.fillers])
        for tensor in sorted(node.params):
            a = np.ascontiguousarray(node.params[tensor])
            put([tensor, a.dtype.str, list(a.shape)])
            h.update(a.tobytes())
    return h.hexdigest()


@dataclass
class TrainResult:
    out_dir: Path
    history: list[dict[str, Any]]
    stopped: str  # completed | early_stopping | max_iter | interrupted
    best_epoch: int | None
    seconds: float
    classes: list[str]
    transfer: dict[str, Any] | None = None  # train.init_from's report, with the frozen layers

    @property
    def final(self) -> dict[str, Any]:
        return self.history[-1] if self.history else {}


class Trainer:
    """`config` replaces the YAML's train: settings (fine-tuning after pruning uses its own). `callbacks` are
    objects with optional `on_step(trainer, global_iteration)` (after every solver step) and
    `on_epoch_end(trainer, epoch)` methods, e.g. to hold pruning masks or raise sparsity gradually."""

    def __init__(self, loaded: LoadedModel, out_dir: str | Path, progress: bool = True, console=None,
                 config: TrainConfig | None = None, callbacks=(), world: World | None = None):
        spec, self.graph = loaded.spec, loaded.graph
        self.spec = spec
        self.world = world if world is not None else World.single()  # data-parallel ranks (train/distributed.py)
        self._grad_buffer: GradientBuffer | None = None
        self.cfg = config if config is not None else spec.train
        self.callbacks = list(callbacks)
        self.console, self.progress = console, progress and self.world.is_root  # rank 0 alone reports
        self.transfer_report = None
        tc = self.cfg.transfer
        if tc.init_from is not None:  # before the fingerprint: the pretrained weights are the starting point
            self.transfer_report = apply_transfer(self.graph, tc, Path(spec.file).parent, spec.file)
            self._say(describe(self.transfer_report))
        self.train_sha256 = training_fingerprint(loaded, self.cfg, self.callbacks)  # before anchors: auto
        self._saved_at: tuple[int, int] | None = None  # (epoch, iteration) of this run's checkpoint on disk
        self.out_dir = Path(out_dir)
        self.det = detect_node(self.graph)
        data_kind = spec.data.raw.get("dataset") if spec.data is not None else None
        self.task = ("detection" if self.det is not None else
                     "segmentation" if data_kind in SEGMENTATION_DATASETS else "classification")
        if self.task == "detection":
            self._init_detection()
        elif self.task == "segmentation":
            self._init_segmentation()
        else:
            self._init_classification()
        c = self.cfg
        self._shard()
        self.executor = Executor(self.graph)
        self.executor.sync_bn = self.world if c.sync_bn and self.world.distributed else None
        self.frozen = frozen_layers(self.graph, tc) | {n.name for n in self.graph.nodes()
                                                        if c.lr_mult_for(n.name) == 0.0}
        params, mults, training = {}, {}, set()
        for node in self.graph.nodes():
            for t in REGISTRY[node.op].trainable(node.attrs):
                if t in node.params:
                    params[f"{node.name}.{t}"] = node.params[t]
                    mults[f"{node.name}.{t}"] = 0.0 if node.name in self.frozen else c.lr_mult_for(node.name)
                    if mults[f"{node.name}.{t}"] != 0.0:
                        training.add(node.name)
        # backward stops where nothing at or before a layer trains (a frozen trunk costs no backward at all)
        reached = training.union(*(nx.descendants(self.graph.nx, n) for n in training))
        self.executor.set_frozen(self.frozen, {n.name for n in self.graph.nodes()} - reached)
        self.solver = Solver(params, c.solver, mults)
        if tc.cache_features:
            from .feature_cache import cache_trunk

            self._say(cache_trunk(self, self.out_dir))
        self.iters_per_epoch = len(self.train_loader)
        self.total_iters = c.max_iter or c.epochs * self.iters_per_epoch
        self.epochs = c.epochs if not c.max_iter else -(-c.max_iter // self.iters_per_epoch)
        warmup = c.warmup_iterations or int(round(c.warmup_epochs * self.iters_per_epoch))
        # base_lr is for the global batch (ranks × batch_size); scale_lr: Goyal et al.'s linear scaling by ranks
        base_lr = c.base_lr * (self.world.size if c.scale_lr else 1)
        self.schedule = LRSchedule(base_lr, c.lr_policy, self.iters_per_epoch, self.total_iters, c.gamma,
                                   c.step_size, c.steps, c.power, warmup_iters=warmup,
                                   warmup_start_factor=c.warmup_start_factor)
        self._interrupted = False
        self._saving_interrupt = False  # the interrupted run's last checkpoint is being written: Ctrl-C waits
        es = c.early_stopping
        allowed = ("val_loss", "train_loss", SCORE[self.task])
        if es is not None and es.monitor not in allowed:
            raise DlcError(f"{spec.file}: early_stopping.monitor is {es.monitor}, which a "
                           f"{MODEL_NOUN[self.task]} does not report; use one of {', '.join(allowed)}")

    def _data_cfg(self) -> dict[str, Any]:
        """The data: section, plus where `load: memmap` keeps its store (the output folder)."""
        return {**self.spec.data.raw, "_store_dir": str(self.out_dir / "data_store")}

    def _shard(self) -> None:
        """Data parallel: each rank reads its part of every global batch of ranks × batch_size samples."""
        w, c = self.world, self.cfg
        if not w.distributed:
            return
        if c.transfer.cache_features:
            raise DlcError(f"{self.spec.file}: train.cache_features runs in one process; train without mpirun, or "
                           "drop cache_features (a frozen trunk already costs no backward)")
        self.train_loader.shard(w.rank, w.size)
        if len(self.train_loader) == 0:
            raise DlcError(f"{self.spec.file}: {len(self.train_set)} training samples are fewer than one global "
                           f"batch ({w.size} ranks × batch_size {c.batch_size}); lower train.batch_size or the "
                           "number of ranks")

    def _init_classification(self) -> None:
        spec, c = self.spec, self.cfg
        if len(self.graph.outputs) != 1:
            raise DlcError(f"{spec.file}: training needs one model output (the class scores); "
                           f"this model has {len(self.graph.outputs)}")
        out = self.graph.outputs[0]
        shape = self.graph.shapes[out]
        if len(shape) != 1:
            raise DlcError(f"{spec.file}: training needs a flat output of class scores, got {shape} from '{out}'")
        if c.loss not in ("cross_entropy", "focal"):
            raise DlcError(f"{spec.file}: train.loss {c.loss} is a segmentation loss (per pixel); a classifier "
                           "trains with cross_entropy or focal")
        self.logits = _logits_of(self.graph, out)
        self.num_outputs = shape[0]
        self.train_set, self.val_set = load_dataset(self._data_cfg(), spec.input.shape, self.num_outputs,
                                                    Path(spec.file).parent)
        self.val_set = without_unreadable(self.val_set)
        inp = spec.input
        self.train_loader = BatchLoader(self.train_set, c.batch_size, inp.mean, inp.std, c.seed, spec.data.augment,
                                        prefetch=spec.data.prefetch)
        self.val_loader = BatchLoader(self.val_set, c.batch_size, inp.mean, inp.std, shuffle=False,
                                      drop_last=False)
        self.class_weights = self._class_weights()

    def _init_detection(self) -> None:
        from ..data.detection import DetectionLoader, load_detection_dataset
        from ..detect.loss import LossConfig

        spec, c, node = self.spec, self.cfg, self.det
        if spec.data is None:
            raise DlcError(f"{spec.file}: training a detector needs a data: section with a detection dataset")
        if c.class_weights is not None or c.loss != "cross_entropy":  # (dice, ce_dice: segmentation only)
            raise DlcError(f"{spec.file}: train.loss and train.class_weights are for classifiers; a detector's "
                           f"loss settings live on its detect layer '{node.name}' (box_loss, obj_loss, "
                           "class_weights, ...)")
        self.train_set, self.val_set = load_detection_dataset(self._data_cfg(), spec.input.shape,
                                                              Path(spec.file).parent)
        self.val_set = without_unreadable(self.val_set)
        if len(self.train_set.classes) != node.attrs["classes"]:
            raise DlcError(f"{spec.file}: detect layer '{node.name}' has classes: {node.attrs['classes']} but the "
                           f"data has {len(self.train_set.classes)} ({', '.join(self.train_set.classes)}); make "
                           "them agree")
        bind_strides(self.graph)
        self.num_outputs = node.attrs["classes"]
        self.heads = list(node.inputs)
        self.anchor_fit = self._auto_anchors() if node.attrs["anchors"] is None else None
        self.loss_cfg = LossConfig.from_attrs(node.attrs)
        inp = spec.input
        self.train_loader = DetectionLoader(self.train_set, c.batch_size, inp.mean, inp.std, c.seed,
                                            spec.data.augment, prefetch=spec.data.prefetch)
        self.val_loader = DetectionLoader(self.val_set, c.batch_size, inp.mean, inp.std, shuffle=False,
                                          drop_last=False)
        self.class_weights = None

    def _init_segmentation(self) -> None:
        from ..data.labels import per_pixel_output
        from ..data.segmentation import SegmentationLoader, load_segmentation_dataset
        from ..segment.loss import SegmentationLoss, balanced_weights

        spec, c = self.spec, self.cfg
        problem = per_pixel_output(spec, self.graph)  # validation's check, for graphs that skipped it
        if problem is not None:
            raise DlcError(problem)
        out = self.graph.outputs[0]
        self.logits = _logits_of(self.graph, out)
        self.num_outputs = self.graph.shapes[out][0]
        self.train_set, self.val_set = load_segmentation_dataset(self._data_cfg(), spec.input.shape,
                                                                 Path(spec.file).parent, self.num_outputs)
        self.val_set = without_unreadable(self.val_set)
        n = len(self.train_set.classes)
        if n != self.num_outputs:
            raise DlcError(f"{spec.file}: the model's output '{out}' has {self.num_outputs} channels but the data has "
                           f"{n} classes ({', '.join(self.train_set.classes)}); set the last conv's out to {n}")
        if c.label_smoothing:
            raise DlcError(f"{spec.file}: train.label_smoothing is for classifiers; a segmentation model's losses "
                           "are cross_entropy, focal, dice and ce_dice")
        weights = c.class_weights
        if weights == "balanced":
            weights = balanced_weights(self.train_set.pixel_counts())
        elif weights is not None and len(weights) != n:
            raise DlcError(f"{spec.file}: train.class_weights has {len(weights)} values for {n} classes")
        self.class_weights = None if weights is None else np.asarray(weights, np.float32)
        self.seg_loss = SegmentationLoss(c.loss, self.class_weights, self.train_set.ignore_index, c.focal_gamma,
                                         c.dice_weight)
        inp = spec.input
        self.train_loader = SegmentationLoader(self.train_set, c.batch_size, inp.mean, inp.std, c.seed,
                                               spec.data.augment, prefetch=spec.data.prefetch)
        self.val_loader = SegmentationLoader(self.val_set, c.batch_size, inp.mean, inp.std, shuffle=False,
                                             drop_last=False)

    def _auto_anchors(self) -> dict[str, Any]:
        """anchors: auto: k-means (1 − IoU) over the training boxes, smallest anchors to the finest stride."""
        from ..detect.anchors import kmeans_anchors, split_anchors

        node = self.det
        boxes = np.concatenate([b.reshape(-1, 4) for b in self.train_set.boxes])
        wh = boxes[:, 2:] - boxes[:, :2]
        wh = wh[(wh > 0).all(1)]
        scales = len(node.inputs)
        per_scale = node.attrs["anchors_per_scale"]
        if len(wh) < per_scale * scales:
            raise DlcError(f"{self.spec.file}: anchors: auto needs at least {per_scale * scales} training boxes, "
                           f"the data has {len(wh)}; give the anchors explicitly")
        anchors, mean_iou = kmeans_anchors(wh, per_scale * scales, seed=self.cfg.seed)
        split = split_anchors(anchors, scales)
        order = np.argsort([s[0] * s[1] for s in node.attrs["strides"]], kind="stable")
        node.attrs["anchors"] = [None] * scales
        for rank, i in enumerate(order):
            node.attrs["anchors"][i] = [[float(v) for v in a] for a in split[rank]]
        self._say(f"anchors (k-means over {len(wh)} training boxes): {node.attrs['anchors']}, mean best IoU "
                  f"{mean_iou:.3f}")
        return {"anchors": node.attrs["anchors"], "mean_best_iou": float(mean_iou), "boxes": int(len(wh))}

    # --- pieces --------------------------------------------------------------------------------------------
    def _class_weights(self) -> np.ndarray | None:
        w = self.cfg.class_weights
        if w is None:
            return None
        if w == "balanced":
            counts = np.bincount(self.train_set.labels, minlength=self.num_outputs).astype(np.float64)
            return np.where(counts > 0, len(self.train_set) / (self.num_outputs * np.maximum(counts, 1)),
                            0).astype(np.float32)
        if len(w) != self.num_outputs:
            raise DlcError(f"{self.spec.file}: train.class_weights has {len(w)} values for {self.num_outputs} "
                           "classes")
        return np.asarray(w, np.float32)

    def loss(self, logits: np.ndarray, labels: np.ndarray, weighted: bool = True) -> tuple[float, np.ndarray]:
        if self.task == "segmentation":
            return self.seg_loss(logits, labels)
        weights = self.class_weights if weighted else None
        if self.cfg.loss == "focal":
            return _loss.focal_loss(logits, labels, self.cfg.focal_gamma, weights)
        return _loss.softmax_cross_entropy(logits, labels, weights, self.cfg.label_smoothing if weighted else 0.0)

    def detection_loss(self, maps: list[np.ndarray], targets) -> tuple[float, list[np.ndarray]]:
        from ..detect.loss import detection_loss

        node = self.det
        loss, _, grads = detection_loss(maps, targets, anchors_of(node), strides_of(node), node.attrs["classes"],
                                        self.loss_cfg)
        return loss, grads

    def evaluate(self) -> dict[str, Any]:
        if self.det is not None:
            return self._evaluate_detection()
        if self.task == "segmentation":
            return self._evaluate_segmentation()
        losses, preds = [], []
        for x, y in self.val_loader.epoch(0):
            logits = self.executor.forward(x, train=False, outputs=[self.logits])[self.logits]
            loss, _ = self.loss(logits, y, weighted=False)
            losses.append(loss * len(y))
            preds.append(np.argmax(logits, axis=1))
        report = classification_report(self.val_set.labels, np.concatenate(preds), self.val_set.classes)
        return {"val_loss": float(sum(losses) / len(self.val_set)), "val_accuracy": report["accuracy"],
                "val_macro_f1": report["macro_f1"], "per_class": report["per_class"],
                "confusion_matrix": report["confusion_matrix"]}

    def _evaluate_detection(self) -> dict[str, Any]:
        from dlc.runtime.detect import postprocess
        from dlc.runtime.metrics import evaluate_detections

        a, out = self.det.attrs, self.det.outputs[0]
        loss_sum, preds = 0.0, []
        for x, y in self.val_loader.epoch(0):
            values = self.executor.forward(x, train=False, outputs=[*self.heads, out])
            loss, _ = self.detection_loss([values[h] for h in self.heads], y)
            loss_sum += loss * len(y)
            # mAP integrates over the whole precision-recall curve: keep low-confidence boxes (as YOLO's val)
            preds += postprocess(values[out], 0.001, a["iou_threshold"], a["max_detections"], a["class_agnostic"])
        # the val loader keeps the set's order; crowd regions count as neither missed nor false positives
        v = self.val_set
        gts = [(v.boxes[i], v.labels[i], v.crowd(i)) for i in range(len(v))]
        result = evaluate_detections(gts, preds, a["classes"], 0.5, a["conf_threshold"])
        # COCO-style average over IoU 0.50:0.05:0.95 (all-point AP at each threshold; cheap next to the forward)
        map50_95 = np.mean([evaluate_detections(gts, preds, a["classes"], t)["map"] or 0.0
                            for t in np.linspace(0.5, 0.95, 10)])
        return {"val_loss": loss_sum / len(self.val_set), "val_map": float(result["map"] or 0.0),
                "val_map50_95": float(map50_95),
                "val_precision": result["precision"], "val_recall": result["recall"], "val_f1": result["f1"],
                "per_class_ap": result["ap"]}

    def _evaluate_segmentation(self) -> dict[str, Any]:
        from dlc.runtime.segmentation_metrics import confusion_matrix, segmentation_metrics

        n = self.num_outputs
        matrix = np.zeros((n, n), np.int64)
        loss_sum = 0.0
        for x, y in self.val_loader.epoch(0):
            logits = self.executor.forward(x, train=False, outputs=[self.logits])[self.logits]
            loss, _ = self.seg_loss(logits, y)
            loss_sum += loss * len(y)
            matrix += confusion_matrix(np.argmax(logits, axis=1), y, n, self.val_set.ignore_index)
        m = segmentation_metrics(matrix, self.val_set.classes)
        return {"val_loss": loss_sum / len(self.val_set), "val_miou": m["miou"],
                "val_pixel_accuracy": m["pixel_accuracy"], "val_mean_accuracy": m["mean_accuracy"],
                "val_fwiou": m["fwiou"], "val_mdice": m["mdice"], "per_class": m["per_class"],
                "confusion_matrix": matrix.tolist()}

    def _info(self, state: dict[str, Any]) -> dict[str, Any]:
        info = {**{k: state[k] for k in STATE_KEYS}, "yaml_sha256": self.spec.sha256,
                "train_sha256": self.train_sha256, "dlc_version": __version__, "seed": self.cfg.seed,
                "solver_steps": self.solver.steps, "classes": self.train_set.classes,
                "ranks": self.world.size, "global_batch": self.world.size * self.cfg.batch_size}
        if self.det is not None:
            info["anchors"] = {self.det.name: self.det.attrs["anchors"]}
        return info

    def _save(self, state: dict[str, Any], best: dict[str, np.ndarray] | None, name: str = CHECKPOINT,
              stopped: str | None = None) -> None:
        """`stopped` marks the final save of a run (completed, early_stopping, max_iter or interrupted); the
        per-epoch saves have none (training still under way)."""
        if not self.world.is_root:  # rank 0 alone writes (every rank holds the same weights)
            return
        info = self._info(state)
        if stopped is not None:
            info["stopped"] = stopped
        save_checkpoint(self.out_dir / name, self.graph, self.solver.state, info, best)
        if name == CHECKPOINT:
            self._saved_at = (state["epoch"], state["iteration"])

    def _on_sigint(self, signum, frame) -> None:
        if self._saving_interrupt:  # the checkpoint the first Ctrl-C asked for is nearly written: let it finish
            return
        if self._interrupted:  # a second Ctrl-C before the loop saw the first: stop now
            raise KeyboardInterrupt
        self._interrupted = True

    # --- the loop ------------------------------------------------------------------------------------------
    def run(self, resume: bool = False) -> TrainResult:
        c = self.cfg
        state: dict[str, Any] = {"epoch": 0, "iteration": 0, "global_iteration": 0, "history": [],
                                 "best_value": None, "best_epoch": None, "bad_epochs": 0, "partial": None}
        best: dict[str, np.ndarray] | None = None
        if resume and self.world.is_root:
            state, best = self._resume()
        if self.world.distributed:
            state = self._start_together(state)
        if self.world.is_root:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        handler_installed = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, self._on_sigint) if handler_installed else None
        started = time.perf_counter()
        stopped = "completed"
        try:
            with np.errstate(over="ignore", invalid="ignore"):  # a diverging run is caught by the NaN check
                stopped, best = self._loop(state, best)
        except _NonFinite as exc:  # every rank raises it at the same iteration (the flag rides in the allreduce)
            self._write_reports(state, "diverged", reason=str(exc))
            self.world.barrier("stop after a non-finite loss")  # rank 0's reports are written before anyone exits
            raise TrainingDiverged(f"{exc}; training stopped and {self._kept_checkpoint()}; "
                                   f"{self.out_dir / 'metrics.json'} holds the history so far. Try a lower base_lr, "
                                   "warm-up or clip_grad_norm") from None
        finally:
            if handler_installed:
                signal.signal(signal.SIGINT, previous)
        if stopped != "interrupted":
            if c.early_stopping and c.early_stopping.restore_best and best is not None:
                load_params_into(self.graph, best, "best weights")
            self._save(state, best, stopped=stopped)
            self._write_reports(state, stopped)
        return TrainResult(self.out_dir, state["history"], stopped, state["best_epoch"],
                           time.perf_counter() - started, self.train_set.classes, self._transfer_summary())

    def _start_together(self, state: dict[str, Any]) -> dict[str, Any]:
        """Every rank starts from rank 0's weights, optimizer state and training state (its fillers, init_from,
        or the checkpoint --resume read there): the other ranks never read the output folder."""
        w = self.world
        shared = w.broadcast_json({"state": state, "solver_steps": self.solver.steps,
                                   "anchors": self.det.attrs["anchors"] if self.det is not None else None},
                                  "broadcast of rank 0's training state")
        self.solver.steps = shared["solver_steps"]
        if self.det is not None:
            self.det.attrs["anchors"] = shared["anchors"]
        tensors = graph_tensors(self.graph)
        w.broadcast_arrays_([tensors[k] for k in sorted(tensors)] +
                            [self.solver.state[k] for k in sorted(self.solver.state)],
                            "broadcast of rank 0's weights")
        return shared["state"]

    def _allreduce(self, grads: dict[str, np.ndarray], loss: float, correct: int, bad: bool, stop: bool):
        """One allreduce per step: the averaged gradients, mean loss and the global batch's correct count, and
        whether any rank saw NaN/inf or Ctrl-C."""
        if self._grad_buffer is None:
            self._grad_buffer = GradientBuffer({k: p for k, p in self.solver.params.items()
                                                if self.solver.lr_mult[k] != 0})
        buf = self._grad_buffer
        buf.pack(grads, loss, correct, bad, stop)
        self.world.allreduce_mean_(buf.flat)
        return buf.unpack(self.world.size)

    def _average_running_stats(self) -> None:
        """Per-rank batch norm leaves each rank its own running statistics: average them once an epoch, so
        validation and the checkpoint see one model (a no-op with sync_bn, where they agree already)."""
        stats = [n.params[t] for n in self.graph.nodes() if n.op == "batchnorm" for t in ("mean", "var")]
        if not stats:
            return
        flat = np.concatenate([a.ravel() for a in stats]).astype(np.float32)
        self.world.allreduce_mean_(flat, "average of batch-norm running statistics")
        offset = 0
        for a in stats:
            a[...] = flat[offset:offset + a.size].reshape(a.shape)
            offset += a.size

    def _count_unreadable(self, record: dict[str, Any]) -> None:
        """data.on_bad_image: skip: the training images left out so far (every rank's), in the epoch's record and
        one line, so a long run never loses images silently."""
        images = self.train_set.images
        if not isinstance(images, LazyImages) or images.on_bad != "skip":
            return
        bad = images.bad_files()
        total = int(self.world.allreduce_sum(np.array([len(bad)]), "count of unreadable images")[0])
        record["unreadable_images"] = total
        if total:
            first = f" (e.g. {bad[0]})" if bad else ""
            self._say(f"note: {total} unreadable training image(s) skipped so far{first}")

    def _transfer_summary(self) -> dict[str, Any] | None:
        """What init_from moved (train/transfer.py's report) and which layers stayed frozen."""
        if self.transfer_report is None:
            return None
        return {**self.transfer_report, "frozen": sorted(self.frozen)}

    def _kept_checkpoint(self) -> str:
        """What a stop leaves on disk, in words that never claim a checkpoint that is not there."""
        path = self.out_dir / CHECKPOINT
        if self._saved_at is not None and path.is_file():
            epoch, iteration = self._saved_at
            where = f"after epoch {epoch}" + (f", iteration {iteration} of the next" if iteration else "")
            return f"the last good checkpoint ({where}) is kept in {path}"
        if path.is_file():
            return f"{path} (from an earlier run) is left as it was"
        return "no checkpoint was written (it diverged before the first epoch ended)"

    def _resume(self) -> tuple[dict[str, Any], dict[str, np.ndarray] | None]:
        path = self.out_dir / CHECKPOINT
        if not path.exists():
            raise DlcError(f"no checkpoint in {self.out_dir} yet; run without --resume to start training")
        params, solver_state, best, info = read_checkpoint(path)
        info = self._rebatch(info, path)
        scores = {"detection": ("val_map",), "segmentation": ("val_miou",),
                  "classification": ("train_accuracy", "val_accuracy")}[self.task]
        validate_resume_info(info, path, self.epochs, self.iters_per_epoch, self.total_iters, bool(self.cfg.max_iter),
                             record_keys=("train_loss", "val_loss", "lr", "seconds", "images_per_s", *scores))
        if info["yaml_sha256"] != self.spec.sha256:
            raise DlcError(f"{path}: the checkpoint was made from a different version of {self.spec.file}; "
                           "resuming needs the same YAML (train into a new folder instead)")
        if "tensors_sha256" not in info:
            self._say(f"note: {path} has no tensor checksum (written by an older dlc); resuming without checking it")
        load_params_into(self.graph, params, str(path))
        check_solver_state(self.solver.state, solver_state, path)
        if best:  # early stopping's best weights must fit the model as well
            shapes = {k: v.shape for k, v in graph_tensors(self.graph).items()}
            wrong = [k for k, v in best.items() if shapes.get(k) != v.shape] or sorted(set(shapes) - set(best))
            if wrong:
                raise DlcError(f"{path}: the checkpoint's best weights do not fit this model ('{short(wrong[0])}')")
        # Re-bind the solver to the graph's fresh arrays and restore its buffers.
        for key in list(self.solver.params):
            node, tensor = key.rsplit(".", 1)
            self.solver.params[key] = self.graph.node(node).params[tensor]
        for key, value in solver_state.items():
            self.solver.state[key][...] = value
        self.solver.steps = info["solver_steps"]
        restore_anchors(self.graph, info)
        self._saved_at = (info["epoch"], info["iteration"])  # the resumed checkpoint: this run's last good state
        return {k: info[k] for k in STATE_KEYS}, (best or None)

    def _rebatch(self, info: dict[str, Any], path: Path) -> dict[str, Any]:
        """A checkpoint from another number of ranks has another global batch: keep its place in the epoch (the
        samples it has seen) and count the iterations in the new global batches; the epoch's order is the same."""
        old, new = info.get("global_batch", self.cfg.batch_size), self.world.size * self.cfg.batch_size
        counts = [info.get(k) for k in ("epoch", "iteration", "global_iteration")] + [old]
        if old == new or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in counts) or not old:
            return info  # the same run shape, or a damaged checkpoint (validate_resume_info names the key)
        iteration = info["iteration"] * old // new
        moved = info["global_iteration"] * old // new if self.cfg.max_iter else (
            info["epoch"] * self.iters_per_epoch + iteration)
        self._say(f"note: {path} was written with {info.get('ranks', 1)} rank(s) × batch {self.cfg.batch_size}; "
                  f"continuing with {self.world.size}: global batch {old} → {new}, iteration {info['iteration']} of "
                  f"epoch {info['epoch'] + 1} → {iteration}")
        return {**info, "iteration": iteration, "global_iteration": moved}

    def _loop(self, state: dict[str, Any], best: dict[str, np.ndarray] | None) -> tuple[str, Any]:
        c, w = self.cfg, self.world
        bar = self._progress_bar()
        try:
            while state["epoch"] < self.epochs:
                epoch = state["epoch"]
                partial = state["partial"] or {"loss_sum": 0.0, "correct": 0, "seen": 0, "seconds": 0.0}
                task = bar.add_task(f"epoch {epoch + 1}/{self.epochs}", total=self.iters_per_epoch,
                                    completed=state["iteration"], loss=float("nan"), lr=0.0, ips=0.0) if bar else None
                t0 = time.perf_counter()
                for x, y in self.train_loader.epoch(epoch, state["iteration"]):
                    i, g = state["iteration"], state["global_iteration"]
                    lr = self.schedule(g)
                    rng = np.random.default_rng([c.seed, epoch, i, 2] + ([w.rank] if w.distributed else []))
                    empty = len(y) == 0  # every image of the batch was unreadable (on_bad_image: skip)
                    if empty:
                        loss, finite, seeds = 0.0, True, None
                    elif self.det is not None:
                        values = self.executor.forward(x, train=True, rng=rng, outputs=self.heads)
                        maps = [values[h] for h in self.heads]
                        loss, dmaps = self.detection_loss(maps, y)
                        finite = all(np.all(np.isfinite(m)) for m in maps)
                        seeds = dict(zip(self.heads, dmaps))
                    else:  # classification, segmentation
                        logits = self.executor.forward(x, train=True, rng=rng, outputs=[self.logits])[self.logits]
                        loss, dlogits = self.loss(logits, y)
                        finite = bool(np.all(np.isfinite(logits)))
                        seeds = {self.logits: dlogits}
                    bad = not np.isfinite(loss) or not finite
                    if bad and not w.distributed:
                        raise _NonFinite(f"the loss became {loss} at epoch {epoch + 1}, iteration {i + 1} "
                                         f"(global {g + 1})")
                    grads = self.executor.backward(seeds) if not bad and not empty else {}
                    flat = {f"{n}.{t}": gr for n, d in grads.items() for t, gr in d.items()}
                    correct = (int((np.argmax(logits, axis=1) == y).sum())
                               if self.task == "classification" and not empty else 0)
                    seen, stop = len(y), self._interrupted
                    if w.distributed:  # the gradients, loss and flags of the whole global batch
                        flat, loss, correct, bad, stop = self._allreduce(flat, loss, correct, bad, stop)
                        seen *= w.size
                        if bad:
                            raise _NonFinite(f"the loss became NaN or inf on at least one of the {w.size} ranks at "
                                             f"epoch {epoch + 1}, iteration {i + 1} (global {g + 1})")
                    if not empty or w.distributed:  # (a rank's empty batch still joins the average, as zeros)
                        self.solver.step(flat, lr)
                    for cb in self.callbacks:
                        if hasattr(cb, "on_step"):
                            cb.on_step(self, state["global_iteration"])
                    partial["loss_sum"] += loss * seen
                    partial["correct"] += correct
                    partial["seen"] += seen
                    state["iteration"] += 1
                    state["global_iteration"] += 1
                    elapsed = partial["seconds"] + time.perf_counter() - t0
                    if bar:
                        bar.update(task, advance=1, loss=partial["loss_sum"] / partial["seen"], lr=lr,
                                   ips=partial["seen"] / max(elapsed, 1e-9))
                    if stop if w.distributed else self._interrupted:  # every rank, or Ctrl-C seen up to now
                        self._saving_interrupt = True  # from here to the CLI's exit, more Ctrl-C are ignored
                        partial["seconds"] = elapsed
                        state["partial"] = partial
                        self._save(state, best, stopped="interrupted")
                        return "interrupted", best
                    if state["global_iteration"] >= self.total_iters:
                        break
                partial["seconds"] += time.perf_counter() - t0
                if w.distributed:
                    self._average_running_stats()
                record = {"epoch": epoch + 1, "train_loss": partial["loss_sum"] / max(partial["seen"], 1)}
                if self.task == "classification":
                    record["train_accuracy"] = partial["correct"] / max(partial["seen"], 1)
                self._count_unreadable(record)
                record.update({**self.evaluate(), "lr": self.schedule(max(state["global_iteration"] - 1, 0)),
                               "images_per_s": partial["seen"] / max(partial["seconds"], 1e-9),
                               "seconds": partial["seconds"]})
                state["history"].append(record)
                state["epoch"] += 1
                state["iteration"] = 0
                state["partial"] = None
                if bar:
                    bar.remove_task(task)
                label = {"detection": "val mAP@0.5", "segmentation": "val mIoU", "classification": "val acc"}
                score = f"{label[self.task]} {record[SCORE[self.task]]:.4f}"
                self._say(f"epoch {epoch + 1:3d}  train loss {record['train_loss']:.4f}  val loss "
                          f"{record['val_loss']:.4f}  {score}  lr {record['lr']:.3g}  "
                          f"{record['images_per_s']:.0f} img/s")
                for cb in self.callbacks:
                    if hasattr(cb, "on_epoch_end"):
                        cb.on_epoch_end(self, epoch)
                best, stop = self._early_stopping(state, record, best)
                if w.distributed:  # rank 0 decides, so no rounding difference can split the ranks
                    stop = w.broadcast_json(stop, "early-stopping decision")
                self._save(state, best)
                if c.snapshot_every and state["epoch"] % c.snapshot_every == 0:
                    self._save(state, best, f"snapshots/epoch_{state['epoch']:04d}.safetensors")
                if stop:
                    return "early_stopping", best
                if state["global_iteration"] >= self.total_iters and c.max_iter:
                    return "max_iter", best
            return "completed", best
        finally:
            if bar:
                bar.stop()

    def _early_stopping(self, state, record, best):
        es = self.cfg.early_stopping
        if es is None:
            return best, False
        value = record[es.monitor]
        prev = state["best_value"]
        improved = prev is None or (value < prev - es.min_delta if es.mode == "min" else value > prev + es.min_delta)
        if improved:
            state["best_value"], state["best_epoch"], state["bad_epochs"] = value, record["epoch"], 0
            best = {k: v.copy() for k, v in graph_tensors(self.graph).items()} if es.restore_best else None
            return best, False
        state["bad_epochs"] += 1
        return best, state["bad_epochs"] >= es.patience

    def _write_reports(self, state: dict[str, Any], stopped: str, reason: str | None = None) -> None:
        """metrics.json and curves.png; also after a NaN stop (stopped: diverged, with the reason). Rank 0 only."""
        if not self.world.is_root:
            return
        history = state["history"]
        report = {
            "model": self.spec.name, "stopped": stopped, "best_epoch": state["best_epoch"],
            **({"stop_reason": reason} if reason else {}),
            "classes": self.train_set.classes, "train_samples": len(self.train_set),
            "val_samples": len(self.val_set), "epochs": history,
            **({"transfer": self._transfer_summary()} if self.transfer_report is not None else {}),
        }
        if self.det is not None:
            report.update(task="detection", anchors=self.det.attrs["anchors"], anchor_fit=self.anchor_fit)
        if self.world.distributed:  # what data parallelism cost: the gradient allreduce, waiting included
            w, buf = self.world, self._grad_buffer
            report["distributed"] = {
                "ranks": w.size, "global_batch": w.size * self.cfg.batch_size, "sync_bn": self.cfg.sync_bn,
                "scale_lr": self.cfg.scale_lr, "allreduce_calls": w.allreduce_calls,
                "allreduce_seconds": w.allreduce_seconds,
                "allreduce_ms_per_step": 1e3 * w.allreduce_seconds / max(w.allreduce_calls, 1),
                "bytes_per_step": 4 * (buf.flat.size if buf is not None else 0)}
        if self.task == "segmentation":
            report.update(task="segmentation", ignore_index=self.train_set.ignore_index,
                          class_weights=None if self.class_weights is None else self.class_weights.tolist())
        write_json(self.out_dir / "metrics.json", report)
        if history:
            score = SCORE[self.task]
            curves = history if self.task == "classification" else [
                {**h, "train_accuracy": float("nan"), "val_accuracy": h[score]} for h in history]
            plot_curves(curves, self.out_dir / "curves.png", f"{self.spec.name}: training curves",
                        metric={"classification": "accuracy", "detection": "mAP@0.5",
                                "segmentation": "mIoU"}[self.task])

    def _say(self, text: str) -> None:
        if self.progress and self.console is not None:
            self.console.print(text, highlight=False)

    def _progress_bar(self):
        if not self.progress or self.console is None:
            return None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                       TextColumn("loss {task.fields[loss]:.4f}  lr {task.fields[lr]:.3g}  {task.fields[ips]:.0f} img/s"),
                       TimeRemainingColumn(), console=self.console, transient=True)
        bar.start()
        return bar


SCORE = {"classification": "val_accuracy", "detection": "val_map", "segmentation": "val_miou"}
MODEL_NOUN = {"classification": "classifier", "detection": "detector", "segmentation": "segmentation model"}


def _logits_of(graph, out: str) -> str:
    """A final softmax is folded into the loss (fused softmax + cross-entropy), so training reads its input."""
    producer = graph.producer(out)
    return producer.inputs[0] if producer is not None and producer.op == "softmax" else out


def restore_anchors(graph, info: dict[str, Any]) -> None:
    """Put the anchors a checkpoint recorded (anchors: auto, found at training start) back into the detect
    layers, so a resumed run, --weights and export use the ones the weights were trained with."""
    for name, anchors in (info.get("anchors") or {}).items():
        if name in graph.nx and anchors is not None:
            graph.node(name).attrs["anchors"] = anchors


def reuse_checkpoint(loaded: LoadedModel, out_dir: str | Path, console=None, callbacks=()) -> dict[str, Any] | None:
    """`dlc compile` without --retrain: when out_dir holds a checkpoint of a finished run whose training
    fingerprint matches this model's, load its weights (and anchors) into the graph and return the training
    summary (with 'classes' and 'reused'); otherwise say why it cannot be reused (when there is one) and
    return None, and the caller trains."""
    path = Path(out_dir) / CHECKPOINT
    if not path.is_file():
        return None

    def say(text: str) -> None:
        if console is not None:
            console.print(text, highlight=False)

    try:
        params, _, _, info = read_checkpoint(path)
    except DlcError as exc:
        say(f"note: {exc}; training again")
        return None
    fingerprint = training_fingerprint(loaded, None, callbacks)
    if info.get("train_sha256") != fingerprint:
        why = ("it records no training fingerprint (written by an older dlc)" if "train_sha256" not in info else
               "the model, data: or train: section (or the dlc version) changed since it was made")
        say(f"note: {path} is stale ({why}); training again")
        return None
    if info.get("stopped") not in FINISHED:
        say(f"note: {path} holds an unfinished run; training again from the start (to continue it instead: "
            f"dlc train {loaded.spec.file} -o {out_dir} --resume)")
        return None
    history = info.get("history") if isinstance(info.get("history"), list) else []
    final = history[-1] if history and isinstance(history[-1], dict) else {}
    load_params_into(loaded.graph, params, str(path))
    restore_anchors(loaded.graph, info)
    say(f"reusing the trained weights in {path} (training section unchanged); pass --retrain to train again")
    seconds = sum(h["seconds"] for h in history if isinstance(h, dict) and isinstance(h.get("seconds"), (int, float)))
    return {"reused": str(path), "stopped": info["stopped"], "epochs": len(history), "seconds": float(seconds),
            "best_epoch": info.get("best_epoch"), "classes": info.get("classes"),
            **{k: final.get(k) for k in ("train_loss", "val_loss", "val_accuracy", "val_map", "val_miou")
               if k in final}}


def train_model(loaded: LoadedModel, out_dir: str | Path, resume: bool = False, progress: bool = True,
                console=None, config: TrainConfig | None = None, callbacks=(), world: World | None = None
                ) -> TrainResult:
    return Trainer(loaded, out_dir, progress, console, config, callbacks, world).run(resume=resume)


def dumps(result: TrainResult) -> str:
    return json.dumps({"out_dir": str(result.out_dir), "stopped": result.stopped, "best_epoch": result.best_epoch,
                       "seconds": result.seconds, "final": result.final})
