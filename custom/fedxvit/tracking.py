"""Where MLflow runs go, and the names of what the federated job tracks.

Where (first match wins): an explicit URI (a CLI option or the job's `tracking_uri`), then
$MLFLOW_TRACKING_URI (a shared `mlflow server`, or an `azureml://` URI), then an Azure ML
workspace `config.json` ($FEDXVIT_AZUREML_CONFIG, else `.azureml/config.json` or
`config.json` in the checkout) turned into the workspace's `azureml://` tracking URI the way
Microsoft documents it for azureml-mlflow (subscription, resource group, workspace, region), else
the local store `sqlite:///<root>/mlruns/mlflow.db` with artifacts in `<root>/mlruns/artifacts`,
where <root> is the fedxvit checkout (`fedxvit.paths.project_root`), so scripts and the
NVFlare simulator's workspace folders share one store.
SQLite rather than MLflow's file store because the file store is deprecated and the UI
reads SQLite directly:

    mlflow ui --backend-store-uri sqlite:///$PWD/mlruns/mlflow.db

A store that cannot be reached (or an Azure credential that does not work) is one
FedXViTError within a bounded time, never a silent switch to another store; the local store
is used instead only when the caller opts in (`local_fallback`, or FEDXVIT_MLFLOW_FALLBACK=local).
After a federated run, `fedxvit.run_record` records parameters, model versions and results.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import threading
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from fedxvit.errors import FedXViTError
from fedxvit.paths import project_root

ENV_VAR = "MLFLOW_TRACKING_URI"
STORE_DIR = "mlruns"
FALLBACK_ENV = "FEDXVIT_MLFLOW_FALLBACK"
AZURE_CONFIG_ENV = "FEDXVIT_AZUREML_CONFIG"
AZURE_CONFIG_FILES = (Path(".azureml") / "config.json", Path("config.json"))
AZURE_KEYS = ("subscription_id", "resource_group", "workspace_name", "location")
AZURE_SCOPE = "https://management.azure.com/.default"  # the scope azureml-mlflow asks azure-identity for
DEFAULT_TIMEOUT_S = 30.0

SITE_TAG, ROLE_TAG, JOB_TAG = "site", "role", "job_id"  # MLflow run tags: which site, "site" or "server", which job
FEDERATED_EXPERIMENT = "fedxvit-federated"


# ---- where runs go
def local_store() -> tuple[str, str]:
    """(tracking URI, artifact location URI) of the local default store."""
    store = project_root() / STORE_DIR
    return f"sqlite:///{store / 'mlflow.db'}", (store / "artifacts").as_uri()


def artifact_location(uri: str) -> str | None:
    """Artifacts of a SQLite store live beside its database; servers and Azure ML choose their own."""
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).parent / "artifacts").as_uri()
    return None


def find_azure_config(environ: dict | None = None) -> Path | None:
    """$FEDXVIT_AZUREML_CONFIG, else `.azureml/config.json` or `config.json` in the checkout, else None."""
    environ = os.environ if environ is None else environ
    if environ.get(AZURE_CONFIG_ENV):
        path = Path(environ[AZURE_CONFIG_ENV]).expanduser()
        if not path.is_file():
            raise FedXViTError(f"{AZURE_CONFIG_ENV}={path}: no such Azure ML workspace config file")
        return path
    root = project_root()
    return next((root / name for name in AZURE_CONFIG_FILES if _looks_like_azure_config(root / name)), None)


def _looks_like_azure_config(path: Path) -> bool:
    """A found-by-convention file counts only if it names a subscription: an unrelated
    `config.json` in the checkout must not switch tracking to Azure (an explicit
    $FEDXVIT_AZUREML_CONFIG is always read, and complains when it is malformed)."""
    try:
        return path.is_file() and "subscription_id" in json.loads(path.read_text())
    except (OSError, ValueError, TypeError):
        return False


def read_azure_config(path: os.PathLike) -> dict:
    """The workspace config.json Azure ML gives (subscription_id, resource_group, workspace_name) plus its region."""
    path = Path(path)
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise FedXViTError(f"Azure ML config {path} cannot be read: {exc}") from None
    missing = [key for key in AZURE_KEYS if not (isinstance(config, dict) and config.get(key))]
    if missing:
        fix = (
            'add "location": "<region>", the workspace\'s region as the Azure portal or '
            "`az ml workspace show --query location` shows it (e.g. westeurope)"
            if missing == ["location"]
            else 'download it from the workspace\'s overview page in Azure ML studio and add its "location"'
        )
        raise FedXViTError(
            f"Azure ML config {path} lacks {', '.join(missing)}: {fix}; or remove it to use the local MLflow store"
        )
    return config


def workspace_path(config: dict) -> str:
    return (
        f"/subscriptions/{config['subscription_id']}/resourceGroups/{config['resource_group']}"
        f"/providers/Microsoft.MachineLearningServices/workspaces/{config['workspace_name']}"
    )


def azure_tracking_uri(config: dict) -> str:
    """The workspace's MLflow tracking URI, built as Microsoft documents for azureml-mlflow:
    `azureml://<region>.api.azureml.ms/mlflow/v1.0/<workspace path>`. (A private-link workspace has
    another URI: set $MLFLOW_TRACKING_URI to `az ml workspace show --query mlflow_tracking_uri` instead.)"""
    return f"azureml://{config['location']}.api.azureml.ms/mlflow/v1.0{workspace_path(config)}"


def describe(uri: str) -> str:
    """The URI with any user:password removed, for messages and logs."""
    parts = urlsplit(uri)
    if parts.username or parts.password:
        host = parts.hostname + (f":{parts.port}" if parts.port else "")
        return urlunsplit(parts._replace(netloc=f"***@{host}"))
    return uri


def one_line(exc: BaseException, limit: int = 300) -> str:
    """The gist of an error on one line: azure-identity's troubleshooting footer dropped, URI passwords masked."""
    text = " ".join(str(exc).split("To mitigate this issue")[0].split()) or type(exc).__name__
    text = re.sub(r"://[^/@\s]+@", "://***@", text)
    return text if len(text) <= limit else text[:limit] + "..."


def _bounded(fn, timeout_s: float, what: str):
    """fn() in a daemon thread; a FedXViTError if it takes longer than timeout_s (the thread is left behind)."""
    result: dict = {}

    def target():
        try:
            result["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            result["error"] = exc

    thread = threading.Thread(target=target, name=f"fedxvit-{what}", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise FedXViTError(f"{what}: no answer within {timeout_s:g} s")
    if "error" in result:
        raise result["error"]
    return result.get("value")


def azure_token(workspace: str, timeout_s: float = DEFAULT_TIMEOUT_S, credential=None) -> str:
    """A token from azure-identity's DefaultAzureCredential, the credential azureml-mlflow itself uses (az login,
    or a service principal in AZURE_CLIENT_ID / AZURE_TENANT_ID / AZURE_CLIENT_SECRET, or a managed identity):
    asked first so that a credential problem reads as one line instead of the store's retry errors."""

    def get():
        from azure.identity import DefaultAzureCredential

        return (credential or DefaultAzureCredential()).get_token(AZURE_SCOPE).token

    quiet = logging.getLogger("azure.identity")  # its multi-line warning would repeat our one line
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        return _bounded(get, timeout_s, "Azure credential")
    except Exception as exc:
        raise FedXViTError(
            f"Azure ML workspace '{workspace}': no Azure credential works - run `az login`, or set "
            f"AZURE_CLIENT_ID, AZURE_TENANT_ID and AZURE_CLIENT_SECRET for a service principal "
            f"({one_line(exc)})"
        ) from None
    finally:
        quiet.setLevel(level)


def tracking_uri(explicit: str | None = None, environ: dict | None = None) -> str:
    """Explicit URI, else $MLFLOW_TRACKING_URI, else the Azure ML workspace config, else the local SQLite store."""
    environ = os.environ if environ is None else environ
    if explicit or environ.get(ENV_VAR):
        return explicit or environ[ENV_VAR]
    config_path = find_azure_config(environ)
    if config_path is not None:
        return azure_tracking_uri(read_azure_config(config_path))
    return local_store()[0]


def check_tracking_store(uri: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """One clear FedXViTError, within about timeout_s, if the store cannot be written to or read from.

    The time bound is for a server or workspace that may never answer; a local SQLite file answers
    or fails by itself, and creating its tables can take longer than the bound on a busy machine."""
    local = uri.startswith("sqlite:///")
    if local:
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    if uri.startswith("azureml:"):  # a credential problem reads better than the store's retry errors
        azure_token(uri.rsplit("/", 1)[-1], timeout_s)

    def query():
        from mlflow import MlflowClient

        MlflowClient(uri).search_experiments(max_results=1)

    try:
        query() if local else _bounded(query, timeout_s, f"MLflow tracking store {describe(uri)}")
    except FedXViTError:
        raise
    except Exception as exc:
        raise FedXViTError(f"MLflow tracking store {describe(uri)} is unreachable: {one_line(exc)}") from None


def resolve_tracking(
    explicit: str | None = None, local_fallback: bool | None = None, timeout_s: float = DEFAULT_TIMEOUT_S, warn=print
) -> str:
    """The checked tracking URI; on failure the local store only if the caller (or
    FEDXVIT_MLFLOW_FALLBACK=local) opted in."""
    if local_fallback is None:
        local_fallback = os.environ.get(FALLBACK_ENV, "").lower() == "local"
    try:
        uri = tracking_uri(explicit)
        check_tracking_store(uri, timeout_s)
        return uri
    except FedXViTError as exc:
        if not local_fallback:
            raise FedXViTError(
                f"{exc}. Nothing was logged; fix the tracking set-up, or opt into the local store "
                f"with {FALLBACK_ENV}=local (job variable: tracking_local_fallback)"
            ) from None
        uri = local_store()[0]
        warn(f"{exc}; logging to the local store {uri} instead (local fallback was asked for)")
        check_tracking_store(uri, timeout_s)
        return uri


def ensure_experiment(client, name: str, uri: str, tags: dict | None = None) -> str:
    """Id of experiment `name`, created on first use with local-store artifacts beside the database."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    return client.create_experiment(name, artifact_location=artifact_location(uri), tags=tags)


@contextlib.contextmanager
def mlflow_run(
    experiment: str,
    run_name: str | None = None,
    params: dict | None = None,
    uri: str | None = None,
    tags: dict | None = None,
):
    """Open an MLflow run in `experiment` (created on first use) with params logged; yields mlflow."""
    import mlflow

    uri = resolve_tracking(uri)
    mlflow.set_tracking_uri(uri)
    ensure_experiment(mlflow.MlflowClient(uri), experiment, uri)
    mlflow.set_experiment(experiment)
    with mlflow.start_run(run_name=run_name, tags=tags):
        if params:
            mlflow.log_params(
                {k: (v if v is None or isinstance(v, (int, float, str, bool)) else str(v)) for k, v in params.items()}
            )
        yield mlflow
