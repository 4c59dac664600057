"""Robust aggregation: norm screening, mean / median / trimmed mean, and the round's participation record."""

import numpy as np
import pytest
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.fl_constant import ReservedKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.aggregators.collect_and_assemble_aggregator import CollectAndAssembleAggregator
from nvflare.app_common.app_constant import AppConstants

from fedxvit.aggregation import (
    AGGREGATION_REPORT,
    ScreenedAssembler,
    bound_weights,
    clamp_mas_factors,
    combine_updates,
    reported_steps,
    screen_updates,
    trim_count,
    update_norm,
)
from fedxvit.errors import FedXViTError
from fedxvit.protocol import MAS_FACTOR, MAS_PRIOR, server_round_metrics
from fedxvit.widgets import NO_RESULT, format_round, round_participation, weighted_global_metrics


def honest(scale: float = 1.0, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "head.weight": (scale * rng.normal(0, 0.01, (2, 4))).astype(np.float32),
        "head.bias": (scale * rng.normal(0, 0.01, 2)).astype(np.float32),
    }


def test_update_norm_is_the_l2_norm_over_all_tensors():
    assert update_norm({"a": np.array([3.0]), "b": np.array([[4.0]])}) == pytest.approx(5.0)


def test_screening_drops_an_absurd_update_and_keeps_honest_spread():
    updates = {"site1": honest(1, 1), "site2": honest(3, 2), "site3": honest(1e6, 3)}
    kept, rejected = screen_updates(updates, norm_k=10)
    assert kept == ["site1", "site2"] and set(rejected) == {"site3"}
    assert "median of the other sites'" in rejected["site3"] and "limit 10x" in rejected["site3"]
    # with two sites the leave-one-out median still finds the outlier, and never drops both
    kept, rejected = screen_updates({"a": honest(1), "b": honest(1e6)}, 10)
    assert kept == ["a"] and list(rejected) == ["b"]
    assert screen_updates(updates, norm_k=0) == (["site1", "site2", "site3"], {})  # screening off


def test_mean_is_fedavg_weighted_by_steps():
    a, b = {"w": np.array([1.0, 2.0])}, {"w": np.array([4.0, 8.0])}
    combined = combine_updates({"a": a, "b": b}, {"a": 1, "b": 3}, "mean")
    np.testing.assert_allclose(combined["w"], [(1 + 12) / 4, (2 + 24) / 4])
    assert combined["w"].dtype == np.float32


def test_median_and_trimmed_mean_ignore_one_extreme_site():
    updates = {"a": {"w": np.array([1.0, -1.0])}, "b": {"w": np.array([2.0, -2.0])}, "c": {"w": np.array([1e6, 1e6])}}
    np.testing.assert_allclose(combine_updates(updates, {}, "median")["w"], [2.0, -1.0])
    np.testing.assert_allclose(combine_updates(updates, {}, "trimmed_mean", trim_fraction=0.2)["w"], [2.0, -1.0])
    mean = combine_updates(updates, {}, "mean")["w"]
    assert mean[0] > 1e5, "the plain mean is dominated by the extreme site (why the robust options exist)"
    five = {s: {"w": np.array([v])} for s, v in zip("abcde", [1.0, 2.0, 3.0, 4.0, 100.0])}
    np.testing.assert_allclose(combine_updates(five, {}, "trimmed_mean", trim_fraction=0.2)["w"], [3.0])


def test_trim_count_keeps_at_least_one_value():
    assert [trim_count(n, 0.2) for n in (1, 2, 3, 5, 10)] == [0, 0, 1, 1, 2]
    assert trim_count(10, 0.0) == 0


def test_a_tensor_only_some_sites_sent_is_combined_over_those():
    combined = combine_updates({"a": {"w": np.ones(2), "x": np.ones(1)}, "b": {"w": 3 * np.ones(2)}}, {}, "median")
    np.testing.assert_allclose(combined["w"], [2, 2])
    np.testing.assert_allclose(combined["x"], [1])


def test_bad_options_fail_with_one_line():
    with pytest.raises(FedXViTError, match="aggregation='mode' is unknown"):
        ScreenedAssembler(aggregation="mode")
    with pytest.raises(FedXViTError, match="norm_k=0.5"):
        ScreenedAssembler(norm_k=0.5)
    for bad in (0.5, -1, float("nan"), float("inf")):
        with pytest.raises(FedXViTError, match="max_weight_ratio="):
            ScreenedAssembler(max_weight_ratio=bad)


class FakeEngine:
    def __init__(self, components):
        self.components = components

    def get_component(self, name):
        return self.components.get(name)

    def fire_event(self, event_type, fl_ctx):
        pass


def contribution(site: str, update: dict, steps: int, round_number: int = 0) -> Shareable:
    shareable = DXO(DataKind.WEIGHT_DIFF, update, meta={MetaKey.NUM_STEPS_CURRENT_ROUND: steps}).to_shareable()
    peer = FLContext()
    peer.set_prop(ReservedKey.IDENTITY_NAME, site, private=False, sticky=False)
    shareable.set_peer_props(peer.get_all_public_props())
    shareable.add_cookie(AppConstants.CONTRIBUTION_ROUND, round_number)
    return shareable


def test_stock_collect_and_assemble_aggregator_with_the_screened_assembler():
    assembler = ScreenedAssembler(aggregation="mean", norm_k=10)
    aggregator = CollectAndAssembleAggregator(assembler_id="assembler")
    fl_ctx = FLContext()
    fl_ctx.set_prop(ReservedKey.ENGINE, FakeEngine({"assembler": assembler}), private=True, sticky=False)
    fl_ctx.set_prop(AppConstants.CURRENT_ROUND, 0, private=True, sticky=False)
    updates = {"site1": honest(1, 1), "site2": honest(1, 2), "site3": honest(1e6, 3)}
    for steps, (site, update) in enumerate(updates.items(), start=1):
        assert aggregator.accept(contribution(site, update, steps), fl_ctx)
    assert not aggregator.accept(contribution("site1", honest(), 1), fl_ctx), "one update per site and round"
    assert not aggregator.accept(contribution("site4", honest(), 1, round_number=5), fl_ctx), "late update refused"
    result = from_shareable(aggregator.aggregate(fl_ctx))
    assert result.data_kind == DataKind.WEIGHT_DIFF
    expected = combine_updates({s: updates[s] for s in ("site1", "site2")}, {"site1": 1, "site2": 2}, "mean")
    for name in expected:
        np.testing.assert_allclose(result.data[name], expected[name], rtol=1e-6)
    report = fl_ctx.get_prop(AGGREGATION_REPORT)
    assert report["aggregated"] == ["site1", "site2"] and list(report["rejected"]) == ["site3"]
    assert assembler.collection == {}, "the next round starts empty"


def test_round_participation_names_every_dropped_site_and_why():
    taking_part = round_participation(
        expected=["site1", "site2", "site3", "site4", "site5"],
        accepted=["site1", "site2", "site3"],
        failures={"site4": "the site returned EXECUTION_EXCEPTION"},
        report={"aggregated": ["site1", "site2"], "rejected": {"site3": "update norm 1e+06 is ..."}},
    )
    assert taking_part == {
        "aggregated": ["site1", "site2"],
        "dropped": {
            "site3": "update norm 1e+06 is ...",
            "site4": "the site returned EXECUTION_EXCEPTION",
            "site5": NO_RESULT,
        },
    }
    # without the robust aggregator's report the accepted sites are the aggregated ones
    assert round_participation(["a", "b"], ["a"], {})["aggregated"] == ["a"]
    # a late result of an earlier round does not mark a site dropped once its own update arrived
    assert round_participation(["a"], ["a"], {"a": "late"}) == {"aggregated": ["a"], "dropped": {}}


def test_round_row_is_logged_and_tracked_with_who_took_part():
    sites = {
        "site1": {"val_accuracy": 1.0, "val_loss": 0.1, "val_count": 3},
        "site2": {"val_accuracy": 0.5, "val_loss": 0.9, "val_count": 1},
    }
    pooled = weighted_global_metrics(sites)
    assert pooled["global_val_accuracy"] == pytest.approx((3 * 1.0 + 1 * 0.5) / 4)
    assert pooled["global_val_loss"] == pytest.approx((3 * 0.1 + 1 * 0.9) / 4)
    row = {"round": 2, **pooled, "aggregated_sites": ["site1", "site2"], "dropped_sites": {"site3": NO_RESULT}}
    line = format_round(row)
    assert line.startswith("round 2: global_val_accuracy=0.8750") and "aggregated site1, site2" in line
    assert f"dropped site3: {NO_RESULT}" in line
    metrics = server_round_metrics(row)
    assert (metrics["aggregated.site1"], metrics["aggregated.site2"], metrics["aggregated.site3"]) == (1.0, 1.0, 0.0)
    assert metrics["clients_per_round"] == 2


# ---- no site sets its own share of the mean


def test_a_weight_over_the_bound_of_the_other_sites_median_is_clipped():
    weights, clipped = bound_weights({"a": 10, "b": 20, "liar": 1e9}, max_ratio=4)
    assert weights == {"a": 10, "b": 20, "liar": 60}  # 4 x median(10, 20)
    assert list(clipped) == ["liar"] and "over 4x the median of the other sites' (15)" in clipped["liar"]
    # honest spread within the ratio is left alone (the largest, 30, is 2x the median of the others)
    assert bound_weights({"a": 10, "b": 20, "c": 30}, 4) == ({"a": 10, "b": 20, "c": 30}, {})
    assert bound_weights({"a": 1, "liar": 1e9}, 0) == ({"a": 1, "liar": 1e9}, {})  # bound off
    assert bound_weights({"alone": 1e9}, 4) == ({"alone": 1e9}, {})
    assert bound_weights({"a": 0.0, "b": 0.0, "c": 0.5}, 4) == ({"a": 0.0, "b": 0.0, "c": 0.5}, {})  # weightless


def test_reported_steps_that_are_not_a_positive_finite_number_drop_the_site():
    assert reported_steps(12) == (12.0, None)
    assert reported_steps(None) == (1.0, None) and reported_steps(0) == (1.0, None)  # as before: weight 1
    for bad in (-5, float("nan"), float("inf"), "many", True):
        weight, reason = reported_steps(bad)
        assert weight is None and "not a positive finite number" in reason, bad


def test_mas_factors_are_clamped_to_their_range():
    factors, reasons = clamp_mas_factors({"a": 0.3, "b": 7.0, "c": -2.0, "d": None})
    assert factors == {"a": 0.3, "b": 1.0, "c": 0.0, "d": None}
    assert set(reasons) == {"b", "c"} and "outside its range [0, 1]; clamped to 1" in reasons["b"]


def run_assembler(assembler, contributions: dict) -> tuple[dict, dict]:
    """assembler.assemble over {site: DXO} as NVFlare's CollectAndAssembleAggregator calls it: (result, report)."""
    fl_ctx = FLContext()
    fl_ctx.set_prop(AppConstants.CURRENT_ROUND, 0, private=True, sticky=False)
    result = assembler.assemble({site: assembler.get_model_params(d) for site, d in contributions.items()}, fl_ctx)
    return result, fl_ctx.get_prop(AGGREGATION_REPORT)


def test_a_site_claiming_a_billion_steps_gets_the_bounds_share_and_no_more():
    honest_update = {"w": np.array([1.0, 1.0], np.float32)}
    turned = {"w": np.array([-1.0, -1.0], np.float32)}  # honest size, wrong direction
    contributions = {
        "site1": DXO(DataKind.WEIGHT_DIFF, honest_update, meta={MetaKey.NUM_STEPS_CURRENT_ROUND: 10}),
        "site2": DXO(DataKind.WEIGHT_DIFF, honest_update, meta={MetaKey.NUM_STEPS_CURRENT_ROUND: 10}),
        "site3": DXO(DataKind.WEIGHT_DIFF, honest_update, meta={MetaKey.NUM_STEPS_CURRENT_ROUND: 10}),
        "liar": DXO(DataKind.WEIGHT_DIFF, turned, meta={MetaKey.NUM_STEPS_CURRENT_ROUND: 10**9}),
    }
    result, report = run_assembler(ScreenedAssembler(max_weight_ratio=2), contributions)
    # weighed as 2 x 10 steps against 3 x 10: share 2 / (2 + 3), exactly
    assert report["weights"] == pytest.approx({"site1": 0.2, "site2": 0.2, "site3": 0.2, "liar": 0.4})
    np.testing.assert_allclose(result.data["w"], 0.6 - 0.4, rtol=1e-6)
    assert report["aggregated"] == ["liar", "site1", "site2", "site3"] and list(report["clipped"]) == ["liar"]
    assert report["clipped"]["liar"].startswith("steps 1e+09 is over 2x the median of the other sites' (10)")
    # a negative count would turn the liar's update round in the mean: it is dropped instead
    contributions["liar"] = DXO(DataKind.WEIGHT_DIFF, turned, meta={MetaKey.NUM_STEPS_CURRENT_ROUND: -30})
    result, report = run_assembler(ScreenedAssembler(), contributions)
    assert "liar" in report["rejected"] and report["aggregated"] == ["site1", "site2", "site3"]
    np.testing.assert_allclose(result.data["w"], 1.0, rtol=1e-6)


def test_a_mas_factor_out_of_range_is_clamped_then_bounded():
    def mas(factor):
        meta = {MAS_FACTOR: factor, MAS_PRIOR: "f" * 64, MetaKey.NUM_STEPS_CURRENT_ROUND: 3}
        return DXO(DataKind.WEIGHT_DIFF, {"w": np.ones(1, np.float32)}, meta=meta)

    contributions = {"site1": mas(0.2), "site2": mas(0.2), "site3": mas(0.3), "liar": mas(1e9)}
    _, report = run_assembler(ScreenedAssembler(weighting="mas", max_weight_ratio=4), contributions)
    # clamped to 1, then 4 x median(0.2, 0.2, 0.3) = 0.8: share 0.8 / (0.2 + 0.2 + 0.3 + 0.8)
    assert report["weights"]["liar"] == pytest.approx(0.8 / 1.5)
    assert report["weights"]["site3"] == pytest.approx(0.3 / 1.5)
    assert "clamped to 1" in report["clipped"]["liar"] and "over 4x the median" in report["clipped"]["liar"]


def test_scaffold_and_fedsm_assemblers_bound_the_steps_too():
    from nvflare.app_common.app_constant import AlgorithmConstants

    from fedxvit.fedsm import PERSONALIZED, SELECTOR
    from fedxvit.server_algorithms import FedSMAssembler, ScaffoldScreenedAssembler

    def collection(value: float, steps: int, second: str, second_data: dict):
        data = {
            AppConstants.MODEL_WEIGHTS: DXO(DataKind.WEIGHT_DIFF, {"w": np.full(2, value, np.float32)}),
            second: DXO(DataKind.COLLECTION if second == SELECTOR else DataKind.WEIGHT_DIFF, second_data),
        }
        return DXO(DataKind.COLLECTION, data, meta={MetaKey.NUM_STEPS_CURRENT_ROUND: steps})

    small = {"w": np.full(2, 0.1, np.float32)}
    scaffold = {
        site: collection(v, steps, AlgorithmConstants.SCAFFOLD_CTRL_DIFF, small)
        for site, v, steps in (("site1", 1.0, 5), ("site2", 1.0, 5), ("liar", -1.0, 10**9))
    }
    result, report = run_assembler(ScaffoldScreenedAssembler(max_weight_ratio=3), scaffold)
    assert report["weights"] == pytest.approx({"site1": 0.2, "site2": 0.2, "liar": 0.6})  # 3 x 5 against 5 + 5
    np.testing.assert_allclose(result.data[AppConstants.MODEL_WEIGHTS].data["w"], 0.4 - 0.6, rtol=1e-6)

    fedsm_parts = {"weights": small, "exp_avg": small, "exp_avg_sq": small, "step": 1}
    fedsm = {}
    for site, v, steps in (("site1", 1.0, 5), ("site2", 1.0, 5), ("liar", -1.0, 10**9)):
        fedsm[site] = collection(v, steps, SELECTOR, fedsm_parts)
        fedsm[site].data[PERSONALIZED] = DXO(DataKind.WEIGHT_DIFF, small)
    result, report = run_assembler(FedSMAssembler(max_weight_ratio=3), fedsm)
    assert report["weights"] == pytest.approx({"site1": 0.2, "site2": 0.2, "liar": 0.6})
    np.testing.assert_allclose(result.data[AppConstants.MODEL_WEIGHTS].data["w"], 0.4 - 0.6, rtol=1e-6)
    assert "liar" in report["clipped"]
