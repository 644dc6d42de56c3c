"""dlc's native NMS and IoU side by side with their peers, in one run; prints times and ratios.

Peers:
- the plain numpy reference (`dlc._C.boxes_ref`), NMS on the 1k workloads only (it is a Python loop);
- onnxruntime's NonMaxSuppression operator (CPU provider, default graph optimizations, one intra-op
  thread; boxes fed as xyxy, which gives the same IoU as ORT's yxyx since IoU is symmetric in the axes);
- OpenCV's `cv2.dnn.NMSBoxes` (xywh boxes), when `cv2` can be imported;
- for IoU, the vectorised numpy reference.

Every NMS peer's keep list is checked against dlc's; a mismatch is printed loudly. Ratios are
peer_time / dlc_time, so > 1 means dlc is faster. Absolute times drift on shared machines; the ratios
from one run are what to read.

    python benchmarks/boxes_vs_peers.py [--repeats 7] [--threshold 0.5] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np

from dlc._C.boxes_ref import box_iou_ref, nms_ref
from dlc.runtime.boxes import box_iou, nms

try:
    import cv2
except ImportError:
    cv2 = None


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def random_boxes(rng: np.random.Generator, n: int) -> np.ndarray:
    """n boxes scattered over a 1000x1000 image, 10 to 100 pixels a side, xyxy float32."""
    xy = rng.uniform(0, 900, size=(n, 2))
    wh = rng.uniform(10, 100, size=(n, 2))
    return np.hstack([xy, xy + wh]).astype(np.float32)


def clustered_boxes(rng: np.random.Generator, objects: int, per_object: int) -> np.ndarray:
    """`objects` boxes over a 1000x1000 image, each repeated `per_object` times with a few pixels of jitter."""
    xy = rng.uniform(0, 900, size=(objects, 2))
    wh = rng.uniform(20, 100, size=(objects, 2))
    xy = np.repeat(xy, per_object, axis=0) + rng.normal(0, 4, size=(objects * per_object, 2))
    wh = np.repeat(wh, per_object, axis=0) * rng.uniform(0.85, 1.15, size=(objects * per_object, 2))
    boxes = np.hstack([xy, xy + wh]).astype(np.float32)
    return boxes[rng.permutation(len(boxes))]


def distinct_scores(rng: np.random.Generator, n: int) -> np.ndarray:
    """Scores without ties, so that every peer's tie rule is irrelevant."""
    return (rng.permutation(n).astype(np.float64) / n).astype(np.float32)


def make_ort_nms(threshold: float) -> Callable[[np.ndarray, np.ndarray], np.ndarray] | None:
    try:
        import onnx
        import onnxruntime as ort
        from onnx import TensorProto, helper
    except ImportError:
        return None
    node = helper.make_node(
        "NonMaxSuppression", ["boxes", "scores", "max_out", "iou_threshold"], ["selected"], center_point_box=0
    )
    graph = helper.make_graph(
        [node],
        "nms",
        [
            helper.make_tensor_value_info("boxes", TensorProto.FLOAT, [1, None, 4]),
            helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, 1, None]),
            helper.make_tensor_value_info("max_out", TensorProto.INT64, [1]),
            helper.make_tensor_value_info("iou_threshold", TensorProto.FLOAT, [1]),
        ],
        [helper.make_tensor_value_info("selected", TensorProto.INT64, [None, 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    thr = np.array([threshold], dtype=np.float32)

    def run(boxes: np.ndarray, scores: np.ndarray) -> np.ndarray:
        feeds = {
            "boxes": boxes[None],
            "scores": scores[None, None],
            "max_out": np.array([len(boxes)], dtype=np.int64),
            "iou_threshold": thr,
        }
        return session.run(None, feeds)[0][:, 2]

    return run


def make_cv2_nms(threshold: float) -> Callable[[np.ndarray, np.ndarray], np.ndarray] | None:
    if cv2 is None:
        return None

    def run(boxes: np.ndarray, scores: np.ndarray) -> np.ndarray:
        xywh = np.hstack([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]])
        kept = cv2.dnn.NMSBoxes(xywh.tolist(), scores.tolist(), -1.0, threshold)
        return np.asarray(kept, dtype=np.int64).reshape(-1)

    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--repeats", type=int, default=7, help="timed runs per measurement (median is reported)"
    )
    parser.add_argument("--threshold", type=float, default=0.5, help="NMS IoU threshold")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = parser.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    thr = args.threshold
    workloads = {
        "random-1k": random_boxes(rng, 1_000),
        "clustered-1k": clustered_boxes(rng, 10, 100),
        "random-10k": random_boxes(rng, 10_000),
        "clustered-10k": clustered_boxes(rng, 100, 100),
    }
    peers: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray] | None] = {
        "numpy-ref": lambda b, s: nms_ref(b, s, thr),
        "onnxruntime": make_ort_nms(thr),
        "cv2.dnn.NMSBoxes": make_cv2_nms(thr),
    }
    notes = []
    if peers["onnxruntime"] is None:
        notes.append("onnxruntime/onnx not importable: skipped")
    if peers["cv2.dnn.NMSBoxes"] is None:
        notes.append(
            "cv2 not importable: OpenCV NMSBoxes skipped (pip install opencv-python-headless to add it)"
        )
    notes.append("numpy-ref NMS is a Python loop: run on the 1k workloads only")

    rows = []
    mismatches = 0
    for name, boxes in workloads.items():
        scores = distinct_scores(rng, len(boxes))
        keep = nms(boxes, scores, thr)
        dlc_ms = median_ms(lambda b=boxes, s=scores: nms(b, s, thr), args.repeats)
        for peer, fn in peers.items():
            if fn is None or (peer == "numpy-ref" and len(boxes) > 1_000):
                continue
            peer_keep = fn(boxes, scores)
            match = np.array_equal(np.sort(peer_keep), np.sort(keep))
            if not match:
                mismatches += 1
                only_dlc = sorted(set(keep.tolist()) - set(peer_keep.tolist()))
                only_peer = sorted(set(peer_keep.tolist()) - set(keep.tolist()))
                print(
                    f"!!! MISMATCH {name} vs {peer}: dlc keeps {len(keep)}, {peer} keeps {len(peer_keep)}; "
                    f"only dlc: {only_dlc[:10]}, only {peer}: {only_peer[:10]}",
                    file=sys.stderr,
                )
            repeats = 3 if peer == "numpy-ref" else args.repeats
            peer_ms = median_ms(lambda f=fn, b=boxes, s=scores: f(b, s), repeats)
            rows.append(
                {
                    "op": "nms",
                    "workload": name,
                    "boxes": len(boxes),
                    "kept": len(keep),
                    "dlc_ms": dlc_ms,
                    "peer": peer,
                    "peer_ms": peer_ms,
                    "ratio": peer_ms / dlc_ms,
                    "match": bool(match),
                }
            )

    a, b = random_boxes(rng, 1_000), random_boxes(rng, 1_000)
    iou_match = np.array_equal(box_iou(a, b), box_iou_ref(a, b))
    if not iou_match:
        mismatches += 1
        print("!!! MISMATCH box_iou 1000x1000: dlc and the numpy reference differ", file=sys.stderr)
    dlc_ms = median_ms(lambda: box_iou(a, b), args.repeats)
    peer_ms = median_ms(lambda: box_iou_ref(a, b), args.repeats)
    rows.append(
        {
            "op": "box_iou",
            "workload": "random-1000x1000",
            "boxes": 2_000,
            "kept": None,
            "dlc_ms": dlc_ms,
            "peer": "numpy-vectorised",
            "peer_ms": peer_ms,
            "ratio": peer_ms / dlc_ms,
            "match": bool(iou_match),
        }
    )

    config = {
        "threshold": thr,
        "repeats": args.repeats,
        "seed": args.seed,
        "cpu_count": os.cpu_count(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "dlc_threads": "nms: one thread (greedy, serial); box_iou: OpenMP prange over rows",
        "onnxruntime_session": "CPUExecutionProvider, default graph optimizations, intra_op_num_threads=1",
    }
    if args.json:
        print(
            json.dumps(
                {"config": config, "results": rows, "notes": notes, "mismatches": mismatches}, indent=2
            )
        )
    else:
        header = (
            f"{'op':<8} {'workload':<17} {'boxes':>6} {'kept':>5} {'dlc ms':>9} {'peer':<17} {'peer ms':>10} "
        )
        header += f"{'ratio':>8}  match"
        print(header)
        print("-" * len(header))
        for r in rows:
            kept = "" if r["kept"] is None else r["kept"]
            print(
                f"{r['op']:<8} {r['workload']:<17} {r['boxes']:>6} {kept:>5} {r['dlc_ms']:>9.3f} {r['peer']:<17} "
                f"{r['peer_ms']:>10.3f} {r['ratio']:>7.1f}x  {'yes' if r['match'] else 'NO !!!'}"
            )
        print(
            f"\nratio = peer_ms / dlc_ms (> 1: dlc faster); median of {args.repeats} runs, IoU threshold {thr}"
        )
        print(f"dlc: {config['dlc_threads']}; cpus: {config['cpu_count']}")
        print(f"onnxruntime: {config['onnxruntime_session']}")
        for note in notes:
            print(f"note: {note}")
    return 1 if mismatches else 0


if __name__ == "__main__":
    raise SystemExit(main())
