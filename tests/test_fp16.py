"""FP16 artifacts (compiler/fp16.py): every example converts, passes onnx's full check, runs in onnxruntime
within 1e-2 of fp32 (relative to the output's scale), with float16 weights, half the file size and float32
inputs/outputs; ops that must stay float32 do; refusals and the CPU warning."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from dlc.compiler.errors import DlcError
from dlc.compiler.export_onnx import MAX_OPSET, MIN_OPSET, to_onnx
from dlc.compiler.fp16 import FP32_OPS, decode_nodes, fp16_cpu_warning, to_fp16, topological_sort
from dlc.compiler.frontend import load_model
from dlc.compiler.metadata import read_metadata
from dlc.compiler.pipeline import artifact_metadata
from dlc.runtime import Session

from helpers import EXAMPLES, load

LEVELS = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}


def _run(model: onnx.ModelProto, x: np.ndarray, level: str = "disable") -> np.ndarray:
    # ORT_DISABLE_ALL: the CPU provider runs each fp16 node behind its own Casts, so every intermediate value
    # is rounded to float16 as a GPU would store it (ORT_ENABLE_ALL folds those casts away)
    options = ort.SessionOptions()
    options.graph_optimization_level = LEVELS[level]
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    feed = x.astype(np.float16) if session.get_inputs()[0].type == "tensor(float16)" else x
    return session.run(None, {session.get_inputs()[0].name: feed})[0]


def _exported(path, opset=None):
    loaded = load_model(path)
    model = to_onnx(loaded.graph, **({"opset": opset} if opset else {}), metadata=artifact_metadata(loaded))
    return loaded.graph, model


def _elements(model, dtype) -> int:
    return sum(int(np.prod(t.dims)) for t in model.graph.initializer if t.data_type == dtype)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_every_example_converts_and_matches_fp32(path):
    graph, fp32 = _exported(path)
    fp16 = to_fp16(fp32)
    onnx.checker.check_model(fp16, full_check=True)
    x = np.random.default_rng(3).standard_normal((4, *graph.inputs[0].shape)).astype(np.float32)
    want = _run(fp32, x)
    scale = np.abs(want).max()
    for level in LEVELS:
        got = _run(fp16, x, level)
        assert got.dtype == np.float32 and got.shape == want.shape
        err = np.abs(got - want).max() / scale
        assert err < 1e-2, (level, err)
        assert err > 1e-7  # it really ran with float16 weights (an unconverted copy would match exactly)
    # float32 in and out (keep_io_types), weights float16, the file half the size
    for value in (*fp16.graph.input, *fp16.graph.output):
        assert value.type.tensor_type.elem_type == TensorProto.FLOAT
    weights = {n.input[1] for n in fp16.graph.node if n.op_type in ("Conv", "Gemm", "ConvTranspose")}
    inits = {t.name: t for t in fp16.graph.initializer}
    assert weights and all(inits[w].data_type == TensorProto.FLOAT16 for w in weights)
    assert _elements(fp16, TensorProto.FLOAT16) > 0.98 * (_elements(fp16, TensorProto.FLOAT16)
                                                         + _elements(fp16, TensorProto.FLOAT))
    ratio = len(fp16.SerializeToString()) / len(fp32.SerializeToString())
    assert 0.45 < ratio < 0.55, ratio
    meta = read_metadata(fp16)
    assert meta["precision"] == "fp16" and meta["fp16"]["keep_io_types"] is True
    assert meta["input"]["dtype"] == "float32"


def test_detector_decode_stays_float32_without_round_trips():
    path = next(p for p in EXAMPLES if p.stem == "tiny_detector")
    graph, fp32 = _exported(path)
    fp16 = to_fp16(fp32)
    decode = set(decode_nodes(fp32))
    assert decode and any(n.startswith("detect/") for n in decode)
    inits = {t.name: t for t in fp16.graph.initializer}
    # the decode's float constants (grids, anchors, strides) stay float32, the heads' weights are float16
    decode_floats = [i for n in fp16.graph.node if n.name in decode for i in n.input
                     if i in inits and inits[i].data_type in (TensorProto.FLOAT, TensorProto.FLOAT16)]
    assert decode_floats and all(inits[i].data_type == TensorProto.FLOAT for i in decode_floats)
    heads = [n for n in fp16.graph.node if n.name in ("head8", "head16")]
    assert all(inits[n.input[1]].data_type == TensorProto.FLOAT16 for n in heads)
    # no float32 -> float16 -> float32 round trip between two float32 nodes: one Cast up per head, no Cast
    # fed by another Cast
    producer = {o: n for n in fp16.graph.node for o in n.output}
    casts = [n for n in fp16.graph.node if n.op_type == "Cast"]
    assert not [c for c in casts if producer.get(c.input[0]) is not None and producer[c.input[0]].op_type == "Cast"]
    assert len(casts) == 3  # the input down to fp16, each head map up to fp32
    assert set(read_metadata(fp16)["fp16"]["fp32_ops"]) >= {"Sigmoid", "Pow", "Concat"}
    x = np.random.default_rng(0).standard_normal((2, *graph.inputs[0].shape)).astype(np.float32)
    want, got = _run(fp32, x), _run(fp16, x)
    boxes = np.abs(got[..., :4] - want[..., :4]).max() / np.abs(want[..., :4]).max()
    assert 1e-7 < boxes < 1e-2


EVERY_OP = """
- {name: c1, type: conv, out: 6, kernel: 3, pad: 1}
- {name: bn1, type: batchnorm}
- {name: hs, type: hard_swish}
- {name: n1, type: lrn, size: 3}
- {name: t1, type: conv_transpose, out: 6, kernel: 4, stride: 2, pad: 1}
- {name: pr, type: prelu}
- {name: pad, type: pad, pads: 1, mode: reflect}
- {name: p1, type: maxpool, kernel: 2}
- {name: up, type: upsample, scale: 2}
- {name: cl, type: clip}
- {name: g, type: global_avgpool}
- {name: f, type: flatten}
- {name: fc, type: linear, out: 5}
- {name: sm, type: softmax}
"""


@pytest.mark.parametrize("opset", range(MIN_OPSET, MAX_OPSET + 1))
def test_every_op_at_every_opset(opset):
    graph = load(EVERY_OP, shape=(3, 9, 9)).graph
    fp32 = to_onnx(graph, opset=opset)
    fp16 = to_fp16(fp32)
    onnx.checker.check_model(fp16, full_check=True)
    inits = {t.name: t for t in fp16.graph.initializer}
    resize = next(n for n in fp16.graph.node if n.op_type == "Resize")
    scales = resize.input[2]
    assert inits[scales].data_type == TensorProto.FLOAT  # Resize's scales input must stay float32
    lrn = next(n for n in fp16.graph.node if n.op_type == "LRN")
    cast = next(n for n in fp16.graph.node if lrn.input[0] in n.output)
    assert cast.op_type == "Cast" and cast.attribute[0].i == TensorProto.FLOAT  # LRN runs in float32
    x = np.random.default_rng(opset).standard_normal((3, 3, 9, 9)).astype(np.float32)
    want = _run(fp32, x)
    err = np.abs(_run(fp16, x) - want).max() / np.abs(want).max()
    assert 1e-7 < err < 1e-2


@pytest.mark.parametrize("opset", [11, 12])
def test_resize_below_opset_13(opset):
    """Opsets 11 and 12 (Resize with roi, scales at input 2; Softmax over the trailing axes) convert too."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3, 8, 8])
    inits = [numpy_helper.from_array(np.random.default_rng(0).standard_normal((3, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(np.array([], np.float32), "roi"),
             numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Resize", ["c", "roi", "scales"], ["r"], mode="nearest"),
             helper.make_node("Softmax", ["r"], ["y"], axis=1)]
    fp32 = helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits),
                             opset_imports=[helper.make_opsetid("", opset)], ir_version=6)
    fp16 = to_fp16(fp32)
    onnx.checker.check_model(fp16, full_check=True)
    types = {t.name: t.data_type for t in fp16.graph.initializer}
    assert types["w"] == TensorProto.FLOAT16 and types["scales"] == TensorProto.FLOAT
    xin = np.random.default_rng(1).standard_normal((2, 3, 4, 4)).astype(np.float32)
    want = _run(fp32, xin)
    assert 1e-7 < np.abs(_run(fp16, xin) - want).max() / np.abs(want).max() < 1e-2


def test_default_block_list_keeps_nms_and_topk():
    assert {"NonMaxSuppression", "TopK", "LRN"} <= set(FP32_OPS)


def test_without_keep_io_types_inputs_and_outputs_are_float16(tmp_path):
    path = next(p for p in EXAMPLES if p.stem == "lenet5")
    graph, fp32 = _exported(path)
    fp16 = to_fp16(fp32, keep_io_types=False)
    for value in (*fp16.graph.input, *fp16.graph.output):
        assert value.type.tensor_type.elem_type == TensorProto.FLOAT16
    meta = read_metadata(fp16)
    assert meta["input"]["dtype"] == "float16" and meta["output_convention"][0]["dtype"] == "float16"
    file = tmp_path / "m.onnx"
    file.write_bytes(fp16.SerializeToString())
    session = Session(file, device="cpu")
    x = np.random.default_rng(1).standard_normal((2, *graph.inputs[0].shape)).astype(np.float32)
    got = session.run(x)[graph.outputs[0]]  # float32 images are cast to the model's float16 input
    assert got.dtype == np.float16
    want = _run(fp32, x)
    assert np.abs(got.astype(np.float32) - want).max() / np.abs(want).max() < 1e-2
    assert session.random_inputs(2)[graph.input_names[0]].dtype == np.float16


def test_refuses_fp16_and_quantized_models():
    path = next(p for p in EXAMPLES if p.stem == "lenet5")
    _, fp32 = _exported(path)
    fp16 = to_fp16(fp32, keep_io_types=False)
    with pytest.raises(DlcError, match="already float16"):
        to_fp16(fp16, file="m16.onnx")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])]
    inits = [numpy_helper.from_array(np.array(0.1, np.float32), "s"), numpy_helper.from_array(np.array(0, np.uint8), "z")]
    quantized = helper.make_model(helper.make_graph(nodes, "q", [x], [y], inits),
                                  opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    with pytest.raises(DlcError, match=r"q\.onnx: the model is already quantized \(DequantizeLinear"):
        to_fp16(quantized, file="q.onnx")


def test_topological_sort_restores_order_and_refuses_cycles():
    nodes = [helper.make_node("Relu", ["b"], ["c"], name="second"), helper.make_node("Relu", ["a"], ["b"], name="first"),
             helper.make_node("Relu", ["c"], ["d"], name="third")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("a", TensorProto.FLOAT, [1])],
                          [helper.make_tensor_value_info("d", TensorProto.FLOAT, [1])])
    topological_sort(g)
    assert [n.name for n in g.node] == ["first", "second", "third"]
    cyc = helper.make_graph([helper.make_node("Relu", ["b"], ["c"]), helper.make_node("Relu", ["c"], ["b"])], "cyc",
                            [], [helper.make_tensor_value_info("c", TensorProto.FLOAT, [1])])
    with pytest.raises(DlcError, match="cycle"):
        topological_sort(cyc)


def test_cpu_warning():
    warning = fp16_cpu_warning("cpu")
    assert "CPU" in warning and "fp32" in warning
    assert fp16_cpu_warning("cuda") is None and fp16_cpu_warning("tensorrt") is None
