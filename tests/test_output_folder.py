"""Output folders: one dlc train/compile per folder (a lock with the pid; a stale lock is taken over), reports
after a NaN stop, messages that never claim a checkpoint that is not there, `dlc predict -o FILE`, and
`dlc compile` reusing an up-to-date checkpoint instead of training again."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from dlc.compiler.cli import app
from dlc.compiler.frontend import load_model
from dlc.compiler.outdir import LOCK_NAME, claim_output_folder
from dlc.compiler.train.checkpoint import read_checkpoint
from dlc.compiler.train.trainer import CHECKPOINT, Trainer, TrainingDiverged

from helpers import tiny_training_yaml as tiny

runner = CliRunner()


def write_lock(folder, pid, host=None):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / LOCK_NAME).write_text(json.dumps({"pid": pid, "host": host or socket.gethostname()}))


@pytest.fixture
def live_pid():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc.pid
    proc.kill()
    proc.wait()


def dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # reaped: the pid names no process now
    return proc.pid


# --- the lock --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["train", "compile"])
def test_a_folder_in_use_by_a_live_process_is_refused(tmp_path, live_pid, command):
    out = tmp_path / "out"
    write_lock(out, live_pid)
    result = runner.invoke(app, [command, str(tiny(tmp_path)), "-o", str(out)])
    assert result.exit_code == 2, result.output
    assert f"pid {live_pid}" in result.stderr and "in use by another dlc" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert json.loads((out / LOCK_NAME).read_text())["pid"] == live_pid  # someone else's lock stays
    assert not (out / CHECKPOINT).exists()


def test_a_lock_from_another_host_is_refused(tmp_path):
    out = tmp_path / "out"
    write_lock(out, 1, host="elsewhere.example")
    result = runner.invoke(app, ["train", str(tiny(tmp_path)), "-o", str(out)])
    assert result.exit_code == 2 and "elsewhere.example" in result.stderr and LOCK_NAME in result.stderr


def test_a_stale_lock_is_reported_and_taken_over(tmp_path):
    out = tmp_path / "out"
    pid = dead_pid()
    write_lock(out, pid)
    result = runner.invoke(app, ["train", str(tiny(tmp_path, 1)), "-o", str(out)])
    assert result.exit_code == 0, result.output
    notes = [line for line in result.stderr.splitlines() if "stale lock" in line]
    assert len(notes) == 1 and f"pid {pid}" in notes[0]
    assert (out / CHECKPOINT).is_file() and not (out / LOCK_NAME).exists()  # released at exit


def test_the_lock_holds_our_pid_and_goes_at_errors_and_ctrl_c(tmp_path):
    out = tmp_path / "out"
    with claim_output_folder(out, "train") as folder:
        owner = json.loads((folder / LOCK_NAME).read_text())
        assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname() and owner["command"] == "train"
        with claim_output_folder(out, "train"):  # compile trains inside its own claim: nesting is fine
            pass
        assert (out / LOCK_NAME).exists()
    assert not (out / LOCK_NAME).exists()
    with pytest.raises(KeyboardInterrupt), claim_output_folder(out, "train"):
        raise KeyboardInterrupt
    assert not (out / LOCK_NAME).exists()
    result = runner.invoke(app, ["train", str(tiny(tmp_path)), "-o", str(out), "--resume"])  # fails inside
    assert result.exit_code == 2 and not (out / LOCK_NAME).exists()


def test_a_second_real_process_is_refused_while_the_first_trains(tmp_path):
    out = tmp_path / "out"
    path = tiny(tmp_path, 300)
    cmd = [sys.executable, "-m", "dlc.compiler.cli", "train", str(path), "-o", str(out), "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        import time

        deadline = time.time() + 60
        while not (out / LOCK_NAME).exists() and time.time() < deadline:
            time.sleep(0.02)
        second = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
        assert second.returncode == 2, second.stderr
        assert f"pid {first.pid}" in second.stderr and "Traceback" not in second.stderr
    finally:
        first.kill()
        first.wait()


@pytest.mark.parametrize("gap", [0.0, 0.05, 0.3])
def test_a_double_ctrl_c_prints_one_line_and_exits_130(tmp_path, gap):
    """Two SIGINTs `gap` seconds apart, landing in the training loop, in the checkpoint write or while the CLI
    exits: one `interrupted` line, exit status 130 (not killed by the signal), no traceback."""
    import signal
    import time

    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "dlc.compiler.cli", "train", str(tiny(tmp_path, 300)), "-o", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 60
        while not (out / CHECKPOINT).exists() and time.time() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGINT)
        time.sleep(gap)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    lines = [line for line in stderr.splitlines() if line.startswith("interrupted")]
    assert proc.returncode == 130 and len(lines) == 1 and "Traceback" not in stderr, (proc.returncode, stderr)
    read_checkpoint(out / CHECKPOINT)  # whichever write the signals cut, a whole checkpoint is there


def test_an_output_path_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    result = runner.invoke(app, ["train", str(tiny(tmp_path)), "-o", str(tmp_path / "file")])
    assert result.exit_code == 2 and "is a file, not a folder" in result.stderr


# --- NaN stops -------------------------------------------------------------------------------------------------
def nan_at(trainer, call):
    original, calls = trainer.loss, {"n": 0}

    def loss(logits, labels, weighted=True):
        value, grad = original(logits, labels, weighted)
        if weighted:
            calls["n"] += 1
            if calls["n"] >= call:
                return float("nan"), grad
        return value, grad

    trainer.loss = loss


def test_after_a_nan_stop_the_reports_hold_the_history_so_far(tmp_path):
    trainer = Trainer(load_model(tiny(tmp_path, 3)), tmp_path / "out", progress=False)
    nan_at(trainer, trainer.iters_per_epoch + 3)  # epoch 2, iteration 3
    with pytest.raises(TrainingDiverged) as exc:
        trainer.run()
    message = str(exc.value)
    assert "at epoch 2, iteration 3" in message
    assert f"the last good checkpoint (after epoch 1) is kept in {tmp_path / 'out' / CHECKPOINT}" in message
    _, _, _, info = read_checkpoint(tmp_path / "out" / CHECKPOINT)
    assert info["epoch"] == 1
    metrics = json.loads((tmp_path / "out/metrics.json").read_text())
    assert metrics["stopped"] == "diverged" and "epoch 2, iteration 3" in metrics["stop_reason"]
    assert [e["epoch"] for e in metrics["epochs"]] == [1] and np.isfinite(metrics["epochs"][0]["train_loss"])
    assert (tmp_path / "out/curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_nan_before_any_checkpoint_claims_none(tmp_path):
    trainer = Trainer(load_model(tiny(tmp_path)), tmp_path / "out", progress=False)
    nan_at(trainer, 1)
    with pytest.raises(TrainingDiverged) as exc:
        trainer.run()
    message = str(exc.value)
    assert "at epoch 1, iteration 1" in message and "no checkpoint was written" in message
    assert "is kept" not in message and not (tmp_path / "out" / CHECKPOINT).exists()
    metrics = json.loads((tmp_path / "out/metrics.json").read_text())
    assert metrics["stopped"] == "diverged" and metrics["epochs"] == []


def test_a_nan_next_to_an_earlier_runs_checkpoint_does_not_call_it_ours(tmp_path):
    Trainer(load_model(tiny(tmp_path, 1)), tmp_path / "out", progress=False).run()
    trainer = Trainer(load_model(tiny(tmp_path, 2)), tmp_path / "out", progress=False)
    nan_at(trainer, 2)
    with pytest.raises(TrainingDiverged, match=r"checkpoint.safetensors \(from an earlier run\) is left as it was"):
        trainer.run()


# --- dlc predict -o ----------------------------------------------------------------------------------------------
def test_predict_output_that_is_an_existing_file(tmp_path):
    path = tiny(tmp_path)
    built = runner.invoke(app, ["compile", str(path), "-o", str(tmp_path / "m"), "--skip-train"])
    assert built.exit_code == 0, built.output
    image = tmp_path / "a.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    (tmp_path / "taken").write_text("keep me")
    result = runner.invoke(app, ["predict", str(tmp_path / "m/model.onnx"), str(image), "-o", str(tmp_path / "taken")])
    assert result.exit_code == 2 and "is a file" in result.stderr and "Traceback" not in result.output
    assert (tmp_path / "taken").read_text() == "keep me"
    ok = runner.invoke(app, ["predict", str(tmp_path / "m/model.onnx"), str(image), "-o", str(tmp_path / "p")])
    assert ok.exit_code == 0 and (tmp_path / "p/predictions.json").is_file()  # a folder works


# --- dlc compile reuses an up-to-date checkpoint -----------------------------------------------------------------
def compile_json(path, out, *extra):
    result = runner.invoke(app, ["compile", str(path), "-o", str(out), "--json", *extra])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout), result.stderr


def test_compile_reuses_an_up_to_date_checkpoint(tmp_path):
    out = tmp_path / "out"
    path = tiny(tmp_path)
    first, _ = compile_json(path, out)
    assert first["training"]["epochs"] == 2 and "reused" not in first["training"]
    stamp = (out / CHECKPOINT).stat().st_mtime_ns
    second, stderr = compile_json(path, out)
    assert f"reusing the trained weights in {out / CHECKPOINT} (training section unchanged); pass --retrain" \
        in stderr
    assert second["training"]["reused"] == str(out / CHECKPOINT) and second["training"]["epochs"] == 2
    assert second["training"]["val_accuracy"] == first["training"]["val_accuracy"]
    assert second["onnx"]["sha256"] == first["onnx"]["sha256"]  # the same trained weights
    assert (out / CHECKPOINT).stat().st_mtime_ns == stamp  # not trained again
    # a comment and an optimize: section do not touch training: still reused
    path.write_text(path.read_text() + "# a comment\noptimize: {passes: [fold_bn]}\n")
    third, stderr = compile_json(path, out)
    assert "reusing the trained weights" in stderr and third["training"]["reused"]
    # --retrain trains anyway (bit for bit the same run: same weights)
    fourth, stderr = compile_json(path, out, "--retrain")
    assert "reused" not in fourth["training"] and "reusing" not in stderr
    assert (out / CHECKPOINT).stat().st_mtime_ns != stamp
    assert fourth["onnx"]["sha256"] == third["onnx"]["sha256"]


def test_compile_trains_again_when_the_checkpoint_is_stale(tmp_path):
    out = tmp_path / "out"
    compile_json(tiny(tmp_path, 1), out)
    changed, stderr = compile_json(tiny(tmp_path, 2), out)  # train.epochs changed
    assert f"{out / CHECKPOINT} is stale" in stderr and "training again" in stderr
    assert changed["training"]["epochs"] == 2 and "reused" not in changed["training"]
    path = tiny(tmp_path, 2, extra="").read_text().replace("out: 4", "out: 5")
    (tmp_path / "tiny.yaml").write_text(path)  # the model changed
    _, stderr = compile_json(tmp_path / "tiny.yaml", out)
    assert "is stale" in stderr


def test_compile_does_not_reuse_an_unfinished_run(tmp_path):
    out = tmp_path / "out"
    path = tiny(tmp_path, 2)
    trainer = Trainer(load_model(path), out, progress=False)
    trainer._interrupted = True  # stops after the first iteration, as Ctrl-C does
    assert trainer.run().stopped == "interrupted"
    report, stderr = compile_json(path, out)
    assert "holds an unfinished run" in stderr and "--resume" in stderr
    assert report["training"]["epochs"] == 2 and "reused" not in report["training"]
