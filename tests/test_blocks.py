"""Blocks with parameters and repeat, named inputs, sequential defaults."""

import numpy as np

from dlc.compiler.frontend import load_model_text

from helpers import ort_session, random_input

RES = """
model:
  input: {name: x, shape: [4, 8, 8]}
  blocks:
    res:
      params: {out: null, k: 3}
      layers:
        - {name: conv, type: conv, out: $out, kernel: $k, pad: same}
        - {name: add, type: add, inputs: [conv, input]}
    pair:
      inputs: [a, b]
      layers:
        - {name: cat, type: concat, inputs: [a, b]}
    nest:
      params: {out: 4}
      layers:
        - {name: r, block: res, out: $out, repeat: 2}
  layers:
    - {name: s, block: res, out: 4, repeat: 3}
    - {name: side, type: conv, out: 2, kernel: 1, inputs: x}
    - {name: j, block: pair, inputs: [s, side]}
    - {name: n, block: nest, inputs: s}
    - {name: last, type: add, inputs: [n, s_1]}
  outputs: [j, last]
"""


def test_expansion_names_and_wiring():
    m = load_model_text(RES, "m.yaml")
    names = [n.name for n in m.graph.nodes()]
    assert names[:6] == ["s_0/conv", "s_0/add", "s_1/conv", "s_1/add", "s_2/conv", "s_2/add"]
    g = m.graph
    assert g.node("s_0/conv").inputs == ["x"]
    assert g.node("s_1/conv").inputs == ["s_0/add"]
    assert g.node("s_1/add").inputs == ["s_1/conv", "s_0/add"]
    assert g.node("j/cat").inputs == ["s_2/add", "side"]
    assert g.node("n/r_0/conv").inputs == ["s_2/add"]
    assert g.node("last").inputs == ["n/r_1/add", "s_1/add"]
    assert g.outputs == ["j/cat", "last"]
    assert g.shapes["j/cat"] == (6, 8, 8)
    assert g.node("s_0/conv").attrs["kernel"] == (3, 3)


def test_expanded_graph_runs_and_matches_numpy_residual():
    m = load_model_text(RES, "m.yaml")
    outs = ort_session(m.graph).run(None, {"x": random_input(m.graph)})
    assert [o.shape for o in outs] == [(2, 6, 8, 8), (2, 4, 8, 8)]
    # Residual identity: with zero conv weights and biases every res block is the identity.
    for node in m.graph.nodes():
        for p in node.params.values():
            p[...] = 0
    x = random_input(m.graph)
    j, last = ort_session(m.graph).run(None, {"x": x})
    np.testing.assert_allclose(last, 2 * x, rtol=1e-6)
    np.testing.assert_allclose(j[:, :4], x, rtol=1e-6)


def test_sequential_default_and_auto_names():
    m = load_model_text("model:\n  input: {shape: [1, 4, 4]}\n  layers:\n    - {type: relu}\n    - {type: sigmoid}\n",
                        "m.yaml")
    assert [(n.name, n.inputs) for n in m.graph.nodes()] == [("relu_1", ["input"]), ("sigmoid_2", ["relu_1"])]
