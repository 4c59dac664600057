"""Per round: which sites were aggregated, which were dropped and why, and the global model's
validation accuracy/loss weighted by each aggregated site's validation count.

Every site scores the global model it receives before training on it (the INITIAL_METRICS
of its train result), so round r's numbers describe the global model produced by round
r-1 (round 0: the initial model). Pooling them by validation count gives the accuracy the
global model would have on all sites' validation images together, without any images
moving. Each round is logged as one line, the whole table is rewritten to
`<server run folder>/global_val.json` for the result scripts, and the round's
global_val_accuracy, global_val_loss and clients_per_round go out as NVFlare analytics
events on the server, where the TensorBoard and MLflow receivers write them like the sites' metrics.

A site is dropped from a round when its result is an error (the update filter's rejection,
an exception, an abort), when the aggregator does not accept it (late), when the robust
aggregator's norm screening rejects it (fedxvit.aggregation), or when nothing arrives before
the round closes; the row's `dropped_sites` says which reason applied. A site whose reported weight
was clipped (fedxvit.aggregation.bound_weights) is aggregated and listed in `clipped_sites`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from nvflare.apis.analytix import AnalyticsDataType, LogWriterName
from nvflare.apis.dxo import MetaKey, from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import FLContextKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.app_event_type import AppEventType
from nvflare.app_common.widgets.streaming import AnalyticsSender
from nvflare.widgets.widget import Widget

from fedxvit.aggregation import AGGREGATION_REPORT
from fedxvit.errors import FedXViTError
from fedxvit.protocol import REJECT_REASON_HEADER, server_round_metrics

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


NO_RESULT = "no result before the round closed (timed out, offline or late)"


def round_participation(expected: list, accepted: list, failures: dict, report: dict | None = None) -> dict:
    """{"aggregated": [sites], "dropped": {site: reason}} of one round.

    `accepted`: sites whose update the aggregator took in; `failures`: {site: reason} for error
    results and refused contributions; `report`: the robust aggregator's screening decision, when
    it ran (it has the last word on who was aggregated); any other expected site sent nothing."""
    aggregated = sorted(report["aggregated"]) if report else sorted(accepted)
    dropped = {**failures, **(report["rejected"] if report else {})}
    for site in expected:
        if site not in aggregated and site not in dropped:
            dropped[site] = NO_RESULT
    return {
        "aggregated": aggregated,
        "dropped": dict(sorted((k, v) for k, v in dropped.items() if k not in aggregated)),
    }


def format_round(row: dict) -> str:
    line = (
        f"round {row['round']}: global_val_accuracy={row['global_val_accuracy']:.4f} "
        f"global_val_loss={row['global_val_loss']:.4f} (n={row['val_count']}, {row['num_sites']} sites)"
    )
    if "aggregated_sites" in row:
        line += f"; aggregated {', '.join(row['aggregated_sites']) or 'none'}"
        line += "".join(f"; dropped {site}: {reason}" for site, reason in row["dropped_sites"].items())
    if row.get("aggregation_weights"):
        line += "; weights " + ", ".join(f"{site} {w:.3f}" for site, w in row["aggregation_weights"].items())
    line += "".join(f"; clipped {site}: {reason}" for site, reason in row.get("clipped_sites", {}).items())
    return line


class GlobalValidationTracker(Widget):
    """Follows each round's train results (accepted, failed, screened out) and publishes the pooled scores."""

    def __init__(
        self,
        file_name: str = GLOBAL_VAL_FILE,
        earlier_rounds: list | None = None,
        train_task_name: str = AppConstants.TASK_TRAIN,
    ):
        """earlier_rounds: rows of rounds a killed run already finished, for a job that resumes it
        (tooling.poc's server-crash drill); they are kept in the table but not sent again."""
        super().__init__()
        if Path(file_name).name != file_name or file_name in ("", ".", ".."):  # a job must not pick where it writes
            raise FedXViTError(f"job option file_name={file_name!r}: a file name in the run folder, not a path")
        self.file_name = file_name
        self.earlier_rounds = list(earlier_rounds or [])
        self.train_task_name = train_task_name
        self.rows: list[dict] = []
        self._reset_round()
        self._sender = AnalyticsSender(writer_name=LogWriterName.MLFLOW)

    def _reset_round(self, expected: list | None = None) -> None:
        self._expected, self._site_metrics, self._accepted, self._failures = list(expected or []), {}, [], {}

    def handle_event(self, event_type: str, fl_ctx: FLContext):
        if event_type == EventType.START_RUN:
            self.rows = list(self.earlier_rounds)
            self._reset_round()
            self._sender.engine = fl_ctx.get_engine()
        elif event_type == AppEventType.ROUND_STARTED:
            self._reset_round(sorted(client.name for client in fl_ctx.get_engine().get_clients()))
        elif event_type == EventType.AFTER_TASK_RESULT_FILTER:
            self._note_failed_result(fl_ctx)
        elif event_type == AppEventType.AFTER_CONTRIBUTION_ACCEPT:
            self._collect(fl_ctx)
        elif event_type == AppEventType.AFTER_AGGREGATION:
            self._close_round(fl_ctx)

    def _note_failed_result(self, fl_ctx: FLContext) -> None:
        """A train result that arrives as an error (filter rejection, exception, abort) and its reason."""
        result = fl_ctx.get_prop(FLContextKey.TASK_RESULT)
        if fl_ctx.get_prop(FLContextKey.TASK_NAME) != self.train_task_name or result is None:
            return
        code = result.get_return_code(ReturnCode.OK)
        if code != ReturnCode.OK:
            self._failures[_peer_name(fl_ctx)] = result.get_header(REJECT_REASON_HEADER) or f"the site returned {code}"

    def _collect(self, fl_ctx: FLContext) -> None:
        site = _peer_name(fl_ctx)
        if not fl_ctx.get_prop(AppConstants.AGGREGATION_ACCEPTED):
            self._failures.setdefault(site, "contribution not accepted by the aggregator (late or repeated)")
            return
        self._accepted.append(site)
        result = fl_ctx.get_prop(AppConstants.TRAINING_RESULT)
        try:
            metrics = from_shareable(result).get_meta_prop(MetaKey.INITIAL_METRICS)
        except Exception:
            return
        if not isinstance(metrics, dict) or not {"val_accuracy", "val_loss", "val_count"} <= metrics.keys():
            return
        self._site_metrics[site] = {k: metrics[k] for k in ("val_accuracy", "val_loss", "val_count")}

    def _close_round(self, fl_ctx: FLContext) -> None:
        current_round = fl_ctx.get_prop(AppConstants.CURRENT_ROUND)
        taking_part = round_participation(
            self._expected, self._accepted, self._failures, fl_ctx.get_prop(AGGREGATION_REPORT)
        )
        scored = {s: m for s, m in self._site_metrics.items() if s in taking_part["aggregated"]}
        pooled = weighted_global_metrics(scored)
        self._reset_round()
        if pooled is None:
            self.log_warning(
                fl_ctx,
                f"round {current_round}: no aggregated site scored the global model; dropped: {taking_part['dropped']}",
            )
            return
        row = {
            "round": current_round,
            "scores_global_model_after_round": current_round - 1,
            **pooled,
            "sites": dict(sorted(scored.items())),
            "aggregated_sites": taking_part["aggregated"],
            "dropped_sites": taking_part["dropped"],
        }
        weights = (fl_ctx.get_prop(AGGREGATION_REPORT) or {}).get("weights")
        if weights:
            row["aggregation_weights"] = dict(sorted(weights.items()))
        clipped = (fl_ctx.get_prop(AGGREGATION_REPORT) or {}).get("clipped")
        if clipped:
            row["clipped_sites"] = dict(sorted(clipped.items()))
        self.rows = [r for r in self.rows if r["round"] != current_round] + [row]
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


def _peer_name(fl_ctx: FLContext) -> str:
    peer = fl_ctx.get_peer_context()
    return peer.get_identity_name(default="?") if peer else "?"
