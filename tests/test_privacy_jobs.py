"""The privacy jobs' filters, exactly as each job configures them, on a real site update: every one
really changes what leaves the site (and only that: the update the executor made stays as it was)."""

import copy
import importlib
import json
import re

import numpy as np
import pytest
import torch
from nvflare.apis.dxo import MetaKey, from_shareable
from nvflare.apis.fl_context import FLContext
from tiny import REPO, SITES, simulate, tiny_job, tiny_sites_and_initial_model

from fedxvit.executor import train_result, trainable_weight_diff
from fedxvit.jobs import CLIENT, PRIVACY_JOBS
from fedxvit.model import build_model
from fedxvit.tracking import FEDERATED_EXPERIMENT, ROLE_TAG, SITE_TAG
from fedxvit.training import apply_freeze_policy

STEPS = 4  # local steps of the update; the filters clip per step


def configured_filter(job: str):
    """The job's `train` result filter, built from its client config with the job's variable values."""
    config = json.loads((REPO / "jobs" / job / CLIENT).read_text())
    (chain,) = config["task_result_filters"]
    assert chain["tasks"] == ["train"]  # validation and model submission are never filtered
    (spec,) = chain["filters"]
    module, name = spec["path"].rsplit(".", 1)
    assert module.startswith("nvflare."), spec["path"]  # NVFlare's own filter, not ours
    args = {key: config[value.strip("{}")] for key, value in spec["args"].items()}
    return getattr(importlib.import_module(module), name)(**args), args


@pytest.fixture(scope="module")
def site_update():
    """A WEIGHT_DIFF of the tiny model's trainable tensors (last-k), ~0.01 per step: PercentilePrivacy's clip."""
    torch.manual_seed(0)
    model = build_model("tiny", num_classes=2)
    trainable = apply_freeze_policy(model, "last-k", last_k=1)
    old = {k: v.clone() for k, v in model.state_dict().items()}
    new = {
        k: v + 1e-2 * STEPS * torch.randn_like(v.float()).to(v.dtype) if k in trainable else v for k, v in old.items()
    }
    return trainable_weight_diff(new, old, trainable)


def filtered(job: str, update: dict) -> tuple[dict, dict]:
    privacy_filter, args = configured_filter(job)
    sent = train_result(copy.deepcopy(update), {MetaKey.NUM_STEPS_CURRENT_ROUND: STEPS}).to_shareable()
    return from_shareable(privacy_filter.process(sent, FLContext())).data, args


FILTER_JOBS = ("fedxvit_percentile_privacy", "fedxvit_svt_privacy", "fedxvit_exclude_vars")


def test_every_privacy_job_is_tracked_as_such_and_the_filter_jobs_use_a_stock_nvflare_filter():
    assert set(PRIVACY_JOBS) == {*FILTER_JOBS, "fedxvit_dp_sgd", "fedxvit_he"}
    client = json.loads((REPO / "jobs" / "fedxvit_dp_sgd" / CLIENT).read_text())
    assert client["task_result_filters"] == [] and client["dp_epsilon"] > 0  # DP-SGD works inside training
    for job in PRIVACY_JOBS:
        if job in FILTER_JOBS:
            configured_filter(job)
        server = json.loads((REPO / "jobs" / job / "app" / "config" / "config_fed_server.json").read_text())
        (receiver,) = [c for c in server["components"] if c["id"] == "mlflow_receiver"]
        assert receiver["args"]["params"]["privacy"]  # the tracked run says which filter protected it


def test_percentile_privacy_sends_only_the_largest_changes_clipped(site_update):
    before = copy.deepcopy(site_update)
    sent, args = filtered("fedxvit_percentile_privacy", site_update)
    assert set(sent) == set(site_update)
    values = np.concatenate([np.ravel(v) for v in sent.values()])
    share = np.mean(values != 0)
    assert 0.05 < share <= 1 - args["percentile"] / 100 + 0.01, share  # the largest 10% travel
    original = np.concatenate([np.ravel(site_update[k]) for k in sent])
    limit = args["gamma"] * STEPS  # each change clipped to gamma per local step
    assert np.abs(original).max() > limit and np.isclose(np.abs(values).max(), limit)
    assert all(np.array_equal(before[k], site_update[k]) for k in before)  # the site's own update is untouched


def test_svt_privacy_sends_a_sparse_noisy_update(site_update):
    sent, args = filtered("fedxvit_svt_privacy", site_update)
    assert set(sent) == set(site_update)
    values = np.concatenate([np.ravel(v) for v in sent.values()])
    original = np.concatenate([np.ravel(site_update[k]) for k in sent])
    assert np.mean(values != 0) <= args["fraction"] + 0.01  # at most the chosen fraction is uploaded
    assert not np.allclose(values[values != 0], original[values != 0])  # and what is uploaded is noised


def test_exclude_vars_keeps_the_head_at_the_site(site_update):
    assert any(k.startswith("head.") for k in site_update)
    sent, _ = filtered("fedxvit_exclude_vars", site_update)
    assert sent and not any(k.startswith("head.") for k in sent)
    assert all(np.array_equal(sent[k], site_update[k]) for k in sent)  # the rest travels unchanged


@pytest.mark.slow
def test_dp_sgd_with_the_head_kept_home_runs_in_the_simulator(tmp_path):
    """One simulator run for both kinds of privacy: the DP-SGD job, with the exclude-vars job's filter
    added (a combination a user may configure). Each site reports its epsilon; ExcludeVars, the one
    filter that changes the update's shape (tensors go missing), passes NVFlare's aggregation, the
    update filter and cross-site evaluation, and the global head never moves."""
    initial = tiny_sites_and_initial_model(tmp_path)
    job = tiny_job(tmp_path, REPO / "jobs" / "fedxvit_dp_sgd")
    exclude = json.loads((REPO / "jobs" / "fedxvit_exclude_vars" / CLIENT).read_text())
    client = json.loads((job / CLIENT).read_text())
    client["exclude_vars"], client["task_result_filters"] = exclude["exclude_vars"], exclude["task_result_filters"]
    (job / CLIENT).write_text(json.dumps(client))
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_dir, log = simulate(job, tmp_path / "workspace", tmp_path / "data", initial, SITES[:2], store)
    assert "rejected" not in log
    start = torch.load(initial, weights_only=True)
    final = torch.load(run_dir / "app_server" / "FL_global_model.pt", weights_only=True)["model"]
    moved = {k.split(".")[0] for k in start if not torch.equal(torch.as_tensor(final[k]), start[k])}
    assert moved == {"blocks", "norm"}  # last-k trained blocks and norm; the head stayed home
    assert (run_dir / "cross_site_val" / "cross_val_results.json").is_file()

    spent = {
        (site, int(r)): float(eps)
        for site, r, eps in re.findall(r"fedxvit (site\d) round (\d): .*DP-SGD epsilon (\S+) of 8 spent", log)
    }
    assert sorted(spent) == [(s, r) for s in SITES[:2] for r in (0, 1)], log[-3000:]
    assert all(0 < spent[(s, 0)] < spent[(s, 1)] <= 8.0 for s in SITES[:2])  # 2 planned rounds spend the budget
    rounds = json.loads((run_dir / "global_val.json").read_text())["rounds"]
    assert all(r["aggregated_sites"] == list(SITES[:2]) for r in rounds)
    import mlflow

    client = mlflow.MlflowClient(store)
    runs = client.search_runs([client.get_experiment_by_name(FEDERATED_EXPERIMENT).experiment_id])
    tracked = {
        r.data.tags.get(SITE_TAG): r.data.metrics.get("dp_epsilon") for r in runs if r.data.tags[ROLE_TAG] == "site"
    }
    assert tracked == {s: pytest.approx(spent[(s, 1)], rel=1e-3) for s in SITES[:2]}  # the last round's total
