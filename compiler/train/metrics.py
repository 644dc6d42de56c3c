"""Classification metrics: accuracy, confusion matrix, per-class precision, recall and F1; loss curves."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import write_bytes


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """Rows: true class, columns: predicted class."""
    return np.bincount(labels * num_classes + predictions, minlength=num_classes ** 2).reshape(num_classes,
                                                                                                 num_classes)


def classification_report(labels: np.ndarray, predictions: np.ndarray, classes: list[str]) -> dict[str, Any]:
    k = len(classes)
    cm = confusion_matrix(labels, predictions, k)
    tp = np.diag(cm).astype(np.float64)
    predicted = cm.sum(axis=0)
    actual = cm.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(predicted > 0, tp / predicted, 0.0)
        recall = np.where(actual > 0, tp / actual, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    return {
        "accuracy": float(tp.sum() / max(len(labels), 1)),
        "per_class": {c: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                          "support": int(actual[i])} for i, c in enumerate(classes)},
        "macro_f1": float(f1.mean()),
        "confusion_matrix": cm.tolist(),
    }


def plot_curves(history: list[dict[str, Any]], path: str | Path, title: str, metric: str = "accuracy"):
    """Loss (train and val) and the validation metric per epoch, as a PNG; returns the (closed) Figure.

    metric: the name of what `train_accuracy` / `val_accuracy` hold, for the right panel's axis and title:
    "accuracy" (top-1) for classifiers, e.g. "mAP@0.5" for detectors. A train series that is all NaN (a
    detector has no training mAP) is not drawn."""
    import math

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(epochs, [h["train_loss"] for h in history], marker="o", label="train")
    ax1.plot(epochs, [h["val_loss"] for h in history], marker="o", label="val")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("loss")
    ax1.set_title("loss")
    ax1.legend()
    ax1.grid(alpha=0.3)
    train = [h.get("train_accuracy", float("nan")) for h in history]
    if not all(v is None or math.isnan(v) for v in train):
        ax2.plot(epochs, train, marker="o", label="train")
    ax2.plot(epochs, [h["val_accuracy"] for h in history], marker="o", label="val")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel(metric)
    ax2.set_title(metric if metric != "accuracy" else "top-1 accuracy")
    ax2.set_ylim(0, 1.02)
    ax2.legend()
    ax2.grid(alpha=0.3)
    for ax in (ax1, ax2):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    write_bytes(path, buf.getvalue())
    return fig
