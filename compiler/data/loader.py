"""Batches prepared by a background thread with prefetch, so augmentation overlaps training.

Everything random is a function of (seed, epoch, iteration): the epoch's order, each batch's augmentation.
A run is therefore repeatable bit for bit and can resume at any iteration.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

import numpy as np

from .augment import AugmentConfig, augment, pca_basis
from .datasets import Dataset
from .lazy import LazyImages, read_subset

PCA_SAMPLE = 2000  # images a lazily read set estimates its colour covariance from


def _pca_sample(images):
    """The whole array in memory; an even sample of a lazily read set (decoding all of it would defeat it)."""
    if not isinstance(images, LazyImages) or len(images) <= PCA_SAMPLE:
        return np.asarray(images)
    return images[np.linspace(0, len(images) - 1, PCA_SAMPLE).astype(np.int64)]


class BatchLoader:
    def __init__(self, data: Dataset, batch_size: int, mean: list[float], std: list[float], seed: int = 0,
                 augment_cfg: AugmentConfig | None = None, shuffle: bool = True, drop_last: bool = True,
                 prefetch: int = 2):
        self.data = data
        self.batch_size = batch_size
        self.mean = np.asarray(mean, np.float32)[None, :, None, None]
        self.inv_std = 1.0 / np.asarray(std, np.float32)[None, :, None, None]
        self.seed = seed
        self.augment_cfg = augment_cfg or AugmentConfig()
        self.shuffle = shuffle
        self.drop_last = drop_last and len(data) > batch_size
        self.prefetch = max(prefetch, 1)
        self.pca = pca_basis(_pca_sample(data.images)) if self.augment_cfg.pca_color > 0 else None
        self.rank, self.ranks = 0, 1

    def shard(self, rank: int, ranks: int) -> None:
        """Read only this rank's part of every global batch (data-parallel training): global batch i is
        order[i·ranks·B : (i+1)·ranks·B] of the epoch's order, the same on every rank, and rank r takes its r-th
        run of B. The last partial global batch is dropped. Each rank draws its own augmentation."""
        self.rank, self.ranks = rank, ranks
        self.drop_last = True

    def __len__(self) -> int:
        n, step = len(self.data), self.batch_size * self.ranks
        return n // step if self.drop_last else -(-n // step)

    def _order(self, epoch: int) -> np.ndarray:
        n = len(self.data)
        order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
        if self.ranks == 1:
            return order
        batches = len(self)
        return order[:batches * self.ranks * self.batch_size].reshape(batches, self.ranks, -1)[:, self.rank].ravel()

    def batch_rng(self, epoch: int, index: int) -> np.random.Generator:
        """The augmentation generator of one batch: a function of (seed, epoch, iteration), and the rank."""
        key = [self.seed, epoch, index, 1] + ([self.rank] if self.ranks > 1 else [])
        return np.random.default_rng(key)

    def make_batch(self, epoch: int, index: int, order: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        idx = order[index * self.batch_size:(index + 1) * self.batch_size]
        x, idx = read_subset(self.data.images, idx)  # lazy sets read the files here (unreadable ones may drop)
        if self.augment_cfg.active:
            x = augment(x, self.augment_cfg, self.batch_rng(epoch, index), self.pca)
        x = (x - self.mean) * self.inv_std
        return np.ascontiguousarray(x, dtype=np.float32), self.data.labels[idx]

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Batches `start`, `start`+1, ... of `epoch`, made ahead by a background thread."""
        order = self._order(epoch)
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()

        def work() -> None:
            try:
                for i in range(start, len(self)):
                    batch = self.make_batch(epoch, i, order)
                    while not stop.is_set():
                        try:
                            q.put(batch, timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        return
                q.put(None)
            except BaseException as exc:  # hand the error to the consumer instead of dying silently
                q.put(exc)

        thread = threading.Thread(target=work, name=f"dlc-loader-e{epoch}", daemon=True)
        thread.start()
        try:
            while True:
                item = q.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            thread.join(timeout=5)
