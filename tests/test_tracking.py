"""Where MLflow runs go (local store, a server by URI, Azure ML by config) and how failures read; no network.
The server's tracking widget around NVFlare's real MLflowReceiver, in process on a SQLite store: runs, tags,
the server's metrics, the end-of-run record (fedxvit.run_record), and a restarted job continuing its runs."""

import json
import time
from pathlib import Path

import pytest
from nvflare.apis.analytix import ANALYTIC_EVENT_TYPE, AnalyticsDataType, LogWriterName, TrackConst
from nvflare.apis.client import Client
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import EventScope, FLContextKey, ProcessType, ReservedKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.utils.analytix_utils import create_analytic_dxo
from nvflare.apis.workspace import Workspace
from tiny import free_port, write_tiny_run

from fedxvit import protocol, run_record, tracking
from fedxvit.errors import FedXViTError
from fedxvit.receivers import FederatedMLflowTracking

WORKSPACE = {
    "subscription_id": "0b1f6471-1bf0-4dda-aec3-111122223333",
    "resource_group": "rg-hospitals",
    "workspace_name": "fedxvit-ws",
}
WORKSPACE_PATH = (
    "/subscriptions/0b1f6471-1bf0-4dda-aec3-111122223333/resourceGroups/rg-hospitals"
    "/providers/Microsoft.MachineLearningServices/workspaces/fedxvit-ws"
)


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
    assert tracking.azure_tracking_uri({**WORKSPACE, "location": "eastus2"}) == (
        f"azureml://eastus2.api.azureml.ms/mlflow/v1.0{WORKSPACE_PATH}"
    )
    # an explicit URI and $MLFLOW_TRACKING_URI win over the workspace config; nothing configured: the local store
    assert (
        tracking.tracking_uri("http://mlflow:5000", environ={tracking.AZURE_CONFIG_ENV: config}) == "http://mlflow:5000"
    )
    assert (
        tracking.tracking_uri(environ={tracking.AZURE_CONFIG_ENV: config, tracking.ENV_VAR: "sqlite:///x.db"})
        == "sqlite:///x.db"
    )
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


def test_a_workspace_config_without_its_region_says_how_to_find_it(tmp_path):
    """The config.json Azure ML studio gives has no region; the documented URI needs it, and nothing is looked up."""
    with pytest.raises(FedXViTError) as failure:
        tracking.tracking_uri(environ={tracking.AZURE_CONFIG_ENV: write_config(tmp_path)})
    message = str(failure.value)
    assert "\n" not in message and str(tmp_path / "config.json") in message
    assert "lacks location" in message and "az ml workspace show --query location" in message


def test_unauthenticated_azure_stops_with_one_clear_line(tmp_path, no_tracking_env):
    """A service principal whose sign-in cannot succeed (authority on a closed local port): no store, no
    fallback -- one line naming the workspace and what to fix."""
    monkeypatch = no_tracking_env
    monkeypatch.setenv(tracking.AZURE_CONFIG_ENV, write_config(tmp_path, location="westeurope"))
    monkeypatch.setenv("AZURE_CLIENT_ID", "00000000-0000-0000-0000-00000000c11e")
    monkeypatch.setenv("AZURE_TENANT_ID", "00000000-0000-0000-0000-000000007e4")
    monkeypatch.setenv("AZURE_CLIENT_SECRET", "not-a-secret")
    monkeypatch.setenv("AZURE_AUTHORITY_HOST", f"https://127.0.0.1:{free_port()}")
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
    uri = f"http://tracker:s3cret@127.0.0.1:{free_port()}"
    with pytest.raises(
        FedXViTError, match=r"MLflow tracking store http://\*\*\*@127\.0\.0\.1:\d+ is unreachable"
    ) as failure:
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


def test_the_widget_stops_the_run_instead_of_running_untracked(no_tracking_env):
    no_tracking_env.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    widget = FederatedMLflowTracking(tracking_uri=f"http://127.0.0.1:{free_port()}", timeout_s=20)
    panics = []
    widget.system_panic = lambda reason, fl_ctx: panics.append(reason)
    widget.handle_event(EventType.START_RUN, FLContext())
    assert len(panics) == 1 and panics[0].startswith("fedxvit tracking: MLflow tracking store http://127.0.0.1:")
    assert (
        widget.receiver is None
    )  # no NVFlare receiver was built: every later event is dropped, none written elsewhere
    widget.handle_event(EventType.END_RUN, FLContext())  # an engine-less context: anything it tried would raise


def test_site_parameters_on_the_server_run():
    sites = {
        "site1": {"data_hash": "aa", "learning_rate": 0.001, "preset": "cpu", "local_epochs": 1},
        "site2": {"data_hash": "bb", "learning_rate": 0.01, "preset": "cpu", "local_epochs": 1},
    }
    merged = run_record.merge_site_params(sites, base={"preset": "cpu", "num_rounds": 5})
    assert merged == {
        "data_hash.site1": "aa",
        "data_hash.site2": "bb",
        "local_epochs": "1",
        "learning_rate.site1": "0.001",
        "learning_rate.site2": "0.01",
    }
    # a site disagreeing with the server's own parameter is recorded per site, never overwriting it
    assert run_record.merge_site_params({"site1": {"preset": "tiny"}}, base={"preset": "cpu"}) == {
        "preset.site1": "tiny"
    }


def test_the_post_run_step_names_what_it_cannot_use(tmp_path):
    with pytest.raises(FedXViTError, match=f"run folder {tmp_path / 'nowhere'} does not exist"):
        run_record.main([str(tmp_path / "nowhere")])
    run_dir = (
        tmp_path / "simulate_job"
    )  # a simulator run folder's name says nothing about its runs: it needs its record
    run_dir.mkdir()
    with pytest.raises(FedXViTError, match="has no mlflow_runs.json: the job did not track to MLflow"):
        run_record.main([str(run_dir)])
    (run_dir / run_record.RUN_RECORD).write_text("[]")
    with pytest.raises(FedXViTError, match=r"simulate_job/mlflow_runs\.json is not a run record"):
        run_record.main([str(run_dir)])


def test_metric_names_have_one_home():
    """The executor's and the server widget's metric dicts carry exactly the declared names."""
    row = {"global_val_accuracy": 0.9, "global_val_loss": 0.3, "num_sites": 3, "val_count": 12}
    assert protocol.server_round_metrics(row) == {
        "global_val_accuracy": 0.9,
        "global_val_loss": 0.3,
        "clients_per_round": 3,
    }
    train = {"train_loss": 0.5, "train_accuracy": 0.8, "local_val_accuracy": 0.7, "local_val_loss": 0.6, "steps": 4}
    site = protocol.site_round_metrics({"val_accuracy": 0.75, "val_loss": 0.65, "val_count": 4}, train)
    assert tuple(site) == protocol.SITE_ROUND_METRICS
    assert (site["global_model_val_accuracy"], site["train_loss"]) == (0.75, 0.5)
    assert protocol.site_epoch_metrics({"loss": 0.4, "accuracy": 0.9}) == {
        "epoch_train_loss": 0.4,
        "epoch_train_accuracy": 0.9,
    }
    assert tuple(protocol.site_epoch_metrics({"loss": 0, "accuracy": 0})) == protocol.SITE_EPOCH_METRICS


# ---- the widget around NVFlare's real MLflowReceiver, in process
class ServerEngine:
    """What the widget and NVFlare's receiver ask of the server's engine: its clients, workspace and events."""

    def __init__(self, root: Path, sites):
        for folder in ("startup", "local"):  # what NVFlare checks a workspace has
            (root / folder).mkdir(parents=True, exist_ok=True)
        self.workspace = Workspace(str(root), "server")
        self.clients = [Client(name, None) for name in sites]
        self.events = []

    def get_clients(self):
        return self.clients

    def get_workspace(self):
        return self.workspace

    def fire_event(self, event_type, fl_ctx):
        self.events.append((event_type, fl_ctx.get_prop(FLContextKey.EVENT_DATA)))


def server_context(engine: ServerEngine, job_id: str) -> FLContext:
    fl_ctx = FLContext()
    for key, value in (
        (ReservedKey.ENGINE, engine),
        (ReservedKey.RUN_NUM, job_id),
        (ReservedKey.IDENTITY_NAME, SERVER),
        (ReservedKey.PROCESS_TYPE, ProcessType.SERVER_JOB),
    ):
        fl_ctx.set_prop(key, value, private=False, sticky=True)
    return fl_ctx


def send(widget, fl_ctx: FLContext, tag: str, value, data_type, step=None, site=None) -> None:
    """An analytics event as NVFlare delivers it on the server: a site's arrives as a fed. event, the
    server's as local."""
    data = create_analytic_dxo(
        tag,
        value,
        data_type,
        writer=LogWriterName.MLFLOW,
        **({TrackConst.GLOBAL_STEP_KEY: step} if step is not None else {}),
    ).to_shareable()
    if site:
        data.set_peer_props({ReservedKey.IDENTITY_NAME: site})
    fl_ctx.set_prop(FLContextKey.EVENT_DATA, data, private=True, sticky=False)
    fl_ctx.set_prop(
        FLContextKey.EVENT_SCOPE, EventScope.FEDERATION if site else EventScope.LOCAL, private=True, sticky=False
    )
    widget.handle_event(f"fed.{ANALYTIC_EVENT_TYPE}" if site else ANALYTIC_EVENT_TYPE, fl_ctx)


def job_runs(client, job: str) -> dict:
    experiment = client.get_experiment_by_name(tracking.FEDERATED_EXPERIMENT)
    return {
        r.data.tags[tracking.SITE_TAG]: r
        for r in client.search_runs([experiment.experiment_id], f"tags.job_id = '{job}'")
    }


SERVER = "server"
SITES = ("site1", "site2")


def test_a_job_tracked_through_nvflares_receiver_and_recorded_once(tmp_path, no_tracking_env):
    from mlflow import MlflowClient

    from result_stat import run_all

    tiny = write_tiny_run(tmp_path, sites=SITES)  # the run folder: job config, persistor files, global_val, cross-site
    run_dir = tiny["run_dir"]
    (run_dir / "app_server" / "best_FL_global_model.pt").unlink()  # one torch.export less (the simulator test has both)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    engine = ServerEngine(run_dir.parent, SITES)
    fl_ctx = server_context(engine, "simulate_job")
    widget = FederatedMLflowTracking(tracking_uri=uri, params={"preset": "tiny", "num_rounds": 2})
    widget.handle_event(EventType.START_RUN, fl_ctx)
    assert engine.events == []  # no panic

    record = json.loads((run_dir / run_record.RUN_RECORD).read_text())
    job = record["job_id"]
    runs = job_runs(client, job)
    assert set(runs) == {*SITES, SERVER} and record["runs"] == {k: r.info.run_id for k, r in runs.items()}
    assert {site: r.data.tags[tracking.ROLE_TAG] for site, r in runs.items()} == {
        "site1": "site",
        "site2": "site",
        SERVER: "server",
    }
    assert record["tracking_uri"] == uri and record["server"] == SERVER

    for i, site in enumerate(SITES):
        send(
            widget,
            fl_ctx,
            "params",
            {"preset": "tiny", "learning_rate": 0.001, "data_hash": f"hash{i}"},
            AnalyticsDataType.PARAMETERS,
            site=site,
        )
        send(widget, fl_ctx, "train_loss", 0.5 + i, AnalyticsDataType.METRIC, step=0, site=site)
    for step in (0, 1):
        send(widget, fl_ctx, "global_val_accuracy", 0.5 + 0.1 * step, AnalyticsDataType.METRIC, step=step)
    widget.handle_event(EventType.END_RUN, fl_ctx)

    runs = job_runs(client, job)
    assert all(r.info.status == "FINISHED" for r in runs.values())
    assert [(m.step, m.value) for m in client.get_metric_history(runs["site2"].info.run_id, "train_loss")] == [(0, 1.5)]
    assert sorted(
        (m.step, m.value) for m in client.get_metric_history(runs[SERVER].info.run_id, "global_val_accuracy")
    ) == [(0, 0.5), (1, 0.6)]
    assert "global_val_accuracy" not in runs["site1"].data.metrics  # the server's metrics stay on the server's run
    assert runs[SERVER].data.params == {
        "preset": "tiny",
        "num_rounds": "2",
        "sites": "site1,site2",
        "learning_rate": "0.001",
        "data_hash.site1": "hash0",
        "data_hash.site2": "hash1",
    }
    (version,) = client.search_model_versions("name='fedxvit-global'")
    assert version.run_id == runs[SERVER].info.run_id and version.tags["model"] == "final"
    assert (version.tags["job_id"], version.tags["preset"], version.tags["data_hash.site2"]) == (job, "tiny", "hash1")
    assert float(version.tags["last_round.global_val_accuracy"]) == pytest.approx(0.6)  # write_tiny_run's round 1
    assert float(version.tags["cross_site_val_accuracy"]) == pytest.approx(0.5)  # pooled: 0.5 at each site
    assert client.search_model_versions("name='fedxvit-global-best'") == []  # no best model file, nothing registered

    # `make results` attaches its folder to the same server run and registers nothing twice
    out = tmp_path / "results"
    (out / "gradcam" / "site1").mkdir(parents=True)  # result_stat.gradcam's per-image parts stay by default
    (out / "gradcam" / "site1" / "3f2a.png").write_bytes(b"overlay")
    (out / "gradcam_site1.png").write_bytes(b"contact sheet")
    per_site = {"n": 1, "images": [{"image": "3f2a", "p_tumor": 0.9}], "contact_sheet": str(out / "gradcam_site1.png")}
    (out / "gradcam.json").write_text(json.dumps({"pointing_game": 1.0, "per_site": {"site1": per_site}}))
    (out / "summary.json").write_text("{}")
    message = run_all.attach_to_mlflow(out, run_dir, uri)
    assert runs[SERVER].info.run_id in message and "registered" not in message and "no best global model" in message
    assert "without its 4 per-image parts" in message
    assert [a.path for a in client.list_artifacts(runs[SERVER].info.run_id, "results")] == [
        "results/gradcam.json",
        "results/summary.json",
    ]
    uploaded = client.download_artifacts(runs[SERVER].info.run_id, "results/gradcam.json", str(tmp_path))
    assert json.loads(Path(uploaded).read_text()) == {"pointing_game": 1.0, "per_site": {"site1": {"n": 1}}}
    run_all.attach_to_mlflow(out, run_dir, uri, per_image=True)  # opted in: all of it
    assert {a.path for a in client.list_artifacts(runs[SERVER].info.run_id, "results")} == {
        "results/gradcam",
        "results/gradcam.json",
        "results/gradcam_site1.png",
        "results/summary.json",
    }
    assert client.list_artifacts(runs["site1"].info.run_id) == []
    assert len(client.search_model_versions("name='fedxvit-global'")) == 1
    (run_dir / run_record.RUN_RECORD).unlink()
    assert "has no mlflow_runs.json" in run_all.attach_to_mlflow(out, run_dir, uri)

    # the simulator calls every job simulate_job: a second simulation opens runs of its own
    widget = FederatedMLflowTracking(tracking_uri=uri)
    widget.handle_event(EventType.START_RUN, server_context(engine, "simulate_job"))
    assert json.loads((run_dir / run_record.RUN_RECORD).read_text())["runs"][SERVER] != runs[SERVER].info.run_id


def test_a_restarted_or_continued_job_goes_on_in_its_runs(tmp_path, no_tracking_env):
    """A server that starts the same job again (same job id), or a continuation job told `continue_job`
    (tooling.poc after a server crash), writes into the job's runs; no new ones appear. Each round's
    site metrics are written when the round ends, so a server killed between rounds loses none."""
    from mlflow import MlflowClient
    from nvflare.app_common.app_event_type import AppEventType

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    engine = ServerEngine(tmp_path / "server", SITES)
    for job_id in ("4f1c-job", "5a2b-job"):
        (tmp_path / "server" / job_id).mkdir()  # the jobs' run folders, as NVFlare makes them
    first = FederatedMLflowTracking(tracking_uri=uri, params={"num_rounds": 3})
    first.handle_event(EventType.START_RUN, server_context(engine, "4f1c-job"))
    assert engine.events == []  # no panic
    send(first, server_context(engine, "4f1c-job"), "train_loss", 0.9, AnalyticsDataType.METRIC, step=0, site="site1")
    first.handle_event(AppEventType.ROUND_DONE, server_context(engine, "4f1c-job"))  # then the server dies
    before = {site: r.info.run_id for site, r in job_runs(client, "4f1c-job").items()}
    assert set(before) == {*SITES, SERVER}
    assert [(m.step, m.value) for m in client.get_metric_history(before["site1"], "train_loss")] == [(0, 0.9)]

    for step, (job_id, continue_job) in enumerate((("4f1c-job", ""), ("5a2b-job", "4f1c-job")), start=1):
        again = FederatedMLflowTracking(tracking_uri=uri, params={"num_rounds": 3}, continue_job=continue_job)
        fl_ctx = server_context(engine, job_id)
        again.handle_event(EventType.START_RUN, fl_ctx)
        assert engine.events == []
        send(again, fl_ctx, "train_loss", 0.7 - 0.1 * step, AnalyticsDataType.METRIC, step=step, site="site1")
        send(again, fl_ctx, "global_val_accuracy", 0.8 + 0.1 * step, AnalyticsDataType.METRIC, step=step)
        again.receiver.handle_event(EventType.END_RUN, fl_ctx)

    after = job_runs(client, "4f1c-job")
    assert {site: r.info.run_id for site, r in after.items()} == before
    history = client.get_metric_history(before["site1"], "train_loss")
    assert sorted((m.step, round(m.value, 6)) for m in history) == [(0, 0.9), (1, 0.6), (2, 0.5)]
    server_history = client.get_metric_history(before[SERVER], "global_val_accuracy")
    assert sorted((m.step, round(m.value, 6)) for m in server_history) == [(1, 0.9), (2, 1.0)]
    assert len(client.search_runs([after[SERVER].info.experiment_id])) == 3
    assert job_runs(client, "5a2b-job") == {}
    assert run_record.find_job_runs(client, after[SERVER].info.experiment_id, "other-job") == {}
