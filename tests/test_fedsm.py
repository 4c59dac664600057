"""FedSM (fedxvit.fedsm, jobs/fedxvit_fedsm): SoftPull aggregation of the personalized models, the
selector's averaged Adam moments, routing, and one real simulator run."""

import json
import re

import numpy as np
import pytest
import torch
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.fl_constant import ReservedKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import make_copy
from nvflare.app_common.app_constant import AppConstants
from tiny import REPO, SITES, simulate, tiny_job, tiny_site_training, tiny_sites_and_initial_model

from fedxvit.aggregation import AGGREGATION_REPORT
from fedxvit.algorithms import FedSMSite
from fedxvit.checkpoint import load_global_model
from fedxvit.errors import FedXViTError
from fedxvit.fedsm import (
    MODELS_FILE,
    PERSONALIZED,
    SELECTOR,
    adam_moments,
    build_selector,
    load_adam_moments,
    route,
    trainable_arrays,
)
from fedxvit.fedsm import (
    SITES as SITES_META,
)
from fedxvit.model import build_model
from fedxvit.server_algorithms import (
    FedSMAssembler,
    FedSMSiteModels,
    personalized_after_round,
    selector_after_round,
    softpull,
    softpull_weights,
)
from fedxvit.training import make_optimizer
from result_stat.comparison.runs import Scenario, fedsm_super_model

CPU = torch.device("cpu")


def test_softpull_gives_each_site_its_own_weight_lambda_and_shares_the_rest():
    weights = softpull_weights(["a", "b", "c"], 0.4)
    assert weights["a"] == {"a": 0.4, "b": 0.3, "c": 0.3} and all(
        abs(sum(r.values()) - 1) < 1e-12 for r in weights.values()
    )
    states = {s: {"w": np.full(2, v, dtype=np.float32)} for s, v in (("a", 1.0), ("b", 2.0), ("c", 4.0))}
    pulled = softpull(states, 0.4)
    np.testing.assert_allclose(pulled["a"]["w"], 0.4 * 1 + 0.3 * 2 + 0.3 * 4)
    np.testing.assert_allclose(pulled["c"]["w"], 0.4 * 4 + 0.3 * 1 + 0.3 * 2)
    assert softpull({"a": states["a"]}, 0.4)["a"]["w"].tolist() == [1.0, 1.0]
    with pytest.raises(FedXViTError, match="softpull_lambda=1.5"):
        softpull_weights(["a"], 1.5)


def test_threshold_one_is_the_global_model_exactly_and_a_missing_model_falls_back_to_it():
    selector = np.array([[0.9, 0.1], [0.2, 0.8], [1.0, 0.0]])
    global_probs = np.array([[0.6, 0.4], [0.3, 0.7], [0.5, 0.5]])
    personal = {0: np.array([[1.0, 0.0]] * 3), 1: np.array([[0.0, 1.0]] * 3)}
    only_global = route(selector, 1.0, personal, global_probs)
    assert np.array_equal(only_global["probs"], global_probs) and (only_global["routes"] == -1).all()
    routed = route(selector, 0.5, personal, global_probs)
    assert routed["routes"].tolist() == [0, 1, 0] and routed["probs"].tolist() == [[1, 0], [0, 1], [1, 0]]
    without_site1 = route(selector, 0.5, {0: personal[0]}, global_probs)
    assert without_site1["routes"].tolist() == [0, -1, 0] and without_site1["probs"][1].tolist() == [0.3, 0.7]


def site_result(steps, diff, personal, selector):
    parts = {
        AppConstants.MODEL_WEIGHTS: DXO(DataKind.WEIGHT_DIFF, diff),
        PERSONALIZED: DXO(DataKind.WEIGHT_DIFF, personal),
        SELECTOR: DXO(DataKind.COLLECTION, selector),
    }
    return DXO(DataKind.COLLECTION, parts, meta={MetaKey.NUM_STEPS_CURRENT_ROUND: steps})


def full(value):
    return np.full(2, value, dtype=np.float32)


def selector_difference(v, steps):
    return {
        "weights": {"h": full(v)},
        "exp_avg": {"h": full(v / 100)},
        "exp_avg_sq": {"h": full(v / 1000)},
        "step": steps,
    }


def test_the_assembler_averages_the_selector_differences_and_passes_each_sites_personalized_difference():
    assembler = FedSMAssembler()
    fl_ctx = FLContext()
    fl_ctx.set_prop(AppConstants.CURRENT_ROUND, 0, private=True, sticky=False)
    values = {"site1": 1.0, "site2": 3.0, "site3": float("nan")}
    data = {
        site: assembler.get_model_params(
            site_result(steps, {"w": full(v / 10)}, {"w": full(v)}, selector_difference(v, steps))
        )
        for steps, (site, v) in enumerate(values.items(), start=1)
    }
    out = assembler.assemble(data, fl_ctx).data
    assert fl_ctx.get_prop(AGGREGATION_REPORT)["rejected"]["site3"].startswith("personalized: w: holds NaN")
    np.testing.assert_allclose(out[AppConstants.MODEL_WEIGHTS].data["w"], (1 * 0.1 + 2 * 0.3) / 3, rtol=1e-6)
    assert out[PERSONALIZED].data_kind == DataKind.WEIGHT_DIFF
    assert {k: v.tolist() for k, v in out[PERSONALIZED].data.items()} == {"site1/w": [1.0, 1.0], "site2/w": [3.0, 3.0]}
    selector = out[SELECTOR].data  # every site started from the same selector: the mean difference
    np.testing.assert_allclose(selector["weights"]["h"], 2.0)
    np.testing.assert_allclose(selector["exp_avg"]["h"], 0.02)
    np.testing.assert_allclose(selector["exp_avg_sq"]["h"], 0.002)
    assert selector["step"] == 2


def test_the_server_rebuilds_each_personalized_model_from_its_own_start_and_soft_pulls_with_the_weights():
    """site1 started from its last aggregate, site2 (its first round) from the round's global model."""
    global_start = {"w": full(10.0), "frozen": full(7.0)}
    last = {"site1": {"w": full(20.0)}}
    differences = {"site1": {"w": full(1.0)}, "site2": {"w": full(-2.0)}}  # trained: 21 and 8
    pulled = personalized_after_round(last, global_start, differences, 0.5)
    assert set(pulled) == {"site1", "site2"} and set(pulled["site1"]) == {"w"}  # trainable tensors only
    np.testing.assert_allclose(pulled["site1"]["w"], 0.5 * 21 + 0.5 * 8)
    lopsided = personalized_after_round(last, global_start, differences, 0.8)  # the similarity weights decide
    np.testing.assert_allclose(lopsided["site1"]["w"], 0.8 * 21 + 0.2 * 8)
    np.testing.assert_allclose(lopsided["site2"]["w"], 0.8 * 8 + 0.2 * 21)
    with pytest.raises(FedXViTError, match="a difference for other has no starting tensor"):
        personalized_after_round(last, global_start, {"site1": {"other": full(1.0)}}, 0.5)


def test_the_server_starts_from_the_selector_every_site_built_and_adds_the_mean_differences(tiny_site_dir):
    global_state = build_model("tiny", 2).state_dict()
    site_start = build_selector(tiny_site_training(tiny_site_dir).new_model, global_state, 3)
    trainable = trainable_arrays(site_start)
    assert "head.weight" in trainable and len(trainable) < len(site_start.state_dict())
    start = {k: v.numpy() for k, v in global_state.items()}
    no_change = {
        "weights": {k: np.zeros_like(v) for k, v in trainable.items()},
        "exp_avg": {k: np.zeros_like(v) for k, v in trainable.items()},
        "exp_avg_sq": {k: np.zeros_like(v) for k, v in trainable.items()},
        "step": 4,
    }
    first = selector_after_round({}, start, no_change, 3)
    assert set(first["weights"]) == set(trainable) and first["step"] == 4
    assert all(np.array_equal(first["weights"][k], trainable[k]) for k in trainable)  # the very same start
    moved = {**no_change, "exp_avg": {k: np.ones_like(v) for k, v in trainable.items()}}
    second = selector_after_round(first, start, moved, 3)
    assert all(np.array_equal(second["weights"][k], first["weights"][k]) for k in trainable)
    assert all(np.all(second["exp_avg"][k] == 1.0) for k in trainable)
    third = selector_after_round(second, start, moved, 3)
    assert all(np.all(third["exp_avg"][k] == 2.0) for k in trainable)  # moments accumulate from the last ones


def test_each_site_receives_only_its_own_personalized_model_from_the_one_broadcast_task():
    """NVFlare hands every site a shallow copy of the same task (make_copy): filtering one site's copy must not
    strip the task of the sites that ask after it."""
    task = DXO(
        DataKind.COLLECTION,
        {
            AppConstants.MODEL_WEIGHTS: DXO(DataKind.WEIGHTS, {"w": np.zeros(1)}),
            PERSONALIZED: DXO(DataKind.WEIGHTS, {"site1/w": np.ones(1), "site2/w": np.full(1, 2.0)}),
        },
    ).to_shareable()
    task.set_header(AppConstants.CURRENT_ROUND, 3)
    received = {}
    for site in ("site2", "site1", "site3"):
        fl_ctx, peer = FLContext(), FLContext()
        peer.set_prop(ReservedKey.IDENTITY_NAME, site, private=False, sticky=False)
        fl_ctx.set_peer_context(peer)
        sent = FedSMSiteModels().process(make_copy(task), fl_ctx)
        assert sent.get_header(AppConstants.CURRENT_ROUND) == 3
        received[site] = from_shareable(sent).data[PERSONALIZED].data
    assert received == {"site2": {"w": np.full(1, 2.0)}, "site1": {"w": np.ones(1)}, "site3": {}}
    assert set(from_shareable(task).data[PERSONALIZED].data) == {"site1/w", "site2/w"}  # the task is unchanged


def selector_after_one_round(site_dir, moments: dict) -> dict:
    """The selector a site sends after one round that received `moments` (and no selector weights yet)."""
    torch.manual_seed(0)
    site = tiny_site_training(site_dir)
    strategy = FedSMSite()
    strategy.attach(site)
    selector_part = DXO(DataKind.COLLECTION, {"weights": {}, **moments}, meta={SITES_META: ["site0", "site1"]})
    strategy.receive({PERSONALIZED: DXO(DataKind.WEIGHTS, {}), SELECTOR: selector_part}, "site1")
    model = site.new_model()
    strategy.start_round(model, make_optimizer(model, 1e-2))
    assert strategy.finish_round() == {}
    assert strategy.parts()[PERSONALIZED].data_kind == DataKind.WEIGHT_DIFF  # differences travel, not models
    return strategy.parts()[SELECTOR].data


def test_the_selector_trains_from_the_averaged_adam_moments_it_received(tiny_site_dir):
    model = build_selector(tiny_site_training(tiny_site_dir).new_model, build_model("tiny", 2).state_dict(), 2)
    optimizer = make_optimizer(model, 1e-2)
    fresh = adam_moments(model, optimizer)
    assert fresh["step"] == 0
    received = {
        "exp_avg": {k: np.full_like(v, 0.05) for k, v in fresh["exp_avg"].items()},
        "exp_avg_sq": {k: np.full_like(v, 1e-4) for k, v in fresh["exp_avg_sq"].items()},
        "step": 7,
    }
    load_adam_moments(model, optimizer, received)
    loaded = adam_moments(model, optimizer)
    assert loaded["step"] == 7 and all(np.allclose(loaded["exp_avg"][k], 0.05) for k in received["exp_avg"])

    with_moments = selector_after_one_round(tiny_site_dir, received)
    without = selector_after_one_round(tiny_site_dir, {**fresh, "step": 0})
    assert with_moments["step"] > 7  # the received step count went on
    # the change of the moments travels (Adam updates its state in place: a start that aliased it would send 0)
    assert max(float(np.abs(v).max()) for v in with_moments["exp_avg"].values()) > 0
    assert all(np.all(v == 0.05) for v in received["exp_avg"].values())  # what was received stays as received
    moved = max(float(np.abs(with_moments["weights"][k] - without["weights"][k]).max()) for k in without["weights"])
    assert moved > 1e-4, "the received moments must change how the selector trains"


def test_a_fedsm_site_needs_fedsms_server():
    strategy = FedSMSite()
    with pytest.raises(FedXViTError, match="jobs/fedxvit_fedsm"):
        strategy.start_round(build_model("tiny", 2), None)
    with pytest.raises(FedXViTError, match="site9 is not among"):
        part = DXO(DataKind.COLLECTION, {}, meta={SITES_META: ["site1"]})
        strategy.receive({SELECTOR: part}, "site9")


@pytest.mark.slow
def test_fedsm_in_the_simulator_personalizes_each_site_and_routes(tmp_path, monkeypatch):
    initial = tiny_sites_and_initial_model(tmp_path)
    job = tiny_job(tmp_path, job_dir=REPO / "jobs" / "fedxvit_fedsm", num_rounds=2)
    run_dir, log = simulate(job, tmp_path / "workspace", tmp_path / "data", initial)
    assert "Round 1 finished." in log, log[-4000:]
    server_log = (run_dir.parent / "log.txt").read_text() if (run_dir.parent / "log.txt").is_file() else log
    assert "soft-pulled (own weight 0.3)" in server_log
    for site in SITES:  # round 0 from the global model, round 1 from the aggregate the server sent this very site
        assert re.search(rf"{site} round 0: .*fedsm: personalized \(from the global model\)", log), site
        assert re.search(rf"{site} round 1: .*fedsm: personalized \(from its aggregate\)", log), site

    saved = torch.load(run_dir / "app_server" / MODELS_FILE, weights_only=True)
    assert saved["sites"] == list(SITES) and set(saved["personalized"]) == set(SITES)
    global_state = torch.load(run_dir / "app_server" / "FL_global_model.pt", weights_only=True)["model"]
    personal = saved["personalized"]
    names = list(personal["site1"])
    assert names and set(names) <= set(global_state)  # trainable tensors only travelled

    def gap(a, b):
        return max(float((torch.as_tensor(a[k]) - torch.as_tensor(b[k])).abs().max()) for k in names)

    assert min(gap(personal[a], personal[b]) for a in SITES for b in SITES if a < b) > 0  # they diverge
    assert min(gap(personal[s], global_state) for s in SITES) > 0
    assert saved["selector"]["head.weight"].shape[0] == len(SITES)
    rounds = json.loads((run_dir / "global_val.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [0, 1] and all(r["num_sites"] == 3 for r in rounds)

    scenario = Scenario(tmp_path / "data", list(SITES), initial, "tiny", 32, "cpu")
    global_model = load_global_model(run_dir / "app_server" / "FL_global_model.pt", "tiny")
    super_model = fedsm_super_model(run_dir, scenario, global_model)
    assert super_model["missing_personalized"] == []
    assert abs(sum(super_model["routes"].values()) - 1) < 1e-9
    # threshold 1.0 routes nothing: exactly the global model's predictions
    from fedxvit.fedsm import load_fedsm_models, routed_predictions

    models = load_fedsm_models(run_dir / "app_server" / MODELS_FILE, global_model, "tiny")
    selector = scenario.predict(models["selector"], "test")
    named = [int(np.argmax(p)) == SITES.index(site) for site in SITES for p in selector[site]["probs"]]
    assert super_model["selector_test_accuracy"] == pytest.approx(sum(named) / len(named))  # the right hospital
    personal_preds = {s: scenario.predict(m, "test") for s, m in models["personalized"].items()}
    global_preds = scenario.predict(global_model, "test")
    routed, routes = routed_predictions(selector, personal_preds, global_preds, models["sites"], 1.0)
    assert routed == global_preds and all(r == -1 for rs in routes.values() for r in rs)
    routed_all, routes_all = routed_predictions(selector, personal_preds, global_preds, models["sites"], 0.0)
    assert all(r >= 0 for rs in routes_all.values() for r in rs)  # threshold 0: every image to a personalized model

    # the test report of the run shows the super-model beside the global model
    from result_stat.report import build_report

    monkeypatch.setenv("FEDXVIT_DATA_ROOT", str(tmp_path / "data"))
    rows = build_report(run_dir, list(SITES), initial, baselines=False, device="cpu")["comparison"]
    (row,) = [r for r in rows if r["model"].startswith("FedSM super-model (threshold ")]
    routed = [
        (int(np.argmax(p)), y)
        for site in SITES
        for p, y in zip(super_model["test"][site]["probs"], super_model["test"][site]["labels"])
    ]
    assert "chosen on validation" in row["model"]
    assert row["test_accuracy"] == pytest.approx(sum(p == y for p, y in routed) / len(routed))  # the super-model's
