"""Data-parallel training over MPI: K = 2 ranks against one process with the global batch, sync_bn, resume with
another K, a rank killed or hung mid-epoch, `dlc compile` under mpirun; and the pieces (sharding, the gradient
buffer, the launcher's environment, the error path) without MPI."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from dlc.compiler.data import BatchLoader
from dlc.compiler.data.datasets import Dataset
from dlc.compiler.train import launcher
from dlc.compiler.train.checkpoint import read_checkpoint
from dlc.compiler.train.distributed import GradientBuffer, World

from helpers import TINY_TRAINING_YAML

BIN = Path(sys.executable).parent
MPIRUN = shutil.which("mpirun", path=str(BIN)) or shutil.which("mpirun")
try:
    import mpi4py  # noqa: F401

    HAVE_MPI = MPIRUN is not None
except ImportError:
    HAVE_MPI = False
needs_mpi = pytest.mark.skipif(not HAVE_MPI, reason="mpi4py and mpirun are not installed (pip install -e '.[mpi]')")

NO_BN = TINY_TRAINING_YAML.replace("    - {name: bn1, type: batchnorm}\n", "")


def _env(**extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMIX_", "PRTE_"))}
    # the README's settings: root in containers, more ranks than cores, one thread per rank
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMP_NUM_THREADS="1",
               PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", **extra)
    return env


def _mpirun(k: int, *args: str, timeout: float = 120, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([MPIRUN, "-n", str(k), "--oversubscribe", str(BIN / "dlc"), *args], env=env or _env(),
                          capture_output=True, text=True, timeout=timeout)


def _dlc(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "dlc"), *args], env=_env(), capture_output=True, text=True, timeout=timeout)


def _yaml(folder: Path, name: str, text: str, batch: int, epochs: int = 2, extra: str = "") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text.replace("EPOCHS", str(epochs)).replace("batch_size: 16", f"batch_size: {batch}") + extra)
    return path


def _weights(folder: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict]:
    params, state, _, info = read_checkpoint(folder / "checkpoint.safetensors")
    return params, state, info


def _assert_same(a: dict[str, np.ndarray], b: dict[str, np.ndarray], tol: float) -> float:
    assert a.keys() == b.keys()
    worst = 0.0
    for k in a:
        # relative to the tensor's scale; a floor for tensors that are rounding noise (a conv bias before BN)
        err = float(np.abs(a[k] - b[k]).max() / max(float(np.abs(a[k]).max()), 1e-2))
        worst = max(worst, err)
        assert err < tol, (k, err)
    return worst


# --- pieces, no MPI needed ---------------------------------------------------------------------------------


def test_shards_of_every_global_batch_are_the_single_process_batch():
    data = Dataset(np.random.default_rng(0).random((50, 1, 2, 2), dtype=np.float32), np.arange(50) % 3, ["a", "b", "c"])
    one = BatchLoader(data, 12, [0.0], [1.0], seed=3)
    ranks = [BatchLoader(data, 4, [0.0], [1.0], seed=3) for _ in range(3)]
    for r, loader in enumerate(ranks):
        loader.shard(r, 3)
    assert len(one) == len(ranks[0]) == 50 // 12
    for epoch in (0, 1):
        singles = [y for _, y in one.epoch(epoch)]
        parts = [[y for _, y in loader.epoch(epoch)] for loader in ranks]
        for i, y in enumerate(singles):
            assert np.array_equal(np.concatenate([p[i] for p in parts]), y)  # rank order = position in the batch
    with pytest.raises(AssertionError):  # the check can fail: another epoch's order differs
        np.testing.assert_array_equal([y for _, y in one.epoch(0)][0], [y for _, y in one.epoch(1)][0])


def test_augmentation_draws_differ_per_rank_but_not_for_one_process():
    data = Dataset(np.zeros((8, 1, 2, 2), np.float32), np.zeros(8, np.int64), ["a"])
    a, b = BatchLoader(data, 2, [0.0], [1.0], seed=1), BatchLoader(data, 2, [0.0], [1.0], seed=1)
    assert a.batch_rng(0, 3).random() == b.batch_rng(0, 3).random() == np.random.default_rng([1, 0, 3, 1]).random()
    a.shard(0, 2)
    b.shard(1, 2)
    assert a.batch_rng(0, 3).random() != b.batch_rng(0, 3).random()


def test_gradient_buffer_round_trip_and_flags():
    params = {"b.w": np.zeros((2, 3), np.float32), "a.bias": np.zeros(4, np.float32)}
    buf = GradientBuffer(params)
    g = {"b.w": np.arange(6, dtype=np.float32).reshape(2, 3)}  # a.bias has no gradient this step: zeros
    flat = buf.pack(g, 1.5, 7, False, True)
    assert flat.size == 10 + GradientBuffer.EXTRA
    flat[:] *= 0.5  # as if averaged with a rank that sent zeros and no flags
    grads, loss, correct, bad, stop = buf.unpack(2)
    np.testing.assert_array_equal(grads["b.w"], g["b.w"] * 0.5)
    np.testing.assert_array_equal(grads["a.bias"], 0)
    assert (loss, correct, bad, stop) == (0.75, 7, False, True)
    buf.pack(g, float("nan"), 0, False, False)
    assert buf.unpack(1)[3] is True  # a NaN loss travels as a flag (NaN itself would poison the average)


def test_single_world_collectives_are_the_identity():
    w = World.single()
    x = np.arange(5, dtype=np.float32)
    assert w.allreduce_mean_(x) is x and np.array_equal(x, np.arange(5))
    assert np.array_equal(w.allreduce_sum(np.array([1.0, 2.0]), "t"), [1.0, 2.0])
    assert w.broadcast_json({"a": 1}, "t") == {"a": 1}
    assert (w.rank, w.size, w.is_root, w.distributed) == (0, 1, True, False)


def test_launcher_environment(monkeypatch):
    for var in launcher.SIZE_VARS + launcher.LOCAL_SIZE_VARS:
        monkeypatch.delenv(var, raising=False)
    assert launcher.launched_size() == 1
    monkeypatch.setenv("PMI_SIZE", "4")  # MPICH / Intel MPI
    monkeypatch.setenv("MPI_LOCALNRANKS", "2")
    assert (launcher.launched_size(), launcher.local_size()) == (4, 2)
    assert launcher.threads_per_rank(cpus=16) == 8 and launcher.threads_per_rank(cpus=1) == 1
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "3")  # the user's choice is kept
    launcher.share_threads()
    assert os.environ["OPENBLAS_NUM_THREADS"] == "3" and os.environ["OMP_NUM_THREADS"] == str(
        launcher.threads_per_rank())


def test_error_on_one_rank_names_it_and_aborts_the_job(monkeypatch, capsys):
    """A DlcError on one rank must stop every rank (MPI_Abort), not leave them waiting in a collective."""
    import typer

    from dlc.compiler import cli
    from dlc.compiler.errors import DlcError
    from dlc.compiler.train.trainer import TrainingDiverged

    class Fake:
        rank, size, is_root = 1, 2, False
        aborted: list[int] = []

        def abort(self, code):
            self.aborted.append(code)

    fake = Fake()
    monkeypatch.setattr(cli, "_mpi_world", lambda: fake)
    with pytest.raises(typer.Exit):
        cli._fail(DlcError("data/x.png: cannot read the image"))
    assert fake.aborted == [2]
    assert "rank 1 of 2: data/x.png: cannot read the image" in capsys.readouterr().err
    with pytest.raises(typer.Exit):  # every rank saw the NaN: rank 0 reports it, the others exit quietly
        cli._fail(TrainingDiverged("the loss became nan"))
    assert fake.aborted == [2] and "nan" not in capsys.readouterr().err


# --- real ranks under mpirun --------------------------------------------------------------------------------


@needs_mpi
def test_two_ranks_match_one_process_with_the_global_batch(tmp_path):
    one = _yaml(tmp_path, "one.yaml", NO_BN, 16, epochs=3)
    two = _yaml(tmp_path, "two.yaml", NO_BN, 8, epochs=3)
    r1 = _dlc("train", str(one), "-o", str(tmp_path / "o1"), "--json")
    r2 = _mpirun(2, "train", str(two), "-o", str(tmp_path / "o2"), "--json")
    assert r1.returncode == 0, r1.stderr
    assert r2.returncode == 0, r2.stdout + r2.stderr
    p1, s1, i1 = _weights(tmp_path / "o1")
    p2, s2, i2 = _weights(tmp_path / "o2")
    assert (i2["ranks"], i2["global_batch"], i1["global_batch"]) == (2, 16, 16)
    assert i1["solver_steps"] == i2["solver_steps"] == 3 * (96 // 16)
    _assert_same(p1, p2, 1e-5)
    _assert_same(s1, s2, 1e-5)  # momentum too
    h1 = json.loads((tmp_path / "o1" / "metrics.json").read_text())["epochs"]
    h2 = json.loads((tmp_path / "o2" / "metrics.json").read_text())["epochs"]
    for a, b in zip(h1, h2):  # the global batch's loss and accuracy, not rank 0's half
        assert abs(a["train_loss"] - b["train_loss"]) < 1e-5 * max(1.0, a["train_loss"])
        assert a["train_accuracy"] == b["train_accuracy"]
    assert not (tmp_path / "o2" / ".dlc.lock").exists()


@needs_mpi
def test_sync_bn_matches_batch_norm_over_the_global_batch(tmp_path):
    one = _yaml(tmp_path, "one.yaml", TINY_TRAINING_YAML, 16, epochs=2)
    synced = _yaml(tmp_path, "sync.yaml", TINY_TRAINING_YAML.replace("seed: 5}", "seed: 5, sync_bn: true}"), 8)
    local = _yaml(tmp_path, "local.yaml", TINY_TRAINING_YAML, 8, epochs=2)
    assert _dlc("train", str(one), "-o", str(tmp_path / "o1")).returncode == 0
    r = _mpirun(2, "train", str(synced), "-o", str(tmp_path / "sync"))
    assert r.returncode == 0, r.stdout + r.stderr
    r = _mpirun(2, "train", str(local), "-o", str(tmp_path / "local"))
    assert r.returncode == 0, r.stdout + r.stderr
    p1, s1, _ = _weights(tmp_path / "o1")
    ps, ss, _ = _weights(tmp_path / "sync")
    _assert_same(p1, ps, 1e-5)  # running mean and var included
    _assert_same(s1, ss, 1e-5)
    pl, _, _ = _weights(tmp_path / "local")
    with pytest.raises(AssertionError):  # per-rank statistics really are another computation
        _assert_same(p1, pl, 1e-3)


def _rank_pid(marker: str, rank: int, timeout: float = 30) -> int:
    """The pid of one rank of the job whose environment carries DLC_TEST_MARK=marker."""
    want = {f"DLC_TEST_MARK={marker}".encode(), f"OMPI_COMM_WORLD_RANK={rank}".encode()}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                env = set((proc / "environ").read_bytes().split(b"\0"))
            except OSError:
                continue
            if want <= env:
                return int(proc.name)
        time.sleep(0.1)
    raise AssertionError(f"rank {rank} did not start")


def _wait_for_epoch(folder: Path, epochs: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    path = folder / "checkpoint.safetensors"
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        if path.is_file():
            try:
                if read_checkpoint(path)[3]["epoch"] >= epochs:
                    return
            except Exception:  # noqa: BLE001 - being replaced this instant: look again
                pass
        time.sleep(0.05)
    raise AssertionError("no checkpoint in time")


SLOW = NO_BN.replace("samples: 120", "samples: 6000").replace("shape: [3, 8, 8]", "shape: [3, 16, 16]")


def _start(tmp_path: Path, marker: str, **env) -> tuple[subprocess.Popen, Path]:
    model = _yaml(tmp_path, "slow.yaml", SLOW, 8, epochs=12)
    out = tmp_path / "out"
    proc = subprocess.Popen([MPIRUN, "-n", "2", "--oversubscribe", str(BIN / "dlc"), "train", str(model), "-o",
                             str(out)], env=_env(DLC_TEST_MARK=marker, **env), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    return proc, out


@needs_mpi
def test_a_killed_rank_stops_the_job_and_the_run_resumes_on_one_process(tmp_path):
    marker = uuid.uuid4().hex
    proc, out = _start(tmp_path, marker)
    try:
        _wait_for_epoch(out, 1, proc)
        os.kill(_rank_pid(marker, 1), signal.SIGKILL)
        started = time.monotonic()
        _, stderr = proc.communicate(timeout=60)
        assert time.monotonic() - started < 60 and proc.returncode != 0
    finally:
        proc.kill()
    params, _, _, info = read_checkpoint(out / "checkpoint.safetensors")  # intact: its checksum is verified
    assert info["epoch"] >= 1 and info["ranks"] == 2 and info["global_batch"] == 16
    # resume with K = 1: global batch 16 -> 8, the epoch's position kept, training runs to the end
    model = out.parent / "slow.yaml"
    r = _dlc("train", str(model), "-o", str(out), "--resume", timeout=300)
    assert r.returncode == 0, r.stderr
    assert "global batch 16 → 8" in r.stderr
    done = read_checkpoint(out / "checkpoint.safetensors")[3]
    assert done["epoch"] == 12 and done["ranks"] == 1 and done["stopped"] == "completed"


@needs_mpi
def test_a_hung_rank_trips_the_watchdog(tmp_path):
    marker = uuid.uuid4().hex
    proc, out = _start(tmp_path, marker, DLC_MPI_TIMEOUT="3")
    pid = None
    try:
        _wait_for_epoch(out, 1, proc)
        pid = _rank_pid(marker, 1)
        os.kill(pid, signal.SIGSTOP)  # alive but silent: no launcher notices, only the watchdog
        started = time.monotonic()
        _, stderr = proc.communicate(timeout=90)
        waited = time.monotonic() - started
    finally:
        if pid is not None:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.kill()
    assert proc.returncode != 0 and waited < 60
    assert "rank 0: waited 3 s in the gradient allreduce" in stderr
    assert read_checkpoint(out / "checkpoint.safetensors")[3]["epoch"] >= 1


@needs_mpi
def test_a_rank_failing_before_it_joins_stops_the_job(tmp_path):
    """MPMD: rank 1 gets a limit its model breaks, so it fails at load while rank 0 waits to start."""
    model = _yaml(tmp_path, "m.yaml", NO_BN, 8)
    started = time.monotonic()
    r = subprocess.run([MPIRUN, "--oversubscribe", "-n", "1", str(BIN / "dlc"), "train", str(model), "-o",
                        str(tmp_path / "o"), ":", "-n", "1", "-x", "DLC_LIMITS=layers=2", str(BIN / "dlc"), "train",
                        str(model), "-o", str(tmp_path / "o")], env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and time.monotonic() - started < 100
    assert "layers" in r.stdout + r.stderr


@needs_mpi
def test_compile_under_mpirun_writes_one_model_from_rank_0(tmp_path):
    model = _yaml(tmp_path, "m.yaml", TINY_TRAINING_YAML.replace("seed: 5}", "seed: 5, sync_bn: true}"), 8)
    r = _mpirun(2, "compile", str(model), "-o", str(tmp_path / "o"), "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads(r.stdout)  # one report: the other rank prints nothing
    assert report["training"]["epochs"] == 2 and (tmp_path / "o" / "model.onnx").is_file()
    assert read_checkpoint(tmp_path / "o" / "checkpoint.safetensors")[3]["ranks"] == 2


def test_help_says_how_to_enable_mpi():
    r = _dlc("train", "--help")
    assert "mpirun -n K dlc train" in r.stdout and ".[mpi]" in r.stdout


@needs_mpi
def test_an_error_on_one_rank_mid_epoch_names_the_rank_and_stops_every_rank(tmp_path):
    """A corrupt image is read by the one rank whose shard holds it: that rank's error must stop the job."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for name in ("a", "b", "c"):
        (tmp_path / "imgs" / name).mkdir(parents=True)
        for i in range(12):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "imgs" / name / f"{i}.png")
    bad = tmp_path / "imgs" / "b" / "5.png"
    bad.write_bytes(bad.read_bytes()[:60])
    model = tmp_path / "m.yaml"
    model.write_text(NO_BN.replace("data: {dataset: synthetic, samples: 120, num_classes: 3, seed: 1}",
                                   "data: {dataset: imagefolder, root: imgs, load: lazy, val_fraction: 0.1, seed: 2}")
                     .replace("EPOCHS", "3").replace("batch_size: 16", "batch_size: 4"))
    started = time.monotonic()
    r = _mpirun(2, "train", str(model), "-o", str(tmp_path / "o"), timeout=120)
    out = r.stdout + r.stderr
    assert r.returncode != 0 and time.monotonic() - started < 60
    assert "of 2: " in out and "5.png" in out and "cannot read image" in out


@needs_mpi
def test_ranks_option_runs_mpirun_itself(tmp_path):
    model = _yaml(tmp_path, "m.yaml", NO_BN, 8, epochs=1)
    r = _dlc("train", str(model), "-o", str(tmp_path / "o"), "--ranks", "2")
    assert r.returncode == 0, r.stdout + r.stderr
    info = read_checkpoint(tmp_path / "o" / "checkpoint.safetensors")[3]
    assert (info["ranks"], info["global_batch"]) == (2, 16)


def test_ranks_option_is_taken_out_of_the_ranks_command_line():
    assert launcher.without_ranks_option(["train", "m.yaml", "--ranks", "2", "-o", "x", "--ranks=3"]) == [
        "train", "m.yaml", "-o", "x"]


SEG = """model:
  name: micro_unet
  input: {name: image, shape: [3, 16, 16], mean: 0.3, std: 0.3}
  layers:
    - {name: enc1, type: conv, out: 4, kernel: 3, pad: 1, bias: false}
    - {name: bn1, type: batchnorm}
    - {name: relu1, type: relu}
    - {name: pool1, type: maxpool, kernel: 2, stride: 2}
    - {name: up, type: conv_transpose, out: 4, kernel: 2, stride: 2}
    - {name: cat, type: concat, inputs: [up, relu1]}
    - {name: head, type: conv, out: 3, kernel: 1}
data: {dataset: synthetic_segmentation, samples: 80, num_classes: 3, val_fraction: 0.2}
train: {solver: adam, base_lr: 0.01, batch_size: 16, epochs: 2, seed: 0, sync_bn: true}
"""

DET = """model:
  name: micro_detector
  input: {name: image, shape: [3, 32, 32], mean: 0.3, std: 0.3}
  layers:
    - {name: conv1, type: conv, out: 8, kernel: 3, stride: 2, pad: 1}
    - {name: relu1, type: relu}
    - {name: conv2, type: conv, out: 8, kernel: 3, stride: 2, pad: 1}
    - {name: relu2, type: relu}
    - {name: head4, type: conv, out: 14, kernel: 1}
    - {name: detect, type: detect, inputs: [head4], classes: 2, anchors: auto, anchors_per_scale: 2}
data: {dataset: synthetic_detection, samples: 80, num_classes: 2, val_fraction: 0.2}
train: {solver: adam, base_lr: 0.01, batch_size: 16, epochs: 2, seed: 0}
"""


@needs_mpi
def test_segmentation_under_two_ranks_matches_one_process(tmp_path):
    """Every rank's masks have the same number of pixels (no ignored ones here), so the per-rank mean losses
    average to the global one, and with sync_bn the weights match."""
    one = _yaml(tmp_path, "one.yaml", SEG, 16)
    two = _yaml(tmp_path, "two.yaml", SEG, 8)
    assert _dlc("train", str(one), "-o", str(tmp_path / "o1")).returncode == 0
    r = _mpirun(2, "train", str(two), "-o", str(tmp_path / "o2"))
    assert r.returncode == 0, r.stdout + r.stderr
    _assert_same(_weights(tmp_path / "o1")[0], _weights(tmp_path / "o2")[0], 1e-5)
    h = json.loads((tmp_path / "o2" / "metrics.json").read_text())["epochs"]
    assert len(h) == 2 and 0 < h[-1]["val_miou"] <= 1


@needs_mpi
def test_a_detector_trains_under_two_ranks_with_rank_0s_anchors(tmp_path):
    one = _yaml(tmp_path, "one.yaml", DET, 16)
    two = _yaml(tmp_path, "two.yaml", DET, 8)
    assert _dlc("train", str(one), "-o", str(tmp_path / "o1")).returncode == 0
    r = _mpirun(2, "train", str(two), "-o", str(tmp_path / "o2"))
    assert r.returncode == 0, r.stdout + r.stderr
    i1, i2 = _weights(tmp_path / "o1")[2], _weights(tmp_path / "o2")[2]
    assert i1["anchors"] == i2["anchors"] and i2["ranks"] == 2  # k-means on the same training boxes
    h = json.loads((tmp_path / "o2" / "metrics.json").read_text())["epochs"]
    assert len(h) == 2 and np.isfinite(h[-1]["train_loss"]) and "val_map" in h[-1]
