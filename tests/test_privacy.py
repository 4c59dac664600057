"""DP-SGD at a site (fedxvit.privacy, Opacus): the accountant's epsilon grows with every round and
the site stops sending at the budget; per-image clipping and noise really change the update;
frozen BatchNorm stays frozen; options that cannot work say so in one line."""

import math

import numpy as np
import pytest
import torch
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.signal import Signal
from nvflare.app_common.app_constant import AppConstants

from fedxvit.classes import TASK_CLASSES
from fedxvit.data import make_loader
from fedxvit.errors import FedXViTError
from fedxvit.executor import FedXViTExecutor, to_numpy_state
from fedxvit.model import build_model
from fedxvit.privacy import SitePrivacy
from fedxvit.protocol import REJECT_REASON_HEADER
from fedxvit.sites import site_env_var
from fedxvit.training import apply_freeze_policy, make_optimizer, train_epoch
from tooling.standalone import make_fl_ctx

CPU = torch.device("cpu")


def start_model(policy="last-k"):
    torch.manual_seed(0)
    model = build_model("tiny", len(TASK_CLASSES))
    return model, apply_freeze_policy(model, policy, 1)


def loader(site_dir):
    return make_loader(site_dir, "training", 32, 2, train=True, seed=0)


def one_epoch(site_dir, privacy: SitePrivacy | None, lr=1e-2, policy="last-k") -> tuple[dict, dict]:
    """(update of the trainable tensors, every tensor before) after one epoch, with or without DP-SGD."""
    model, trainable = start_model(policy)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer, batches = make_optimizer(model, lr), loader(site_dir)
    if privacy is not None:
        privacy.start(model, batches, planned_epochs=1)
        optimizer, batches = privacy.private(optimizer), privacy.loader
    torch.manual_seed(1)
    train_epoch(model, batches, optimizer, CPU)
    after = model.state_dict()
    return {k: after[k] - before[k] for k in trainable}, {k: (before[k], after[k]) for k in before}


def norm(update: dict) -> float:
    return float(sum(v.double().pow(2).sum() for v in update.values()) ** 0.5)


def test_epsilon_grows_every_round_up_to_the_target_and_no_further(tiny_site_dir):
    privacy = SitePrivacy(target_epsilon=3.0, delta=1e-5)
    model, _ = start_model()
    privacy.start(model, loader(tiny_site_dir), planned_epochs=3)  # 3 rounds x 1 local epoch
    assert privacy.spent() == 0.0 and privacy.noise_multiplier > 0
    spent = []
    for _ in range(3):  # each round wraps a fresh optimizer, as the executor does
        assert privacy.budget_left_for(1)
        train_epoch(model, privacy.loader, privacy.private(make_optimizer(model, 1e-3)), CPU)
        spent.append(privacy.spent())
    assert 0 < spent[0] < spent[1] < spent[2] <= 3.0
    assert spent[2] > 2.9  # the noise is chosen so that the planned training spends the budget
    assert not privacy.budget_left_for(1) and privacy.would_spend(1) > 3.0  # a fourth round does not fit


def test_clipping_and_noise_change_the_update(tiny_site_dir):
    plain, _ = one_epoch(tiny_site_dir, None)
    noisy, _ = one_epoch(tiny_site_dir, SitePrivacy(target_epsilon=1.0, max_grad_norm=1.0))
    assert max(float((plain[k] - noisy[k]).abs().max()) for k in plain) > 1e-5
    # per-image clipping at a tiny norm (and an epsilon so large the noise is tiny too) shrinks the update
    clipped, _ = one_epoch(tiny_site_dir, SitePrivacy(target_epsilon=1e6, max_grad_norm=1e-6), lr=1e-6)
    plain_small_lr, _ = one_epoch(tiny_site_dir, None, lr=1e-6)
    assert norm(clipped) < 0.5 * norm(plain_small_lr), (norm(clipped), norm(plain_small_lr))


@pytest.mark.parametrize("policy", ["last-k", "full-but-batchnorm"])
def test_frozen_tensors_and_batchnorm_statistics_do_not_move_under_dp(tiny_site_dir, policy):
    """The whole model but BatchNorm trains under DP-SGD as the last block does: the CNN's convolutions too."""
    update, tensors = one_epoch(tiny_site_dir, SitePrivacy(target_epsilon=3.0), policy=policy)
    assert norm(update) > 0
    if policy == "full-but-batchnorm":
        assert any(k.startswith("backbone.") and float(update[k].abs().max()) > 0 for k in update)
    batchnorm = [k for k in tensors if "running_mean" in k or "running_var" in k]
    assert batchnorm, "the tiny model should hold BatchNorm layers"
    frozen = [k for k in tensors if k not in update]
    assert all(torch.equal(*tensors[k]) for k in frozen)


def test_bad_options_are_one_line_naming_them():
    with pytest.raises(FedXViTError, match="dp_epsilon=-1"):
        SitePrivacy(target_epsilon=-1)
    with pytest.raises(FedXViTError, match="dp_delta=2"):
        SitePrivacy(target_epsilon=3, delta=2)
    with pytest.raises(FedXViTError, match="fedprox"):
        FedXViTExecutor(preset="tiny", algorithm="fedprox", dp_epsilon=3)
    with pytest.raises(FedXViTError, match="algorithm='fedsm' do not combine"):
        FedXViTExecutor(preset="tiny", algorithm="fedsm", dp_epsilon=3)
    with pytest.raises(FedXViTError, match="freeze_policy='full' do not combine.*'full-but-batchnorm'"):
        FedXViTExecutor(preset="tiny", freeze_policy="full", dp_epsilon=3)
    FedXViTExecutor(preset="tiny", freeze_policy="full-but-batchnorm", dp_epsilon=3)  # what it can train


def train_task(model, round_number: int, num_rounds: int):
    shareable = DXO(DataKind.WEIGHTS, to_numpy_state(model.state_dict())).to_shareable()
    shareable.set_header(AppConstants.CURRENT_ROUND, round_number)
    shareable.set_header(AppConstants.NUM_ROUNDS, num_rounds)
    return shareable


def test_a_site_stops_sending_once_its_budget_is_spent(tmp_path, tiny_site_dir, monkeypatch):
    monkeypatch.setenv(site_env_var("site1"), str(tiny_site_dir))
    fl_ctx = make_fl_ctx(tmp_path / "site1")
    site = FedXViTExecutor(preset="tiny", batch_size=2, torch_threads=1, dp_epsilon=2.0)
    model, _ = start_model()
    spent = []
    for round_number in range(2):  # the job plans 2 rounds
        result = site.execute("train", train_task(model, round_number, 2), fl_ctx, Signal())
        assert result.get_return_code(ReturnCode.OK) == ReturnCode.OK
        spent.append(from_shareable(result).get_meta_prop("dp_epsilon"))
    assert 0 < spent[0] < spent[1] <= 2.0
    # a third round (say the server was configured for more) would overspend: the site sends nothing
    refused = site.execute("train", train_task(model, 2, 2), fl_ctx, Signal())
    assert refused.get_return_code() == ReturnCode.EXECUTION_EXCEPTION
    assert refused.get_header(REJECT_REASON_HEADER).startswith("privacy budget spent")
    assert np.isclose(site.privacy.spent(), spent[1])  # refusing spent nothing


def independent_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """Epsilon of `steps` Poisson-sampled Gaussian steps, straight from Opacus' RDP analysis (not the site's
    accountant object, nor its history)."""
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    orders = RDPAccountant.DEFAULT_ALPHAS
    rdp = compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=steps, orders=orders)
    return get_privacy_spent(orders=orders, rdp=rdp, delta=delta)[0]


def test_epsilon_counts_the_optimizer_steps_that_ran_an_aborted_round_too(tmp_path, tiny_site_dir, monkeypatch):
    monkeypatch.setenv(site_env_var("site1"), str(tiny_site_dir))
    fl_ctx = make_fl_ctx(tmp_path / "site1")
    site = FedXViTExecutor(preset="tiny", batch_size=2, torch_threads=1, dp_epsilon=2.0, dp_delta=1e-5)
    model, _ = start_model()
    result = site.execute("train", train_task(model, 0, 3), fl_ctx, Signal())
    steps = from_shareable(result).get_meta_prop(MetaKey.NUM_STEPS_CURRENT_ROUND)
    privacy = site.privacy
    assert steps == len(privacy.loader) == 3 and privacy.sample_rate == pytest.approx(1 / 3)  # 6 images, batches of 2
    assert from_shareable(result).get_meta_prop("dp_epsilon") == pytest.approx(
        independent_epsilon(privacy.noise_multiplier, privacy.sample_rate, 3, 1e-5), rel=1e-9
    )

    # the next round is stopped after its first optimizer step: that step was noised and is spent
    stop = Signal()
    trained = []

    def after_training_forward(module, args, output):
        if module.training:
            trained.append(1)
            stop.trigger("the server ended the round")

    hook = site.model.register_forward_hook(after_training_forward)
    aborted = site.execute("train", train_task(model, 1, 3), fl_ctx, stop)
    hook.remove()
    assert aborted.get_return_code() == ReturnCode.TASK_ABORTED and len(trained) == 1
    assert privacy.steps_taken() == 4
    assert privacy.spent() == pytest.approx(
        independent_epsilon(privacy.noise_multiplier, privacy.sample_rate, 4, 1e-5), rel=1e-9
    )
    assert privacy.spent() > independent_epsilon(privacy.noise_multiplier, privacy.sample_rate, 3, 1e-5)


def test_an_empty_poisson_batch_is_a_noised_step_but_leaves_the_loss_a_number(tiny_site_dir):
    privacy = SitePrivacy(target_epsilon=3.0)
    model, _ = start_model()
    batches = loader(tiny_site_dir)
    privacy.start(model, batches, planned_epochs=1)
    batch = next(iter(batches))
    empty = {"image": batch["image"][:0], "label": batch["label"][:0]}  # what DPDataLoader yields when it draws none
    metrics = train_epoch(model, [empty, batch], privacy.private(make_optimizer(model, 1e-3)), CPU)
    assert metrics["steps"] == privacy.steps_taken() == 2 and metrics["images"] == len(batch["label"])
    assert math.isfinite(metrics["loss"]) and metrics["loss"] > 0
