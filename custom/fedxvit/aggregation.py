"""Robust aggregation of the sites' weight differences: screen each round's updates, then combine.

A finite but absurd update (every difference x10^6, a site that diverged or is poisoned)
passes the per-update filter and would dominate a plain average. Screening compares each
update's L2 norm with the median norm of the round's *other* updates (leave-one-out, so it
works from two sites up) and drops the update when it is more than `norm_k` times larger.
The survivors are combined by

- `mean`: FedAvg, weighted by each site's optimizer steps (NVFlare's WeightedAggregationHelper,
  the same arithmetic as the stock InTimeAccumulateWeightedAggregator);
- `median`: coordinate-wise median (unweighted), which no single site can move arbitrarily;
- `trimmed_mean`: per coordinate, the `ceil(trim_fraction x n)` largest and smallest values
  are dropped (never so many that nothing is left) and the rest averaged.

`weighting` picks what a site's update weighs in `mean`: `steps` (FedAvg) or `mas`, the MAS factor
each site reports from its measurement against the shared self-supervised prior (FedMAS,
fedxvit.imbalance); a site without a factor, or that measured with another prior file than the
round's majority, is dropped from that round with the reason.

Both weights are the site's own report, so no site may set its own share: a step count that is not a
positive finite number drops the update, a MAS factor is clamped to its valid range [0, 1], and any
weight over `max_weight_ratio` x the median of the round's *other* sites' weights (leave-one-out, as
the norm screen) is clipped to that (`bound_weights`). One site alone then holds at most
r / (r + n - 1) of a mean over n sites whose weights are equal (r = `max_weight_ratio`); sites that lie
together can still raise each other's median.

The plain functions (`update_norm`, `screen_updates`, `combine_updates`) carry the logic; the
NVFlare shell is an `Assembler` for NVFlare's stock `CollectAndAssembleAggregator`, which
collects one update per site and round. It leaves the round's decision in the FLContext
(`AGGREGATION_REPORT`) for the global-validation widget, which logs and tracks it.
"""

from __future__ import annotations

import math
from typing import Dict

import numpy as np
from nvflare.apis.dxo import DXO, DataKind, MetaKey
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.aggregators.assembler import Assembler
from nvflare.app_common.aggregators.weighted_aggregation_helper import WeightedAggregationHelper
from nvflare.app_common.app_constant import AppConstants

from fedxvit.errors import FedXViTError
from fedxvit.imbalance import mas_weights
from fedxvit.protocol import MAS_FACTOR, MAS_PRIOR

AGGREGATIONS = ("mean", "median", "trimmed_mean")
WEIGHTINGS = ("steps", "mas")
# FLContext prop: {"aggregated": [...], "rejected": {site: reason}, "clipped": {site: reason},
# "weights": {site: share of the mean}}
AGGREGATION_REPORT = "fedxvit.aggregation_report"
MAS_FACTOR_RANGE = (0.0, 1.0)  # a dot product of two distributions over the classes (fedxvit.imbalance.mas_factor)


def _as_float_array(value) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().numpy()
    return np.asarray(value, dtype=np.float64)


def update_norm(update: dict) -> float:
    """L2 norm of all tensors of one update taken together."""
    return math.sqrt(sum(float(np.square(_as_float_array(v)).sum()) for v in update.values()))


def screen_updates(updates: Dict[str, dict], norm_k: float) -> tuple[list[str], dict]:
    """(kept sites, {rejected site: reason}): a site whose update norm exceeds `norm_k` x the median
    norm of the other sites' updates is rejected. `norm_k <= 0` or a lone update disables screening.
    With `norm_k >= 1` the smallest update always survives, so a round never loses every site."""
    sites = sorted(updates)
    norms = {site: update_norm(updates[site]) for site in sites}
    if norm_k <= 0 or len(sites) < 2:
        return sites, {}
    rejected = {}
    for site in sites:
        others = float(np.median([norms[s] for s in sites if s != site]))
        if norms[site] > norm_k * others:
            ratio = norms[site] / others if others > 0 else math.inf
            rejected[site] = (
                f"update norm {norms[site]:.4g} is {ratio:.3g}x the median of the other sites' "
                f"({others:.4g}); limit {norm_k:g}x"
            )
    return [s for s in sites if s not in rejected], rejected


def screen_mas(factors: Dict[str, float | None], priors: Dict[str, str | None]) -> tuple[list[str], dict]:
    """(kept sites, {rejected site: reason}) for MAS weighting: a site must report a factor, measured with
    the prior file most sites of the round used (by SHA-256; the first in name order breaks a tie)."""
    hashes = [priors[s] for s in sorted(priors) if priors[s]]
    majority = max(hashes, key=hashes.count) if hashes else None
    rejected = {}
    for site in sorted(factors):
        if factors[site] is None or not priors.get(site):
            rejected[site] = "reported no MAS factor (run the job's client config: mas_prior set)"
        elif priors[site] != majority:
            rejected[site] = f"measured with another MAS prior ({priors[site][:12]}, the round's is {majority[:12]})"
    return [s for s in sorted(factors) if s not in rejected], rejected


def reported_steps(value) -> tuple[float | None, str | None]:
    """(weight, None) from a site's NUM_STEPS_CURRENT_ROUND, or (None, reason) when it is not a positive finite
    number (a negative count would flip the site's update in the mean). Missing or 0: weight 1, as before."""
    if value is None or value == 0:
        return 1.0, None
    try:
        steps = float(value)
    except (TypeError, ValueError):
        steps = math.nan
    if not math.isfinite(steps) or steps < 0 or isinstance(value, bool):
        return None, f"reported {str(value)[:40]!r} steps: not a positive finite number"
    return steps, None


def clamp_mas_factors(factors: Dict[str, float]) -> tuple[dict, dict]:
    """({site: factor within MAS_FACTOR_RANGE}, {clamped site: reason}); a value that is not a finite number
    stays as it is (fedxvit.imbalance.mas_weights gives it no weight)."""
    low, high = MAS_FACTOR_RANGE
    clamped, reasons = {}, {}
    for site, factor in factors.items():
        try:
            value = float(factor)
        except (TypeError, ValueError):
            value = math.nan
        clamped[site] = min(max(value, low), high) if math.isfinite(value) else factor
        if math.isfinite(value) and clamped[site] != value:
            reasons[site] = (
                f"MAS factor {value:.4g} is outside its range [{low:g}, {high:g}]; clamped to {clamped[site]:g}"
            )
    return clamped, reasons


def bound_weights(weights: Dict[str, float], max_ratio: float, label: str = "steps") -> tuple[dict, dict]:
    """({site: weight}, {clipped site: reason}): a weight over `max_ratio` x the median of the other sites'
    weights is clipped to that, so no site raises its own share alone. `max_ratio <= 0` or a lone site:
    nothing is clipped; nor is a site whose others' median is 0 (weightless: nothing to compare with).
    The medians are of the weights as reported, so clipping one site moves no other's bound."""
    sites = sorted(weights)
    if max_ratio <= 0 or len(sites) < 2:
        return dict(weights), {}
    bounded, clipped = dict(weights), {}
    for site in sites:
        others = float(np.median([weights[s] for s in sites if s != site]))
        limit = max_ratio * others
        if others > 0 and weights[site] > limit:
            bounded[site] = limit
            clipped[site] = (
                f"{label} {weights[site]:.4g} is over {max_ratio:g}x the median of the other sites' "
                f"({others:.4g}); weighed as {limit:.4g}"
            )
    return bounded, clipped


def shares(weights: Dict[str, float]) -> dict:
    """Weights scaled to sum to one (every site the same when they sum to 0)."""
    total = sum(weights.values())
    return {s: (w / total if total > 0 else 1.0 / len(weights)) for s, w in weights.items()}


def trim_count(n: int, trim_fraction: float) -> int:
    """Values dropped from each end per coordinate: ceil(fraction x n), at most (n - 1) // 2."""
    return min(math.ceil(trim_fraction * n), (n - 1) // 2) if trim_fraction > 0 else 0


def combine_updates(
    updates: Dict[str, dict], weights: Dict[str, float], method: str = "mean", trim_fraction: float = 0.2
) -> dict:
    """One update from several: {name: float32 array}. A tensor only some sites sent is combined over those."""
    if method not in AGGREGATIONS:
        raise FedXViTError(f"aggregation '{method}' is unknown; choose one of {', '.join(AGGREGATIONS)}")
    if not updates:
        raise FedXViTError("no update to aggregate")
    if method == "mean":
        helper = WeightedAggregationHelper()
        for site, update in updates.items():
            helper.add({k: _as_float_array(v) for k, v in update.items()}, float(weights.get(site, 1.0)), site, None)
        return {k: np.asarray(v, dtype=np.float32) for k, v in helper.get_result().items()}
    combined = {}
    for name in sorted({k for update in updates.values() for k in update}):
        stack = np.stack([_as_float_array(u[name]) for u in updates.values() if name in u])
        if method == "median":
            combined[name] = np.median(stack, axis=0)
        else:
            cut = trim_count(len(stack), trim_fraction)
            ordered = np.sort(stack, axis=0)
            combined[name] = ordered[cut : len(stack) - cut].mean(axis=0)
        combined[name] = combined[name].astype(np.float32)
    return combined


class ScreenedAssembler(Assembler):
    """Assembler for NVFlare's CollectAndAssembleAggregator: norm screening, then mean / median / trimmed mean,
    the mean weighted by steps or by MAS factors, each bounded (bound_weights)."""

    def __init__(
        self,
        aggregation: str = "mean",
        norm_k: float = 10.0,
        trim_fraction: float = 0.2,
        weighting: str = "steps",
        data_kind: str = DataKind.WEIGHT_DIFF,
        max_weight_ratio: float = 4.0,
    ):
        super().__init__(data_kind=data_kind)
        if aggregation not in AGGREGATIONS:
            raise FedXViTError(
                f"job option aggregation='{aggregation}' is unknown; choose one of {', '.join(AGGREGATIONS)}"
            )
        if 0 < float(norm_k) < 1:
            raise FedXViTError(f"job option norm_k={norm_k}: use 0 (no screening) or a factor >= 1")
        if not (float(max_weight_ratio) == 0 or 1 <= float(max_weight_ratio) < math.inf):
            raise FedXViTError(f"job option max_weight_ratio={max_weight_ratio}: use 0 (no bound) or a factor >= 1")
        if weighting not in WEIGHTINGS:
            raise FedXViTError(f"job option weighting='{weighting}' is unknown; choose one of {', '.join(WEIGHTINGS)}")
        if weighting == "mas" and aggregation != "mean":
            raise FedXViTError(f"job option weighting='mas' weighs a mean; aggregation='{aggregation}' has no weights")
        self.aggregation = aggregation
        self.weighting = weighting
        self.norm_k = float(norm_k)
        self.trim_fraction = float(trim_fraction)
        self.max_weight_ratio = float(max_weight_ratio)

    def get_model_params(self, dxo: DXO) -> dict:
        return {
            "update": dxo.data,
            "steps": dxo.get_meta_prop(MetaKey.NUM_STEPS_CURRENT_ROUND),
            MAS_FACTOR: dxo.get_meta_prop(MAS_FACTOR),
            MAS_PRIOR: dxo.get_meta_prop(MAS_PRIOR),
        }

    def site_weights(self, data: Dict[str, dict], kept: list) -> tuple[list, dict, dict, dict]:
        """(kept sites, {site: share of the mean}, {dropped site: reason}, {clipped site: reason}) of the sites
        that passed screening: the reported steps or MAS factors, checked and bounded, as shares."""
        rejected, clipped = {}, {}
        if self.weighting == "mas":
            kept, rejected = screen_mas({s: data[s][MAS_FACTOR] for s in kept}, {s: data[s][MAS_PRIOR] for s in kept})
            factors, clipped = clamp_mas_factors({s: data[s][MAS_FACTOR] for s in kept})
            weights = mas_weights(factors)
            label = "MAS weight"
        else:
            weights = {}
            for site in kept:
                weights[site], reason = reported_steps(data[site].get("steps"))
                if reason:
                    rejected[site] = reason
            kept = [s for s in kept if s not in rejected]
            weights = {s: weights[s] for s in kept}
            label = "steps"
        weights, over = bound_weights(weights, self.max_weight_ratio, label)
        for site, reason in over.items():
            clipped[site] = f"{clipped[site]}; {reason}" if site in clipped else reason
        return kept, shares(weights) if kept else {}, rejected, clipped

    def decide(self, data: Dict[str, dict], kept: list, rejected: dict, fl_ctx: FLContext) -> tuple[list, dict]:
        """(aggregated sites, {site: share} for a mean) after screening: weighs the survivors (site_weights), logs
        every drop and clip and leaves the round's AGGREGATION_REPORT for the global-validation widget."""
        rejected, weights, clipped = dict(rejected), {}, {}
        if self.aggregation == "mean" and kept:
            kept, weights, dropped, clipped = self.site_weights(data, kept)
            rejected.update(dropped)
        round_number = fl_ctx.get_prop(AppConstants.CURRENT_ROUND)
        for site, reason in rejected.items():
            self.log_warning(fl_ctx, f"fedxvit: round {round_number}: dropped the update of {site}: {reason}")
        for site, reason in clipped.items():
            self.log_warning(fl_ctx, f"fedxvit: round {round_number}: clipped the weight of {site}: {reason}")
        if weights:
            self.log_info(
                fl_ctx,
                f"fedxvit: round {round_number}: {self.weighting} weights "
                + ", ".join(f"{s} {w:.3f}" for s, w in weights.items()),
            )
        report = {"aggregated": kept, "rejected": rejected, "clipped": clipped}
        if self.aggregation == "mean":
            report["weights"] = weights
        fl_ctx.set_prop(AGGREGATION_REPORT, report, private=True, sticky=False)
        if not kept:  # nothing collected (e.g. every result came late): keep the global model as it is
            self.log_error(fl_ctx, f"fedxvit: round {round_number}: no update to aggregate; the global model stays")
        return kept, weights

    def assemble(self, data: Dict[str, dict], fl_ctx: FLContext) -> DXO:
        updates = {site: entry["update"] for site, entry in data.items()}
        kept, weights = self.decide(data, *screen_updates(updates, self.norm_k), fl_ctx)
        if not kept:
            return DXO(data_kind=self.expected_data_kind, data={})
        combined = combine_updates({s: updates[s] for s in kept}, weights, self.aggregation, self.trim_fraction)
        return DXO(data_kind=self.expected_data_kind, data=combined)
