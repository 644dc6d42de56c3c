"""Sensitivity analysis: validation accuracy when only one channel group (structured) or one layer
(unstructured) is pruned, at each of a list of ratios, without fine-tuning.

Each trial prunes a copy of the graph (structured) or masks one weight and restores it afterwards
(unstructured), then evaluates the validation split once in eval mode on dlc's backend. Ratio 0 is the model
itself, so its accuracy is the base accuracy exactly.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..graph import Graph
from .pipeline import ValData
from .structured import _n_keep, channel_groups, importance, matches, prune_channels

DEFAULT_RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


@dataclass
class Sensitivity:
    method: str
    ratios: list[float]
    base_accuracy: float
    rows: list[dict[str, Any]] = field(default_factory=list)  # {name, size, accuracy: [per ratio]}
    metric: str = "top-1"  # what "accuracy" holds: top-1, or mAP@0.5 for detectors

    @property
    def label(self) -> str:
        return "validation mAP@0.5" if self.metric == "mAP@0.5" else "validation accuracy"

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "metric": self.metric, "ratios": self.ratios,
                "base_accuracy": self.base_accuracy, "rows": self.rows}


def sensitivity(graph: Graph, val: ValData, method: str = "structured", importance_method: str = "l1",
                ratios=DEFAULT_RATIOS, skip=(), round_to: int = 1, progress=None) -> Sensitivity:
    """Accuracy vs ratio for every prunable group (structured, named by its producers) or layer (unstructured).
    `progress`, when given, is called with (done, total) after each trial."""
    ratios = [float(r) for r in ratios]
    result = Sensitivity(method, ratios, val.accuracy(graph), metric=val.metric)
    if method == "unstructured":
        from .unstructured import apply_masks, magnitude_masks, prunable_weights

        weights = prunable_weights(graph, skip)
        total, done = len(weights) * len(ratios), 0
        names = [k.rsplit(".", 1)[0] for k in weights]
        for key, name in zip(weights, names):
            others = [n for n in names if n != name]
            saved = graph.node(name).params["weight"].copy()
            accs = []
            for r in ratios:
                masks = magnitude_masks(graph, r, "layer", skip=tuple(others) + tuple(skip))
                apply_masks(graph, {key: masks[key]})
                accs.append(val.accuracy(graph))
                np.copyto(graph.node(name).params["weight"], saved)
                done += 1
                if progress:
                    progress(done, total)
            result.rows.append({"name": name, "size": int(saved.size), "accuracy": accs})
        return result
    groups = [g for g in channel_groups(graph)
              if g.prunable and not any(matches(n, skip) for n in g.producers + g.members)]
    total, done = len(groups) * len(ratios), 0
    for grp in groups:
        order = np.argsort(-importance(graph, grp, importance_method, seed=grp.id), kind="stable")
        accs = []
        for r in ratios:
            n = _n_keep(grp.size, r, round_to, 1)
            if n >= grp.size:
                accs.append(val.accuracy(graph))
            else:
                trial = graph.copy()
                prune_channels(trial, grp, np.sort(order[:n]))
                accs.append(val.accuracy(trial))
            done += 1
            if progress:
                progress(done, total)
        result.rows.append({"name": "+".join(grp.producers), "size": grp.size, "accuracy": accs})
    return result


def sensitivity_figure(result: Sensitivity, title: str = "pruning sensitivity"):
    """The sensitivity plot as a matplotlib Figure: one line per group or layer, accuracy vs pruning ratio.

    The ratios sit evenly spaced on the x axis, labelled with their values: unstructured sweeps go up to 0.95 or
    0.99, where on a linear axis every line would drop in the last few millimetres. Colours repeat after ten
    lines, so each cycle of ten gets its own line style and marker; the legend sits right of the axes, off the
    lines. The y axis spans the measured accuracies (ending at 1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(result.rows)
    fig, ax = plt.subplots(figsize=(9.5 if n <= 24 else 11, 5))
    xs = list(range(len(result.ratios)))
    styles, markers = ("-", "--", ":", "-."), "osD^v"
    for j, row in enumerate(result.rows):
        label = row["name"] if len(row["name"]) <= 40 else row["name"][:37] + "..."
        ax.plot(xs, row["accuracy"], marker=markers[j // 10 % len(markers)], markersize=4,
                linestyle=styles[j // 10 % len(styles)], clip_on=False, label=f"{label} ({row['size']:,})")
    ax.axhline(result.base_accuracy, color="grey", linestyle="--", linewidth=1, label="unpruned")
    ax.set_xticks(xs, [f"{r:g}" for r in result.ratios])
    steps = np.diff(result.ratios)
    even = len(steps) < 2 or np.allclose(steps, steps[0], rtol=1e-3, atol=1e-9)
    ax.set_xlabel("ratio pruned" + (" (channels)" if result.method == "structured" else " (weights)")
                  + ("" if even else ": the ratios evenly spaced, not to scale"))
    ax.set_ylabel(f"{result.label} (no fine-tuning)")
    values = [a for row in result.rows for a in row["accuracy"]] + [result.base_accuracy]
    lo, hi = min(values), max(values)
    pad = max(0.02, 0.05 * (hi - lo))
    ax.set_ylim(max(0.0, lo - pad), min(1.0, hi + pad))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6 if n > 12 else 8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0,
              ncols=2 if n > 24 else 1, frameon=False)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def plot_sensitivity(result: Sensitivity, path: str | Path, title: str = "pruning sensitivity") -> Path:
    """sensitivity_figure as a PNG (written atomically)."""
    import matplotlib.pyplot as plt

    from ..atomic import write_bytes

    fig = sensitivity_figure(result, title)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return write_bytes(path, buf.getvalue())
