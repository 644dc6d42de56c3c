"""Transfer learning: train.init_from (ONNX, safetensors, a dlc import folder), the transfer report, strict,
reinit, freeze / transfer regimes, and batch norm in frozen layers (running statistics, no update)."""

import json

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from dlc.compiler.cli import app
from dlc.compiler.errors import DlcError
from dlc.compiler.export_onnx import to_onnx
from dlc.compiler.frontend import load_model, load_model_text
from dlc.compiler.train.checkpoint import save_checkpoint
from dlc.compiler.train.executor import Executor
from dlc.compiler.train.trainer import Trainer

from helpers import check_param_grad, randomize_weights

runner = CliRunner()

# The pretrained network: 5 classes. The target below keeps its trunk, has a 3-class head and one new layer.
SOURCE = """model:
  name: source
  input: {shape: [3, 8, 8], mean: 0.5, std: 0.25}
  layers:
    - {name: c1, type: conv, out: 6, kernel: 3, pad: 1}
    - {name: bn1, type: batchnorm}
    - {name: r1, type: relu}
    - {name: c2, type: conv, out: 8, kernel: 3, pad: 1, stride: 2}
    - {name: bn2, type: batchnorm}
    - {name: r2, type: relu}
    - {name: pool, type: global_avgpool}
    - {name: f, type: flatten}
    - {name: fc, type: linear, out: 5}
data: {dataset: synthetic, samples: 120, num_classes: 5, seed: 1}
"""

TARGET = """model:
  name: target
  input: {shape: [3, 8, 8], mean: 0.5, std: 0.25}
  layers:
    - {name: c1, type: conv, out: 6, kernel: 3, pad: 1}
    - {name: bn1, type: batchnorm}
    - {name: r1, type: relu}
    - {name: c2, type: conv, out: 8, kernel: 3, pad: 1, stride: 2}
    - {name: bn2, type: batchnorm}
    - {name: r2, type: relu}
    - {name: extra, type: conv, out: 8, kernel: 1}
    - {name: pool, type: global_avgpool}
    - {name: f, type: flatten}
    - {name: fc, type: linear, out: 3}
data: {dataset: synthetic, samples: 96, num_classes: 3, seed: 2}
train:
  base_lr: 0.05
  batch_size: 16
  epochs: 1
  seed: 3
TRAIN
"""

TRUNK = ("c1.weight", "c1.bias", "bn1.scale", "bn1.bias", "bn1.mean", "bn1.var", "c2.weight", "c2.bias",
         "bn2.scale", "bn2.bias", "bn2.mean", "bn2.var")


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """The source network with random weights and running statistics (not fillers: a copy must be visible),
    written as ONNX, as a safetensors checkpoint and as a `dlc import` folder."""
    root = tmp_path_factory.mktemp("transfer")
    graph = load_model_text(SOURCE, str(root / "source.yaml")).graph
    randomize_weights(graph, seed=11)
    rng = np.random.default_rng(12)
    for name in ("bn1", "bn2"):
        node = graph.node(name)
        node.params["mean"][...] = rng.normal(0, 0.5, node.params["mean"].shape)
        node.params["var"][...] = rng.uniform(0.5, 2.0, node.params["var"].shape)
    onnx.save(to_onnx(graph), root / "pretrained.onnx")
    save_checkpoint(root / "pretrained.safetensors", graph)
    result = runner.invoke(app, ["import", str(root / "pretrained.onnx"), "-o", str(root / "imported")])
    assert result.exit_code == 0, result.output
    values = {f"{n.name}.{k}": v.copy() for n in graph.nodes() for k, v in n.params.items()}
    return root, values


def target(root, train_lines: str, name="target.yaml"):
    path = root / name
    path.write_text(TARGET.replace("TRAIN", "\n".join(f"  {line}" for line in train_lines.strip().splitlines())))
    return path


def params_of(graph):
    return {f"{n.name}.{k}": v.copy() for n in graph.nodes() for k, v in n.params.items()}


@pytest.mark.parametrize("init_from", ["pretrained.onnx", "pretrained.safetensors", "imported"])
def test_init_from_copies_by_name_and_shape_and_reports_the_rest(source, tmp_path, init_from):
    root, values = source
    loaded = load_model(target(root, f"init_from: {init_from}", f"t_{init_from.replace('.', '_')}.yaml"))
    trainer = Trainer(loaded, tmp_path / "run", progress=False)
    report = trainer.transfer_report
    assert report["transferred"] == len(TRUNK) and report["tensors"] == len(TRUNK) + 4
    assert report["shape_mismatch"] == [{"tensor": "fc.weight", "source": [5, 8], "model": [3, 8]},
                                        {"tensor": "fc.bias", "source": [5], "model": [3]}]
    assert report["not_in_source"] == ["extra.weight", "extra.bias"]
    for key in TRUNK:
        layer, tensor = key.split(".")
        np.testing.assert_array_equal(loaded.graph.node(layer).params[tensor], values[key])
    # the head keeps its filler (not the source's first rows)
    assert not np.allclose(loaded.graph.node("fc").params["weight"], values["fc.weight"][:3])


def test_the_report_reaches_the_console_and_metrics(source, tmp_path):
    root, _ = source
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", str(target(root, "init_from: pretrained.onnx", "t_cli.yaml")), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert ("transferred 12 of 16 tensors from pretrained.onnx; reinitialised fc.weight (5×8 → 3×8), fc.bias (5 → 3): "
            "shape; not in the source: extra.weight, extra.bias") in result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["transfer"]["transferred"] == 12 and metrics["transfer"]["frozen"] == []
    compiled = tmp_path / "compiled"
    path = target(root, "init_from: pretrained.onnx\ntransfer: head", "t_compile.yaml")
    result = runner.invoke(app, ["compile", str(path), "-o", str(compiled)])
    assert result.exit_code == 0, result.output
    report = json.loads((compiled / "report.json").read_text())["training"]["transfer"]
    assert report["transferred"] == 12 and report["frozen"] == ["bn1", "bn2", "c1", "c2", "extra", "f", "pool", "r1",
                                                                "r2"]


def test_strict_refuses_a_mismatch_unless_it_is_reinitialised(source):
    root, _ = source
    with pytest.raises(DlcError, match=r"strict: 4 tensor\(s\) do not transfer: fc.weight \(5×8 in the source, 3×8 "
                                       r"here\), fc.bias .*extra.weight \(not in the source\)"):
        Trainer(load_model(target(root, "init_from: pretrained.onnx\nstrict: true", "t_strict.yaml")), root / "r",
                progress=False)
    loaded = load_model(target(root, "init_from: pretrained.onnx\nstrict: true\nreinit: [fc, extra]", "t_ok.yaml"))
    report = Trainer(loaded, root / "r2", progress=False).transfer_report
    assert report["reinit"] == ["extra.weight", "extra.bias", "fc.weight", "fc.bias"]


def test_reinit_keeps_the_filler_where_the_source_fits(source, tmp_path):
    root, values = source
    loaded = load_model(target(root, "init_from: pretrained.onnx\nreinit: c1", "t_reinit.yaml"))
    Trainer(loaded, tmp_path / "run", progress=False)
    assert not np.allclose(loaded.graph.node("c1").params["weight"], values["c1.weight"])
    np.testing.assert_array_equal(loaded.graph.node("c2").params["weight"], values["c2.weight"])


@pytest.mark.parametrize("train, frozen", [
    ("transfer: head", {"c1", "bn1", "r1", "c2", "bn2", "r2", "extra", "pool", "f"}),
    ("transfer: {partial: bn2}", {"c1", "bn1", "r1", "c2", "bn2"}),
    ("freeze: {up_to: bn1}", {"c1", "bn1"}),
    ("freeze: [c*, 'bn?']", {"c1", "bn1", "c2", "bn2"}),
    ("transfer: full", set()),
])
def test_frozen_layers_do_not_change_and_the_rest_trains(source, tmp_path, train, frozen):
    """One epoch: every tensor of a frozen layer, batch-norm running statistics included, is bit-identical to
    the pretrained value; every trainable tensor moved."""
    root, _ = source
    loaded = load_model(target(root, f"init_from: pretrained.onnx\n{train}", "t_freeze.yaml"))
    trainer = Trainer(loaded, tmp_path / "run", progress=False)
    assert trainer.frozen == frozen
    before = params_of(loaded.graph)
    trainer.run()
    after = params_of(loaded.graph)
    for key, value in before.items():
        layer = key.split(".")[0]
        if layer in frozen:
            np.testing.assert_array_equal(after[key], value, err_msg=key)
        elif key not in (f"c{i}.bias" for i in (1, 2) if f"bn{i}" not in frozen):
            # (a conv bias before a batch norm that normalises with the batch has a zero gradient)
            assert not np.array_equal(after[key], value), key
    if train == "transfer: head":  # nothing before the head trains: backward stops at fc
        assert trainer.executor.no_backward == frozen


def test_frozen_batchnorm_uses_running_statistics_and_its_gradient_is_exact():
    """With the batch norms frozen, a training forward equals the inference forward (running statistics, not
    the batch's) and leaves the statistics alone; c1's gradient through them matches finite differences."""
    graph = load_model_text(SOURCE.replace("out: 5", "out: 4").replace("num_classes: 5", "num_classes: 4"),
                            "m.yaml").graph
    randomize_weights(graph, seed=5)
    for name in ("bn1", "bn2"):
        bn = graph.node(name)
        bn.params["mean"][...] = np.linspace(-0.5, 0.7, bn.params["mean"].size)
        bn.params["var"][...] = np.linspace(0.4, 2.5, bn.params["var"].size)
    stats = params_of(graph)
    x = np.random.default_rng(1).normal(0, 1, (4, 3, 8, 8)).astype(np.float32)
    ex = Executor(graph)
    ex.set_frozen({"bn1", "bn2"}, set())
    eval_out = ex.forward(x)["fc"]
    train_out = ex.forward(x, train=True)["fc"]
    np.testing.assert_allclose(train_out, eval_out, rtol=1e-6, atol=1e-6 * np.abs(eval_out).max())
    for key in ("bn1.mean", "bn1.var", "bn2.mean", "bn2.var"):
        np.testing.assert_array_equal(params_of(graph)[key], stats[key])
    # unfrozen, the same forward normalises with the batch: other outputs, and the statistics move
    ex.set_frozen({"bn1"}, set())
    assert not np.allclose(ex.forward(x, train=True)["fc"], eval_out, rtol=1e-3)
    assert not np.array_equal(graph.node("bn2").params["mean"], stats["bn2.mean"])
    np.testing.assert_array_equal(graph.node("bn1").params["mean"], stats["bn1.mean"])
    for key in ("bn2.mean", "bn2.var"):
        graph.node("bn2").params[key.split(".")[1]][...] = stats[key]
    ex.set_frozen({"bn1", "bn2"}, set())
    weights = np.random.default_rng(2).normal(0, 1, (4, 4)).astype(np.float32)
    ex.forward(x, train=True)
    check_param_grad(ex, x, "fc", weights, "c1", "weight", ex.backward({"fc": weights})["c1"]["weight"])


@pytest.mark.parametrize("train, words", [
    ("init_from: missing.onnx", "'train.init_from' file"),
    ("init_from: ../outside.onnx", "must be a path inside the YAML file's folder"),
    ("init_from: pretrained.onnx\ntransfer: tail", "'train.transfer' must be head, full or {partial: LAYER}"),
    ("init_from: pretrained.onnx\ntransfer: {partial: nope}", "'train.transfer.partial' must name a layer"),
    ("init_from: pretrained.onnx\ntransfer: head\nfreeze: [c1]", "give 'train.transfer' or 'train.freeze', not both"),
    ("freeze: [zz*]", "'train.freeze': 'zz*' matches no layer"),
    ("reinit: 5", "'train.reinit' must be a layer name"),
])
def test_bad_transfer_settings_name_the_key(source, train, words):
    root, _ = source
    path = target(root, train, "t_bad.yaml")
    result = runner.invoke(app, ["train", str(path), "-o", str(root / "bad")])
    assert result.exit_code == 2 and words in result.output and "Traceback" not in result.output, result.output


def test_fine_tuning_after_pruning_does_not_restart_from_the_source(source):
    root, _ = source
    text = TARGET.replace("TRAIN", "  init_from: pretrained.onnx") + \
        "prune: {method: structured, amount: 0.5, fine_tune: {epochs: 1, init_from: pretrained.onnx}}\n"
    (root / "t_prune.yaml").write_text(text)
    with pytest.raises(DlcError, match=r"'prune.fine_tune.init_from' is not allowed: fine-tuning starts from the "
                                       "pruned weights"):
        load_model(root / "t_prune.yaml")
    (root / "t_prune.yaml").write_text(text.replace(", init_from: pretrained.onnx}", "}"))
    loaded = load_model(root / "t_prune.yaml")
    assert loaded.spec.train.transfer.init_from == "pretrained.onnx"
    assert loaded.prune.fine_tune.transfer.init_from is None


def test_cached_features_train_the_head_as_the_whole_network_would(source, tmp_path):
    """transfer: head with and without cache_features: the same head weights and the same history (up to
    float32 round-off from batching the trunk differently), the trunk skipped in the cached run, and the frozen
    trunk untouched."""
    root, values = source
    runs = {}
    for cached in (False, True):
        lines = f"init_from: pretrained.onnx\ntransfer: head\nepochs: 2\ncache_features: {str(cached).lower()}"
        loaded = load_model(target(root, lines.replace("epochs: 2\n", ""), f"t_cache{cached}.yaml"))
        trainer = Trainer(loaded, tmp_path / f"run{cached}", progress=False)
        result = trainer.run()
        runs[cached] = (params_of(loaded.graph), result.history, trainer)
    (plain, plain_history, _), (cached, cached_history, trainer) = runs[False], runs[True]
    assert trainer.executor.skip_forward == trainer.frozen and trainer.train_loader.features
    for key, value in plain.items():
        scale = np.abs(value).max() + 1e-12
        np.testing.assert_allclose(cached[key], value, rtol=0, atol=1e-5 * scale, err_msg=key)
    np.testing.assert_array_equal(cached["c1.weight"], values["c1.weight"])
    assert not np.allclose(cached["fc.weight"], trainer.graph.node("fc").params["weight"] * 0)  # trained, non-zero
    for a, b in zip(plain_history, cached_history):
        assert abs(a["val_loss"] - b["val_loss"]) <= 1e-5 * abs(a["val_loss"])
        assert a["val_accuracy"] == b["val_accuracy"]


@pytest.mark.parametrize("train, words", [
    ("cache_features: true", "no layer is frozen at the start of the network"),
    ("init_from: pretrained.onnx\ntransfer: full\ncache_features: true", "no layer is frozen"),
])
def test_cache_features_needs_a_frozen_trunk(source, tmp_path, train, words):
    root, _ = source
    with pytest.raises(DlcError, match=words):
        Trainer(load_model(target(root, train, "t_cache_bad.yaml")), tmp_path / "run", progress=False)


def test_cache_features_refuses_augmentation_and_dropout_in_the_trunk(source, tmp_path):
    root, _ = source
    text = TARGET.replace("TRAIN", "  init_from: pretrained.onnx\n  transfer: head\n  cache_features: true")
    (root / "t_aug.yaml").write_text(text.replace("seed: 2}", "seed: 2, augment: {mirror: true}}"))
    with pytest.raises(DlcError, match="data.augment changes the inputs every epoch"):
        Trainer(load_model(root / "t_aug.yaml"), tmp_path / "a", progress=False)
    (root / "t_drop.yaml").write_text(text.replace("    - {name: pool,", "    - {name: drop, type: dropout, "
                                                                         "ratio: 0.3}\n    - {name: pool,"))
    with pytest.raises(DlcError, match="the frozen trunk holds dropout layer 'drop'"):
        Trainer(load_model(root / "t_drop.yaml"), tmp_path / "d", progress=False)
