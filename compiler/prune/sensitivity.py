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


def plot_sensitivity(result: Sensitivity, path: str | Path, title: str = "pruning sensitivity") -> Path:
    """One line per group or layer: validation accuracy vs pruning ratio, as a PNG (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..atomic import write_bytes

    fig, ax = plt.subplots(figsize=(8, 5))
    for row in result.rows:
        label = row["name"] if len(row["name"]) <= 40 else row["name"][:37] + "..."
        ax.plot(result.ratios, row["accuracy"], marker="o", markersize=3, label=f"{label} ({row['size']})")
    ax.axhline(result.base_accuracy, color="grey", linestyle="--", linewidth=1, label="unpruned")
    ax.set_xlabel("ratio pruned" + (" (channels)" if result.method == "structured" else " (weights)"))
    ax.set_ylabel(f"{result.label} (no fine-tuning)")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6 if len(result.rows) > 12 else 8, loc="lower left", ncol=2 if len(result.rows) > 12 else 1)
    ax.set_title(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return write_bytes(path, buf.getvalue())
