"""Checkpoints as safetensors (no pickle): the graph's parameters, the solver's state, and a JSON header with
where training stands. Written atomically, so an interrupted write never replaces a good checkpoint."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load, save

from ..atomic import write_bytes
from ..errors import DlcError
from ..graph import Graph

PARAM = "param/"
STATE = "state/"
BEST = "best/"


def graph_tensors(graph: Graph) -> dict[str, np.ndarray]:
    """Every parameter tensor of the graph (BN running statistics included), keyed "node.tensor"."""
    return {f"{n.name}.{t}": a for n in graph.nodes() for t, a in n.params.items()}


def tensors_sha256(tensors: dict[str, np.ndarray]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order: independent of how safetensors
    lays the file out, so it is checked against the tensors as read back."""
    h = hashlib.sha256()
    for key in sorted(tensors):
        a = np.ascontiguousarray(tensors[key])
        h.update(f"{key}\0{a.dtype.str}\0{list(a.shape)}\0".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def save_checkpoint(path: str | Path, graph: Graph, solver_state: dict[str, np.ndarray] | None = None,
                    info: dict[str, Any] | None = None, best: dict[str, np.ndarray] | None = None) -> Path:
    tensors = {PARAM + k: np.ascontiguousarray(v) for k, v in graph_tensors(graph).items()}
    for k, v in (solver_state or {}).items():
        tensors[STATE + k] = np.ascontiguousarray(v)
    for k, v in (best or {}).items():
        tensors[BEST + k] = np.ascontiguousarray(v)
    info = {**(info or {}), "tensors_sha256": tensors_sha256(tensors)}
    return write_bytes(path, save(tensors, metadata={"dlc": json.dumps(info)}))


def short(value: Any, limit: int = 80) -> str:
    """A value for an error message, cut to about `limit` characters."""
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def read_checkpoint(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray],
                                               dict[str, np.ndarray], dict[str, Any]]:
    """(params, solver state, best params, info). The tensors are checked against the sha256 stored in the info
    when there is one (checkpoints from dlc before it have none and are read unchecked)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DlcError(f"{path}: checkpoint not found") from None
    except OSError as exc:
        raise DlcError(f"{path}: cannot read the checkpoint ({exc.strerror or exc})") from None
    try:
        tensors = load(data)
        header_len = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + header_len])
    except (SafetensorError, ValueError, UnicodeDecodeError) as exc:
        raise DlcError(f"{path}: not a readable safetensors checkpoint ({short(str(exc))})") from None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    text = meta.get("dlc", "{}") if isinstance(meta, dict) else "{}"
    try:
        info = json.loads(text)
    except (ValueError, TypeError):
        raise DlcError(f"{path}: the checkpoint's 'dlc' metadata is not JSON: {short(text)}") from None
    if not isinstance(info, dict):
        raise DlcError(f"{path}: the checkpoint's 'dlc' metadata must be a JSON object, got {short(text)}")
    expected = info.get("tensors_sha256")
    if expected is not None:
        if not isinstance(expected, str):
            raise DlcError(f"{path}: checkpoint info 'tensors_sha256' must be a string, got {short(expected)}")
        if tensors_sha256(tensors) != expected:
            raise DlcError(f"{path}: the checkpoint's tensors do not match their sha256: the file is corrupt (bit "
                           "rot or a damaged copy); use an intact copy or train again")
    classes = info.get("classes")
    if classes is not None and not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)):
        raise DlcError(f"{path}: checkpoint info 'classes' must be a list of names, got {short(classes)}")
    anchors = info.get("anchors")
    if anchors is not None and not isinstance(anchors, dict):
        raise DlcError(f"{path}: checkpoint info 'anchors' must be an object (layer -> anchors), got "
                       f"{short(anchors)}")
    pick = lambda prefix: {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}  # noqa: E731
    return pick(PARAM), pick(STATE), pick(BEST), info


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def validate_resume_info(info: dict[str, Any], path: str | Path, epochs: int, iters_per_epoch: int,
                         total_iters: int, max_iter: bool = False,
                         record_keys: tuple[str, ...] = ("train_loss", "val_loss", "lr", "seconds")) -> None:
    """Check the training state a checkpoint records before `--resume` trusts it: every key there, of the right
    type, within this run's epochs and iterations. A problem raises DlcError naming the file and the key."""

    def bad(key: str, want: str) -> DlcError:
        shown = short(json.dumps(info[key])) if key in info else "nothing"  # JSON: "1" shows it is a string
        return DlcError(f"{path}: checkpoint info '{key}' must be {want}, got {shown}; the checkpoint is damaged "
                        "or not from dlc train (train into a new folder, or without --resume)")

    def need_int(key: str, low: int, high: int | None = None) -> int:
        v = info.get(key)
        if not _is_int(v) or v < low or (high is not None and v > high):
            raise bad(key, f"an integer from {low} to {high}" if high is not None else f"an integer >= {low}")
        return v

    required = ("epoch", "iteration", "global_iteration", "history", "best_value", "best_epoch", "bad_epochs",
                "partial", "yaml_sha256", "solver_steps")
    for key in required:
        if key not in info:
            raise DlcError(f"{path}: checkpoint info has no '{key}'; the checkpoint is damaged or not from dlc "
                           "train (train into a new folder, or without --resume)")
    if not isinstance(info["yaml_sha256"], str):
        raise bad("yaml_sha256", "a sha256 string")
    epoch = need_int("epoch", 0, epochs)
    iteration = need_int("iteration", 0, iters_per_epoch)
    g = need_int("global_iteration", 0, total_iters)
    if g != epoch * iters_per_epoch + iteration and not (max_iter and g == total_iters):
        raise bad("global_iteration", f"epoch × {iters_per_epoch} + iteration = {epoch * iters_per_epoch + iteration}"
                  " (this run's iterations per epoch; did the data change?)")
    need_int("solver_steps", 0)
    need_int("bad_epochs", 0, epoch)
    if info["best_epoch"] is not None:
        need_int("best_epoch", 1, epoch)
    if info["best_value"] is not None and not _is_number(info["best_value"]):
        raise bad("best_value", "a number or null")
    if "seed" in info and not _is_int(info["seed"]):
        raise bad("seed", "an integer")
    history = info["history"]
    if not isinstance(history, list) or len(history) != epoch:
        raise bad("history", f"a list of {epoch} epoch records (one per finished epoch)")
    for i, record in enumerate(history):
        if not isinstance(record, dict) or record.get("epoch") != i + 1:
            raise DlcError(f"{path}: checkpoint info 'history[{i}]' must be the record of epoch {i + 1}, got "
                           f"{short(record)}")
        for key in record_keys:  # what this trainer writes per epoch, and later reads (curves, metrics.json)
            if key not in record:
                raise DlcError(f"{path}: checkpoint info 'history[{i}]' has no '{key}'; the checkpoint is damaged "
                               "or not from this model's training (train into a new folder, or without --resume)")
        for key in ("train_loss", "val_loss", "lr", "seconds", "train_accuracy", "val_accuracy", "val_map",
                    "val_miou", "images_per_s"):
            if key in record and not _is_number(record[key]):
                raise DlcError(f"{path}: checkpoint info 'history[{i}].{key}' must be a number, got "
                               f"{short(record[key])}")
        if "lr" in record and not math.isfinite(record["lr"]):
            raise DlcError(f"{path}: checkpoint info 'history[{i}].lr' must be finite, got {short(record['lr'])}")
    partial = info["partial"]
    if partial is not None:
        if not isinstance(partial, dict):
            raise bad("partial", "null or an object (the interrupted epoch's running sums)")
        for key, check, want in (("loss_sum", _is_number, "a number"), ("correct", _is_int, "an integer"),
                                 ("seen", _is_int, "an integer"), ("seconds", _is_number, "a number")):
            v = partial.get(key)
            if not check(v) or v < 0 or not math.isfinite(v):
                raise DlcError(f"{path}: checkpoint info 'partial.{key}' must be {want} >= 0, got "
                               f"{short(v) if key in partial else 'nothing'}")


def check_solver_state(current: dict[str, np.ndarray], stored: dict[str, np.ndarray], path: str | Path) -> None:
    """The optimizer state a checkpoint holds must be exactly the solver's: the same tensors, the same shapes."""
    problems = []
    for key, value in current.items():
        if key not in stored:
            problems.append(f"no optimizer state '{short(key)}'")
        elif stored[key].shape != value.shape:
            problems.append(f"optimizer state '{short(key)}' has shape {list(stored[key].shape)}, the parameter "
                            f"has {list(value.shape)}")
    extra = sorted(set(stored) - set(current))
    if extra:
        problems.append(f"optimizer state this run does not have: {', '.join(short(k) for k in extra[:3])}"
                        f"{' ...' if len(extra) > 3 else ''}")
    if problems:
        raise DlcError(f"{path}: the checkpoint's optimizer state does not fit this run: " + "; ".join(problems[:4]))


def load_params_into(graph: Graph, params: dict[str, np.ndarray], source: str) -> None:
    """Copy checkpoint tensors into the graph, checking that every tensor is there with the right shape."""
    problems = []
    for key, current in graph_tensors(graph).items():
        if key not in params:
            problems.append(f"no tensor '{key}'")
        elif params[key].shape != current.shape:
            problems.append(f"'{key}' has shape {list(params[key].shape)}, the model needs {list(current.shape)}")
    extra = sorted(set(params) - set(graph_tensors(graph)))
    if extra:
        problems.append(f"tensors the model does not have: {', '.join(short(k) for k in extra[:5])}"
                        f"{' ...' if len(extra) > 5 else ''}")
    if problems:
        raise DlcError(f"{source}: the checkpoint does not fit this model: " + "; ".join(problems[:6]))
    for node in graph.nodes():
        for t in node.params:
            node.params[t] = np.array(params[f"{node.name}.{t}"], dtype=np.float32, copy=True)


def load_matching(graph: Graph, params: dict[str, np.ndarray]) -> dict[str, Any]:
    """Copy each checkpoint tensor whose name and shape match one of the graph's; the others keep their
    initialisation (transfer learning: a changed or new layer starts from its filler). Returns what happened:
    tensors loaded and in all, the layers with a tensor not loaded ('initialised'), the tensors not used."""
    loaded, total, initialised, used = 0, 0, [], set()
    for node in graph.nodes():
        fresh = False
        for tensor, current in node.params.items():
            key = f"{node.name}.{tensor}"
            total += 1
            value = params.get(key)
            if value is not None and value.shape == current.shape:
                node.params[tensor] = np.array(value, dtype=np.float32, copy=True)
                loaded += 1
                used.add(key)
            else:
                fresh = True
        if fresh:
            initialised.append(node.name)
    return {"loaded": loaded, "tensors": total, "initialised": initialised, "unused": sorted(set(params) - used)}
