"""After a federated run, in one step: the server run's parameters, the global models' versions, the results.

The server's tracking widget (fedxvit.receivers) calls `record_run` when the job ends, `make results`
calls it again to attach its results folder, and

    python -m fedxvit.run_record <server run folder> [--results results]

runs it on a run folder downloaded from a real deployment. It reads only that folder -- the run
record the widget wrote when the job started (store, job id, run ids), the job's config, the
persistor's model files, global_val.json and the cross-site results -- and the job's runs in MLflow
(the sites' parameters). Running it again adds only what is missing: parameters are written once,
each model is registered once per run.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from nvflare.app_common.app_constant import DefaultCheckpointFileName

from fedxvit import protocol, tracking
from fedxvit.checkpoint import load_global_model
from fedxvit.classes import TASK_CLASSES
from fedxvit.errors import ArgumentParser, FedXViTError, run_cli
from fedxvit.model import DEFAULT_PRESET
from fedxvit.widgets import GLOBAL_VAL_FILE, weighted_global_metrics

RUN_RECORD = "mlflow_runs.json"
SIMULATOR_JOB_ID = "simulate_job"  # the simulator's name for every job
SERVER_APP = "app_server"
CROSS_SITE_RESULTS = Path("cross_site_val") / "cross_val_results.json"
REGISTERED_MODEL = "fedxvit-global"


def job_tag(job_id: str) -> str:
    """The `job_id` tag of a job's runs: its id, or for the simulator (which calls every job
    'simulate_job') its start time, as NVFlare's MLflowReceiver does."""
    return str(int(time.time())) if job_id == SIMULATOR_JOB_ID else job_id


def write_run_record(run_dir: os.PathLike, uri: str, experiment: str, job: str, server: str, runs: dict) -> Path:
    """<run dir>/mlflow_runs.json: where this job's runs are (the URI without any password) and their ids."""
    path = Path(run_dir) / RUN_RECORD
    path.write_text(
        json.dumps(
            {
                "tracking_uri": tracking.describe(uri),
                "experiment": experiment,
                "job_id": job,
                "server": server,
                "runs": dict(sorted(runs.items())),
            },
            indent=2,
        )
        + "\n"
    )
    return path


def read_run_record(run_dir: os.PathLike) -> dict | None:
    path = Path(run_dir) / RUN_RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        if {"server", "runs"} <= record.keys() and record["server"] in record["runs"]:
            return record
    except (ValueError, AttributeError):
        pass
    raise FedXViTError(f"{path} is not a run record written by fedxvit.receivers")


def find_job_runs(client, experiment_id: str, job: str) -> dict:
    """{site tag: run} of one job's runs (the newest per site), found by their `job_id` tag."""
    runs = client.search_runs(
        [experiment_id], f"tags.{tracking.JOB_TAG} = '{job}'", order_by=["attributes.start_time ASC"]
    )
    return {run.data.tags[tracking.SITE_TAG]: run for run in runs if tracking.SITE_TAG in run.data.tags}


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


def _read_json(path: Path, what: str):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise FedXViTError(f"{path}: cannot read the {what}: {exc}") from None


def model_settings(run_dir: Path) -> tuple[str, int]:
    """(preset, class count) of the run's global model, from the job config the run used."""
    config = _read_json(run_dir / SERVER_APP / "config" / "config_fed_server.json", "job's server config")
    return str(config.get("preset", DEFAULT_PRESET)), int(config.get("num_classes", len(TASK_CLASSES)))


def last_round_metrics(run_dir: Path) -> dict:
    """The server's metrics of the last round in global_val.json, tagged `last_round.<name>`."""
    path = run_dir / GLOBAL_VAL_FILE
    rows = (_read_json(path, "global validation table") or {}).get("rounds") if path.is_file() else None
    if not rows:
        return {}
    last = max(rows, key=lambda row: row["round"])
    return {f"last_round.{name}": value for name, value in protocol.server_round_metrics(last).items()}


def cross_site_scores(run_dir: Path, model_file: str) -> dict:
    """NVFlare's cross-site evaluation of a server model, pooled over the sites' validation images."""
    path = run_dir / CROSS_SITE_RESULTS
    results = _read_json(path, "cross-site results") if path.is_file() else {}
    scores = {
        site: models[f"SRV_{model_file}"]
        for site, models in results.items()  # CrossSiteModelEval's name
        if isinstance(models, dict)
        and isinstance(models.get(f"SRV_{model_file}"), dict)
        and {"val_accuracy", "val_loss", "val_count"} <= models[f"SRV_{model_file}"].keys()
    }
    pooled = weighted_global_metrics(scores)
    return (
        {"cross_site_val_accuracy": pooled["global_val_accuracy"], "cross_site_val_loss": pooled["global_val_loss"]}
        if pooled
        else {}
    )


def log_registered_model(
    model, uri: str, run_id: str, artifact_name: str, registered_name: str, tags: dict | None = None
) -> str:
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
        info = mlflow.pytorch.log_model(
            model,
            name=artifact_name,
            signature=infer_signature(example, output),
            input_example=example,
            registered_model_name=registered_name,
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
        )
    version = str(info.registered_model_version)
    client = mlflow.MlflowClient(uri)
    for key, value in (tags or {}).items():
        client.set_model_version_tag(registered_name, version, key, str(value))
    return version


def locate_runs(
    run_dir: Path,
    tracking_uri: str | None = None,
    job_id: str | None = None,
    timeout_s: float = tracking.DEFAULT_TIMEOUT_S,
) -> dict:
    """The job's store, job tag, server name and run ids: from the run record, else found by job id."""
    record = read_run_record(run_dir)
    if record is not None:
        recorded = record.get("tracking_uri") or ""
        uri = tracking_uri or (recorded if "***@" not in recorded else tracking.tracking_uri())
        tracking.check_tracking_store(uri, timeout_s)  # one bounded line, not MLflow's minutes of retries
        return {"uri": uri, "job_id": record.get("job_id"), "server": record["server"], "runs": record["runs"]}
    job_id = job_id or run_dir.name
    if job_id == SIMULATOR_JOB_ID:
        raise FedXViTError(
            f"{run_dir} has no {RUN_RECORD}: the job did not track to MLflow (`python -m "
            f"fedxvit.run_record --job-id` finds a job's runs by their job_id tag)"
        )
    from mlflow import MlflowClient

    uri = tracking_uri or tracking.tracking_uri()
    tracking.check_tracking_store(uri, timeout_s)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(tracking.FEDERATED_EXPERIMENT)
    runs = find_job_runs(client, experiment.experiment_id, job_id) if experiment else {}
    servers = [site for site, run in runs.items() if run.data.tags.get(tracking.ROLE_TAG) == "server"]
    if not servers:
        raise FedXViTError(f"no server run of job '{job_id}' in {tracking.describe(uri)}")
    return {
        "uri": uri,
        "job_id": job_id,
        "server": servers[0],
        "runs": {site: run.info.run_id for site, run in runs.items()},
    }


def record_run(
    run_dir: os.PathLike,
    tracking_uri: str | None = None,
    job_id: str | None = None,
    results: os.PathLike | None = None,
    registered_name: str = REGISTERED_MODEL,
    timeout_s: float = tracking.DEFAULT_TIMEOUT_S,
    per_image: bool = False,
) -> list[str]:
    """Server-run parameters, final and best model versions, and (when given) the results folder -- its aggregates
    only unless `per_image` (aggregate_results); what it did."""
    from mlflow import MlflowClient
    from mlflow.entities import Param

    run_dir = Path(run_dir)
    found = locate_runs(run_dir, tracking_uri, job_id, timeout_s)
    uri, server, runs = found["uri"], found["server"], found["runs"]
    client = MlflowClient(uri)
    server_run = client.get_run(runs[server])
    done = []

    site_params = {site: client.get_run(run_id).data.params for site, run_id in sorted(runs.items()) if site != server}
    new_params = {
        key: value
        for key, value in merge_site_params(site_params, base=server_run.data.params).items()
        if server_run.data.params.get(key) != value
    }
    if new_params:
        client.log_batch(server_run.info.run_id, params=[Param(k, str(v)) for k, v in new_params.items()])
        done.append(f"{len(new_params)} site parameters on the server run")

    preset, num_classes = model_settings(run_dir)
    tags = {
        tracking.JOB_TAG: found["job_id"],
        "preset": preset,
        **{f"data_hash.{site}": params.get("data_hash") for site, params in site_params.items()},
        **last_round_metrics(run_dir),
    }
    for kind, file_name, name in (
        ("final", DefaultCheckpointFileName.GLOBAL_MODEL, registered_name),
        ("best", DefaultCheckpointFileName.BEST_GLOBAL_MODEL, f"{registered_name}-best"),
    ):
        existing = [
            v
            for v in client.search_model_versions(f"name='{name}'")
            if v.run_id == server_run.info.run_id and v.tags.get("model") == kind
        ]
        if existing:
            continue
        if not registered_name:  # e.g. the HE job: the server's model is ciphertext
            done.append(f"{kind} global model not registered (no registered model name)")
            continue
        path = run_dir / SERVER_APP / file_name
        if not path.is_file():
            done.append(f"no {kind} global model ({path.name}) to register")
            continue
        model = load_global_model(path, preset, num_classes)
        version = log_registered_model(
            model,
            uri,
            server_run.info.run_id,
            f"{kind}_global_model",
            name,
            tags={**tags, "model": kind, **cross_site_scores(run_dir, file_name)},
        )
        done.append(f"{kind} global model registered as '{name}' version {version}")

    if results is not None:
        with tempfile.TemporaryDirectory() as aggregates:
            left_out = [] if per_image else aggregate_results(results, aggregates)
            client.log_artifacts(server_run.info.run_id, str(results if per_image else aggregates), "results")
        done.append(
            f"attached {results} to MLflow run {server_run.info.run_id} ({server_run.info.run_name})"
            + (f", without its {len(left_out)} per-image parts (--upload-per-image uploads them)" if left_out else "")
        )
    return done


PER_IMAGE_KEYS = ("images", "contact_sheet")  # what result_stat's JSON files hold per test image


def aggregate_results(results: os.PathLike, dest: os.PathLike) -> list[str]:
    """Copy into `dest` what of a results folder goes to a tracking server by default: the aggregates. Left out,
    as a hospital's test images are not the consortium's: every sub-folder (result_stat.gradcam's overlay per
    image), every file a JSON file names as a `contact_sheet` (a sheet of overlays), and the per-image entries
    (names, probabilities) inside the JSON files. Returns what was left out, relative to `results`."""
    results, dest = Path(results), Path(dest)
    left_out, sheets, stripped = {f"{p.name}/" for p in results.iterdir() if p.is_dir()}, set(), {}

    def strip(value, path: Path):
        if isinstance(value, dict):
            dropped = [key for key in PER_IMAGE_KEYS if key in value]
            left_out.update(f"{path.name}: {key}" for key in dropped)
            if isinstance(value.get("contact_sheet"), str):
                sheets.add(Path(value["contact_sheet"]).name)
            return {k: strip(v, path) for k, v in value.items() if k not in dropped}
        return [strip(v, path) for v in value] if isinstance(value, list) else value

    files = sorted(p for p in results.iterdir() if p.is_file())
    for path in files:
        if path.suffix == ".json":
            try:
                stripped[path] = strip(json.loads(path.read_text()), path)
            except ValueError:
                pass  # not a file result_stat wrote: copied as it is
    dest.mkdir(parents=True, exist_ok=True)
    for path in files:
        if path.name in sheets:
            left_out.add(path.name)
        elif path in stripped:
            (dest / path.name).write_text(json.dumps(stripped[path], indent=2) + "\n")
        else:
            shutil.copy2(path, dest / path.name)
    return sorted(left_out)


def main(argv=None) -> list[str]:
    parser = ArgumentParser(prog="python -m fedxvit.run_record", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="the server's run folder (workspace/server/simulate_job, or a downloaded job)")
    parser.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow store (default: the one the run record names, "
        "else $MLFLOW_TRACKING_URI, an Azure ML config or the local store)",
    )
    parser.add_argument("--job-id", default=None, help="the runs' job_id tag, for a run folder without a run record")
    parser.add_argument("--results", default=None, help="a results folder to attach to the server run")
    parser.add_argument(
        "--upload-per-image",
        action="store_true",
        help="attach the results' per-image parts too (test-image overlays, image names, probabilities); "
        "default: aggregates only",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=tracking.DEFAULT_TIMEOUT_S,
        help=f"seconds to wait for the tracking store to answer (default {tracking.DEFAULT_TIMEOUT_S:g})",
    )
    args = parser.parse_args(argv)
    if not Path(args.run_dir).is_dir():
        raise FedXViTError(f"run folder {args.run_dir} does not exist")
    try:
        done = record_run(
            args.run_dir,
            args.tracking_uri,
            args.job_id,
            args.results,
            timeout_s=args.timeout,
            per_image=args.upload_per_image,
        )
    except FedXViTError:
        raise
    except Exception as exc:  # the store's own errors are many lines long
        raise FedXViTError(f"{args.run_dir}: recording in MLflow failed: {tracking.one_line(exc)}") from None
    print("\n".join(done) or "nothing to add: the run is fully recorded")
    return done


if __name__ == "__main__":
    run_cli(main)
