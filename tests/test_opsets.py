"""Export at every opset dlc writes (11 to MAX_OPSET): each example and a graph of the ops whose ONNX form changes
between opsets pass onnx's full checker, carry the opset and the lowest IR version that holds it, run in
onnxruntime and equal the backend's forward; the ONNX passes keep that true on old-opset files."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from dlc.compiler.artifact import plan_opset
from dlc.compiler.errors import DlcError
from dlc.compiler.export_config import ExportConfig, TargetSpec
from dlc.compiler.export_onnx import MAX_OPSET, MIN_OPSET, check, to_onnx
from dlc.compiler.frontend import load_model, load_model_text
from dlc.compiler.passes import optimize, verify
from dlc.compiler.targets import ORT_TABLE, ir_for_opset, parse_version
from dlc.compiler.train.executor import Executor

from helpers import EXAMPLES, ROOT, randomize_weights

OPSETS = sorted({11, 13, 15, 17, 19, 21, MAX_OPSET})

# Softmax over the channels of a C×H×W map, and of a C×1×1 and a flat vector; hard_swish (opset 14);
# nearest upsampling (Resize: roi required before 13); concat; global average pooling; silu; every other op
# dlc writes once.
OPS_YAML = """\
model:
  name: ops
  input: {shape: [3, 6, 6]}
  outputs: [sm_map, up, logits, sm_flat]
  layers:
    - {name: c1, type: conv, out: 6, kernel: 3, pad: 1}
    - {name: hs, type: hard_swish}
    - {name: sm_map, type: softmax}
    - {name: up, type: upsample, scale: [2, 3], inputs: hs}
    - {name: a, type: conv, out: 4, kernel: 1}
    - {name: b, type: conv, out: 3, kernel: 3, pad: 1, inputs: up}
    - {name: si, type: silu}
    - {name: cat, type: concat, inputs: [a, si]}
    - {name: bn, type: batchnorm}
    - {name: pr, type: prelu}
    - {name: pd, type: pad, pads: [1, 2], mode: edge}
    - {name: mp, type: maxpool, kernel: 2}
    - {name: ap, type: avgpool, kernel: 3, stride: 1, pad: 1}
    - {name: n1, type: lrn, size: 3}
    - {name: hsg, type: hard_sigmoid}
    - {name: ct, type: conv_transpose, out: 4, kernel: 2, stride: 2}
    - {name: cl, type: clip, min: -0.5, max: 0.5}
    - {name: lr, type: leaky_relu, slope: 0.1}
    - {name: g, type: global_avgpool}
    - {name: sm_pool, type: softmax}
    - {name: mul, type: mul, inputs: [lr, sm_pool]}
    - {name: t, type: transpose, perm: [0, 2, 1]}
    - {name: rs, type: reshape, shape: [-1]}
    - {name: dr, type: dropout, ratio: 0.3}
    - {name: af, type: affine}
    - {name: fc, type: linear, out: 7}
    - {name: th, type: tanh}
    - {name: logits, type: linear, out: 5}
    - {name: sm_flat, type: softmax}
"""


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the file as written
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _export(graph, opset: int, **kw) -> onnx.ModelProto:
    model = to_onnx(graph, opset=opset, **kw)
    check(model)  # onnx.checker.check_model(full_check=True)
    assert model.ir_version == ir_for_opset(opset)
    assert [(o.domain, o.version) for o in model.opset_import] == [("", opset)]
    return model


def _matches_backend(graph, model: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    x = np.random.default_rng(seed).standard_normal((2, *graph.inputs[0].shape)).astype(np.float32)
    want = Executor(graph).forward(x)
    got = dict(zip(graph.outputs, _session(model).run(None, {graph.input_names[0]: x})))
    for name in graph.outputs:
        assert got[name].shape == want[name].shape, name
        scale = float(np.abs(want[name]).max())
        np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-5 * scale, err_msg=name)
    return want


@pytest.fixture(scope="module")
def examples():
    graphs = {}
    for path in EXAMPLES:
        graph = load_model(path).graph
        randomize_weights(graph)
        graphs[path.stem] = graph
    return graphs


def test_the_examples_are_all_there():
    assert {p.stem for p in EXAMPLES} >= {"lenet5", "vgg_small", "resnet20", "inception_small", "mobilenet_small",
                                          "tiny_detector"}


def test_range_is_11_to_what_onnx_and_onnxruntime_know():
    assert MIN_OPSET == 11 and 21 <= MAX_OPSET <= onnx.defs.onnx_opset_version()
    graph = load_model(ROOT / "examples/lenet5.yaml").graph
    for opset in (MIN_OPSET - 1, MAX_OPSET + 1):
        with pytest.raises(DlcError, match=f"opset {opset} is not supported"):
            to_onnx(graph, opset=opset)


@pytest.mark.parametrize("opset", OPSETS)
def test_every_example_at_opset(examples, opset):
    for graph in examples.values():
        _matches_backend(graph, _export(graph, opset))



@pytest.mark.parametrize("version", ["1.10", "1.14", "1.17", "1.20", "1.23"])
def test_every_example_for_a_named_target(examples, version):
    """A target's plan is its row's opset with the lowest IR that holds it, which that row loads; every example
    written so passes the full checker and equals the backend."""
    plan = plan_opset(ExportConfig(target=TargetSpec("onnxruntime", version, "cpu")))
    row_opset, row_ir = ORT_TABLE[parse_version(version)]
    assert plan.opset == min(row_opset, MAX_OPSET)
    for graph in examples.values():
        model = _export(graph, plan.opset)
        assert model.ir_version <= row_ir
        _matches_backend(graph, model)

@pytest.mark.parametrize("opset", range(MIN_OPSET, MAX_OPSET + 1))
def test_ops_whose_form_changes_at_every_opset(opset):
    graph = load_model_text(OPS_YAML, "ops.yaml").graph
    randomize_weights(graph, seed=opset)
    model = _export(graph, opset)
    want = _matches_backend(graph, model, seed=opset)
    # The softmaxes are not saturated: a wrong axis (the pre-13 2-D coercion over C·H·W) shows.
    assert 0.05 < want["sm_map"].max() < 0.95 and 0.05 < want["sm_flat"].max() < 0.95
    ops = [n.op_type for n in model.graph.node]
    softmax_axes = [a.i for n in model.graph.node if n.op_type == "Softmax" for a in n.attribute]
    if opset >= 13:
        assert softmax_axes == [1, 1, 1]
    else:  # the C×H×W softmax moves channels last; the C×1×1 and flat ones coerce to the same thing
        assert softmax_axes == [3, 1, 1] and ops.count("Transpose") == 3
    assert ("HardSwish" in ops) == (opset >= 14)
    resize = next(n for n in model.graph.node if n.op_type == "Resize")
    assert (resize.input[1] == "") == (opset >= 13)


@pytest.mark.parametrize("opset", [11, 12])
def test_detector_with_dynamic_height_and_width_at_old_opsets(examples, opset):
    graph = examples["tiny_detector"]
    model = _export(graph, opset, dynamic=("batch", "height", "width"))
    assert {"Shape", "Range", "Expand"} <= {n.op_type for n in model.graph.node}
    _matches_backend(graph, model)


@pytest.mark.parametrize("opset", [11, 13])
def test_passes_on_old_opset_exports(examples, opset):
    for graph in (examples["resnet20"], examples["tiny_detector"], load_model_text(OPS_YAML, "ops.yaml").graph):
        if graph.name == "ops":
            randomize_weights(graph, seed=3)
        model = _export(graph, opset)
        optimized, reports = optimize(model)
        check(optimized)
        assert optimized.opset_import[0].version == opset and optimized.ir_version == model.ir_version
        assert len(optimized.graph.node) < len(model.graph.node)  # batchnorms folded at least
        verify(model, optimized)
        _matches_backend(graph, optimized)
