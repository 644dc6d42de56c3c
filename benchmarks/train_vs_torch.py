"""Training-step time of dlc's CPU backend against PyTorch on the same models, side by side.

Both run the same network (built from the example YAML; PyTorch's copy gets dlc's initial weights), the same
batch, SGD with momentum, both limited to the same number of threads. Prints ms per training step (forward,
loss, backward, update), the ratio dlc/torch (< 1: dlc faster) and dlc's achieved GFLOP/s (6 FLOPs per MAC
per image: forward, input gradient, weight gradient), next to a plain float32 SGEMM on the same machine.

    python benchmarks/train_vs_torch.py [--threads 2] [--steps 20] [--batch 64] [--models lenet5,resnet20,unet_small]
                                        [--json]

unet_small (a segmentation model) trains with per-pixel cross-entropy on both sides. PyTorch's twin
(torch_twins.py) writes symmetric padding inside Conv2d, as a PyTorch user would.

PyTorch is optional: `pip install torch==2.13.0` (the CPU build on these machines' disk).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def set_threads(n: int) -> None:
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(n)


def time_steps(step, steps: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2] * 1e3


def sgemm_gflops(n: int = 1024) -> float:
    import numpy as np

    a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    b = a.copy()
    out = np.empty_like(a)
    ms = time_steps(lambda: np.matmul(a, b, out=out), 10)
    return 2 * n ** 3 / (ms * 1e-3) / 1e9


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--models", default="lenet5,resnet20,unet_small")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    set_threads(args.threads)

    import numpy as np

    from dlc._C import loss as dlc_loss
    from dlc.compiler.analysis import summarize
    from dlc.compiler.frontend import load_model
    from dlc.compiler.segment.loss import SegmentationLoss
    from dlc.compiler.train.executor import Executor
    from dlc.compiler.train.solver import Solver, SolverConfig

    from torch_twins import torch_model

    try:
        import torch

        torch.set_num_threads(args.threads)
    except ImportError:
        torch = None

    results = []
    for name in args.models.split(","):
        loaded = load_model(ROOT / "examples" / f"{name}.yaml")
        graph = loaded.graph
        macs = summarize(graph).total_macs
        rng = np.random.default_rng(0)
        x = rng.standard_normal((args.batch, *graph.inputs[0].shape)).astype(np.float32)
        out_shape = graph.shapes[graph.outputs[0]]
        per_pixel = len(out_shape) == 3  # a segmentation model: a class per pixel, per-pixel cross-entropy
        y = rng.integers(0, out_shape[0], (args.batch, *out_shape[1:]) if per_pixel else args.batch)
        seg_loss = SegmentationLoss("cross_entropy") if per_pixel else None
        net_torch = torch_model(graph, torch) if torch else None

        ex = Executor(graph)
        params = {f"{n.name}.{t}": n.params[t] for n in graph.nodes() for t in ("weight", "bias", "scale")
                  if t in n.params}
        solver = Solver(params, SolverConfig("sgd", momentum=0.9))
        out = graph.outputs[0]

        def dlc_step():
            logits = ex.forward(x, train=True)[out]
            _, d = seg_loss(logits, y) if per_pixel else dlc_loss.softmax_cross_entropy(logits, y)
            grads = ex.backward({out: d})
            solver.step({f"{n}.{t}": g for n, gs in grads.items() for t, g in gs.items()}, 0.01)

        dlc_ms = time_steps(dlc_step, args.steps)
        row = {"model": name, "batch": args.batch, "threads": args.threads, "dlc_ms": dlc_ms,
               "dlc_gflops": 6 * macs * args.batch / (dlc_ms * 1e-3) / 1e9}
        if net_torch is not None:
            opt = torch.optim.SGD(net_torch.parameters(), lr=0.01, momentum=0.9)
            xt, yt = torch.from_numpy(x), torch.from_numpy(y)
            net_torch.train()

            def torch_step():
                opt.zero_grad()
                torch.nn.functional.cross_entropy(net_torch(xt), yt).backward()
                opt.step()

            row["torch_ms"] = time_steps(torch_step, args.steps)
            row["ratio_dlc_over_torch"] = dlc_ms / row["torch_ms"]
        results.append(row)

    report = {"sgemm_gflops_1024": sgemm_gflops(), "results": results,
              "torch": torch.__version__ if torch else None, "cpus": os.cpu_count()}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{'model':10} {'batch':>5} {'dlc ms/step':>12} {'torch ms/step':>14} {'dlc/torch':>10} {'dlc GFLOP/s':>12}")
    for r in results:
        torch_ms = f"{r['torch_ms']:.2f}" if "torch_ms" in r else "n/a"
        ratio = f"{r['ratio_dlc_over_torch']:.2f}" if "torch_ms" in r else "n/a"
        print(f"{r['model']:10} {r['batch']:>5} {r['dlc_ms']:>12.2f} {torch_ms:>14} {ratio:>10} {r['dlc_gflops']:>12.1f}")
    print(f"\nthreads: {args.threads}; plain float32 SGEMM 1024³ on this machine: {report['sgemm_gflops_1024']:.1f} GFLOP/s")
    if torch is None:
        print("torch not installed: pip install torch==2.13.0 to compare", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
