"""One end-to-end run of the real NVFlare simulator: 3 sites x 2 rounds, tiny preset, tiny data,
tracked into a real `mlflow server` on 127.0.0.1 (the job argument `tracking_uri`; artifacts through
the server's proxy), read back with MlflowClient, and into TensorBoard event files."""

import json
from pathlib import Path

import pytest
import torch
from tiny import SITES, simulate, tiny_job, tiny_sites_and_initial_model

from fedxvit.classes import TASK_CLASSES
from fedxvit.datalist import read_dataset_info
from fedxvit.tracking import (
    FEDERATED_EXPERIMENT,
    ROLE_TAG,
    SERVER_ROUND_METRICS,
    SITE_ROUND_METRICS,
    SITE_TAG,
)

pytestmark = pytest.mark.slow


def test_three_sites_two_rounds_in_the_simulator(tmp_path, mlflow_server):
    initial = tiny_sites_and_initial_model(tmp_path)
    workspace = tmp_path / "workspace"
    store = mlflow_server

    job = tiny_job(tmp_path, tracking_uri=store)
    job_dir, log = simulate(job, workspace, tmp_path / "data", initial, SITES)
    assert f"MLflow runs go to {store}" in log, log[-4000:]
    assert "Round 1 finished." in log, log[-4000:]
    global_model = torch.load(job_dir / "app_server" / "FL_global_model.pt", weights_only=True)["model"]
    start = torch.load(initial, weights_only=True)
    assert set(global_model) == set(start)
    changed = [k for k in start if not torch.equal(torch.as_tensor(global_model[k]), start[k])]
    assert changed and all(k.startswith(("blocks.", "norm.", "head.")) for k in changed)  # last-k policy
    assert all(torch.isfinite(torch.as_tensor(v)).all() for v in global_model.values())

    rounds = json.loads((job_dir / "global_val.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [0, 1]
    assert all(r["num_sites"] == 3 and r["val_count"] == 12 for r in rounds)
    # UpdateSizeLog: every update the server received, in clear, 4 bytes per value (float32 differences)
    updates = json.loads((job_dir / "update_sizes.json").read_text())["updates"]
    assert sorted((u["round"], u["site"]) for u in updates) == [(r, s) for r in (0, 1) for s in SITES]
    assert all(u["encrypted"] == 0 and u["in_clear"] == u["tensors"] > 0 for u in updates)
    assert all(u["bytes"] == 4 * u["values"] for u in updates)
    trained = sum(start[k].numel() for k in changed if start[k].is_floating_point())
    assert updates[0]["values"] >= trained

    cross_site = json.loads((job_dir / "cross_site_val" / "cross_val_results.json").read_text())
    assert set(cross_site) == set(SITES)
    assert "SRV_FL_global_model.pt" in cross_site["site1"]
    for site in SITES:
        assert (workspace / site / "simulate_job" / f"app_{site}" / "best_local_model.pt").is_file()

    hashes = {site: read_dataset_info(tmp_path / "data" / site)["data_hash"] for site in SITES}
    check_tracking(store, job_dir, rounds, hashes, cross_site)


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
