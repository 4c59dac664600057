"""What a site returns about a model's predictions on its own test split (jobs/fedxvit_evaluate): counts and
probability histograms, and on request bootstrap replicates of its confusion counts. No image, file name or
per-image value; the server adds the answers up (fedxvit.evaluation)."""

from __future__ import annotations

import zlib

import numpy as np

from fedxvit.protocol import SCORE_BINS


def confusion(labels, predicted, num_classes: int) -> np.ndarray:
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (np.asarray(labels, dtype=int), np.asarray(predicted, dtype=int)), 1)
    return matrix


def site_aggregates(labels, probs, class_names, bins: int = SCORE_BINS) -> dict:
    """What a site returns for one model: counts and histograms only."""
    labels, probs = np.asarray(labels, dtype=int), np.asarray(probs, dtype=np.float64).reshape(len(labels), -1)
    k = len(class_names)
    histograms = {}
    for c, name in enumerate(class_names):
        edges = np.linspace(0.0, 1.0, bins + 1)
        histograms[name] = {
            "positive": np.histogram(probs[labels == c, c], bins=edges)[0].tolist(),
            "negative": np.histogram(probs[labels != c, c], bins=edges)[0].tolist(),
        }
    return {
        "class_names": list(class_names),
        "confusion": confusion(labels, probs.argmax(1), k).tolist(),
        "score_histograms": histograms,
    }


def bootstrap_confusions(labels, predicted, num_classes: int, seed: int, site: str, replicates: int) -> list:
    """`replicates` confusion matrices of the site's images resampled within each true class. The resample
    depends on (seed, site, labels) only, never on the model, so every model a site scores gets the same draws."""
    labels, predicted = np.asarray(labels, dtype=int), np.asarray(predicted, dtype=int)
    rng = np.random.default_rng([int(seed), zlib.crc32(site.encode())])
    groups = [np.flatnonzero(labels == c) for c in range(num_classes)]
    draws = []
    for _ in range(replicates):
        chosen = np.concatenate([rng.choice(g, size=len(g), replace=True) for g in groups if len(g)])
        draws.append(confusion(labels[chosen], predicted[chosen], num_classes).tolist())
    return draws
