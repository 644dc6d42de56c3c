"""Bounded resources: small hostile inputs give one clear error (with the numbers) instead of unbounded memory,
hangs or RecursionErrors; each limit can be raised with `dlc --limit NAME=N`."""

import os
import time

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from dlc.compiler import limits
from dlc.compiler.cli import app
from dlc.compiler.errors import DlcError
from dlc.compiler.frontend import load_model_text
from dlc.compiler.onnx_io import load_onnx
from dlc.compiler.yaml_loader import load_yaml_text

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, list(args), catch_exceptions=False)


@pytest.fixture(autouse=True)
def default_limits():
    limits.configure([])
    yield
    limits.configure([])


def messages(text: str, **kwargs) -> str:
    with pytest.raises(DlcError) as info:
        load_model_text(text, "m.yaml", **kwargs)
    return str(info.value)


BASE = """model:
  name: m
  input: {{shape: [1, 8, 8]{input}}}
  layers:
    - {{name: c, type: conv, out: 2, kernel: 3{conv}}}
data: {{dataset: synthetic}}
train:
  {train}
"""


def model(input="", conv="", train="epochs: 1"):
    return BASE.format(input=input, conv=conv, train=train)


# ------------------------------------------------------------------------------------------------- YAML
def billion_laughs(levels: int) -> str:
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, levels):
        prev, name = chr(96 + i), chr(97 + i)
        lines.append(f"{name}: &{name} [" + ", ".join([f"*{prev}"] * 10) + "]")
    return "\n".join(lines) + "\n"


def test_alias_bomb_is_refused_quickly_and_not_echoed():
    start = time.perf_counter()
    with pytest.raises(DlcError) as info:
        load_yaml_text(billion_laughs(9), "bomb.yaml")  # 10^9 values once expanded
    assert time.perf_counter() - start < 5
    text = str(info.value)
    assert "above the limit of 1,000,000" in text and "bomb.yaml:" in text and len(text) < 400
    assert "lol" not in text
    # a modest use of anchors is fine: 10^4 values
    assert len(load_yaml_text(billion_laughs(4), "ok.yaml")["d"]) == 10


def test_recursive_alias_and_deep_nesting():
    with pytest.raises(DlcError, match="recursive anchor"):
        load_yaml_text("a: &a [1, *a]\n", "r.yaml")
    with pytest.raises(DlcError, match="nesting depth of YAML/JSON: 101 is above the limit of 100"):
        load_yaml_text("a: " + "[" * 150 + "]" * 150 + "\n", "d.yaml")
    with pytest.raises(DlcError, match="nested too deeply|nesting depth"):
        load_yaml_text("[" * 20_000 + "]" * 20_000, "deep.yaml")
    limits.configure(["yaml_depth=200"])
    assert load_yaml_text("a: " + "[" * 150 + "]" * 150 + "\n", "d.yaml") is not None


def test_yaml12_floats_are_numbers():
    doc = load_yaml_text("a: 1.0e6\nb: 1e-3\nc: -2E+3\nd: 1.5\ne: '1e6'\nf: 1e6x\ng: 7\n")
    assert doc == {"a": 1e6, "b": 1e-3, "c": -2000.0, "d": 1.5, "e": "1e6", "f": "1e6x", "g": 7}
    assert isinstance(doc["g"], int)
    spec = load_model_text(model(train="epochs: 1\n  base_lr: 1.0e-3"), "m.yaml").spec
    assert spec.train.base_lr == pytest.approx(1e-3)


@pytest.mark.parametrize("train, words", [
    ("base_lr: .nan", "'train.base_lr' must be a finite number >= 0, got nan"),
    ("base_lr: .inf", "'train.base_lr' must be a finite number >= 0, got inf"),
    ("momentum: .nan", "'train.momentum' must be a finite number in [0, 1], got nan"),
    ("warmup: {epochs: 1.0e18}", "'train.warmup.epochs' must be a finite number in [0, 1e+06], got 1e+18"),
    ("epochs: 1000000000000000000", "'train.epochs' must be an integer in [1, 1e+06]"),
    ("steps: [.inf]", "'train.steps' must be a list of epochs"),
    ("class_weights: [1, .nan]", "'train.class_weights' must be"),
    ("betas: [.nan, 0.9]", "'train.betas' must be two numbers"),
])
def test_nan_and_inf_are_refused_in_every_number(train, words):
    assert words in messages(model(train=train))


def test_nan_in_input_normalization():
    assert "'model.input.mean' must be a finite number" in messages(model(input=", mean: [.nan]"))
    assert "'model.input.std' must be a finite number" in messages(model(input=", std: .inf"))


def test_huge_pad_is_an_activation_limit_with_numbers():
    text = messages(model(conv=", pad: 1000000000"))
    assert "layer 'c'" in text and "elements per sample" in text and "above the limit of 268,435,456" in text
    assert "--limit activation_elements=" in text
    assert "'pad' must be" in messages(model(conv=", pad: 1.0e9"))  # a float is not a pad


def test_layer_count_and_repeat_limits_can_be_raised(tmp_path):
    text = """model:
  name: deep
  input: {shape: [1, 4, 4]}
  blocks:
    act: {layers: [{type: relu}]}
  layers:
    - {name: r, block: act, repeat: REPEAT}
"""
    assert "'repeat' of one block instance: 5,000 is above the limit of 1,000" in messages(
        text.replace("REPEAT", "5000"))
    path = tmp_path / "deep.yaml"
    path.write_text(text.replace("REPEAT", "800"))
    limits.configure(["layers=500"])
    with pytest.raises(DlcError, match="layers after block expansion .*501 is above the limit of 500"):
        load_model_text(path.read_text(), str(path))
    refused = invoke("--limit", "layers=500", "inspect", str(path))
    assert refused.exit_code == 2 and "--limit layers=1000" in refused.output
    assert invoke("inspect", str(path)).exit_code == 0  # 800 layers: within the default
    bad = invoke("--limit", "layers=lots", "inspect", str(path))
    assert bad.exit_code == 2 and "is not a number" in bad.output


def test_thousands_of_problems_print_the_first_hundred_and_the_count(tmp_path):
    """Each of 3,000 layers is wrong: the first 100 are listed, then how many more, then the total (printing
    all of 100,000 once took half a minute)."""
    layers = "\n".join(f"    - {i}" for i in range(3000))
    path = tmp_path / "many.yaml"
    path.write_text(f"model:\n  name: m\n  input: {{shape: [1, 8, 8]}}\n  layers:\n{layers}\n")
    result = invoke("inspect", str(path))
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 102, result.output[-500:]
    assert "many.yaml:5: a layer must be a mapping" in lines[0] and "many.yaml:104:" in lines[99]
    assert lines[-2:] == ["error: ... and 2,900 more not shown", "error: 3,000 problems found"]


def test_parameter_bytes_checked_before_allocation():
    text = model(conv="").replace("out: 2, kernel: 3", "out: 4096, kernel: 3").replace(
        "    - {name: c,", "    - {name: w, type: conv, out: 4096, kernel: 1}\n    - {name: c,")
    limits.configure(["param_bytes=1000000"])
    params = (4096 + 4096) + (4096 * 4096 * 9 + 4096)  # w: weight + bias; c: weight + bias
    assert f"bytes of all parameters (float32): {4 * params:,} is above the limit of 1,000,000" in messages(text)


def test_random_input_size_checked_before_allocation(tmp_path):
    assert invoke("compile", str(_lenet()), "-o", str(tmp_path), "--skip-train").exit_code == 0
    result = invoke("run", str(tmp_path / "model.onnx"), "--random", "--batch", "100000000")
    assert result.exit_code == 2 and "bytes: 627,200,000,000 is above the limit" in result.output


def _lenet():
    from helpers import ROOT
    return ROOT / "examples/lenet5.yaml"


# ----------------------------------------------------------------------------------------------- images
def test_image_pixel_cap_and_fifo(tmp_path):
    from PIL import Image

    from dlc.compiler.data.datasets import read_image

    Image.new("L", (300, 200)).save(tmp_path / "big.png")
    limits.configure(["image_pixels=50000"])
    with pytest.raises(DlcError, match="image 300×200: pixels: 60,000 is above the limit of 50,000"):
        read_image(tmp_path / "big.png", 1, 8, 8)
    limits.configure([])
    assert read_image(tmp_path / "big.png", 1, 8, 8)[1] == (300, 200)
    os.mkfifo(tmp_path / "x.png")
    start = time.perf_counter()
    with pytest.raises(DlcError, match="FIFO"):
        read_image(tmp_path / "x.png", 1, 8, 8)
    os.mkfifo(tmp_path / "m.yaml")
    result = invoke("inspect", str(tmp_path / "m.yaml"))
    assert result.exit_code == 2 and "not a regular file" in result.output
    assert time.perf_counter() - start < 5


# ------------------------------------------------------------------------------------------------- ONNX
def _matmul_model(weight: onnx.TensorProto) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [x], [y], [weight])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_initializer_size_must_match_its_shape(tmp_path):
    rng = np.random.default_rng(0)
    good = numpy_helper.from_array(rng.standard_normal((4, 4)).astype(np.float32), "w")
    onnx.save(_matmul_model(good), tmp_path / "good.onnx")
    assert load_onnx(tmp_path / "good.onnx").graph.initializer[0].dims == [4, 4]
    short = onnx.TensorProto()
    short.CopyFrom(good)
    short.raw_data = good.raw_data[:12]
    onnx.save(_matmul_model(short), tmp_path / "short.onnx")
    typed = onnx.TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[4, 4])
    typed.float_data.extend(rng.standard_normal(15).tolist())
    onnx.save(_matmul_model(typed), tmp_path / "typed.onnx")
    for name, words in (("short", "declared [4, 4] (64 bytes) but holds 12 bytes"),
                        ("typed", "declared [4, 4] (16 values) but holds 15")):
        for command in (["run", "--random"], ["info"], ["bench"], ["optimize", "-o", str(tmp_path / "o.onnx")],
                        ["import", "-o", str(tmp_path / "imp")]):
            result = invoke(command[0], str(tmp_path / f"{name}.onnx"), *command[1:])
            assert result.exit_code == 2 and words in result.output and "tensor 'w'" in result.output, (
                command, result.output)


def test_an_initializer_whose_type_was_changed_is_refused(tmp_path):
    """The same 64 bytes relabelled as another type: sizes per element differ (8-bit floats, packed 4-bit) or the
    type keeps no raw bytes at all (strings). Each is named, not a ValueError from onnx's reader."""
    good = numpy_helper.from_array(np.random.default_rng(2).standard_normal((4, 4)).astype(np.float32), "w")
    for data_type, words in ((TensorProto.STRING, "string tensor 'w' holds raw bytes"),
                             (TensorProto.FLOAT8E4M3FN, "declared [4, 4] (16 bytes) but holds 64 bytes"),
                             (TensorProto.INT4, "declared [4, 4] (8 bytes) but holds 64 bytes")):
        bad = onnx.TensorProto()
        bad.CopyFrom(good)
        bad.data_type = data_type
        path = tmp_path / f"retyped{data_type}.onnx"
        onnx.save(_matmul_model(bad), path)
        for command in (["run", "--random"], ["optimize", "-o", str(tmp_path / "o.onnx")],
                        ["import", "-o", str(tmp_path / "imp")]):
            result = invoke(command[0], str(path), *command[1:])
            assert result.exit_code == 2 and words in result.output, (data_type, command, result.output)
    # an input declared with an element type onnx does not know
    retyped_input = _matmul_model(good)
    retyped_input.graph.input[0].type.tensor_type.elem_type = 999
    onnx.save(retyped_input, tmp_path / "input999.onnx")
    result = invoke("import", str(tmp_path / "input999.onnx"), "-o", str(tmp_path / "imp"))
    assert result.exit_code == 2 and "value 'x' has no known element type (elem_type 999)" in result.output, (
        result.output)
    # packed 4-bit data of the right size is a valid file and loads
    packed = numpy_helper.from_array(np.arange(-8, 7, dtype=np.int8).reshape(3, 5), "w")
    packed.CopyFrom(helper.make_tensor("w", TensorProto.INT4, [3, 5], np.arange(-8, 7).tolist()))
    assert len(packed.raw_data or b"") in (0, 8)
    onnx.save(_matmul_model(packed), tmp_path / "int4.onnx")
    assert load_onnx(tmp_path / "int4.onnx").graph.initializer[0].data_type == TensorProto.INT4


def test_a_name_that_is_not_utf8_is_refused(tmp_path):
    """protobuf returns invalid UTF-8 in a string field as bytes; every command names it instead of failing in
    a regex or a decode."""
    w = numpy_helper.from_array(np.random.default_rng(3).standard_normal((4, 4)).astype(np.float32), "w")
    model = _matmul_model(w)
    model.graph.node[0].output[0] = model.graph.output[0].name = "outQQQ"
    data = model.SerializeToString()
    assert data.count(b"outQQQ") == 2  # the node's output and the graph's: renamed alike, still one value
    path = tmp_path / "name.onnx"
    path.write_bytes(data.replace(b"outQQQ", b"out\xff\xfeQ"))
    for command in (["run", "--random"], ["info"], ["optimize", "-o", str(tmp_path / "o.onnx")],
                    ["import", "-o", str(tmp_path / "imp")]):
        result = invoke(command[0], str(path), *command[1:])
        assert result.exit_code == 2 and "is not valid UTF-8 text" in result.output, (command, result.output)


def test_external_data_offsets(tmp_path):
    rng = np.random.default_rng(1)
    weight = numpy_helper.from_array(rng.standard_normal((4, 4)).astype(np.float32), "w")
    (tmp_path / "w.bin").write_bytes(weight.raw_data)
    for offset, length, words in ((-8, 64, "offset must be non-negative"),
                                  (0, 60, "external data is 60 bytes"),
                                  (32, 64, "past the end of 'w.bin'")):
        tensor = onnx.TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[4, 4])
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", "w.bin"), ("offset", str(offset)), ("length", str(length))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        path = tmp_path / f"ext{offset}_{length}.onnx"
        onnx.save(_matmul_model(tensor), path)
        with pytest.raises(DlcError, match=words):
            load_onnx(path)
        result = invoke("run", str(path), "--random")
        assert result.exit_code == 2 and words in result.output


def test_zero_and_symbolic_dimensions_run(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [0, 3, "H", "W"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [0, 3, "H", "W"])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "z", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8),
              tmp_path / "zero.onnx")
    result = invoke("run", str(tmp_path / "zero.onnx"), "--random", "--runs", "1", "--json")
    assert result.exit_code == 0, result.output
    assert '"y": [\n      0,' in result.stdout or '"y": [0,' in result.stdout.replace("\n", "").replace(" ", "")


def test_twenty_thousand_node_chain(tmp_path):
    n = 20_000
    nodes = [helper.make_node("Relu", [f"v{i}"], [f"v{i + 1}"]) for i in range(n)]
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("v0", TensorProto.FLOAT, ["N", 3, 4, 4])],
                              [helper.make_tensor_value_info(f"v{n}", TensorProto.FLOAT, ["N", 3, 4, 4])])
    path = tmp_path / "chain.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)
    run = invoke("run", str(path), "--random", "--runs", "1")
    assert run.exit_code == 0, run.output
    imported = invoke("import", str(path), "-o", str(tmp_path / "imp"))
    assert imported.exit_code in (0, 2) and "Traceback" not in imported.output
    if imported.exit_code == 2:  # refused cleanly, with the limit that stopped it
        assert "above the limit" in imported.output
    limits.configure(["onnx_nodes=1000"])
    with pytest.raises(DlcError, match="nodes of an ONNX graph: 20,000 is above the limit of 1,000"):
        load_onnx(path)
