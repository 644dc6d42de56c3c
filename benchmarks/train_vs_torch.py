"""Training-step time and memory of dlc's CPU backend against PyTorch on the same models, side by side.

Both run the same network (built from the example YAML; PyTorch's copy gets dlc's initial weights), the same
batch, SGD with momentum, both limited to the same number of threads. Each side runs in its own process, so
neither inherits the other's OpenMP settings: dlc keeps its own default (OMP_WAIT_POLICY=passive, set by
dlc._C), PyTorch its default (its worker loads torch, and so the OpenMP runtime, before anything of dlc). Prints ms per
training step (forward, loss, backward, update), the ratio dlc/torch (< 1: dlc faster), peak memory of the
steps above the idle process (VmHWM after resetting it, minus the RSS before the model and batch exist) and
dlc's GFLOP/s, counting 2 FLOPs per MAC forward, 2 for each weight gradient and 2 for each input gradient that
is computed (none for layers that read the image), next to a plain float32 SGEMM on the same machine.

    python benchmarks/train_vs_torch.py [--threads 2] [--steps 20] [--batch 64] [--models lenet5,resnet20,unet_small]
                                        [--json]

unet_small (a segmentation model) trains with per-pixel cross-entropy on both sides. PyTorch's twin
(torch_twins.py) writes symmetric padding inside Conv2d, as a PyTorch user would.

PyTorch is optional: `pip install torch==2.13.0` (the CPU build), or PYTHONPATH=<its site-packages>.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent


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


# --- memory ------------------------------------------------------------------------------------------------


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak() -> int:
    """Reset the peak-RSS mark to the current RSS (Linux: clear_refs 5); returns the current RSS in kB."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kb("VmRSS")


def peak_kb() -> int:
    return _status_kb("VmHWM")


def openmp_runtimes() -> list[str]:
    """The OpenMP runtime libraries loaded in this process (dlc's libgomp, torch's own copy, ...)."""
    names = set()
    for line in Path("/proc/self/maps").read_text().splitlines():
        path = line.split()[-1] if line.split() else ""
        base = os.path.basename(path)
        if base.startswith(("libgomp", "libiomp", "libomp")):
            names.add(base)
    return sorted(names)


# --- the two sides, each in its own process ----------------------------------------------------------------


def _problem(name: str, batch: int):
    import numpy as np

    from dlc.compiler.frontend import load_model

    graph = load_model(ROOT / "examples" / f"{name}.yaml").graph
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, *graph.inputs[0].shape)).astype(np.float32)
    out_shape = graph.shapes[graph.outputs[0]]
    per_pixel = len(out_shape) == 3  # a segmentation model: a class per pixel, per-pixel cross-entropy
    y = rng.integers(0, out_shape[0], (batch, *out_shape[1:]) if per_pixel else batch)
    return graph, x, y, per_pixel


def training_flops(graph) -> int:
    """FLOPs of one training step per image: 2 per MAC forward, 2 per MAC for a weight gradient (layers with
    weights), 2 per MAC for an input gradient unless the layer reads the graph's input (nothing needs it)."""
    from dlc.compiler.analysis import summarize

    inputs = set(graph.input_names)
    total = 0
    for layer in summarize(graph).layers:
        node = graph.node(layer.name)
        weights = "weight" in node.params
        reads_image = all(v in inputs for v in node.inputs)
        total += 2 * layer.macs * (1 + int(weights) + int(not reads_image))
    return total


def worker_dlc(name: str, batch: int, steps: int) -> dict:
    import numpy as np  # noqa: F401 - loaded before the idle mark, as torch is on the other side

    from dlc._C import loss as dlc_loss
    from dlc.compiler.segment.loss import SegmentationLoss
    from dlc.compiler.train.executor import Executor
    from dlc.compiler.train.solver import Solver, SolverConfig

    idle = reset_peak()
    graph, x, y, per_pixel = _problem(name, batch)
    seg_loss = SegmentationLoss("cross_entropy") if per_pixel else None
    ex = Executor(graph)
    params = {f"{n.name}.{t}": n.params[t] for n in graph.nodes() for t in ("weight", "bias", "scale")
              if t in n.params}
    solver = Solver(params, SolverConfig("sgd", momentum=0.9))
    out = graph.outputs[0]

    def step():
        logits = ex.forward(x, train=True)[out]
        _, d = seg_loss(logits, y) if per_pixel else dlc_loss.softmax_cross_entropy(logits, y)
        grads = ex.backward({out: d})
        solver.step({f"{n}.{t}": g for n, gs in grads.items() for t, g in gs.items()}, 0.01)

    ms = time_steps(step, steps)
    import dlc._C as native

    return {"ms": ms, "peak_mb": (peak_kb() - idle) / 1024, "gflops": training_flops(graph) * batch / (ms * 1e-3) / 1e9,
            "openmp": openmp_runtimes(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "isa": native.ISA,
            "isa_runnable": native.runnable_builds()}


def worker_torch(name: str, batch: int, steps: int, threads: int) -> dict:
    # torch first: the OpenMP runtime reads its settings when it loads, and dlc._C (imported to build the twin)
    # would ask for passive waiting; whatever the user set for both sides is kept
    inherited = os.environ.get("DLC_BENCH_USER_WAIT_POLICY")
    if inherited:
        os.environ["OMP_WAIT_POLICY"] = inherited
    import numpy as np  # noqa: F401
    import torch

    torch.set_num_threads(threads)
    torch_policy = os.environ.get("OMP_WAIT_POLICY")

    from torch_twins import torch_model

    graph, x, y, _ = _problem(name, batch)  # (dlc's graph: the twin copies its weights)
    idle = reset_peak()
    net = torch_model(graph, torch)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    net.train()

    def step():
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(xt), yt).backward()
        opt.step()

    ms = time_steps(step, steps)
    return {"ms": ms, "peak_mb": (peak_kb() - idle) / 1024, "openmp": openmp_runtimes(),
            "omp_wait_policy": torch_policy, "version": torch.__version__,
            "threads": torch.get_num_threads()}


def run_worker(side: str, name: str, args, isa: str | None = None) -> dict | None:
    env = dict(os.environ)
    if isa:
        env["DLC_ISA"] = isa
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(args.threads)
    if "OMP_WAIT_POLICY" in os.environ:
        env["DLC_BENCH_USER_WAIT_POLICY"] = os.environ["OMP_WAIT_POLICY"]
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", side, "--models", name, "--batch",
           str(args.batch), "--steps", str(args.steps), "--threads", str(args.threads)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        if side == "torch" and "No module named 'torch'" in proc.stderr:
            return None
        raise SystemExit(f"{side} worker failed on {name}:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--models", default="lenet5,resnet20,unet_small")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--no-isa", action="store_true", help="skip the dlc step time per kernel build (baseline, "
                        "avx2, avx512: each build this CPU runs, DLC_ISA=...)")
    parser.add_argument("--worker", choices=("dlc", "torch"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        sys.path.insert(0, str(HERE))
        result = (worker_dlc(args.models, args.batch, args.steps) if args.worker == "dlc" else
                  worker_torch(args.models, args.batch, args.steps, args.threads))
        print(json.dumps(result))
        return 0

    results, torch_env, dlc_env = [], None, None
    for name in args.models.split(","):
        d = run_worker("dlc", name, args)
        t = run_worker("torch", name, args)
        dlc_env = {"omp_wait_policy": d["omp_wait_policy"], "openmp": d["openmp"], "isa": d["isa"]}
        row = {"model": name, "batch": args.batch, "threads": args.threads, "dlc_ms": d["ms"],
               "dlc_peak_mb": d["peak_mb"], "dlc_gflops": d["gflops"], "dlc_isa": d["isa"]}
        if not args.no_isa:  # what dispatch buys: the same step on each build
            row["dlc_ms_by_isa"] = {isa: d["ms"] if isa == d["isa"] else run_worker("dlc", name, args, isa)["ms"]
                                    for isa in d["isa_runnable"]}
        if t is not None:
            torch_env = {k: t[k] for k in ("version", "threads", "omp_wait_policy", "openmp")}
            row.update(torch_ms=t["ms"], torch_peak_mb=t["peak_mb"], ratio_dlc_over_torch=d["ms"] / t["ms"],
                       memory_dlc_over_torch=d["peak_mb"] / t["peak_mb"] if t["peak_mb"] > 0 else None)
        results.append(row)
    set_threads(args.threads)
    report = {"sgemm_gflops_1024": sgemm_gflops(), "results": results, "cpus": os.cpu_count(),
              "environment": {"threads": args.threads, "dlc": dlc_env, "torch": torch_env,
                              "each side in its own process": True}}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{'model':10} {'batch':>5} {'dlc ms':>8} {'torch ms':>9} {'dlc/torch':>10} {'dlc MB':>7} {'torch MB':>9}"
          f" {'dlc GFLOP/s':>12}")
    for r in results:
        have = "torch_ms" in r
        print(f"{r['model']:10} {r['batch']:>5} {r['dlc_ms']:>8.2f} {r['torch_ms'] if have else float('nan'):>9.2f} "
              f"{r.get('ratio_dlc_over_torch', float('nan')):>10.2f} {r['dlc_peak_mb']:>7.1f} "
              f"{r.get('torch_peak_mb', float('nan')):>9.1f} {r['dlc_gflops']:>12.1f}")
    if any("dlc_ms_by_isa" in r for r in results):
        print("\ndlc step ms per kernel build (DLC_ISA):")
        for r in results:
            by = r.get("dlc_ms_by_isa", {})
            base = by.get("baseline")
            print(f"  {r['model']:10} " + "  ".join(
                f"{isa} {ms:.2f}" + (f" ({base / ms:.2f}x)" if base and isa != "baseline" else "")
                for isa, ms in by.items()))
    print(f"\nthreads: {args.threads}; dlc: kernels {dlc_env['isa']}, OMP_WAIT_POLICY={dlc_env['omp_wait_policy']}, "
          f"{', '.join(dlc_env['openmp'])}")
    if torch_env:
        print(f"torch {torch_env['version']}: {torch_env['threads']} threads, OMP_WAIT_POLICY="
              f"{torch_env['omp_wait_policy'] or '(unset: its default)'}, {', '.join(torch_env['openmp'])}")
    else:
        print("torch not installed: pip install torch==2.13.0 to compare", file=sys.stderr)
    print(f"plain float32 SGEMM 1024³ on this machine: {report['sgemm_gflops_1024']:.1f} GFLOP/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
