"""The server's MLflow receiver: NVFlare's MLflowReceiver, told where to write by fedxvit.tracking.

NVFlare's receiver already turns every site's analytics events into one MLflow run per site.
This shell adds what the job needs around it:
- the store is resolved at run start (explicit `tracking_uri`, $MLFLOW_TRACKING_URI, an Azure ML
  workspace config, else the checkout's local store), so the job holds no absolute path;
- a store that cannot be reached stops the job before round 0 with one line (NVFlare's receiver
  would only log the error and let the job run untracked), unless `local_fallback` is set;
- the server gets a run of its own for its own events (global validation per round) and the
  run parameters (the job's, plus the sites' training settings and data hashes);
- at the end, the persistor's final and best global models are logged as MLflow PyTorch models
  and registered as new versions, tagged with the job id, data hashes and final metrics.
"""

from __future__ import annotations

from nvflare.apis.analytix import ANALYTIC_EVENT_TYPE, AnalyticsData, AnalyticsDataType, LogWriterName
from nvflare.apis.dxo import from_shareable
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.abstract.model import ModelLearnableKey
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.app_event_type import AppEventType
from nvflare.app_opt.tracking.mlflow.mlflow_receiver import MLflowReceiver
from mlflow.entities import Param

from fedxvit import tracking
from fedxvit.classes import TASK_CLASSES
from fedxvit.model import build_model
from fedxvit.widgets import weighted_global_metrics

SERVER_ROLE = "server"


class FedXViTMLflowReceiver(MLflowReceiver):
    """MLflowReceiver with fedxvit's store resolution, fail-fast check, server run, params and model registry."""

    def __init__(self, tracking_uri: str = "", experiment_name: str = tracking.FEDERATED_EXPERIMENT,
                 params: dict | None = None, preset: str = "cpu", num_classes: int = len(TASK_CLASSES),
                 persistor_id: str = "persistor", registered_model_name: str = "fedxvit-global",
                 local_fallback: bool = False, timeout_s: float = tracking.DEFAULT_TIMEOUT_S,
                 buffer_flush_time: float = 1):
        super().__init__(tracking_uri=tracking_uri or None,
                         kw_args={"experiment_name": experiment_name, "run_name": "federated",
                                  "experiment_tags": {"mlflow.note.content": "fedxvit federated runs: per job one run "
                                                      "per site and one for the server"},
                                  "run_tags": {}},
                         events=[ANALYTIC_EVENT_TYPE, f"fed.{ANALYTIC_EVENT_TYPE}"], buffer_flush_time=buffer_flush_time)
        self.params = dict(params or {})
        self.preset = preset
        self.num_classes = int(num_classes)
        self.persistor_id = persistor_id
        self.registered_model_name = registered_model_name
        self.local_fallback = str(local_fallback).lower() in ("true", "1", "yes")  # a job variable may arrive as text
        self.timeout_s = float(timeout_s)
        self.uri = None
        self.server_name = None
        self._job_id_tag = None
        self._site_params: dict = {}
        self._site_params_logged = False
        self._server_metrics: dict = {}
        self._cross_site: dict = {}

    # ---- where: resolved and checked at run start; a failure stops the run
    def _handle_start_run_event(self, fl_ctx: FLContext):
        try:
            self.initialize(fl_ctx)
        except Exception as exc:  # any failure here means nothing would be tracked: stop the run (NVFlare logs why)
            self.system_panic(f"fedxvit tracking: {tracking.one_line(exc, limit=1000)}", fl_ctx)
            return
        self._initialized = True

    def initialize(self, fl_ctx: FLContext):
        self.uri = tracking.resolve_tracking(self.tracking_uri, self.local_fallback or None, self.timeout_s,
                                             warn=lambda msg: self.log_warning(fl_ctx, msg, fire_event=False))
        self.server_name = fl_ctx.get_identity_name()
        self._job_id_tag = None
        self._site_params, self._site_params_logged, self._server_metrics, self._cross_site = {}, False, {}, {}
        super().initialize(fl_ctx)
        sites = sorted(name for name in self.run_ids if name != self.server_name)
        for name, run_id in self.run_ids.items():
            role = SERVER_ROLE if name == self.server_name else "site"
            self.mlflow_clients[name].set_tag(run_id, tracking.ROLE_TAG, role)
            self.mlflow_clients[name].set_tag(run_id, tracking.SITE_TAG, name)
        params = {**self.params, "sites": ",".join(sites)}
        self.buffer[self.server_name][AnalyticsDataType.PARAMETERS].extend(Param(k, str(v)) for k, v in params.items())
        self.flush_buffers(self.server_name)
        self.log_info(fl_ctx, f"fedxvit: MLflow runs go to {tracking.describe(self.uri)}, experiment "
                              f"'{self.kw_args['experiment_name']}'")

    def _get_tracking_uri(self, fl_ctx: FLContext):
        return self.uri

    def _get_or_create_experiment(self, mlflow_client, experiment_name, artifact_location, experiment_tags=None):
        return tracking.ensure_experiment(mlflow_client, experiment_name, self.uri, experiment_tags)

    def _get_job_id_tag(self, fl_ctx: FLContext) -> str:
        if self._job_id_tag is None:  # the simulator's stand-in id is a timestamp: take it once for all runs
            self._job_id_tag = super()._get_job_id_tag(fl_ctx)
        return self._job_id_tag

    def _mlflow_setup(self, art_full_path, experiment_name, experiment_tags, site_names, fl_ctx: FLContext):
        super()._mlflow_setup(art_full_path, experiment_name, experiment_tags, [*site_names, self.server_name], fl_ctx)

    def _init_buffer(self, site_names):
        super()._init_buffer([*site_names, self.server_name])

    # ---- what: remember the sites' parameters and the server's last metrics on the way through
    def handle_event(self, event_type: str, fl_ctx: FLContext):
        if event_type == AppEventType.VALIDATION_RESULT_RECEIVED:
            self._collect_cross_site(fl_ctx)
        super().handle_event(event_type, fl_ctx)

    def save(self, fl_ctx: FLContext, shareable: Shareable, record_origin: str):
        super().save(fl_ctx, shareable, record_origin)
        data = AnalyticsData.from_dxo(from_shareable(shareable), receiver=LogWriterName.MLFLOW)
        if data is None:
            return
        if record_origin == self.server_name and data.data_type == AnalyticsDataType.METRIC:
            self._server_metrics[data.tag] = data.value
        elif record_origin != self.server_name and data.data_type == AnalyticsDataType.PARAMETERS:
            self._site_params[record_origin] = dict(data.value)
            if len(self._site_params) == len(self.run_ids) - 1:
                self._log_site_params()

    def _log_site_params(self) -> None:
        """The sites' settings and data hashes on the server's run, once."""
        if self._site_params_logged or not self._site_params:
            return
        self._site_params_logged = True
        merged = tracking.merge_site_params(self._site_params, base=self.params)
        self.buffer[self.server_name][AnalyticsDataType.PARAMETERS].extend(Param(k, v) for k, v in merged.items())
        self.flush_buffers(self.server_name)

    def _collect_cross_site(self, fl_ctx: FLContext) -> None:
        """Sites' scores of the server's models in cross-site evaluation, for the registry tags."""
        owner, site = fl_ctx.get_prop(AppConstants.MODEL_OWNER), fl_ctx.get_prop(AppConstants.DATA_CLIENT)
        result = fl_ctx.get_prop(AppConstants.VALIDATION_RESULT)
        try:
            metrics = from_shareable(result).data
        except Exception:
            return
        if owner and site and isinstance(metrics, dict) and {"val_accuracy", "val_loss", "val_count"} <= metrics.keys():
            self._cross_site.setdefault(owner, {})[site] = metrics

    # ---- versioning at the end of the run
    def finalize(self, fl_ctx: FLContext):
        self._log_site_params()
        for site_name in self.buffer:
            self.flush_buffers(site_name)
        try:
            self._register_models(fl_ctx)
        except Exception as exc:
            self.log_error(fl_ctx, f"fedxvit: registering the global models failed: {exc}", fire_event=False)
        super().finalize(fl_ctx)

    def _register_models(self, fl_ctx: FLContext) -> None:
        from fedxvit.executor import to_torch_state

        persistor = fl_ctx.get_engine().get_component(self.persistor_id)
        if persistor is None:
            self.log_warning(fl_ctx, f"fedxvit: no component '{self.persistor_id}': global models not registered")
            return
        tags = {"job_id": self._job_id_tag, "preset": self.preset,
                **{f"data_hash.{site}": params.get("data_hash") for site, params in sorted(self._site_params.items())},
                **{f"last_round.{k}": v for k, v in self._server_metrics.items()}}
        for kind, file_name, registered in (
                ("final", persistor.global_model_file_name, self.registered_model_name),
                ("best", persistor.best_global_model_file_name, f"{self.registered_model_name}-best")):
            learnable = persistor.get_model(file_name, fl_ctx)
            if learnable is None:
                self.log_warning(fl_ctx, f"fedxvit: no {kind} global model ({file_name}) to register")
                continue
            model = build_model(self.preset, self.num_classes)
            model.load_state_dict(to_torch_state(learnable[ModelLearnableKey.WEIGHTS]))
            pooled = weighted_global_metrics(self._cross_site.get(f"SRV_{file_name}", {}))
            scores = ({"cross_site_val_accuracy": pooled["global_val_accuracy"],
                       "cross_site_val_loss": pooled["global_val_loss"]} if pooled else {})
            version = tracking.log_registered_model(model, self.uri, self.run_ids[self.server_name],
                                                    f"{kind}_global_model", registered,
                                                    tags={**tags, "model": kind, **scores})
            self.log_info(fl_ctx, f"fedxvit: {kind} global model registered as '{registered}' version {version}")
