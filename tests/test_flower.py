"""fedxvit as a Flower app (fedxvit/flower_app): natively in Flower's simulation engine (tooling.flower) and the
same app inside NVFlare (jobs/fedxvit_flower in NVFlare's simulator), tiny preset, 3 sites, 2 rounds. Both runs
train the trainable tensors only, improve the model, and track what jobs/fedxvit tracks; a round depends only on
(seed, round), so the two worlds end with the same model."""

import json
import os
import shutil
from pathlib import Path

import mlflow
import numpy as np
import psutil
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from test_simulator import tb_scalars, trainable_names
from tiny import REPO, SITES, simulate, tiny_sites_and_initial_model

from fedxvit.checkpoint import load_checkpoint, read_global_state
from fedxvit.data import make_loader
from fedxvit.errors import FedXViTError
from fedxvit.flower_client import site_name
from fedxvit.flower_server import TrainableFedAvg, merge
from fedxvit.methods import FLOWER_JOB
from fedxvit.model import build_model
from fedxvit.protocol import SITE_ROUND_METRICS
from fedxvit.tracking import FEDERATED_EXPERIMENT, ROLE_TAG, SITE_TAG
from fedxvit.training import evaluate
from tooling.flower import first_error, start_ray
from tooling.flower import main as flower_main
from tooling.flower import simulate as flower_simulate
from tooling.jobconfig import SERVER_FILE
from tooling.simulation import runs_predeployed_flower_app

TINY_APP = {"preset": "tiny", "num-server-rounds": 2, "min-nodes": 3, "batch-size": 4}


def context(node_config: dict, sites="site1,site2,site3") -> Context:
    return Context(run_id=1, node_id=7, node_config=node_config, state=None, run_config={"sites": sites})


def test_a_node_is_its_nvflare_client_or_the_simulated_partitions_site():
    assert site_name(context({"client-name": "hospital-a", "partition-id": 0})) == "hospital-a"
    assert site_name(context({"partition-id": 2, "num-partitions": 3})) == "site3"
    with pytest.raises(FedXViTError, match=r"Flower node 3 of 4 has no site: the run config's sites \(a,b\)"):
        site_name(context({"partition-id": 3, "num-partitions": 4}, sites="a,b"))


def test_the_mean_of_the_trainable_tensors_replaces_them_in_the_whole_model_and_nothing_else():
    whole = ArrayRecord({"frozen": Array(torch.ones(2).numpy()), "head": Array(torch.zeros(2).numpy())})
    merged = merge(whole, ArrayRecord({"head": Array(torch.full((2,), 5.0).numpy())}))
    assert list(merged) == ["frozen", "head"]
    assert merged["frozen"].numpy().tolist() == [1, 1] and merged["head"].numpy().tolist() == [5, 5]
    with pytest.raises(FedXViTError, match="the sites sent 1 tensors the global model lacks"):
        merge(whole, ArrayRecord({"stray": Array(torch.zeros(1).numpy())}))


def test_the_simulator_runner_predeploys_the_app_for_the_flower_job_only(tmp_path):
    assert runs_predeployed_flower_app(REPO / "jobs" / FLOWER_JOB)
    assert not runs_predeployed_flower_app(REPO / "jobs" / "fedxvit")
    shutil.copytree(REPO / "jobs" / FLOWER_JOB / "app", tmp_path / "app_server")  # a job with an app per side
    assert runs_predeployed_flower_app(tmp_path)


def test_the_native_runner_refuses_a_setting_without_a_value_and_a_folder_it_did_not_make(tmp_path):
    with pytest.raises(FedXViTError, match=r"--run-config 'rounds': write KEY=VALUE"):
        flower_main(["--run-config", "rounds"])
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(FedXViTError, match="exists and was not made by tooling.flower: choose another --workspace"):
        flower_simulate(tmp_path / "mine", tmp_path, SITES)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def test_a_ray_start_that_fails_is_tried_again_and_a_failed_run_names_its_cause(tmp_path, monkeypatch):
    monkeypatch.setattr("tooling.flower.RAY_STARTS", 2)
    (tmp_path / "taken").write_text("a file where Ray wants its session folder")
    with pytest.raises(FedXViTError, match=r"Ray did not start in 2 attempts: FileExistsError: .*taken' \(log "):
        start_ray(dict(os.environ), tmp_path / "taken", tmp_path / "ray.log")
    assert (tmp_path / "ray.log").read_text().count("$ ") == 2 and (tmp_path / "taken").is_file()

    log = """Traceback (most recent call last):
  File "node.py", line 423, in __init__
Exception: The current node timed out during startup. This could happen because ...
The above exception was the direct cause of the following exception:
RuntimeError: Simulation Engine crashed.
"""
    assert first_error(log) == "Exception: The current node timed out during startup. This could happen because ..."
    assert first_error("INFO: round 1\nall fine\n") == ""


def reply(site: str, head, examples=10, node=1, **metrics) -> Message:
    """A site's train reply as fedxvit.flower_client sends it: its trainable tensors, metrics and name."""
    task = Message(RecordDict(), dst_node_id=node, message_type="train")
    content = {
        "arrays": ArrayRecord({"head": Array(np.asarray(head, dtype=np.float32))}),
        "metrics": MetricRecord({"num-examples": examples, "train_loss": 0.5, **metrics}),
        "site": ConfigRecord({"name": site}),
    }
    return Message(RecordDict(content), reply_to=task)


class Decisions:
    """What TrainableFedAvg hands its RoundRecorder, kept for the test to read."""

    def training(self, server_round, metrics, dropped, clipped, scored):
        self.metrics, self.dropped, self.clipped = metrics, dropped, clipped


def test_a_bad_lying_or_broken_site_never_enters_or_owns_the_flower_average():
    whole = ArrayRecord({"frozen": Array(np.ones(2, np.float32)), "head": Array(np.zeros(2, np.float32))})
    strategy = TrainableFedAvg(Decisions(), num_rounds=2, norm_k=10.0, max_weight_ratio=4.0, min_train_nodes=2)
    strategy.whole = whole
    task = Message(RecordDict(), dst_node_id=7, message_type="train")
    broken = Message(Error(code=1, reason="Traceback ...\nRuntimeError: out of memory"), reply_to=task)
    replies = [
        reply("site1", [1, 1]),
        reply("site2", [1, 3], extra_metric=1.0),  # a metric the others lack: dropped from its record, not the site
        reply("site3", [2, 2], examples=10_000),  # claims 1000x the images: weighed as 4x the others' median
        reply("site4", [1e6, 1e6]),  # an absurd update
        reply("site5", [float("nan"), 0]),
        reply("site6", [1, 1], examples=-3),
        broken,
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    decisions = strategy.recorder
    assert sorted(decisions.metrics) == ["site1", "site2", "site3"]
    assert set(decisions.dropped) == {"site4", "site5", "site6", "node 7"}
    assert "norm" in decisions.dropped["site4"] and "head: holds NaN" in decisions.dropped["site5"]
    assert "num-examples: not a positive finite number" in decisions.dropped["site6"]
    assert decisions.dropped["node 7"] == "failed: RuntimeError: out of memory"
    assert list(decisions.clipped) == ["site3"]
    expected = (10 * np.array([1, 1]) + 10 * np.array([1, 3]) + 40 * np.array([2, 2])) / 60
    assert np.allclose(arrays["head"].numpy(), expected) and arrays["frozen"].numpy().tolist() == [1, 1]
    with pytest.raises(FedXViTError, match=r"round 2: 1 sites' updates are usable, fewer than min-nodes 2 \(site2: "):
        strategy.aggregate_train(2, [reply("site1", [1, 1]), reply("site2", [float("inf"), 0])])


@pytest.fixture(scope="module")
def federation(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("flower")
    return {"tmp": tmp, "initial": tiny_sites_and_initial_model(tmp), "data": tmp / "data"}


def pooled_validation_loss(state: dict, data: Path) -> float:
    model = build_model("tiny", num_classes=2)
    model.load_state_dict(state)
    loader = make_loader([data / site for site in SITES], "validation", 32, 16, train=False)
    return evaluate(model, loader, torch.device("cpu"))["loss"]


def check_training(run_dir: Path, federation: dict) -> dict:
    """The run trained the trainable tensors only, improved the model, kept its global validation table; the final
    model's tensors."""
    start, _ = load_checkpoint(federation["initial"])
    final = read_global_state(run_dir / "app_server" / "FL_global_model.pt")
    assert set(final) == set(start)
    changed = {k for k in start if not torch.equal(start[k], final[k])}
    assert changed == set(trainable_names())  # last-k: every trainable tensor moved, the frozen backbone did not
    assert pooled_validation_loss(final, federation["data"]) < pooled_validation_loss(start, federation["data"]) - 0.005
    rounds = json.loads((run_dir / "global_val.json").read_text())["rounds"]
    # rows 0 and 1 from the sites' scores of the model each round started from (as jobs/fedxvit), row 2: the final model
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert all(r["num_sites"] == 3 and r["val_count"] == 12 for r in rounds)
    assert rounds[1]["aggregated_sites"] == list(SITES) and rounds[1]["dropped_sites"] == {}
    assert (run_dir / "app_server" / "best_FL_global_model.pt").is_file()
    return final


def site_runs(run_dir: Path, role: str = "site") -> dict:
    record = json.loads((run_dir / "mlflow_runs.json").read_text())
    assert record["experiment"] == FEDERATED_EXPERIMENT  # where jobs/fedxvit's runs go
    client = mlflow.MlflowClient(record["tracking_uri"])
    runs = {site: client.get_run(run_id) for site, run_id in record["runs"].items()}
    assert {r.data.tags[SITE_TAG] for r in runs.values()} == set(runs)
    return {site: run for site, run in runs.items() if run.data.tags[ROLE_TAG] == role}


def check_tracking(run_dir: Path) -> None:
    """One MLflow run per site with jobs/fedxvit's per-round metrics, the server's with the global validation per
    row, and TensorBoard files for both."""
    runs = site_runs(run_dir)
    assert set(runs) == set(SITES) and all(set(SITE_ROUND_METRICS) <= set(r.data.metrics) for r in runs.values())
    assert set(SITE_ROUND_METRICS) <= set(tb_scalars(run_dir / "tb_events" / "site1"))
    (server,) = site_runs(run_dir, role="server").values()
    store = json.loads((run_dir / "mlflow_runs.json").read_text())["tracking_uri"]
    history = mlflow.MlflowClient(store).get_metric_history(server.info.run_id, "global_val_accuracy")
    assert sorted(m.step for m in history) == [0, 1, 2]


@pytest.mark.slow
def test_the_flower_app_natively_and_inside_nvflare_trains_alike(federation, tmp_path):
    native = flower_simulate(
        tmp_path / "native", federation["data"], SITES, federation["initial"], settings=TINY_APP, timeout_s=400
    )
    native_model = check_training(native, federation)
    check_tracking(native)
    left = [
        p.info["cmdline"]
        for p in psutil.process_iter(["cmdline"])
        if str(tmp_path) in " ".join(p.info["cmdline"] or [])
    ]
    assert left == [], "the SuperLink, the ServerApp, the simulation and Ray all stopped"

    job = tmp_path / "job"  # jobs/fedxvit_flower with the tiny settings, edited where a user would
    shutil.copytree(REPO / "jobs" / FLOWER_JOB, job)
    config = json.loads((job / SERVER_FILE).read_text())
    config.update(preset="tiny", num_rounds=2, min_clients=3, batch_size=4, registered_model_name="")
    (job / SERVER_FILE).write_text(json.dumps(config))
    run_dir, log = simulate(job, tmp_path / "nvflare", federation["data"], federation["initial"])
    assert "finished:completed" in log, log[-4000:]
    nvflare_model = check_training(run_dir, federation)
    check_tracking(run_dir)  # the sites' metrics went through NVFlare's MetricRelay to the server's receivers

    # one app, two worlds: the same rounds (seeded by round), the same weights (training images), the same model up to
    # float32 rounding (Flower sums the replies in the order they arrive), far below what a round changes
    start, _ = load_checkpoint(federation["initial"])
    off = max((native_model[k] - nvflare_model[k]).abs().max().item() for k in start)
    moved = max((native_model[k] - start[k]).abs().max().item() for k in start)
    assert off < 1e-5 < moved / 100, (off, moved)
