"""Checkpoints you can trust: the training state in the header is checked before --resume uses it, the tensors
carry a sha256 (bit rot is caught), a write killed with SIGKILL leaves no stale temporary file behind once the
next run starts, and --resume without a checkpoint says how to start."""

import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load, save
from typer.testing import CliRunner

from dlc.compiler.cli import app
from dlc.compiler.errors import DlcError
from dlc.compiler.frontend import load_model
from dlc.compiler.train.checkpoint import read_checkpoint, tensors_sha256
from dlc.compiler.train.trainer import CHECKPOINT, Trainer

from helpers import tiny_training_yaml as tiny

runner = CliRunner()


def raw(path):
    """(tensors with their prefixes, the 'dlc' metadata text) of a checkpoint file."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    return load(data), json.loads(data[8:8 + n])["__metadata__"]["dlc"]


def rewrite(path, info_text, tensors=None):
    tensors = tensors if tensors is not None else raw(path)[0]
    path.write_bytes(save(tensors, metadata={"dlc": info_text}))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-epoch run interrupted at the first iteration of epoch 2 (as Ctrl-C leaves it), and its YAML."""
    root = tmp_path_factory.mktemp("trained")
    path = tiny(root)
    trainer = Trainer(load_model(path), root / "run", progress=False)
    original = trainer.solver.step
    calls = {"n": 0}

    def step(grads, lr):
        calls["n"] += 1
        if calls["n"] == trainer.iters_per_epoch + 1:
            trainer._interrupted = True
        return original(grads, lr)

    trainer.solver.step = step
    assert trainer.run().stopped == "interrupted"
    return root, path


def fresh_copy(trained, tmp_path):
    root, path = trained
    shutil.copytree(root / "run", tmp_path / "run")
    return path, tmp_path / "run"


def resume(path, run):
    return Trainer(load_model(path), run, progress=False).run(resume=True)


def test_a_sound_checkpoint_resumes_and_stores_a_tensor_hash(trained, tmp_path):
    path, run = fresh_copy(trained, tmp_path)
    tensors, text = raw(run / CHECKPOINT)
    info = json.loads(text)
    assert info["tensors_sha256"] == tensors_sha256(tensors) and len(info["tensors_sha256"]) == 64
    assert info["stopped"] == "interrupted" and isinstance(info["seed"], int) and info["train_sha256"]
    result = resume(path, run)
    assert result.stopped == "completed" and len(result.history) == 2
    assert json.loads(raw(run / CHECKPOINT)[1])["stopped"] == "completed"


def test_a_flipped_byte_in_tensor_data_is_caught(trained, tmp_path):
    _, run = fresh_copy(trained, tmp_path)
    ckpt = run / CHECKPOINT
    data = bytearray(ckpt.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")
    middle = start + (len(data) - start) // 2
    data[middle] ^= 0x10
    load(bytes(data))  # safetensors itself notices nothing
    ckpt.write_bytes(bytes(data))
    with pytest.raises(DlcError, match="do not match their sha256") as info:
        read_checkpoint(ckpt)
    assert str(ckpt) in str(info.value)
    path = tmp_path / "tiny.yaml"
    shutil.copy(trained[1], path)
    result = runner.invoke(app, ["train", str(path), "-o", str(run), "--resume"])
    assert result.exit_code == 2 and "corrupt" in result.stderr and "Traceback" not in result.output


def test_an_old_checkpoint_without_hash_is_accepted_with_a_note(trained, tmp_path):
    path, run = fresh_copy(trained, tmp_path)
    tensors, text = raw(run / CHECKPOINT)
    info = json.loads(text)
    del info["tensors_sha256"]
    rewrite(run / CHECKPOINT, json.dumps(info), tensors)
    read_checkpoint(run / CHECKPOINT)  # no hash: read unchecked
    shutil.copy(trained[1], tmp_path / "tiny.yaml")
    result = runner.invoke(app, ["train", str(tmp_path / "tiny.yaml"), "-o", str(run), "--resume"])
    assert result.exit_code == 0, result.output
    assert "has no tensor checksum (written by an older dlc)" in result.stderr
    assert "trained tiny: 2 epochs" in result.stdout
    assert "tensors_sha256" in raw(run / CHECKPOINT)[1]  # the new checkpoint has one again


LONG = "x" * 5000


@pytest.mark.parametrize("key, value, expected", [
    ("epoch", None, "has no 'epoch'"),  # None: delete the key
    ("epoch", -1, "'epoch' must be an integer from 0 to 2, got -1"),
    ("epoch", 7, "'epoch' must be an integer from 0 to 2, got 7"),
    ("epoch", "1", "'epoch' must be an integer from 0 to 2, got \"1\""),
    ("epoch", True, "'epoch' must be an integer"),
    ("iteration", 10 ** 9, "'iteration' must be an integer from 0 to"),
    ("global_iteration", 3, "'global_iteration' must be epoch ×"),
    ("history", {"a": 1}, "'history' must be a list of 1 epoch records"),
    ("history", [], "'history' must be a list of 1 epoch records"),
    ("solver_steps", -3, "'solver_steps' must be an integer >= 0"),
    ("seed", 1.5, "'seed' must be an integer"),
    ("best_value", "good", "'best_value' must be a number or null"),
    ("partial", [1, 2], "'partial' must be null or an object"),
    ("yaml_sha256", 12, "'yaml_sha256' must be a sha256 string"),
    ("yaml_sha256", LONG, "different version"),
    ("classes", LONG, "'classes' must be a list of names"),
])
def test_bad_training_state_is_refused_by_key(trained, tmp_path, key, value, expected):
    path, run = fresh_copy(trained, tmp_path)
    tensors, text = raw(run / CHECKPOINT)
    info = json.loads(text)
    if value is None:
        del info[key]
    else:
        info[key] = value
    rewrite(run / CHECKPOINT, json.dumps(info), tensors)
    with pytest.raises(DlcError) as exc:
        resume(path, run)
    message = str(exc.value)
    assert expected in message and str(run / CHECKPOINT) in message
    assert len(message) < 600 and LONG not in message  # long values are cut


def test_bad_history_records(trained, tmp_path):
    path, run = fresh_copy(trained, tmp_path)
    tensors, text = raw(run / CHECKPOINT)
    info = json.loads(text)
    info["history"][0]["lr"] = float("nan")
    rewrite(run / CHECKPOINT, json.dumps(info), tensors)
    with pytest.raises(DlcError, match=r"'history\[0\]\.lr' must be finite"):
        resume(path, run)
    info["history"][0] = {"epoch": 5}
    rewrite(run / CHECKPOINT, json.dumps(info), tensors)
    with pytest.raises(DlcError, match=r"'history\[0\]' must be the record of epoch 1"):
        resume(path, run)
    # a record without what the curves and metrics.json read (once accepted, then a KeyError in plot_curves)
    info["history"][0] = {k: v for k, v in json.loads(text)["history"][0].items() if k != "val_accuracy"}
    rewrite(run / CHECKPOINT, json.dumps(info), tensors)
    with pytest.raises(DlcError, match=r"'history\[0\]' has no 'val_accuracy'"):
        resume(path, run)
    info["history"][0]["val_accuracy"] = "high"
    rewrite(run / CHECKPOINT, json.dumps(info), tensors)
    with pytest.raises(DlcError, match=r"'history\[0\]\.val_accuracy' must be a number"):
        resume(path, run)


@pytest.mark.parametrize("text, expected", [
    ("{not json", "'dlc' metadata is not JSON: {not json"),
    ("[1, 2, 3]", "must be a JSON object, got [1, 2, 3]"),
    ('"' + LONG + '"', "must be a JSON object"),
])
def test_header_that_is_not_a_json_object(trained, tmp_path, text, expected):
    path, run = fresh_copy(trained, tmp_path)
    rewrite(run / CHECKPOINT, text)
    with pytest.raises(DlcError) as exc:
        resume(path, run)
    assert expected in str(exc.value) and str(run / CHECKPOINT) in str(exc.value)
    assert len(str(exc.value)) < 400


def test_garbage_file_and_a_header_that_is_not_json(trained, tmp_path):
    path, run = fresh_copy(trained, tmp_path)
    (run / CHECKPOINT).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{this is not js}")
    with pytest.raises(DlcError, match="not a readable safetensors checkpoint"):
        resume(path, run)


def test_optimizer_state_must_fit_the_parameters(trained, tmp_path):
    path, run = fresh_copy(trained, tmp_path)
    tensors, text = raw(run / CHECKPOINT)
    info = json.loads(text)
    key = next(k for k in tensors if k.startswith("state/") and k.endswith("c1.weight"))

    def write(changed):
        rewrite(run / CHECKPOINT, json.dumps({**info, "tensors_sha256": tensors_sha256(changed)}), changed)

    write({**tensors, key: np.zeros((2, 2), np.float32)})
    with pytest.raises(DlcError, match=r"optimizer state '.*c1\.weight' has shape \[2, 2\], the parameter has "
                                       r"\[4, 3, 3, 3\]"):
        resume(path, run)
    write({k: v for k, v in tensors.items() if k != key})
    with pytest.raises(DlcError, match=r"no optimizer state '.*c1\.weight'"):
        resume(path, run)
    write({**tensors, "state/m/" + "z" * 300: np.zeros(3, np.float32)})
    with pytest.raises(DlcError, match="optimizer state this run does not have") as exc:
        resume(path, run)
    assert "z" * 100 not in str(exc.value)


def test_resume_before_the_first_checkpoint_says_how_to_start(tmp_path):
    path = tiny(tmp_path)
    result = runner.invoke(app, ["train", str(path), "-o", str(tmp_path / "new"), "--resume"])
    assert result.exit_code == 2
    assert f"no checkpoint in {tmp_path / 'new'} yet; run without --resume to start training" in result.stderr


def test_a_write_killed_with_sigkill_leaves_a_temp_file_the_next_run_removes(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    # A real SIGKILL in the middle of an atomic write: after the data is written, before the rename.
    code = ("import os, signal, sys; from dlc.compiler import atomic; "
            "os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL); "
            "atomic.write_bytes(sys.argv[1], b'half a checkpoint')")
    proc = subprocess.run([sys.executable, "-c", code, str(out / CHECKPOINT)], capture_output=True)
    assert proc.returncode == -signal.SIGKILL
    stale = [p.name for p in out.iterdir()]
    assert len(stale) == 1 and stale[0].startswith(f".{CHECKPOINT}.") and stale[0].endswith(".tmp")
    assert not (out / CHECKPOINT).exists()  # the target was never replaced
    (out / "snapshots").mkdir()
    (out / "snapshots/.epoch_0001.safetensors.ab_12cd3.tmp").write_bytes(b"x")
    keep = ["notes.tmp", ".mine.tmp", ".a.b.toolong123.tmp", ".data.ABCDEFGH.tmp"]  # not our pattern
    for name in keep:
        (out / name).write_text("user file")
    os.mkdir(out / ".dir.abcdefgh.tmp")  # a folder, not a file: kept
    result = runner.invoke(app, ["train", str(tiny(tmp_path, 1)), "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    assert "removed 2 temporary file(s)" in result.stderr
    left = sorted(p.name for p in out.iterdir())
    assert left == sorted([*keep, ".dir.abcdefgh.tmp", CHECKPOINT, "curves.png", "metrics.json", "snapshots"])
    assert list((out / "snapshots").iterdir()) == []
