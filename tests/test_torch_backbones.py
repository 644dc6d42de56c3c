"""PyTorch exports of the newer backbones' distinctive parts (tests/fixtures/make_torch_fixtures.py): a
ShuffleNetV2 with torchvision's chunk-and-shuffle units and a ConvNeXt with its channels-last blocks, GELU and
LayerNorm2d. They import, compute torch's outputs, prune, and fine-tune from the export with init_from."""

import json
import shutil

import numpy as np
import onnxruntime as ort
import pytest
from typer.testing import CliRunner

from dlc.compiler.cli import app
from dlc.compiler.export_onnx import to_onnx
from dlc.compiler.onnx_import import import_onnx
from dlc.compiler.prune.structured import prune
from dlc.compiler.train.executor import Executor

from helpers import TORCH_FIXTURES, torch_fixture, torch_nets

EXPECT = {"shufflenet_v2": {"slice": 4, "transpose": 2, "conv": 7},
          "convnext": {"layernorm": 4, "gelu": 1, "conv": 5, "affine": 1}}


def _close(got, want):
    np.testing.assert_allclose(got.reshape(want.shape), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def _counts(graph):
    ops = [n.op for n in graph.nodes()]
    return {op: ops.count(op) for op in set(ops)}


@pytest.mark.parametrize("name", sorted(EXPECT))
def test_the_export_imports_and_computes_what_torch_computes(name):
    model, arrays = torch_fixture(name)
    graph = import_onnx(model, source=f"{name}.onnx")
    counts = _counts(graph)
    assert {op: counts.get(op, 0) for op in EXPECT[name]} == EXPECT[name], counts
    _close(Executor(graph).forward(arrays["x"])[graph.outputs[0]], arrays["want"])
    exported = to_onnx(graph)
    session = ort.InferenceSession(exported.SerializeToString(), providers=["CPUExecutionProvider"])
    _close(session.run(None, {exported.graph.input[0].name: arrays["x"]})[0], arrays["want"])


@pytest.mark.parametrize("name", sorted(EXPECT))
def test_a_live_export_by_the_installed_torch_imports_too(name):
    nets = torch_nets()
    model, x = nets.build(name)
    import onnx

    graph = import_onnx(onnx.load_from_string(nets.export(name, model)))
    _close(Executor(graph).forward(x)[graph.outputs[0]], nets.reference(model, x))


@pytest.mark.parametrize("name", sorted(EXPECT))
def test_structured_pruning_keeps_the_graph_valid(name):
    model, arrays = torch_fixture(name)
    graph = import_onnx(model)
    report = prune(graph, 0.5, "l1")
    assert any(r["after"] < r["before"] for r in report)
    out = Executor(graph).forward(arrays["x"])[graph.outputs[0]]
    exported = to_onnx(graph)
    got = ort.InferenceSession(exported.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {exported.graph.input[0].name: arrays["x"]})[0]
    np.testing.assert_allclose(got, out, rtol=1e-4, atol=1e-4 * np.abs(out).max())


def test_fine_tune_the_convnext_export_on_new_classes(tmp_path):
    """dlc import gives the YAML; a 3-class head, data and train: init_from the export itself, head only, cached
    trunk. Every tensor but the head's transfers, and it trains."""
    runner = CliRunner()
    shutil.copy(TORCH_FIXTURES / "convnext.onnx", tmp_path / "convnext.onnx")
    result = runner.invoke(app, ["import", str(tmp_path / "convnext.onnx"), "-o", str(tmp_path / "imp")])
    assert result.exit_code == 0, result.output
    yaml_path = tmp_path / "imp" / "model.yaml"
    text = yaml_path.read_text()
    assert "out: 4" in text
    shutil.copy(TORCH_FIXTURES / "convnext.onnx", tmp_path / "imp" / "convnext.onnx")
    text = text.replace("out: 4", "out: 3").replace("  weights: weights.safetensors\n", "")
    text += ("data: {dataset: synthetic, samples: 60, num_classes: 3, seed: 4}\n"
             "train: {init_from: convnext.onnx, transfer: head, cache_features: true, epochs: 2, batch_size: 10, "
             "base_lr: 0.05}\n")
    yaml_path.write_text(text)
    result = runner.invoke(app, ["train", str(yaml_path), "-o", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert "cached the frozen trunk" in result.output
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    report = metrics["transfer"]
    assert report["transferred"] == report["tensors"] - 2 and not report["not_in_source"]
    assert [m["model"] for m in report["shape_mismatch"]] == [[3, 16], [3]]
    assert len(metrics["epochs"]) == 2 and np.isfinite(metrics["epochs"][-1]["val_loss"])
