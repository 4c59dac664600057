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

AGGREGATIONS = ("mean", "median", "trimmed_mean")
WEIGHTINGS = ("steps", "mas")
# FLContext prop: {"aggregated": [...], "rejected": {site: reason}, "weights": {site: share of the mean}}
AGGREGATION_REPORT = "fedxvit.aggregation_report"
MAS_FACTOR, MAS_PRIOR = "mas_factor", "mas_prior_sha256"  # what fedxvit.executor puts in a train result's meta


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
    the mean weighted by steps or by MAS factors."""

    def __init__(
        self,
        aggregation: str = "mean",
        norm_k: float = 10.0,
        trim_fraction: float = 0.2,
        weighting: str = "steps",
        data_kind: str = DataKind.WEIGHT_DIFF,
    ):
        super().__init__(data_kind=data_kind)
        if aggregation not in AGGREGATIONS:
            raise FedXViTError(
                f"job option aggregation='{aggregation}' is unknown; choose one of {', '.join(AGGREGATIONS)}"
            )
        if 0 < float(norm_k) < 1:
            raise FedXViTError(f"job option norm_k={norm_k}: use 0 (no screening) or a factor >= 1")
        if weighting not in WEIGHTINGS:
            raise FedXViTError(f"job option weighting='{weighting}' is unknown; choose one of {', '.join(WEIGHTINGS)}")
        if weighting == "mas" and aggregation != "mean":
            raise FedXViTError(f"job option weighting='mas' weighs a mean; aggregation='{aggregation}' has no weights")
        self.aggregation = aggregation
        self.weighting = weighting
        self.norm_k = float(norm_k)
        self.trim_fraction = float(trim_fraction)

    def get_model_params(self, dxo: DXO) -> dict:
        return {
            "update": dxo.data,
            "weight": float(dxo.get_meta_prop(MetaKey.NUM_STEPS_CURRENT_ROUND, 1) or 1),
            MAS_FACTOR: dxo.get_meta_prop(MAS_FACTOR),
            MAS_PRIOR: dxo.get_meta_prop(MAS_PRIOR),
        }

    def assemble(self, data: Dict[str, dict], fl_ctx: FLContext) -> DXO:
        updates = {site: entry["update"] for site, entry in data.items()}
        kept, rejected = screen_updates(updates, self.norm_k)
        weights = {s: data[s]["weight"] for s in kept}
        if self.weighting == "mas" and kept:
            kept, unmeasured = screen_mas({s: data[s][MAS_FACTOR] for s in kept}, {s: data[s][MAS_PRIOR] for s in kept})
            rejected.update(unmeasured)
            weights = mas_weights({s: data[s][MAS_FACTOR] for s in kept})
        round_number = fl_ctx.get_prop(AppConstants.CURRENT_ROUND)
        for site, reason in rejected.items():
            self.log_warning(fl_ctx, f"fedxvit: round {round_number}: dropped the update of {site}: {reason}")
        if self.aggregation == "mean" and kept:
            total = sum(weights[s] for s in kept) or 1.0
            weights = {s: weights[s] / total for s in kept}
            self.log_info(
                fl_ctx,
                f"fedxvit: round {round_number}: {self.weighting} weights "
                + ", ".join(f"{s} {w:.3f}" for s, w in weights.items()),
            )
        report = {"aggregated": kept, "rejected": rejected}
        if self.aggregation == "mean":
            report["weights"] = {s: weights[s] for s in kept}
        fl_ctx.set_prop(AGGREGATION_REPORT, report, private=True, sticky=False)
        if not kept:  # nothing collected (e.g. every result came late): keep the global model as it is
            self.log_error(fl_ctx, f"fedxvit: round {round_number}: no update to aggregate; the global model stays")
            return DXO(data_kind=self.expected_data_kind, data={})
        combined = combine_updates({s: updates[s] for s in kept}, weights, self.aggregation, self.trim_fraction)
        return DXO(data_kind=self.expected_data_kind, data=combined)
