"""dlc's graph passes against onnx-simplifier and onnxoptimizer, side by side, on the same models.

For each model — dlc's own exports of the examples and their PyTorch-exported twins (same weights) — prints
node counts and onnxruntime CPU latency (ORT_DISABLE_ALL, ORT_ENABLE_BASIC, ORT_ENABLE_ALL) of the original,
dlc's output and each peer's output, with latency ratios peer / dlc (> 1: dlc's output is faster). Also times
`optimize` on a ~1,700-node graph.

    python benchmarks/optimize_vs_peers.py [--batch 8] [--runs 30] [--json]
    python benchmarks/optimize_vs_peers.py --large [--json]   # optimize time and memory on 100-575 MB files

onnx-simplifier runs with its defaults; onnxoptimizer with its defaults (fuse and eliminate passes) followed by
constant folding, which its batch-norm fusion needs to finish. Peers are optional: pip install onnxsim onnxoptimizer; PyTorch twins need torch (pip install torch==2.13.0).
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


def fold_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """Evaluate every node whose inputs are all initializers (onnx's reference evaluator), keeping its outputs
    as initializers; what a constant-folding pass after onnxoptimizer does."""
    from onnx import helper, numpy_helper
    from onnx.reference import ReferenceEvaluator

    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    consts = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    opset = [o for o in model.opset_import if o.domain in ("", "ai.onnx")]
    kept = []
    for node in graph.node:
        inputs = [i for i in node.input if i]
        if node.domain in ("", "ai.onnx") and all(i in consts for i in inputs) and node.op_type != "RandomNormal":
            sub = helper.make_model(helper.make_graph(
                [node], "fold", [], [helper.make_tensor_value_info(o, onnx.TensorProto.UNDEFINED, None)
                                     for o in node.output],
                [numpy_helper.from_array(consts[i], i) for i in dict.fromkeys(inputs)]), opset_imports=opset)
            values = ReferenceEvaluator(sub).run(None, {})
            for name, value in zip(node.output, values):
                consts[name] = np.asarray(value)
                graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
        else:
            kept.append(node)
    del graph.node[:]
    graph.node.extend(kept)
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    live = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(live)
    return model


def peers() -> dict:
    out = {}
    try:
        import onnxsim

        out["onnxsim"] = lambda m: onnxsim.simplify(m)[0]
    except ImportError:
        pass
    try:
        import onnxoptimizer

        # Its default passes (fuse and eliminate), which leave batch-norm folding as arithmetic on
        # initializers; onnxoptimizer's own docs pair it with a constant folder, so fold after it.
        out["onnxoptimizer"] = lambda m: fold_constants(onnxoptimizer.optimize(m))
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


WORKER = r"""
import json, sys, time
def rss(key):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key)) / 1024
tool, src, dst, check = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
import onnx, onnxruntime  # both sides: imports are not what is measured
if tool == "dlc":
    from dlc.compiler import cli, metadata, onnx_io, passes
else:
    import onnxsim
idle = rss("VmRSS:")
t0 = time.perf_counter()
if tool == "dlc":
    nodes, reports, proof, seconds = cli._optimize_file(cli.Path(src), cli.Path(dst), None, check, 1e-3, 1e-4)
else:
    seconds = {}
    model = onnx.load(src)
    seconds["load"] = time.perf_counter() - t0
    t = time.perf_counter()
    model, ok = onnxsim.simplify(model, check_n=check)
    seconds["simplify"] = time.perf_counter() - t
    t = time.perf_counter()
    onnx.save(model, dst)
    seconds["write"] = time.perf_counter() - t
    nodes = (None, len(model.graph.node))
print(json.dumps({"seconds": seconds, "total": time.perf_counter() - t0, "nodes": nodes[1],
                  "peak_mb": rss("VmHWM:") - idle}))
"""


def large_rows(folder: Path) -> list[dict]:
    """dlc optimize against onnx-simplifier on generated VGG-19- and ResNet-50-sized files: each tool in its own
    process, without and with verification on 3 random inputs (dlc --check 3, onnxsim check_n=3); time by
    phase and peak memory above the process's idle RSS, against the file's size."""
    import subprocess

    from large_models import LARGE_MODELS

    tools = ["dlc"] + (["onnxsim"] if "onnxsim" in peers() else [])
    rows = []
    for name, build in LARGE_MODELS.items():
        src = folder / f"{name}.onnx"
        src.write_bytes(build().SerializeToString())
        size_mb = src.stat().st_size / 2**20
        for check in (0, 3):
            for tool in tools:
                done = subprocess.run([sys.executable, "-c", WORKER, tool, str(src), str(folder / f"out-{tool}.onnx"),
                                       str(check)], capture_output=True, text=True)
                if done.returncode:
                    print(f"{tool} failed on {name}: {done.stderr.strip()[-400:]}", file=sys.stderr)
                    continue
                r = json.loads(done.stdout.strip().splitlines()[-1])
                rows.append({"model": name, "file_mb": size_mb, "tool": tool, "check": check, **r,
                             "peak_x_file": r["peak_mb"] / size_mb})
    return rows


def print_large(rows: list[dict]) -> None:
    print(f"{'model':10} {'file MB':>8} {'tool':8} {'check':>5} {'total s':>8} {'peak MB':>8} {'peak/file':>9}  phases")
    for r in rows:
        phases = ", ".join(f"{k} {v:.2f}" for k, v in r["seconds"].items())
        print(f"{r['model']:10} {r['file_mb']:>8.0f} {r['tool']:8} {r['check']:>5} {r['total']:>8.2f} "
              f"{r['peak_mb']:>8.0f} {r['peak_x_file']:>9.2f}  {phases}")
    by = {(r["model"], r["tool"], r["check"]): r for r in rows}
    for (model, tool, check), r in by.items():
        peer = by.get((model, "onnxsim", check))
        if tool == "dlc" and peer:
            print(f"{model}, check {check}: dlc / onnxsim time {r['total'] / peer['total']:.2f}, "
                  f"peak memory {r['peak_mb'] / peer['peak_mb']:.2f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--models", default="resnet20,mobilenet_small,vgg_small,inception_small")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--large", action="store_true", help="only the large-model comparison: optimize time and "
                        "peak memory of dlc against onnx-simplifier on VGG-19- and ResNet-50-sized files")
    args = parser.parse_args()
    if args.large:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            rows = large_rows(Path(tmp))
        if args.json:
            print(json.dumps({"large": rows}, indent=2))
        else:
            print_large(rows)
        return 0

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
