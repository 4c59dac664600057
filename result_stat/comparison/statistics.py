"""Paired differences a reviewer accepts: a hierarchical bootstrap, Holm-adjusted p-values and verdicts.

Every difference of a comparison (each method vs FedAvg, FedAvg vs centralized) is a difference of
two models scored on the same test images, trained with the same seeds. Its uncertainty has two
sources: which training seeds were drawn and which test images. `Resampler` draws both, once per
report, and every difference is computed on the same draws (paired): per replicate the seeds are
resampled with replacement, and the test images within each (hospital, class) stratum, so every
hospital keeps its size and class mix. Images and seeds are crossed (every seed's model scores the
same images), so one image draw serves every seed of a replicate.

Verdicts (`verdicts`): *better* / *worse* when the Holm-adjusted p-value over the report's family
of differences is below ALPHA; *equivalent* when the 95% interval lies inside +-MARGIN; otherwise
*inconclusive*.
"""

from __future__ import annotations

import numpy as np

from fedxvit.errors import FedXViTError

ALPHA = 0.05
MARGIN = 0.02  # the declared equivalence margin: 2 points of balanced accuracy
REPLICATES = 2000
CONFIDENCE = 0.95
POOLED, HOSPITAL_MEAN = "pooled", "hospital_mean"  # the two statistics: pooled balanced accuracy, mean of hospitals


class Resampler:
    """Bootstrap draws for one report's test images (per site: their labels, in the order every method's
    predictions list them) and training seeds. `replicates` draws; `rng_seed` fixes them."""

    def __init__(self, labels: dict, seeds: list, replicates: int = REPLICATES, rng_seed: int = 0):
        if len(set(seeds)) != len(seeds):
            raise FedXViTError(f"seeds {seeds}: each training seed may appear once")
        self.sites, self.seeds = list(labels), list(seeds)
        self.labels = {site: np.asarray(values, dtype=int) for site, values in labels.items()}
        rng = np.random.default_rng(rng_seed)
        strata = [(site, c) for site in self.sites for c in sorted(set(self.labels[site].tolist()))]
        self.strata = strata
        self.stratum_size = np.array([int((self.labels[s] == c).sum()) for s, c in strata], dtype=float)
        # per replicate, how often each image of each stratum is drawn (a multinomial count per stratum)
        counts = []
        for site, c in strata:
            n = int((self.labels[site] == c).sum())
            counts.append(rng.multinomial(n, np.full(n, 1.0 / n), size=replicates))
        self.image_weights = [np.asarray(w, dtype=np.float32) for w in counts]
        k = len(self.seeds)
        self.seed_weights = rng.multinomial(k, np.full(k, 1.0 / k), size=replicates) / k  # (replicates, seeds)
        self.replicates = replicates

    def _correct_by_stratum(self, per_site: dict, where: str) -> tuple[np.ndarray, np.ndarray]:
        """(observed correct count per stratum, the same per replicate) of one model's predictions."""
        observed, resampled = [], []
        index = 0
        for site in self.sites:
            if site not in per_site:
                raise FedXViTError(f"{where}: no predictions for site {site}")
            labels = np.asarray(per_site[site]["labels"], dtype=int)
            if labels.shape != self.labels[site].shape or (labels != self.labels[site]).any():
                raise FedXViTError(f"{where}: site {site}'s test labels differ from the reference's (not paired)")
            correct = (np.asarray(per_site[site]["probs"], dtype=float).argmax(1) == labels).astype(np.float32)
            for c in sorted(set(labels.tolist())):
                hits = correct[labels == c]
                observed.append(hits.sum())
                resampled.append(self.image_weights[index] @ hits)
                index += 1
        return np.asarray(observed, dtype=float), np.stack(resampled, axis=1).astype(float)

    def _statistic(self, correct: np.ndarray, statistic: str) -> np.ndarray:
        """Balanced accuracy (pooled, or the mean of hospitals) from correct counts per stratum (..., strata)."""
        if statistic == POOLED:
            classes = sorted({c for _, c in self.strata})
            recalls = [
                correct[..., [i for i, (_, k) in enumerate(self.strata) if k == c]].sum(-1)
                / self.stratum_size[[i for i, (_, k) in enumerate(self.strata) if k == c]].sum()
                for c in classes
            ]
            return np.mean(recalls, axis=0)
        if statistic == HOSPITAL_MEAN:
            per_site = []
            for site in self.sites:
                rows = [i for i, (s, _) in enumerate(self.strata) if s == site]
                per_site.append(np.mean([correct[..., i] / self.stratum_size[i] for i in rows], axis=0))
            return np.mean(per_site, axis=0)
        raise FedXViTError(f"statistic {statistic!r}: use {POOLED!r} or {HOSPITAL_MEAN!r}")

    def scores(self, per_seed: dict, statistic: str, name: str = "model") -> tuple[float, np.ndarray]:
        """(observed, replicates) of a model's statistic averaged over the seeds: per_seed is
        {seed: {site: {"labels", "probs"}}} over exactly this resampler's seeds."""
        missing = [s for s in self.seeds if s not in per_seed]
        if missing:
            raise FedXViTError(f"{name}: no predictions for seed(s) {missing}")
        observed, replicated = [], []
        for seed in self.seeds:
            counts, resampled = self._correct_by_stratum(per_seed[seed], f"{name} seed {seed}")
            observed.append(self._statistic(counts, statistic))
            replicated.append(self._statistic(resampled, statistic))
        return float(np.mean(observed)), (self.seed_weights * np.stack(replicated, axis=1)).sum(1)


def interval(replicates: np.ndarray, confidence: float = CONFIDENCE) -> tuple[float, float]:
    tail = (1 - confidence) / 2
    low, high = np.quantile(replicates, [tail, 1 - tail])
    return float(low), float(high)


def bootstrap_p(replicates: np.ndarray) -> float:
    """Two-sided bootstrap p-value of "no difference": twice the smaller share of replicates on either side
    of zero (each share counted with the observed data as one more replicate, so p is never 0)."""
    n = len(replicates)
    below = (np.count_nonzero(replicates <= 0) + 1) / (n + 1)
    above = (np.count_nonzero(replicates >= 0) + 1) / (n + 1)
    return float(min(1.0, 2 * min(below, above)))


def paired_difference(
    resampler: Resampler, method: dict, reference: dict, statistic: str, names=("method", "reference")
) -> dict:
    """method - reference on the resampler's seeds and images: the observed difference, its 95% interval,
    p-value and half-width, plus the replicates (for ratios of differences; not for the report file)."""
    a, a_rep = resampler.scores(method, statistic, names[0])
    b, b_rep = resampler.scores(reference, statistic, names[1])
    delta = a_rep - b_rep
    low, high = interval(delta)
    return {
        "statistic": statistic,
        "difference": a - b,
        "ci": [low, high],
        "half_width": (high - low) / 2,
        "p": bootstrap_p(delta),
        "seeds": resampler.seeds,
        "replicates": delta,
    }


def holm(p_values: dict) -> dict:
    """Holm's step-down adjustment of a family of p-values ({name: p} -> {name: adjusted p})."""
    ordered = sorted(p_values, key=lambda name: p_values[name])
    m, running, adjusted = len(ordered), 0.0, {}
    for rank, name in enumerate(ordered):
        running = max(running, min(1.0, (m - rank) * p_values[name]))
        adjusted[name] = running
    return adjusted


def verdict(difference: float, ci: list, adjusted_p: float, margin: float = MARGIN) -> str:
    if adjusted_p < ALPHA:
        return "better" if difference > 0 else "worse"
    if -margin <= ci[0] and ci[1] <= margin:
        return "equivalent"
    return "inconclusive"


def verdicts(differences: dict) -> dict:
    """Adds "p_adjusted" (Holm over the whole family) and "verdict" to each paired_difference result."""
    adjusted = holm({name: d["p"] for name, d in differences.items()})
    for name, d in differences.items():
        d["p_adjusted"] = adjusted[name]
        d["verdict"] = verdict(d["difference"], d["ci"], adjusted[name])
    return differences


def gap_share(method: dict, centralized: dict) -> dict:
    """The share of the FedAvg->centralized gap a method closes, (method - FedAvg) / (centralized - FedAvg),
    with a percentile interval from the same paired replicates; n/a unless the gap itself is significant
    (centralized's verdict against FedAvg is "better")."""
    if centralized.get("verdict") != "better":
        return {
            "status": "n/a",
            "why": f"the FedAvg->centralized gap is {centralized.get('verdict', 'not measured')}, not significant",
        }
    ratios = method["replicates"] / np.where(centralized["replicates"] == 0, np.nan, centralized["replicates"])
    ratios = ratios[np.isfinite(ratios)]
    low, high = interval(ratios) if ratios.size else (None, None)
    return {"status": "ok", "share": method["difference"] / centralized["difference"], "ci": [low, high]}


def without_replicates(difference: dict) -> dict:
    """A paired_difference result as the report stores it (JSON: no replicate array)."""
    return {k: v for k, v in difference.items() if k != "replicates"}
