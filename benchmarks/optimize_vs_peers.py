"""dlc's graph passes against onnx-simplifier and onnxoptimizer, side by side, on the same models.

For each model — dlc's own exports of the examples and their PyTorch-exported twins (same weights) — prints
node counts and onnxruntime CPU latency (ORT_DISABLE_ALL, ORT_ENABLE_BASIC, ORT_ENABLE_ALL) of the original,
dlc's output and each peer's output, with latency ratios peer / dlc (> 1: dlc's output is faster). Also times
`optimize` on a ~1,700-node graph.

    python benchmarks/optimize_vs_peers.py [--batch 8] [--runs 30] [--json]

Peers are optional: pip install onnxsim onnxoptimizer; PyTorch twins need torch (pip install torch==2.13.0).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).parent))
LEVELS = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
          "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}


def latency_ms(model: onnx.ModelProto, x: np.ndarray, level: str, runs: int) -> float:
    options = ort.SessionOptions()
    options.graph_optimization_level = LEVELS[level]
    options.intra_op_num_threads = 2
    s = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    feed = {s.get_inputs()[0].name: x}
    for _ in range(5):
        s.run(None, feed)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        s.run(None, feed)
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1e3)


def torch_export(graph, torch) -> onnx.ModelProto:
    from torch_twins import torch_model

    net = torch_model(graph, torch).eval()
    buf = io.BytesIO()
    x = torch.zeros(1, *graph.inputs[0].shape)
    kwargs = {"dynamo": False} if "dynamo" in torch.onnx.export.__code__.co_varnames else {}
    torch.onnx.export(net, (x,), buf, opset_version=17, input_names=["image"], output_names=["out"],
                      dynamic_axes={"image": {0: "batch"}, "out": {0: "batch"}}, **kwargs)
    return onnx.load_from_string(buf.getvalue())


def peers() -> dict:
    out = {}
    try:
        import onnxsim

        out["onnxsim"] = lambda m: onnxsim.simplify(m)[0]
    except ImportError:
        pass
    try:
        import onnxoptimizer

        out["onnxoptimizer"] = lambda m: onnxoptimizer.optimize(
            m, onnxoptimizer.get_fuse_and_elimination_passes())
    except ImportError:
        pass
    return out


def big_graph_seconds() -> tuple[int, float]:
    """Time dlc's default passes on a deep ResNet-style graph of about 1,700 nodes."""
    from dlc.compiler.export_onnx import to_onnx
    from dlc.compiler.frontend import load_model_text
    from dlc.compiler.passes import optimize

    text = (ROOT / "examples/resnet20.yaml").read_text().split("data:")[0]
    text = text.replace("{name: stage1, block: basic, out: 16, repeat: 3}", "{name: stage1, block: basic, out: 16, repeat: 240}")
    model = to_onnx(load_model_text(text, "deep.yaml").graph)
    t0 = time.perf_counter()
    optimize(model)
    return len(model.graph.node), time.perf_counter() - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--models", default="resnet20,mobilenet_small,vgg_small,inception_small")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from dlc.compiler.export_onnx import to_onnx
    from dlc.compiler.frontend import load_model
    from dlc.compiler.passes import optimize, verify

    try:
        import torch
    except ImportError:
        torch = None
    others = peers()
    rows = []
    for name in args.models.split(","):
        graph = load_model(ROOT / "examples" / f"{name}.yaml").graph
        sources = {"dlc-export": to_onnx(graph)}
        if torch is not None:
            sources["torch-export"] = torch_export(graph, torch)
        x = np.random.default_rng(0).standard_normal((args.batch, *graph.inputs[0].shape)).astype(np.float32)
        for source, model in sources.items():
            variants = {"original": model, "dlc": optimize(model)[0]}
            verify(model, variants["dlc"])
            for peer, fn in others.items():
                try:
                    variants[peer] = fn(model)
                except Exception as exc:  # a peer failing is a result, not a crash
                    print(f"{peer} failed on {name}/{source}: {exc}", file=sys.stderr)
            for variant, m in variants.items():
                row = {"model": name, "source": source, "variant": variant, "nodes": len(m.graph.node)}
                for level in LEVELS:
                    row[f"ms_{level}"] = latency_ms(m, x, level, args.runs)
                rows.append(row)
    nodes, seconds = big_graph_seconds()
    by = {(r["model"], r["source"], r["variant"]): r for r in rows}
    for r in rows:
        dlc = by[(r["model"], r["source"], "dlc")]
        for level in LEVELS:
            r[f"ratio_{level}"] = r[f"ms_{level}"] / dlc[f"ms_{level}"]
    report = {"batch": args.batch, "rows": rows, "big_graph": {"nodes": nodes, "optimize_seconds": seconds},
              "peers": list(others), "torch": torch.__version__ if torch else None}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{'model':16} {'source':12} {'variant':13} {'nodes':>5} {'ms off':>8} {'ms basic':>8} {'ms all':>8}"
          f" {'x dlc off':>9} {'x dlc basic':>11} {'x dlc all':>9}")
    for r in rows:
        print(f"{r['model']:16} {r['source']:12} {r['variant']:13} {r['nodes']:>5} {r['ms_disable']:>8.3f} "
              f"{r['ms_basic']:>8.3f} {r['ms_all']:>8.3f} {r['ratio_disable']:>9.2f} {r['ratio_basic']:>11.2f} "
              f"{r['ratio_all']:>9.2f}")
    print(f"\nratios: variant time / dlc time (> 1: dlc's output is faster); batch {args.batch}, 2 threads")
    print(f"optimize() on a {nodes}-node graph: {seconds:.2f} s")
    if not others:
        print("peers not installed: pip install onnxsim onnxoptimizer", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
