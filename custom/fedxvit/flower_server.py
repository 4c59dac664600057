"""The server of the Flower app (fedxvit/flower_app): Flower's FedAvg from fedxvit's initial model.

The ServerApp starts from the checked initial global model (fedxvit.persistor: $FEDXVIT_INITIAL_MODEL, else the
checkout's models/initial_global.pt), runs Flower's FedAvg for `num-server-rounds` and writes, under `out-dir`
(relative to the ServerApp's working folder: NVFlare's run folder inside NVFlare), the same files a run of
jobs/fedxvit leaves: app_server/FL_global_model.pt and best_FL_global_model.pt (the best global validation
accuracy) and global_val.json, so result scripts and fedxvit.run_record read either run.

Sites send only their trainable tensors; TrainableFedAvg merges Flower's weighted mean of them into the whole
model it sent, so the frozen backbone is never averaged, and the global model stays complete. Downlink is the
whole model every round: Flower keeps one global ArrayRecord (no per-site memory of frozen tensors).

Tracking: with run config `tracking` = "mlflow" (natively) the ServerApp opens the runs a jobs/fedxvit run has
(one per site and one for the server, tagged site/role/job_id, in fedxvit.tracking's store) and writes
TensorBoard files under <out-dir>/tb_events/<name>/; with "nvflare" (jobs/fedxvit_flower) the sites' metrics
travel as NVFlare analytics events to the server's receivers, and the ServerApp writes the server's metrics into
the server run NVFlare's receiver opened.

`python -m fedxvit.flower_server install <server's local folder>` pre-deploys the app folder where NVFlare's
Flower integration looks for it (local/custom/fedxvit_flower).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from nvflare.app_common.app_constant import DefaultCheckpointFileName

from fedxvit import tracking
from fedxvit.aggregation import bound_weights, screen_updates, shares
from fedxvit.checkpoint import load_checkpoint
from fedxvit.errors import ArgumentParser, FedXViTError, run_cli
from fedxvit.filters import find_bad_tensor
from fedxvit.persistor import check_initial_model, resolve_initial_model
from fedxvit.protocol import FLOWER_NVFLARE_TRACKING, FLOWER_SITE_RECORD, SITE_ROUND_METRICS, server_round_metrics
from fedxvit.run_record import RUN_RECORD, SERVER_APP, locate_runs, write_run_record
from fedxvit.widgets import GLOBAL_VAL_FILE, weighted_global_metrics

APP_FOLDER = Path(__file__).resolve().parent / "flower_app"  # pyproject.toml only: names this module and the site's
PREDEPLOYED_APP = Path("custom") / "fedxvit_flower"  # under a server's local/: jobs/fedxvit_flower's flower_app_path

server_app = ServerApp()


def merge(whole: ArrayRecord, trainable: ArrayRecord) -> ArrayRecord:
    """The whole model with the aggregated trainable tensors in place of its own; refuses a tensor it lacks."""
    unknown = sorted(set(trainable) - set(whole))
    if unknown:
        raise FedXViTError(f"the sites sent {len(unknown)} tensors the global model lacks (first: {unknown[0]})")
    return ArrayRecord({name: trainable.get(name, array) for name, array in whole.items()})


WEIGHT = "num-examples"  # what Flower's FedAvg weighs a reply by: the site's own count of training images
SCORES = ("val_accuracy", "val_loss", "val_count")  # what a site's score of the global model must hold
GLOBAL_ACCURACY, GLOBAL_LOSS = "global_model_val_accuracy", "global_model_val_loss"  # a train reply's score of it


def metrics_of(reply) -> MetricRecord:
    return next(iter(reply.content.metric_records.values()))


def arrays_of(reply) -> ArrayRecord:
    return next(iter(reply.content.array_records.values()))


def site_of(reply) -> str:
    """The site a reply names (fedxvit.flower_client adds it), else its Flower node."""
    record = reply.content.config_records.get(FLOWER_SITE_RECORD) if not reply.has_error() else None
    return str(record["name"]) if record and "name" in record else f"node {reply.metadata.src_node_id}"


def problem(reply, reference: dict | None) -> str | None:
    """Why a reply cannot enter the round (None: it can): an error, a malformed record, a weight that is not a
    positive finite number, a metric that is not finite; for a train reply (`reference`: the global model's arrays)
    a tensor that jobs/fedxvit's update filter would refuse (fedxvit.filters.find_bad_tensor)."""
    trains = reference is not None
    if reply.has_error():
        lines = (reply.error.reason or "").strip().splitlines() or ["no reason given"]
        return f"failed: {lines[-1][:200]}"
    content = reply.content
    if len(content.metric_records) != 1 or (trains and len(content.array_records) != 1):
        return "sent no single MetricRecord" + (" and ArrayRecord" if trains else "")
    metrics = metrics_of(reply)
    weight = metrics.get(WEIGHT)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight <= 0:
        return f"reported {str(weight)[:40]!r} {WEIGHT}: not a positive finite number"
    if any(isinstance(v, float) and not math.isfinite(v) for v in metrics.values()):
        return "reported a metric that is not a finite number"
    missing = [] if trains else [key for key in SCORES if key not in metrics]
    if missing:
        return f"reported no {', '.join(missing)}"
    if trains:
        bad = find_bad_tensor({name: array.numpy() for name, array in arrays_of(reply).items()}, reference)
        if bad:
            return f"sent an unusable tensor: {bad}"
    return None


def screen(replies: list, reference: dict | None) -> tuple[dict, dict]:
    """({site: reply} that may enter the round, {site: why not}); `reference`: the global model's arrays for train
    replies, None for evaluate replies. Train replies must also send the tensors most of the round's sites send;
    every kept reply keeps only the metrics all kept replies have (Flower's FedAvg averages only records with equal
    keys, and would otherwise stop the run)."""
    kept, dropped = {}, {}
    for reply in replies:
        site = site_of(reply)
        if site in kept or site in dropped:  # two nodes naming one site: neither speaks for it
            dropped[site] = "more than one node replied as this site"
            kept.pop(site, None)
            continue
        reason = problem(reply, reference)
        if reason:
            dropped[site] = reason
        else:
            kept[site] = reply
    if reference is not None and kept:
        names = {site: frozenset(arrays_of(reply)) for site, reply in kept.items()}
        majority = max(names.values(), key=list(names.values()).count)
        for site, sent in names.items():
            if sent != majority:
                dropped[site] = f"sent {len(sent)} tensors; the round's other sites sent {len(majority)}"
                del kept[site]
    if kept:
        common = set.intersection(*(set(metrics_of(reply)) for reply in kept.values()))
        for reply in kept.values():
            for key in set(metrics_of(reply)) - common:
                del metrics_of(reply)[key]
    return kept, dropped


class TrainableFedAvg(FedAvg):
    """Flower's FedAvg over the tensors the sites train, merged into the whole model, with jobs/fedxvit's guards
    (fedxvit.aggregation): malformed, non-finite and absurdly large updates are dropped with the reason, a site's
    weight is bounded by `max_weight_ratio` x the other sites' median, and a round with fewer than min-nodes
    usable replies stops the run in one line. Hands each round's metrics and decisions to a RoundRecorder."""

    def __init__(
        self, recorder: RoundRecorder, num_rounds: int, norm_k: float = 10.0, max_weight_ratio: float = 4.0, **kwargs
    ):
        super().__init__(**kwargs)
        self.recorder, self.num_rounds = recorder, int(num_rounds)
        self.norm_k, self.max_weight_ratio = float(norm_k), float(max_weight_ratio)
        self.whole: ArrayRecord | None = None

    def configure_train(self, server_round, arrays, config, grid):
        self.whole = arrays
        return super().configure_train(server_round, arrays, config, grid)

    def configure_evaluate(self, server_round, arrays, config, grid):
        """After the last round only: each train reply already scores the model the round started from, as in
        jobs/fedxvit, so only the final model needs a round of its own."""
        if server_round != self.num_rounds:
            return []
        return super().configure_evaluate(server_round, arrays, config, grid)

    def aggregate_train(self, server_round, replies):
        reference = {name: array.numpy() for name, array in self.whole.items()}  # the model the round sent
        kept, dropped = screen(list(replies), reference)
        updates = {
            site: {k: a.numpy() - reference[k] for k, a in arrays_of(reply).items()} for site, reply in kept.items()
        }
        _, too_large = screen_updates(updates, self.norm_k)
        dropped.update(too_large)
        kept = {site: reply for site, reply in kept.items() if site not in too_large}
        reported = {site: float(metrics_of(reply)[WEIGHT]) for site, reply in kept.items()}
        weights, clipped = bound_weights(reported, self.max_weight_ratio, WEIGHT)
        for site, reply in kept.items():
            metrics_of(reply)[WEIGHT] = weights[site]
        metrics = {site: dict(metrics_of(reply)) for site, reply in kept.items()}
        self.recorder.training(server_round, metrics, dropped, clipped, self.whole)
        if len(kept) < self.min_train_nodes:  # as ScatterAndGather: a round without enough sites stops the run
            reasons = "; ".join(f"{site}: {why}" for site, why in sorted(dropped.items()))
            raise FedXViTError(
                f"round {server_round}: {len(kept)} sites' updates are usable, fewer than min-nodes "
                f"{self.min_train_nodes} ({reasons or 'no site answered'})"
            )
        arrays, metrics = super().aggregate_train(server_round, list(kept.values()))
        if arrays is not None:
            arrays = merge(self.whole, arrays)
            self.whole = arrays
        return arrays, metrics

    def aggregate_evaluate(self, server_round, replies):
        kept, dropped = screen(list(replies), None)
        metrics = super().aggregate_evaluate(server_round, list(kept.values())) if kept else None
        scored = {site: dict(metrics_of(reply)) for site, reply in kept.items()}
        self.recorder.validation_row(server_round, scored, self.whole, {"dropped_sites": dropped})
        return metrics


class RoundRecorder:
    """global_val.json, the best and final global models, and the server's tracking: natively (`own` runs) one MLflow
    run per site and one for the server plus TensorBoard files under tb_events/<name>/; inside NVFlare the server's
    metrics go to the server run NVFlare's receiver opened (<out-dir>/mlflow_runs.json), the sites' come through
    NVFlare's MetricRelay."""

    def __init__(self, out_dir: Path, meta: dict, settings: dict, own: bool, tracking_uri: str, run_id: int):
        self.out_dir, self.meta, self.own = out_dir, meta, own
        (out_dir / SERVER_APP).mkdir(parents=True, exist_ok=True)
        self.rows: list = []
        self.best = -1.0
        self.client, self.runs, self.writers, self.folders = None, {}, {}, {"server": "server"}
        if own:
            self._open_runs(settings, tracking_uri, run_id)
        elif (out_dir / RUN_RECORD).is_file():
            self._join_runs()

    def _open_runs(self, settings: dict, tracking_uri: str, run_id: int) -> None:
        from mlflow import MlflowClient
        from mlflow.entities import Param

        uri = tracking.resolve_tracking(tracking_uri or None)
        self.client = MlflowClient(uri)
        experiment = tracking.ensure_experiment(self.client, tracking.FEDERATED_EXPERIMENT, uri)
        self.uri, self.job, self.experiment_id = uri, f"flower-{run_id}-{int(time.time())}", experiment
        self.runs = {"server": self._new_run("server", "server")}
        self.client.log_batch(self.runs["server"], params=[Param(k, str(v)) for k, v in sorted(settings.items())])

    def _join_runs(self) -> None:
        """The server run of the NVFlare job this ServerApp runs in (its receiver ends it and records the run)."""
        from mlflow import MlflowClient

        found = locate_runs(self.out_dir)
        self.client = MlflowClient(found["uri"])
        self.runs = {"server": found["runs"][found["server"]]}
        self.folders["server"] = found["server"]  # NVFlare's TensorBoard receiver names the server's folder so

    def _new_run(self, name: str, role: str) -> str:
        tags = {tracking.SITE_TAG: name, tracking.ROLE_TAG: role, tracking.JOB_TAG: self.job}
        return self.client.create_run(self.experiment_id, run_name=f"{name}-{self.job}", tags=tags).info.run_id

    def _log(self, name: str, metrics: dict, step: int) -> None:
        if self.client is None or (name not in self.runs and not self.own):
            return
        from mlflow.entities import Metric
        from torch.utils.tensorboard import SummaryWriter

        if name not in self.runs:
            self.runs[name] = self._new_run(name, "site")
        now = int(time.time() * 1000)
        self.client.log_batch(self.runs[name], metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])
        if name not in self.writers:
            self.writers[name] = SummaryWriter(str(self.out_dir / "tb_events" / self.folders.get(name, name)))
        for key, value in metrics.items():
            self.writers[name].add_scalar(key, float(value), step)
        self.writers[name].flush()

    def training(self, server_round: int, metrics: dict, dropped: dict, clipped: dict, scored: ArrayRecord) -> None:
        """A train round: the sites' tracked metrics, and the validation row of the model the round started from
        (each site scored it before training: round r-1's model, 0-based as in jobs/fedxvit) with the round's
        aggregated and dropped sites and their shares."""
        for site, values in sorted(metrics.items()):
            self._log(site, {k: values[k] for k in SITE_ROUND_METRICS if k in values}, server_round - 1)
        for site, why in sorted(dropped.items()):
            print(f"fedxvit: round {server_round}: {site} left out: {why}", flush=True)
        report = {
            "aggregated_sites": sorted(metrics),
            "dropped_sites": dict(sorted(dropped.items())),
            "aggregation_weights": shares({site: values[WEIGHT] for site, values in metrics.items()}),
            **({"clipped_sites": dict(sorted(clipped.items()))} if clipped else {}),
        }
        scores = {
            site: {"val_accuracy": v[GLOBAL_ACCURACY], "val_loss": v[GLOBAL_LOSS], "val_count": v["val_count"]}
            for site, v in metrics.items()
            if {GLOBAL_ACCURACY, GLOBAL_LOSS, "val_count"} <= set(v)
        }
        self.validation_row(server_round - 1, scores, scored, report)

    def validation_row(self, index: int, scored: dict, model: ArrayRecord | None, report: dict) -> None:
        """Row `index` of global_val.json (the pooled validation of the global model after `index` rounds, as
        jobs/fedxvit's GlobalValidationTracker writes it), the server's tracked metrics, the best global model."""
        pooled = weighted_global_metrics(scored)
        if pooled is None or model is None:
            return
        row = {"round": index, "scores_global_model_after_round": index - 1, **pooled}
        row.update(sites=dict(sorted(scored.items())), **report)
        self.rows.append(row)
        path = self.out_dir / GLOBAL_VAL_FILE
        path.write_text(json.dumps({"rounds": self.rows}, indent=2) + "\n")
        self._log("server", server_round_metrics(row), index)
        if pooled["global_val_accuracy"] > self.best:
            self.best = pooled["global_val_accuracy"]
            self.save(model, DefaultCheckpointFileName.BEST_GLOBAL_MODEL, round=index)

    def save(self, arrays: ArrayRecord, file_name: str, **extra) -> Path:
        """The global model as NVFlare's PyTorch persistor saves it ({"model": state_dict}), sidecar beside it."""
        path = self.out_dir / SERVER_APP / file_name
        torch.save({"model": arrays.to_torch_state_dict()}, path)
        path.with_name(path.name + ".json").write_text(json.dumps({**self.meta, **extra}, indent=2) + "\n")
        return path

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()
        if self.own:
            for run_id in self.runs.values():
                self.client.set_terminated(run_id)
            write_run_record(self.out_dir, self.uri, tracking.FEDERATED_EXPERIMENT, self.job, "server", self.runs)


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    config = context.run_config
    preset, num_classes = str(config["preset"]), int(config["num-classes"])
    initial = resolve_initial_model(num_classes=num_classes)
    check_initial_model(initial, preset, num_classes)
    state, meta = load_checkpoint(initial, preset, num_classes)
    out_dir = Path(str(config["out-dir"])).expanduser().resolve()
    own = str(config.get("tracking", "mlflow")) != FLOWER_NVFLARE_TRACKING
    recorder = RoundRecorder(out_dir, meta, dict(config), own, str(config.get("tracking-uri", "")), int(context.run_id))
    nodes = int(config["min-nodes"])
    strategy = TrainableFedAvg(
        recorder,
        int(config["num-server-rounds"]),
        norm_k=float(config.get("norm-k", 10.0)),
        max_weight_ratio=float(config.get("max-weight-ratio", 4.0)),
        min_train_nodes=nodes,
        min_evaluate_nodes=nodes,
        min_available_nodes=nodes,
    )
    try:
        result = strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord.from_torch_state_dict(state),
            num_rounds=int(config["num-server-rounds"]),
            train_config=ConfigRecord({}),
            timeout=float(config.get("round-timeout", 3600)),
        )
        recorder.save(result.arrays, DefaultCheckpointFileName.GLOBAL_MODEL, round=int(config["num-server-rounds"]))
    finally:
        recorder.close()


def install_app(local_dir: os.PathLike) -> Path:
    """Copy the app folder to <local_dir>/custom/fedxvit_flower, where jobs/fedxvit_flower points NVFlare's Flower
    integration (its `flower_app_path`, relative to the server's workspace); an older copy there is replaced."""
    target = Path(local_dir) / PREDEPLOYED_APP
    target.mkdir(parents=True, exist_ok=True)
    shutil.copy2(APP_FOLDER / "pyproject.toml", target / "pyproject.toml")
    return target


def main_cli(argv=None) -> None:
    parser = ArgumentParser(prog="python -m fedxvit.flower_server", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    install = sub.add_parser("install", help="pre-deploy the Flower app in a server's local/ folder")
    install.add_argument("local", type=Path, help="the NVFlare server's local/ folder (its startup kit's sibling)")
    args = parser.parse_args(argv)
    print(install_app(args.local))


if __name__ == "__main__":
    run_cli(main_cli)
