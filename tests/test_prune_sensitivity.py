"""Sensitivity analysis: accuracy vs ratio with one group (or layer) pruned at a time, no fine-tuning."""

import json

import numpy as np
from test_prune_pipeline import tiny
from typer.testing import CliRunner

from dlc.compiler.cli import app
from dlc.compiler.frontend import load_model
from dlc.compiler.prune import channel_groups, plot_sensitivity, sensitivity
from dlc.compiler.prune.pipeline import ValData
from dlc.compiler.train.checkpoint import graph_tensors
from dlc.compiler.train.trainer import train_model

runner = CliRunner()


def trained(tmp_path):
    path = tiny(tmp_path)
    loaded = load_model(path)
    train_model(loaded, tmp_path / "train", progress=False)
    return path, loaded


def test_structured_and_unstructured_tables(tmp_path):
    _, loaded = trained(tmp_path)
    g = loaded.graph
    before = {k: v.copy() for k, v in graph_tensors(g).items()}
    val = ValData.from_spec(loaded.spec, g)
    ratios = [0.0, 0.5, 0.9]
    s = sensitivity(g, val, "structured", "l1", ratios)
    assert [r["name"] for r in s.rows] == [grp.producers[0] for grp in channel_groups(g) if grp.prunable]
    assert [r["size"] for r in s.rows] == [16, 16]
    assert all(len(r["accuracy"]) == 3 for r in s.rows)
    assert s.base_accuracy > 0.6 and all(r["accuracy"][0] == s.base_accuracy for r in s.rows)
    assert all(r["accuracy"][2] < s.base_accuracy for r in s.rows)  # 90 % of a layer's channels hurts
    u = sensitivity(g, val, "unstructured", "magnitude", ratios, skip=("fc",))
    assert [r["name"] for r in u.rows] == ["c1", "c2"] and [r["size"] for r in u.rows] == [432, 2304]
    assert all(r["accuracy"][0] == u.base_accuracy for r in u.rows)
    assert min(r["accuracy"][2] for r in u.rows) < u.base_accuracy
    after = graph_tensors(g)  # every trial worked on a copy or restored the weights
    assert all(np.array_equal(before[k], after[k]) for k in before)
    png = plot_sensitivity(s, tmp_path / "s.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_sensitivity(tmp_path):
    path, _ = trained(tmp_path)
    weights = tmp_path / "train/checkpoint.safetensors"
    result = runner.invoke(app, ["prune", str(path), "--weights", str(weights), "--sensitivity", "--ratios",
                                 "0,0.25,0.75", "--plot", str(tmp_path / "sens.png"), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["ratios"] == [0.0, 0.25, 0.75] and len(report["rows"]) == 2
    assert all(r["accuracy"][0] == report["base_accuracy"] for r in report["rows"])
    assert (tmp_path / "sens.png").is_file()
    result = runner.invoke(app, ["prune", str(path), "--weights", str(weights), "--sensitivity", "--ratios",
                                 "0.5"])
    assert result.exit_code == 0 and "c1" in result.stdout and "0.5" in result.stdout
    result = runner.invoke(app, ["prune", str(path), "--sensitivity", "--ratios", "0.5,1.2", "--allow-untrained"])
    assert result.exit_code == 2 and "--ratios must be numbers in [0, 1)" in result.stderr
    no_data = tiny(tmp_path, data=False, train=False, name="nodata.yaml")
    result = runner.invoke(app, ["prune", str(no_data), "--sensitivity", "--allow-untrained"])
    assert result.exit_code == 2 and "--sensitivity measures validation accuracy: it needs data" in result.stderr
