"""Scores of one set of predictions and their summaries over seeds: plain functions on
{site: {"labels", "probs"}}, the predictions every comparison run stores."""

from __future__ import annotations

import warnings

import numpy as np

METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "roc_auc")
PRIMARY_METRIC = "balanced_accuracy"


def headline_metrics(labels, probs) -> dict:
    """accuracy, balanced accuracy, macro-F1, ROC-AUC, recall per class and count of one set of predictions.

    Balanced accuracy (the mean of the per-class recalls) and macro-F1 average over the classes present in
    `labels` (a hospital whose test split holds one class is judged on that class, not punished for the
    absent one); `recall` lists every class, None where absent. Accuracy and ROC-AUC come from
    result_stat.metrics, the project's one home for them."""
    from sklearn.metrics import balanced_accuracy_score, f1_score

    from result_stat.metrics import classification_metrics

    num_classes = len(probs[0]) if len(probs) else 2
    full = classification_metrics(labels, probs, [str(c) for c in range(num_classes)])
    if not full["count"]:
        return {**{m: None for m in METRICS}, "recall": [None] * num_classes, "count": 0}
    labels = np.asarray(labels, dtype=int)
    predictions = np.asarray(probs, dtype=float).argmax(1)
    with warnings.catch_warnings():  # one class present: sklearn warns about the absent one, which we leave out
        warnings.simplefilter("ignore")
        balanced = float(balanced_accuracy_score(labels, predictions))
    macro_f1 = float(
        f1_score(labels, predictions, labels=sorted(set(labels.tolist())), average="macro", zero_division=0)
    )
    present = set(labels.tolist())  # scikit-learn's report gives an absent class recall 0; here it has none
    recall = [float(full["per_class"][str(c)]["recall"]) if c in present else None for c in range(num_classes)]
    return {
        "accuracy": full["accuracy"],
        "balanced_accuracy": balanced,
        "macro_f1": macro_f1,
        "roc_auc": full["roc_auc"],
        "recall": recall,
        "count": full["count"],
    }


def score_sites(predictions: dict) -> dict:
    """{site: {"labels", "probs"}} -> {"pooled": metrics, "sites": {site: metrics}, "worst_site": name}:
    pooled = all sites' test images together; worst hospital = lowest balanced accuracy."""
    sites = {site: headline_metrics(p["labels"], p["probs"]) for site, p in predictions.items()}
    labels = [y for p in predictions.values() for y in p["labels"]]
    probs = [q for p in predictions.values() for q in p["probs"]]
    worst = min(sites, key=lambda s: sites[s]["balanced_accuracy"])
    return {"pooled": headline_metrics(labels, probs), "sites": sites, "worst_site": worst}


def mean_std(values) -> dict:
    """Mean and sample standard deviation (ddof 1) of the values that are not None; std None for fewer than 2."""
    values = [float(v) for v in values if v is not None]
    if not values:
        return {"mean": None, "std": None, "n": 0}
    return {
        "mean": float(np.mean(values)),
        "std": float(np.std(values, ddof=1)) if len(values) > 1 else None,
        "n": len(values),
    }


def summarize_method(per_seed: dict) -> dict:
    """{seed: score_sites result} -> mean +- std over seeds of every pooled and per-site metric and of
    the worst site."""
    scores = list(per_seed.values())
    sites = list(scores[0]["sites"]) if scores else []
    num_classes = len(scores[0]["pooled"].get("recall", [])) if scores else 0
    return {
        "pooled": {m: mean_std(s["pooled"][m] for s in scores) for m in METRICS},
        "pooled_recall": [mean_std(s["pooled"]["recall"][c] for s in scores) for c in range(num_classes)],
        "sites": {site: {m: mean_std(s["sites"][site][m] for s in scores) for m in METRICS} for site in sites},
        "worst_site": {
            "balanced_accuracy": mean_std(s["sites"][s["worst_site"]]["balanced_accuracy"] for s in scores),
            "sites": [s["worst_site"] for s in scores],
        },
        # every hospital counts once, whatever its test split's size (pooled scores favour the large ones)
        "hospital_mean": {"balanced_accuracy": mean_std(hospital_mean(s) for s in scores)},
    }


def hospital_mean(scores: dict) -> float:
    """The mean of the per-hospital balanced accuracies of one score_sites result: every hospital counts once,
    whatever its split's size (pooled scores favour the large ones)."""
    return float(np.mean([site["balanced_accuracy"] for site in scores["sites"].values()]))


def curve_band(curves: list) -> dict:
    """Per-seed curves (lists, None where a round has no value) -> mean, min and max per round."""
    length = max((len(c) for c in curves), default=0)
    columns = [[c[i] for c in curves if i < len(c) and c[i] is not None] for i in range(length)]
    return {
        key: [float(f(col)) if col else None for col in columns]
        for key, f in (("mean", np.mean), ("min", np.min), ("max", np.max))
    }
