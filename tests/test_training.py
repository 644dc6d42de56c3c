"""`dlc train` end to end on small synthetic runs: learning, outputs, exact resume, divergence, early stopping,
freezing, and `dlc compile` carrying the trained weights into the ONNX file."""

import json
import threading

import numpy as np
import onnxruntime as ort
import pytest

from dlc.compiler.errors import DlcError
from dlc.compiler.frontend import load_model, load_model_text
from dlc.compiler.pipeline import compile_model
from dlc.compiler.train.checkpoint import graph_tensors, read_checkpoint
from dlc.compiler.train.executor import Executor
from dlc.compiler.train.trainer import Trainer, TrainingDiverged

MODEL = """
model:
  name: tiny
  input: {shape: [3, 16, 16], mean: 0.5, std: 0.25}
  layers:
    - {name: c1, type: conv, out: 8, kernel: 3, pad: 1}
    - {name: bn1, type: batchnorm}
    - {name: r1, type: relu}
    - {name: p1, type: maxpool, kernel: 2}
    - {name: c2, type: conv, out: 8, kernel: 3, pad: 1}
    - {name: r2, type: relu}
    - {name: p2, type: maxpool, kernel: 2}
    - {name: f, type: flatten}
    - {name: d, type: dropout, ratio: 0.2}
    - {name: fc, type: linear, out: 4}
data: {dataset: synthetic, samples: 600, num_classes: 4, seed: 1, augment: {mirror: true, crop: 1}}
train:
  base_lr: 0.02
  lr_policy: fixed
  batch_size: 16
  epochs: EPOCHS
  seed: 5
"""


def tiny(tmp_path, epochs=3, extra=""):
    path = tmp_path / "tiny.yaml"
    path.write_text(MODEL.replace("EPOCHS", str(epochs)) + extra)
    return path


def test_trains_and_writes_outputs(tmp_path):
    loaded = load_model(tiny(tmp_path, epochs=4))
    result = Trainer(loaded, tmp_path / "out", progress=False).run()
    assert result.stopped == "completed" and len(result.history) == 4
    h = result.history
    assert h[-1]["train_loss"] < h[0]["train_loss"] * 0.8
    assert h[-1]["val_accuracy"] > 0.7  # four classes: chance is 0.25
    metrics = json.loads((tmp_path / "out/metrics.json").read_text())
    epoch = metrics["epochs"][-1]
    assert set(epoch) >= {"train_loss", "val_loss", "val_accuracy", "per_class", "confusion_matrix", "lr",
                          "images_per_s"}
    assert np.array(epoch["confusion_matrix"]).sum() == metrics["val_samples"]
    assert (tmp_path / "out/curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    params, state, _, info = read_checkpoint(tmp_path / "out/checkpoint.safetensors")
    assert "bn1.mean" in params and any(k.startswith("momentum/") for k in state)
    assert info["epoch"] == 4
    for key, value in graph_tensors(loaded.graph).items():
        np.testing.assert_array_equal(params[key], value)


def test_repeatable_bit_for_bit(tmp_path):
    a = Trainer(load_model(tiny(tmp_path, 2)), tmp_path / "a", progress=False)
    a.run()
    b = Trainer(load_model(tiny(tmp_path, 2)), tmp_path / "b", progress=False)
    b.run()
    for key, value in graph_tensors(a.graph).items():
        np.testing.assert_array_equal(value, graph_tensors(b.graph)[key])


def test_resume_after_interrupt_is_exact(tmp_path):
    reference = Trainer(load_model(tiny(tmp_path, 3)), tmp_path / "ref", progress=False)
    reference.run()
    interrupted = Trainer(load_model(tiny(tmp_path, 3)), tmp_path / "run", progress=False)
    # Interrupt part-way, as Ctrl-C does (the handler only sets this flag), at whatever iteration it lands.
    original_step = interrupted.solver.step
    calls = {"n": 0}

    def step(grads, lr):
        calls["n"] += 1
        if calls["n"] == 35:  # mid-epoch 2 (30 iterations an epoch)
            interrupted._interrupted = True
        return original_step(grads, lr)

    interrupted.solver.step = step
    assert interrupted.run().stopped == "interrupted"
    _, _, _, info = read_checkpoint(tmp_path / "run/checkpoint.safetensors")
    assert info["epoch"] == 1 and info["iteration"] == 5 and info["partial"]["seen"] == 5 * 16
    resumed = Trainer(load_model(tiny(tmp_path, 3)), tmp_path / "run", progress=False)
    result = resumed.run(resume=True)
    assert result.stopped == "completed" and len(result.history) == 3
    for key, value in graph_tensors(reference.graph).items():
        np.testing.assert_array_equal(value, graph_tensors(resumed.graph)[key], err_msg=key)
    ref_hist = json.loads((tmp_path / "ref/metrics.json").read_text())["epochs"]
    for a, b in zip(ref_hist, result.history):
        assert a["train_loss"] == b["train_loss"] and a["val_loss"] == b["val_loss"]


def test_resume_refuses_a_changed_yaml(tmp_path):
    Trainer(load_model(tiny(tmp_path, 1)), tmp_path / "out", progress=False).run()
    with pytest.raises(DlcError, match="different version"):
        Trainer(load_model(tiny(tmp_path, 2)), tmp_path / "out", progress=False).run(resume=True)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    path = tiny(tmp_path, 3)
    path.write_text(path.read_text().replace("base_lr: 0.02", "base_lr: 1.0e+8"))
    trainer = Trainer(load_model(path), tmp_path / "out", progress=False)
    with pytest.raises(TrainingDiverged, match=r"at epoch 1, iteration \d+"):
        trainer.run()
    assert not (tmp_path / "out/checkpoint.safetensors").exists()  # nothing good to keep yet, nothing bad written


def test_early_stopping_restores_best(tmp_path):
    extra = "  early_stopping: {monitor: val_accuracy, patience: 1, min_delta: 0.5}\n"
    path = tiny(tmp_path, 6)
    path.write_text(path.read_text() + extra)
    trainer = Trainer(load_model(path), tmp_path / "out", progress=False)
    result = trainer.run()
    assert result.stopped == "early_stopping" and result.best_epoch == 1 and len(result.history) == 2
    params, _, best, _ = read_checkpoint(tmp_path / "out/checkpoint.safetensors")
    for key, value in best.items():
        np.testing.assert_array_equal(params[key], value)  # the final weights are the best epoch's


def test_freeze_and_lr_mult(tmp_path):
    path = tiny(tmp_path, 1)
    path.write_text(path.read_text() + "  layers: {c1: {freeze: true}, 'c*': {lr_mult: 0.5}}\n")
    loaded = load_model(path)
    before = {k: v.copy() for k, v in graph_tensors(loaded.graph).items()}
    trainer = Trainer(loaded, tmp_path / "out", progress=False)
    assert trainer.solver.lr_mult["c1.weight"] == 0.5  # a later rule wins
    path.write_text(path.read_text().replace("'c*': {lr_mult: 0.5}", "'c2': {lr_mult: 0.5}"))
    loaded = load_model(path)
    Trainer(loaded, tmp_path / "out2", progress=False).run()
    after = graph_tensors(loaded.graph)
    np.testing.assert_array_equal(after["c1.weight"], before["c1.weight"])
    assert not np.array_equal(after["c2.weight"], before["c2.weight"])


def test_bad_train_sections_are_reported(tmp_path):
    text = MODEL.replace("EPOCHS", "0").replace("lr_policy: fixed", "lr_policy: stpe")
    text = text.replace("{dataset: synthetic,", "{dataset: synthetic, val_fraction: 2,")
    with pytest.raises(DlcError) as info:
        load_model_text(text + "  layers: {nope: {freeze: true}}\n", "m.yaml")
    messages = str(info.value)
    assert "'train.lr_policy' must be one of" in messages and "did you mean 'step'" in messages
    assert "'train.epochs' must be an integer in [1, 1e+06], got 0" in messages
    assert "'data.val_fraction' must be a finite number in [0, 0.9], got 2" in messages
    assert "'train.layers.nope' matches no layer" in messages
    with pytest.raises(DlcError, match="needs a 'data:' section"):
        load_model_text(MODEL.split("data:")[0] + "train: {epochs: 1}\n", "m.yaml")


def test_compile_trains_and_exports_trained_weights(tmp_path):
    result = compile_model(tiny(tmp_path, 2), tmp_path / "out")
    assert result.report["training"]["epochs"] == 2
    loaded = load_model(tiny(tmp_path, 2))
    params, _, _, _ = read_checkpoint(tmp_path / "out/checkpoint.safetensors")
    from dlc.compiler.train.checkpoint import load_params_into
    load_params_into(loaded.graph, params, "ckpt")
    x = np.random.default_rng(0).standard_normal((4, 3, 16, 16)).astype(np.float32)
    ours = Executor(loaded.graph).forward(x)["fc"]
    session = ort.InferenceSession(str(result.onnx_path), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"input": x})[0], ours, rtol=1e-4, atol=1e-5)
    # --weights: the same artifact without training again
    again = compile_model(tiny(tmp_path, 2), tmp_path / "again", weights=tmp_path / "out/checkpoint.safetensors")
    assert again.report["onnx"]["sha256"] == result.report["onnx"]["sha256"]


def test_loader_thread_overlaps(tmp_path):
    trainer = Trainer(load_model(tiny(tmp_path, 1)), tmp_path / "out", progress=False)
    names = []
    original = trainer.train_loader.make_batch

    def spy(*args):
        names.append(threading.current_thread().name)
        return original(*args)

    trainer.train_loader.make_batch = spy
    trainer.run()
    assert names and all(n.startswith("dlc-loader") for n in names)


def test_ctrl_c_writes_a_checkpoint_and_resume_finishes(tmp_path):
    """A real SIGINT to `dlc train`: exit 130 with a resume hint and a checkpoint on disk (exact resumption
    from such a checkpoint is tested above)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    path = tiny(tmp_path, 200)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "dlc.compiler.cli", "train", str(path), "-o", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while not (out / "checkpoint.safetensors").exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "--resume" in stderr and "Traceback" not in stderr
    _, _, _, info = read_checkpoint(out / "checkpoint.safetensors")
    assert 1 <= info["epoch"] < 200  # the run stopped part-way and said where


def test_max_iter_and_snapshots(tmp_path):
    path = tiny(tmp_path, 5)
    path.write_text(path.read_text() + "  max_iter: 45\n  snapshot_every: 1\n")
    result = Trainer(load_model(path), tmp_path / "out", progress=False).run()
    assert result.stopped == "max_iter" and len(result.history) == 2  # 30 iterations an epoch
    _, state, _, info = read_checkpoint(tmp_path / "out/checkpoint.safetensors")
    assert info["global_iteration"] == 45
    snaps = sorted(p.name for p in (tmp_path / "out/snapshots").iterdir())
    assert snaps == ["epoch_0001.safetensors", "epoch_0002.safetensors"]


def test_cli_train_and_time(tmp_path):
    from typer.testing import CliRunner

    from dlc.compiler.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["train", str(tiny(tmp_path, 1)), "-o", str(tmp_path / "o"), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["stopped"] == "completed" and 0 <= data["final"]["val_accuracy"] <= 1
    result = runner.invoke(app, ["time", str(tiny(tmp_path, 1)), "--batch", "8", "--iterations", "2", "--json"])
    timing = json.loads(result.stdout)
    assert [r["name"] for r in timing["layers"]][:2] == ["c1", "bn1"]
    assert all(r["forward_ms"] > 0 and r["backward_ms"] >= 0 for r in timing["layers"] if not r["fused_into"])
    fused = {r["name"]: r["fused_into"] for r in timing["layers"] if r["fused_into"]}
    assert fused and all(timing["layers"][[x["name"] for x in timing["layers"]].index(bn)]["type"] == "batchnorm"
                         for bn in fused.values())
    assert timing["layers"][0]["gflops"] > 0
    routes = {r["name"]: r["algorithm"] for r in timing["layers"]}
    assert routes["c1"] in {"winograd", "im2col", "numpy"} and routes["bn1"] is None  # conv rows name their route
    import dlc._C as native

    assert timing["isa"] == native.ISA == native.runnable_builds()[0]  # the best build this CPU runs
    result = runner.invoke(app, ["train", str(tmp_path / "missing.yaml")])
    assert result.exit_code == 2
