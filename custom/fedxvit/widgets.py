"""Per-round global validation accuracy/loss, weighted by each site's validation count.

Every site scores the global model it receives before training on it (the INITIAL_METRICS
of its train result), so round r's numbers describe the global model produced by round
r-1 (round 0: the initial model). Pooling them by validation count gives the accuracy the
global model would have on all sites' validation images together, without any images
moving. Each round is logged as one line, the whole table is rewritten to
`<server run folder>/global_val.json` for the result scripts, and the round's
global_val_accuracy, global_val_loss and clients_per_round go out as NVFlare analytics
events on the server, where the TensorBoard and MLflow receivers write them like the sites' metrics.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from nvflare.apis.analytix import AnalyticsDataType, LogWriterName
from nvflare.apis.dxo import MetaKey, from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.app_event_type import AppEventType
from nvflare.app_common.widgets.streaming import AnalyticsSender
from nvflare.widgets.widget import Widget

from fedxvit.tracking import server_round_metrics

GLOBAL_VAL_FILE = "global_val.json"


def weighted_global_metrics(site_metrics: dict) -> dict | None:
    """{site: {val_accuracy, val_loss, val_count}} -> count-weighted means, or None when nothing was scored."""
    total = sum(int(m.get("val_count", 0)) for m in site_metrics.values())
    if total <= 0:
        return None
    return {
        "global_val_accuracy": sum(m["val_accuracy"] * m["val_count"] for m in site_metrics.values()) / total,
        "global_val_loss": sum(m["val_loss"] * m["val_count"] for m in site_metrics.values()) / total,
        "val_count": total,
        "num_sites": len(site_metrics),
    }


def format_round(row: dict) -> str:
    return (f"round {row['round']}: global_val_accuracy={row['global_val_accuracy']:.4f} "
            f"global_val_loss={row['global_val_loss']:.4f} (n={row['val_count']}, {row['num_sites']} sites)")


class GlobalValidationTracker(Widget):
    """Collects the accepted train results' INITIAL_METRICS per round and publishes the pooled scores."""

    def __init__(self, file_name: str = GLOBAL_VAL_FILE, earlier_rounds: list | None = None):
        """earlier_rounds: rows of rounds a killed run already finished, for a job that resumes it
        (fedxvit.poc's server-crash drill); they are kept in the table but not sent again."""
        super().__init__()
        self.file_name = file_name
        self.earlier_rounds = list(earlier_rounds or [])
        self.rows: list[dict] = []
        self._site_metrics: dict = {}
        self._sender = AnalyticsSender(writer_name=LogWriterName.MLFLOW)

    def handle_event(self, event_type: str, fl_ctx: FLContext):
        if event_type == EventType.START_RUN:
            self.rows, self._site_metrics = list(self.earlier_rounds), {}
            self._sender.engine = fl_ctx.get_engine()
        elif event_type == AppEventType.ROUND_STARTED:
            self._site_metrics = {}
        elif event_type == AppEventType.AFTER_CONTRIBUTION_ACCEPT:
            self._collect(fl_ctx)
        elif event_type == AppEventType.BEFORE_AGGREGATION:
            self._close_round(fl_ctx)

    def _collect(self, fl_ctx: FLContext) -> None:
        if not fl_ctx.get_prop(AppConstants.AGGREGATION_ACCEPTED):
            return
        result = fl_ctx.get_prop(AppConstants.TRAINING_RESULT)
        try:
            metrics = from_shareable(result).get_meta_prop(MetaKey.INITIAL_METRICS)
        except Exception:
            return
        if not isinstance(metrics, dict) or not {"val_accuracy", "val_loss", "val_count"} <= metrics.keys():
            return
        peer = fl_ctx.get_peer_context()
        site = peer.get_identity_name(default="?") if peer else "?"
        self._site_metrics[site] = {k: metrics[k] for k in ("val_accuracy", "val_loss", "val_count")}

    def _close_round(self, fl_ctx: FLContext) -> None:
        pooled = weighted_global_metrics(self._site_metrics)
        if pooled is None:
            return
        current_round = fl_ctx.get_prop(AppConstants.CURRENT_ROUND)
        row = {"round": current_round, "scores_global_model_after_round": current_round - 1, **pooled,
               "sites": dict(sorted(self._site_metrics.items()))}
        self.rows = [r for r in self.rows if r["round"] != current_round] + [row]
        self._site_metrics = {}
        self.publish(row, fl_ctx)

    def publish(self, row: dict, fl_ctx: FLContext) -> None:
        """Log the round, send its metrics to the receivers (step = round) and rewrite the JSON table."""
        self.log_info(fl_ctx, format_round(row))
        for tag, value in server_round_metrics(row).items():
            self._sender.add(tag, value, AnalyticsDataType.METRIC, global_step=int(row["round"]))
        run_dir = fl_ctx.get_engine().get_workspace().get_run_dir(fl_ctx.get_job_id())
        path = Path(run_dir) / self.file_name
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps({"rounds": self.rows}, indent=2) + "\n")
        os.replace(tmp, path)
