"""Side-by-side benchmarking of ONNX models (`dlc bench`): one harness, runs interleaved, robust ratios.

Every model is loaded on the same runtime, warmed up, then run in turn (A, B, C, A, B, C, ...) until each has
at least `min_time_s` of measured time and at least `MIN_RUNS` runs, so drift on a shared machine (another job,
clock changes) hits all models alike. Runs far above the rest (over Q3 + 3·IQR) are clipped from the
percentiles and counted. The speed-up against the first model is the ratio of minimum latencies, which holds
within about ±10 % on shared machines where the ratio of medians of sub-millisecond runs swings 1.3-2.6×;
the ratio of medians is reported beside it, and the paired ratio: the median over rounds of the two models'
time ratio within one round, which cancels load that changes slower than a round.

The ratio of minima is only as good as the machine is steady: on a loaded 2-core machine two identical models
once came out 2.94× apart by minima (1.05× by medians). So the rounds are also split into `STABILITY_BLOCKS`
consecutive blocks and the speed-up (ratio of minima) is taken in each: its min–max over the blocks is the
`speedup_interval` (it always holds the overall ratio). A pair is unstable when the ratio of minima and the
ratio of medians differ by more than `UNSTABLE_TOLERANCE` (25 %), or the blocks' speed-ups spread by more than
that. Then the measurement is widened: the rounds doubled, at most `WIDEN_MAX` times and while each model's
measured time stays within `WIDEN_BUDGET` × max(min_time_s, 0.25 s); a pair still unstable afterwards gets
`unstable: true` and a warning naming the model and the batch.

With a data spec (`--data`), each model's top-1 accuracy and macro-F1 on the validation split are measured
first (runtime/evaluate.py), on the same sessions, and reported beside the latencies. Warnings: models that ran
on different execution providers, a model that is not faster than the first, accuracy more than
`ACCURACY_DROP` below the first model's.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from dlc.compiler.errors import DlcError

from .cost import ModelCost, count_macs, count_params, model_cost, node_macs  # noqa: F401 (re-exported)
from .session import Session

MIN_RUNS = 20
ACCURACY_DROP = 0.01  # warn when a model's accuracy is more than 1 point below the first model's
STABILITY_BLOCKS = 5  # consecutive blocks of rounds, each giving its own speed-up (at least 4 rounds a block)
UNSTABLE_TOLERANCE = 0.25  # minima vs medians, or block vs block, more than 25 % apart: unstable
WIDEN_MAX = 2  # an unstable measurement is widened (rounds doubled) at most this many times
WIDEN_BUDGET = 4.0  # ... while each model's measured time stays within this × max(min_time_s, 0.25 s)


@dataclass
class LatencyStats:
    """Latency percentiles (ms) after clipping runs above Q3 + 3·IQR; `min_ms` is over all runs."""

    runs: int
    clipped: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    min_ms: float
    mean_ms: float


def latency_stats(times_ms: Sequence[float]) -> LatencyStats:
    """Percentiles of the runs that remain after dropping those above Q3 + 3·IQR (outliers: a preempted run)."""
    t = np.asarray(times_ms, dtype=np.float64)
    if t.size == 0:
        raise ValueError("no timed runs")
    q1, q3 = np.percentile(t, [25, 75])
    kept = t[t <= q3 + 3.0 * (q3 - q1)]
    p50, p90, p99 = np.percentile(kept, [50, 90, 99])
    return LatencyStats(
        runs=int(t.size),
        clipped=int(t.size - kept.size),
        p50_ms=float(p50),
        p90_ms=float(p90),
        p99_ms=float(p99),
        min_ms=float(t.min()),
        mean_ms=float(kept.mean()),
    )


@dataclass
class SpeedupStability:
    """How far one speed-up can be trusted: the ratio of minima, the ratio of medians, and the ratio of minima
    within each block of consecutive rounds (`low`–`high` over the blocks)."""

    speedup: float
    median_ratio: float
    low: float
    high: float
    blocks: int
    unstable: bool
    reasons: list[str] = field(default_factory=list)


def speedup_stability(base_ms: Sequence[float], other_ms: Sequence[float], blocks: int = STABILITY_BLOCKS,
                      tolerance: float = UNSTABLE_TOLERANCE) -> SpeedupStability:
    """The speed-up of `other` over `base` from interleaved runs (round i: base_ms[i], then other_ms[i]), its
    interval over `blocks` consecutive blocks of rounds (at least 4 rounds a block) and whether it is unstable:
    the ratio of minima and the ratio of medians (after latency_stats' clipping) more than `tolerance` apart,
    or the blocks' speed-ups spread by more than `tolerance` (max / min - 1)."""
    n = min(len(base_ms), len(other_ms))
    if n == 0:
        raise ValueError("no timed runs")
    a = np.asarray(base_ms[:n], dtype=np.float64)
    b = np.asarray(other_ms[:n], dtype=np.float64)
    k = max(1, min(blocks, n // 4))
    per_block = [float(a[idx].min() / b[idx].min()) for idx in np.array_split(np.arange(n), k)]
    speedup = float(a.min() / b.min())
    median_ratio = latency_stats(a).p50_ms / latency_stats(b).p50_ms
    low, high = min(per_block), max(per_block)
    reasons = []
    if max(speedup, median_ratio) / min(speedup, median_ratio) - 1 > tolerance:
        reasons.append(f"{speedup:.2f}× by minima but {median_ratio:.2f}× by medians")
    if k > 1 and high / low - 1 > tolerance:
        reasons.append(f"{low:.2f}×–{high:.2f}× across {k} blocks of rounds")
    return SpeedupStability(speedup, median_ratio, low, high, k, bool(reasons), reasons)


@dataclass
class BenchRow:
    model: str
    path: str
    batch: int
    provider: str
    runs: int
    clipped: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    min_ms: float
    mean_ms: float
    throughput: float  # images per second at the median latency
    file_bytes: int
    params: int
    macs: int
    speedup: float  # vs the first model at the same batch: ratio of minimum latencies (robust)
    median_ratio: float  # vs the first model: ratio of median latencies (noisy on shared machines)
    # vs the first model: median over rounds of the first model's time / this model's time in the same round;
    # runs of one round are milliseconds apart, so load that comes and goes hits both sides of each ratio
    paired_ratio: float = 1.0
    # vs the first model: min-max over blocks of consecutive rounds of the speed-up (ratio of minima) in each
    speedup_interval: list[float] = field(default_factory=lambda: [1.0, 1.0])
    unstable: bool = False  # minima vs medians or block vs block more than 25 % apart, even after widening
    accuracy: float | None = None  # on the --data validation split, a fraction: top-1, or mAP@0.5 for detectors
    macro_f1: float | None = None
    accuracy_delta: float | None = None  # accuracy minus the first model's (a fraction: 0.01 is one point)


@dataclass
class BenchResult:
    device: str
    min_time_s: float
    warmup: int
    input_shape: list
    rows: list[BenchRow] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    threads: int | None = None  # onnxruntime intra-op threads (None: its default)
    data: str | None = None  # the --data spec file
    evaluations: list[dict] = field(default_factory=list)  # per model, in order: runtime.evaluate.Evaluation
    notes: list[str] = field(default_factory=list)  # e.g. where a model's input normalisation came from
    thread_pool: str = "own"  # "shared": every session on one process-wide pool (bench_isolated, dlc bench)

    def to_dict(self) -> dict:
        return asdict(self)


def _labels(paths: Sequence[Path]) -> list[str]:
    """Short names: the file name, or parent/name where two files share a name (e.g. build/*/model.onnx)."""
    names = [p.name for p in paths]
    return [f"{p.parent.name}/{p.name}" if names.count(p.name) > 1 else p.name for p in paths]


def bench(
    paths: Sequence[str | Path],
    batches: Sequence[int] = (1,),
    device: str = "auto",
    min_time_s: float = 2.0,
    warmup: int = 5,
    on_run: Callable[[int, int], None] | None = None,
    data: str | Path | None = None,
    threads: int | None = None,
    optimization: str = "all",
    shared_threads: bool = False,
    postprocess: bool = False,
    trt_fp16: bool = False,
    trt_cache: str | Path | None = None,
    io_binding: bool = False,
) -> BenchResult:
    """Benchmark ONNX models side by side on one runtime, runs interleaved; see the module notes.

    data: a YAML file with a `data:` section: also measure accuracy on its validation split.
    threads: onnxruntime intra-op threads for every model (None: onnxruntime's default, one per core).
    on_run(model index, batch), if given, is called after every timed run (tests use it to see the order).
    optimization: onnxruntime's graph optimization level for every model (Session's names; default 'all').
    shared_threads: all models run on one process-wide intra-op thread pool of `threads` threads (see
    Session). With a pool per session (onnxruntime's default), the threads of the session that just ran keep
    spinning on the cores the next one needs: on 2 cores that inflated and scattered the next one's times (the
    ratio of minima of one pair swung 1.0x-3.0x between runs, min and median far apart); with one shared pool,
    interleaved times match each model timed alone, min and median within a few per cent. The pool is
    process-wide and excludes sessions with their own threads afterwards: use bench_isolated.bench_isolated,
    which runs this in a process of its own.
    io_binding: also time every model with onnxruntime's IO binding (inputs placed on the provider's device
    once, outputs left there): rows "<model> (IO binding)" beside the ordinary runs, which copy inputs and
    outputs between host and device on every run. On the CPU provider the two differ only by the binding's
    bookkeeping; on CUDA/TensorRT the gap is the host copies.
    postprocess: a detector without NMS inside is timed with dlc's NMS (runtime.detect.postprocess, its
    metadata's settings) after each run, so it compares like for like with one whose graph holds NMS.
    """
    paths = [Path(p) for p in paths]
    if not paths:
        raise DlcError("give at least one ONNX model to benchmark")
    if not batches or any(b < 1 for b in batches):
        raise DlcError(f"batch sizes must be positive integers, got {list(batches)}")
    if min_time_s < 0:
        raise DlcError(f"--min-time must be >= 0, got {min_time_s}")
    if threads is not None and threads < 1:
        raise DlcError(f"--threads must be >= 1, got {threads}")
    evaluator = None
    if data is not None:
        from .evaluate import Evaluator

        evaluator = Evaluator(data)  # reads and checks the spec before any model is loaded
    sessions = [Session(p, device=device, threads=threads, optimization=optimization, shared_threads=shared_threads,
                        trt_fp16=trt_fp16, trt_cache=trt_cache) for p in paths]
    costs = [model_cost(p) for p in paths]
    labels = _labels(paths)

    def sample_shape(s: Session) -> list:
        return [list(a.shape[1:]) for a in s.inputs]

    first_shape = sample_shape(sessions[0])
    for path, s in zip(paths[1:], sessions[1:]):
        if sample_shape(s) != first_shape:
            raise DlcError(
                f"input shapes differ: {paths[0]} takes {_fmt(first_shape)} but {path} takes "
                f"{_fmt(sample_shape(s))}; benchmark models of the same input"
            )
    for path, s in zip(paths, sessions):
        for a in s.inputs:
            fixed = a.shape[0] if a.shape and isinstance(a.shape[0], int) and a.shape[0] > 0 else None
            bad = [b for b in batches if fixed is not None and b != fixed]
            if bad:
                raise DlcError(
                    f"{path}: input '{a.name}' has a fixed batch size of {fixed}, cannot run batch "
                    f"{bad[0]}; export it with a dynamic batch axis"
                )

    result = BenchResult(device=device, min_time_s=min_time_s, warmup=warmup, input_shape=first_shape,
                         thread_pool="shared" if shared_threads else "own",
                         threads=threads, data=None if data is None else str(data))
    providers = [s.provider for s in sessions]
    if len(set(providers)) > 1:
        ran = ", ".join(f"{label} on {p.removesuffix('ExecutionProvider')}" for label, p in zip(labels, providers))
        result.warnings.append(f"models ran on different execution providers ({ran}): the comparison is NOT like "
                               "for like; pin one with --device")
    evals = [evaluator.evaluate(s) for s in sessions] if evaluator else []
    result.evaluations = [e.to_dict() for e in evals]
    for label, e in zip(labels, evals):
        result.notes.extend(f"{label}: {note}" for note in e.notes)
    for label, e in zip(labels[1:], evals[1:]):
        if e.accuracy < evals[0].accuracy - ACCURACY_DROP:
            result.warnings.append(f"{label} is {100 * (evals[0].accuracy - e.accuracy):.1f} points less accurate "
                                   f"than {labels[0]} ({e.metric} {e.accuracy:.2%} vs {evals[0].accuracy:.2%})")
    runs = [_runner(s, postprocess) for s in sessions]
    if postprocess:
        with_nms = [label for label, s in zip(labels, sessions) if _postprocess_settings(s) is not None]
        if with_nms:
            result.notes.append(f"timed with dlc's NMS after the run: {', '.join(with_nms)}")
    if io_binding:  # the same sessions again, bound (model only, no NMS): rows "(IO binding)" after the others
        runs += [_bound_runner(s) for s in sessions]
        sessions, costs, paths = sessions * 2, costs * 2, paths * 2
        labels = labels + [f"{label} (IO binding)" for label in labels]
        evals = evals * 2
    for batch in batches:
        feeds = [s.random_inputs(batch, seed=0) for s in sessions]
        for run, f in zip(runs, feeds):
            for _ in range(warmup):
                run(f)
        times: list[list[float]] = [[] for _ in sessions]
        spent = [0.0] * len(sessions)
        while min(spent) < min_time_s or min(len(t) for t in times) < MIN_RUNS:
            _round(runs, feeds, batch, times, spent, on_run)
        budget = WIDEN_BUDGET * max(min_time_s, 0.25)
        for widened in range(WIDEN_MAX + 1):
            stability = [None] + [speedup_stability(times[0], t) for t in times[1:]]
            if not any(st.unstable for st in stability[1:]) or widened == WIDEN_MAX or 2 * max(spent) > budget:
                break
            for _ in range(len(times[0])):  # widen: as many rounds again
                _round(runs, feeds, batch, times, spent, on_run)
        stats = [latency_stats(t) for t in times]
        base = stats[0]
        for i, (st, cost, s) in enumerate(zip(stats, costs, sessions)):
            speedup = 1.0 if i == 0 else base.min_ms / st.min_ms
            median_ratio = 1.0 if i == 0 else base.p50_ms / st.p50_ms
            stable = stability[i]
            paired = 1.0 if i == 0 else float(np.median(np.asarray(times[0]) / np.asarray(times[i])))
            result.rows.append(
                BenchRow(
                    model=labels[i],
                    path=str(paths[i]),
                    batch=batch,
                    provider=s.provider,
                    runs=st.runs,
                    clipped=st.clipped,
                    p50_ms=st.p50_ms,
                    p90_ms=st.p90_ms,
                    p99_ms=st.p99_ms,
                    min_ms=st.min_ms,
                    mean_ms=st.mean_ms,
                    throughput=batch / (st.p50_ms / 1e3),
                    file_bytes=cost.file_bytes,
                    params=cost.params,
                    macs=cost.macs,
                    speedup=speedup,
                    median_ratio=median_ratio,
                    paired_ratio=paired,
                    speedup_interval=[1.0, 1.0] if i == 0 else [stable.low, stable.high],
                    unstable=bool(i and stable.unstable),
                    accuracy=evals[i].accuracy if evals else None,
                    macro_f1=evals[i].macro_f1 if evals else None,
                    accuracy_delta=evals[i].accuracy - evals[0].accuracy if evals else None,
                )
            )
            if i and stable.unstable:
                result.warnings.append(
                    f"unstable timing of {labels[i]} vs {labels[0]} at batch {batch} ({st.runs} runs each): "
                    f"{'; '.join(stable.reasons)}; quote the interval {stable.low:.2f}×–{stable.high:.2f}×, or "
                    "rerun on a quieter machine (or with --threads)"
                )
            if i and speedup < 1.0:
                result.warnings.append(
                    f"{labels[i]} is not faster than {labels[0]} at batch {batch}: speed-up {speedup:.2f}× by "
                    f"minimum latency ({median_ratio:.2f}× by median)"
                )
    return result


def _round(runs, feeds, batch: int, times: list[list[float]], spent: list[float], on_run) -> None:
    """One interleaved round: every model once, in order; its time (ms) appended to `times`, added to `spent` (s)."""
    for i, (run, f) in enumerate(zip(runs, feeds)):
        start = time.perf_counter()
        run(f)
        elapsed = time.perf_counter() - start
        spent[i] += elapsed
        times[i].append(elapsed * 1e3)
        if on_run is not None:
            on_run(i, batch)


def _postprocess_settings(session: Session) -> dict | None:
    """dlc's NMS settings for a detector whose graph does not hold NMS; None for anything else."""
    meta = session.metadata or {}
    if meta.get("task") != "detection" or meta.get("embedded_nms"):
        return None
    post = meta.get("postprocess") or {}
    return {k: post[k] for k in ("conf_threshold", "iou_threshold", "max_detections", "class_agnostic") if k in post}


def _runner(session: Session, postprocess: bool) -> Callable[[dict], object]:
    settings = _postprocess_settings(session) if postprocess else None
    if settings is None:
        return session.run
    from .detect import postprocess as nms

    def run(feeds):
        return nms(next(iter(session.run(feeds).values())), **settings)

    return run


def _bound_runner(session: Session) -> Callable[[dict], object]:
    """A run through IO binding: the feeds are placed on the session's device once per feeds dict (per batch),
    the outputs stay on the device."""
    import onnxruntime as ort

    device = "cuda" if session.provider in ("CUDAExecutionProvider", "TensorrtExecutionProvider") else "cpu"
    bound: dict[int, object] = {}

    def run(feeds):
        binding = bound.get(id(feeds))
        if binding is None:
            bound.clear()
            binding = session._session.io_binding()
            for name, value in feeds.items():
                binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(value, device, 0))
            for out in session.outputs:
                binding.bind_output(out.name, device)
            bound[id(feeds)] = binding
        session._session.run_with_iobinding(binding)
        return binding  # outputs stay on the device: binding.copy_outputs_to_cpu() reads them

    return run


def bench_table(result: BenchResult):
    """The results as rich renderables: a latency table (a row per model and batch, a section per batch size)
    and, when accuracy was measured, an accuracy table with a row per model."""
    from rich import box
    from rich.console import Group
    from rich.table import Table

    threads = f", {result.threads} threads" if result.threads else ""
    table = Table(title=f"dlc bench: input {_fmt(result.input_shape)}, interleaved runs, ≥{result.min_time_s:g} s "
                  f"per model and batch{threads}", title_justify="left", box=box.SIMPLE_HEAD,
                  caption="vs the first model: speed-up = ratio of minimum latencies (robust); median × = ratio of "
                  f"medians; paired × = median of per-round ratios; blocks × = speed-up's min-max over "
                  f"{STABILITY_BLOCKS} blocks of rounds; ? = unstable (see the warning)", caption_justify="left")
    for col in ("model", "batch", "provider", "p50 ms", "p90 ms", "p99 ms", "min ms", "img/s", "speed-up",
                "blocks ×", "median ×", "paired ×", "KiB", "params", "MMACs"):
        table.add_column(col, justify="left" if col in ("model", "provider") else "right")
    for i, r in enumerate(result.rows):
        if i and r.batch != result.rows[i - 1].batch:
            table.add_section()
        table.add_row(r.model, str(r.batch), r.provider.removesuffix("ExecutionProvider"), f"{r.p50_ms:.3f}",
                      f"{r.p90_ms:.3f}", f"{r.p99_ms:.3f}", f"{r.min_ms:.3f}", f"{r.throughput:,.0f}",
                      f"[yellow]{r.speedup:.2f}×?[/]" if r.unstable else f"{r.speedup:.2f}×",
                      f"{r.speedup_interval[0]:.2f}–{r.speedup_interval[1]:.2f}", f"{r.median_ratio:.2f}×",
                      f"{r.paired_ratio:.2f}×",
                      f"{r.file_bytes / 1024:,.1f}", f"{r.params:,}", f"{r.macs / 1e6:,.2f}")
    if not result.evaluations:
        return table
    acc = Table(title=f"accuracy on the validation split of {result.data} (Δ vs the first model)",
                title_justify="left", box=box.SIMPLE_HEAD)
    for col in ("model", "metric", "score %", "Δ pts", "val loss", "F1 (macro)", "correct / total", "normalisation"):
        acc.add_column(col, justify="left" if col in ("model", "metric", "normalisation") else "right")
    labels = list(dict.fromkeys(r.model for r in result.rows))
    first = result.evaluations[0]["accuracy"]
    for label, e in zip(labels, result.evaluations):
        metric = "top-1" if e["metric"] == "accuracy" else e["metric"]
        loss = f"{e['loss']:.4f}" if e.get("loss") is not None else ""
        acc.add_row(label, metric, f"{100 * e['accuracy']:.2f}", f"{100 * (e['accuracy'] - first):+.2f}", loss,
                    f"{e['macro_f1']:.3f}", f"{e['correct']:,} / {e['total']:,}", e["normalization"])
    return Group(table, acc)


def _fmt(shapes: list) -> str:
    return ", ".join("×".join(map(str, s)) for s in shapes)


def plot_bench(result: BenchResult, path: str | Path):
    """A PNG, written atomically: accuracy vs median latency when accuracy was measured, else latency bars.
    Returns the (closed) matplotlib Figure, for inspection."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dlc.compiler.atomic import write_bytes

    fig = _plot_accuracy(result, plt) if result.evaluations else _plot_latency(result, plt)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    write_bytes(path, buf.getvalue())
    return fig


_MARKERS = "osD^vP*Xh<>p"


def _speedup_text(r: BenchRow) -> str:
    text = f"{r.speedup:.2f}×"
    if r.unstable:
        text += f"? ({r.speedup_interval[0]:.2f}–{r.speedup_interval[1]:.2f})"
    return text


def _plot_accuracy(result: BenchResult, plt):
    """A panel per batch size, a point per model (its own colour and marker): accuracy (mAP for detectors)
    against median latency (log x), whiskers min to p90. The model names, scores and speed-ups are in a legend
    under the panels, not beside the points, so close points cannot hide each other's labels; the y axis ends
    at 100 %."""
    from matplotlib.ticker import FormatStrFormatter

    batches = list(dict.fromkeys(r.batch for r in result.rows))
    models = list(dict.fromkeys(r.model for r in result.rows))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    style = {m: (colours[j % len(colours)], _MARKERS[j % len(_MARKERS)]) for j, m in enumerate(models)}
    fig, axes = plt.subplots(1, len(batches), figsize=(max(6.0, 4.2 * len(batches) + 1.2), 4.2 + 0.22 * len(models)),
                             sharey=True, squeeze=False, layout="constrained")
    scores = [100 * r.accuracy for r in result.rows]
    lo, hi = min(scores), max(scores)
    pad = max(2.0, 0.1 * (hi - lo))
    metrics = sorted({e["metric"] for e in result.evaluations})
    provider = result.rows[0].provider.removesuffix("ExecutionProvider")
    handles = {}
    for ax, batch in zip(axes[0], batches):
        for r in (r for r in result.rows if r.batch == batch):
            colour, marker = style[r.model]
            handles[r.model] = ax.errorbar([r.p50_ms], [100 * r.accuracy],
                                           xerr=[[r.p50_ms - r.min_ms], [r.p90_ms - r.p50_ms]], fmt=marker,
                                           color=colour, markersize=7, capsize=3, clip_on=False)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(FormatStrFormatter("%g"))
        ax.tick_params(axis="x", which="minor", labelsize=7)
        ax.margins(x=0.15)
        ax.set_xlabel(f"latency at batch {batch} (ms, log)\nmedian, whiskers min to p90")
        ax.set_title(f"batch {batch}", fontsize=10)
        ax.grid(alpha=0.3, which="both")
    axes[0][0].set_ylabel(" / ".join("top-1 accuracy" if m == "accuracy" else m for m in metrics) + " (%)")
    axes[0][0].set_ylim(max(0.0, lo - pad), min(100.0, hi + pad))
    labels = []
    for m in models:
        rows = [r for r in result.rows if r.model == m]
        labels.append(f"{m}: {100 * rows[0].accuracy:.1f} %, " + " / ".join(_speedup_text(r) for r in rows))
    fig.legend([handles[m] for m in models], labels, loc="outside lower center", fontsize=8, frameon=False,
               title=f"model: score, speed-up at batch {' / '.join(map(str, batches))}", title_fontsize=8)
    fig.suptitle(f"dlc bench: accuracy vs latency ({provider})")
    return fig


def _plot_latency(result: BenchResult, plt):
    """Median latency per model and batch as grouped bars (whiskers: minimum to p90); a log y axis where the
    batch sizes' latencies are more than 20× apart."""
    batches = list(dict.fromkeys(r.batch for r in result.rows))
    models = list(dict.fromkeys(r.model for r in result.rows))
    width = 0.8 / max(len(models), 1)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(batches) * len(models) ** 0.5 + 2), 4))
    for j, model in enumerate(models):
        rows = {r.batch: r for r in result.rows if r.model == model}
        xs = [k + (j - (len(models) - 1) / 2) * width for k in range(len(batches))]
        p50 = [rows[b].p50_ms for b in batches]
        low = [rows[b].p50_ms - rows[b].min_ms for b in batches]
        high = [rows[b].p90_ms - rows[b].p50_ms for b in batches]
        ax.bar(xs, p50, width, yerr=[low, high], capsize=3, label=model)
    ax.set_xticks(range(len(batches)), [f"batch {b}" for b in batches])
    p50s = [r.p50_ms for r in result.rows]
    if p50s and max(p50s) > 20 * min(p50s):
        ax.set_yscale("log")
    ax.set_ylabel("latency (ms): median, whiskers min to p90")
    ax.set_title(f"dlc bench ({result.rows[0].provider if result.rows else result.device})")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig
