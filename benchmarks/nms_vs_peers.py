"""dlc's native NMS (single-class and 80-class batched) and IoU matrices side by side with their peers.

Peers, all in the same run:
- onnxruntime's NonMaxSuppression operator (CPU provider, one intra-op thread). Single class: scores
  [1, 1, N]. Batched: scores [1, 80, N], each box's score in its class row and -1 elsewhere, with
  score_threshold -0.5 (ORT keeps score > threshold), which is how per-class NMS is expressed in ONNX.
  Boxes are fed as xyxy: IoU is symmetric in the axes, so ORT's yxyx reading gives the same answer.
- OpenCV's `cv2.dnn.NMSBoxes` (xywh boxes as a float64 array, so x + w gives x2 back exactly) and
  `cv2.dnn.NMSBoxesBatched` for the batched case. OpenCV requires score_threshold >= 0 and keeps
  score > threshold, so scores here are all > 0 and the threshold is 0; eta = 1 (no adaptive threshold),
  top_k = 0 (no cap). Its batched version offsets boxes by class (dlc groups them natively).
- dlc's plain numpy reference (`dlc._C.boxes_ref`; a Python loop), on the 1k workloads only.
- For IoU / GIoU 1000 x 1000: the vectorised numpy reference.

Scores are distinct, so no peer's tie rule matters. Every peer's keep set is compared with dlc's; a mismatch
is printed loudly and makes the exit status 1. Times are the min and median of --repeats runs, taken in two
warm blocks per implementation (see `blocks`); ratio = peer / dlc on the medians (> 1: dlc faster).

    python benchmarks/nms_vs_peers.py [--repeats 9] [--threshold 0.5] [--json]
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
from dlc.runtime.boxes import batched_nms, box_iou, nms

try:
    import cv2
except ImportError:
    cv2 = None

NUM_CLASSES = 80
# Targets from issue 6, on every 10k-box workload: dlc >= 3x onnxruntime and >= 10x OpenCV; IoU >= 5x numpy.
TARGETS = {"onnxruntime": 3.0, "opencv": 10.0, "numpy-vectorised": 5.0}


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
    """Distinct scores in (0, 1]: no ties, and all above OpenCV's smallest allowed threshold (0)."""
    return ((rng.permutation(n) + 1).astype(np.float64) / n).astype(np.float32)


def make_ort(threshold: float, classes: int) -> Callable | None:
    try:
        import onnx
        import onnxruntime as ort
        from onnx import TensorProto, helper
    except ImportError:
        return None
    node = helper.make_node(
        "NonMaxSuppression",
        ["boxes", "scores", "max_out", "iou_threshold", "score_threshold"],
        ["selected"],
        center_point_box=0,
    )
    graph = helper.make_graph(
        [node],
        "nms",
        [
            helper.make_tensor_value_info("boxes", TensorProto.FLOAT, [1, None, 4]),
            helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, classes, None]),
            helper.make_tensor_value_info("max_out", TensorProto.INT64, [1]),
            helper.make_tensor_value_info("iou_threshold", TensorProto.FLOAT, [1]),
            helper.make_tensor_value_info("score_threshold", TensorProto.FLOAT, [1]),
        ],
        [helper.make_tensor_value_info("selected", TensorProto.INT64, [None, 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    thr = np.array([threshold], dtype=np.float32)
    score_thr = np.array([-0.5], dtype=np.float32)

    def run(boxes: np.ndarray, score_rows: np.ndarray) -> np.ndarray:
        feeds = {
            "boxes": boxes[None],
            "scores": score_rows[None],
            "max_out": np.array([len(boxes)], dtype=np.int64),
            "iou_threshold": thr,
            "score_threshold": score_thr,
        }
        return session.run(None, feeds)[0][:, 2]

    return run


def class_rows(scores: np.ndarray, classes: np.ndarray | None) -> np.ndarray:
    """ORT's [C, N] score layout: each box's score in its class's row, -1 (below the threshold) elsewhere."""
    if classes is None:
        return scores[None]
    rows = np.full((NUM_CLASSES, len(scores)), -1.0, dtype=np.float32)
    rows[classes, np.arange(len(scores))] = scores
    return rows


def make_cv2(threshold: float, batched: bool) -> Callable | None:
    if cv2 is None:
        return None

    def run(xywh: np.ndarray, scores: np.ndarray, classes: np.ndarray | None) -> np.ndarray:
        if batched:
            kept = cv2.dnn.NMSBoxesBatched(xywh, scores, classes, 0.0, threshold, 1.0, 0)
        else:
            kept = cv2.dnn.NMSBoxes(xywh, scores, 0.0, threshold, 1.0, 0)
        return np.asarray(kept, dtype=np.int64).reshape(-1)

    return run


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def blocks(fn: Callable[[], object], repeats: int) -> list[float]:
    """`repeats` timed runs in two warm blocks (one untimed warm-up each), so every implementation runs
    with its data in cache, and load that comes and goes on a shared machine is spread over both."""
    times = []
    for half in (repeats - repeats // 2, repeats // 2):
        if half:
            fn()
            times += [timed(fn) for _ in range(half)]
    return times


def compare(name: str, peer: str, keep: np.ndarray, peer_keep: np.ndarray) -> bool:
    match = np.array_equal(np.sort(keep), np.sort(peer_keep))
    if not match:
        only_dlc = sorted(set(keep.tolist()) - set(peer_keep.tolist()))
        only_peer = sorted(set(peer_keep.tolist()) - set(keep.tolist()))
        print(
            f"!!! MISMATCH {name} vs {peer}: dlc keeps {len(keep)}, {peer} keeps {len(peer_keep)}; "
            f"only dlc: {only_dlc[:10]}, only {peer}: {only_peer[:10]}",
            file=sys.stderr,
        )
    return bool(match)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9, help="timed runs per measurement (min and median)")
    parser.add_argument("--threshold", type=float, default=0.5, help="NMS IoU threshold")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")

    rng = np.random.default_rng(args.seed)
    thr = args.threshold
    workloads = []
    for n, objects in [(1_000, 10), (10_000, 100), (30_000, 300)]:
        for layout, boxes in [
            ("random", random_boxes(rng, n)),
            ("clustered", clustered_boxes(rng, objects, 100)),
        ]:
            label = f"{layout}-{n // 1000}k"
            scores = distinct_scores(rng, n)
            workloads.append((label, boxes, scores, None))
            workloads.append((f"{label}-80cls", boxes, scores, rng.integers(0, NUM_CLASSES, size=n)))
    ort_single, ort_batched = make_ort(thr, 1), make_ort(thr, NUM_CLASSES)
    cv2_single, cv2_batched = make_cv2(thr, False), make_cv2(thr, True)
    notes = []
    if ort_single is None:
        notes.append("onnxruntime/onnx not importable: skipped")
    if cv2 is None:
        notes.append("cv2 not importable: OpenCV skipped (pip install opencv-python-headless to add it)")
    notes.append("numpy reference NMS is a Python loop: run on the 1k workloads only")

    rows = []
    mismatches = 0
    for name, boxes, scores, classes in workloads:
        batched = classes is not None
        cls32 = None if classes is None else classes.astype(np.int32)
        xywh = np.hstack([boxes[:, :2], boxes[:, 2:].astype(np.float64) - boxes[:, :2]]).astype(np.float64)
        rows_c = class_rows(scores, classes)

        def dlc_fn(b=boxes, s=scores, c=classes):
            return batched_nms(b, s, c, thr) if c is not None else nms(b, s, thr)

        peers: dict[str, Callable[[], np.ndarray]] = {}
        if ort_single is not None:
            ort_fn = ort_batched if batched else ort_single
            peers["onnxruntime"] = lambda f=ort_fn, b=boxes, r=rows_c: f(b, r)
        if cv2 is not None:
            cv_fn = cv2_batched if batched else cv2_single
            peers["opencv"] = lambda f=cv_fn, x=xywh, s=scores, c=cls32: f(x, s, c)
        if len(boxes) <= 1_000 and not batched:
            peers["numpy-ref"] = lambda b=boxes, s=scores: nms_ref(b, s, thr)
        keep = dlc_fn()
        matches = {peer: compare(name, peer, keep, fn()) for peer, fn in peers.items()}
        mismatches += sum(not m for m in matches.values())
        times = {"dlc": blocks(dlc_fn, args.repeats)}
        for peer, fn in peers.items():
            times[peer] = blocks(fn, 2 if peer == "numpy-ref" else args.repeats)
        dlc_med = statistics.median(times["dlc"])
        for peer in peers:
            peer_med = statistics.median(times[peer])
            rows.append(
                {
                    "op": "batched_nms" if batched else "nms",
                    "workload": name,
                    "boxes": len(boxes),
                    "kept": len(keep),
                    "dlc_ms_min": min(times["dlc"]),
                    "dlc_ms_median": dlc_med,
                    "peer": peer,
                    "peer_ms_min": min(times[peer]),
                    "peer_ms_median": peer_med,
                    "ratio": peer_med / dlc_med,
                    "match": matches[peer],
                }
            )

    a, b = random_boxes(rng, 1_000), random_boxes(rng, 1_000)
    for kind in ("iou", "giou"):
        match = np.array_equal(box_iou(a, b, kind), box_iou_ref(a, b, kind))
        if not match:
            mismatches += 1
            print(
                f"!!! MISMATCH box_iou {kind} 1000x1000: dlc and the numpy reference differ", file=sys.stderr
            )
        dlc_t = blocks(lambda k=kind: box_iou(a, b, k), args.repeats)
        ref_t = blocks(lambda k=kind: box_iou_ref(a, b, k), args.repeats)
        rows.append(
            {
                "op": f"box_iou[{kind}]",
                "workload": "random-1000x1000",
                "boxes": 2_000,
                "kept": None,
                "dlc_ms_min": min(dlc_t),
                "dlc_ms_median": statistics.median(dlc_t),
                "peer": "numpy-vectorised",
                "peer_ms_min": min(ref_t),
                "peer_ms_median": statistics.median(ref_t),
                "ratio": statistics.median(ref_t) / statistics.median(dlc_t),
                "match": bool(match),
            }
        )

    targets = []
    for r in rows:
        if r["peer"] in TARGETS and (r["boxes"] == 10_000 or r["op"].startswith("box_iou")):
            goal = TARGETS[r["peer"]]
            targets.append(
                {"workload": r["workload"], "peer": r["peer"], "goal": goal, "met": r["ratio"] >= goal}
            )

    config = {
        "threshold": thr,
        "repeats": args.repeats,
        "seed": args.seed,
        "cpu_count": os.cpu_count(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "opencv": None if cv2 is None else cv2.__version__,
        "dlc_threads": "nms / batched_nms: one thread; box_iou: OpenMP prange over rows",
        "onnxruntime_session": "CPUExecutionProvider, default graph optimizations, intra_op_num_threads=1",
    }
    if args.json:
        out = {
            "config": config,
            "results": rows,
            "targets": targets,
            "notes": notes,
            "mismatches": mismatches,
        }
        print(json.dumps(out, indent=2))
    else:
        header = (
            f"{'op':<14} {'workload':<22} {'kept':>6} {'dlc ms (min/med)':>18} {'peer':<17} "
            f"{'peer ms (min/med)':>19} {'ratio':>7}  match"
        )
        print(header)
        print("-" * len(header))
        for r in rows:
            kept = "" if r["kept"] is None else r["kept"]
            dlc = f"{r['dlc_ms_min']:.3f}/{r['dlc_ms_median']:.3f}"
            peer = f"{r['peer_ms_min']:.3f}/{r['peer_ms_median']:.3f}"
            print(
                f"{r['op']:<14} {r['workload']:<22} {kept:>6} {dlc:>18} {r['peer']:<17} {peer:>19} "
                f"{r['ratio']:>6.1f}x  {'yes' if r['match'] else 'NO !!!'}"
            )
        print(
            f"\nratio = peer median / dlc median (> 1: dlc faster); {args.repeats} runs, IoU threshold {thr}"
        )
        print(f"dlc: {config['dlc_threads']}; cpus: {config['cpu_count']}")
        print(f"onnxruntime: {config['onnxruntime_session']}")
        met = [t for t in targets if t["met"]]
        print(f"targets met: {len(met)} of {len(targets)}")
        for t in targets:
            if not t["met"]:
                print(f"  target missed: {t['workload']} vs {t['peer']} (goal {t['goal']:.0f}x)")
        for note in notes:
            print(f"note: {note}")
    return 1 if mismatches else 0


if __name__ == "__main__":
    raise SystemExit(main())
