"""A real `mlflow server` on 127.0.0.1 as the job's tracking store: 3 sites x 1 round in the NVFlare simulator,
pointed at the server by the job argument `tracking_uri`, read back with MlflowClient."""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest
from test_tracking import closed_port
from tiny import SITES, tiny_job, tiny_sites_and_initial_model

from fedxvit.tracking import FEDERATED_EXPERIMENT, ROLE_TAG, SERVER_ROUND_METRICS, SITE_ROUND_METRICS, SITE_TAG

BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow


@pytest.fixture
def mlflow_server(tmp_path):
    """`mlflow server` with a SQLite backend and proxied artifacts in tmp_path; yields its URI."""
    port = closed_port()
    uri = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "mlflow_server.log", "w")
    server = subprocess.Popen(
        [
            str(BIN / "mlflow"),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{tmp_path / 'server' / 'mlflow.db'}",
            "--artifacts-destination",
            str(tmp_path / "server" / "artifacts"),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        for _ in range(240):
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                assert server.poll() is None, (tmp_path / "mlflow_server.log").read_text()[-2000:]
                time.sleep(0.5)
        else:
            pytest.fail("mlflow server did not come up:\n" + (tmp_path / "mlflow_server.log").read_text()[-2000:])
        yield uri
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server and the workers it started, nothing else
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:  # a loaded machine: do not leave it running
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)
        log.close()


def test_a_job_tracks_into_a_real_mlflow_server(tmp_path, mlflow_server):
    initial = tiny_sites_and_initial_model(tmp_path, train_per_class=lambda i: 2)
    job = tiny_job(tmp_path, num_rounds=1, tracking_uri=mlflow_server)
    server_config = job / "app" / "config" / "config_fed_server.json"  # one round, no cross-site evaluation
    config = json.loads(server_config.read_text())
    config["workflows"] = [w for w in config["workflows"] if w["id"] != "cross_site_model_eval"]
    server_config.write_text(json.dumps(config))

    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update(
        FEDXVIT_INITIAL_MODEL=str(initial),
        FEDXVIT_DATA_ROOT=str(tmp_path / "data"),
        PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    run = subprocess.run(
        [
            str(BIN / "nvflare"),
            "simulator",
            str(job),
            "-w",
            str(tmp_path / "workspace"),
            "-c",
            ",".join(SITES),
            "-t",
            "3",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-4000:]
    assert f"MLflow runs go to {mlflow_server}" in log, log[-4000:]

    client = mlflow.MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name(FEDERATED_EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id])
    by_site = {r.data.tags[SITE_TAG]: r for r in runs if r.data.tags[ROLE_TAG] == "site"}
    (server_run,) = [r for r in runs if r.data.tags[ROLE_TAG] == "server"]
    assert set(by_site) == set(SITES)
    for site, site_run in by_site.items():
        assert set(SITE_ROUND_METRICS) <= set(site_run.data.metrics), site
    assert set(SERVER_ROUND_METRICS) <= set(server_run.data.metrics)
    assert [m.step for m in client.get_metric_history(server_run.info.run_id, "global_val_accuracy")] == [0]
    assert server_run.data.metrics["clients_per_round"] == len(SITES)
    assert server_run.data.params["num_rounds"] == "1"
    (version,) = client.search_model_versions("name='fedxvit-global'")  # artifacts went through the server's proxy
    assert version.run_id == server_run.info.run_id and version.tags["model"] == "final"
