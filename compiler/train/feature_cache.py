"""`train.cache_features`: run a frozen trunk once over the data, keep what the trainable head reads, and train
the head on that.

When nothing at or before a layer trains (train/transfer.py freezes it) and the inputs are the same every epoch
(no augmentation), the trunk's outputs are the same every epoch too: a frozen batch norm uses its running
statistics, and a trunk with dropout is refused (its masks change every batch). So the trunk is computed once, in
the data set's order, and each batch of the usual (seed, epoch)-shuffled order is gathered from the cache. The
graph is unchanged: the exported model is whole.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ..errors import DlcError
from ..graph import Graph
from .executor import Executor

# Above this many bytes the cache lives in memory-mapped files in the output folder instead of in memory.
MEMORY_BYTES = 1 << 30


def trunk_cut(graph: Graph, no_backward: set[str]) -> tuple[set[str], list[str]]:
    """(the trunk: layers nothing trainable precedes, the values that cross from it into the trainable part)."""
    trunk = set(no_backward)
    crossing: list[str] = []
    for node in graph.nodes():
        if node.name in trunk:
            continue
        for value in node.inputs:
            producer = graph.producer(value)
            if (producer is None or producer.name in trunk) and value not in crossing:
                crossing.append(value)
    return trunk, crossing


def check_cacheable(graph: Graph, trunk: set[str], crossing: list[str], augment_active: bool, detector: bool,
                    file: str) -> None:
    why = None
    if detector:
        why = "it is for classifiers (a detector's augmentation moves the boxes)"
    elif not trunk:
        why = "no layer is frozen at the start of the network (set transfer: head, transfer: {partial: LAYER} or freeze)"
    elif augment_active:
        why = "data.augment changes the inputs every epoch, so the frozen trunk's outputs would change too; remove it"
    elif any(v in graph.input_names for v in crossing):
        why = (f"a trainable layer reads the model input ('{graph.input_names[0]}') directly, so nothing before it "
               "can be cached; freeze it or drop cache_features")
    else:
        dropout = [n.name for n in graph.nodes() if n.name in trunk and n.op == "dropout"]
        if dropout:
            why = f"the frozen trunk holds dropout layer '{dropout[0]}', whose masks change every batch"
    if why is not None:
        raise DlcError(f"{file}: train.cache_features cannot be used: {why}")


def compute_features(executor: Executor, loader, crossing: list[str], out_dir: Path) -> dict[str, np.ndarray]:
    """The crossing values for every sample of the loader's data set, in the set's order, computed in
    batches of the loader's size in inference mode (which is what a frozen trunk computes in training too)."""
    data = loader.data
    n = len(data)
    feats: dict[str, np.ndarray] = {}
    shapes = None
    for start in range(0, n, loader.batch_size):
        idx = np.arange(start, min(start + loader.batch_size, n))
        x = np.ascontiguousarray((data.images[idx] - loader.mean) * loader.inv_std, dtype=np.float32)
        values = executor.forward(x, train=False, outputs=crossing)
        if shapes is None:
            shapes = {k: v.shape[1:] for k, v in values.items()}
            total = sum(n * int(np.prod(s)) * 4 for s in shapes.values())
            for j, (k, s) in enumerate(shapes.items()):
                if total > MEMORY_BYTES:
                    folder = out_dir / "feature_cache"
                    folder.mkdir(parents=True, exist_ok=True)
                    feats[k] = np.lib.format.open_memmap(folder / f"value{j}.npy", mode="w+", dtype=np.float32,
                                                         shape=(n, *s))
                else:
                    feats[k] = np.empty((n, *s), np.float32)
        for k, v in values.items():
            feats[k][idx] = v
    return feats


class FeatureLoader:
    """A BatchLoader's batches (the same order, sizes and labels) made of cached trunk outputs instead of
    images: each batch is a dict of the crossing values, which the executor takes as feeds."""

    def __init__(self, base, features: dict[str, np.ndarray]):
        self.base, self.features, self.data = base, features, base.data

    def __len__(self) -> int:
        return len(self.base)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray]]:
        order = self.base._order(epoch)
        size = self.base.batch_size
        for i in range(start, len(self)):
            idx = order[i * size:(i + 1) * size]
            yield {k: np.ascontiguousarray(v[idx]) for k, v in self.features.items()}, self.data.labels[idx]


def cache_trunk(trainer, out_dir: Path) -> str:
    """Swap the trainer's loaders for cached ones and make its executor skip the trunk. Returns the line to
    print."""
    graph, executor = trainer.graph, trainer.executor
    trunk, crossing = trunk_cut(graph, set(executor.no_backward))
    augment = getattr(trainer.train_loader, "augment_cfg", None)
    check_cacheable(graph, trunk, crossing, bool(augment is not None and augment.active), trainer.det is not None,
                    trainer.spec.file)
    started = time.perf_counter()
    train = compute_features(executor, trainer.train_loader, crossing, out_dir)
    val = compute_features(executor, trainer.val_loader, crossing, out_dir / "feature_cache" / "val")
    trainer.train_loader = FeatureLoader(trainer.train_loader, train)
    trainer.val_loader = FeatureLoader(trainer.val_loader, val)
    executor.skip_forward = frozenset(trunk)
    size = sum(v.nbytes for v in (*train.values(), *val.values()))
    return (f"cached the frozen trunk ({len(trunk)} layers) once: {', '.join(crossing)} for "
            f"{len(trainer.train_set) + len(trainer.val_set)} images, {size / 2**20:.1f} MiB, "
            f"{time.perf_counter() - started:.1f} s")
