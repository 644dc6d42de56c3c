"""`dlc prune`: a YAML model or an ONNX file in, a physically smaller ONNX file out that runs; fine-tuned when
there is data (the YAML's own, or --data), and saying so when there is not."""

import json

import numpy as np
import onnxruntime as ort
from test_prune_pipeline import tiny
from typer.testing import CliRunner

from dlc.compiler.cli import app
from dlc.compiler.pipeline import compile_model

from helpers import ROOT

runner = CliRunner()


def _run(path, x):
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x})[0]


def test_prune_yaml_and_onnx_without_fine_tuning(tmp_path):
    text = (ROOT / "examples/resnet20.yaml").read_text()
    (tmp_path / "resnet20.yaml").write_text(text[:text.index("\ndata:")] + "\n")  # no data: nothing to fine-tune
    result = runner.invoke(app, ["prune", str(tmp_path / "resnet20.yaml"), "-o", str(tmp_path / "p.onnx"),
                                 "--ratio", "0.5", "--allow-untrained", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["after"]["params"] < report["before"]["params"] / 2
    assert report["after"]["macs"] < report["before"]["macs"] / 2
    assert report["fine_tuned"] is False and report["config"]["method"] == "structured"
    assert json.loads((tmp_path / "p.json").read_text())["after"] == report["after"]  # the report beside OUT
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    assert _run(tmp_path / "p.onnx", x).shape == (2, 10)

    base = compile_model(ROOT / "examples/mobilenet_small.yaml", tmp_path / "mb", skip_train=True).onnx_path
    result = runner.invoke(app, ["prune", str(base), "-o", str(tmp_path / "mb.onnx"), "--importance", "bn_scale",
                                 "--round-to", "8", "--skip", "stem"])
    assert result.exit_code == 0, result.output
    assert "not fine-tuned: no data to fine-tune with" in result.stdout
    assert (tmp_path / "mb.onnx").stat().st_size < base.stat().st_size / 2
    assert _run(tmp_path / "mb.onnx", x).shape == (2, 10)


def test_prune_fine_tunes_yaml_and_onnx_with_data(tmp_path):
    path = tiny(tmp_path)
    result = runner.invoke(app, ["train", str(path), "-o", str(tmp_path / "t"), "--json"])
    assert result.exit_code == 0, result.output
    weights = tmp_path / "t/checkpoint.safetensors"
    result = runner.invoke(app, ["prune", str(path), "--weights", str(weights), "-o", str(tmp_path / "y.onnx"),
                                 "--ratio", "0.75", "--steps", "2", "--lr", "0.02"])
    assert result.exit_code == 0, result.output
    assert "val acc fine-tuned" in result.stdout and "accuracy    0." in result.stdout
    report = json.loads((tmp_path / "y.json").read_text())
    assert report["fine_tuned"] and [r["fine_tune_epochs"] for r in report["steps"]] == [1, 1]  # max(1, 3 // 4)
    assert (tmp_path / "y/prune/step_2/pruned.safetensors").is_file()

    onnx_in = compile_model(path, tmp_path / "c", weights=weights).onnx_path
    data_only = tmp_path / "data.yaml"
    data_only.write_text("data: {dataset: synthetic, samples: 300, num_classes: 4, seed: 1}\n"
                         "train: {base_lr: 0.02, batch_size: 16, epochs: 8}\n")
    result = runner.invoke(app, ["prune", str(onnx_in), "-o", str(tmp_path / "o.onnx"), "--data", str(data_only),
                                 "--method", "unstructured", "--ratio", "0.8", "--scope", "global", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["fine_tuned"] and report["steps"][0]["fine_tune_epochs"] == 2  # 8 // 4
    assert report["before"]["val_accuracy"] > 0.5
    assert report["sparsity"]["prunable"]["sparsity"] == 0.8
    assert report["sizes"]["sparse_compressed"] < report["sizes"]["dense_compressed"]
    x = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)
    assert _run(tmp_path / "o.onnx", x).shape == (2, 4)

    result = runner.invoke(app, ["prune", str(onnx_in), "-o", str(tmp_path / "n.onnx"), "--method", "unstructured",
                                 "--ratio", "0.5"])
    assert result.exit_code == 0, result.output
    assert "not fine-tuned" in result.stdout and "compressed" in result.stdout and "onnxruntime" in result.stdout
    result = runner.invoke(app, ["prune", str(path), "-o", str(tmp_path / "z.onnx"), "--fine-tune-epochs", "0",
                                 "--allow-untrained"])
    assert result.exit_code == 0 and "not fine-tuned: fine-tune epochs are 0" in result.stdout


def test_prune_bad_input(tmp_path):
    yaml = str(ROOT / "examples/resnet20.yaml")
    cases = [
        (["--method", "l1"], "--method must be one of structured, unstructured, got 'l1' (the importance criterion "
                             "is --importance)"),
        (["--importance", "magic"], "unknown importance method 'magic' for structured pruning"),
        (["--method", "unstructured", "--importance", "l1"], "unknown importance method 'l1' for unstructured"),
        (["--ratio", "1.0"], "--ratio must be in [0, 1)"),
        (["--scope", "everywhere"], "--scope must be one of layer, global, got 'everywhere'"),
        (["--skip", "conv9"], "--skip 'conv9' matches no layer of the model; did you mean 'conv1'?"),
        (["--data", str(tmp_path / "missing.yaml")], "file not found"),
    ]
    for flags, message in cases:
        result = runner.invoke(app, ["prune", yaml, "-o", str(tmp_path / "p.onnx"), *flags])
        assert result.exit_code == 2 and message in result.stderr, (flags, result.output)
    result = runner.invoke(app, ["prune", yaml])
    assert result.exit_code == 2 and "give the output file: -o OUT.onnx" in result.stderr
    (tmp_path / "bad.onnx").write_bytes(b"nope")
    result = runner.invoke(app, ["prune", str(tmp_path / "bad.onnx"), "-o", str(tmp_path / "p.onnx")])
    assert result.exit_code == 2 and not (tmp_path / "p.onnx").exists()
    (tmp_path / "nodata.yaml").write_text("train: {epochs: 2}\n")
    result = runner.invoke(app, ["prune", yaml, "-o", str(tmp_path / "p.onnx"), "--data",
                                 str(tmp_path / "nodata.yaml")])
    assert result.exit_code == 2 and "--data needs a YAML file with a 'data:' section" in result.stderr


def test_round_to_auto_keeps_multiples_of_onnxruntimes_channel_block(tmp_path, monkeypatch):
    import onnx

    from dlc.compiler.prune import config

    text = (ROOT / "examples/resnet20.yaml").read_text()
    (tmp_path / "r.yaml").write_text(text[:text.index("\ndata:")] + "\n")
    for features, block in (({"AVX512F": True, "AVX2": True}, 16), ({"AVX2": True}, 8), ({}, 1)):
        monkeypatch.setattr("dlc._C.cpu_features", lambda f=features: f)
        assert config.auto_round_to() == block
    monkeypatch.setattr("dlc._C.cpu_features", lambda: {"AVX512F": True})
    result = runner.invoke(app, ["prune", str(tmp_path / "r.yaml"), "-o", str(tmp_path / "p.onnx"), "--ratio", "0.6",
                                 "--round-to", "auto", "--allow-untrained", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["config"]["round_to"] == 16 and report["config"]["round_to_auto"] is True
    pruned = onnx.load(tmp_path / "p.onnx").graph
    inits = {t.name: t.dims[0] for t in pruned.initializer}
    outs = [inits[n.input[1]] for n in pruned.node if n.op_type == "Conv"]
    assert outs and all(o % 16 == 0 for o in outs) and min(outs) == 16  # 16 * 0.4 = 6.4 -> 16, not 7
    assert sorted(set(outs)) == [16, 32]  # 32 * 0.4 -> 16, 64 * 0.4 = 25.6 -> 32
    result = runner.invoke(app, ["prune", str(tmp_path / "r.yaml"), "-o", str(tmp_path / "q.onnx"),
                                 "--round-to", "eight", "--allow-untrained"])
    assert result.exit_code == 2 and "--round-to is a channel multiple (an integer >= 1) or auto" in result.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text(text + "prune: {round_to: sixteen}\n")
    from helpers import errors_of

    assert any("'prune.round_to' is a channel multiple (an integer >= 1) or auto" in e for e in errors_of(bad.read_text()))
    good = load_model_text_ok(text + "prune: {round_to: auto}\n")
    assert good.prune.round_to == 16 and good.prune.round_to_auto


def load_model_text_ok(text):
    from dlc.compiler.frontend import load_model_text

    return load_model_text(text, "m.yaml")
