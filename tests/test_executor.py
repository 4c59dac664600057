"""FedXViTExecutor against NVFlare's Shareable/DXO API, with a hand-built FLContext (no server)."""

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.fl_constant import FLContextKey, ReturnCode
from nvflare.apis.signal import Signal
from nvflare.app_common.app_constant import AppConstants
from tiny import write_tiny_site

from fedxvit.classes import TASK_CLASSES
from fedxvit.errors import FedXViTError
from fedxvit.executor import (
    BEST_LOCAL_MODEL,
    TORCH_THREADS_ENV,
    FedXViTExecutor,
    resolve_torch_threads,
    simulator_parallel_clients,
    to_numpy_state,
)
from fedxvit.model import build_model
from fedxvit.sites import DATA_ROOT_ENV, SITE_CONFIG_FILE, site_data_dir, site_env_var
from fedxvit.training import apply_freeze_policy
from tooling.standalone import make_fl_ctx, serialized_size


@pytest.fixture(autouse=True)
def no_site_data_env(monkeypatch):
    """The tests choose each site's data folder themselves; a developer's own settings must not leak in."""
    for var in (DATA_ROOT_ENV, site_env_var("site1"), site_env_var("site-a")):
        monkeypatch.delenv(var, raising=False)


def global_task(model, round_number: int = 0):
    shareable = DXO(data_kind=DataKind.WEIGHTS, data=to_numpy_state(model.state_dict())).to_shareable()
    shareable.set_header(AppConstants.CURRENT_ROUND, round_number)
    return shareable


@pytest.fixture
def client(tmp_path, tiny_site_dir, monkeypatch):
    """An executor on the tiny site: 3 + 3 training and 2 + 2 validation images, batch 2, 2 local epochs."""
    monkeypatch.setenv(site_env_var("site1"), str(tiny_site_dir))
    executor = FedXViTExecutor(
        preset="tiny",
        local_epochs=2,
        learning_rate=1e-2,
        batch_size=2,
        freeze_policy="last-k",
        last_k=1,
        torch_threads=1,
    )
    return executor, make_fl_ctx(tmp_path / "site1")


def test_train_sends_only_trainable_diffs_that_rebuild_the_local_weights(client):
    executor, fl_ctx = client
    torch.manual_seed(0)
    global_model = build_model("tiny", len(TASK_CLASSES))
    result = executor.execute("train", global_task(global_model), fl_ctx, Signal())
    assert result.get_return_code(ReturnCode.OK) == ReturnCode.OK
    dxo = from_shareable(result)
    assert dxo.data_kind == DataKind.WEIGHT_DIFF

    expected = set(apply_freeze_policy(build_model("tiny", 2), "last-k", 1))
    assert set(dxo.data) == expected
    assert all(isinstance(v, np.ndarray) and v.dtype == np.float32 for v in dxo.data.values())
    assert any(np.abs(v).max() > 0 for v in dxo.data.values()), "training changed nothing"

    # 3 + 3 training images, batch 2, 2 epochs -> 6 steps
    assert dxo.get_meta_prop(MetaKey.NUM_STEPS_CURRENT_ROUND) == 6
    initial = dxo.get_meta_prop(MetaKey.INITIAL_METRICS)
    assert set(initial) == {"val_accuracy", "val_loss", "val_count"} and initial["val_count"] == 4
    assert "train_loss" in dxo.get_meta_prop("train_metrics")

    local = executor.model.state_dict()
    global_state = global_model.state_dict()
    for name, diff in dxo.data.items():
        rebuilt = global_state[name] + torch.from_numpy(diff)
        assert torch.allclose(rebuilt, local[name], rtol=0, atol=1e-6), name
    for name in set(global_state) - expected:  # frozen tensors never moved
        assert torch.equal(global_state[name], local[name]), name


def test_full_policy_also_sends_bn_statistics_so_the_global_model_keeps_them_consistent(client):
    executor, fl_ctx = client
    executor.freeze_policy = "full"
    global_model = build_model("tiny", len(TASK_CLASSES))
    dxo = from_shareable(executor.execute("train", global_task(global_model), fl_ctx, Signal()))
    running = [k for k in dxo.data if k.endswith("running_var")]
    assert running, "BatchNorm statistics were not sent under the full policy"
    local, global_state = executor.model.state_dict(), global_model.state_dict()
    for name in running:
        assert not torch.equal(local[name], global_state[name]), f"{name} did not adapt to local data"
        rebuilt = global_state[name] + torch.from_numpy(dxo.data[name])
        assert torch.allclose(rebuilt, local[name], rtol=0, atol=1e-5), name
    assert not any(k.endswith("num_batches_tracked") for k in dxo.data)


def test_validate_and_submit_model_serve_cross_site_evaluation(client):
    executor, fl_ctx = client
    model = build_model("tiny", 2)
    assert (
        executor.execute("submit_model", DXO(DataKind.WEIGHTS, {}).to_shareable(), fl_ctx, Signal()).get_return_code()
        == ReturnCode.EMPTY_RESULT
    )  # nothing trained yet
    executor.execute("train", global_task(model), fl_ctx, Signal())
    metrics = from_shareable(executor.execute("validate", global_task(model), fl_ctx, Signal()))
    assert metrics.data_kind == DataKind.METRICS and metrics.data["val_count"] == 4
    submitted = from_shareable(
        executor.execute("submit_model", DXO(DataKind.WEIGHTS, {}).to_shareable(), fl_ctx, Signal())
    )
    assert submitted.data_kind == DataKind.WEIGHTS
    assert set(submitted.data) == set(model.state_dict())
    assert (Path(fl_ctx.get_prop(FLContextKey.APP_ROOT)) / "best_local_model.pt").is_file()


class TriggeredAfterChecks(Signal):
    """A real NVFlare Signal that gets triggered while the task runs: once it has been read `checks` times."""

    def __init__(self, checks: int):
        super().__init__()
        self.checks, self.reads = checks, 0

    @property
    def triggered(self):
        self.reads += 1
        if self.reads > self.checks:
            self.trigger("abort")
        return super().triggered


# Reads of the abort signal in one train task of the `client` fixture: 1 before the task starts, then one
# before every batch -- 2 scoring the global model (4 validation images), 6 training (2 epochs x 3 batches),
# 2 scoring the local model.
TRAIN_TASK_READS = 1 + 2 + 6 + 2


def test_a_train_task_reads_the_abort_signal_before_every_batch(client):
    executor, fl_ctx = client
    signal = TriggeredAfterChecks(checks=TRAIN_TASK_READS)  # triggered only after the last read
    result = executor.execute("train", global_task(build_model("tiny", 2)), fl_ctx, signal)
    assert result.get_return_code(ReturnCode.OK) == ReturnCode.OK
    assert signal.reads == TRAIN_TASK_READS


@pytest.mark.parametrize(
    "checks, phase", [(2, "scoring the global model"), (5, "training"), (10, "scoring the local model")]
)
def test_abort_during_a_train_task_stops_at_the_next_batch(client, caplog, checks, phase):
    executor, fl_ctx = client
    caplog.set_level(logging.INFO)
    global_model = build_model("tiny", 2)
    signal = TriggeredAfterChecks(checks)
    result = executor.execute("train", global_task(global_model), fl_ctx, signal)
    assert result.get_return_code() == ReturnCode.TASK_ABORTED
    assert signal.reads == checks + 1, "it went on after the signal was triggered"
    assert any(f"task aborted while {phase}" in r.getMessage() for r in caplog.records)
    local = executor.model.state_dict()
    trained = any(not torch.equal(local[k], v) for k, v in global_model.state_dict().items())
    assert trained == (phase != "scoring the global model")
    assert not (Path(fl_ctx.get_prop(FLContextKey.APP_ROOT)) / BEST_LOCAL_MODEL).exists(), (
        "a half-scored model must not become the best local model"
    )


def test_abort_during_a_validate_task_stops_at_the_next_batch(client, caplog):
    executor, fl_ctx = client
    caplog.set_level(logging.INFO)
    signal = TriggeredAfterChecks(checks=2)  # the check before the task, then the first of 2 validation batches
    result = executor.execute("validate", global_task(build_model("tiny", 2)), fl_ctx, signal)
    assert result.get_return_code() == ReturnCode.TASK_ABORTED
    assert signal.reads == 3
    assert any("task aborted while validating the model of" in r.getMessage() for r in caplog.records)


def test_a_signal_triggered_before_the_task_starts_does_no_work(client):
    executor, fl_ctx = client
    executor.execute("train", global_task(build_model("tiny", 2)), fl_ctx, Signal())  # set up loaders first
    before = {k: v.clone() for k, v in executor.model.state_dict().items()}
    torch.manual_seed(1)
    other_model = build_model("tiny", 2)  # loading it would change the executor's weights
    signal = Signal()
    signal.trigger("stop")
    assert (
        executor.execute("train", global_task(other_model), fl_ctx, signal).get_return_code() == ReturnCode.TASK_ABORTED
    )
    assert all(torch.equal(v, before[k]) for k, v in executor.model.state_dict().items())


def test_missing_site_data_fails_the_task_with_a_clear_message(tmp_path, monkeypatch, caplog):
    missing = tmp_path / "nowhere"
    monkeypatch.setenv(site_env_var("site1"), str(missing))
    executor = FedXViTExecutor(preset="tiny", torch_threads=1)
    result = executor.execute("train", global_task(build_model("tiny", 2)), make_fl_ctx(tmp_path / "ws"), Signal())
    assert result.get_return_code() == ReturnCode.EXECUTION_EXCEPTION
    assert executor.train_loader is None  # failed before any DataLoader work
    with pytest.raises(FedXViTError, match=r"site site1: data folder .*nowhere .*FEDXVIT_DATA_SITE1.* does not exist"):
        site_data_dir("site1")
    assert any("site site1" in r.getMessage() and "nowhere" in r.getMessage() for r in caplog.records)


def test_site_data_override_precedence(tmp_path, monkeypatch):
    root_site = write_tiny_site(tmp_path / "root" / "site-a", train_per_class=1)
    json_site = write_tiny_site(tmp_path / "from_json", train_per_class=1)
    env_site = write_tiny_site(tmp_path / "from_env", train_per_class=1)
    local = tmp_path / "client" / "local"
    local.mkdir(parents=True)

    monkeypatch.setenv(DATA_ROOT_ENV, str(tmp_path / "root"))
    assert site_data_dir("site-a", local) == root_site.resolve()
    (local / SITE_CONFIG_FILE).write_text(json.dumps({"data_dir": "../../from_json"}))
    assert site_data_dir("site-a", local) == json_site.resolve()
    monkeypatch.setenv("FEDXVIT_DATA_SITE_A", str(env_site))
    assert site_env_var("site-a") == "FEDXVIT_DATA_SITE_A"
    assert site_data_dir("site-a", local) == env_site.resolve()


def test_site_without_datalist_names_site_and_path(tmp_path):
    (tmp_path / "site1").mkdir()
    with pytest.raises(FedXViTError, match=r"site site1: data folder .*site1 .*has no datalist.json"):
        site_data_dir("site1", environ={site_env_var("site1"): str(tmp_path / "site1")})


def test_auto_threads_share_the_cores_between_simulated_clients(monkeypatch):
    monkeypatch.setattr("fedxvit.executor.os.sched_getaffinity", lambda pid: set(range(8)))  # an 8-core machine
    assert resolve_torch_threads("auto", parallel_clients=1, environ={}) == 8
    assert resolve_torch_threads("auto", parallel_clients=3, environ={}) == 2
    assert resolve_torch_threads("auto", parallel_clients=10_000, environ={}) == 1  # never zero
    assert resolve_torch_threads(3, parallel_clients=3) == 3 and resolve_torch_threads("5") == 5  # explicit wins
    site_choice = {TORCH_THREADS_ENV: "6"}
    assert resolve_torch_threads("auto", parallel_clients=3, environ=site_choice) == 6  # a site's own setting
    assert resolve_torch_threads(2, parallel_clients=3, environ=site_choice) == 2  # the job's number wins
    with pytest.raises(FedXViTError, match=r"\$FEDXVIT_TORCH_THREADS='lots' is not a whole number"):
        resolve_torch_threads("auto", environ={TORCH_THREADS_ENV: "lots"})


def test_simulated_clients_are_counted_from_nvflares_public_context(tmp_path):
    from nvflare.apis.job_def import JobMetaKey

    fl_ctx = make_fl_ctx(tmp_path / "site1")
    assert simulator_parallel_clients(fl_ctx) == 1  # a real deployment: one client process per machine
    fl_ctx.set_prop(
        FLContextKey.JOB_META,
        {JobMetaKey.JOB_CLIENTS.value: [{"name": f"site{i}"} for i in range(3)]},
        private=True,
        sticky=False,
    )
    assert simulator_parallel_clients(fl_ctx) == 1, "job clients alone do not mean they share this machine"
    fl_ctx.set_prop(FLContextKey.SIMULATE_MODE, True, private=True, sticky=False)  # what NVFlare's simulator sets
    assert simulator_parallel_clients(fl_ctx) == 3


def test_initial_model_is_checked_before_the_server_starts(tmp_path):
    from fedxvit.checkpoint import save_checkpoint
    from fedxvit.persistor import INITIAL_MODEL_ENV, check_initial_model, resolve_initial_model

    path = tmp_path / "initial_global.pt"
    assert resolve_initial_model({INITIAL_MODEL_ENV: str(path)}) == path.resolve()
    with pytest.raises(FedXViTError, match=r"initial_global.pt does not exist: run `make transfer`"):
        check_initial_model(path, "tiny", 2)
    save_checkpoint(path, build_model("tiny", 2), meta={"class_names": list(TASK_CLASSES)})
    assert check_initial_model(path, "tiny", 2)["preset"] == "tiny"
    with pytest.raises(FedXViTError, match=r"is preset 'tiny' with 2 classes, but the job asks for preset 'cpu'"):
        check_initial_model(path, "cpu", 2)


def test_head_policy_update_is_a_small_fraction_of_the_model_on_the_wire(client):
    executor, fl_ctx = client
    executor.freeze_policy = "head"
    global_model = build_model("tiny", len(TASK_CLASSES))
    result = executor.execute("train", global_task(global_model), fl_ctx, Signal())
    assert set(from_shareable(result).data) == {"head.weight", "head.bias"}
    full_model_bytes = serialized_size(global_task(global_model))
    assert full_model_bytes > 4 * global_model.param_count  # float32 weights plus BN buffers and framing
    assert serialized_size(result) < full_model_bytes / 10
