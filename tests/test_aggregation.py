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
    combine_updates,
    screen_updates,
    trim_count,
    update_norm,
)
from fedxvit.errors import FedXViTError
from fedxvit.tracking import server_round_metrics
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
