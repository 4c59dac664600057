"""Each algorithm's mechanism is active, shown without NVFlare's runtime (tiny preset, tiny data).

FedProx pulls the local update towards the global model; SCAFFOLD's control variates are
non-zero after a local round, follow the helper's formula, travel in the site's result (checked
by the update filter, screened and combined by the server) and correct the next round; FedOpt's
server step (NVFlare's generator, fed a real FLContext) differs from plain averaging; the cyclic
job's filter lets the relay go on past a bad site; Ditto's personalized model is pulled towards
the global model by lambda, kept at the site across rounds, and leaves the global update alone.
"""

import importlib

import numpy as np
import pytest
import torch
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import ReservedKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import make_reply
from nvflare.apis.signal import Signal
from nvflare.app_common.abstract.model import ModelLearnableKey, make_model_learnable
from nvflare.app_common.app_constant import AlgorithmConstants, AppConstants
from nvflare.app_common.app_event_type import AppEventType
from nvflare.app_opt.pt.fedopt import PTFedOptModelShareableGenerator
from tiny import tiny_site_training

from fedxvit.aggregation import AGGREGATION_REPORT
from fedxvit.algorithms import (
    PERSONALIZED_MODEL,
    Ditto,
    FedAvg,
    FedProx,
    RoundAborted,
    Scaffold,
    SiteTraining,
    make_strategy,
)
from fedxvit.classes import TASK_CLASSES
from fedxvit.data import make_loader
from fedxvit.errors import FedXViTError
from fedxvit.executor import FedXViTExecutor, to_numpy_state
from fedxvit.filters import RejectBadUpdates
from fedxvit.methods import SITE_STRATEGIES
from fedxvit.model import build_model
from fedxvit.protocol import REJECT_REASON_HEADER
from fedxvit.server_algorithms import ScaffoldScreenedAssembler, ServerModelSync
from fedxvit.sites import site_env_var
from fedxvit.training import apply_freeze_policy, make_optimizer, train_epoch
from tooling.standalone import make_fl_ctx

CPU = torch.device("cpu")


def start_model():
    torch.manual_seed(0)
    return build_model("tiny", len(TASK_CLASSES))


def local_round(site_dir, strategy, global_controls=None, epochs=3, lr=1e-2, model=None):
    """One site's round from the same start and the same batches: (update of the trainable tensors, model).
    `model`: the site's model of an earlier round (SCAFFOLD's helper keeps it), reset to the start."""
    if model is None:
        model = start_model()
    else:
        model.load_state_dict(start_model().state_dict())
    start = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = apply_freeze_policy(model, "last-k", 1)
    optimizer = make_optimizer(model, lr)
    strategy.start_round(model, optimizer, global_controls)
    loader = make_loader(site_dir, "training", 32, 2, train=True, seed=0)
    for _ in range(epochs):
        train_epoch(model, loader, optimizer, CPU, extra_loss=strategy.extra_loss, after_step=strategy.after_step)
    update = {k: model.state_dict()[k] - start[k] for k in trainable}
    return update, model


def norm(update: dict) -> float:
    return float(sum(v.double().pow(2).sum() for v in update.values()) ** 0.5)


def assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-7) for k in a)


def assert_differ(a: dict, b: dict):
    assert max(float((a[k] - b[k]).abs().max()) for k in a) > 1e-5


# ---- FedProx
def test_fedprox_with_mu_pulls_the_local_update_towards_the_global_model(tiny_site_dir):
    plain, _ = local_round(tiny_site_dir, FedAvg())
    mu_zero, _ = local_round(tiny_site_dir, FedProx(mu=0.0))
    assert_same(plain, mu_zero)  # same start, same batches: any difference below is FedProx's term
    proximal, _ = local_round(tiny_site_dir, FedProx(mu=10.0))
    assert_differ(plain, proximal)
    assert norm(proximal) < 0.9 * norm(plain), (norm(proximal), norm(plain))


def test_fedprox_term_covers_the_trainable_tensors_only():
    model = start_model()
    trainable = apply_freeze_policy(model, "last-k", 1)
    strategy = FedProx(mu=0.5)
    strategy.start_round(model, make_optimizer(model, 1e-3))
    assert float(strategy.extra_loss().detach()) == 0.0  # at the round's start w == w_global
    params = dict(model.named_parameters())
    with torch.no_grad():
        params["head.bias"].add_(torch.tensor([1.0, 2.0]))  # trainable
        params["proj.weight"].add_(5.0)  # frozen under last-k: not FedProx's business
    assert "head.bias" in trainable and "proj.weight" not in trainable
    assert float(strategy.extra_loss().detach()) == pytest.approx(0.5 / 2 * (1.0 + 4.0))


def test_every_site_strategy_the_registry_names_is_built_and_each_is_its_own():
    built = {strategy: type(make_strategy(strategy)) for strategy in SITE_STRATEGIES}
    assert len(set(built.values())) == len(SITE_STRATEGIES) and set(SITE_STRATEGIES) >= {"fedavg", "fedprox"}


def test_unknown_algorithm_or_negative_mu_is_one_line_naming_the_option():
    with pytest.raises(
        FedXViTError, match=r"algorithm='fedsgd' is unknown; choose one of the sites' strategies \(fedavg: fedxvit, "
    ) as error:
        make_strategy("fedsgd")
    assert "fedxvit_fedopt" in str(error.value) and "fedprox: fedxvit_fedprox;" in str(error.value)
    with pytest.raises(FedXViTError, match=r"mu=-1"):
        make_strategy("fedprox", mu=-1)
    with pytest.raises(FedXViTError, match=r"ditto_lambda=-0.5"):
        make_strategy("ditto", ditto_lambda=-0.5)
    with pytest.raises(FedXViTError, match=r"personal_epochs=0"):
        make_strategy("ditto", personal_epochs=0)


# ---- SCAFFOLD
def zero_controls(model) -> dict:
    return {k: np.zeros(tuple(v.shape), np.float32) for k, v in model.state_dict().items()}


def test_scaffold_control_variates_are_non_zero_after_a_round_and_correct_the_next(tiny_site_dir):
    lr, epochs = 1e-2, 3
    scaffold = Scaffold()
    plain, _ = local_round(tiny_site_dir, FedAvg(), epochs=epochs, lr=lr)
    update, model = local_round(
        tiny_site_dir, scaffold, global_controls=zero_controls(start_model()), epochs=epochs, lr=lr
    )
    assert_same(plain, update)  # c_global = c_local = 0: round 0 is FedAvg
    deltas = scaffold.finish_round()
    assert set(deltas) == set(plain), "control variates only for the trainable parameters"
    steps = scaffold.helper.cnt
    assert steps == epochs * 3  # 3 + 3 images, batch 2
    for name, delta in deltas.items():  # option II of the paper: c_local = (w_global - w_local) / (K * lr)
        assert np.allclose(delta, -update[name].numpy() / (steps * lr), atol=1e-5), name
    assert norm({k: torch.from_numpy(v) for k, v in deltas.items()}) > 0

    # next round: the server's c_global (here the site's own change) corrects every step
    c_global = {**zero_controls(model), **{k: v * 2 for k, v in deltas.items()}}
    corrected, _ = local_round(tiny_site_dir, scaffold, global_controls=c_global, epochs=epochs, lr=lr, model=model)
    assert_differ(plain, corrected)


def test_scaffold_without_global_controls_says_which_workflow_it_needs():
    with pytest.raises(FedXViTError, match="ScatterAndGatherScaffold"):
        Scaffold().start_round(start_model(), None, None)


@pytest.fixture
def site_fl_ctx(tmp_path, tiny_site_dir, monkeypatch):
    monkeypatch.setenv(site_env_var("site1"), str(tiny_site_dir))
    return make_fl_ctx(tmp_path / "site1")


def scaffold_task(model, controls):
    collection = DXO(
        DataKind.COLLECTION,
        data={
            AppConstants.MODEL_WEIGHTS: DXO(DataKind.WEIGHTS, to_numpy_state(model.state_dict())),
            AlgorithmConstants.SCAFFOLD_CTRL_GLOBAL: DXO(DataKind.WEIGHT_DIFF, controls),
        },
    )
    shareable = collection.to_shareable()
    shareable.set_header(AppConstants.CURRENT_ROUND, 0)
    return shareable


def server_ctx(global_model, site="site1"):
    peer = FLContext()
    peer.set_prop(ReservedKey.IDENTITY_NAME, site, private=False, sticky=False)
    fl_ctx = FLContext()
    fl_ctx.set_peer_context(peer)
    fl_ctx.set_prop(
        AppConstants.GLOBAL_MODEL,
        make_model_learnable(to_numpy_state(global_model.state_dict()), {}),
        private=True,
        sticky=False,
    )
    fl_ctx.set_prop(AppConstants.CURRENT_ROUND, 0, private=True, sticky=False)
    return fl_ctx


def test_scaffold_site_returns_its_control_variates_with_the_update_and_the_filter_checks_them(site_fl_ctx):
    executor = FedXViTExecutor(preset="tiny", batch_size=2, learning_rate=1e-2, torch_threads=1, algorithm="scaffold")
    global_model = start_model()
    result = executor.execute("train", scaffold_task(global_model, zero_controls(global_model)), site_fl_ctx, Signal())
    assert result.get_return_code(ReturnCode.OK) == ReturnCode.OK
    outer = from_shareable(result)
    assert outer.data_kind == DataKind.COLLECTION
    weights, controls = outer.data[AppConstants.MODEL_WEIGHTS], outer.data[AlgorithmConstants.SCAFFOLD_CTRL_DIFF]
    assert weights.data_kind == controls.data_kind == DataKind.WEIGHT_DIFF
    assert set(controls.data) == set(apply_freeze_policy(start_model(), "last-k", 1))
    assert all(v.dtype == np.float32 for v in controls.data.values())
    assert any(np.abs(v).max() > 0 for v in controls.data.values())
    assert outer.get_meta_prop(MetaKey.NUM_STEPS_CURRENT_ROUND) == 3  # read by the aggregator and the widgets
    assert outer.get_meta_prop(MetaKey.INITIAL_METRICS)["val_count"] == 4

    assert RejectBadUpdates().process(result, server_ctx(global_model)) is result
    controls.data["head.bias"] = np.array([np.nan, 0.0], np.float32)
    rejected = RejectBadUpdates().process(outer.to_shareable(), server_ctx(global_model))
    assert rejected.get_return_code() == ReturnCode.EXECUTION_RESULT_ERROR
    assert rejected.get_header(REJECT_REASON_HEADER) == (
        f"rejected by the update filter: {AlgorithmConstants.SCAFFOLD_CTRL_DIFF}/head.bias: holds NaN (1 of 2 values)"
    )

    fedavg_site = FedXViTExecutor(preset="tiny", batch_size=2, torch_threads=1)
    refused = fedavg_site.execute(
        "train", scaffold_task(global_model, zero_controls(global_model)), site_fl_ctx, Signal()
    )
    assert refused.get_return_code() == ReturnCode.EXECUTION_EXCEPTION  # a FedAvg site cannot join a SCAFFOLD job


def scaffold_contribution(weights: dict, controls: dict, steps: int) -> DXO:
    return DXO(
        DataKind.COLLECTION,
        meta={MetaKey.NUM_STEPS_CURRENT_ROUND: steps},
        data={
            AppConstants.MODEL_WEIGHTS: DXO(DataKind.WEIGHT_DIFF, weights),
            AlgorithmConstants.SCAFFOLD_CTRL_DIFF: DXO(DataKind.WEIGHT_DIFF, controls),
        },
    )


def test_scaffold_assembler_combines_weights_and_controls_and_drops_absurd_control_variates():
    assembler = ScaffoldScreenedAssembler(norm_k=10)
    one = {"w": np.ones(2, np.float32)}
    contributions = {
        "site1": scaffold_contribution(one, {"w": np.full(2, 1.0, np.float32)}, 1),
        "site2": scaffold_contribution(one, {"w": np.full(2, 4.0, np.float32)}, 3),
        "site3": scaffold_contribution(one, {"w": np.full(2, 2.0, np.float32)}, 1),
        "site4": scaffold_contribution(one, {"w": np.full(2, 1e6, np.float32)}, 1),
    }
    data = {site: assembler.get_model_params(dxo) for site, dxo in contributions.items()}
    fl_ctx = server_ctx(start_model())
    result = assembler.assemble(data, fl_ctx)
    assert result.data_kind == DataKind.COLLECTION
    report = fl_ctx.get_prop(AGGREGATION_REPORT)
    assert report["aggregated"] == ["site1", "site2", "site3"]
    assert report["rejected"]["site4"].startswith("control variates: update norm")
    assert np.allclose(result.data[AppConstants.MODEL_WEIGHTS].data["w"], 1.0)
    # weighted by local steps like the weights: (1 * 1 + 3 * 4 + 1 * 2) / 5
    assert np.allclose(result.data[AlgorithmConstants.SCAFFOLD_CTRL_DIFF].data["w"], 3.0)


# ---- FedOpt
class ServerEngine:
    """What NVFlare's FedOpt generator and the sync widget ask of the server engine."""

    def __init__(self, components):
        self.components = components

    def get_component(self, component_id):
        return self.components.get(component_id)

    def build_component(self, config):
        module, name = config["path"].rsplit(".", 1)
        return getattr(importlib.import_module(module), name)(**config["args"])

    def fire_event(self, event_type, fl_ctx):
        pass


def fedopt_rounds(diffs: list, server_lr: float, momentum: float, global_state: dict) -> list:
    """The global weights after each FedOpt round, as the FedOpt job computes them: the sync widget loads
    the global model into a freshly built server model, then NVFlare's generator takes its SGD step."""
    server_model = build_model("tiny", len(TASK_CLASSES))  # random init: only the sync makes it the global model
    generator = PTFedOptModelShareableGenerator(
        source_model="server_model",
        device="cpu",
        optimizer_args={"path": "torch.optim.SGD", "args": {"lr": server_lr, "momentum": momentum}},
    )
    sync = ServerModelSync("server_model")
    fl_ctx = FLContext()
    fl_ctx.set_prop(ReservedKey.ENGINE, ServerEngine({"server_model": server_model}), private=True, sticky=False)
    generator.handle_event(EventType.START_RUN, fl_ctx)
    learnable = make_model_learnable(to_numpy_state(global_state), {})
    history = []
    for diff in diffs:
        fl_ctx.set_prop(AppConstants.GLOBAL_MODEL, learnable, private=True, sticky=False)
        sync.handle_event(AppEventType.BEFORE_SHAREABLE_TO_LEARNABLE, fl_ctx)
        learnable = generator.shareable_to_learnable(DXO(DataKind.WEIGHT_DIFF, diff).to_shareable(), fl_ctx)
        history.append({k: np.asarray(v).copy() for k, v in learnable[ModelLearnableKey.WEIGHTS].items()})
    return history


def test_fedopt_server_step_differs_from_plain_averaging():
    global_state = start_model().state_dict()
    rng = np.random.default_rng(0)
    diffs = [
        {
            name: rng.normal(0, 0.01, tuple(global_state[name].shape)).astype(np.float32)
            for name in ("head.weight", "head.bias")
        }
        for _ in range(2)
    ]
    start = to_numpy_state(global_state)
    fedavg = [{**start, **{k: start[k] + diffs[0][k] for k in diffs[0]}}]
    fedavg.append({**fedavg[0], **{k: fedavg[0][k] + diffs[1][k] for k in diffs[1]}})

    plain_sgd = fedopt_rounds(diffs, server_lr=1.0, momentum=0.0, global_state=global_state)
    for fedopt_round, fedavg_round in zip(plain_sgd, fedavg):  # lr 1, no momentum: exactly FedAvg
        assert all(np.allclose(fedopt_round[k], fedavg_round[k], atol=1e-6) for k in start)

    momentum = fedopt_rounds(diffs, server_lr=1.0, momentum=0.9, global_state=global_state)
    for name in diffs[0]:
        assert np.allclose(momentum[0][name], fedavg[0][name], atol=1e-6)  # round 0: no momentum yet
        # round 1: the step is d1 + 0.9 * d0, not d1
        assert np.allclose(momentum[1][name], fedavg[1][name] + 0.9 * diffs[0][name], atol=1e-6)
        assert not np.allclose(momentum[1][name], fedavg[1][name], atol=1e-4)
    for name in set(start) - set(diffs[0]):  # tensors nobody trained stay the global model's, not the server model's
        assert np.array_equal(momentum[1][name], start[name]), name

    half = fedopt_rounds(diffs[:1], server_lr=0.5, momentum=0.0, global_state=global_state)
    assert np.allclose(half[0]["head.bias"], start["head.bias"] + 0.5 * diffs[0]["head.bias"], atol=1e-6)


# ---- cyclic
def test_cyclic_filter_turns_a_bad_turn_into_an_update_that_changes_nothing():
    global_model = start_model()
    skip = RejectBadUpdates(on_bad_result="empty_update")
    bad = DXO(DataKind.WEIGHT_DIFF, {"head.bias": np.array([np.nan, 0.0], np.float32)}).to_shareable()
    for result, reason in (
        (bad, "rejected by the update filter: head.bias: holds NaN"),
        (make_reply(ReturnCode.EXECUTION_EXCEPTION), "the site returned EXECUTION_EXCEPTION"),
    ):
        passed_on = skip.process(result, server_ctx(global_model, "site3"))
        assert passed_on.get_return_code(ReturnCode.OK) == ReturnCode.OK  # CyclicController stops on anything else
        dxo = from_shareable(passed_on)
        assert (dxo.data_kind, dxo.data) == (DataKind.WEIGHT_DIFF, {})
        assert passed_on.get_header(REJECT_REASON_HEADER).startswith(reason)
    good = DXO(DataKind.WEIGHT_DIFF, {"head.bias": np.zeros(2, np.float32)}).to_shareable()
    assert skip.process(good, server_ctx(global_model)) is good
    with pytest.raises(ValueError, match="on_bad_result='skip'"):
        RejectBadUpdates(on_bad_result="skip")


# ---- Ditto
def ditto_site(site_dir, app_dir) -> SiteTraining:
    return tiny_site_training(site_dir, app_dir)


def ditto_round(strategy: Ditto, global_state: dict) -> dict:
    """One round of the personalized model from the global weights `global_state`: its trainable tensors."""
    model = start_model()
    model.load_state_dict(global_state)
    trainable = apply_freeze_policy(model, "last-k", 1)
    strategy.start_round(model, make_optimizer(model, 1e-2))
    assert strategy.finish_round() == {}  # nothing travels beside the global model's update
    personal = strategy.helper.model.state_dict()
    return {k: personal[k].clone() for k in trainable}


def distance(a: dict, b: dict) -> float:
    return norm({k: a[k] - b[k] for k in a})


def test_ditto_lambda_pulls_the_personalized_model_towards_the_global_one(tiny_site_dir, tmp_path):
    start = start_model().state_dict()
    moved = {}
    for lam in (0.0, 10.0):
        strategy = Ditto(ditto_lambda=lam, personal_epochs=3)
        strategy.attach(ditto_site(tiny_site_dir, tmp_path / f"lambda{lam}"))
        moved[lam] = distance(ditto_round(strategy, start), start)
        assert (tmp_path / f"lambda{lam}" / PERSONALIZED_MODEL).is_file()
        metrics = strategy.round_metrics()
        assert set(metrics) == {
            "personal_train_loss",
            "personal_val_accuracy",
            "personal_val_balanced_accuracy",
            "personal_val_loss",
        }
        assert strategy.helper.best_metric == metrics["personal_val_balanced_accuracy"]  # the best kept by it
    assert moved[0.0] > 0 and moved[10.0] < 0.9 * moved[0.0], moved


def test_ditto_keeps_the_personalized_model_across_rounds_and_the_update_is_fedavgs(tiny_site_dir, tmp_path):
    plain, _ = local_round(tiny_site_dir, FedAvg())
    strategy = Ditto(ditto_lambda=0.1)
    strategy.attach(ditto_site(tiny_site_dir, tmp_path))
    global_update, _ = local_round(tiny_site_dir, strategy)
    assert_same(plain, global_update)  # Ditto changes nothing of what the site sends

    start = start_model().state_dict()
    after_one = ditto_round(strategy, start)
    fresh = Ditto(ditto_lambda=0.1)
    fresh.attach(ditto_site(tiny_site_dir, tmp_path / "fresh"))
    assert_same(after_one, ditto_round(fresh, start))  # round 0 starts from the global model

    # round 1 (told to stop at once) starts from round 0's personalized model, read back from its file
    model = start_model()
    strategy.start_round(model, make_optimizer(model, 1e-2))
    with pytest.raises(RoundAborted):
        strategy.finish_round(should_abort=lambda: True)
    assert strategy.helper.epoch_of_start_time == 1
    assert_same(after_one, {k: v for k, v in strategy.helper.model.state_dict().items() if k in after_one})
