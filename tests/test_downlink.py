"""Only the trainable tensors go down (fedxvit.downlink): the server's task-data filter and the site's executor,
each with NVFlare's real FLContext, peer context and wire format (FOBS) between them, no server process."""

import json
import logging

import numpy as np
import pytest
import torch
from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import make_copy
from nvflare.apis.signal import Signal
from nvflare.apis.utils.decomposers import flare_decomposers
from nvflare.apis.utils.fl_context_utils import gen_new_peer_ctx
from nvflare.app_common.app_constant import AlgorithmConstants, AppConstants
from nvflare.app_common.decomposers import common_decomposers
from nvflare.fuel.utils import fobs

from fedxvit.classes import TASK_CLASSES
from fedxvit.downlink import DOWNLINK_FILE, TrainableOnlyDownlink
from fedxvit.executor import FedXViTExecutor, to_numpy_state
from fedxvit.model import build_model
from fedxvit.protocol import FROZEN_META, HELD_PROP, fingerprint
from fedxvit.sites import site_env_var
from fedxvit.training import apply_freeze_policy
from tooling.standalone import make_fl_ctx

flare_decomposers.register()
common_decomposers.register()


def task(state: dict, round_number: int, name: str = "train"):
    shareable = DXO(DataKind.WEIGHTS, data=to_numpy_state(state)).to_shareable()
    shareable.set_header(AppConstants.CURRENT_ROUND, round_number)
    shareable.set_header("__task_name__", name)
    return shareable


def over_the_wire(shareable):
    """What the site receives: the server's Shareable serialized and read back as NVFlare sends it."""
    return fobs.loads(fobs.dumps(shareable))


def server_sends(filter_, shareable, site_ctx: FLContext, server_ctx: FLContext):
    """The filter as NVFlare's server runs it on a task request: with the requesting site's public properties."""
    server_ctx.set_peer_context(gen_new_peer_ctx(site_ctx))
    return filter_.process(shareable, server_ctx)


def moved(state: dict, names) -> dict:
    """The state with the named tensors changed, as a round of training changes the trainable ones."""
    return {k: (v + 0.01 if k in names and v.is_floating_point() else v.clone()) for k, v in state.items()}


@pytest.fixture
def site(tmp_path, tiny_site_dir, monkeypatch):
    """A last-k executor on the tiny site, its FLContext, the server's FLContext and filter, and a global model."""
    monkeypatch.setenv(site_env_var("site1"), str(tiny_site_dir))
    executor = FedXViTExecutor(preset="tiny", local_epochs=1, batch_size=2, freeze_policy="last-k", torch_threads=1)
    torch.manual_seed(0)
    model = build_model("tiny", len(TASK_CLASSES))
    trainable = apply_freeze_policy(build_model("tiny", len(TASK_CLASSES)), "last-k", 1)
    return {
        "executor": executor,
        "ctx": make_fl_ctx(tmp_path / "site1"),
        "server_ctx": make_fl_ctx(tmp_path / "server", site="server"),
        "filter": TrainableOnlyDownlink(),
        "state": model.state_dict(),
        "trainable": trainable,
        "server_run": tmp_path / "server" / "job1",
    }


def test_after_a_whole_model_only_the_trainable_tensors_go_down_and_the_site_completes_them(site):
    executor, ctx, server_ctx, filter_ = site["executor"], site["ctx"], site["server_ctx"], site["filter"]
    first = task(site["state"], 0)
    assert server_sends(filter_, first, ctx, server_ctx) is first  # nothing held yet: the whole model
    result = executor.execute("train", over_the_wire(first), ctx, Signal())
    assert result.get_return_code(ReturnCode.OK) == ReturnCode.OK
    held = ctx.get_prop(HELD_PROP)
    assert held["trainable"] == sorted(from_shareable(result).data)  # what it trains is what it sends

    round_one = moved(site["state"], site["trainable"])  # the next global model: the frozen tensors unchanged
    whole = task(round_one, 1, "validate")
    sent = server_sends(filter_, whole, ctx, server_ctx)
    weights = from_shareable(sent)
    assert set(weights.data) == set(site["trainable"]) and weights.get_meta_prop(FROZEN_META) == held["fingerprint"]
    assert set(from_shareable(whole).data) == set(round_one)  # the task itself, shared by every site, stays whole
    uplink = sum(np.asarray(v).nbytes for v in from_shareable(result).data.values())
    assert sum(v.nbytes for v in weights.data.values()) <= uplink < 0.5 * serialized_values(whole)

    reply = executor.execute("validate", over_the_wire(sent), ctx, Signal())
    assert reply.get_return_code(ReturnCode.OK) == ReturnCode.OK
    local = executor.model.state_dict()
    assert all(torch.equal(local[k], round_one[k]) for k in round_one), "the completed model is not the global one"

    rows = json.loads((site["server_run"] / DOWNLINK_FILE).read_text())["tasks"]
    assert [(r["round"], r["task"], r["site"], r["left_out"] > 0) for r in rows] == [
        (0, "train", "site1", False),
        (1, "validate", "site1", True),
    ]
    assert rows[1]["tensors"] == len(site["trainable"]) and rows[1]["bytes"] < rows[1]["full_bytes"]


def serialized_values(shareable) -> int:
    return sum(np.asarray(v).nbytes for v in from_shareable(shareable).data.values())


def test_a_site_refuses_a_model_left_without_frozen_tensors_it_does_not_hold_then_gets_the_whole_one(site, caplog):
    executor, ctx, server_ctx, filter_ = site["executor"], site["ctx"], site["server_ctx"], site["filter"]
    executor.execute("validate", over_the_wire(task(site["state"], 0, "validate")), ctx, Signal())
    sent = server_sends(filter_, task(site["state"], 1, "validate"), ctx, server_ctx)
    lying = over_the_wire(sent)
    dxo = from_shareable(lying)
    dxo.meta[FROZEN_META] = "0" * 32  # frozen tensors the site never held
    dxo.update_shareable(lying)
    with caplog.at_level(logging.ERROR):
        reply = executor.execute("validate", lying, ctx, Signal())
    assert reply.get_return_code() == ReturnCode.EXECUTION_EXCEPTION
    refusal = [r.getMessage() for r in caplog.records if "task refused" in r.getMessage()]
    assert len(refusal) == 1 and "\n" not in refusal[0] and "site1" in refusal[0], refusal
    assert ctx.get_prop(HELD_PROP) is None  # it forgot what it held: the server sends the whole model next
    again = task(site["state"], 1, "validate")
    assert server_sends(filter_, again, ctx, server_ctx) is again


def test_the_whole_model_goes_when_the_frozen_tensors_differ_or_are_encrypted(site):
    ctx, server_ctx, filter_, state = site["ctx"], site["server_ctx"], site["filter"], site["state"]
    frozen = {k: v.numpy() for k, v in state.items() if k not in site["trainable"]}
    ctx.set_prop(HELD_PROP, {"trainable": site["trainable"], "fingerprint": fingerprint(frozen)}, private=False)
    assert from_shareable(server_sends(filter_, task(state, 1), ctx, server_ctx)).get_meta_prop(FROZEN_META)
    other = moved(state, [k for k in state if k not in site["trainable"]])  # e.g. a replaced global model
    whole = task(other, 1)
    assert server_sends(filter_, whole, ctx, server_ctx) is whole
    encrypted = task(state, 1)
    dxo = from_shareable(encrypted)
    dxo.data[site["trainable"][0]] = b"ciphertext"  # the HE job's trainable tensors
    dxo.update_shareable(encrypted)
    assert server_sends(filter_, encrypted, ctx, server_ctx) is encrypted


def test_scaffold_controls_travel_whole_beside_the_trainable_weights(site):
    ctx, server_ctx, filter_, state = site["ctx"], site["server_ctx"], site["filter"], site["state"]
    frozen = {k: v.numpy() for k, v in state.items() if k not in site["trainable"]}
    ctx.set_prop(HELD_PROP, {"trainable": site["trainable"], "fingerprint": fingerprint(frozen)}, private=False)
    controls = DXO(DataKind.WEIGHT_DIFF, data={k: np.zeros(1) for k in site["trainable"]})
    collection = DXO(
        DataKind.COLLECTION,
        data={
            AppConstants.MODEL_WEIGHTS: DXO(DataKind.WEIGHTS, data=to_numpy_state(state)),
            AlgorithmConstants.SCAFFOLD_CTRL_GLOBAL: controls,
        },
    ).to_shareable()
    parts = from_shareable(server_sends(filter_, collection, ctx, server_ctx)).data
    assert set(parts[AppConstants.MODEL_WEIGHTS].data) == set(site["trainable"])
    assert parts[AlgorithmConstants.SCAFFOLD_CTRL_GLOBAL] is controls


def test_a_broadcast_is_hashed_once_for_all_its_sites(site, monkeypatch):
    """Every site gets a shallow copy of one broadcast (NVFlare's make_copy): the frozen tensors are hashed once per
    task, not once per site, and a new task is hashed again."""
    import fedxvit.downlink as downlink

    ctx, server_ctx, filter_, state = site["ctx"], site["server_ctx"], site["filter"], site["state"]
    frozen = {k: v.numpy() for k, v in state.items() if k not in site["trainable"]}
    ctx.set_prop(HELD_PROP, {"trainable": site["trainable"], "fingerprint": fingerprint(frozen)}, private=False)
    calls = []
    monkeypatch.setattr(downlink, "fingerprint", lambda tensors: calls.append(1) or fingerprint(tensors))
    broadcast = task(state, 1)
    for _ in range(3):
        sent = server_sends(filter_, make_copy(broadcast), ctx, server_ctx)
        assert set(from_shareable(sent).data) == set(site["trainable"])
    assert len(calls) == 1
    server_sends(filter_, task(state, 2), ctx, server_ctx)
    assert len(calls) == 2
