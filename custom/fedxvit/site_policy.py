"""What may leave a hospital, decided by the hospital, in files of its own `local/` folder.

A job is written by whoever submits it; a site's `local/` folder (next to its startup kit; NVFlare's
simulator copies `<workspace>/local/` to every participant) is written by the site. Three files there:

- `resources.json`, `class_allow_list`: jobs carry no code (no `app/custom/`), so NVFlare builds only the
  classes a participant allows. `allow_classes` adds fedxvit's package to NVFlare's default list.
- `privacy.json`: NVFlare's privacy scopes. Every filter of the scope a job runs in (the job's meta.json
  `scope`, else the site's `default_scope`) runs on every task's result before the job's own filters,
  whatever the job says; a job naming a scope the site lacks is refused. NVFlare applies scopes in POC
  and production, not in its simulator. `write_privacy` writes one.
- `fedxvit_site.json`, `"may_leave"` (or env FEDXVIT_MAY_LEAVE): which metadata may travel beside the
  weights. MetadataPolicy (a task-result filter in every job, and a scope filter a site can require)
  strips the rest; the executor's metric stream to the server honours the same answer.

The categories (docs/privacy.md lists what each job sends):
- `training_metrics`: a train result's `train_metrics` (training loss and accuracy, steps, the local
  model's validation scores) and the per-epoch and per-round metrics streamed to the server;
- `evaluation`: the validation scores a site reports of a model it received (`initial_metrics` of a
  train result, the `validate` result of cross-site evaluation): the server picks its best model and
  keeps the global validation table with them;
- `counts`: how many validation images scored (`val_count` beside those scores; pools the table).
What aggregation itself needs always travels: the step count (FedAvg's weight), FedMAS's factor, the
DP-SGD site's epsilon spent. A job's default: `all` (plain jobs) or `aggregation` (privacy jobs:
evaluation and counts, no training metrics); the site's own answer, when it gives one, replaces it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.filter import Filter
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable, make_reply

from fedxvit.errors import ArgumentParser, FedXViTError, read_json, run_cli
from fedxvit.protocol import REJECT_REASON_HEADER, result_dxo
from fedxvit.sites import SITE_CONFIG_FILE

CATEGORIES = ("training_metrics", "evaluation", "counts")
JOB_DEFAULTS = {
    "all": {"training_metrics": True, "evaluation": True, "counts": True},
    "aggregation": {"training_metrics": False, "evaluation": True, "counts": True},
}
MAY_LEAVE_KEY = "may_leave"
MAY_LEAVE_ENV = "FEDXVIT_MAY_LEAVE"  # e.g. "evaluation,counts"; "none": only what aggregation needs
TRAIN_METRICS_META = "train_metrics"
ALWAYS_STREAMED = ("dp_epsilon", "mas_factor")  # the privacy spent and the aggregation weight: not metadata to trim
EVALUATION_STREAMED = ("global_model_val_accuracy", "global_model_val_loss")


def job_default(name: str) -> dict:
    if name not in JOB_DEFAULTS:
        raise FedXViTError(f"job option may_leave='{name}' is unknown; choose one of {', '.join(JOB_DEFAULTS)}")
    return dict(JOB_DEFAULTS[name])


def parse_may_leave(value, where: str) -> dict:
    """{category: bool} from a site's answer: an object of booleans, or a comma-separated list of the allowed."""
    if isinstance(value, str):
        names = [n.strip() for n in value.split(",") if n.strip() and n.strip() != "none"]
        value = {name: True for name in names}
        unknown = sorted(set(names) - set(CATEGORIES))
    elif isinstance(value, dict):
        unknown = sorted(set(value) - set(CATEGORIES))
        if not unknown and not all(isinstance(v, bool) for v in value.values()):
            raise FedXViTError(f"{where}: every {MAY_LEAVE_KEY} value must be true or false")
    else:
        raise FedXViTError(f"{where}: {MAY_LEAVE_KEY} must be an object of true/false or a comma-separated list")
    if unknown:
        raise FedXViTError(f"{where}: unknown {MAY_LEAVE_KEY} category {unknown[0]!r}; known: {', '.join(CATEGORIES)}")
    return {name: bool(value.get(name, False)) for name in CATEGORIES}


def site_may_leave(
    site_config_dir: os.PathLike | None, default: str = "all", environ: dict | None = None
) -> tuple[dict, str]:
    """({category: bool}, where the answer came from): env FEDXVIT_MAY_LEAVE, else `may_leave` in the site's
    local/fedxvit_site.json, else the job's default. A site's answer is whole: what it does not name may not leave."""
    environ = os.environ if environ is None else environ
    if environ.get(MAY_LEAVE_ENV) is not None:
        return parse_may_leave(environ[MAY_LEAVE_ENV], f"env {MAY_LEAVE_ENV}"), f"env {MAY_LEAVE_ENV}"
    if site_config_dir is not None:
        config_file = Path(site_config_dir) / SITE_CONFIG_FILE
        if config_file.is_file():
            config = read_json(config_file, f"{config_file} does not exist")
            if isinstance(config, dict) and MAY_LEAVE_KEY in config:
                return parse_may_leave(config[MAY_LEAVE_KEY], str(config_file)), str(config_file)
    return job_default(default), f"the job's default '{default}'"


def strip_metadata(dxo: DXO, may_leave: dict) -> list[str]:
    """Remove from the DXO (its parts too) what `may_leave` forbids; the names of what was removed."""
    removed = []

    def trim_scores(scores: dict, where: str) -> None:
        if not may_leave["counts"] and "val_count" in scores:
            del scores["val_count"]
            removed.append(f"{where}.val_count")

    meta = dxo.meta if dxo.meta is not None else {}
    if not may_leave["training_metrics"] and TRAIN_METRICS_META in meta:
        del meta[TRAIN_METRICS_META]
        removed.append(TRAIN_METRICS_META)
    if MetaKey.INITIAL_METRICS in meta:
        if not may_leave["evaluation"]:
            del meta[MetaKey.INITIAL_METRICS]
            removed.append(MetaKey.INITIAL_METRICS)
        elif isinstance(meta[MetaKey.INITIAL_METRICS], dict):
            trim_scores(meta[MetaKey.INITIAL_METRICS], MetaKey.INITIAL_METRICS)
    if dxo.data_kind == DataKind.METRICS and isinstance(dxo.data, dict):
        if not may_leave["evaluation"]:
            removed += sorted(dxo.data)
            dxo.data.clear()
        else:
            trim_scores(dxo.data, "metrics")
    if dxo.data_kind == DataKind.COLLECTION and isinstance(dxo.data, dict):
        for key, part in dxo.data.items():
            if isinstance(part, DXO):
                removed += [f"{key}/{name}" for name in strip_metadata(part, may_leave)]
    return removed


def allowed_metrics(metrics: dict, may_leave: dict) -> dict:
    """The metrics a site may stream to the server (fedxvit.tracking's names): its scores of the global model
    are evaluation, the privacy spent and the MAS factor always go, everything else is training metrics."""
    return {
        name: value
        for name, value in metrics.items()
        if name in ALWAYS_STREAMED
        or (may_leave["evaluation"] if name in EVALUATION_STREAMED else may_leave["training_metrics"])
    }


class MetadataPolicy(Filter):
    """Task-result filter on every task: strips the metadata the site's policy (site_may_leave) forbids.

    `may_leave` is the job's default; a site's own answer replaces it. The first result says which
    policy applies and where it came from, in one log line."""

    def __init__(self, may_leave: str = "all"):
        super().__init__()
        job_default(may_leave)
        self.default = may_leave
        self.policy = None

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        if self.policy is None:
            site_config_dir = fl_ctx.get_engine().get_workspace().get_site_config_dir()
            self.policy, source = site_may_leave(site_config_dir, self.default)
            allowed = [name for name in CATEGORIES if self.policy[name]] or ["only what aggregation needs"]
            self.log_info(fl_ctx, f"fedxvit: may leave this site (from {source}): {', '.join(allowed)}")
        dxo = result_dxo(shareable)
        if dxo is None:
            return shareable
        removed = strip_metadata(dxo, self.policy)
        if not removed:
            return shareable
        self.log_debug(fl_ctx, f"fedxvit: kept at the site: {', '.join(removed)}")
        return dxo.update_shareable(shareable)


class KeepLocalModel(Filter):
    """Task-result filter: a whole model (a WEIGHTS result: `submit_model`) stays at the site. The request is
    answered with an error reply carrying the reason (not TASK_UNKNOWN, which NVFlare's server treats as
    fatal), and NVFlare's cross-site evaluation goes on without that model; updates and scores pass, so a
    site may require it on every task (privacy.json). For sites whose privacy rests on sending filtered
    updates only: a whole model in clear would undo it."""

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        try:
            if from_shareable(shareable).data_kind != DataKind.WEIGHTS:
                return shareable
        except ValueError:
            return shareable  # no data: nothing to keep
        site = fl_ctx.get_identity_name()
        self.log_info(fl_ctx, f"fedxvit {site}: the local model stays at the site (not sent for cross-site evaluation)")
        reply = make_reply(ReturnCode.EXECUTION_RESULT_ERROR)
        reply.set_header(REJECT_REASON_HEADER, "the site's privacy policy keeps its local model at the site")
        return reply


# ---- a site's local/ folder

RESOURCES_FILE, RESOURCES_DEFAULT_FILE, PRIVACY_FILE = "resources.json", "resources.json.default", "privacy.json"
FEDXVIT_CLASSES = "fedxvit."  # every class of the installed package
# What fedxvit's jobs build besides fedxvit's own classes and NVFlare's default allow list (a test checks every
# component path in jobs/ is covered): SCAFFOLD's workflow, the HE job's cross-site evaluation, FedOpt's optimizer.
JOB_CLASSES = (
    FEDXVIT_CLASSES,
    "nvflare.app_common.workflows.scatter_and_gather_scaffold.ScatterAndGatherScaffold",
    "nvflare.app_opt.he.cross_site_model_eval.HECrossSiteModelEval",
    "torch.optim.SGD",
    # jobs/fedxvit_flower: NVFlare's Flower integration (its controller, executor and metric relay)
    "nvflare.app_opt.flower.controller.FlowerController",
    "nvflare.app_opt.flower.executor.FlowerExecutor",
    "nvflare.app_common.widgets.metric_relay.MetricRelay",
)


def allow_classes(local_dir: os.PathLike, prefixes=()) -> Path:
    """Add what fedxvit's jobs build (JOB_CLASSES) and `prefixes` to the participant's class_allow_list in
    local/resources.json (created from resources.json.default when there is none; NVFlare's default list when
    neither names one)."""
    from nvflare.app_common.default_component_policy import DEFAULT_CLASS_ALLOW_LIST

    local_dir = Path(local_dir)
    local_dir.mkdir(parents=True, exist_ok=True)
    target = local_dir / RESOURCES_FILE
    source = target if target.is_file() else local_dir / RESOURCES_DEFAULT_FILE
    resources = read_json(source, "") if source.is_file() else {}
    if not isinstance(resources, dict):
        raise FedXViTError(f"{source}: not a JSON object")
    allowed = list(resources.get("class_allow_list") or DEFAULT_CLASS_ALLOW_LIST)
    resources["class_allow_list"] = allowed + [p for p in dict.fromkeys((*JOB_CLASSES, *prefixes)) if p not in allowed]
    target.write_text(json.dumps(resources, indent=2) + "\n")
    return target


UNFILTERED_SCOPE = "unfiltered"


def write_privacy(
    local_dir: os.PathLike, result_filters: list[dict], scope: str = "hospital", default: bool = True
) -> Path:
    """local/privacy.json with one scope whose result filters ({"path", "args"}) every result of a job in that
    scope passes at this site; a job naming another scope is refused. With `default` (a hospital's choice) the
    scope is every job's that names none; without it such a job runs in an UNFILTERED_SCOPE (NVFlare refuses a
    job without a scope when privacy.json names no default)."""
    local_dir = Path(local_dir)
    local_dir.mkdir(parents=True, exist_ok=True)
    scopes = [{"name": scope, "task_result_filters": result_filters}]
    if not default:
        scopes.append({"name": UNFILTERED_SCOPE, "task_result_filters": []})
    policy = {"scopes": scopes, "default_scope": scope if default else UNFILTERED_SCOPE}
    target = local_dir / PRIVACY_FILE
    target.write_text(json.dumps(policy, indent=2) + "\n")
    return target


def main(argv=None) -> int:
    parser = ArgumentParser(
        prog="python -m fedxvit.site_policy",
        description="Let a participant build fedxvit's components: add them to <local>/resources.json's "
        "class_allow_list (jobs carry no code).",
    )
    parser.add_argument("local", help="the participant's local/ folder (the simulator's: <workspace>/local)")
    parser.add_argument("--allow", nargs="*", default=[FEDXVIT_CLASSES], help="class path prefixes to allow")
    args = parser.parse_args(argv)
    print(allow_classes(args.local, args.allow))
    return 0


if __name__ == "__main__":
    run_cli(main)
