"""ONNX import and `dlc import`: dlc's own exports and PyTorch's come back as the same function, written as a
YAML that loads with its weights; every unsupported op is listed at once; `weights:` loads tensors by name and
shape, so a changed head is initialised afresh and fine-tunes."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from dlc.compiler.cli import app
from dlc.compiler.errors import DlcError
from dlc.compiler.export_onnx import to_onnx
from dlc.compiler.frontend import load_model
from dlc.compiler.onnx_import import import_onnx, verify_import
from dlc.compiler.pipeline import artifact_metadata
from dlc.compiler.train.checkpoint import graph_tensors, read_checkpoint, save_checkpoint
from dlc.compiler.train.executor import Executor
from dlc.compiler.yaml_writer import graph_to_yaml

from helpers import EXAMPLES, model_yaml, random_input, torch_fixture, torch_nets

runner = CliRunner()


def run_ort(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})


def randomize_bn(graph, seed=0) -> None:
    """Batch norm that is not the identity, so that a wrong scale, mean or eps shows."""
    rng = np.random.default_rng(seed)
    for node in graph.nodes():
        if node.op == "batchnorm":
            c = node.params["mean"].shape
            node.params.update(
                mean=rng.normal(0, 0.5, c),
                var=rng.uniform(0.5, 2, c),
                scale=rng.uniform(0.5, 1.5, c),
                bias=rng.normal(0, 0.2, c),
            )
            node.params.update({k: v.astype(np.float32) for k, v in node.params.items()})


def write_imported(graph, folder):
    save_checkpoint(folder / "weights.safetensors", graph)
    path = folder / "model.yaml"
    path.write_text(graph_to_yaml(graph, "weights.safetensors"))
    return path


def assert_close(got, want):
    # float32 sums in another order: the error grows with the output's scale (22 on the U-Net example)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * max(1.0, float(np.abs(want).max())))


# --- dlc's own models, there and back -------------------------------------------------------------------------
@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_examples_round_trip(path, tmp_path):
    loaded = load_model(path)
    randomize_bn(loaded.graph)
    original = to_onnx(loaded.graph, metadata=artifact_metadata(loaded))
    graph = import_onnx(original, source=f"{path.stem}.onnx")
    assert graph.name == loaded.spec.name
    assert graph.meta["input"] == loaded.graph.meta["input"] and graph.meta["classes"] == loaded.spec.classes
    kept = [n for n in loaded.graph.nodes() if n.op != "dropout"]  # dropout is the identity at inference
    assert [n.name.replace("/", "_") for n in kept] == [n.name for n in graph.nodes()]
    assert [n.op for n in kept] == [n.op for n in graph.nodes()]
    for a, b in zip(kept, graph.nodes()):
        if a.op == "detect":  # rebuilt from the metadata: anchors, strides, post-processing and loss settings
            assert b.attrs == a.attrs and b.inputs == a.inputs

    reloaded = load_model(write_imported(graph, tmp_path))
    weights = reloaded.graph.meta["weights"]
    assert weights["initialised"] == [] and weights["loaded"] == weights["tensors"] == len(
        graph_tensors(graph)
    )
    x = random_input(loaded.graph, batch=2, seed=1)
    want = run_ort(original, x)
    for got, expected in zip(run_ort(to_onnx(reloaded.graph), x), want):
        assert_close(got, expected)
    y = Executor(reloaded.graph).forward(x)
    for name, expected in zip(reloaded.graph.outputs, want):
        assert_close(y[name], expected)


ALL_OPS = """
- {name: c1, type: conv, out: 8, kernel: [3, 5], stride: [1, 2], pad: [0, 1, 1, 2], bias: false}
- {name: bn1, type: batchnorm, eps: 0.001, momentum: 0.05}
- {name: a1, type: leaky_relu, slope: 0.2}
- {name: c2, type: conv, out: 8, kernel: 3, pad: 2, dilation: 2, groups: 4}
- {name: a2, type: silu}
- {name: p1, type: avgpool, kernel: 3, stride: 2, pad: [1, 0], ceil_mode: true, count_include_pad: true}
- {name: up, type: upsample, scale: [2, 1]}
- {name: s, type: sigmoid, inputs: a1}
- {name: p2, type: maxpool, kernel: 2, stride: [1, 2], pad: [1, 0]}
- {name: t, type: tanh}
- {name: cat, type: concat, inputs: [up, t]}
- {name: sum, type: add, inputs: [cat, cat, cat]}
- {name: gap, type: global_avgpool}
- {name: flat, type: flatten}
- {name: fc, type: linear, out: 6, bias: false}
- {name: bn2, type: batchnorm}
- {name: drop, type: dropout}
- {name: prob, type: softmax}
"""


def test_every_layer_type_and_the_yaml_it_writes(tmp_path):
    yaml_path = tmp_path / "src.yaml"
    text = model_yaml(ALL_OPS, shape=(4, 12, 16)).replace("name: t\n", 'name: "on"\n', 1)
    yaml_path.write_text(
        text.replace("  layers:", "  classes: [yes, '007', a b, c, d, e]\n  outputs: [prob, gap]\n  layers:")
    )
    loaded = load_model(yaml_path)
    randomize_bn(loaded.graph, seed=3)
    original = to_onnx(loaded.graph, metadata=artifact_metadata(loaded))
    graph = import_onnx(original)
    out = write_imported(graph, tmp_path)
    written = out.read_text()
    assert '  name: "on"\n' in written and 'classes: ["True", "007", "a b", c, d, e]' in written
    assert (
        "- {name: c1, type: conv, out: 8, kernel: [3, 5], stride: [1, 2], pad: [0, 1, 1, 2], bias: false}"
        in written
    )
    assert "- {name: bn1, type: batchnorm, eps: 0.001, momentum: 0.05}" in written
    assert "- {name: c2, type: conv, out: 8, kernel: 3, pad: 2, dilation: 2, groups: 4}" in written
    assert "- {name: p2, type: maxpool, kernel: 2, stride: [1, 2], pad: [1, 0]}" in written
    assert "- {name: s, type: sigmoid, inputs: a1}" in written and "inputs: [cat, cat, cat]" in written
    assert "outputs: [prob, gap]" in written and "drop" not in written
    reloaded = load_model(out)
    assert reloaded.spec.classes == loaded.spec.classes and reloaded.spec.name == "on"
    x = random_input(loaded.graph, batch=3, seed=2)
    want = run_ort(original, x)
    for got, expected in zip(run_ort(to_onnx(reloaded.graph), x), want):
        assert_close(got, expected)


# --- PyTorch's exports ---------------------------------------------------------------------------------------
# ResNet-, MobileNet-shaped nets and one of the other mappings (SiLU, 'same' padding, pad + pool, upsample, concat,
# ceil mode, BatchNorm1d), defined in tests/fixtures/make_torch_fixtures.py. Each is exported five ways:
# (opset, do_constant_folding, keep batch norm): eval-mode export folds BN into the conv unless told to PRESERVE.
TORCH_EXPORTS = [(17, False, True), (17, True, False), (17, True, True), (11, False, True), (9, True, True)]
TORCH_NETS = ["resnet", "mobilenet", "misc"]


def _check_torch_export(original, net, config, x, want, batchnorms):
    opset, folding, keep_bn = config
    graph = import_onnx(original, source=f"{net}.onnx")
    case = f"{net} opset {opset} folding {folding} keep_bn {keep_bn}"
    kept = sum(n.op == "batchnorm" for n in graph.nodes())
    assert kept == batchnorms if keep_bn else kept < batchnorms, case  # a BatchNorm1d after Linear stays
    assert all("/" not in n.name and "." not in n.name for n in graph.nodes())
    verify_import(original, graph, runs=2, rtol=1e-4, atol=1e-5)
    got = Executor(graph).forward(x)[graph.outputs[0]]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=case)
    if net == "resnet" and keep_bn:
        names = {n.name for n in graph.nodes()}
        assert {"conv1", "bn1", "layer1_0_conv1", "layer2_0_shortcut_0", "layer3_add", "fc"} <= names


@pytest.mark.parametrize("net", TORCH_NETS)
def test_pytorch_exports(net):
    """The committed exports (no torch needed) against torch's outputs stored beside them."""
    for opset, folding, keep_bn in TORCH_EXPORTS:
        original, ref = torch_fixture(net, f"{net}_opset{opset}_fold{int(folding)}_bn{int(keep_bn)}")
        assert original.opset_import[0].version == opset
        _check_torch_export(original, net, (opset, folding, keep_bn), ref["x"], ref["want"], int(ref["batchnorms"]))


@pytest.mark.parametrize("net", TORCH_NETS)
def test_pytorch_exports_live(net):
    """The same nets exported now by the installed torch (skipped without it)."""
    nets = torch_nets()
    assert nets.TORCH_EXPORTS == TORCH_EXPORTS and list(nets.IMPORT_NETS) == TORCH_NETS
    model, x = nets.build(net)
    want = nets.reference(model, x)
    bns = sum(isinstance(m, (nets.nn.BatchNorm1d, nets.nn.BatchNorm2d)) for m in model.modules())
    for config in TORCH_EXPORTS:
        original = onnx.load_from_string(nets.export(net, model, *config))
        _check_torch_export(original, net, config, x, want, bns)


# --- what dlc cannot import -------------------------------------------------------------------------------------
def _model(nodes, inits=(), inputs=None, opset=17):
    inputs = inputs or [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4, 8, 8])]
    out = nodes[-1].output[0]
    graph = helper.make_graph(
        nodes,
        "g",
        inputs,
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(v, k) for k, v in inits],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def test_unsupported_ops_are_listed_at_once():
    nodes, prev = [], "x"
    for i in range(4):
        nodes.append(helper.make_node("Erf", [prev], [f"h{i}"], name=f"erf{i}"))
        prev = f"h{i}"
    nodes.append(helper.make_node("Relu", [prev], ["r"], name="relu"))
    for i in range(2):
        nodes.append(helper.make_node("Sin", [nodes[-1].output[0]], [f"l{i}"], name=f"sin{i}"))
    nodes.append(helper.make_node("Resize", ["l1", "", "scales"], ["up"], name="up", mode="linear"))
    model = _model(nodes, [("scales", np.array([1, 1, 2, 2], np.float32))])
    with pytest.raises(DlcError) as info:
        import_onnx(model, source="bad.onnx")
    assert len(info.value.diagnostics) == 1
    message = str(info.value)
    assert message.startswith(
        "bad.onnx: unsupported ONNX ops: Erf ×4 (erf0, erf1, erf2, ...), Sin ×2 (sin0, sin1)"
    )
    assert "Resize ×1 (up) [mode 'linear'" in message and "dlc imports Add, AveragePool" in message


def test_inputs_dlc_cannot_take():
    relu = [helper.make_node("Relu", ["x"], ["y"])]
    dynamic = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, "h", "w"])]
    with pytest.raises(DlcError, match=r"C, H and W must be fixed numbers"):
        import_onnx(_model(relu, inputs=dynamic))
    flat = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3])]
    with pytest.raises(DlcError, match=r"input 'x' is of rank 2"):
        import_onnx(_model(relu, inputs=flat))
    two = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 3, 4, 4]) for n in ("x", "z")]
    with pytest.raises(DlcError, match=r"the model has 2 inputs \('x', 'z'\)"):
        import_onnx(_model([helper.make_node("Add", ["x", "z"], ["y"])], inputs=two))
    with pytest.raises(DlcError, match=r"opset 8: dlc imports ONNX opsets 9 to"):
        import_onnx(_model(relu, opset=8))


def test_gemm_matmul_and_resize_forms():
    """Gemm with alpha, beta and an untransposed B; MatMul + Add; Squeeze; ReduceMean; Resize by sizes and by
    half-pixel rounding, which repeat pixels too."""
    rng = np.random.default_rng(0)
    f32 = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    inits = [
        ("sizes", np.array([1, 4, 16, 24], np.int64)),
        ("scales", np.array([1, 1, 2, 2], np.float32)),
        ("axes", np.array([2, 3], np.int64)),
        ("B", f32(8, 5)),
        ("C", f32(1, 5)),
        ("W", f32(5, 3)),
        ("b", f32(3)),
    ]
    nodes = [
        helper.make_node(
            "Resize",
            ["x", "", "", "sizes"],
            ["r1"],
            mode="nearest",
            nearest_mode="floor",
            coordinate_transformation_mode="asymmetric",
        ),
        helper.make_node(
            "Resize", ["r1", "", "scales"], ["r2"], mode="nearest"
        ),  # half_pixel, round_prefer_floor
        helper.make_node("GlobalMaxPool", ["r2"], ["g"]),
        helper.make_node("ReduceMean", ["r2", "axes"], ["m"], keepdims=1),
        helper.make_node("Concat", ["g", "m"], ["gm"], axis=-3),
        helper.make_node("Squeeze", ["gm", "axes"], ["v"]),
        helper.make_node("Gemm", ["v", "B", "C"], ["fc1"], alpha=0.5, beta=2.0),
        helper.make_node("MatMul", ["fc1", "W"], ["mm"]),
        helper.make_node("Add", ["b", "mm"], ["out"]),
    ]
    static = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])]  # sizes fix the batch
    model = _model(nodes, inits, inputs=static, opset=18)
    graph = import_onnx(model)
    assert [n.op for n in graph.nodes()] == [
        "upsample",
        "upsample",
        "maxpool",
        "global_avgpool",
        "concat",
        "flatten",
        "linear",
        "linear",
    ]
    assert [n.attrs["scale"] for n in graph.nodes()[:2]] == [(2, 3), (2, 2)]
    verify_import(model, graph, runs=2, rtol=1e-5, atol=1e-5)


# --- weights: and transfer learning ---------------------------------------------------------------------------
TINY = """
- {name: c1, type: conv, out: 8, kernel: 3, pad: 1}
- {name: bn1, type: batchnorm}
- {name: r1, type: relu}
- {name: p1, type: maxpool, kernel: 2}
- {name: f, type: flatten}
- {name: fc, type: linear, out: 4}
"""


@pytest.fixture()
def imported_tiny(tmp_path):
    src = tmp_path / "tiny.yaml"
    src.write_text(model_yaml(TINY, shape=(3, 12, 12)))
    loaded = load_model(src)
    randomize_bn(loaded.graph)
    folder = tmp_path / "imported"
    folder.mkdir()
    return write_imported(import_onnx(to_onnx(loaded.graph), source="tiny.onnx"), folder)


def test_transfer_learning_new_head(imported_tiny, tmp_path):
    params, _, _, _ = read_checkpoint(imported_tiny.parent / "weights.safetensors")
    text = imported_tiny.read_text()
    assert "- {name: fc, type: linear, out: 4}" in text
    text = text.replace("- {name: fc, type: linear, out: 4}", "- {name: fc, type: linear, out: 3}")
    text += (
        "data: {dataset: synthetic, samples: 40, num_classes: 3, seed: 1}\n"
        "train: {base_lr: 0.01, batch_size: 16, epochs: 1, lr_policy: fixed}\n"
    )
    imported_tiny.write_text(text)
    loaded = load_model(imported_tiny)
    meta = loaded.graph.meta["weights"]
    assert meta["initialised"] == ["fc"] and meta["unused"] == ["fc.bias", "fc.weight"]
    assert meta["loaded"] == meta["tensors"] - 2 == 6
    for key, value in graph_tensors(loaded.graph).items():
        if not key.startswith("fc."):
            np.testing.assert_array_equal(value, params[key])
    fresh = imported_tiny.parent / "fresh.yaml"  # the same model without weights: the head from its filler
    fresh.write_text(text.replace("  weights: weights.safetensors\n", ""))
    head = load_model(fresh).graph.node("fc").params
    np.testing.assert_array_equal(loaded.graph.node("fc").params["weight"], head["weight"])
    assert loaded.graph.node("fc").params["weight"].shape == (3, 8 * 6 * 6)

    from dlc.compiler.train.trainer import Trainer

    result = Trainer(loaded, tmp_path / "run", progress=False).run()
    assert result.stopped == "completed" and np.isfinite(result.history[-1]["train_loss"])


@pytest.mark.parametrize(
    "value, message",
    [
        ("../x.safetensors", "must be a path inside the YAML file's folder"),
        ("/tmp/x.safetensors", "must be a path inside the YAML file's folder"),
        ("missing.safetensors", "weights file 'missing.safetensors' not found"),
        ("corrupt.safetensors", "cannot read weights file 'corrupt.safetensors'"),
        ("other.safetensors", "none of the 1 tensors in 'other.safetensors' fits a layer"),
        ("7", "must be the path of a safetensors file"),
    ],
)
def test_bad_weights_are_reported_with_their_line(imported_tiny, value, message):
    folder = imported_tiny.parent
    (folder / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    from safetensors.numpy import save_file

    save_file({"param/other.weight": np.zeros(3, np.float32)}, str(folder / "other.safetensors"))
    text = imported_tiny.read_text().replace("weights: weights.safetensors", f"weights: {value}")
    imported_tiny.write_text(text)
    line = text.splitlines().index(f"  weights: {value}") + 1
    with pytest.raises(DlcError) as info:
        load_model(imported_tiny)
    [diag] = info.value.diagnostics
    assert message in diag.message and diag.line == line and diag.file == str(imported_tiny)


# --- the command line ---------------------------------------------------------------------------------------------
def test_cli_import_then_compile(tmp_path):
    path = EXAMPLES[[p.stem for p in EXAMPLES].index("resnet20")]
    loaded = load_model(path)
    randomize_bn(loaded.graph)
    original = to_onnx(loaded.graph, metadata=artifact_metadata(loaded))
    onnx.save(original, tmp_path / "resnet20.onnx")
    result = runner.invoke(app, ["import", str(tmp_path / "resnet20.onnx"), "-o", str(tmp_path / "imp")])
    assert result.exit_code == 0, result.output
    assert (
        "73 layers" in result.stdout and "272,474 parameters" in result.stdout and "verified" in result.stdout
    )
    assert (tmp_path / "imp/model.yaml").is_file() and (tmp_path / "imp/weights.safetensors").is_file()
    data = json.loads(
        runner.invoke(
            app,
            [
                "import",
                str(tmp_path / "resnet20.onnx"),
                "-o",
                str(tmp_path / "imp"),
                "--json",
                "--check",
                "0",
            ],
        ).stdout
    )
    assert data["layers"] == 73 and data["layer_types"]["batchnorm"] == 21 and data["verification"] is None

    result = runner.invoke(app, ["compile", str(tmp_path / "imp/model.yaml"), "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "weights.safetensors: 107 of 107 tensors loaded" in result.stdout
    report = json.loads((tmp_path / "out/report.json").read_text())
    assert report["weights"]["loaded"] == 107 and report["weights"]["initialised"] == []
    x = random_input(loaded.graph, batch=2, seed=4)
    assert_close(run_ort(onnx.load(tmp_path / "out/model.onnx"), x)[0], run_ort(original, x)[0])


def test_cli_import_errors(tmp_path):
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x08\x07garbage that is not a protobuf \xff\xff")
    result = runner.invoke(app, ["import", str(corrupt), "-o", str(tmp_path / "a")])
    assert result.exit_code == 2 and "not a readable ONNX model" in result.output
    hard = _model([helper.make_node("Erf", ["x"], ["y"], name="erf")])
    onnx.save(hard, tmp_path / "hard.onnx")
    result = runner.invoke(app, ["import", str(tmp_path / "hard.onnx"), "-o", str(tmp_path / "b")])
    assert result.exit_code == 2 and "unsupported ONNX ops: Erf ×1 (erf)" in result.output
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_normalising_passes_on_legacy_exports():
    """What the legacy PyTorch exporter writes at opset 9: Unsqueeze with axes as an attribute (which onnx's
    reference evaluator cannot fold) in x.view(x.size(0), -1), and a Pad chain before a pool."""
    from dlc.compiler.passes import optimize

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 2, 4, 4])
    nodes = [
        helper.make_node("Pad", ["x"], ["p1"], mode="constant", pads=[0, 0, 1, 1, 0, 0, 1, 1]),
        helper.make_node("Pad", ["p1"], ["p2"], mode="constant", pads=[0] * 8, value=0.0),
        helper.make_node("AveragePool", ["p2"], ["a"], kernel_shape=[3, 3], strides=[2, 2]),
        helper.make_node("Shape", ["a"], ["s"]),
        helper.make_node("Gather", ["s", "zero"], ["g"], axis=0),
        helper.make_node("Unsqueeze", ["g"], ["u0"], axes=[0]),
        helper.make_node("Unsqueeze", ["minus1"], ["u1"], axes=[0]),
        helper.make_node("Concat", ["u0", "u1"], ["shape"], axis=0),
        helper.make_node("Reshape", ["a", "shape"], ["y"]),
    ]
    inits = [
        numpy_helper.from_array(np.array(0, np.int64), "zero"),
        numpy_helper.from_array(np.array(-1, np.int64), "minus1"),
    ]
    graph = helper.make_graph(
        nodes, "g", [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)], ir_version=6)
    optimized, _ = optimize(model, ["constant_folding", "fuse_pad", "dce"])
    assert [n.op_type for n in optimized.graph.node] == ["AveragePool", "Reshape"]
    assert [n.op for n in import_onnx(model).nodes()] == ["avgpool", "flatten"]


def test_a_model_without_parameters_imports_and_runs(tmp_path):
    """An all-activation graph has no tensors to load: the written YAML must still load (it once failed with
    'none of the 0 tensors fits a layer') and compute what the original computes."""
    nodes = [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Sigmoid", ["a"], ["b"]),
             helper.make_node("MaxPool", ["b"], ["y"], kernel_shape=[2, 2], strides=[2, 2])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 4, 4])])
    src = tmp_path / "act.onnx"
    onnx.save(helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 17)]), src)
    result = CliRunner().invoke(app, ["import", str(src), "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    g = load_model(tmp_path / "out" / "model.yaml").graph
    x = np.random.default_rng(0).normal(0, 2, (1, 3, 8, 8)).astype(np.float32)
    want = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = Executor(g).forward(x)[g.outputs[0]]
    np.testing.assert_allclose(got.reshape(want.shape), want, rtol=1e-5, atol=1e-6)
