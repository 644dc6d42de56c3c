"""The `train:` and `data:` sections, checked value by value into typed settings.

Structure (unknown keys, types) is checked in sections.py with the rest of the file; this adds the value
rules (choices, ranges) and the defaults, each problem with its YAML line.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field
from typing import Any

from ..data.augment import AugmentConfig
from ..data.datasets import DATASETS
from ..data.lazy import DEFAULT_CACHE_MB, LOAD_MODES, ON_BAD
from ..data.synthetic import DIFFICULTIES
from ..errors import Diagnostic, did_you_mean
from ..yaml_loader import LDict
from .schedule import POLICIES
from .solver import SOLVERS, SolverConfig
from .transfer import TransferConfig, parse_transfer

LOSSES = ("cross_entropy", "focal", "dice", "ce_dice")  # dice, ce_dice: segmentation models only
# val_map: detectors (mAP@0.5); val_miou: segmentation models
MONITORS = ("val_loss", "val_accuracy", "train_loss", "val_map", "val_miou")


@dataclass
class EarlyStopping:
    monitor: str = "val_loss"
    patience: int = 5
    min_delta: float = 0.0
    restore_best: bool = True

    @property
    def mode(self) -> str:
        return "max" if self.monitor.endswith(("accuracy", "_map", "_miou")) else "min"


@dataclass
class TrainConfig:
    solver: SolverConfig = field(default_factory=SolverConfig)
    base_lr: float = 0.01
    lr_policy: str = "fixed"
    gamma: float = 0.1
    step_size: float = 10.0
    steps: list[float] = field(default_factory=list)
    power: float = 1.0
    warmup_epochs: float = 0.0
    warmup_iterations: int = 0
    warmup_start_factor: float = 0.1
    batch_size: int = 64
    epochs: int = 10
    max_iter: int | None = None
    early_stopping: EarlyStopping | None = None
    seed: int = 0
    snapshot_every: int = 0
    loss: str = "cross_entropy"
    focal_gamma: float = 2.0
    dice_weight: float = 1.0  # ce_dice: cross_entropy + dice_weight · dice
    class_weights: list[float] | str | None = None
    label_smoothing: float = 0.0
    layer_rules: list[tuple[str, float, bool]] = field(default_factory=list)  # (pattern, lr_mult, freeze)
    transfer: TransferConfig = field(default_factory=TransferConfig)  # init_from, freeze, reinit, ...
    # data-parallel training (mpirun -n K): batch_size is per rank, base_lr is for the global batch unless scaled
    scale_lr: bool = False  # multiply base_lr by the number of ranks (linear scaling rule)
    sync_bn: bool = False  # batch-norm statistics over every rank's batch (else each rank's own)

    def lr_mult_for(self, layer: str) -> float:
        """The multiplier of the last rule whose pattern matches the layer name (0 when frozen)."""
        mult = 1.0
        for pattern, m, frozen in self.layer_rules:
            if fnmatch.fnmatchcase(layer, pattern):
                mult = 0.0 if frozen else m
        return mult


@dataclass
class DataConfig:
    raw: dict[str, Any]
    augment: AugmentConfig
    prefetch: int = 2


# Bounds far beyond any real run that keep schedules and loops finite (a 1e18-epoch warm-up is a typo).
MAX_EPOCHS = 1_000_000
MAX_ITERATIONS = 10**12
MAX_BATCH = 1 << 20


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


class _Checker:
    def __init__(self, file: str, section: str, mapping: LDict):
        self.file, self.section, self.m = file, section, mapping
        self.diags: list[Diagnostic] = []

    def line(self, key: str, within: LDict | None = None) -> int | None:
        m = within if within is not None else self.m
        return m.line_of(key) if isinstance(m, LDict) else None

    def error(self, message: str, key: str, within: LDict | None = None, hint: str | None = None) -> None:
        self.diags.append(Diagnostic(message, file=self.file, line=self.line(key, within), hint=hint))

    def number(self, key: str, default: float, lo: float | None = None, hi: float | None = None,
               within: LDict | None = None, integer: bool = False, path: str | None = None) -> Any:
        m = within if within is not None else self.m
        value = m.get(key, default)
        if value is None:
            return default
        ok = isinstance(value, int if integer else (int, float)) and not isinstance(value, bool)
        # NaN passes every `<`/`>` test and inf passes `>= lo`: neither is a setting anyone means
        if ok and not math.isfinite(value):
            ok = False
        if ok and lo is not None and value < lo:
            ok = False
        if ok and hi is not None and value > hi:
            ok = False
        if not ok:
            rng = f" in [{lo:g}, {hi:g}]" if lo is not None and hi is not None else (f" >= {lo:g}" if lo is not None else "")
            kind = "an integer" if integer else "a finite number"
            self.error(f"'{self.section}.{path or key}' must be {kind}{rng}, got {value!r}", key, within)
            return default
        return value

    def choice(self, key: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.m.get(key, default)
        if value not in choices:
            self.error(f"'{self.section}.{key}' must be one of {', '.join(choices)}, got {value!r}", key,
                       hint=did_you_mean(str(value), choices))
            return default
        return value


def parse_train(section: LDict, file: str, layer_names: list[str]) -> tuple[TrainConfig, list[Diagnostic]]:
    c = _Checker(file, "train", section)
    t = TrainConfig()
    solver = SolverConfig(
        solver=c.choice("solver", "sgd", SOLVERS),
        momentum=c.number("momentum", 0.9, 0.0, 1.0),
        nesterov=bool(section.get("nesterov", False)),
        eps=c.number("eps", 1e-8, 0.0),
        weight_decay=c.number("weight_decay", 0.0, 0.0),
        l1=c.number("l1", 0.0, 0.0),
        clip_grad_norm=c.number("clip_grad_norm", None, 0.0) if "clip_grad_norm" in section else None,
    )
    betas = section.get("betas", [0.9, 0.999])
    if not (isinstance(betas, list) and len(betas) == 2
            and all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in betas)):
        c.error(f"'train.betas' must be two numbers in [0, 1), got {betas!r}", "betas")
    else:
        solver.betas = (float(betas[0]), float(betas[1]))
    t.solver = solver
    if "lr" in section and "base_lr" in section:
        c.error("give 'base_lr' or 'lr', not both", "lr")
    t.base_lr = c.number("base_lr" if "base_lr" in section else "lr", 0.01, 0.0)
    t.lr_policy = c.choice("lr_policy", "fixed", POLICIES)
    t.gamma = c.number("gamma", 0.1, 0.0)
    t.step_size = c.number("step_size", 10.0, 1e-9, MAX_EPOCHS)
    steps = section.get("steps", [])
    if not isinstance(steps, list) or not all(_finite(s) and 0 <= s <= MAX_EPOCHS for s in steps):
        c.error(f"'train.steps' must be a list of epochs, got {steps!r}", "steps")
    else:
        t.steps = sorted(float(s) for s in steps)
    if t.lr_policy == "multistep" and not t.steps:
        c.error("lr_policy multistep needs 'steps' (the epochs at which the rate is multiplied by gamma)",
                "lr_policy")
    t.power = c.number("power", 1.0, 0.0)
    warmup = section.get("warmup")
    if isinstance(warmup, dict):
        if "epochs" in warmup and "iterations" in warmup:
            c.error("warm-up takes 'epochs' or 'iterations', not both", "warmup")
        t.warmup_epochs = c.number("epochs", 0.0, 0.0, MAX_EPOCHS, path="warmup.epochs", within=warmup)
        t.warmup_iterations = c.number("iterations", 0, 0, MAX_ITERATIONS, path="warmup.iterations", within=warmup,
                                       integer=True)
        t.warmup_start_factor = c.number("start_factor", 0.1, 0.0, 1.0, path="warmup.start_factor",
                                         within=warmup)
        if warmup.get("type", "linear") != "linear":
            c.error(f"warm-up type must be linear, got {warmup.get('type')!r}", "type", warmup)
    t.batch_size = c.number("batch_size", 64, 1, MAX_BATCH, integer=True)
    t.epochs = c.number("epochs", 10, 1, MAX_EPOCHS, integer=True)
    t.max_iter = c.number("max_iter", None, 1, MAX_ITERATIONS, integer=True) if "max_iter" in section else None
    t.seed = c.number("seed", 0, 0, 2**32 - 1, integer=True)
    t.snapshot_every = c.number("snapshot_every", 0, 0, MAX_EPOCHS, integer=True)
    t.loss = c.choice("loss", "cross_entropy", LOSSES)
    t.focal_gamma = c.number("focal_gamma", 2.0, 0.0)
    t.dice_weight = c.number("dice_weight", 1.0, 0.0, 100.0)
    t.label_smoothing = c.number("label_smoothing", 0.0, 0.0, 0.999)
    weights = section.get("class_weights")
    if weights is not None:
        if weights == "balanced" or (isinstance(weights, list) and weights
                                     and all(_finite(w) and w >= 0 for w in weights)):
            t.class_weights = weights
        else:
            c.error(f"'train.class_weights' must be 'balanced' or a list of non-negative numbers, got {weights!r}",
                    "class_weights")
    es = section.get("early_stopping")
    if isinstance(es, dict):
        monitor = es.get("monitor", "val_loss")
        if monitor not in MONITORS:
            c.error(f"early_stopping.monitor must be one of {', '.join(MONITORS)}, got {monitor!r}", "monitor", es,
                    did_you_mean(str(monitor), MONITORS))
            monitor = "val_loss"
        t.early_stopping = EarlyStopping(
            monitor=monitor,
            patience=c.number("patience", 5, 1, MAX_EPOCHS, path="early_stopping.patience", within=es, integer=True),
            min_delta=c.number("min_delta", 0.0, 0.0, path="early_stopping.min_delta", within=es),
            restore_best=bool(es.get("restore_best", True)))
    rules = section.get("layers", {})
    if not isinstance(rules, dict):
        c.error("'train.layers' maps layer names (or patterns like 'stage1*') to {lr_mult, freeze}", "layers")
    else:
        for pattern, rule in rules.items():
            if not isinstance(rule, dict) or set(rule) - {"lr_mult", "freeze"}:
                c.error(f"'train.layers.{pattern}' takes lr_mult (number) and freeze (true/false)", pattern, rules)
                continue
            if not any(fnmatch.fnmatchcase(n, str(pattern)) for n in layer_names):
                c.error(f"'train.layers.{pattern}' matches no layer", pattern, rules,
                        did_you_mean(str(pattern), layer_names))
            mult = c.number("lr_mult", 1.0, 0.0, path="layers.<pattern>.lr_mult", within=rule)
            t.layer_rules.append((str(pattern), float(mult), bool(rule.get("freeze", False))))
    t.transfer = parse_transfer(section, c, layer_names)
    t.scale_lr = section.get("scale_lr") is True  # (types are checked with the file's structure)
    t.sync_bn = section.get("sync_bn") is True
    return t, c.diags


def parse_data(section: LDict, file: str) -> tuple[DataConfig | None, list[Diagnostic]]:
    c = _Checker(file, "data", section)
    if "dataset" not in section:
        c.error(f"'data.dataset' is missing: one of {', '.join(DATASETS)}", "dataset")
        return None, c.diags
    c.choice("dataset", "synthetic", DATASETS)
    if section.get("dataset") == "imagefolder" and not section.get("root"):
        c.error("dataset imagefolder needs 'root': a folder with one sub-folder of images per class", "dataset")
    c.number("val_fraction", 0.2, 0.0, 0.9)
    c.number("samples", 2000, 10, 10_000_000, integer=True)
    if "num_classes" in section:  # a detection set may have a single class; a segmentation set counts background
        kind = section.get("dataset")
        c.number("num_classes", 2, 1 if kind == "synthetic_detection" else 2,
                 13 if kind == "synthetic_segmentation" else 12, integer=True)
    _check_detection_data(c, section)
    aug = section.get("augment") or {}
    crop = aug.get("crop", 0) if isinstance(aug, dict) else 0
    if crop is True:
        crop = 4
    if crop is False:
        crop = 0
    augment = AugmentConfig(
        mirror=bool(aug.get("mirror", False)) if isinstance(aug, dict) else False,
        crop_pad=int(crop) if isinstance(crop, int) and crop >= 0 else 0,
        pca_color=(float(c.number("pca_color", 0.0, 0.0, 10.0, path="augment.pca_color", within=aug))
                   if isinstance(aug, dict) else 0.0),
    )
    if not isinstance(crop, int) or crop < 0 or crop > 4096:
        c.error(f"'data.augment.crop' is the padding of a random crop in pixels (e.g. 4), got {crop!r}", "augment")
    prefetch = c.number("prefetch", 2, 1, 64, integer=True)
    if "load" in section:
        c.choice("load", "auto", LOAD_MODES)
    if "on_bad_image" in section:
        c.choice("on_bad_image", "error", ON_BAD)
    if "difficulty" in section:
        c.choice("difficulty", "easy", DIFFICULTIES)
    c.number("cache_mb", DEFAULT_CACHE_MB, 0, 1 << 20)
    return DataConfig(dict(section), augment, prefetch), c.diags


_DETECTION_KEYS = {"images": ("coco",), "annotations": ("coco",), "val_images": ("coco",),
                   "val_annotations": ("coco",), "max_objects": ("synthetic_detection", "synthetic_segmentation")}


def _check_detection_data(c: _Checker, section: LDict) -> None:
    """Value rules of the detection sets' keys (coco, yolo, synthetic_detection)."""
    kind = section.get("dataset")
    for key, kinds in _DETECTION_KEYS.items():
        if key in section and kind not in kinds:
            c.error(f"'data.{key}' is only used by dataset {' / '.join(kinds)}, not {kind!r}", key)
    if kind == "coco":
        for key in ("images", "annotations"):
            if not section.get(key):
                c.error(f"dataset coco needs '{key}': the images folder and the COCO instances JSON file, "
                        f"relative to this file", "dataset")
        if "val_images" in section and "val_annotations" not in section:
            c.error("'data.val_images' needs 'val_annotations' (the validation instances JSON file)", "val_images")
    if kind == "yolo":
        if not section.get("root"):
            c.error("dataset yolo needs 'root': a folder with images/ and labels/ (or images/train, images/val)",
                    "dataset")
        if "classes" not in section:
            c.error("dataset yolo needs 'classes': a list of class names or a file with one name per line",
                    "dataset")
    classes = section.get("classes")
    if classes is not None:
        names_ok = isinstance(classes, list) and classes and all(isinstance(n, str) and n for n in classes)
        if names_ok and len(set(classes)) != len(classes):
            c.error(f"'data.classes' has repeated names: {classes!r}", "classes")
        elif not (names_ok or (kind in ("yolo", "segmentation") and isinstance(classes, str) and classes)):
            what = ("a list of class names or a names file" if kind in ("yolo", "segmentation")
                    else "a list of class names")
            c.error(f"'data.classes' must be {what}, got {classes!r}", "classes")
    if "max_objects" in section:
        c.number("max_objects", 4, 1, 64, integer=True)
    if kind == "segmentation" and not section.get("root"):
        c.error("dataset segmentation needs 'root': a folder with images/ and masks/ (same file stems), or "
                "images/train, images/val beside masks/train, masks/val", "dataset")
    if "ignore_index" in section:
        c.number("ignore_index", 255, 0, 255, integer=True)
