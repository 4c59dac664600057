"""Fixtures shared by the test files; the plain helpers behind them are in tiny.py.

`pytest -m "not slow"` skips the tests marked slow (real simulator, POC, mlflow server,
benchmark generation) for a quick loop.
"""

from pathlib import Path

import pytest
import torch
from tiny import write_tiny_run, write_tiny_site


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
