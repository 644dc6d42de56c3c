"""What an MPI launcher (mpirun, mpiexec, srun) tells a process through its environment, read without importing
mpi4py or numpy: the number of ranks, how many share this host, and the kernel threads each should use.

`share_threads()` runs when dlc.compiler is imported, before numpy and dlc._C load, because OpenMP and OpenBLAS
read OMP_NUM_THREADS / OPENBLAS_NUM_THREADS once, at load.
"""

from __future__ import annotations

import os

# World size as each launcher family exports it: Open MPI, MPICH / Intel MPI (hydra; also srun --mpi=pmi2),
# MVAPICH.
SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")
LOCAL_SIZE_VARS = ("OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "MV2_COMM_WORLD_LOCAL_SIZE")
ENABLE_HINT = ("pip install -e \".[mpi]\" (mpi4py and Open MPI from PyPI), then mpirun -n 2 dlc train "
               "model.yaml -o DIR")


def launched_size() -> int:
    """The number of ranks an MPI launcher started (1 when none did). Reads the environment only."""
    for var in SIZE_VARS:
        value = os.environ.get(var, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 1


def local_size() -> int:
    for var in LOCAL_SIZE_VARS:
        value = os.environ.get(var, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return launched_size()


def threads_per_rank(cpus: int | None = None) -> int:
    """Kernel threads for one of several ranks on a host: the host's CPUs shared out, at least one."""
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cpus // max(local_size(), 1))


def share_threads() -> None:
    """Under a launcher with several ranks per host, give each rank its share of the CPUs unless the user chose
    (OMP_NUM_THREADS, OPENBLAS_NUM_THREADS). Must run before numpy and dlc._C load: both read these once."""
    if local_size() <= 1:
        return
    n = str(threads_per_rank())
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(var, n)
