"""Where MLflow runs go, what the federated job tracks, and how models are versioned.

Where (first match wins): an explicit URI (a CLI option or the job's `tracking_uri`), then
$MLFLOW_TRACKING_URI (a shared `mlflow server`, or an `azureml://` URI), then an Azure ML
workspace `config.json` ($FEDXVIT_AZUREML_CONFIG, else `.azureml/config.json` or
`config.json` in the checkout) turned into the workspace's `azureml://` tracking URI, else
the local store `sqlite:///<root>/mlruns/mlflow.db` with artifacts in `<root>/mlruns/artifacts`,
where <root> is the fedxvit checkout (`fedxvit.paths.project_root`), so scripts and the
NVFlare simulator's workspace folders share one store.
SQLite rather than MLflow's file store because the file store is deprecated and the UI
reads SQLite directly:

    mlflow ui --backend-store-uri sqlite:///$PWD/mlruns/mlflow.db

A store that cannot be reached (or an Azure credential that does not work) is one
FedXViTError within a bounded time, never a silent switch to another store; the local store
is used instead only when the caller opts in (`local_fallback`, or FEDXVIT_MLFLOW_FALLBACK=local).
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
AZURE_KEYS = ("subscription_id", "resource_group", "workspace_name")
ARM_URL = "https://management.azure.com"
ARM_SCOPE = f"{ARM_URL}/.default"
ARM_API_VERSION = "2024-04-01"
DEFAULT_TIMEOUT_S = 30.0

# Metric names of the federated job (step = round number); result scripts read these.
SITE_ROUND_METRICS = ("train_loss", "train_accuracy", "local_val_accuracy", "local_val_loss",
                      "global_model_val_accuracy", "global_model_val_loss")
SITE_EPOCH_METRICS = ("epoch_train_loss", "epoch_train_accuracy")  # step = round x local_epochs + epoch
SERVER_ROUND_METRICS = ("global_val_accuracy", "global_val_loss", "clients_per_round")
AGGREGATED_METRIC_PREFIX = "aggregated."  # server metric aggregated.<site>: 1 = in the round's model, 0 = dropped
SITE_TAG, ROLE_TAG = "site", "role"  # MLflow run tags: which site a run is, and "site" or "server"
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
    """The workspace config.json Azure ML gives (subscription_id, resource_group, workspace_name[, location])."""
    path = Path(path)
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise FedXViTError(f"Azure ML config {path} cannot be read: {exc}") from None
    missing = [key for key in AZURE_KEYS if not (isinstance(config, dict) and config.get(key))]
    if missing:
        raise FedXViTError(f"Azure ML config {path} lacks {', '.join(missing)} (download it from the workspace's "
                           f"overview page in Azure ML studio, or remove it to use the local MLflow store)")
    return config


def workspace_path(config: dict) -> str:
    return (f"/subscriptions/{config['subscription_id']}/resourceGroups/{config['resource_group']}"
            f"/providers/Microsoft.MachineLearningServices/workspaces/{config['workspace_name']}")


def azure_tracking_uri(config: dict, location: str | None = None) -> str:
    """The workspace's MLflow tracking URI, `azureml://<region>.api.azureml.ms/mlflow/v1.0/<workspace path>`."""
    location = location or config.get("location")
    if not location:
        raise FedXViTError(f"Azure ML workspace '{config.get('workspace_name')}': its region is unknown "
                           f"(add \"location\" to config.json or let fedxvit look it up with Azure credentials)")
    return f"azureml://{location}.api.azureml.ms/mlflow/v1.0{workspace_path(config)}"


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
    """An Azure Resource Manager token from azure-identity's DefaultAzureCredential (az login, or a
    service principal in AZURE_CLIENT_ID / AZURE_TENANT_ID / AZURE_CLIENT_SECRET, or a managed identity)."""
    def get():
        from azure.identity import DefaultAzureCredential
        return (credential or DefaultAzureCredential()).get_token(ARM_SCOPE).token
    quiet = logging.getLogger("azure.identity")  # its multi-line warning would repeat our one line
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        return _bounded(get, timeout_s, "Azure credential")
    except Exception as exc:
        raise FedXViTError(f"Azure ML workspace '{workspace}': no Azure credential works - run `az login`, or set "
                           f"AZURE_CLIENT_ID, AZURE_TENANT_ID and AZURE_CLIENT_SECRET for a service principal "
                           f"({one_line(exc)})") from None
    finally:
        quiet.setLevel(level)


def azure_workspace_tracking_uri(config: dict, timeout_s: float = DEFAULT_TIMEOUT_S, credential=None) -> str:
    """The tracking URI of the workspace in config, asking Azure Resource Manager for its region if config lacks it."""
    if config.get("location"):
        return azure_tracking_uri(config)
    import requests

    name = config["workspace_name"]
    token = azure_token(name, timeout_s, credential)
    url = f"{ARM_URL}{workspace_path(config)}?api-version={ARM_API_VERSION}"
    try:
        response = requests.get(url, headers={"Authorization": f"Bearer {token}"}, timeout=timeout_s)
    except requests.RequestException as exc:
        raise FedXViTError(f"Azure ML workspace '{name}': Azure Resource Manager is unreachable ({one_line(exc)})") from None
    if response.status_code in (401, 403, 404):
        raise FedXViTError(f"Azure ML workspace '{name}' in resource group '{config['resource_group']}': "
                           f"HTTP {response.status_code} - it does not exist or this credential may not read it")
    if not response.ok:
        raise FedXViTError(f"Azure ML workspace '{name}': Azure Resource Manager answered HTTP {response.status_code}")
    body = response.json()
    return body.get("properties", {}).get("mlFlowTrackingUri") or azure_tracking_uri(config, body.get("location"))


def tracking_uri(explicit: str | None = None, environ: dict | None = None,
                 timeout_s: float = DEFAULT_TIMEOUT_S) -> str:
    """Explicit URI, else $MLFLOW_TRACKING_URI, else the Azure ML workspace config, else the local SQLite store."""
    environ = os.environ if environ is None else environ
    if explicit or environ.get(ENV_VAR):
        return explicit or environ[ENV_VAR]
    config_path = find_azure_config(environ)
    if config_path is not None:
        return azure_workspace_tracking_uri(read_azure_config(config_path), timeout_s)
    return local_store()[0]


def check_tracking_store(uri: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """One clear FedXViTError, within about timeout_s, if the store cannot be written to or read from."""
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    if uri.startswith("azureml:"):  # a credential problem reads better than the store's retry errors
        azure_token(uri.rsplit("/", 1)[-1], timeout_s)

    def query():
        from mlflow import MlflowClient
        MlflowClient(uri).search_experiments(max_results=1)
    try:
        _bounded(query, timeout_s, f"MLflow tracking store {describe(uri)}")
    except FedXViTError:
        raise
    except Exception as exc:
        raise FedXViTError(f"MLflow tracking store {describe(uri)} is unreachable: {one_line(exc)}") from None


def resolve_tracking(explicit: str | None = None, local_fallback: bool | None = None,
                     timeout_s: float = DEFAULT_TIMEOUT_S, warn=print) -> str:
    """The checked tracking URI; on failure the local store only if the caller (or FEDXVIT_MLFLOW_FALLBACK=local) opted in."""
    if local_fallback is None:
        local_fallback = os.environ.get(FALLBACK_ENV, "").lower() == "local"
    try:
        uri = tracking_uri(explicit, timeout_s=timeout_s)
        check_tracking_store(uri, timeout_s)
        return uri
    except FedXViTError as exc:
        if not local_fallback:
            raise FedXViTError(f"{exc}. Nothing was logged; fix the tracking set-up, or opt into the local store "
                               f"with {FALLBACK_ENV}=local (job variable: tracking_local_fallback)") from None
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
def mlflow_run(experiment: str, run_name: str | None = None, params: dict | None = None,
               uri: str | None = None, tags: dict | None = None):
    """Open an MLflow run in `experiment` (created on first use) with params logged; yields mlflow."""
    import mlflow

    uri = resolve_tracking(uri)
    mlflow.set_tracking_uri(uri)
    ensure_experiment(mlflow.MlflowClient(uri), experiment, uri)
    mlflow.set_experiment(experiment)
    with mlflow.start_run(run_name=run_name, tags=tags):
        if params:
            mlflow.log_params({k: (v if v is None or isinstance(v, (int, float, str, bool)) else str(v)) for k, v in params.items()})
        yield mlflow


# ---- what the federated job tracks
def site_round_metrics(global_scores: dict, train_metrics: dict) -> dict:
    """A site's metrics for one round: its score of the received global model, its training and local validation."""
    return {"train_loss": train_metrics["train_loss"], "train_accuracy": train_metrics["train_accuracy"],
            "local_val_accuracy": train_metrics["local_val_accuracy"], "local_val_loss": train_metrics["local_val_loss"],
            "global_model_val_accuracy": global_scores["val_accuracy"],
            "global_model_val_loss": global_scores["val_loss"]}


def site_epoch_metrics(epoch_metrics: dict) -> dict:
    """A site's training loss/accuracy of one local epoch (fedxvit.training.train_epoch's result)."""
    return {"epoch_train_loss": epoch_metrics["loss"], "epoch_train_accuracy": epoch_metrics["accuracy"]}


def server_round_metrics(row: dict) -> dict:
    """The server's metrics for one round from a GlobalValidationTracker row; `aggregated.<site>` is 1
    when that site's update went into the round's model, 0 when it was dropped."""
    taking_part = {**{site: 0.0 for site in row.get("dropped_sites", {})},
                   **{site: 1.0 for site in row.get("aggregated_sites", [])}}
    return {"global_val_accuracy": row["global_val_accuracy"], "global_val_loss": row["global_val_loss"],
            "clients_per_round": row["num_sites"],
            **{f"{AGGREGATED_METRIC_PREFIX}{site}": flag for site, flag in sorted(taking_part.items())}}


def merge_site_params(site_params: dict, base: dict | None = None) -> dict:
    """Sites' run parameters for the server's run: each site's `data_hash.<site>`, every other
    parameter once when all sites agree (and `base` does not already say it), else `<name>.<site>`."""
    base = {k: str(v) for k, v in (base or {}).items()}
    merged = {}
    for key in sorted({k for params in site_params.values() for k in params}):
        values = {site: str(params[key]) for site, params in site_params.items() if key in params}
        agreed = key != "data_hash" and len(values) == len(site_params) and len(set(values.values())) == 1
        if agreed and base.get(key, next(iter(values.values()))) == next(iter(values.values())):
            if key not in base:
                merged[key] = next(iter(values.values()))
        else:
            merged.update({f"{key}.{site}": value for site, value in sorted(values.items())})
    return merged


# ---- versioning
def log_registered_model(model, uri: str, run_id: str, artifact_name: str, registered_name: str,
                         tags: dict | None = None) -> str:
    """Log `model` into run `run_id` as an MLflow PyTorch model (torch.export "pt2" format, which loads
    without unpickling code) with a tensor signature, register it as a new version of `registered_name`,
    tag that version; returns the version."""
    import mlflow
    import numpy as np
    import torch
    from mlflow.models import infer_signature

    size, channels = model.preset.image_size, model.preset.in_chans
    example = np.zeros((2, channels, size, size), dtype=np.float32)
    model = model.cpu().eval()
    with torch.no_grad():
        output = model(torch.from_numpy(example)).numpy()
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pytorch.log_model(model, name=artifact_name, signature=infer_signature(example, output),
                                        input_example=example, registered_model_name=registered_name,
                                        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"])
    version = str(info.registered_model_version)
    client = mlflow.MlflowClient(uri)
    for key, value in (tags or {}).items():
        client.set_model_version_tag(registered_name, version, key, str(value))
    return version
