"""Where MLflow runs go (local store, a server by URI, Azure ML by config) and how failures read; no network."""

import json
import socket
import time

import pytest

from nvflare.apis.event_type import EventType
from nvflare.apis.fl_context import FLContext

from fedxvit import tracking
from fedxvit.errors import FedXViTError
from fedxvit.receivers import FedXViTMLflowReceiver

WORKSPACE = {"subscription_id": "0b1f6471-1bf0-4dda-aec3-111122223333", "resource_group": "rg-hospitals",
             "workspace_name": "fedxvit-ws"}
WORKSPACE_PATH = ("/subscriptions/0b1f6471-1bf0-4dda-aec3-111122223333/resourceGroups/rg-hospitals"
                  "/providers/Microsoft.MachineLearningServices/workspaces/fedxvit-ws")


def closed_port() -> int:
    """A local port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def no_tracking_env(monkeypatch):
    for var in (tracking.ENV_VAR, tracking.AZURE_CONFIG_ENV, tracking.FALLBACK_ENV):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def write_config(tmp_path, **extra) -> str:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**WORKSPACE, **extra}))
    return str(path)


def test_azure_tracking_uri_from_a_workspace_config(tmp_path, no_tracking_env):
    config = write_config(tmp_path, location="westeurope")
    expected = f"azureml://westeurope.api.azureml.ms/mlflow/v1.0{WORKSPACE_PATH}"
    assert tracking.tracking_uri(environ={tracking.AZURE_CONFIG_ENV: config}) == expected
    assert tracking.azure_tracking_uri(WORKSPACE, "eastus2").startswith("azureml://eastus2.api.azureml.ms/mlflow/v1.0/")
    # an explicit URI and $MLFLOW_TRACKING_URI win over the workspace config; nothing configured: the local store
    assert tracking.tracking_uri("http://mlflow:5000", environ={tracking.AZURE_CONFIG_ENV: config}) == "http://mlflow:5000"
    assert tracking.tracking_uri(environ={tracking.AZURE_CONFIG_ENV: config, tracking.ENV_VAR: "sqlite:///x.db"}) == "sqlite:///x.db"
    no_tracking_env.setattr(tracking, "project_root", lambda: tmp_path / "checkout")  # no workspace config there
    assert tracking.tracking_uri(environ={}) == f"sqlite:///{tmp_path / 'checkout' / 'mlruns' / 'mlflow.db'}"


def test_a_workspace_config_in_the_checkout_is_found_but_an_unrelated_config_json_is_ignored(tmp_path, no_tracking_env):
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    no_tracking_env.setattr(tracking, "project_root", lambda: checkout)
    (checkout / "config.json").write_text(json.dumps({"theme": "dark"}))
    assert tracking.find_azure_config(environ={}) is None
    assert tracking.tracking_uri(environ={}).startswith("sqlite:///")
    write_config(checkout, location="westeurope")
    assert tracking.find_azure_config(environ={}) == checkout / "config.json"
    assert tracking.tracking_uri(environ={}).startswith("azureml://westeurope.")


def test_a_broken_workspace_config_is_one_line_naming_the_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"subscription_id": "s", "workspace_name": "w"}))
    with pytest.raises(FedXViTError, match=r"config\.json lacks resource_group"):
        tracking.read_azure_config(path)
    with pytest.raises(FedXViTError, match="no such Azure ML workspace config"):
        tracking.tracking_uri(environ={tracking.AZURE_CONFIG_ENV: str(tmp_path / "missing.json")})


def test_unauthenticated_azure_stops_with_one_clear_line(tmp_path, no_tracking_env):
    """A service principal whose sign-in cannot succeed (authority on a closed local port): no region lookup,
    no store, no fallback -- one line naming the workspace and what to fix."""
    monkeypatch = no_tracking_env
    monkeypatch.setenv(tracking.AZURE_CONFIG_ENV, write_config(tmp_path))  # no location: ARM lookup needs a token
    monkeypatch.setenv("AZURE_CLIENT_ID", "00000000-0000-0000-0000-00000000c11e")
    monkeypatch.setenv("AZURE_TENANT_ID", "00000000-0000-0000-0000-000000007e4")
    monkeypatch.setenv("AZURE_CLIENT_SECRET", "not-a-secret")
    monkeypatch.setenv("AZURE_AUTHORITY_HOST", f"https://127.0.0.1:{closed_port()}")
    with pytest.raises(FedXViTError) as failure:
        tracking.resolve_tracking(timeout_s=20)
    message = str(failure.value)
    assert "\n" not in message
    assert "Azure ML workspace 'fedxvit-ws'" in message and "az login" in message and "AZURE_CLIENT_SECRET" in message
    assert "Nothing was logged" in message and tracking.FALLBACK_ENV in message
    assert "not-a-secret" not in message


def test_unreachable_server_fails_unless_the_local_fallback_is_asked_for(tmp_path, no_tracking_env):
    monkeypatch = no_tracking_env
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    local = f"sqlite:///{tmp_path / 'local' / 'mlflow.db'}"
    monkeypatch.setattr(tracking, "local_store", lambda: (local, None))
    uri = f"http://tracker:s3cret@127.0.0.1:{closed_port()}"
    with pytest.raises(FedXViTError, match=r"MLflow tracking store http://\*\*\*@127\.0\.0\.1:\d+ is unreachable") as failure:
        tracking.resolve_tracking(uri, timeout_s=20)
    assert "s3cret" not in str(failure.value)
    warnings = []
    assert tracking.resolve_tracking(uri, local_fallback=True, timeout_s=20, warn=warnings.append) == local
    assert len(warnings) == 1 and "local fallback" in warnings[0]
    monkeypatch.setenv(tracking.FALLBACK_ENV, "local")
    assert tracking.resolve_tracking(uri, timeout_s=20, warn=warnings.append) == local


def test_a_store_that_hangs_is_cut_off():
    """Had it waited for the call, the call would have returned normally and nothing would be raised."""
    with pytest.raises(FedXViTError, match="slow store: no answer within 0.2 s"):
        tracking._bounded(lambda: time.sleep(5), 0.2, "slow store")


def test_the_receiver_stops_the_run_instead_of_running_untracked(no_tracking_env):
    no_tracking_env.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    receiver = FedXViTMLflowReceiver(tracking_uri=f"http://127.0.0.1:{closed_port()}", timeout_s=20)
    panics = []
    receiver.system_panic = lambda reason, fl_ctx: panics.append(reason)
    receiver.handle_event(EventType.START_RUN, FLContext())
    assert len(panics) == 1 and panics[0].startswith("fedxvit tracking: MLflow tracking store http://127.0.0.1:")
    assert not receiver._initialized  # so it drops events instead of writing them anywhere


def test_site_parameters_on_the_server_run():
    sites = {"site1": {"data_hash": "aa", "learning_rate": 0.001, "preset": "cpu", "local_epochs": 1},
             "site2": {"data_hash": "bb", "learning_rate": 0.01, "preset": "cpu", "local_epochs": 1}}
    merged = tracking.merge_site_params(sites, base={"preset": "cpu", "num_rounds": 5})
    assert merged == {"data_hash.site1": "aa", "data_hash.site2": "bb", "local_epochs": "1",
                      "learning_rate.site1": "0.001", "learning_rate.site2": "0.01"}
    # a site disagreeing with the server's own parameter is recorded per site, never overwriting it
    assert tracking.merge_site_params({"site1": {"preset": "tiny"}}, base={"preset": "cpu"}) == {"preset.site1": "tiny"}
