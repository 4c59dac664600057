"""The design card's FedAvg job (jobs/fedxvit) in the real NVFlare simulator: 3 sites x 2 rounds, tiny preset,
tiny data, tracked into a real `mlflow server` on 127.0.0.1 (the job argument `tracking_uri`; artifacts through
the server's proxy), read back with MlflowClient, and into TensorBoard event files. The run is conftest's
`plain_fedavg_run`, shared with the HE and POC tests (one worker: conftest.SHARED_RUN_FILES)."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sent_recorder import read_updates
from tiny import REPO, SITES

from fedxvit.classes import TASK_CLASSES
from fedxvit.datalist import read_dataset_info
from fedxvit.model import build_model
from fedxvit.protocol import SERVER_ROUND_METRICS, SITE_ROUND_METRICS
from fedxvit.tracking import FEDERATED_EXPERIMENT, ROLE_TAG, SITE_TAG
from fedxvit.training import apply_freeze_policy

pytestmark = pytest.mark.slow


def trainable_names() -> list[str]:
    """What the job's freeze policy (last-k, k = 1) trains in the tiny model."""
    return apply_freeze_policy(build_model("tiny", len(TASK_CLASSES)), "last-k", 1)


def models(run: dict) -> tuple[dict, dict]:
    start = torch.load(run["initial"], weights_only=True)
    final = torch.load(run["job_dir"] / "app_server" / "FL_global_model.pt", weights_only=True)["model"]
    return start, {name: torch.as_tensor(value) for name, value in final.items()}


def test_three_sites_two_rounds_in_the_simulator(plain_fedavg_run):
    run = plain_fedavg_run
    job_dir, log, store, data = run["job_dir"], run["log"], run["store"], run["data"]
    assert f"MLflow runs go to {store}" in log, log[-4000:]
    assert "Round 1 finished." in log, log[-4000:]
    start, global_model = models(run)
    assert set(global_model) == set(start)
    changed = {k for k in start if not torch.equal(global_model[k], start[k])}
    assert changed == set(trainable_names())  # last-k: every trainable tensor moved, nothing else
    assert all(torch.isfinite(v).all() for v in global_model.values())

    rounds = json.loads((job_dir / "global_val.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [0, 1]
    assert all(r["num_sites"] == 3 and r["val_count"] == 12 for r in rounds)
    # UpdateSizeLog: every update the server received, in clear, 4 bytes per value (float32 differences)
    updates = json.loads((job_dir / "update_sizes.json").read_text())["updates"]
    assert sorted((u["round"], u["site"]) for u in updates) == [(r, s) for r in (0, 1) for s in SITES]
    assert all(u["encrypted"] == 0 and u["in_clear"] == u["tensors"] == len(changed) for u in updates)
    assert all(u["bytes"] == 4 * u["values"] for u in updates)
    assert all(u["values"] == sum(start[k].numel() for k in changed) for u in updates)  # the trainable tensors only

    # the downlink (fedxvit.downlink): each site's first task carries the whole model, every later one only the
    # trainable tensors, never more bytes than the site's update; the exact-aggregate test below and the scores
    # show that the sites completed the models (the server's final model is whole: `set(global_model)` above)
    sent = json.loads((job_dir / "downlink_sizes.json").read_text())["tasks"]
    for site in SITES:
        rows = [row for row in sent if row["site"] == site]
        assert rows[0]["task"] == "train" and rows[0]["round"] == 0 and rows[0]["left_out"] == 0, rows[0]
        assert rows[0]["tensors"] == len(start)
        later = rows[1:]
        assert len(later) >= 1 + 3 and all(row["tensors"] == len(changed) for row in later), later  # round 1, 3 SRV
        update = next(u for u in updates if u["site"] == site and u["round"] == 1)
        assert all(row["bytes"] <= update["bytes"] < row["full_bytes"] for row in later)

    cross_site = json.loads((job_dir / "cross_site_val" / "cross_val_results.json").read_text())
    assert set(cross_site) == set(SITES)
    assert "SRV_FL_global_model.pt" in cross_site["site1"]
    for site in SITES:
        assert (run["workspace"] / site / "simulate_job" / f"app_{site}" / "best_local_model.pt").is_file()

    hashes = {site: read_dataset_info(data / site)["data_hash"] for site in SITES}
    check_tracking(store, job_dir, rounds, hashes, cross_site)


def test_the_server_applies_exactly_the_step_weighted_mean_of_the_sites_differences(plain_fedavg_run):
    """final = start + sum over rounds of sum_i steps_i * diff_i / sum_i steps_i, from what each site really sent."""
    run = plain_fedavg_run
    start, final = models(run)
    sent = {site: read_updates(run["workspace"], site) for site in SITES}
    assert all(len(rows) == run["rounds"] for rows in sent.values())
    expected = {name: start[name].double().numpy() for name in trainable_names()}
    unweighted = {name: value.copy() for name, value in expected.items()}
    for r in range(run["rounds"]):
        steps = {site: sent[site][r][0] for site in SITES}
        assert all(s > 0 for s in steps.values()) and len(set(steps.values())) > 1  # the weights matter here
        for name in expected:
            expected[name] += sum(steps[s] * sent[s][r][1][name] for s in SITES) / sum(steps.values())
            unweighted[name] += sum(sent[s][r][1][name] for s in SITES) / len(SITES)
    off = max(float(np.abs(final[name].double().numpy() - expected[name]).max()) for name in expected)
    apart = max(float(np.abs(unweighted[name] - expected[name]).max()) for name in expected)
    assert off < 1e-6 < apart / 100, (off, apart)  # float32 rounding, far below what the weighting changes


def test_the_design_card_job_improves_the_model_on_validation(plain_fedavg_run):
    """Scored by every site on its validation split (cross-site evaluation): the final global model beats the start."""
    cross_site = json.loads((plain_fedavg_run["job_dir"] / "cross_site_val" / "cross_val_results.json").read_text())

    def pooled(model: str, metric: str) -> float:
        scores = [cross_site[site][model] for site in SITES]
        return sum(s[metric] * s["val_count"] for s in scores) / sum(s["val_count"] for s in scores)

    start, final = "SRV_initial_global.pt", "SRV_FL_global_model.pt"
    assert start in cross_site["site1"], sorted(cross_site["site1"])
    assert pooled(final, "val_loss") < pooled(start, "val_loss") - 0.005  # 0.7006 -> 0.6933 at this commit
    assert pooled(final, "val_accuracy") >= pooled(start, "val_accuracy")


def test_each_round_splits_into_the_slowest_sites_parts_and_the_rest(plain_fedavg_run):
    """`make bench`'s round breakdown (bench/task_times.round_breakdown) on this run's server and site logs: a row
    per round; the slowest site's timed parts fit in its train task, the task in the round (log stamps: ms)."""
    sys.path.insert(0, str(REPO / "bench"))
    from task_times import ROUND, round_breakdown, stamp

    workspace = plain_fedavg_run["workspace"]
    server = (workspace / "server" / "log.txt").read_text().splitlines()
    sites = [line for site in SITES for line in (workspace / site / "log.txt").read_text().splitlines()]
    rounds = round_breakdown(server, sites)
    assert sorted(rounds) == list(range(plain_fedavg_run["rounds"]))
    for row in rounds.values():
        parts = row["global_val_s"] + row["training_s"] + row["local_val_s"]
        assert 0 < row["training_s"] and 0 < row["global_val_s"] and 0 < row["local_val_s"], row
        assert parts <= row["slowest_task_s"] + 0.002 and row["slowest_task_s"] <= row["round_s"] + 0.002, row
        assert row["dispatch_s"] >= 0 and row["aggregation_s"] >= 0 and row["between_s"] >= 0, row
        assert row["overhead_s"] == pytest.approx(row["round_s"] + row["between_s"] - row["training_s"], abs=2e-3)
    # a round is counted start to start: its own wall time and the wait before the next one starts
    starts = [stamp(line) for line in server if (match := ROUND.search(line)) and match.group(2) == "started"]
    for r, (start, following) in enumerate(zip(starts, starts[1:])):
        assert rounds[r]["round_s"] + rounds[r]["between_s"] == pytest.approx(following - start, abs=2e-3)
    assert rounds[plain_fedavg_run["rounds"] - 1]["between_s"] == 0  # the last round has no next round to wait for


def tb_scalars(folder: Path) -> dict:
    """{tag: [(step, value), ...]} of the TensorBoard event files in a folder."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def check_tracking(store: str, job_dir: Path, rounds: list, hashes: dict, cross_site: dict) -> None:
    """Every site and the server tracked per round in MLflow and TensorBoard; params once; models registered."""
    import mlflow

    client = mlflow.MlflowClient(store)
    experiment = client.get_experiment_by_name(FEDERATED_EXPERIMENT)
    runs = {r.data.tags[SITE_TAG]: r for r in client.search_runs([experiment.experiment_id])}
    server = [name for name, r in runs.items() if r.data.tags[ROLE_TAG] == "server"]
    assert len(server) == 1 and set(runs) == {*SITES, server[0]}
    server_run = runs[server[0]]
    job_id = server_run.data.tags["job_id"]
    assert all(r.info.status == "FINISHED" and r.data.tags["job_id"] == job_id for r in runs.values())

    def history(run, key):
        return [
            (m.step, m.value) for m in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)
        ]

    for site in SITES:
        assert set(SITE_ROUND_METRICS) <= set(runs[site].data.metrics), site
        assert all([step for step, _ in history(runs[site], key)] == [0, 1] for key in SITE_ROUND_METRICS)
        params = runs[site].data.params
        assert (
            params["data_hash"] == hashes[site] and params["preset"] == "tiny" and params["freeze_policy"] == "last-k"
        )
    assert set(SERVER_ROUND_METRICS) <= set(server_run.data.metrics)
    assert history(server_run, "global_val_accuracy") == [(r["round"], r["global_val_accuracy"]) for r in rounds]
    assert history(server_run, "clients_per_round") == [(0, 3.0), (1, 3.0)]
    params = server_run.data.params
    assert {params[f"data_hash.{site}"] for site in SITES} == set(hashes.values())
    assert (params["num_rounds"], params["preset"], params["sites"]) == ("2", "tiny", ",".join(SITES))
    assert (params["freeze_policy"], params["local_epochs"], params["learning_rate"]) == ("last-k", "1", "0.0003")

    for name, kind, file_name in (
        ("fedxvit-global", "final", "FL_global_model.pt"),
        ("fedxvit-global-best", "best", "best_FL_global_model.pt"),
    ):
        (version,) = client.search_model_versions(f"name='{name}'")
        assert version.run_id == server_run.info.run_id
        assert version.tags["model"] == kind and version.tags["job_id"] == job_id
        assert {version.tags[f"data_hash.{site}"] for site in SITES} == set(hashes.values())
        scores = [cross_site[site][f"SRV_{file_name}"] for site in SITES]  # the model pooled over all sites
        count = sum(s["val_count"] for s in scores)
        for tag, metric in (("cross_site_val_accuracy", "val_accuracy"), ("cross_site_val_loss", "val_loss")):
            assert float(version.tags[tag]) == pytest.approx(sum(s[metric] * s["val_count"] for s in scores) / count)
    mlflow.set_tracking_uri(store)
    inputs = json.loads(mlflow.models.get_model_info("models:/fedxvit-global/1").signature.to_dict()["inputs"])
    assert inputs[0]["tensor-spec"]["shape"] == [-1, 1, 32, 32]
    logged = mlflow.pytorch.load_model("models:/fedxvit-global/1")  # torch.export format: no pickled code
    assert tuple(logged(torch.zeros(3, 1, 32, 32)).shape) == (3, len(TASK_CLASSES))

    folders = {p.name: p for p in (job_dir / "tb_events").iterdir()}
    assert set(folders) == set(runs)
    for site in SITES:
        assert set(SITE_ROUND_METRICS) <= set(tb_scalars(folders[site]))
    server_tb = tb_scalars(folders[server[0]])
    assert [step for step, _ in server_tb["global_val_loss"]] == [0, 1] and set(SERVER_ROUND_METRICS) <= set(server_tb)
