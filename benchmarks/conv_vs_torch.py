"""dlc's native convolution (forward + backward) side by side with PyTorch's CPU conv2d, in one run.

Workloads are the conv layers of the two models the training benchmark runs, at batch 64:
LeNet-5 (1×28×28 input; conv1 5×5 pad 2, conv2 5×5) and ResNet-20 (3×32×32 input; 3×3 convs at
16/32/64 channels on 32/16/8 px, the stride-2 convs and 1×1 stride-2 projections between stages).
Each layer is timed as one training step sees it: forward, then backward for dw (and db where the layer
has a bias) and dx unless it is the network's first layer. The per-network totals weight each shape by
how often it occurs in the network.

Peer: `torch.nn.functional.conv2d` + autograd with `torch.set_num_threads(threads)`; dlc runs with
OMP_NUM_THREADS=threads. When torch cannot be imported the peer is onnxruntime's Conv (forward only: it
has no backward), and the table says so.

Each side runs in its own worker process (this script with --worker), so that one side's idle threads,
still spinning after its last call, never run on the other side's clock; the two alternate for
--rounds rounds and each layer keeps its best time. A time is the best of --repeats calls.

Ratio = dlc_time / peer_time, so < 1 means dlc is faster. Absolute times drift on shared machines; the
ratios from one run are what to read.

    python benchmarks/conv_vs_torch.py [--threads 2] [--repeats 20] [--rounds 2] [--batch 64]
                                       [--dlc-path team|numpy] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Layer:
    net: str
    name: str
    c: int
    hw: int
    o: int
    k: int
    stride: int
    pad: int
    count: int  # how many layers of this shape the network has
    bias: bool
    first: bool = False  # the network's first layer: no dx

    def out_hw(self) -> int:
        return (self.hw + 2 * self.pad - self.k) // self.stride + 1


LAYERS = [
    Layer("lenet5", "conv1 1->6 5x5 p2 @28", 1, 28, 6, 5, 1, 2, 1, True, first=True),
    Layer("lenet5", "conv2 6->16 5x5 @14", 6, 14, 16, 5, 1, 0, 1, True),
    Layer("resnet20", "conv1 3->16 3x3 @32", 3, 32, 16, 3, 1, 1, 1, False, first=True),
    Layer("resnet20", "16->16 3x3 @32", 16, 32, 16, 3, 1, 1, 6, False),
    Layer("resnet20", "16->32 3x3 s2 @32", 16, 32, 32, 3, 2, 1, 1, False),
    Layer("resnet20", "proj 16->32 1x1 s2 @32", 16, 32, 32, 1, 2, 0, 1, False),
    Layer("resnet20", "32->32 3x3 @16", 32, 16, 32, 3, 1, 1, 5, False),
    Layer("resnet20", "32->64 3x3 s2 @16", 32, 16, 64, 3, 2, 1, 1, False),
    Layer("resnet20", "proj 32->64 1x1 s2 @16", 32, 16, 64, 1, 2, 0, 1, False),
    Layer("resnet20", "64->64 3x3 @8", 64, 8, 64, 3, 1, 1, 5, False),
]


def best_ms(fn: Callable[[], object], repeats: int) -> float:
    """The fastest of `repeats` calls after a warm-up: on a shared machine other load only ever adds time."""
    for _ in range(3):  # warm-up: allocator, thread pools, oneDNN primitive caches
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


def layer_arrays(layer: Layer, batch: int):
    import numpy as np

    rng = np.random.default_rng(0)
    oh = layer.out_hw()
    x = rng.standard_normal((batch, layer.c, layer.hw, layer.hw)).astype(np.float32)
    w = (rng.standard_normal((layer.o, layer.c, layer.k, layer.k)) * 0.1).astype(np.float32)
    b = rng.standard_normal(layer.o).astype(np.float32) if layer.bias else None
    dy = rng.standard_normal((batch, layer.o, oh, oh)).astype(np.float32)
    return x, w, b, dy


def make_dlc(layer: Layer, x, w, b, dy):
    from dlc._C.conv import conv2d_backward, conv2d_forward

    stride, pads, dil, oh = (layer.stride,) * 2, (layer.pad,) * 4, (1, 1), layer.out_hw()

    def fwd():
        return conv2d_forward(x, w, b, stride, pads, dil, 1, (oh, oh))

    def step():
        conv2d_forward(x, w, b, stride, pads, dil, 1, (oh, oh))
        return conv2d_backward(x, w, dy, stride, pads, dil, 1, not layer.first, layer.bias)

    return fwd, step


def make_torch(layer: Layer, x, w, b, dy):
    import torch
    import torch.nn.functional as F

    xt = torch.from_numpy(x).requires_grad_(not layer.first)
    wt = torch.from_numpy(w).requires_grad_(True)
    bt = torch.from_numpy(b).requires_grad_(True) if b is not None else None
    dyt = torch.from_numpy(dy)

    def fwd():
        with torch.no_grad():
            return F.conv2d(xt, wt, bt, layer.stride, layer.pad).numpy()

    def step():
        wt.grad = None
        xt.grad = None
        if bt is not None:
            bt.grad = None
        F.conv2d(xt, wt, bt, layer.stride, layer.pad).backward(dyt)

    return fwd, step


def make_ort(layer: Layer, x, w, b, dy):
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(w, "w")] + ([numpy_helper.from_array(b, "b")] if b is not None else [])
    node = helper.make_node(
        "Conv",
        ["x", "w"] + (["b"] if b is not None else []),
        ["y"],
        kernel_shape=[layer.k, layer.k],
        strides=[layer.stride] * 2,
        pads=[layer.pad] * 4,
    )
    graph = helper.make_graph(
        [node],
        "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(dy.shape))],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(os.environ.get("OMP_NUM_THREADS", "0"))
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])

    def fwd():
        return session.run(None, {"x": x})[0]

    return fwd, None


SIDES = {"dlc": make_dlc, "torch": make_torch, "ort": make_ort}


def worker(side: str, args) -> None:
    """Time every layer on one side; print one JSON object (and the first forward output's checksum)."""
    import numpy as np

    if side == "torch":
        import torch

        torch.set_num_threads(args.threads)
    if side == "dlc":
        from dlc._C import conv

        conv.set_options(team_blas=args.dlc_path == "team")
    rows = []
    for layer in LAYERS:
        x, w, b, dy = layer_arrays(layer, args.batch)
        fwd, step = SIDES[side](layer, x, w, b, dy)
        y = np.asarray(fwd(), dtype=np.float64)
        rows.append(
            {
                "fwd": best_ms(fwd, args.repeats),
                "step": best_ms(step, args.repeats) if step is not None else None,
                "checksum": [float(y.sum()), float(np.abs(y).sum())],
            }
        )
    print(json.dumps(rows))


def run_worker(side: str, args) -> list[dict]:
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), OPENBLAS_NUM_THREADS=str(args.threads))
    cmd = [sys.executable, __file__, "--worker", side, "--threads", str(args.threads)]
    cmd += ["--repeats", str(args.repeats), "--batch", str(args.batch), "--dlc-path", args.dlc_path]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def peer_side() -> tuple[str, str]:
    try:
        import torch
    except ImportError:
        return "ort", "onnxruntime Conv (forward only: torch is not installed)"
    return "torch", f"torch {torch.__version__}"


def measure(args) -> dict:
    side, peer = peer_side()
    best: dict[str, list[dict]] = {}
    for _ in range(args.rounds):
        for name in ("dlc", side):
            rows = run_worker(name, args)
            if name not in best:
                best[name] = rows
                continue
            for kept, new in zip(best[name], rows):
                for key in ("fwd", "step"):
                    if new[key] is not None:
                        kept[key] = min(kept[key], new[key])
    rows = []
    for layer, mine, theirs in zip(LAYERS, best["dlc"], best[side]):
        scale = max(abs(theirs["checksum"][1]), 1.0)
        agree = abs(mine["checksum"][0] - theirs["checksum"][0]) <= 1e-4 * scale
        rows.append(
            {
                **asdict(layer),
                "dlc_fwd": mine["fwd"],
                "peer_fwd": theirs["fwd"],
                "dlc_step": mine["step"],
                "peer_step": theirs["step"],
                "outputs_agree": agree,
            }
        )
    totals = {}
    for net in dict.fromkeys(r["net"] for r in rows):
        mine = [r for r in rows if r["net"] == net]
        totals[net] = {
            k: (sum(r[k] * r["count"] for r in mine) if all(r[k] is not None for r in mine) else None)
            for k in ("dlc_fwd", "peer_fwd", "dlc_step", "peer_step")
        }
    from dlc._C import conv

    return {
        "peer": peer,
        "threads": args.threads,
        "batch": args.batch,
        "repeats": args.repeats,
        "rounds": args.rounds,
        "dlc_path": args.dlc_path,
        "dlc_blas": conv.blas_info(),
        "python": sys.version.split()[0],
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "layers": rows,
        "totals": totals,
    }


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:6.2f}" if a is not None and b else "     -"


def ms(v: float | None) -> str:
    return f"{v:8.2f}" if v is not None else "       -"


def print_table(report: dict) -> None:
    if report["dlc_path"] == "numpy":
        how = "np.matmul on batch chunks, as asked"
    elif report["dlc_blas"]:
        how = "sgemm inside the OpenMP team"
    else:
        how = "np.matmul on batch chunks: numpy's sgemm was not found"
    print(f"dlc conv ({how}) vs {report['peer']}")
    print(f"{report['threads']} threads, batch {report['batch']}, ms: best of {report['repeats']} calls")
    print("ratio = dlc / peer: < 1 means dlc is faster\n")
    head = f"{'layer':<26}{'x':>3} {'dlc fwd':>8} {'peer fwd':>8} {'ratio':>6}   {'dlc f+b':>8} {'peer f+b':>8} {'ratio':>6}"
    for net, total in report["totals"].items():
        print(f"{net}\n{head}")
        for r in (r for r in report["layers"] if r["net"] == net):
            print(
                f"{r['name']:<26}{r['count']:>3} {ms(r['dlc_fwd'])} {ms(r['peer_fwd'])} "
                f"{ratio(r['dlc_fwd'], r['peer_fwd'])}   {ms(r['dlc_step'])} {ms(r['peer_step'])} "
                f"{ratio(r['dlc_step'], r['peer_step'])}"
            )
            if not r["outputs_agree"]:
                print("  !! the two forward outputs differ")
        print(
            f"{'total (weighted)':<26}{'':>3} {ms(total['dlc_fwd'])} {ms(total['peer_fwd'])} "
            f"{ratio(total['dlc_fwd'], total['peer_fwd'])}   {ms(total['dlc_step'])} {ms(total['peer_step'])} "
            f"{ratio(total['dlc_step'], total['peer_step'])}\n"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="threads for both sides (default 2)")
    parser.add_argument(
        "--repeats", type=int, default=20, help="timed calls per measurement (the best counts)"
    )
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of the two sides")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument(
        "--dlc-path",
        choices=["team", "numpy"],
        default="team",
        help="dlc's GEMM route: sgemm inside the OpenMP team (default, when found) or np.matmul on batch chunks",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--worker", choices=sorted(SIDES), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args)
        return
    report = measure(args)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_table(report)


if __name__ == "__main__":
    main()
