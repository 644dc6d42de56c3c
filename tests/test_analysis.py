"""Parameter counts, MACs and receptive fields, checked against independent computations."""

import numpy as np
import onnxruntime as ort

from dlc.compiler.analysis import summarize
from dlc.compiler.frontend import load_model

from helpers import ROOT, load, ort_session


def test_resnet20_totals():
    s = summarize(load_model(ROOT / "examples/resnet20.yaml").graph)
    # 3×3 convs: 16·3·9 + 6·16·16·9 + 32·16·9 + 5·32·32·9 + 64·32·9 + 5·64·64·9; projections 16·32 + 32·64;
    # BN γ,β for 19 + 2 layers; fc 64·10 + 10.
    convs = 16 * 3 * 9 + 6 * 16 * 16 * 9 + 32 * 16 * 9 + 5 * 32 * 32 * 9 + 64 * 32 * 9 + 5 * 64 * 64 * 9
    proj = 16 * 32 + 32 * 64
    bn = 2 * (16 * 7 + 32 * 7 + 64 * 7)
    assert s.total_params == convs + proj + bn + 650 == 272_474
    macs = (16 * 3 * 9 * 32 * 32 + 6 * 16 * 16 * 9 * 32 * 32 + 32 * 16 * 9 * 16 * 16 + 5 * 32 * 32 * 9 * 16 * 16
            + 64 * 32 * 9 * 8 * 8 + 5 * 64 * 64 * 9 * 8 * 8 + 16 * 32 * 16 * 16 + 32 * 64 * 8 * 8 + 640)
    assert s.total_macs == macs == 40_813_184
    assert s.receptive_field == [81.0, 81.0]  # 3 + 6·2 + 2 + 5·4 + 4 + 5·8... as grown layer by layer


def test_params_equal_stored_tensor_sizes():
    for path in (ROOT / "examples").glob("*.yaml"):
        graph = load_model(path).graph
        s = summarize(graph)
        stored = sum(v.size for n in graph.nodes() for k, v in n.params.items() if k not in ("mean", "var"))
        assert s.total_params == stored, path.name


def test_grouped_conv_params_and_macs():
    m = load("- {name: dw, type: conv, out: 8, kernel: 3, pad: 1, groups: 4}", shape=(4, 10, 10))
    layer = summarize(m.graph).layers[0]
    assert layer.params == 8 * 1 * 9 + 8
    assert layer.macs == 8 * 10 * 10 * 1 * 9


def _empirical_field(graph, out_name):
    """Feed one-hot images through a network of positive weights and no bias; the input pixels that reach an
    output feature are its receptive field (clipped to the image)."""
    graph.outputs = [out_name]
    c, h, w = graph.inputs[0].shape
    eye = np.zeros((h * w, c, h, w), np.float32)
    eye[np.arange(h * w), :, np.arange(h * w) // w, np.arange(h * w) % w] = 1.0
    y = ort_session(graph, ort.GraphOptimizationLevel.ORT_DISABLE_ALL).run([out_name], {"input": eye})[0]
    return y


def test_receptive_field_matches_impulse_response():
    m = load("""
        - {name: c1, type: conv, out: 2, kernel: 3, pad: 1, bias: false, weight_filler: {type: constant, value: 1}}
        - {name: p1, type: avgpool, kernel: 2}
        - {name: c2, type: conv, out: 2, kernel: [3, 5], dilation: [2, 1], stride: [1, 2], bias: false,
           weight_filler: {type: constant, value: 1}}
        - {name: p2, type: maxpool, kernel: 3, stride: 2}
    """, shape=(1, 48, 48))
    s = summarize(m.graph)
    by_name = {layer.name: layer for layer in s.layers}
    for name in ("c1", "p1", "c2", "p2"):
        layer = by_name[name]
        y = _empirical_field(m.graph, name)
        _, oh, ow = layer.output_shape
        i, j = oh // 2, ow // 2  # an interior feature, away from the padded borders
        reached = (y[:, 0, i, j] != 0).reshape(48, 48)
        rows, cols = np.nonzero(reached.any(axis=1))[0], np.nonzero(reached.any(axis=0))[0]
        assert rows.max() - rows.min() + 1 == layer.rf_size[0], name
        assert cols.max() - cols.min() + 1 == layer.rf_size[1], name
        centre = ((rows.max() + rows.min()) / 2, (cols.max() + cols.min()) / 2)
        expected = (layer.rf_start[0] + i * layer.rf_jump[0], layer.rf_start[1] + j * layer.rf_jump[1])
        assert centre == expected, name
