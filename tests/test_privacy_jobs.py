"""The privacy jobs' filters, exactly as each job configures them, on a real site update: every one
really changes what leaves the site (and only that: the update the executor made stays as it was). One
simulator run records everything each site sends (sent_recorder) and checks it against its job's promise."""

import copy
import importlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from nvflare.apis.dxo import MetaKey, from_shareable
from nvflare.apis.fl_context import FLContext
from sent_recorder import add_recorder, read_sent
from tiny import REPO, simulate, site_apps_job, tiny_sites_and_initial_model

from fedxvit.executor import train_result, trainable_weight_diff
from fedxvit.model import build_model
from fedxvit.tracking import FEDERATED_EXPERIMENT, ROLE_TAG, SITE_TAG
from fedxvit.training import apply_freeze_policy
from tooling.jobconfig import CLIENT_FILE
from tooling.jobs import PRIVACY_JOBS

STEPS = 4  # local steps of the update; the filters clip per step


def configured_filter(job: str):
    """The job's `train` result filter, built from its client config with the job's variable values."""
    config = json.loads((REPO / "jobs" / job / CLIENT_FILE).read_text())
    (chain,) = [chain for chain in config["task_result_filters"] if "train" in chain["tasks"]]
    assert chain["tasks"] == ["train"]  # the update filter acts on updates only
    spec, policy = chain["filters"]  # then the site's metadata policy
    assert policy["path"] == "fedxvit.site_policy.MetadataPolicy"
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
    client = json.loads((REPO / "jobs" / "fedxvit_dp_sgd" / CLIENT_FILE).read_text())
    filters = [f["path"] for chain in client["task_result_filters"] for f in chain["filters"]]
    assert set(filters) == {"fedxvit.site_policy.MetadataPolicy"} and client["dp_epsilon"] > 0  # DP-SGD: in training
    for job in PRIVACY_JOBS:
        if job in FILTER_JOBS:
            configured_filter(job)
        server = json.loads((REPO / "jobs" / job / "app" / "config" / "config_fed_server.json").read_text())
        (receiver,) = [c for c in server["components"] if c["id"] == "mlflow_receiver"]
        assert receiver["args"]["params"]["privacy"]  # the tracked run says which filter protected it


def test_filter_and_he_jobs_collect_no_local_model_and_their_sites_never_send_one():
    """Cross-site evaluation would carry each site's best local model whole and in clear: the filter and HE
    jobs' servers do not ask for it, and their sites answer a server that asks anyway with an error reply.
    DP-SGD's local model is itself DP-trained, so that job keeps collecting it."""
    for job in (*FILTER_JOBS, "fedxvit_he", "fedxvit_dp_sgd"):
        server = json.loads((REPO / "jobs" / job / "app" / "config" / "config_fed_server.json").read_text())
        client = json.loads((REPO / "jobs" / job / CLIENT_FILE).read_text())
        (cross_site,) = [w for w in server["workflows"] if w["id"] == "cross_site_model_eval"]
        (submit,) = [chain["filters"] for chain in client["task_result_filters"] if "submit_model" in chain["tasks"]]
        assert client["may_leave"] == "aggregation"  # the privacy jobs' metadata default
        if job == "fedxvit_dp_sgd":
            assert "submit_model_task_name" not in cross_site["args"]
            assert [f["path"] for f in submit] == ["fedxvit.site_policy.MetadataPolicy"]
        else:
            assert cross_site["args"]["submit_model_task_name"] == "", job
            assert [f["path"] for f in submit] == ["fedxvit.site_policy.KeepLocalModel"], job


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


PROMISE_SITES = {  # one simulator run, each site a different privacy job's client app
    "site1": "fedxvit_percentile_privacy",
    "site2": "fedxvit_svt_privacy",
    "site3": "fedxvit_exclude_vars",  # with the DP-SGD job's training: both kinds of privacy in one site
}
FILTER_JOB_SITES = tuple(PROMISE_SITES)
DP_SITE = "site3"


def with_dp_sgd(client: dict) -> dict:
    """A client config that also trains with the DP-SGD job's options (variables and executor args)."""
    dp_client = json.loads((REPO / "jobs" / "fedxvit_dp_sgd" / CLIENT_FILE).read_text())
    options = {key: dp_client[key] for key in ("dp_epsilon", "dp_delta", "dp_max_grad_norm")}
    client.update(options)
    client["executors"][0]["executor"]["args"].update({key: "{" + key + "}" for key in options})
    return client


def per_site_job(tmp_path, server_job: str, site_jobs: dict, dp_site: str = "", jobs_dir: Path = REPO / "jobs") -> Path:
    """One tiny job whose server app is `server_job`'s and whose every site runs its own job's client app
    (`dp_site` with DP-SGD's training too), with sent_recorder.RecordSent witnessing what leaves it
    (NVFlare's deploy_map sends each app to its site)."""
    job = site_apps_job(
        tmp_path / "job", jobs_dir / server_job, {site: jobs_dir / name for site, name in site_jobs.items()}
    )
    for site in site_jobs:
        config = job / f"app_{site}" / "config"
        client = json.loads((config / "config_fed_client.json").read_text())
        if site == dp_site:
            client = with_dp_sgd(client)
        (config / "config_fed_client.json").write_text(json.dumps(add_recorder(client), indent=2))
    return job


def sent_summary(records: list[dict]) -> dict:
    """{task: {"results", "bytes", "tensors", "values", "nonzero"}} of what one site sent (weights of any part)."""
    summary = {}
    for row in records:
        task = summary.setdefault(row["task"], {"results": 0, "bytes": 0, "tensors": 0, "values": 0, "nonzero": 0})
        task["results"] += 1
        task["bytes"] += row["bytes"]
        for tensors in weight_tensors(row["dxo"]).values():
            task["tensors"] += 1
            task["values"] += tensors[0]
            task["nonzero"] += tensors[1]
    return summary


def weight_tensors(dxo: dict | None) -> dict:
    """{name: [values, non-zero]} of every tensor a recorded DXO carries, its parts' too."""
    if not dxo:
        return {}
    found = dict(dxo.get("tensors") or {})
    for part in (dxo.get("parts") or {}).values():
        found.update(weight_tensors(part))
    return found


@pytest.fixture(scope="module")
def promises_run(tmp_path_factory):
    """The three filter jobs' client apps (one with DP-SGD's training too) in one tiny run, 2 rounds; the server
    is plain FedAvg's, which asks every site for its local model: a privacy job keeps its promise regardless."""
    tmp_path = tmp_path_factory.mktemp("promises")
    initial = tiny_sites_and_initial_model(tmp_path)
    job = per_site_job(tmp_path, "fedxvit", PROMISE_SITES, DP_SITE)
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_dir, log = simulate(job, tmp_path / "workspace", tmp_path / "data", initial, tuple(PROMISE_SITES), store)
    sent = {site: read_sent(tmp_path / "workspace", site) for site in PROMISE_SITES}
    return {"run_dir": run_dir, "log": log, "sent": sent, "store": store, "initial": initial}


# what a privacy job's train result may carry beside the update: aggregation's weight, the evaluation scores,
# what the privacy cost and which NVFlare filters ran
AGGREGATION_META = {"NUM_STEPS_CURRENT_ROUND", "initial_metrics"}
PRIVACY_META = {"dp_epsilon", "svt_privacy_budget", "svt_privacy_accountant", "filter_history"}
SCORES = {"val_accuracy", "val_loss", "val_count"}


@pytest.mark.slow
def test_every_privacy_job_keeps_its_promise_on_everything_a_site_sends(promises_run):
    """RecordSent saw every result and analytics event each site sent in a whole run (train, global-model
    validation, cross-site evaluation). The server asked every site for its local model: the filter jobs'
    sites answered with an error reply and no model; every update was filtered as the job promises
    (percentile and SVT: at most 10% of the values; ExcludeVars: no head tensor, anywhere); beside the
    weights went only what aggregation and evaluation need (no training metrics, in results or streamed)."""
    sent, log = promises_run["sent"], promises_run["log"]
    assert "rejected" not in log
    for site, records in sent.items():
        tasks = {row["task"] for row in records}
        assert tasks == {"train", "validate", "submit_model", "analytics"}, (site, tasks)
        asked = [row for row in records if row["task"] == "submit_model"]
        assert all(row["dxo"] is None and row["return_code"] == "EXECUTION_RESULT_ERROR" for row in asked), site
        trains = [row for row in records if row["task"] == "train"]
        assert len(trains) == 2 and all(row["dxo"]["kind"] == "WEIGHT_DIFF" for row in trains)
        for row in trains:
            assert set(row["dxo"]["meta"]) <= AGGREGATION_META | PRIVACY_META, row["dxo"]["meta"]
            assert set(row["dxo"]["meta"]["initial_metrics"]) == SCORES
        for row in records:
            if row["task"] == "validate":  # cross-site evaluation: scores only
                assert row["dxo"]["kind"] == "METRICS" and set(row["dxo"]["scalars"]) == SCORES
            if row["task"] == "analytics":  # no training metrics streamed either; no tensor ever
                assert not weight_tensors(row["dxo"])
                assert "train" not in json.dumps(row["dxo"]["scalars"]), row

    for site, share in (("site1", 0.1), ("site2", 0.1)):  # percentile: the largest 10%; SVT: fraction 0.1
        for row in (r for r in sent[site] if r["task"] == "train"):
            tensors = weight_tensors(row["dxo"]).values()
            nonzero = sum(t[1] for t in tensors) / sum(t[0] for t in tensors)
            assert 0 < nonzero <= share + 0.01, (site, nonzero)
    assert all(weight_tensors(row["dxo"]) for row in sent["site3"] if row["task"] == "train")
    assert not any(k.startswith("head.") for row in sent["site3"] for k in weight_tensors(row["dxo"]))

    spent = [row["dxo"]["meta"]["dp_epsilon"] for row in sent[DP_SITE] if row["task"] == "train"]
    assert 0 < spent[0] < spent[1] <= 8.0  # 2 planned rounds spend the budget
    rounds = json.loads((promises_run["run_dir"] / "global_val.json").read_text())["rounds"]
    assert all(r["aggregated_sites"] == list(PROMISE_SITES) for r in rounds), rounds  # every kind is aggregated
    assert (promises_run["run_dir"] / "cross_site_val" / "cross_val_results.json").is_file()


@pytest.mark.slow
def test_dp_sgd_site_reports_its_epsilon_in_the_log_and_tracking(promises_run):
    """The DP-SGD site logs and tracks the epsilon it spent each round, the same numbers its updates carried."""
    log, store = promises_run["log"], promises_run["store"]
    spent = {
        (site, int(r)): float(eps)
        for site, r, eps in re.findall(r"fedxvit (site\d) round (\d): .*DP-SGD epsilon (\S+) of 8 spent", log)
    }
    assert sorted(spent) == [(DP_SITE, 0), (DP_SITE, 1)], log[-3000:]
    carried = [row["dxo"]["meta"]["dp_epsilon"] for row in promises_run["sent"][DP_SITE] if row["task"] == "train"]
    assert [spent[(DP_SITE, r)] for r in (0, 1)] == pytest.approx(carried, rel=1e-2)
    import mlflow

    client = mlflow.MlflowClient(store)
    runs = client.search_runs([client.get_experiment_by_name(FEDERATED_EXPERIMENT).experiment_id])
    tracked = {
        r.data.tags.get(SITE_TAG): r.data.metrics.get("dp_epsilon") for r in runs if r.data.tags[ROLE_TAG] == "site"
    }
    assert tracked[DP_SITE] == pytest.approx(spent[(DP_SITE, 1)], rel=1e-3)  # the last round's total
