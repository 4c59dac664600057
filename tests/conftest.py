"""Fixtures shared by the test files; the plain helpers behind them are in tiny.py.

`pytest -m "not slow"` skips the tests marked slow (real simulator, POC, mlflow server,
benchmark generation) for a quick loop.
"""

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from tiny import free_port, write_tiny_run, write_tiny_site


@pytest.fixture(autouse=True)
def one_torch_thread():
    """One torch thread: on a shared 2-core box, 2 spinning OpenMP threads run ~10x slower under contention."""
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_site_dir(tmp_path_factory) -> Path:
    """One tiny site (3 + 3 training, 2 + 2 validation, 1 + 1 test images), written once; tests only read it."""
    return write_tiny_site(tmp_path_factory.mktemp("data") / "site1")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> dict:
    """A finished tiny run with its sites and initial model (tiny.write_tiny_run), written once."""
    return write_tiny_run(tmp_path_factory.mktemp("run"))


@pytest.fixture
def mlflow_server(tmp_path):
    """`mlflow server` with a SQLite backend and proxied artifacts in tmp_path; yields its URI."""
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "mlflow_server.log", "w")
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
