"""One end-to-end run of the real NVFlare simulator: 3 sites x 2 rounds, tiny preset, tiny data,
tracked into a local MLflow store (via $MLFLOW_TRACKING_URI) and TensorBoard event files."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fedxvit.checkpoint import save_checkpoint
from fedxvit.classes import TASK_CLASSES
from fedxvit.datalist import read_dataset_info, write_site
from fedxvit.model import build_model
from fedxvit.tracking import (FEDERATED_EXPERIMENT, ROLE_TAG, SERVER_ROUND_METRICS, SITE_ROUND_METRICS, SITE_TAG,
                              tracking_uri)

REPO = Path(__file__).resolve().parents[1]
JOB = REPO / "jobs" / "fedxvit"
SITES = ("site1", "site2", "site3")


def write_site_images(root: Path, train_per_class: int, seed: int, validation_per_class: int = 2) -> None:
    rng = np.random.default_rng(seed)
    entries = {}
    for split, count in (("training", train_per_class), ("validation", validation_per_class), ("testing", 1)):
        (root / split).mkdir(parents=True, exist_ok=True)
        entries[split] = []
        for label in range(len(TASK_CLASSES)):
            for i in range(count):
                pixels = (rng.random((32, 32)) * 60).astype(np.uint8)
                if label:
                    pixels[6:16, 6:16] = 230
                rel = f"{split}/{label}_{i}.png"
                Image.fromarray(pixels).save(root / rel)
                entries[split].append({"image": rel, "label": label})
    write_site(root, entries, TASK_CLASSES, {"generator": "tests", "seed": seed})


def tiny_job(tmp: Path, **server_changes) -> Path:
    """The real job with its arguments overridden the way a user would: edit the top-level variables."""
    job = tmp / "job"
    shutil.copytree(JOB, job)
    for name, changes in (("config_fed_server.json", {"num_rounds": 2, "preset": "tiny", **server_changes}),
                          ("config_fed_client.json", {"preset": "tiny", "batch_size": 4, "torch_threads": 1})):
        path = job / "app" / "config" / name
        config = json.loads(path.read_text())
        assert set(changes) <= set(config), f"{name} lost a job argument"
        config.update(changes)
        path.write_text(json.dumps(config))
    return job


def tiny_sites_and_initial_model(tmp: Path, train_per_class=lambda i: 3 + i) -> Path:
    """tmp/data/site1..3 of tiny images and tmp/initial_global.pt (a seeded tiny model); the model's path."""
    for i, site in enumerate(SITES):
        write_site_images(tmp / "data" / site, train_per_class=train_per_class(i), seed=i)
    torch.manual_seed(0)
    initial = tmp / "initial_global.pt"
    save_checkpoint(initial, build_model("tiny", len(TASK_CLASSES)), meta={"class_names": list(TASK_CLASSES)})
    return initial


def test_three_sites_two_rounds_in_the_simulator(tmp_path):
    initial = tiny_sites_and_initial_model(tmp_path)
    workspace = tmp_path / "workspace"
    store = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"

    env = dict(os.environ, FEDXVIT_INITIAL_MODEL=str(initial), FEDXVIT_DATA_ROOT=str(tmp_path / "data"),
               MLFLOW_TRACKING_URI=store,
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    command = [str(Path(sys.executable).parent / "nvflare"), "simulator", str(tiny_job(tmp_path)),
               "-w", str(workspace), "-c", ",".join(SITES), "-t", "3"]
    run = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-4000:]
    assert "Round 1 finished." in log, log[-4000:]

    job_dir = workspace / "server" / "simulate_job"
    global_model = torch.load(job_dir / "app_server" / "FL_global_model.pt", weights_only=True)["model"]
    start = torch.load(initial, weights_only=True)
    assert set(global_model) == set(start)
    changed = [k for k in start if not torch.equal(torch.as_tensor(global_model[k]), start[k])]
    assert changed and all(k.startswith(("blocks.", "norm.", "head.")) for k in changed)  # last-k policy
    assert all(torch.isfinite(torch.as_tensor(v)).all() for v in global_model.values())

    rounds = json.loads((job_dir / "global_val.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [0, 1]
    assert all(r["num_sites"] == 3 and r["val_count"] == 12 for r in rounds)

    cross_site = json.loads((job_dir / "cross_site_val" / "cross_val_results.json").read_text())
    assert set(cross_site) == set(SITES)
    assert "SRV_FL_global_model.pt" in cross_site["site1"]
    for site in SITES:
        assert (workspace / site / "simulate_job" / f"app_{site}" / "best_local_model.pt").is_file()

    hashes = {site: read_dataset_info(tmp_path / "data" / site)["data_hash"] for site in SITES}
    check_tracking(store, job_dir, rounds, hashes)


def tb_scalars(folder: Path) -> dict:
    """{tag: [(step, value), ...]} of the TensorBoard event files in a folder."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def check_tracking(store: str, job_dir: Path, rounds: list, hashes: dict) -> None:
    """Every site and the server tracked per round in MLflow and TensorBoard; params once; models registered."""
    import mlflow

    assert tracking_uri(environ={"MLFLOW_TRACKING_URI": store}) == store
    client = mlflow.MlflowClient(store)
    experiment = client.get_experiment_by_name(FEDERATED_EXPERIMENT)
    runs = {r.data.tags[SITE_TAG]: r for r in client.search_runs([experiment.experiment_id])}
    server = [name for name, r in runs.items() if r.data.tags[ROLE_TAG] == "server"]
    assert len(server) == 1 and set(runs) == {*SITES, server[0]}
    server_run = runs[server[0]]
    job_id = server_run.data.tags["job_id"]
    assert all(r.info.status == "FINISHED" and r.data.tags["job_id"] == job_id for r in runs.values())

    def history(run, key):
        return [(m.step, m.value) for m in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)]

    for site in SITES:
        assert set(SITE_ROUND_METRICS) <= set(runs[site].data.metrics), site
        assert all([step for step, _ in history(runs[site], key)] == [0, 1] for key in SITE_ROUND_METRICS)
        params = runs[site].data.params
        assert params["data_hash"] == hashes[site] and params["preset"] == "tiny" and params["freeze_policy"] == "last-k"
    assert set(SERVER_ROUND_METRICS) <= set(server_run.data.metrics)
    assert history(server_run, "global_val_accuracy") == [(r["round"], r["global_val_accuracy"]) for r in rounds]
    assert history(server_run, "clients_per_round") == [(0, 3.0), (1, 3.0)]
    params = server_run.data.params
    assert {params[f"data_hash.{site}"] for site in SITES} == set(hashes.values())
    assert (params["num_rounds"], params["preset"], params["sites"]) == ("2", "tiny", ",".join(SITES))
    assert (params["freeze_policy"], params["local_epochs"], params["learning_rate"]) == ("last-k", "1", "0.0003")

    for name, kind in (("fedxvit-global", "final"), ("fedxvit-global-best", "best")):
        (version,) = client.search_model_versions(f"name='{name}'")
        assert version.run_id == server_run.info.run_id
        assert version.tags["model"] == kind and version.tags["job_id"] == job_id
        assert {version.tags[f"data_hash.{site}"] for site in SITES} == set(hashes.values())
        assert 0.0 <= float(version.tags["cross_site_val_accuracy"]) <= 1.0
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
