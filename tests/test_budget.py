"""result_stat.budget: where FedAvg's validation curve flattens decides every comparison's rounds x epochs."""

import json

import pytest

from fedxvit.errors import FedXViTError
from result_stat import budget, compare


def test_a_curve_has_flattened_once_it_stays_near_its_best():
    assert budget.flattened([0.5, 0.7, 0.79, 0.805, 0.81, 0.808], tolerance=0.01) == 3
    assert budget.flattened([0.5, 0.6, 0.7, 0.8], tolerance=0.01) == 3  # still rising: every round counts
    assert budget.flattened([0.5, 0.8, 0.6, 0.8], tolerance=0.01) == 3  # a dip after the first peak is not flat
    assert budget.flattened([0.8, 0.8, 0.8], tolerance=0.01) == 1  # at least one round
    with pytest.raises(FedXViTError, match="empty"):
        budget.flattened([None, None])


def test_the_cheapest_setting_that_reaches_the_best_wins():
    curves = {
        1: [0.5, 0.6, 0.7, 0.75, 0.8, 0.82, 0.83, 0.83, 0.83],  # flat from round 6
        2: [0.5, 0.7, 0.8, 0.83, 0.83],  # flat from round 3: 3 x 2
        4: [0.5, 0.78, 0.79],  # fewest rounds, but its best is 4 points short
    }
    chosen = budget.choose_budget(curves, tolerance=0.01, window_passes=1)  # each round judged on its own
    assert (chosen["rounds"], chosen["local_epochs"], chosen["passes"]) == (3, 2, 6)
    assert chosen["per_setting"][4] == {"rounds": 1, "best": 0.79, "settled": True, "rounds_averaged": 1}
    assert chosen["fedavg_improved_on_start"] and chosen["flattened"]


def test_a_lucky_round_on_a_noisy_curve_does_not_pick_the_budget():
    assert budget.smoothed([0.5, 0.6, 0.8, 0.7], 2) == pytest.approx([0.5, 0.6, 0.7, 0.75])  # the start stays apart
    # FedAvg on the skewed calibration data (2026-12-05 trial, 24 passes): the 2-epoch curve swings by 8 points and
    # ends on a spike; judged round by round, that spike alone makes it the best and costs 12 rounds
    curves = {
        2: [0.683, 0.655, 0.677, 0.681, 0.665, 0.671, 0.698, 0.748, 0.746, 0.679, 0.696, 0.692, 0.748],
        4: [0.683, 0.653, 0.655, 0.663, 0.690, 0.683, 0.722],
        8: [0.683, 0.661, 0.687, 0.720],
    }
    raw = budget.choose_budget(curves, tolerance=0.01, window_passes=1)
    assert (raw["rounds"], raw["local_epochs"]) == (12, 2)
    judged = budget.choose_budget(curves, tolerance=0.01)  # each curve averaged over 8 passes: the largest setting
    assert judged["window_passes"] == 8
    assert {e: row["rounds_averaged"] for e, row in judged["per_setting"].items()} == {2: 4, 4: 2, 8: 1}
    assert judged["per_setting"][2]["best"] == pytest.approx((0.698 + 0.748 + 0.746 + 0.679) / 4)  # rounds 7-10
    assert (judged["rounds"], judged["local_epochs"]) == (3, 8) and not judged["flattened"]


def test_a_curve_near_its_best_only_in_its_last_round_is_not_called_flat():
    rising = budget.choose_budget({2: [0.58, 0.59, 0.63, 0.64, 0.65, 0.67, 0.69]}, tolerance=0.01)
    assert (rising["rounds"], rising["local_epochs"]) == (6, 2)  # every pass measured
    assert not rising["per_setting"][2]["settled"] and not rising["flattened"]
    dipping = budget.choose_budget({1: [0.68, 0.65, 0.74, 0.71, 0.70]}, tolerance=0.01)  # best, then a drop
    assert dipping["rounds"] == 4 and not dipping["flattened"]
    said = budget.what_fedavg_did(rising)  # what the comparison's report says of its budget
    assert "did not settle near its best" in said and "all 12 passes measured" in said
    flat = budget.choose_budget({2: [0.5, 0.7, 0.8, 0.8, 0.8]}, tolerance=0.01)
    assert budget.what_fedavg_did(flat) == "FedAvg's validation curve flattened there"
    never = budget.choose_budget({4: [0.63, 0.61, 0.59, 0.59]}, tolerance=0.01)
    assert "never rose above the start" in budget.what_fedavg_did(never)
    # a budget.json from before these fields: its stored curves say what FedAvg did
    older = {"rounds": 3, "local_epochs": 4, "curves": {"4": [0.63, 0.61, 0.59, 0.59]}, "tolerance": 0.01}
    assert "never rose above the start" in budget.what_fedavg_did(older)
    older = {"rounds": 6, "local_epochs": 2, "curves": {"2": [0.58, 0.59, 0.63, 0.64, 0.65, 0.67, 0.69]}}
    assert "did not settle" in budget.what_fedavg_did(older)


def test_curves_that_never_rise_above_the_start_take_every_pass_and_say_so():
    flat = budget.choose_budget({1: [0.63, 0.61, 0.60, 0.62, 0.61], 2: [0.63, 0.60, 0.59]}, tolerance=0.01)
    assert (flat["rounds"], flat["local_epochs"], flat["passes"]) == (2, 2, 4)
    assert not flat["fedavg_improved_on_start"]


def test_compare_reads_the_budget_and_refuses_a_bad_one(tmp_path):
    good = tmp_path / "budget.json"
    good.write_text(json.dumps({"rounds": 4, "local_epochs": 2}))
    assert budget.read_budget(good)["rounds"] == 4 and budget.read_budget(good)["freeze_policy"] is None
    good.write_text(json.dumps({"rounds": 4, "local_epochs": 2, "freeze_policy": "full"}))
    assert budget.read_budget(good)["freeze_policy"] == "full"
    (tmp_path / "odd.json").write_text(json.dumps({"rounds": 4, "local_epochs": 2, "freeze_policy": "all"}))
    with pytest.raises(FedXViTError, match="odd.json: freeze_policy 'all' is not one of head, last-k, full"):
        budget.read_budget(tmp_path / "odd.json")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(FedXViTError, match="bad.json: not a budget file"):
        budget.read_budget(tmp_path / "bad.json")
    with pytest.raises(FedXViTError, match="nowhere.json does not exist"):
        budget.read_budget(tmp_path / "nowhere.json")
    with pytest.raises(FedXViTError, match="--budget sets the rounds and local epochs"):
        compare.main(["--budget", str(good), "--rounds", "3", "--scenario-data", str(tmp_path)])
