"""Structure of the YAML sections other than `model`: data, train, prune, optimize, export.

Each section is checked key by key now (unknown keys get a "did you mean"), even where the feature behind it
is not built yet; such a section is then refused with a clear "not supported yet", never silently ignored.
A schema maps each key to a type name ('int', 'float', 'number', 'bool', 'str', 'list', 'any') or to a nested
schema (a dict).
"""

from __future__ import annotations

from typing import Any

from .errors import Diagnostic, did_you_mean
from .yaml_loader import LDict

_WARMUP = {"epochs": "number", "iterations": "int", "start_factor": "float", "type": "str"}
_AUGMENT = {"mirror": "any", "crop": "any", "pca_color": "any"}
_EARLY_STOP = {"monitor": "str", "patience": "int", "min_delta": "float", "mode": "str", "restore_best": "bool"}

SCHEMAS: dict[str, dict[str, Any]] = {
    "data": {
        "dataset": "str", "root": "str", "val_fraction": "float", "num_classes": "int",
        "samples": "int", "seed": "int", "augment": _AUGMENT, "prefetch": "int", "classes": "any",
        "difficulty": "str",  # synthetic: easy (one large clear shape) or hard (small, low contrast, clutter)
        # detection sets: coco (images folder + instances JSON), synthetic_detection (max_objects)
        "images": "str", "annotations": "str", "val_images": "str", "val_annotations": "str",
        "max_objects": "int",
        # segmentation sets (data/segmentation.py)
        "ignore_index": "int", "palette": "list",
        # sets read from files (data/lazy.py): decoded up front or per batch, and what an unreadable file does
        "load": "str", "cache_mb": "number", "on_bad_image": "str",
    },
    "train": {
        "solver": "str", "base_lr": "float", "lr": "float", "momentum": "float", "nesterov": "bool",
        "betas": "list", "weight_decay": "float", "l1": "float", "lr_policy": "str", "gamma": "float",
        "step_size": "number", "steps": "list", "power": "float", "warmup": _WARMUP, "batch_size": "int",
        "epochs": "int", "max_iter": "int", "early_stopping": _EARLY_STOP, "clip_grad_norm": "float",
        "seed": "int", "snapshot_every": "int", "loss": "str", "class_weights": "any", "focal_gamma": "float",
        "dice_weight": "float",
        "layers": "any", "eps": "float", "label_smoothing": "float",
        # transfer learning (train/transfer.py)
        "init_from": "str", "strict": "bool", "reinit": "any", "freeze": "any", "transfer": "any",
        "cache_features": "bool",
        # data-parallel training over MPI (train/distributed.py)
        "scale_lr": "bool", "sync_bn": "bool",
    },
    "prune": {
        "method": "str", "importance": "str", "amount": "float", "scope": "str", "layers": "any",
        "exclude": "list", "round_to": "any", "steps": "int", "fine_tune": "any", "schedule": "str",
        "bn_l1": "float", "target": "any",
    },
    "optimize": {"passes": "list", "check": "int", "rtol": "float", "atol": "float"},
    "export": {
        "opset": "int", "dynamic_batch": "bool", "filename": "str", "target": "any", "dynamic": "any",
        "precision": "str", "calibration": {"samples": "int", "method": "str", "percentile": "float"},
        "max_accuracy_drop": "float", "keep_io_types": "bool", "force": "bool",
        "embed_nms": "bool", "max_detections": "int", "layout": "str", "embed_argmax": "any",
    },
}

# Keys that look plausible but that dlc does not read: refused with what to do instead, never ignored.
UNUSED: dict[str, str] = {
    "data.image_size": "images are always made at, or resized to, model.input's shape; remove it (change "
                       "model.input.shape to train at another size)",
    "data.batch_size": "the batch size is train.batch_size",
    "data.workers": "one background thread prepares the batches; data.prefetch sets how many it makes ahead",
    "data.split": "the validation split is data.val_fraction (imagefolder: or root/train and root/val folders)",
    "data.augment.seed": "augmentation is seeded by train.seed (with the epoch and iteration)",
}

# Sections whose feature is built; the others are validated, then refused.
SUPPORTED = {"export", "data", "train", "optimize", "prune"}
PLANNED: dict[str, str] = {}

_TYPES = {
    "int": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    "float": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
    "number": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "list": (lambda v: isinstance(v, list), "a list"),
    "any": (lambda v: True, "anything"),
}


def check_section(name: str, value: Any, file: str, line: int | None) -> list[Diagnostic]:
    """Every structural problem in one section, plus a "not supported yet" where the feature is not built."""
    diags = _check(name, value, SCHEMAS[name], file, line)
    if name not in SUPPORTED:
        diags.append(Diagnostic(
            f"section '{name}' is not supported yet: {PLANNED[name]}",
            file=file, line=line, hint=f"remove the '{name}:' section to compile with the model's initial weights",
        ))
    return diags


def _check(path: str, value: Any, schema: dict[str, Any], file: str, line: int | None) -> list[Diagnostic]:
    if not isinstance(value, dict):
        return [Diagnostic(f"'{path}' must be a mapping of keys to values, got {type(value).__name__}",
                           file=file, line=line)]
    diags = []
    for key, v in value.items():
        key_line = value.line_of(key) if isinstance(value, LDict) else line
        if key not in schema and f"{path}.{key}" in UNUSED:
            diags.append(Diagnostic(f"'{path}.{key}' is not a dlc setting", file=file, line=key_line,
                                    hint=UNUSED[f"{path}.{key}"]))
            continue
        if key not in schema:
            diags.append(Diagnostic(f"unknown key '{key}' in '{path}'", file=file, line=key_line,
                                    hint=did_you_mean(key, schema) or f"known keys: {', '.join(schema)}"))
            continue
        expected = schema[key]
        if isinstance(expected, dict):
            diags += _check(f"{path}.{key}", v, expected, file, key_line)
        else:
            ok, words = _TYPES[expected]
            if not ok(v):
                diags.append(Diagnostic(f"'{path}.{key}' must be {words}, got {v!r}", file=file, line=key_line))
    return diags
