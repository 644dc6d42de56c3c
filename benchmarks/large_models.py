"""Large ONNX models with random weights, built in memory for `optimize_vs_peers.py --large`: a VGG-19-style
network with batch norm (about 143 M parameters, 575 MB) and a ResNet-50-style one (about 25.6 M, 102 MB).

Written the way a PyTorch export of torchvision's vgg19_bn / resnet50 is laid out (Conv with bias or not,
BatchNormalization, Relu, MaxPool, Add, GlobalAveragePool, Flatten, Gemm), so that what the optimizers can do
with them (fold the 16 / 53 batch norms into their convolutions, nothing else) is what they do with real files.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

VGG19 = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"]
RESNET50 = [(64, 3), (128, 4), (256, 6), (512, 3)]


class _Builder:
    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.count = 0

    def name(self, base: str) -> str:
        self.count += 1
        return f"{base}_{self.count}"

    def weight(self, base: str, shape: tuple[int, ...], scale: float) -> str:
        name = self.name(base)
        self.inits.append(numpy_helper.from_array(
            (self.rng.standard_normal(shape) * scale).astype(np.float32), name))
        return name

    def node(self, op: str, inputs: list[str], **attrs) -> str:
        out = self.name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def conv(self, x: str, cin: int, cout: int, k: int, stride: int = 1, bias: bool = False) -> str:
        w = self.weight("conv.weight", (cout, cin, k, k), (2.0 / (cin * k * k)) ** 0.5)
        inputs = [x, w] + ([self.weight("conv.bias", (cout,), 0.1)] if bias else [])
        pad = k // 2
        return self.node("Conv", inputs, kernel_shape=[k, k], strides=[stride, stride], pads=[pad] * 4)

    def bn(self, x: str, c: int) -> str:
        scale = self.name("bn.weight")
        bias, mean, var = self.name("bn.bias"), self.name("bn.running_mean"), self.name("bn.running_var")
        for n, v in ((scale, 1 + 0.1 * self.rng.standard_normal(c)), (bias, 0.1 * self.rng.standard_normal(c)),
                     (mean, 0.1 * self.rng.standard_normal(c)), (var, 0.5 + self.rng.random(c))):
            self.inits.append(numpy_helper.from_array(v.astype(np.float32), n))
        return self.node("BatchNormalization", [x, scale, bias, mean, var], epsilon=1e-5)

    def gemm(self, x: str, cin: int, cout: int) -> str:
        w = self.weight("fc.weight", (cout, cin), (1.0 / cin) ** 0.5)
        return self.node("Gemm", [x, w, self.weight("fc.bias", (cout,), 0.01)], transB=1)

    def model(self, name: str, top: str, size: int) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes, name, [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, size, size])],
            [helper.make_tensor_value_info(top, TensorProto.FLOAT, ["batch", 1000])], initializer=self.inits)
        graph.node[-1].output[0] = top
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8,
                                 producer_name="dlc-benchmarks")


def vgg19_bn(seed: int = 0, size: int = 224) -> onnx.ModelProto:
    b = _Builder(seed)
    x, c = "image", 3
    for v in VGG19:
        if v == "M":
            x = b.node("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2])
        else:
            x = b.node("Relu", [b.bn(b.conv(x, c, v, 3, bias=True), v)])
            c = v
    x = b.node("Flatten", [x], axis=1)
    for cin, cout in ((c * (size // 32) ** 2, 4096), (4096, 4096)):
        x = b.node("Relu", [b.gemm(x, cin, cout)])
    b.gemm(x, 4096, 1000)
    return b.model("vgg19_bn", "logits", size)


def resnet50(seed: int = 0, size: int = 224) -> onnx.ModelProto:
    b = _Builder(seed)
    x = b.node("Relu", [b.bn(b.conv("image", 3, 64, 7, stride=2), 64)])
    x = b.node("MaxPool", [x], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    c = 64
    for stage, (width, blocks) in enumerate(RESNET50):
        for block in range(blocks):
            stride = 2 if stage > 0 and block == 0 else 1
            out = width * 4
            y = b.node("Relu", [b.bn(b.conv(x, c, width, 1), width)])
            y = b.node("Relu", [b.bn(b.conv(y, width, width, 3, stride), width)])
            y = b.bn(b.conv(y, width, out, 1), out)
            shortcut = b.bn(b.conv(x, c, out, 1, stride), out) if block == 0 else x
            x = b.node("Relu", [b.node("Add", [y, shortcut])])
            c = out
    x = b.node("Flatten", [b.node("GlobalAveragePool", [x])], axis=1)
    b.gemm(x, c, 1000)
    return b.model("resnet50", "logits", size)


LARGE_MODELS = {"vgg19_bn": vgg19_bn, "resnet50": resnet50}
