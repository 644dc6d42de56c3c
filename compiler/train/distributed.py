"""Data-parallel training over MPI (mpi4py): Horovod's recipe for dlc's numpy/Cython trainer.

`mpirun -n K dlc train model.yaml` starts K copies of dlc; `World.detect()` finds the launcher's environment and
joins them. Every rank holds the whole model. Rank 0's initial weights (fillers, init_from, or --resume's
checkpoint) are broadcast. Each rank then reads its own slice of every global batch (data/loader.py shards the
epoch's order), and one allreduce per step averages the gradients on one flat float32 buffer.

The loss, a "this rank saw NaN or inf" flag and a "Ctrl-C" flag ride in the same buffer, so every rank stops at
the same iteration. A rank that raises or dies therefore cannot leave the others waiting: the CLI aborts the job
on an error (MPI_Abort), and a watchdog thread aborts any collective that waits longer than
DLC_MPI_TIMEOUT seconds (default 300), naming the collective.

No pickle crosses the wire: objects are JSON, arrays are raw float buffers.

Only this module imports mpi4py, and only when a launcher started this process, so a machine without MPI
loses nothing.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

from ..errors import DlcError
from .launcher import ENABLE_HINT, launched_size

DEFAULT_TIMEOUT_S = 300.0
_active: World | None = None  # the distributed world this process joined (the CLI aborts it on an error)


def active_world() -> World | None:
    """The distributed world this process has joined, or None (no launcher, or not joined yet)."""
    return _active


class World:
    """The ranks of one training job. `World.single()` is the plain one-process case, where every collective is
    the identity, so the trainer has one code path."""

    def __init__(self, comm=None, timeout_s: float = DEFAULT_TIMEOUT_S):
        self.comm = comm
        self.rank = comm.Get_rank() if comm is not None else 0
        self.size = comm.Get_size() if comm is not None else 1
        self.timeout_s = timeout_s
        self._waiting: tuple[str, float] | None = None  # (collective, since) while one is in progress
        self._lock = threading.Lock()
        self.allreduce_seconds = 0.0  # time spent in the gradient allreduce (reported by benchmarks/scaling.py)
        self.allreduce_calls = 0
        if comm is not None and self.size > 1:
            threading.Thread(target=self._watch, name="dlc-mpi-watchdog", daemon=True).start()

    @classmethod
    def single(cls) -> World:
        return cls(None)

    @classmethod
    def detect(cls) -> World:
        """Join the job an MPI launcher started; the single world when none did."""
        size = launched_size()
        if size <= 1:
            return cls.single()
        try:
            from mpi4py import MPI
        except ImportError as exc:
            raise DlcError(f"this process was started by an MPI launcher with {size} ranks, but mpi4py cannot be "
                           f"imported ({exc}); install it: {ENABLE_HINT}") from None
        raw = os.environ.get("DLC_MPI_TIMEOUT", "")
        try:
            timeout = float(raw) if raw else DEFAULT_TIMEOUT_S
        except ValueError:
            raise DlcError(f"DLC_MPI_TIMEOUT must be a number of seconds, got {raw!r}") from None
        if not timeout > 0:
            raise DlcError(f"DLC_MPI_TIMEOUT must be a positive number of seconds, got {raw!r}")
        global _active
        _active = cls(MPI.COMM_WORLD, timeout)
        return _active

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    # --- failure handling --------------------------------------------------------------------------------
    def _watch(self) -> None:
        while True:
            time.sleep(min(1.0, self.timeout_s / 4))
            with self._lock:
                waiting = self._waiting
            if waiting is not None and time.monotonic() - waiting[1] > self.timeout_s:
                sys.stderr.write(f"error: rank {self.rank}: waited {self.timeout_s:g} s in the {waiting[0]} for the "
                                 "other ranks; one of them died or hangs. Stopping every rank (the last checkpoint "
                                 "is kept; continue with --resume). DLC_MPI_TIMEOUT sets the wait.\n")
                sys.stderr.flush()
                self.abort(3)

    @contextmanager
    def _collective(self, what: str) -> Iterator[None]:
        with self._lock:
            self._waiting = (what, time.monotonic())
        try:
            yield
        finally:
            with self._lock:
                self._waiting = None

    def abort(self, code: int = 1) -> None:
        """Stop every rank of the job now (MPI_Abort); the single world just exits."""
        if self.comm is not None:
            self.comm.Abort(code)
        os._exit(code)

    # --- collectives -------------------------------------------------------------------------------------
    def allreduce_mean_(self, buffer: np.ndarray, what: str = "gradient allreduce") -> np.ndarray:
        """Average a contiguous float buffer over the ranks, in place."""
        if self.size == 1:
            return buffer
        from mpi4py import MPI

        start = time.perf_counter()
        with self._collective(what):
            self.comm.Allreduce(MPI.IN_PLACE, buffer, op=MPI.SUM)
        buffer /= self.size
        if what == "gradient allreduce":  # the per-step cost that scaling.py reports
            self.allreduce_seconds += time.perf_counter() - start
            self.allreduce_calls += 1
        return buffer

    def allreduce_sum(self, values: np.ndarray, what: str) -> np.ndarray:
        """The element-wise sum over the ranks of a small array (a new float64 array)."""
        out = np.ascontiguousarray(values, dtype=np.float64).copy()
        if self.size == 1:
            return out
        from mpi4py import MPI

        with self._collective(what):
            self.comm.Allreduce(MPI.IN_PLACE, out, op=MPI.SUM)
        return out

    def broadcast_arrays_(self, arrays: list[np.ndarray], what: str) -> None:
        """Overwrite each array on every rank with rank 0's values (one flat buffer per dtype)."""
        if self.size == 1 or not arrays:
            return
        for dtype in sorted({a.dtype.str for a in arrays}):
            group = [a for a in arrays if a.dtype.str == dtype]
            flat = np.concatenate([a.ravel() for a in group]) if self.is_root else np.empty(
                sum(a.size for a in group), dtype=np.dtype(dtype))
            with self._collective(what):
                self.comm.Bcast(flat, root=0)
            offset = 0
            for a in group:
                a[...] = flat[offset:offset + a.size].reshape(a.shape)
                offset += a.size

    def broadcast_json(self, obj, what: str):
        """Rank 0's JSON-serialisable object on every rank."""
        if self.size == 1:
            return obj
        data = np.frombuffer(json.dumps(obj).encode(), np.uint8) if self.is_root else None
        length = np.array([data.size if data is not None else 0], np.int64)
        with self._collective(what):
            self.comm.Bcast(length, root=0)
            buf = data.copy() if data is not None else np.empty(int(length[0]), np.uint8)
            self.comm.Bcast(buf, root=0)
        return json.loads(buf.tobytes().decode())

    def barrier(self, what: str) -> None:
        if self.size > 1:
            with self._collective(what):
                self.comm.Barrier()


class GradientBuffer:
    """The flat float32 buffer one allreduce averages each step: every trainable gradient in a fixed order, then
    the loss, the count of correct predictions, a non-finite flag and a stop flag. A tensor a rank has no
    gradient for this step counts as zeros."""

    EXTRA = 4  # loss, correct, nonfinite, stop

    def __init__(self, params: dict[str, np.ndarray]):
        self.names = sorted(params)
        self.shapes = {k: params[k].shape for k in self.names}
        self.offsets: dict[str, tuple[int, int]] = {}
        offset = 0
        for k in self.names:
            n = int(np.prod(self.shapes[k], dtype=np.int64))
            self.offsets[k] = (offset, offset + n)
            offset += n
        self.size = offset
        self.flat = np.zeros(offset + self.EXTRA, np.float32)

    def pack(self, grads: dict[str, np.ndarray], loss: float, correct: int, nonfinite: bool,
             stop: bool) -> np.ndarray:
        for k in self.names:
            a, b = self.offsets[k]
            g = grads.get(k)
            if g is None:
                self.flat[a:b] = 0.0
            else:
                self.flat[a:b] = g.ravel()
        bad = nonfinite or not np.isfinite(loss)
        self.flat[self.size:] = (0.0 if bad else loss, correct, float(bad), float(stop))
        return self.flat

    def unpack(self, ranks: int) -> tuple[dict[str, np.ndarray], float, int, bool, bool]:
        """After the average over `ranks`: the gradients (views into the buffer), the mean loss, the correct
        predictions of the whole global batch, and whether any rank saw a non-finite value or asked to stop."""
        grads = {k: self.flat[a:b].reshape(self.shapes[k]) for k, (a, b) in self.offsets.items()}
        loss, correct, nonfinite, stop = (float(v) for v in self.flat[self.size:])
        return grads, loss, int(round(correct * ranks)), nonfinite > 0, stop > 0
