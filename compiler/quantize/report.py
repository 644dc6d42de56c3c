"""`dlc quantize`'s printed report: the candidate table the choice was made from, then before/after."""

from __future__ import annotations

from .api import QuantResult


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.2f}"


def _score(x: float | None, metric: str) -> str:
    """Top-1 as a percentage, mAP as the fraction it is (the points of a drop are mAP × 100)."""
    if x is None:
        return "—"
    return f"{100 * x:.2f} %" if metric == "accuracy" else f"{x:.4f}"


def _pts(drop: float | None) -> str:
    """A drop as a signed change in points; no "-0.00" for no change."""
    return "—" if drop is None else f"{0.0 - drop + 0.0:+.2f}"


def candidate_table(result: QuantResult):
    from rich import box
    from rich.table import Table

    batches = list(result.options.batches)
    metric = "top-1 %" if result.metric == "accuracy" else f"{result.metric} ×100"
    name = "top-1" if result.metric == "accuracy" else result.metric
    table = Table(title=f"INT8 candidates (fp32 {name} {_score(result.fp32_accuracy, result.metric)}; bound "
                        f"{result.max_accuracy_drop:g} points; speed-up = fp32 / int8 latency)",
                  title_justify="left", box=box.SIMPLE_HEAD,
                  caption="min × = ratio of minimum latencies (robust), median × = ratio of medians; interleaved "
                          "runs: all candidates screened briefly, the fastest timed again in full (final)",
                  caption_justify="left")
    cols = ["candidate", "float nodes", metric, "Δ pts", "KiB"]
    for b in batches:
        cols += [f"b{b} min ×", f"b{b} median ×"]
    cols += ["timed", ""]
    for col in cols:
        table.add_column(col, justify="left" if col in ("candidate", "timed", "") else "right")
    for r in result.candidates:
        if r.error:
            table.add_row(r.candidate.label, "", "", "", "", *([""] * 2 * len(batches)), "", f"failed: {r.error}")
            continue
        mark = "chosen" if r is result.chosen else ("" if r.within else "over bound")
        if r.measured and not r.faster and mark != "chosen":
            mark = (mark + ", " if mark else "") + "not faster"
        cells = [r.candidate.label, str(len(r.excluded)), _pct(r.accuracy), _pts(r.drop),
                 f"{r.file_bytes / 1024:,.1f}"]
        for b in batches:
            mn, md = r.ratios.get(b, (None, None))
            cells += [f"{mn:.2f}×" if mn else "—", f"{md:.2f}×" if md else "—"]
        cells += [r.timed, mark]
        table.add_row(*cells)
    return table


def summary(result: QuantResult, in_path: str, out_path: str | None):
    """Renderables: the candidate table, then accuracy, size, latency, float layers and notes."""
    from rich import box
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    parts = [candidate_table(result)]
    lines = []
    cal = result.calibration
    lines.append(f"  calibration   {cal['samples']} images of the training split ({cal['dataset']}), "
                 f"{cal['method']}, {cal['seconds']:.1f} s; normalisation: {cal['normalization']}")
    if result.chosen is None:
        lines.append(f"  not written   {result.refused}")
        parts.append(Text("\n".join(lines)))
        return Group(*parts)
    c = result.chosen
    name = "mAP@0.5" if result.metric != "accuracy" else "top-1"
    lines.append(f"  chosen        {c.candidate.label}" + (" (forced: not faster than fp32)" if result.forced else ""))
    lines.append(f"  {name:<13} fp32 {_score(result.fp32_accuracy, result.metric)} -> int8 "
                 f"{_score(c.accuracy, result.metric)} "
                 f"({_pts(c.drop)} points; bound {result.max_accuracy_drop:g}) on the validation split")
    int8_bytes = result.int8_bytes or 0
    lines.append(f"  size          {result.fp32_bytes / 1024:,.1f} KiB -> {int8_bytes / 1024:,.1f} KiB "
                 f"({result.fp32_bytes / max(int8_bytes, 1):.2f}× smaller)")
    parts.append(Text("\n".join(lines)))
    lat = Table(title="latency, fp32 vs int8 (ms; dlc bench harness, interleaved)", title_justify="left",
                box=box.SIMPLE_HEAD)
    for col in ("batch", "fp32 min", "int8 min", "min ×", "fp32 median", "int8 median", "median ×"):
        lat.add_column(col, justify="right")
    for row in result.latency():
        lat.add_row(str(row["batch"]), f"{row['fp32_min_ms']:.3f}", f"{row['int8_min_ms']:.3f}",
                    f"{row['min_ratio']:.2f}×", f"{row['fp32_p50_ms']:.3f}", f"{row['int8_p50_ms']:.3f}",
                    f"{row['median_ratio']:.2f}×")
    parts.append(lat)
    tail_lines = []
    if result.exclusion:
        tail_lines.append("  kept float to meet the bound (costliest first: relative error at the outputs with "
                          "the layer quantized alone):")
        for s in result.exclusion:
            tail_lines.append(f"    {s.layer.node} ({s.layer.op}): {s.layer.output_error:.3g} at the outputs, "
                              f"{s.layer.layer_error:.3g} at its own -> {name} {_score(s.accuracy, result.metric)}")
    else:
        tail_lines.append("  float layers  none needed to meet the bound")
    if result.float_tail:
        shown = ", ".join(result.float_tail[:4]) + (", ..." if len(result.float_tail) > 4 else "")
        tail_lines.append(f"  float tail    {len(result.float_tail)} post-processing nodes after the last "
                          f"Conv/Gemm/MatMul ({shown})")
    if result.layer_errors:
        worst = ", ".join(f"{e['node']} {e['added']:.3g}" for e in result.layer_errors[:3])
        tail_lines.append(f"  worst layers  {worst} (added relative error, QDQ twin on calibration images)")
    for note in result.notes:
        tail_lines.append(f"  note          {note}")
    if out_path:
        tail_lines.append(f"  wrote         {out_path} and {out_path.rsplit('.', 1)[0]}.json")
    parts.append(Text("\n".join(tail_lines)))
    return Group(*parts)
