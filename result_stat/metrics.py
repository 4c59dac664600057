"""Classification metrics from labels and class probabilities, all computed by scikit-learn.

One home for what a "test result" holds (accuracy, loss, per-class report, confusion matrix,
ROC-AUC), so the test report, the comparison table and summary.json cannot disagree.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from sklearn.metrics import classification_report, confusion_matrix, log_loss, roc_auc_score


def classification_metrics(labels, probs, class_names) -> dict:
    """accuracy, loss (mean cross-entropy), count, per_class (sklearn report), confusion_matrix, roc_auc.

    ROC-AUC is the Tumor-vs-rest AUC for two classes, macro one-vs-rest over the classes present
    otherwise (scikit-learn's macro OvR when every class is present), and None when the labels hold a
    single class (AUC is undefined then).
    """
    labels = np.asarray(labels, dtype=int)
    probs = np.asarray(probs, dtype=float)
    class_ids = list(range(len(class_names)))
    if labels.ndim != 1 or probs.shape != (len(labels), len(class_names)):
        raise ValueError(f"expected {len(labels)} x {len(class_names)} probabilities, got {probs.shape}")
    if len(labels) == 0:
        return {"accuracy": None, "loss": None, "count": 0, "per_class": {}, "confusion_matrix": [], "roc_auc": None}
    probs = probs / probs.sum(1, keepdims=True)  # float32 softmax sums drift from 1 by ~1e-7
    predictions = probs.argmax(1)
    roc_auc = None
    if len(set(labels.tolist())) > 1:
        if len(class_names) == 2:
            roc_auc = float(roc_auc_score(labels, probs[:, 1]))
        else:  # a hospital may lack a class (long-tailed data): its one-vs-rest AUC does not exist
            present = sorted(set(labels.tolist()))
            roc_auc = float(np.mean([roc_auc_score(labels == c, probs[:, c]) for c in present]))
    report = classification_report(
        labels, predictions, labels=class_ids, target_names=list(class_names), output_dict=True, zero_division=0
    )
    return {
        "accuracy": float((predictions == labels).mean()),
        "loss": float(log_loss(labels, probs, labels=class_ids)),
        "count": int(len(labels)),
        "per_class": report,
        "confusion_matrix": confusion_matrix(labels, predictions, labels=class_ids).tolist(),
        "roc_auc": roc_auc,
    }


def per_class_markdown(per_class: dict, class_names) -> str:
    """The sklearn report as a Markdown table (classes, then macro and weighted averages)."""
    lines = ["| class | precision | recall | F1 | support |", "|---|---:|---:|---:|---:|"]
    for name in [*class_names, "macro avg", "weighted avg"]:
        row = per_class.get(name)
        if isinstance(row, dict):
            lines.append(
                f"| {name} | {row['precision']:.4f} | {row['recall']:.4f} | {row['f1-score']:.4f} | "
                f"{int(row['support'])} |"
            )
    return "\n".join(lines) + "\n"


def confusion_markdown(matrix, class_names) -> str:
    """Rows: true class, columns: predicted class."""
    lines = ["| true \\ predicted | " + " | ".join(class_names) + " |", "|---|" + "---:|" * len(class_names)]
    lines += [f"| {name} | " + " | ".join(str(v) for v in row) + " |" for name, row in zip(class_names, matrix)]
    return "\n".join(lines) + "\n"


def save_confusion_png(matrix, class_names, path: os.PathLike, title: str = "") -> Path:
    """scikit-learn's ConfusionMatrixDisplay, saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(4, 3.6))
    ConfusionMatrixDisplay(np.asarray(matrix), display_labels=list(class_names)).plot(
        ax=ax, cmap="Blues", colorbar=False
    )
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def save_roc_png(curves: dict, path: os.PathLike, title: str = "") -> Path:
    """One ROC curve (scikit-learn RocCurveDisplay) per named model; curves: name -> (labels, Tumor probs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import RocCurveDisplay

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(4.5, 4))
    for name, (labels, scores) in curves.items():
        if len(set(np.asarray(labels).tolist())) > 1:
            RocCurveDisplay.from_predictions(labels, scores, name=name, ax=ax)
    ax.plot([0, 1], [0, 1], ls=":", color="grey")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
