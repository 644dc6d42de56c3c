"""Dynamic axes per axis: a file exported with dynamic [batch, height, width] equals the backend built at each
input size (same weights), a net that fixes its input size is refused naming the layer, and batch-only files
are what they were."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from dlc.compiler.dynamic_shapes import at_input_size, check_dynamic
from dlc.compiler.errors import DlcError
from dlc.compiler.export_onnx import check, to_onnx
from dlc.compiler.frontend import load_model, load_model_text
from dlc.compiler.train.executor import Executor

from helpers import ROOT, load, model_yaml

ALL = ("batch", "height", "width")


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the file as written
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _dims(value: onnx.ValueInfoProto) -> list:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def _close(got: np.ndarray, want: np.ndarray) -> None:
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))


def _matches_backend(graph, session, sizes, batches=(1, 3)) -> dict:
    """Run the file at every (H, W) and batch against the backend built at that size; the output shapes."""
    c = graph.inputs[0].shape[0]
    shapes = {}
    for hw in sizes:
        at = at_input_size(graph, (c, *hw))
        executor = Executor(at)
        for batch in batches:
            x = np.random.default_rng(batch).standard_normal((batch, c, *hw)).astype(np.float32)
            want = executor.forward(x)
            got = session.run(None, {graph.input_names[0]: x})
            for name, value in zip(graph.outputs, got):
                assert value.shape == (batch, *at.shapes[name])
                _close(value, want[name])
            shapes[hw] = {name: v.shape[1:] for name, v in zip(graph.outputs, got)}
    return shapes


def test_detector_runs_at_64_and_96_and_equals_the_backend_at_both():
    graph = load_model(ROOT / "examples/tiny_detector.yaml").graph  # filler weights, explicit anchors
    model = to_onnx(graph, dynamic=ALL)
    check(model)  # onnx.checker, full check with shape inference
    assert _dims(model.graph.input[0]) == ["batch", 3, "height", "width"]
    assert _dims(model.graph.output[0]) == ["batch", "detect_candidates", 8]
    ops = {n.op_type for n in model.graph.node}
    assert {"Shape", "Range", "Expand"} <= ops  # the grid is computed from the maps, not stored
    assert not [i.name for i in model.graph.initializer if i.name.endswith(".grid")]
    shapes = _matches_backend(graph, _session(model), [(64, 64), (96, 96)])
    # 2 anchors on 8×8 + 4×4 maps at 64 px; 12×12 + 6×6 at 96 px: rows scale by scale, anchor, then cell
    assert shapes[(64, 64)]["detect"] == (2 * 64 + 2 * 16, 8) and shapes[(96, 96)]["detect"] == (2 * 144 + 2 * 36, 8)
    # at the size it was built for, the computed grid gives what the constant one gives
    x = np.random.default_rng(5).standard_normal((2, 3, 64, 64)).astype(np.float32)
    _close(_session(model).run(None, {"image": x})[0], _session(to_onnx(graph)).run(None, {"image": x})[0])


def test_detector_at_a_size_that_is_no_whole_stride():
    """65×67: the maps are ceil(size / stride), as the backend's padded convolutions give."""
    graph = load_model(ROOT / "examples/tiny_detector.yaml").graph
    shapes = _matches_backend(graph, _session(to_onnx(graph, dynamic=ALL)), [(65, 67)], batches=(2,))
    assert shapes[(65, 67)]["detect"] == (2 * 9 * 9 + 2 * 5 * 5, 8)


FCN = """
- {name: c1, type: conv, out: 8, kernel: 3, stride: 2, pad: same}
- {name: b1, type: batchnorm}
- {name: r1, type: relu}
- {name: p1, type: maxpool, kernel: 3, stride: 2, pad: same}
- {name: c2, type: conv, out: 8, kernel: 3, pad: same, dilation: 2}
- {name: c3, type: conv, out: 8, kernel: 3, pad: 1, inputs: p1}
- {name: cat, type: concat, inputs: [c2, c3]}
- {name: a1, type: avgpool, kernel: 2, stride: 2, pad: same}
- {name: up, type: upsample, scale: 2}
- {name: c4, type: conv, out: 8, kernel: 1}
- {name: gap, type: global_avgpool}
- {name: flat, type: flatten}
- {name: fc, type: linear, out: 5}
"""


def test_fully_convolutional_classifier_any_size_with_same_pads_at_stride_2():
    """'same' pads at stride 2 depend on the size's parity: the file writes ONNX's SAME_UPPER, so 65×67 and
    66×66 run as the backend runs them; global_avgpool then flatten and linear is size-free."""
    graph = load(FCN, shape=(3, 64, 64)).graph
    model = to_onnx(graph, dynamic=ALL)
    check(model)
    assert _dims(model.graph.output[0]) == ["batch", 5]
    auto = {n.name for n in model.graph.node for a in n.attribute if a.name == "auto_pad"}
    assert auto == {"c1", "p1", "a1"}  # stride 2 'same'; c2 (stride 1) keeps its explicit pads
    _matches_backend(graph, _session(model), [(64, 64), (96, 96), (65, 67), (66, 66)])
    # the batch-only file keeps the pads resolved for 64×64
    assert not any(a.name == "auto_pad" for n in to_onnx(graph).graph.node for a in n.attribute)


def test_segmentation_output_follows_the_input_size():
    graph = load("""
- {name: down, type: conv, out: 6, kernel: 3, stride: 2, pad: 1}
- {name: relu, type: relu}
- {name: up, type: upsample, scale: 2}
- {name: mask, type: conv, out: 2, kernel: 1}
""", shape=(3, 32, 48)).graph
    model = to_onnx(graph, dynamic=ALL)
    check(model)
    assert _dims(model.graph.output[0]) == ["batch", 2, "height", "width"]  # the input's own symbols
    shapes = _matches_backend(graph, _session(model), [(32, 48), (40, 24)], batches=(2,))
    assert shapes[(40, 24)]["mask"] == (2, 40, 24)
    # a half-size output gets a name of its own
    half = load("- {name: feat, type: conv, out: 4, kernel: 3, stride: 2, pad: 1}", shape=(3, 32, 48)).graph
    assert check_dynamic(half, ALL)["feat"] == [4, "feat_height", "feat_width"]


LENET = """
- {name: conv1, type: conv, out: 6, kernel: 5}
- {name: pool1, type: maxpool, kernel: 2}
- {name: flatten, type: flatten}
- {name: drop, type: dropout}
- {name: fc1, type: linear, out: 10}
"""


def test_linear_after_flatten_refuses_dynamic_height_and_width_naming_the_layer():
    text = model_yaml(LENET, shape=(1, 28, 28))
    graph = load_model_text(text, "lenet.yaml").graph
    with pytest.raises(DlcError) as info:
        to_onnx(graph, dynamic=ALL)
    [diag] = info.value.diagnostics  # one message: the layer that fixes the size
    line = next(i for i, row in enumerate(text.splitlines(), 1) if "name: fc1" in row)
    assert diag.layer == "fc1" and diag.file == "lenet.yaml" and diag.line == line
    message = diag.format()
    assert message.startswith(f"lenet.yaml:{line}: layer 'fc1': ")
    assert "weight (10×864)" in message and "after 'flatten'" in message and "fixes the input height and width" in message
    assert "dynamic: [batch]" in message
    # batch-only is what it was
    assert _dims(to_onnx(graph).graph.input[0]) == ["batch", 1, 28, 28]


@pytest.mark.parametrize("layers, layer, words", [
    ("- {name: c, type: conv, out: 4, kernel: 3, pad: 1}\n- {name: r, type: reshape, shape: [4, 8, 16, 2]}",
     "r", "cannot reshape 4×32×16"),
    ("- {name: c, type: conv, out: 4, kernel: 3, stride: 2, pad: same, dilation: 2}", "c", "takes no dilation"),
    ("- {name: c, type: conv, out: 4, kernel: 3, pad: 1}\n- {name: f, type: flatten}\n"
     "- {name: bn, type: batchnorm}", "bn", "its scale (1024)"),
])
def test_other_layers_that_fix_the_size(layers, layer, words):
    graph = load(layers, shape=(3, 16, 16)).graph
    with pytest.raises(DlcError) as info:
        to_onnx(graph, dynamic=ALL)
    [diag] = info.value.diagnostics
    assert diag.layer == layer and words in diag.message, diag.format()
    to_onnx(graph)  # fine with a fixed size


def test_batch_only_files_are_unchanged():
    for name in ("lenet5", "tiny_detector"):
        graph = load_model(ROOT / f"examples/{name}.yaml").graph
        default = to_onnx(graph).SerializeToString()
        assert to_onnx(graph, dynamic=["batch"]).SerializeToString() == default
        assert to_onnx(graph, dynamic_batch=False).SerializeToString() == to_onnx(graph, dynamic=()).SerializeToString()
        static = to_onnx(graph, dynamic=())
        assert _dims(static.graph.input[0])[0] == 1
    detector = onnx.load_from_string(default)  # the detector (last in the loop): constant grids
    assert "Range" not in {n.op_type for n in detector.graph.node}
    assert [i for i in detector.graph.initializer if i.name == "detect/s0.grid"][0].dims == [1, 2 * 64, 2]


def test_at_input_size_keeps_the_weights_and_names_what_cannot_run():
    graph = load_model(ROOT / "examples/tiny_detector.yaml").graph
    at = at_input_size(graph, (3, 96, 96))
    assert at.shapes["detect"] == (360, 8) and graph.shapes["detect"] == (160, 8)  # the original is untouched
    assert at.node("detect").attrs["grids"] == [(12, 12), (6, 6)]
    np.testing.assert_array_equal(at.node("conv1").params["weight"], graph.node("conv1").params["weight"])
    lenet = load(LENET, shape=(1, 28, 28)).graph
    with pytest.raises(DlcError, match="layer 'fc1'"):
        at_input_size(lenet, (1, 32, 32))
    with pytest.raises(DlcError, match="C = 1"):
        at_input_size(lenet, (3, 28, 28))


def test_unknown_axis():
    graph = load("- {name: c, type: conv, out: 4, kernel: 3, pad: 1}").graph
    with pytest.raises(DlcError, match="unknown dynamic axis 'depth'"):
        to_onnx(graph, dynamic=["batch", "depth"])


def test_cli_refuses_the_yaml_with_exit_2_and_one_message(tmp_path):
    from typer.testing import CliRunner

    from dlc.compiler.cli import app

    path = tmp_path / "lenet.yaml"
    path.write_text(model_yaml(LENET, shape=(1, 28, 28), extra="export: {dynamic: [batch, height, width]}\n"))
    result = CliRunner().invoke(app, ["compile", str(path), "-o", str(tmp_path / "out"), "--skip-train"])
    assert result.exit_code == 2, result.output
    errors = [row for row in result.stderr.splitlines() if "layer 'fc1'" in row]
    assert len(errors) == 1 and "fixes the input height" in errors[0] and "Traceback" not in result.output
    assert not (tmp_path / "out" / "model.onnx").exists()
