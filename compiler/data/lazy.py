"""Image files read when a batch needs them, so a data set need not fit in memory (`data.load: lazy`).

`LazyImages` stands where a data set's float32 N×C×H×W array stands: len, shape, `[i]`, `[a:b]` and `[index
array]` give float32 arrays in [0, 1], decoded by read_image exactly as the in-memory path decodes them (the
values are the same bit for bit), and `take(idx)` is a subset that reads nothing. The loader's background thread
does the reading, so decoding overlaps training. Decoded images are kept as uint8 in a least-recently-used
cache of `cache_mb` megabytes, shared by the subsets of one set; memory therefore does not grow with the data
set. Under MPI each rank reads only its own shard of every epoch.

`data.load: memmap` converts the set once into a uint8 N×C×H×W .npy in the output folder (`StoredImages`, read by
memory map): later runs decode nothing, and the operating system's page cache holds the pixels.

A file that cannot be read is an error naming it (`on_bad_image: error`, the default), or with `skip` it is left
out of its batch, remembered, and counted: `bad` holds every such file with the reason, for the epoch report.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np

from ..errors import DlcError

LOAD_MODES = ("auto", "memory", "lazy", "memmap")
ON_BAD = ("error", "skip")
AUTO_LAZY_BYTES = 1 << 30  # `load: auto` reads lazily once the decoded float32 set would pass 1 GiB
# A small cache: a set read lazily is larger than memory, so in a shuffled order few images are read twice
# before they would be evicted; the operating system caches the files themselves.
DEFAULT_CACHE_MB = 16


class _Shared:
    """The cache and the bad-file record of one set of files (its subsets share them)."""

    def __init__(self, capacity_bytes: int):
        self.capacity = capacity_bytes
        self.cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self.bytes = 0
        self.bad: dict[int, str] = {}  # file index -> why it could not be read
        self.lock = threading.Lock()


class LazyImages:
    def __init__(self, paths: list[Path], shape: tuple[int, int, int], cache_mb: float = DEFAULT_CACHE_MB,
                 on_bad: str = "error", index: np.ndarray | None = None, shared: _Shared | None = None):
        self.paths = paths
        self.image_shape = tuple(shape)
        self.on_bad = on_bad
        self.index = np.arange(len(paths)) if index is None else np.asarray(index, np.int64)
        self.shared = shared or _Shared(int(cache_mb * 1e6))

    # --- the array protocol the loaders use -----------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.index)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), *self.image_shape)

    dtype = np.dtype(np.float32)
    ndim = 4

    def take(self, idx) -> LazyImages:
        """The subset at positions `idx`, reading nothing."""
        return LazyImages(self.paths, self.image_shape, on_bad=self.on_bad, index=self.index[np.asarray(idx)],
                          shared=self.shared)

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, (int, np.integer)):
            x, kept = self.read(np.array([key]))
            if not len(kept):
                raise DlcError(f"{self.paths[self.index[key]]}: {self.shared.bad[int(self.index[key])]}")
            return x[0]
        positions = np.arange(len(self))[key] if isinstance(key, slice) else np.asarray(key)
        x, kept = self.read(positions)
        if len(kept) != len(positions):  # only read() may drop samples: its callers drop their labels too
            raise DlcError(f"{len(positions) - len(kept)} unreadable image(s), e.g. {self.bad_files()[0]}")
        return x

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        x = self[:]
        return x if dtype is None else x.astype(dtype)

    # --- reading -------------------------------------------------------------------------------------------
    def read(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(float32 images, the positions that were read): with on_bad_image skip, unreadable files are left
        out; with error, the first one raises a DlcError naming it."""
        out, kept = [], []
        for p in np.asarray(positions, np.int64).ravel():
            image = self._image(int(self.index[p]))
            if image is not None:
                out.append(image)
                kept.append(p)
        x = np.stack(out).astype(np.float32) / np.float32(255.0) if out else np.empty((0, *self.image_shape),
                                                                                          np.float32)
        return x, np.asarray(kept, np.int64)

    def _image(self, i: int) -> np.ndarray | None:
        """File i as uint8 C×H×W (from the cache when it is there), or None when it is bad and skipped."""
        s = self.shared
        with s.lock:
            if i in s.bad:
                return None
            hit = s.cache.get(i)
            if hit is not None:
                s.cache.move_to_end(i)
                return hit
        from .datasets import read_image

        try:
            array = read_image(self.paths[i], *self.image_shape)[0]
        except DlcError as exc:
            if self.on_bad == "error":
                raise DlcError(f"{exc} (data.on_bad_image: skip leaves unreadable images out and counts them)"
                               ) from None
            with s.lock:
                s.bad[i] = str(exc)
            return None
        image = np.rint(array * 255.0).astype(np.uint8)  # read_image gives k/255 exactly: this is lossless
        with s.lock:
            if image.nbytes <= s.capacity and i not in s.cache:
                s.cache[i] = image
                s.bytes += image.nbytes
                while s.bytes > s.capacity:
                    _, old = s.cache.popitem(last=False)
                    s.bytes -= old.nbytes
        return image

    def bad_files(self) -> list[str]:
        """'path: why' for every file of this subset found unreadable so far."""
        with self.shared.lock:
            bad = dict(self.shared.bad)
        mine = np.isin(np.fromiter(bad, np.int64, len(bad)), self.index)
        return [f"{self.paths[i]}: {bad[i]}" for i, keep in zip(sorted(bad), mine[np.argsort(list(bad))]) if keep]



def read_subset(images, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A batch from an in-memory array or a LazyImages: (float32 images, the entries of idx that were read)."""
    if isinstance(images, LazyImages):
        return images.read(idx)
    return images[idx], np.asarray(idx)


def subset(images, idx):
    """images[idx] for an array; the subset that reads nothing for a lazily read set (anything with take())."""
    return images[idx] if isinstance(images, np.ndarray) else images.take(idx)


def without_unreadable(data):
    """A lazily read validation set with on_bad_image skip, its unreadable files dropped (each file is read
    once here), so every metric counts each remaining image exactly once; any other set as it is."""
    images = data.images
    if not isinstance(images, LazyImages) or images.on_bad != "skip":
        return data
    kept = np.concatenate([images.read(np.arange(a, min(a + 256, len(images))))[1]
                           for a in range(0, len(images), 256)] or [np.empty(0, np.int64)])
    return data if len(kept) == len(images) else data.subset(kept)


class StoredImages(LazyImages):
    """A set converted once into a uint8 store (`build_store`), read by memory map."""

    def __init__(self, store: np.ndarray, bad: np.ndarray, paths: list[Path], shape, on_bad: str,
                 index: np.ndarray | None = None, shared: _Shared | None = None):
        if shared is None:
            shared = _Shared(0)
            shared.bad = {int(i): "cannot read image (found when the store was built)" for i in np.flatnonzero(bad)}
        super().__init__(paths, shape, 0, on_bad, index, shared)
        self.store, self.bad_mask = store, bad

    def take(self, idx) -> StoredImages:
        return StoredImages(self.store, self.bad_mask, self.paths, self.image_shape, self.on_bad,
                            self.index[np.asarray(idx)], self.shared)

    def _image(self, i: int) -> np.ndarray | None:
        return None if self.bad_mask[i] else np.asarray(self.store[i])


def _store_key(paths: list[Path], shape) -> str:
    """What the store's contents depend on: the input shape and every file's path, size and modification time."""
    h = hashlib.sha256(repr(tuple(shape)).encode())
    for path in paths:
        st = os.stat(path)
        h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


def build_store(paths: list[Path], shape, folder: Path, on_bad: str = "error") -> StoredImages:
    """The store of these files at `shape`, in `folder`: reused when one with the same key is there, else written
    once (decoding each file, holding one image at a time) to a temporary file and renamed into place, so a
    killed conversion leaves nothing half-written that a later run would trust. Ranks that share the folder may
    build it at the same time: each writes its own temporary file, and the contents are identical."""
    from .datasets import read_image

    folder.mkdir(parents=True, exist_ok=True)
    key = _store_key(paths, shape)
    images_path, bad_path = folder / f"images-{key}.npy", folder / f"images-{key}.bad.npy"
    if not (images_path.is_file() and bad_path.is_file()):
        logging.getLogger("dlc").info("data.load memmap: converting %d images once into %s", len(paths), images_path)
        fd, tmp = tempfile.mkstemp(prefix=f".{images_path.name}.", suffix=".tmp", dir=folder)
        os.close(fd)
        try:
            store = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(paths), *shape))
            bad = np.zeros(len(paths), bool)
            for i, path in enumerate(paths):
                try:
                    store[i] = np.rint(read_image(path, *shape)[0] * 255.0).astype(np.uint8)
                except DlcError:
                    if on_bad != "skip":
                        raise
                    bad[i] = True
            store.flush()
            del store
            import io

            from ..atomic import write_bytes

            buf = io.BytesIO()
            np.save(buf, bad, allow_pickle=False)
            write_bytes(bad_path, buf.getvalue())
            os.replace(tmp, images_path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    try:
        store = np.load(images_path, mmap_mode="r", allow_pickle=False)
        bad = np.load(bad_path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DlcError(f"{images_path}: the image store cannot be read ({exc}); delete it and it is built again"
                       ) from None
    if store.shape != (len(paths), *shape) or store.dtype != np.uint8 or bad.shape != (len(paths),):
        raise DlcError(f"{images_path}: the image store does not fit this data set; delete it and it is built again")
    return StoredImages(store, bad.astype(bool), paths, shape, on_bad)
