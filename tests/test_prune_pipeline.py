"""The prune: section: parsing with YAML lines, iterative prune -> fine-tune, network slimming, unstructured steps,
and the prune stage of `dlc compile` (the exported model is the pruned one, checked against the backend)."""

import json

import numpy as np
import onnxruntime as ort
import pytest

from dlc.compiler.errors import DlcError
from dlc.compiler.frontend import load_model, load_model_text
from dlc.compiler.pipeline import compile_model
from dlc.compiler.prune import channel_groups, run_prune
from dlc.compiler.prune.pipeline import ValData, training_callbacks
from dlc.compiler.train.checkpoint import read_checkpoint
from dlc.compiler.train.executor import Executor
from dlc.compiler.train.trainer import train_model

from helpers import errors_of

MODEL = """model:
  name: tiny
  input: {shape: [3, 16, 16], mean: 0.5, std: 0.25}
  layers:
    - {name: c1, type: conv, out: 16, kernel: 3, pad: 1}
    - {name: bn1, type: batchnorm}
    - {name: r1, type: relu}
    - {name: p1, type: maxpool, kernel: 2}
    - {name: c2, type: conv, out: 16, kernel: 3, pad: 1}
    - {name: bn2, type: batchnorm}
    - {name: r2, type: relu}
    - {name: p2, type: maxpool, kernel: 2}
    - {name: f, type: flatten}
    - {name: fc, type: linear, out: 4}
"""
DATA = "data: {dataset: synthetic, samples: 300, num_classes: 4, seed: 1}\n"
TRAIN = "train: {base_lr: 0.05, batch_size: 16, epochs: 3, seed: 5}\n"


def tiny(tmp_path, prune="", data=True, train=True, name="tiny.yaml"):
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / name
    path.write_text(MODEL + (DATA if data else "") + (TRAIN if train else "") + prune)
    return path


def trained(tmp_path, prune=""):
    """The tiny model with its prune: section, trained 3 epochs (about a second)."""
    loaded = load_model(tiny(tmp_path, prune))
    train_model(loaded, tmp_path / "train", progress=False, callbacks=training_callbacks(loaded.prune))
    return loaded


def test_section_errors_name_their_lines():
    text = MODEL + DATA + TRAIN + """prune:
  method: structed
  amount: 1.5
  importance: l3
  layers: {c9: 0.2, c1: 2}
  exclude: [fc2]
  steps: 0
  schedule: gmp
  bn_l1: -1
  fine_tune:
    epochs: -1
    lr_policy: cosin
    bogus: 1
"""
    errs = errors_of(text)
    expect = {
        18: "'prune.method' must be one of structured, unstructured, got 'structed' (did you mean 'structured'?)",
        19: "'prune.amount' must be a number in [0, 1)",
        20: "'prune.importance' must be one of l1, l2, bn_scale, random, got 'l3'",
        21: "'prune.layers.c9' names 'c9', which matches no layer",
        22: "'prune.exclude' names 'fc2', which matches no layer (did you mean 'fc'?)",
        23: "'prune.steps' must be an integer >= 1, got 0",
        24: "'prune.schedule: gmp' (gradual magnitude pruning) is for method unstructured",
        25: "'prune.bn_l1' must be a number >= 0",
        27: "'prune.fine_tune.epochs' must be an integer >= 0",
        28: "'prune.fine_tune.lr_policy' must be one of fixed, step, multistep, exp, poly, cosine, got 'cosin' "
            "(did you mean 'cosine'?)",
        29: "unknown key 'bogus' in 'prune.fine_tune'",
    }
    for line, message in expect.items():
        assert any(e.startswith(f"m.yaml:{line}:") and message in e for e in errs), (line, message, errs)
    assert any("'prune.layers.c1' must be a number in [0, 1)" in e for e in errs)
    errs = errors_of(MODEL + DATA + "prune: {amont: 0.5, scope: globl}\n")
    assert any("unknown key 'amont' in 'prune' (did you mean 'amount'?)" in e for e in errs)
    assert any("prune.scope" in e and "globl" in e and "global" in e for e in errs), errs


def test_fine_tune_settings_and_data():
    m = load_model_text(MODEL + DATA + TRAIN + "prune: {amount: 0.3, fine_tune: {base_lr: 0.001, lr_policy: cosine}}\n",
                        "m.yaml")
    cfg = m.prune
    assert cfg.amount == 0.3 and cfg.fine_tune_epochs == 1  # max(1, 3 // 4)
    assert cfg.fine_tune.base_lr == 0.001 and cfg.fine_tune.lr_policy == "cosine"
    assert cfg.fine_tune.batch_size == 16 and cfg.fine_tune.seed == 5  # inherited from train:
    m = load_model_text(MODEL + "prune: {method: unstructured, amount: 0.9, scope: global}\n", "m.yaml")
    assert m.prune.importance == "magnitude" and m.prune.fine_tune_epochs == 0 and m.prune.fine_tune is None
    errs = errors_of(MODEL + "prune: {fine_tune: {epochs: 2}}\n")
    assert any("fine-tuning after pruning needs a 'data:' section" in e for e in errs)
    errs = errors_of(MODEL + DATA + "prune: {bn_l1: 0.001}\n")
    assert any("'prune.bn_l1' applies during training: it needs a 'train:' section" in e for e in errs)


def test_iterative_steps_reach_the_final_fraction(tmp_path):
    one = load_model(tiny(tmp_path, "prune: {amount: 0.75, layers: {c2: 0.5}}\n", data=False, train=False))
    res1 = run_prune(one, one.prune, tmp_path / "one")
    three = load_model(tiny(tmp_path, "prune: {amount: 0.75, steps: 3, layers: {c2: 0.5}}\n", data=False,
                            train=False, name="three.yaml"))
    res3 = run_prune(three, three.prune, tmp_path / "three")
    widths = [{g.producers[0]: g.size for g in channel_groups(m.graph)} for m in (one, three)]
    assert widths[0] == widths[1] == {"c1": 4, "c2": 8, "fc": 4}
    assert [round(r["amount"], 6) for r in res3.rows] == [0.0, round(1 - 0.25 ** (1 / 3), 6),
                                                          round(1 - 0.25 ** (2 / 3), 6), 0.75]
    c1 = [r["params"] for r in res3.rows]
    assert c1 == sorted(c1, reverse=True) and c1[-1] == res1.after["params"]
    assert not res3.fine_tuned and "not fine-tuned" in res3.notes[0]
    for k in (1, 2, 3):  # each step keeps its own model, at its own widths
        params, _, _, info = read_checkpoint(tmp_path / "three" / "prune" / f"step_{k}" / "pruned.safetensors")
        assert info["step"] == k
        assert params["c1.weight"].shape[0] == {1: 11, 2: 7, 3: 4}[k]


def test_fine_tuning_recovers_accuracy_after_an_aggressive_prune(tmp_path):
    loaded = trained(tmp_path, "prune: {amount: 0.75, steps: 2, fine_tune: {epochs: 2}}\n")
    result = run_prune(loaded, loaded.prune, tmp_path / "out")
    base = result.before["val_accuracy"]
    assert base > 0.6  # four classes: chance is 0.25
    for row in result.rows[1:]:
        assert row["fine_tune_epochs"] == 2
        assert row["val_accuracy"] > row["val_accuracy_pruned"] + 0.1
    history = json.loads((tmp_path / "out/prune/step_2/metrics.json").read_text())["epochs"]
    assert result.after["val_accuracy"] == pytest.approx(history[-1]["val_accuracy"])
    assert result.after["params"] < 0.25 * result.before["params"]


def test_unstructured_steps_hold_their_masks(tmp_path):
    loaded = trained(tmp_path, "prune: {method: unstructured, amount: 0.75, steps: 2, fine_tune: {epochs: 1}}\n")
    result = run_prune(loaded, loaded.prune, tmp_path / "out")
    assert [r["sparsity"] for r in result.rows] == pytest.approx([0.0, 0.5, 0.75], abs=1e-3)
    assert result.sparsity["prunable"]["sparsity"] == pytest.approx(0.75, abs=1e-3)
    for name in ("c1", "c2", "fc"):  # fine-tuning kept the zeros
        w = loaded.graph.node(name).params["weight"]
        assert (w == 0).mean() == pytest.approx(0.75, abs=0.01)
    sizes = result.sizes
    assert sizes["sparse_bytes"] == pytest.approx(sizes["dense_bytes"], rel=0.01)
    assert sizes["sparse_compressed"] < 0.6 * sizes["dense_compressed"]
    assert any("onnxruntime" in n for n in result.notes)


def test_network_slimming_makes_bn_scales_sparser(tmp_path):
    def gammas(loaded):
        return np.abs(np.concatenate([loaded.graph.node(b).params["scale"] for b in ("bn1", "bn2")]))

    plain = trained(tmp_path / "a", "prune: {importance: bn_scale, fine_tune: {epochs: 0}}\n")
    slim = trained(tmp_path / "b", "prune: {importance: bn_scale, bn_l1: 0.1, fine_tune: {epochs: 0}}\n")
    g0, g1 = gammas(plain), gammas(slim)
    assert g1.sum() < 0.85 * g0.sum()
    assert (g1 < 0.1 * g1.max()).sum() > (g0 < 0.1 * g0.max()).sum()


def test_compile_runs_the_prune_stage(tmp_path):
    path = tiny(tmp_path, "prune: {amount: 0.5, round_to: 4, fine_tune: {epochs: 1}}\n")
    plain = compile_model(tiny(tmp_path, name="plain.yaml"), tmp_path / "plain")
    result = compile_model(path, tmp_path / "out")
    pruning = result.report["pruning"]
    assert pruning["fine_tuned"] and pruning["before"]["params"] > pruning["after"]["params"]
    assert pruning["after"]["val_accuracy"] is not None and pruning["before"]["val_accuracy"] > 0.5
    assert result.report["summary"]["total_params"] == pruning["after"]["params"]
    assert result.onnx_path.stat().st_size < 0.6 * plain.onnx_path.stat().st_size
    assert (tmp_path / "out/checkpoint.safetensors").is_file()  # the trained model is kept
    # The same run again on the backend (training and fine-tuning repeat bit for bit): ONNX == Executor.
    loaded = load_model(path)
    params = read_checkpoint(tmp_path / "out/checkpoint.safetensors")[0]
    trained_once = load_model(path)
    from dlc.compiler.train.checkpoint import load_params_into

    load_params_into(trained_once.graph, params, "trained")
    run_prune(trained_once, trained_once.prune, tmp_path / "again")
    val = ValData.from_spec(loaded.spec, trained_once.graph)
    x = val.x[:32]
    sess = ort.InferenceSession(str(result.onnx_path), providers=["CPUExecutionProvider"])
    y_ort = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    g = trained_once.graph
    np.testing.assert_allclose(y_ort, Executor(g).forward(x)[g.outputs[0]], rtol=1e-4, atol=1e-5)
    assert val.accuracy(g) == pytest.approx(pruning["after"]["val_accuracy"])


def test_skip_train_prunes_without_fine_tuning(tmp_path):
    path = tiny(tmp_path, "prune: {amount: 0.5, fine_tune: {epochs: 2}}\n")
    report = compile_model(path, tmp_path / "out", skip_train=True).report
    assert report["pruning"]["fine_tuned"] is False and "not fine-tuned" in report["pruning"]["notes"][0]
    assert report["training"] == {"skipped": True}


def test_interrupted_fine_tune_keeps_the_last_step(tmp_path, monkeypatch):
    loaded = trained(tmp_path, "prune: {amount: 0.5, steps: 2, fine_tune: {epochs: 1}}\n")
    from dlc.compiler.train import trainer as trainer_module

    real = trainer_module.Trainer.run
    calls = []

    def run(self, resume=False):
        calls.append(self.out_dir.name)
        if len(calls) == 2:
            self._interrupted = True  # as Ctrl-C does: stops after the current iteration
        return real(self, resume)

    monkeypatch.setattr(trainer_module.Trainer, "run", run)
    with pytest.raises(DlcError, match="step 2 was interrupted; step 1's model in .*step_1 is kept"):
        run_prune(loaded, loaded.prune, tmp_path / "out")
    assert (tmp_path / "out/prune/step_1/pruned.safetensors").is_file()
    assert (tmp_path / "out/prune/step_1/model.onnx").is_file()
    assert not (tmp_path / "out/prune/step_2/pruned.safetensors").exists()
