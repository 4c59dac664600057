"""Tuning on validation, never on test: each method with a grid (plan.TUNING_GRIDS) runs once per value
set with the comparison's first seed and budget, and the value set whose final model scores best on the
sites' VALIDATION splits is chosen — by the method's primary statistic (pooled balanced accuracy; the
mean of hospitals for a method whose sites keep personalized models). A tie keeps the earlier value set
(the job's defaults come first). The evaluation runs then use the chosen values; the run of the first
seed at those values is the tuning run itself, reused."""

from __future__ import annotations

import numpy as np

from result_stat.comparison.scores import PRIMARY_METRIC, hospital_mean, score_sites


def tuning_score(result: dict) -> float:
    """The primary statistic of one finished run on its validation predictions."""
    if result.get("personalized_validation"):
        return hospital_mean(score_sites(result["personalized_validation"]))
    return float(score_sites(result["validation"])["pooled"][PRIMARY_METRIC])


def choose(grid: list, results: list) -> dict:
    """{"grid", "validation_scores", "chosen"}: the value set whose run (results[i], or None if it failed) scores
    best on validation; failed runs score nothing and are never chosen."""
    scores = [tuning_score(r) if r is not None else None for r in results]
    ranked = [i for i in range(len(grid)) if scores[i] is not None and np.isfinite(scores[i])]
    if not ranked:
        return {"grid": grid, "validation_scores": scores, "chosen": None}
    best = max(ranked, key=lambda i: (scores[i], -i))
    return {"grid": grid, "validation_scores": scores, "chosen": grid[best]}
