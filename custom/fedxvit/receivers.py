"""The server's MLflow tracking: NVFlare's own MLflowReceiver, told where to write, plus a run for the server.

NVFlare's MLflowReceiver turns the sites' analytics events into one MLflow run per site. This
widget builds one, unchanged, and adds what the job needs around it through public APIs only:
- at START_RUN the store is resolved and checked (fedxvit.tracking: the job's `tracking_uri`,
  $MLFLOW_TRACKING_URI, an Azure ML workspace config, else the checkout's local store) and handed
  to the receiver as its `tracking_uri`; a store that cannot be reached stops the job before
  round 0 with one line (the receiver alone would log the error and let the job run untracked),
  unless `local_fallback` is set;
- every run is tagged `site`, `role` and `job_id`, and the server gets a run of its own for the
  job's parameters and the server's analytics events (global validation per round), which the
  receiver does not take: it keeps runs for clients only. The run ids go to
  <run dir>/mlflow_runs.json, where fedxvit.run_record and the result scripts find them;
- a job that starts again under the same id (a restarted server), or a job told to continue
  another one (`continue_job`: tooling.poc's continuation after a server crash), continues that
  job's runs instead of opening new ones;
- the sites' buffered metrics are written at the end of every round, so a server that dies
  between rounds loses none of the finished rounds;
- at END_RUN, fedxvit.run_record puts the sites' parameters on the server run and registers the
  final and best global models. List this widget after NVFlare's ValidationJsonGenerator: that
  one writes the cross-site results at END_RUN, and the model versions are tagged with them.
"""

from __future__ import annotations

import threading
import time

from nvflare.apis.analytix import ANALYTIC_EVENT_TYPE, AnalyticsData, AnalyticsDataType, LogWriterName
from nvflare.apis.dxo import from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import EventScope, FLContextKey
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.app_event_type import AppEventType
from nvflare.app_opt.tracking.mlflow.mlflow_receiver import MLflowReceiver
from nvflare.widgets.widget import Widget

from fedxvit import tracking
from fedxvit.errors import FedXViTError
from fedxvit.run_record import REGISTERED_MODEL, SIMULATOR_JOB_ID, find_job_runs, job_tag, record_run, write_run_record

SERVER_ROLE, SITE_ROLE = "server", "site"
EXPERIMENT_TAGS = {"mlflow.note.content": "fedxvit federated runs: per job one run per site and one for the server"}


class FederatedMLflowTracking(Widget):
    """Resolves and checks the store, runs NVFlare's MLflowReceiver on it, keeps the server's run, records the end."""

    def __init__(
        self,
        tracking_uri: str = "",
        local_fallback: bool = False,
        timeout_s: float = tracking.DEFAULT_TIMEOUT_S,
        experiment_name: str = tracking.FEDERATED_EXPERIMENT,
        params: dict | None = None,
        registered_model_name: str = REGISTERED_MODEL,
        buffer_flush_time: float = 1,
        continue_job: str = "",
    ):
        super().__init__()
        self.continue_job = continue_job
        self.tracking_uri = tracking_uri
        self.local_fallback = str(local_fallback).lower() in ("true", "1", "yes")  # a job variable may arrive as text
        self.timeout_s = float(timeout_s)
        self.experiment_name = experiment_name
        self.params = dict(params or {})
        self.registered_model_name = registered_model_name
        self.buffer_flush_time = buffer_flush_time
        self.receiver: MLflowReceiver | None = None  # NVFlare's, for the sites' runs; None: nothing is tracked
        self.uri = self.client = self.server_run_id = None
        self._lock = threading.Lock()

    def handle_event(self, event_type: str, fl_ctx: FLContext):
        if event_type == EventType.START_RUN:
            self.start(fl_ctx)
            return
        receiver = self.receiver  # END_RUN's finish() may clear it while another thread's event is handled
        if receiver is None:
            return
        if event_type == EventType.END_RUN:
            receiver.handle_event(event_type, fl_ctx)  # flushes and ends the sites' runs
            self.finish(fl_ctx)
        elif event_type == ANALYTIC_EVENT_TYPE and fl_ctx.get_prop(FLContextKey.EVENT_SCOPE) != EventScope.FEDERATION:
            self.log_server_event(fl_ctx)
        elif event_type == AppEventType.ROUND_DONE:
            with self._lock:
                for site in list(receiver.run_ids):
                    receiver.flush_buffers(site)
        else:
            with self._lock:
                receiver.handle_event(event_type, fl_ctx)

    # ---- START_RUN: where, and whose runs
    def start(self, fl_ctx: FLContext) -> None:
        self.receiver = None
        try:
            self.receiver = self.open_runs(fl_ctx)
        except Exception as exc:  # nothing would be tracked: stop the run (NVFlare logs why)
            self.receiver = None
            self.system_panic(f"fedxvit tracking: {tracking.one_line(exc, limit=1000)}", fl_ctx)

    def open_runs(self, fl_ctx: FLContext) -> MLflowReceiver:
        from mlflow import MlflowClient

        self.uri = tracking.resolve_tracking(
            self.tracking_uri or None,
            self.local_fallback or None,
            self.timeout_s,
            warn=lambda msg: self.log_warning(fl_ctx, msg, fire_event=False),
        )
        self.client = client = MlflowClient(self.uri)
        # created here so its artifacts go where the store keeps them, not into the job folder
        experiment_id = tracking.ensure_experiment(client, self.experiment_name, self.uri, EXPERIMENT_TAGS)
        job_id, server = fl_ctx.get_job_id(), fl_ctx.get_identity_name()
        job = self.continue_job or job_tag(job_id)
        earlier = find_job_runs(client, experiment_id, job) if self.continue_job or job_id != SIMULATOR_JOB_ID else {}

        receiver = MLflowReceiver(
            tracking_uri=self.uri,
            # the sites' events: "fed."-prefixed from ConvertToFedEvent (jobs/fedxvit), or with the plain name but
            # federation scope from NVFlare's MetricRelay (jobs/fedxvit_flower); handle_event keeps the server's own
            events=[f"fed.{ANALYTIC_EVENT_TYPE}", ANALYTIC_EVENT_TYPE],
            kw_args={
                "experiment_name": self.experiment_name,
                "run_name": "federated",
                "experiment_tags": EXPERIMENT_TAGS,
                "run_tags": {},
            },
            buffer_flush_time=self.buffer_flush_time,
        )
        for site, run in earlier.items():  # the receiver opens a run only for a site it has no client for
            if site != server:
                receiver.mlflow_clients[site] = client
                receiver.run_ids[site] = run.info.run_id
        receiver.handle_event(EventType.START_RUN, fl_ctx)
        sites = sorted(c.name for c in fl_ctx.get_engine().get_clients())
        missing = [site for site in sites if not receiver.get_run_id(site)]
        if missing:
            raise FedXViTError(f"NVFlare's MLflowReceiver opened no run for {', '.join(missing)} (see the log above)")
        for site in sites:  # one job tag for all runs (the receiver takes the simulator's time once per site)
            for key, value in ((tracking.SITE_TAG, site), (tracking.ROLE_TAG, SITE_ROLE), (tracking.JOB_TAG, job)):
                client.set_tag(receiver.get_run_id(site), key, value)

        self.server_run_id = self._open_server_run(experiment_id, server, job, earlier.get(server), sites)
        run_dir = fl_ctx.get_engine().get_workspace().get_run_dir(job_id)
        write_run_record(
            run_dir,
            self.uri,
            self.experiment_name,
            job,
            server,
            {**{site: receiver.get_run_id(site) for site in sites}, server: self.server_run_id},
        )
        self.log_info(
            fl_ctx,
            f"fedxvit: MLflow runs go to {tracking.describe(self.uri)}, experiment "
            f"'{self.experiment_name}'" + (f", continuing job {job}'s runs" if earlier else ""),
        )
        return receiver

    def _open_server_run(self, experiment_id: str, server: str, job: str, earlier, sites: list) -> str:
        """The server's run (an earlier one of this job, continued), with the job's parameters once."""
        from mlflow.entities import Param

        if earlier is None:
            run_id = self.client.create_run(
                experiment_id,
                run_name=f"{server}-{job}",
                tags={tracking.SITE_TAG: server, tracking.ROLE_TAG: SERVER_ROLE, tracking.JOB_TAG: job},
            ).info.run_id
        else:
            run_id = earlier.info.run_id
            self.client.update_run(run_id, status="RUNNING")
        logged = earlier.data.params if earlier else {}
        params = {**self.params, "sites": ",".join(sites)}
        self.client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items() if k not in logged])
        return run_id

    # ---- the server's own metrics (GlobalValidationTracker's analytics events)
    def log_server_event(self, fl_ctx: FLContext) -> None:
        from mlflow.entities import Metric

        try:
            data = AnalyticsData.from_dxo(
                from_shareable(fl_ctx.get_prop(FLContextKey.EVENT_DATA)), receiver=LogWriterName.MLFLOW
            )
            if data is None or data.data_type not in (AnalyticsDataType.METRIC, AnalyticsDataType.METRICS):
                return
            values = {data.tag: data.value} if data.data_type == AnalyticsDataType.METRIC else data.value
            now_ms = int(time.time() * 1000)
            with self._lock:
                self.client.log_batch(
                    self.server_run_id,
                    metrics=[Metric(key, float(value), now_ms, data.step or 0) for key, value in values.items()],
                )
        except Exception as exc:  # a metric that cannot be written must not stop the job
            self.log_error(fl_ctx, f"fedxvit: server metric not tracked: {tracking.one_line(exc)}", fire_event=False)

    # ---- END_RUN: parameters, model versions
    def finish(self, fl_ctx: FLContext) -> None:
        run_dir = fl_ctx.get_engine().get_workspace().get_run_dir(fl_ctx.get_job_id())
        with self._lock:
            try:
                for line in record_run(run_dir, self.uri, registered_name=self.registered_model_name):
                    self.log_info(fl_ctx, f"fedxvit: {line}")
            except Exception as exc:
                self.log_error(fl_ctx, f"fedxvit: recording the run failed: {tracking.one_line(exc)}", fire_event=False)
            finally:
                self.client.set_terminated(self.server_run_id)
                self.receiver = None
