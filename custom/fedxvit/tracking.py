"""Where MLflow runs go, and a context helper to open one.

Default store: `sqlite:///<root>/mlruns/mlflow.db` with artifacts in `<root>/mlruns/artifacts`,
where <root> is the fedxvit checkout (`fedxvit.paths.project_root`), so scripts and the
NVFlare simulator's workspace folders share one store.
SQLite rather than MLflow's file store because the file store is deprecated and the UI
reads SQLite directly:

    mlflow ui --backend-store-uri sqlite:///$PWD/mlruns/mlflow.db

MLFLOW_TRACKING_URI (or an explicit URI) overrides all of this, e.g. a shared server or Azure ML.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from fedxvit.paths import project_root

ENV_VAR = "MLFLOW_TRACKING_URI"
STORE_DIR = "mlruns"


def local_store() -> tuple[str, str]:
    """(tracking URI, artifact location URI) of the local default store."""
    store = project_root() / STORE_DIR
    return f"sqlite:///{store / 'mlflow.db'}", (store / "artifacts").as_uri()


def tracking_uri(explicit: str | None = None) -> str:
    """Explicit URI, else $MLFLOW_TRACKING_URI, else the local SQLite store."""
    return explicit or os.environ.get(ENV_VAR) or local_store()[0]


@contextlib.contextmanager
def mlflow_run(experiment: str, run_name: str | None = None, params: dict | None = None,
               uri: str | None = None, tags: dict | None = None):
    """Open an MLflow run in `experiment` (created on first use) with params logged; yields mlflow.

    Local stores get their artifact folder beside the database instead of MLflow's cwd-relative default.
    """
    import mlflow

    uri = tracking_uri(uri)
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    if mlflow.get_experiment_by_name(experiment) is None:
        artifacts = None
        if uri.startswith("sqlite:///"):
            artifacts = (Path(uri.removeprefix("sqlite:///")).parent / "artifacts").as_uri()
        mlflow.create_experiment(experiment, artifact_location=artifacts)
    mlflow.set_experiment(experiment)
    with mlflow.start_run(run_name=run_name, tags=tags):
        if params:
            mlflow.log_params({k: (v if v is None or isinstance(v, (int, float, str, bool)) else str(v)) for k, v in params.items()})
        yield mlflow
