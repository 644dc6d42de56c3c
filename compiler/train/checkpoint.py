"""Checkpoints as safetensors (no pickle): the graph's parameters, the solver's state, and a JSON header with
where training stands. Written atomically, so an interrupted write never replaces a good checkpoint."""

from __future__ import annotations

import json
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


def save_checkpoint(path: str | Path, graph: Graph, solver_state: dict[str, np.ndarray] | None = None,
                    info: dict[str, Any] | None = None, best: dict[str, np.ndarray] | None = None) -> Path:
    tensors = {PARAM + k: np.ascontiguousarray(v) for k, v in graph_tensors(graph).items()}
    for k, v in (solver_state or {}).items():
        tensors[STATE + k] = np.ascontiguousarray(v)
    for k, v in (best or {}).items():
        tensors[BEST + k] = np.ascontiguousarray(v)
    return write_bytes(path, save(tensors, metadata={"dlc": json.dumps(info or {})}))


def read_checkpoint(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray],
                                               dict[str, np.ndarray], dict[str, Any]]:
    """(params, solver state, best params, info)."""
    path = Path(path)
    try:
        data = path.read_bytes()
        tensors = load(data)
        header_len = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + header_len])
        info = json.loads(header.get("__metadata__", {}).get("dlc", "{}"))
    except FileNotFoundError:
        raise DlcError(f"{path}: checkpoint not found") from None
    except (SafetensorError, ValueError, UnicodeDecodeError) as exc:
        raise DlcError(f"{path}: not a readable safetensors checkpoint ({exc})") from None
    pick = lambda prefix: {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}  # noqa: E731
    return pick(PARAM), pick(STATE), pick(BEST), info


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
        problems.append(f"tensors the model does not have: {', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}")
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
