"""Fixtures shared by the test files; the plain helpers behind them are in tiny.py.

`pytest -m "not slow"` skips the tests marked slow (real simulator, POC, mlflow server,
benchmark generation) for a quick loop.
"""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from sent_recorder import add_update_recorder
from tiny import (
    SITES,
    TINY_SERVER,
    free_port,
    simulate,
    tiny_job,
    tiny_sites_and_initial_model,
    write_tiny_run,
    write_tiny_site,
)
from xdist.scheduler import LoadFileScheduling

# The files whose tests share the session's plain FedAvg run, the POC system and the provisioned system: one worker
# runs them all, one file after the other, so never two systems run at once
SHARED_RUN_FILES = ("tests/test_simulator.py", "tests/test_poc.py", "tests/test_provisioned.py")
SHARED_RUN_UNIT = "plain FedAvg run, POC and provisioned systems"


@pytest.fixture(autouse=True)
def one_torch_thread():
    """One torch thread: on a shared 2-core box, 2 spinning OpenMP threads run ~10x slower under contention."""
    torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def own_tracking_store(tmp_path_factory):
    """A run that names no MLflow store tracks into this worker's own SQLite file, never into the checkout's
    mlruns/ (the project's default store) or a server the user's $MLFLOW_TRACKING_URI names. One file per worker:
    its tests run one at a time, while two runs on two workers creating one store's tables at once fail
    ("table ... already exists", seen in a fresh clone)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path_factory.getbasetemp() / 'mlflow.db'}")
        yield


@pytest.fixture(scope="session")
def tiny_site_dir(tmp_path_factory) -> Path:
    """One tiny site (3 + 3 training, 2 + 2 validation, 1 + 1 test images), written once; tests only read it."""
    return write_tiny_site(tmp_path_factory.mktemp("data") / "site1")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> dict:
    """A finished tiny run with its sites and initial model (tiny.write_tiny_run), written once."""
    return write_tiny_run(tmp_path_factory.mktemp("run"))


@contextmanager
def running_mlflow_server(folder: Path):
    """`mlflow server` with a SQLite backend and proxied artifacts in `folder`; yields its URI."""
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    folder.mkdir(parents=True, exist_ok=True)
    log = open(folder / "mlflow_server.log", "w")
    server = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "mlflow"),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{folder / 'server' / 'mlflow.db'}",
            "--artifacts-destination",
            str(folder / "server" / "artifacts"),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        # no job runner: the server otherwise starts eight more Python processes (huey consumers) the tests never use
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
    )
    try:
        for _ in range(240):
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                assert server.poll() is None, (folder / "mlflow_server.log").read_text()[-2000:]
                time.sleep(0.5)
        else:
            pytest.fail("mlflow server did not come up:\n" + (folder / "mlflow_server.log").read_text()[-2000:])
        yield uri
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server and the workers it started, nothing else
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:  # a loaded machine: do not leave it running
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)
        log.close()


@pytest.fixture
def mlflow_server(tmp_path):
    """A real `mlflow server` for one test; yields its URI."""
    with running_mlflow_server(tmp_path) as uri:
        yield uri


@pytest.fixture(scope="session")
def plain_fedavg_run(tmp_path_factory) -> dict:
    """The design card's FedAvg job (jobs/fedxvit), tiny: 3 sites x 2 rounds in NVFlare's real simulator,
    tracked into a real `mlflow server`. One run serves the simulator, tracking, HE-equality, POC and provisioned tests:
    their files are one unit of work (SHARED_RUN_FILES), so one worker builds it once. Each site also saves what
    it sent for `train` (sent_recorder.RecordUpdates), for the exact-aggregate check."""
    tmp = tmp_path_factory.mktemp("fedavg")
    initial = tiny_sites_and_initial_model(tmp)
    with running_mlflow_server(tmp / "mlflow") as store:
        job = tiny_job(tmp, tracking_uri=store, registered_model_name="fedxvit-global")
        client_config = job / "app" / "config" / "config_fed_client.json"
        client_config.write_text(json.dumps(add_update_recorder(json.loads(client_config.read_text()))))
        job_dir, log = simulate(job, tmp / "workspace", tmp / "data", initial, SITES)
        yield {
            "initial": initial,
            "data": tmp / "data",
            "job": job,
            "job_dir": job_dir,
            "workspace": tmp / "workspace",
            "log": log,
            "store": store,
            "rounds": TINY_SERVER["num_rounds"],
        }


class FileUnits(LoadFileScheduling):
    """`make test`'s scheduler (`pytest -n 3 --dist loadfile`): a test file is one unit of work, so its module
    fixtures (a simulator run, a federation's data) are built once, on one worker; the files that share
    `plain_fedavg_run` and the POC system (SHARED_RUN_FILES) are one unit together. Units are handed out in
    collection order (--no-loadscope-reorder): pytest_collection_modifyitems puts the longest first."""

    def _split_scope(self, nodeid: str) -> str:
        path = nodeid.split("::", 1)[0]
        return SHARED_RUN_UNIT if path in SHARED_RUN_FILES else path


@pytest.hookimpl(optionalhook=True)  # without xdist (-p no:xdist) the hook does not exist
def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") == "loadfile":
        return FileUnits(config, log)
    return None  # xdist's own


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items):
    """The units of work in the order they should start: the shared run and POC system, then the files with slow
    tests, then the quick ones, which fill the gaps at the end. A test that uses the shared run outside
    SHARED_RUN_FILES would build it a second time on another worker: refused."""
    strays = [item.nodeid for item in items if "plain_fedavg_run" in getattr(item, "fixturenames", ())]
    strays = [nodeid for nodeid in strays if nodeid.split("::", 1)[0] not in SHARED_RUN_FILES]
    if strays:
        raise pytest.UsageError(f"{strays[0]} uses plain_fedavg_run: add its file to conftest.SHARED_RUN_FILES")
    slow_files = {item.nodeid.split("::", 1)[0] for item in items if item.get_closest_marker("slow")}

    def rank(item) -> int:
        path = item.nodeid.split("::", 1)[0]
        return 0 if path in SHARED_RUN_FILES else 1 + (path not in slow_files)

    items.sort(key=rank)  # stable: the order within a file stays the file's
