"""What may leave a hospital is the hospital's decision (fedxvit.site_policy): jobs carry no code, a site's
metadata policy strips what it forbids, a site that keeps its local model answers without it, and a site's
NVFlare privacy.json is read as written (a job run in its scope on POC: test_poc.py)."""

import json

import numpy as np
import pytest
import torch
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.signal import Signal
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.default_component_policy import DEFAULT_CLASS_ALLOW_LIST
from tiny import REPO

from fedxvit.errors import FedXViTError
from fedxvit.executor import FedXViTExecutor, to_numpy_state, train_result
from fedxvit.model import build_model
from fedxvit.protocol import REJECT_REASON_HEADER
from fedxvit.site_policy import (
    JOB_CLASSES,
    MAY_LEAVE_ENV,
    KeepLocalModel,
    MetadataPolicy,
    allow_classes,
    allowed_metrics,
    site_may_leave,
    write_privacy,
)
from fedxvit.sites import SITE_CONFIG_FILE, site_env_var
from tooling.jobs import GENERATED_JOBS, render_jobs
from tooling.standalone import make_fl_ctx

SCORES = {"val_accuracy": 0.75, "val_loss": 0.5, "val_count": 8}


def a_train_result():
    meta = {
        MetaKey.NUM_STEPS_CURRENT_ROUND: 3,
        MetaKey.INITIAL_METRICS: dict(SCORES),
        "train_metrics": {"train_loss": 0.4, "train_accuracy": 0.9, "steps": 3},
        "dp_epsilon": 1.5,
    }
    return train_result({"head.bias": np.ones(2, np.float32)}, meta).to_shareable()


def test_no_job_carries_code_and_none_is_generated_with_any():
    """An app/custom/ folder makes a job bring-your-own-code (NVFlare then builds any class it names);
    the components come from the installed package, so no job folder has one and the generator writes none."""
    jobs = sorted(p for p in (REPO / "jobs").iterdir() if (p / "meta.json").is_file())
    assert {p.name for p in jobs} >= set(GENERATED_JOBS)
    assert not [p for p in jobs for app in p.iterdir() if (app / "custom").exists()]
    assert not [path for path in render_jobs(REPO / "jobs") if "custom" in path.parts]


def test_allow_classes_adds_fedxvit_to_nvflares_list_and_keeps_the_rest(tmp_path):
    local = tmp_path / "local"
    local.mkdir()
    (local / "resources.json.default").write_text(json.dumps({"format_version": 2, "snapshot_persistor": {"x": 1}}))
    allow_classes(local)
    allow_classes(local, ("fedxvit.", "tests_only."))  # again: nothing doubles
    resources = json.loads((local / "resources.json").read_text())
    assert resources["snapshot_persistor"] == {"x": 1}
    assert resources["class_allow_list"] == [*DEFAULT_CLASS_ALLOW_LIST, *JOB_CLASSES, "tests_only."]


def test_privacy_jobs_strip_training_metrics_and_keep_what_aggregation_needs(tmp_path):
    fl_ctx = make_fl_ctx(tmp_path / "site1")
    sent = from_shareable(MetadataPolicy("aggregation").process(a_train_result(), fl_ctx))
    assert set(sent.meta) == {MetaKey.NUM_STEPS_CURRENT_ROUND, MetaKey.INITIAL_METRICS, "dp_epsilon"}
    assert sent.meta[MetaKey.INITIAL_METRICS] == SCORES and sent.data  # the update itself is untouched
    everything = from_shareable(MetadataPolicy("all").process(a_train_result(), fl_ctx))
    assert "train_metrics" in everything.meta


def test_the_sites_own_policy_replaces_the_jobs_default(tmp_path, monkeypatch):
    monkeypatch.delenv(MAY_LEAVE_ENV, raising=False)
    fl_ctx = make_fl_ctx(tmp_path / "site1")
    local = tmp_path / "site1" / "local"
    (local / SITE_CONFIG_FILE).write_text(json.dumps({"may_leave": {"evaluation": True}}))  # no counts, no training
    policy = MetadataPolicy("all")
    sent = from_shareable(policy.process(a_train_result(), fl_ctx))
    assert "train_metrics" not in sent.meta
    assert sent.meta[MetaKey.INITIAL_METRICS] == {"val_accuracy": 0.75, "val_loss": 0.5}
    scores = from_shareable(policy.process(DXO(DataKind.METRICS, dict(SCORES)).to_shareable(), fl_ctx))
    assert scores.data == {"val_accuracy": 0.75, "val_loss": 0.5}
    monkeypatch.setenv(MAY_LEAVE_ENV, "none")  # the site's environment wins over its file: nothing optional leaves
    sent = from_shareable(MetadataPolicy("all").process(a_train_result(), fl_ctx))
    assert set(sent.meta) == {MetaKey.NUM_STEPS_CURRENT_ROUND, "dp_epsilon"}
    assert allowed_metrics(
        {"epoch_train_loss": 1.0, "global_model_val_accuracy": 0.5, "dp_epsilon": 2.0},
        {"training_metrics": False, "evaluation": False, "counts": False},
    ) == {"dp_epsilon": 2.0}


def test_a_bad_policy_is_one_line_naming_the_file_or_option(tmp_path, monkeypatch):
    monkeypatch.delenv(MAY_LEAVE_ENV, raising=False)
    (tmp_path / SITE_CONFIG_FILE).write_text(json.dumps({"may_leave": {"images": True}}))
    with pytest.raises(FedXViTError, match=f"{SITE_CONFIG_FILE}: unknown may_leave category 'images'"):
        site_may_leave(tmp_path)
    with pytest.raises(FedXViTError, match="job option may_leave='some'"):
        MetadataPolicy("some")


def test_a_site_that_keeps_its_local_model_answers_without_it(tmp_path):
    model = DXO(DataKind.WEIGHTS, {"head.bias": np.ones(2, np.float32)}).to_shareable()
    reply = KeepLocalModel().process(model, make_fl_ctx(tmp_path / "site1"))
    assert reply.get_return_code() == ReturnCode.EXECUTION_RESULT_ERROR  # not TASK_UNKNOWN: NVFlare's server goes on
    assert "local model" in reply.get_header(REJECT_REASON_HEADER)
    with pytest.raises(ValueError):
        from_shareable(reply)
    update = a_train_result()  # updates and scores pass: a site may require the filter on every task
    assert KeepLocalModel().process(update, make_fl_ctx(tmp_path / "site1")) is update


class RecordingWriter:
    """Stands in for the site's MLflowWriter: what the executor streams to the server."""

    def __init__(self):
        self.metrics = []

    def log_params(self, params):
        pass

    def log_metric(self, tag, value, step):
        self.metrics.append(tag)


def test_the_executor_streams_only_the_metrics_the_sites_policy_allows(tmp_path, tiny_site_dir, monkeypatch):
    """The metric stream is a way out of the site beside the task results: the site's may_leave (here:
    evaluation only) holds for it too, whatever the job's default ('all')."""
    monkeypatch.setenv(site_env_var("site1"), str(tiny_site_dir))
    monkeypatch.delenv(MAY_LEAVE_ENV, raising=False)
    fl_ctx = make_fl_ctx(tmp_path / "site1")
    (tmp_path / "site1" / "local" / SITE_CONFIG_FILE).write_text(json.dumps({"may_leave": {"evaluation": True}}))
    writer = RecordingWriter()
    fl_ctx.get_engine().components["log_writer"] = writer
    torch.manual_seed(0)
    task = DXO(DataKind.WEIGHTS, to_numpy_state(build_model("tiny", 2).state_dict())).to_shareable()
    task.set_header(AppConstants.CURRENT_ROUND, 0)
    task.set_header(AppConstants.NUM_ROUNDS, 1)
    site = FedXViTExecutor(preset="tiny", batch_size=2, torch_threads=1)
    result = site.execute("train", task, fl_ctx, Signal())
    assert result.get_return_code(ReturnCode.OK) == ReturnCode.OK
    assert set(writer.metrics) == {"global_model_val_accuracy", "global_model_val_loss"}, writer.metrics


def test_a_sites_privacy_file_names_its_scope_and_makes_it_the_default_only_when_asked(tmp_path):
    """NVFlare runs a job that names no scope in the site's default_scope and refuses it without one (the POC
    test in test_poc.py runs a job in a scope written here, and other jobs beside it)."""
    filters = [{"path": "fedxvit.site_policy.KeepLocalModel", "args": {}}]
    for default in (True, False):
        policy = json.loads(write_privacy(tmp_path / str(default), filters, "no-local-model", default).read_text())
        scopes = {scope["name"]: scope["task_result_filters"] for scope in policy["scopes"]}
        assert scopes["no-local-model"] == filters
        if default:
            assert policy["default_scope"] == "no-local-model" and len(scopes) == 1
        else:
            assert scopes[policy["default_scope"]] == []  # jobs naming no scope still run, unfiltered


def test_every_class_a_shipped_job_names_is_on_the_allow_list_a_site_writes(tmp_path):
    """A job with no code runs only classes every participant allows: each component path in jobs/ must be."""

    def paths(node):
        if isinstance(node, dict):
            if isinstance(node.get("path"), str) and node["path"].count(".") >= 1 and " " not in node["path"]:
                yield node["path"]
            for value in node.values():
                yield from paths(value)
        elif isinstance(node, list):
            for value in node:
                yield from paths(value)

    allowed = json.loads(allow_classes(tmp_path / "local").read_text())["class_allow_list"]
    named = {
        path for config in (REPO / "jobs").glob("*/app/config/*.json") for path in paths(json.loads(config.read_text()))
    }
    assert "nvflare.app_common.workflows.scatter_and_gather_scaffold.ScatterAndGatherScaffold" in named
    refused = [
        path for path in named if not any(path == a or (a.endswith(".") and path.startswith(a)) for a in allowed)
    ]
    assert refused == []
