"""Import the classification backbones people start from (torchvision, exported by torch.onnx), compile them back,
and prune them: for each family, ONNX nodes and dlc layers, import and compile seconds, the largest error against
onnxruntime and against torch, and structured 50 % pruning with params, MACs and the onnxruntime speed-up at
batch 1 (ratio of minima, interleaved runs).

torch stays out of dlc's environment: the export runs under another Python that has torch and torchvision
(random weights, nothing downloaded), the rest in dlc's:

    python3 -m venv /tmp/tv && /tmp/tv/bin/pip install torch torchvision onnx onnxscript
    python benchmarks/import_backbones.py --torch-python /tmp/tv/bin/python [--json] [--families resnet18,...]
                                          [--round-to 8] [--exporter torchscript|dynamo]

Without --torch-python (and without torch importable here) it says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
FAMILIES = {  # name: (torchvision constructor, keyword arguments)
    "resnet18": ("resnet18", {}),
    "resnext50_32x4d": ("resnext50_32x4d", {}),
    "mobilenet_v2": ("mobilenet_v2", {}),
    "mobilenet_v3_small": ("mobilenet_v3_small", {}),
    "efficientnet_b0": ("efficientnet_b0", {}),
    "shufflenet_v2_x1_0": ("shufflenet_v2_x1_0", {}),
    "squeezenet1_0": ("squeezenet1_0", {}),
    "googlenet": ("googlenet", {"aux_logits": False, "init_weights": True}),
    "densenet121": ("densenet121", {}),
    "regnet_x_400mf": ("regnet_x_400mf", {}),
    "mnasnet0_5": ("mnasnet0_5", {}),
    "convnext_tiny": ("convnext_tiny", {}),
}
SIZE = 224


def export_all(out: Path, names: list[str], exporter: str = "torchscript") -> None:
    """(Under a Python with torch.) Each family with random weights and batch-norm statistics, exported with
    batch norm kept (TorchScript exporter at opset 17, or torch.export's dynamo exporter at its default opset),
    and an .npz of a fixed input and torch's output."""
    import torch
    import torchvision

    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    for name in names:
        ctor, kwargs = FAMILIES[name]
        model = getattr(torchvision.models, ctor)(weights=None, **kwargs).eval()
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    c = m.num_features
                    m.running_mean.copy_(torch.randn(c) * 0.1)
                    m.running_var.copy_(torch.rand(c) * 0.5 + 0.75)
            x = torch.randn(1, 3, SIZE, SIZE)
            want = model(x).numpy()
        if exporter == "dynamo":  # torch.onnx.export's default since torch 2.9
            torch.onnx.export(model, (x,), str(out / f"{name}.onnx"), dynamo=True, input_names=["x"],
                              output_names=["y"], external_data=False)
        else:
            torch.onnx.export(model, (x,), str(out / f"{name}.onnx"), opset_version=17, dynamo=False,
                              training=torch.onnx.TrainingMode.PRESERVE, input_names=["x"], output_names=["y"])
        np.savez(out / f"{name}.npz", x=x.numpy(), want=want)
        print(f"exported {name}", file=sys.stderr, flush=True)


def _min_ms(session, feeds, runs: int) -> float:
    best = float("inf")
    for _ in range(runs):
        t = time.perf_counter()
        session.run(None, feeds)
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def measure(path: Path, runs: int, round_to: int = 1) -> dict:
    import onnxruntime as ort

    from dlc.compiler.analysis import summarize
    from dlc.compiler.errors import DlcError
    from dlc.compiler.export_onnx import to_onnx
    from dlc.compiler.onnx_import import import_onnx
    from dlc.compiler.onnx_io import load_onnx
    from dlc.compiler.passes import optimize
    from dlc.compiler.prune.structured import prune

    data = np.load(path.with_suffix(".npz"), allow_pickle=False)
    x, torch_out = data["x"], data["want"]
    row: dict = {"family": path.stem}
    original = load_onnx(path)
    row["onnx_nodes"] = len(original.graph.node)
    t = time.perf_counter()
    try:
        graph = import_onnx(original, source=path.name)
    except DlcError as exc:
        row["error"] = str(exc)[:400]
        return row
    row["import_s"] = time.perf_counter() - t
    row["layers"] = len(graph)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2

    def session(model):
        return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])

    ref = session(original).run(None, {original.graph.input[0].name: x})[0]
    t = time.perf_counter()
    compiled, _ = optimize(to_onnx(graph))
    row["compile_s"] = time.perf_counter() - t
    row["compiled_nodes"] = len(compiled.graph.node)
    got = session(compiled).run(None, {compiled.graph.input[0].name: x})[0].reshape(ref.shape)
    scale = float(np.abs(ref).max())
    row["max_rel_err_vs_onnxruntime"] = float(np.abs(got - ref).max() / scale)
    row["max_rel_err_vs_torch"] = float(np.abs(got - torch_out.reshape(ref.shape)).max() / scale)
    before = summarize(graph)
    try:
        report = prune(graph, 0.5, "l1", round_to=round_to)
    except DlcError as exc:
        row["prune_error"] = str(exc)[:300]
        return row
    after = summarize(graph)
    pruned, _ = optimize(to_onnx(graph))
    row.update(params=before.total_params, macs=before.total_macs, pruned_params=after.total_params,
               pruned_macs=after.total_macs, pruned_groups=sum(r["after"] < r["before"] for r in report),
               groups=len(report))
    a, b = session(compiled), session(pruned)
    feeds_a, feeds_b = {compiled.graph.input[0].name: x}, {pruned.graph.input[0].name: x}
    _min_ms(a, feeds_a, 2), _min_ms(b, feeds_b, 2)  # warm-up
    base_ms = pruned_ms = float("inf")
    for _ in range(3):  # interleaved blocks: a loaded machine slows both alike
        base_ms = min(base_ms, _min_ms(a, feeds_a, runs))
        pruned_ms = min(pruned_ms, _min_ms(b, feeds_b, runs))
    row.update(baseline_ms=base_ms, pruned_ms=pruned_ms, speedup=base_ms / pruned_ms)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--torch-python", help="a Python with torch and torchvision, for the export")
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--out", default=str(ROOT / "build" / "backbones"))
    parser.add_argument("--runs", type=int, default=5, help="timed runs per block (3 interleaved blocks)")
    parser.add_argument("--exporter", choices=("torchscript", "dynamo"), default="torchscript",
                        help="torch.onnx's TorchScript exporter (opset 17) or its dynamo exporter")
    parser.add_argument("--round-to", type=int, default=1, help="pruned widths a multiple of this (1)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--export-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    names = [n for n in args.families.split(",") if n]
    unknown = [n for n in names if n not in FAMILIES]
    if unknown:
        parser.error(f"unknown families {unknown}; known: {', '.join(FAMILIES)}")
    out = Path(args.out) / args.exporter
    if args.export_only:
        export_all(out, names, args.exporter)
        return 0
    missing = [n for n in names if not (out / f"{n}.onnx").exists()]
    if missing:
        if args.torch_python:
            subprocess.run([args.torch_python, __file__, "--export-only", "--out", str(out.parent), "--exporter",
                            args.exporter, "--families", ",".join(missing)], check=True)
        else:
            try:
                import torchvision  # noqa: F401
            except ImportError:
                print("skipped: no exports in " + str(out) + " and no torch here; give --torch-python PATH (a "
                      "Python with torch and torchvision)")
                return 0
            export_all(out, missing, args.exporter)
    rows = []
    for n in names:
        rows.append(measure(out / f"{n}.onnx", args.runs, args.round_to))
        if not args.json:
            print(f"measured {n}", file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'family':20} {'nodes':>5} {'layers':>6} {'import s':>8} {'compile s':>9} {'err ort':>8} {'err torch':>9} "
          f"{'params':>10} {'pruned':>10} {'MACs x':>6} {'speed-up':>8}")
    for r in rows:
        if "error" in r:
            print(f"{r['family']:20} {r['onnx_nodes']:>5}  import failed: {r['error'][:120]}")
            continue
        head = (f"{r['family']:20} {r['onnx_nodes']:>5} {r['layers']:>6} {r['import_s']:>8.2f} {r['compile_s']:>9.2f} "
                f"{r['max_rel_err_vs_onnxruntime']:>8.1e} {r['max_rel_err_vs_torch']:>9.1e}")
        if "prune_error" in r:
            print(f"{head}  prune failed: {r['prune_error'][:100]}")
            continue
        print(f"{head} {r['params']:>10,} {r['pruned_params']:>10,} {r['macs'] / r['pruned_macs']:>6.2f} "
              f"{r['speedup']:>7.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
