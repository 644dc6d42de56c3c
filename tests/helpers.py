from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from dlc.compiler.errors import DlcError
from dlc.compiler.export_onnx import to_onnx
from dlc.compiler.frontend import load_model_text

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


# A five-layer network that trains in well under a second: for checkpoint, resume and output-folder tests.
TINY_TRAINING_YAML = """model:
  name: tiny
  input: {shape: [3, 8, 8], mean: 0.5, std: 0.25}
  layers:
    - {name: c1, type: conv, out: 4, kernel: 3, pad: 1}
    - {name: bn1, type: batchnorm}
    - {name: r1, type: relu}
    - {name: f, type: flatten}
    - {name: fc, type: linear, out: 3}
data: {dataset: synthetic, samples: 120, num_classes: 3, seed: 1}
train: {base_lr: 0.05, batch_size: 16, epochs: EPOCHS, seed: 5}
"""


def tiny_training_yaml(folder: Path, epochs: int = 2, extra: str = "") -> Path:
    """Write TINY_TRAINING_YAML (with `epochs` and `extra` appended) as folder/tiny.yaml and return its path."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "tiny.yaml"
    path.write_text(TINY_TRAINING_YAML.replace("EPOCHS", str(epochs)) + extra)
    return path


# A small classifier's layers (conv, relu, global pool, linear to 3 classes) for CLI and predict tests.
SMALL_CLASSIFIER_LAYERS = """
- {name: conv, type: conv, out: 4, kernel: 3, pad: 1}
- {name: relu, type: relu}
- {name: pool, type: global_avgpool}
- {name: flat, type: flatten}
- {name: fc, type: linear, out: 3}
"""


def model_yaml(layers: str, shape=(3, 16, 16), extra: str = "") -> str:
    """A model YAML around an indented block of layers."""
    body = textwrap.indent(textwrap.dedent(layers).strip("\n"), "    ")
    return f"model:\n  name: t\n  input: {{shape: {list(shape)}}}\n  layers:\n{body}\n{extra}"


def load(layers: str, shape=(3, 16, 16), extra: str = ""):
    return load_model_text(model_yaml(layers, shape, extra), "m.yaml")


def errors_of(text: str) -> list[str]:
    with pytest.raises(DlcError) as info:
        load_model_text(text, "m.yaml")
    return [d.format() for d in info.value.diagnostics]


def ort_session(graph, optimization=ort.GraphOptimizationLevel.ORT_DISABLE_ALL) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = optimization
    return ort.InferenceSession(to_onnx(graph).SerializeToString(), options, providers=["CPUExecutionProvider"])


def random_input(graph, batch=2, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, *graph.inputs[0].shape)).astype(np.float32)


def numeric_grad(f, x: np.ndarray, h: float = 1e-6) -> np.ndarray:
    """Central finite differences of the scalar f at x, element by element (use float64)."""
    grad = np.zeros_like(x)
    flat, gflat = x.reshape(-1), grad.reshape(-1)
    for i in range(flat.size):
        keep = flat[i]
        flat[i] = keep + h
        up = f(x)
        flat[i] = keep - h
        down = f(x)
        flat[i] = keep
        gflat[i] = (up - down) / (2 * h)
    return grad


def check_param_grad(ex, x: np.ndarray, output: str, seed: np.ndarray, layer: str, tensor: str,
                     grad: np.ndarray, h: float = 1e-2, rtol: float = 2e-2) -> None:
    """`grad`, the backward of sum(seed * output) with respect to layer.tensor, against central finite differences
    of that sum through inference forwards (in float64); the tolerance is relative to the gradient's scale."""
    w = ex.graph.node(layer).params[tensor]
    original = w.copy()

    def loss(value):
        w[...] = value
        return float((ex.forward(x)[output].astype(np.float64) * seed).sum())

    numeric = numeric_grad(loss, original.astype(np.float64), h=h)
    w[...] = original
    np.testing.assert_allclose(grad, numeric, rtol=rtol, atol=rtol * np.abs(numeric).max(),
                               err_msg=f"{layer}.{tensor}")


def onnx_model(nodes, inits=(), shape=(4, 6, 6), opset=17):
    """A one-input ONNX model (dynamic batch, input 'x' of per-sample `shape`) around hand-built nodes."""
    from onnx import TensorProto, helper, numpy_helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", *shape])
    out = helper.make_tensor_value_info(nodes[-1].output[0], TensorProto.FLOAT, None)
    graph = helper.make_graph(nodes, "g", [x], [out],
                              initializer=[numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in inits])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def randomize_weights(graph, seed: int = 0, gain: float = 1.0, bias_mean: float = 0.5, bias_std: float = 0.3) -> None:
    """Random weights in place (not the fillers' constants: BN statistics, PReLU slopes, affine scales all vary):
    weights normal × gain / sqrt(fan-in), so activations keep their scale (no saturated softmax); vectors
    bias_mean + bias_std × normal; BN variances uniform in [0.5, 2]."""
    rng = np.random.default_rng(seed)
    for node in graph.nodes():
        for key, value in node.params.items():
            if key == "var":
                node.params[key] = rng.uniform(0.5, 2.0, value.shape).astype(np.float32)
            elif value.ndim > 1:
                fan_in = int(np.prod(value.shape[1:]))
                node.params[key] = (rng.standard_normal(value.shape) * gain / np.sqrt(fan_in)).astype(np.float32)
            else:
                node.params[key] = (bias_mean + bias_std * rng.standard_normal(value.shape)).astype(np.float32)


TORCH_FIXTURES = ROOT / "tests" / "fixtures" / "torch_onnx"


def torch_fixture(name: str, onnx_name: str | None = None):
    """A committed PyTorch export (tests/fixtures/torch_onnx/, written by tests/fixtures/make_torch_fixtures.py)
    and its arrays: `x`, a fixed input, and `want`, torch's output for it (`onnx_name` picks one of a net's exports)."""
    import onnx

    with np.load(TORCH_FIXTURES / f"{name}.npz", allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    return onnx.load(TORCH_FIXTURES / f"{onnx_name or name}.onnx"), arrays


def torch_nets():
    """tests/fixtures/make_torch_fixtures.py as a module, to export its nets live; skips the test without torch."""
    import importlib.util
    import sys

    pytest.importorskip("torch")
    if "make_torch_fixtures" not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            "make_torch_fixtures", ROOT / "tests" / "fixtures" / "make_torch_fixtures.py"
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules["make_torch_fixtures"] = module
        spec.loader.exec_module(module)
    return sys.modules["make_torch_fixtures"]
