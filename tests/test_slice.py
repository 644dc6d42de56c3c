"""slice (a channel range): forward and backward, training through it, export as ONNX Slice, and import of the
forms ShuffleNetV2 exports take: Split (opset 11 attribute, opset 13 input, opset 18 num_outputs) and Slice,
with its channel shuffle (Reshape, Transpose, Reshape)."""

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from dlc.compiler.errors import DlcError
from dlc.compiler.export_onnx import to_onnx
from dlc.compiler.onnx_import import import_onnx
from dlc.compiler.train.executor import Executor

from helpers import check_param_grad, load, randomize_weights

# A ShuffleNetV2 unit: split the channels in two, convolve one half, join and shuffle.
LAYERS = """
- {name: stem, type: conv, out: 8, kernel: 3, pad: 1}
- {name: left, type: slice, start: 0, end: 4, inputs: stem}
- {name: right, type: slice, start: 4, end: 8, inputs: stem}
- {name: conv, type: conv, out: 4, kernel: 3, pad: 1, groups: 4, inputs: right}
- {name: join, type: concat, inputs: [left, conv]}
- {name: split_g, type: reshape, shape: [2, 4, 6, 6]}
- {name: swap, type: transpose, perm: [1, 0, 2, 3]}
- {name: shuffled, type: reshape, shape: [8, 6, 6]}
- {name: pool, type: global_avgpool}
- {name: flat, type: flatten}
- {name: fc, type: linear, out: 3}
"""


def _graph():
    graph = load(LAYERS, shape=(3, 6, 6)).graph
    randomize_weights(graph, seed=1, gain=2.0)
    return graph


def test_shapes_and_bad_ranges():
    graph = _graph()
    assert graph.shapes["left"] == (4, 6, 6) and graph.shapes["right"] == (4, 6, 6)
    with pytest.raises(DlcError, match=r"channels \[6, 10\) are not within the input's 8"):
        load(LAYERS.replace("start: 4, end: 8", "start: 6, end: 10"), shape=(3, 6, 6))


def test_forward_backward_and_gradients_through_the_split():
    graph = _graph()
    x = np.random.default_rng(2).normal(0, 1, (2, 3, 6, 6)).astype(np.float32)
    ex = Executor(graph)
    values = ex.forward(x, outputs=["stem", "left", "right"])
    np.testing.assert_array_equal(values["left"], values["stem"][:, :4])
    np.testing.assert_array_equal(values["right"], values["stem"][:, 4:])
    seed = np.random.default_rng(3).normal(0, 1, (2, 3)).astype(np.float32)
    ex.forward(x, train=True)
    # both halves of stem reach the loss (left directly, right through conv): a wrong offset breaks one
    check_param_grad(ex, x, "fc", seed, "stem", "weight", ex.backward({"fc": seed})["stem"]["weight"])


def test_export_runs_on_onnxruntime_and_imports_back():
    graph = _graph()
    x = np.random.default_rng(4).normal(0, 2, (2, 3, 6, 6)).astype(np.float32)
    want = Executor(graph).forward(x)["fc"]
    model = to_onnx(graph)
    assert "Slice" in {n.op_type for n in model.graph.node}
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {model.graph.input[0].name: x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    back = import_onnx(model)
    assert [n.op for n in back.nodes()].count("slice") == 2
    np.testing.assert_allclose(Executor(back).forward(x)[back.outputs[0]], want, rtol=1e-5,
                               atol=1e-5 * np.abs(want).max())


def _shufflenet_unit(form: str, opset: int):
    """x (1×8×5×5) -> split in halves -> right half through a 1×1 conv -> concat -> channel shuffle (2 groups)."""
    rng = np.random.default_rng(5)
    inits = [numpy_helper.from_array(rng.normal(0, 0.5, (4, 4, 1, 1)).astype(np.float32), "w"),
             numpy_helper.from_array(np.array([1, 2, 4, 5, 5], np.int64), "s5"),
             numpy_helper.from_array(np.array([1, 8, 5, 5], np.int64), "s4")]
    if form == "split_attr":
        split = [helper.make_node("Split", ["x"], ["a", "b"], axis=1, split=[4, 4], name="split")]
    elif form == "split_input":
        inits.append(numpy_helper.from_array(np.array([4, 4], np.int64), "sizes"))
        split = [helper.make_node("Split", ["x", "sizes"], ["a", "b"], axis=1, name="split")]
    elif form == "split_num_outputs":
        split = [helper.make_node("Split", ["x"], ["a", "b"], axis=1, num_outputs=2, name="split")]
    else:  # two Slices, the second to INT64_MAX as torch writes x[:, 4:]
        for name, value in (("z", [0]), ("four", [4]), ("big", [2**63 - 1]), ("one", [1])):
            inits.append(numpy_helper.from_array(np.array(value, np.int64), name))
        split = [helper.make_node("Slice", ["x", "z", "four", "one"], ["a"], name="slice_a"),
                 helper.make_node("Slice", ["x", "four", "big", "one"], ["b"], name="slice_b")]
    nodes = split + [
        helper.make_node("Conv", ["b", "w"], ["bc"], name="conv"),
        helper.make_node("Relu", ["bc"], ["br"], name="relu"),
        helper.make_node("Concat", ["a", "br"], ["cat"], axis=1, name="cat"),
        helper.make_node("Reshape", ["cat", "s5"], ["r5"], name="r5"),
        helper.make_node("Transpose", ["r5"], ["t5"], perm=[0, 2, 1, 3, 4], name="shuffle"),
        helper.make_node("Reshape", ["t5", "s4"], ["y"], name="r4"),
    ]
    graph = helper.make_graph(nodes, "unit", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 5, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 5, 5])], inits)
    return helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", opset)])


@pytest.mark.parametrize("form, opset", [("split_attr", 11), ("split_input", 13), ("split_num_outputs", 18),
                                         ("slices", 13)])
def test_shufflenet_units_import_and_match_onnxruntime(form, opset):
    model = _shufflenet_unit(form, opset)
    graph = import_onnx(model)
    assert [n.op for n in graph.nodes()].count("slice") == 2
    x = np.random.default_rng(6).normal(0, 1, (1, 8, 5, 5)).astype(np.float32)
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = Executor(graph).forward(x)[graph.outputs[0]]
    np.testing.assert_allclose(got.reshape(want.shape), want, rtol=1e-5, atol=1e-6)


def test_a_split_along_height_is_named_unsupported():
    model = _shufflenet_unit("split_attr", 11)
    model.graph.node[0].attribute[0].i = 2  # axis 2
    model.graph.node[0].attribute[1].ints[:] = [2, 3]
    with pytest.raises(DlcError, match=r"Split ×1 \(split\) \[along axis 2 \(dlc splits and slices channels"):
        import_onnx(model)


def test_slice_layers_in_yaml_need_an_end():
    with pytest.raises(DlcError, match="'end'"):
        load("- {name: s, type: slice, start: 1}", shape=(3, 4, 4))


SPLIT_NET = """
- {name: stem, type: conv, out: 8, kernel: 3, pad: 1, bias: false}
- {name: stem_relu, type: relu}
- {name: left, type: slice, start: 0, end: 4, inputs: stem_relu}
- {name: right, type: slice, start: 4, end: 8, inputs: stem_relu}
- {name: conv_l, type: conv, out: 4, kernel: 1, bias: false, inputs: left}
- {name: conv_r, type: conv, out: 4, kernel: 3, pad: 1, bias: false, inputs: right}
- {name: join, type: concat, inputs: [conv_l, conv_r]}
- {name: pool, type: global_avgpool}
- {name: flat, type: flatten}
- {name: fc, type: linear, out: 3}
"""


def _split_net(dead):
    graph = load(SPLIT_NET, shape=(3, 6, 6)).graph
    randomize_weights(graph, seed=9, gain=2.0)
    graph.node("stem").params["weight"][list(dead)] = 0.0  # dead filters: removing them changes nothing
    graph.node("conv_l").params["weight"][[0, 3]] = 0.0
    graph.node("conv_r").params["weight"][[1, 2]] = 0.0
    return graph


def test_structured_pruning_moves_the_slice_offsets_with_the_channels():
    """stem's channels are one group seen through both slices: pruning its dead filters (1, 2 of the left half,
    4, 7 of the right; and the dead filters of the branch convs) narrows both ranges, re-bases the right one,
    and the outputs do not change."""
    from dlc.compiler.prune.structured import prune

    graph = _split_net(dead=(1, 2, 4, 7))
    x = np.random.default_rng(10).normal(0, 1, (2, 3, 6, 6)).astype(np.float32)
    before = Executor(graph).forward(x)["fc"]
    report = prune(graph, 0.5, "l1")
    assert {r["producers"][0]: r["after"] for r in report} == {"stem": 4, "conv_l": 2, "conv_r": 2}
    assert (graph.node("left").attrs["start"], graph.node("left").attrs["end"]) == (0, 2)
    assert (graph.node("right").attrs["start"], graph.node("right").attrs["end"]) == (2, 4)
    assert graph.node("conv_l").params["weight"].shape == (2, 2, 1, 1)
    assert graph.node("conv_r").params["weight"].shape == (2, 2, 3, 3)
    np.testing.assert_allclose(Executor(graph).forward(x)["fc"], before, rtol=0, atol=1e-6 * np.abs(before).max())


def test_pruning_that_would_empty_a_slice_is_refused():
    from dlc.compiler.prune.structured import prune

    graph = _split_net(dead=(4, 5, 6, 7))  # the whole right half is dead: l1 would take all of it
    with pytest.raises(DlcError, match=r"pruning would remove every channel that slice 'right' takes \(\[4, 8\)\)"):
        prune(graph, 0.5, "l1")
