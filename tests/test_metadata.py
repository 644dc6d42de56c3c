"""The dlc metadata schema (compiler/metadata.py) and `dlc info`: round trips, true values in compiled files,
garbage refused with the file named, JSON only (no eval anywhere)."""

import json
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image
from typer.testing import CliRunner

from dlc.compiler.cli import app
from dlc.compiler.data.datasets import read_image
from dlc.compiler.errors import DlcError
from dlc.compiler.export_onnx import read_metadata as export_read_metadata
from dlc.compiler.export_onnx import to_onnx
from dlc.compiler.frontend import load_model
from dlc.compiler.metadata import (
    LEGACY_KEYS,
    REQUIRED_FIELDS,
    SCHEMA_VERSION,
    build_metadata,
    finalize_metadata,
    model_opset,
    read_metadata,
    update_metadata,
    validate_metadata,
    write_metadata,
)
from dlc.compiler.pipeline import artifact_metadata, compile_model
from dlc.compiler.targets import min_runtime_for
from dlc.runtime import Session

from helpers import EXAMPLES, ROOT, onnx_model

runner = CliRunner()


def _example(stem: str) -> Path:
    return next(p for p in EXAMPLES if p.stem == stem)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """lenet5 and the tiny detector through `dlc compile` (initial weights), with their graphs."""
    out = {}
    for stem in ("lenet5", "tiny_detector"):
        result = compile_model(_example(stem), tmp_path_factory.mktemp(stem), skip_train=True)
        out[stem] = (result.onnx_path, load_model(_example(stem)).graph)
    return out


def _exported(stem: str) -> onnx.ModelProto:
    loaded = load_model(_example(stem))
    return to_onnx(loaded.graph, metadata=artifact_metadata(loaded))


def test_round_trip_replace_and_update():
    model = _exported("resnet20")
    model.metadata_props.add(key="other", value="kept")
    meta = read_metadata(model)
    assert meta["schema_version"] == SCHEMA_VERSION and set(REQUIRED_FIELDS) <= set(meta)
    write_metadata(model, meta)
    assert read_metadata(model) == meta
    assert [p.key for p in model.metadata_props] == ["other", "dlc"]  # replaced, not duplicated
    assert export_read_metadata(model) == meta  # the old entry point reads the same
    updated = update_metadata(model, target={"runtime": "onnxruntime", "version": "1.14", "device": "cpu"})
    assert read_metadata(onnx.ModelProto.FromString(model.SerializeToString())) == updated
    assert updated["target"]["version"] == "1.14" and updated["model"] == "resnet20"
    with pytest.raises(ValueError, match="precison"):
        update_metadata(model, precison="fp16")  # a typo is refused, not silently stored
    bare = onnx_model([onnx.helper.make_node("Relu", ["x"], ["y"])])
    assert update_metadata(bare, precision="fp16") is None and read_metadata(bare) is None
    with pytest.raises(ValueError):  # strict JSON only: NaN is not JSON
        write_metadata(model, {**meta, "classes": [float("nan")]})


def test_legacy_keys_keep_their_meaning():
    model = _exported("lenet5")
    meta = read_metadata(model)
    assert set(LEGACY_KEYS) - {"task", "postprocess", "detection"} <= set(meta)
    assert meta["input"] == {"name": "image", "shape": [1, 28, 28], "mean": [0.5], "std": [0.5], "layout": "NCHW",
                             "dtype": "float32"}
    assert meta["outputs"] == {"fc3": [10]} and meta["classes"] == [str(i) for i in range(10)]
    assert meta["task"] == "classification"


def test_finalize_reads_the_file_and_appends_passes():
    loaded = load_model(_example("resnet20"))
    model = to_onnx(loaded.graph, opset=15, dynamic_batch=False, metadata=artifact_metadata(loaded))
    assert read_metadata(model)["opset"] is None  # unknown until the file is finished
    meta = finalize_metadata(model, passes=[{"name": "fold_bn", "rewrites": 21, "nodes_before": 75,
                                             "nodes_after": 54}])
    assert meta["opset"] == 15 == model_opset(model) and meta["ir_version"] == model.ir_version == 8
    assert meta["min_onnxruntime"] == str(min_runtime_for(15, 8))
    assert meta["precision"] == "fp32" and meta["input"]["onnx_shape"] == [1, 3, 32, 32]
    assert meta["output_convention"][0]["shape"] == [1, 10]
    meta = finalize_metadata(model, passes=[{"name": "dce", "rewrites": 2}])
    assert [(p["name"], p["changes"]) for p in meta["passes"]] == [("fold_bn", 21), ("dce", 2)]
    assert validate_metadata(meta, model) == []
    model.opset_import[0].version = 16  # a tool rewrote the file but not the metadata: the check says so
    assert any("opset is 15 in the metadata but 16 in the file" in p for p in validate_metadata(meta, model))


def test_compiled_examples_hold_every_field_with_true_values(compiled, tmp_path):
    for stem, (path, graph) in compiled.items():
        model = onnx.load(path)
        meta = read_metadata(model)
        assert validate_metadata(meta, model) == [], stem
        assert meta["opset"] == model_opset(model) and meta["ir_version"] == model.ir_version
        assert meta["min_onnxruntime"] == str(min_runtime_for(meta["opset"], model.ir_version))
        assert meta["precision"] == "fp32" and meta["quantization"] is None and isinstance(meta["passes"], list)
        dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
        assert meta["input"]["onnx_shape"] == dims and meta["input"]["shape"] == list(graph.inputs[0].shape)
        for conv, out in zip(meta["output_convention"], model.graph.output):
            assert conv["name"] == out.name and conv["dtype"] == "float32"
            assert conv["shape"] == [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim]
        assert Session(path, device="cpu").metadata == meta
    lenet = read_metadata(onnx.load(compiled["lenet5"][0]))
    assert lenet["task"] == "classification" and lenet["output_convention"][0]["kind"] == "logits"
    det = read_metadata(onnx.load(compiled["tiny_detector"][0]))
    conv = det["output_convention"][0]
    assert det["task"] == "detection" and conv["kind"] == "detections"
    assert conv["row"] == ["x1", "y1", "x2", "y2", "objectness", "p_class0", "p_class1", "p_class2"]
    assert conv["shape"][1:] == [160, 8] and det["postprocess"]["iou_threshold"] == 0.45
    # the preprocessing it documents is what dlc predict feeds: an odd-sized RGB image, by the metadata alone
    image = tmp_path / "odd.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (23, 37, 3), dtype=np.uint8)).save(image)
    pre = det["preprocessing"]
    h, w = pre["resize"]["size"]
    assert pre["channel_order"] == "RGB" and pre["resize"]["mode"] == "bilinear" and pre["layout"] == "NCHW"
    with Image.open(image) as im:
        pixels = np.asarray(im.convert("RGB").resize((w, h), Image.BILINEAR), np.float32).transpose(2, 0, 1)
    ours = (pixels * pre["scale"] - np.array(pre["mean"])[:, None, None]) / np.array(pre["std"])[:, None, None]
    x, _ = read_image(image, 3, h, w)
    theirs = (x - np.array(det["input"]["mean"])[:, None, None]) / np.array(det["input"]["std"])[:, None, None]
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)


def test_softmax_output_is_called_probabilities():
    from helpers import load

    graph = load("- {type: flatten}\n- {name: fc, type: linear, out: 4}\n- {name: sm, type: softmax}",
                 shape=(1, 4, 4)).graph
    meta = build_metadata(graph, model="t")
    assert meta["output_convention"][0]["kind"] == "probabilities"
    assert meta["output_convention"][0]["axes"] == ["batch", "class"]


def _with_raw_metadata(tmp_path: Path, value: str) -> Path:
    model = onnx_model([onnx.helper.make_node("Relu", ["x"], ["y"])])
    model.metadata_props.add(key="dlc", value=value)
    path = tmp_path / "garbage.onnx"
    path.write_bytes(model.SerializeToString())
    return path


@pytest.mark.parametrize("value, reason", [
    ("{'model': 'x', 'input': {'shape': [4, 6, 6]}}", "Python repr"),
    ("__import__('os').system('true')", "not valid JSON"),
    ("[1, 2, 3]", "not an object"),
])
def test_garbage_metadata_is_refused_naming_the_file(tmp_path, value, reason):
    path = _with_raw_metadata(tmp_path, value)
    with pytest.raises(DlcError, match=reason) as info:
        read_metadata(onnx.load(path), str(path))
    assert str(path) in str(info.value)
    with pytest.raises(DlcError, match=reason):
        _ = Session(path, device="cpu").metadata
    result = runner.invoke(app, ["info", str(path)])
    assert result.exit_code == 2 and "garbage.onnx" in result.output and reason in result.output
    assert "Traceback" not in result.output
    result = runner.invoke(app, ["predict", str(path), str(path)])
    assert result.exit_code == 2 and "garbage.onnx" in result.output and "Traceback" not in result.output


def test_info_json_reports_the_file_and_the_metadata(compiled):
    path, graph = compiled["lenet5"]
    result = runner.invoke(app, ["info", str(path), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    model = onnx.load(path)
    from dlc.compiler.analysis import summarize

    summary = summarize(graph)
    assert info["opset"] == model_opset(model) and info["ir_version"] == model.ir_version
    assert info["min_onnxruntime"] == str(min_runtime_for(info["opset"], model.ir_version))
    assert info["inputs"] == [{"name": "image", "dtype": "float32", "shape": ["batch", 1, 28, 28]}]
    assert info["outputs"] == [{"name": "fc3", "dtype": "float32", "shape": ["batch", 10]}]
    assert info["nodes"] == len(model.graph.node) and sum(info["ops"].values()) == info["nodes"]
    assert info["ops"]["Conv"] == 2 and info["ops"]["Gemm"] == 3
    assert info["params"] == summary.total_params and info["macs"] == summary.total_macs
    assert info["precision"] == "fp32" and info["has_dlc_metadata"] and info["metadata_schema"] == SCHEMA_VERSION
    assert info["metadata"] == read_metadata(model) and info["problems"] == []
    text = runner.invoke(app, ["info", str(path)])
    assert text.exit_code == 0
    for needle in ("opset", "lenet5 (classification), 10 classes", "bilinear resize to 28×28", "logits",
                   "Conv 2", "params"):
        assert needle in text.output, needle


def test_optimize_stamps_the_pass_log(compiled, tmp_path):
    path, _ = compiled["tiny_detector"]
    out = tmp_path / "opt.onnx"
    result = runner.invoke(app, ["optimize", str(path), "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    reports = json.loads(result.output)["passes"]
    model = onnx.load(out)
    meta = read_metadata(model)
    assert [(p["name"], p["changes"]) for p in meta["passes"]] == [(r["name"], r["rewrites"]) for r in reports]
    assert any(p["name"] == "fold_bn" and p["changes"] == 6 for p in meta["passes"])  # six batch norms folded
    assert validate_metadata(meta, model) == []


def test_info_on_fp16_foreign_and_corrupt_files(compiled, tmp_path):
    from dlc.compiler.fp16 import to_fp16

    path, _ = compiled["tiny_detector"]
    half = tmp_path / "half.onnx"
    half.write_bytes(to_fp16(onnx.load(path)).SerializeToString())
    info = json.loads(runner.invoke(app, ["info", str(half), "--json"]).output)
    assert info["precision"] == "fp16" == info["metadata"]["precision"] and info["problems"] == []
    assert info["initializer_elements"]["float16"] > 100 * info["initializer_elements"].get("float32", 0)
    text = runner.invoke(app, ["info", str(half)]).output
    assert "fp16" in text and "kept in float32" in text and "x1, y1, x2, y2" in text
    foreign = tmp_path / "foreign.onnx"
    foreign.write_bytes(onnx_model([onnx.helper.make_node("Relu", ["x"], ["y"])]).SerializeToString())
    info = json.loads(runner.invoke(app, ["info", str(foreign), "--json"]).output)
    assert info["has_dlc_metadata"] is False and info["metadata"] is None and info["ops"] == {"Relu": 1}
    assert "no dlc metadata" in runner.invoke(app, ["info", str(foreign)]).output
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(path.read_bytes()[:500])
    result = runner.invoke(app, ["info", str(corrupt)])
    assert result.exit_code == 2 and "corrupt.onnx" in result.output and "Traceback" not in result.output
    assert result.output.count("error:") == 1


def test_no_eval_where_metadata_is_read():
    """dlc reads metadata with json only: no eval/exec/literal_eval/pickle in the compiler or runtime."""
    pattern = re.compile(r"(?<![\w.])(eval|exec)\(|literal_eval|pickle\.loads?\(")
    offenders = [f"{p.relative_to(ROOT)}:{k}" for folder in ("compiler", "runtime") for p in (ROOT / folder).rglob("*.py")
                 for k, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert offenders == []
