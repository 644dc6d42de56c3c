"""PyTorch twins of dlc models, for the benchmarks: the same network as a torch.nn.Module with dlc's weights."""

from __future__ import annotations


def torch_model(graph, torch):
    """The same network in PyTorch, with dlc's initial weights."""
    nn = torch.nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.mods = nn.ModuleDict()
            self.nodes = graph.nodes()
            for node in self.nodes:
                a, p = node.attrs, node.params
                key = node.name.replace("/", "__").replace(".", "_")
                if node.op == "conv":
                    cin = graph.shapes[node.inputs[0]][0]
                    top, left, bottom, right = a["pads"]
                    # symmetric pads inside the conv (as a PyTorch user writes it); only uneven ones need a pad
                    symmetric = top == bottom and left == right
                    m = nn.Conv2d(cin, a["out"], a["kernel"], a["stride"], (top, left) if symmetric else 0,
                                  a["dilation"], a["groups"], bias="bias" in p)
                    m.weight.data = torch.from_numpy(p["weight"].copy())
                    if "bias" in p:
                        m.bias.data = torch.from_numpy(p["bias"].copy())
                    if not symmetric:
                        m = nn.Sequential(nn.ZeroPad2d((left, right, top, bottom)), m)
                elif node.op == "conv_transpose":
                    cin = graph.shapes[node.inputs[0]][0]
                    top, left, bottom, right = a["pads"]
                    if top != bottom or left != right:
                        raise NotImplementedError("conv_transpose with uneven pads")
                    m = nn.ConvTranspose2d(cin, a["out"], a["kernel"], a["stride"], (top, left), a["output_padding"],
                                           a["groups"], "bias" in p, a["dilation"])
                    m.weight.data = torch.from_numpy(p["weight"].copy())
                    if "bias" in p:
                        m.bias.data = torch.from_numpy(p["bias"].copy())
                elif node.op == "batchnorm":
                    m = nn.BatchNorm2d(p["scale"].shape[0], eps=a["eps"], momentum=a["momentum"])
                    m.weight.data = torch.from_numpy(p["scale"].copy())
                    m.bias.data = torch.from_numpy(p["bias"].copy())
                elif node.op == "linear":
                    m = nn.Linear(p["weight"].shape[1], p["weight"].shape[0], bias="bias" in p)
                    m.weight.data = torch.from_numpy(p["weight"].copy())
                    if "bias" in p:
                        m.bias.data = torch.from_numpy(p["bias"].copy())
                elif node.op == "maxpool":
                    m = nn.MaxPool2d(a["kernel"], a["stride"], a["pads"][:2], ceil_mode=a["ceil_mode"])
                elif node.op == "avgpool":
                    m = nn.AvgPool2d(a["kernel"], a["stride"], a["pads"][:2], ceil_mode=a["ceil_mode"],
                                     count_include_pad=a["count_include_pad"])
                elif node.op == "global_avgpool":
                    m = nn.AdaptiveAvgPool2d(1)
                elif node.op == "relu":
                    m = nn.ReLU()
                elif node.op == "flatten":
                    m = nn.Flatten()
                elif node.op == "dropout":
                    m = nn.Dropout(a["ratio"])
                elif node.op in ("add", "concat"):
                    m = None
                else:
                    raise NotImplementedError(node.op)
                if m is not None:
                    self.mods[key] = m

        def forward(self, x):
            values = {graph.input_names[0]: x}
            for node in self.nodes:
                key = node.name.replace("/", "__").replace(".", "_")
                ins = [values[v] for v in node.inputs]
                if node.op == "add":
                    y = ins[0] + ins[1]
                elif node.op == "concat":
                    y = torch.cat(ins, 1)
                else:
                    y = self.mods[key](ins[0])
                values[node.outputs[0]] = y
            return values[graph.outputs[0]]

    return Net()
