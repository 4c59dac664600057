"""Long-tailed data (issue #14): Balanced Softmax, MAS weights, the self-supervised prior, the long-tailed
scenario and the FedMAS job in NVFlare's simulator."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny import REPO, tiny_job, write_tiny_site
from torch.nn import functional as F

from fedxvit.aggregation import ScreenedAssembler, screen_mas
from fedxvit.classes import EXPERT_CLASSES
from fedxvit.errors import FedXViTError
from fedxvit.imbalance import (
    balanced_softmax_loss,
    balanced_softmax_shift,
    class_counts,
    class_divergence,
    linear_cka,
    mas_factor,
    mas_weights,
)

# ---- Balanced Softmax


def test_balanced_softmax_is_cross_entropy_on_balanced_counts():
    torch.manual_seed(0)
    logits, labels = torch.randn(8, 4), torch.randint(0, 4, (8,))
    counts = torch.full((4,), 25.0)
    assert torch.allclose(balanced_softmax_loss(logits, labels, counts), F.cross_entropy(logits, labels))


def test_balanced_softmax_shifts_logits_by_log_counts_hand_computed():
    # one image of class 1, logits [0, 0]; counts [90, 10]: the loss is -log(10 / (90 + 10)) = -log 0.1
    logits, labels, counts = torch.zeros(1, 2), torch.tensor([1]), torch.tensor([90.0, 10.0])
    assert balanced_softmax_loss(logits, labels, counts).item() == pytest.approx(-math.log(0.1), rel=1e-6)
    # the frequent class pays: its image's loss is -log 0.9, far below cross-entropy's log 2
    assert balanced_softmax_loss(logits, torch.tensor([0]), counts).item() == pytest.approx(-math.log(0.9), rel=1e-6)
    # an absent class counts as one image, never -inf
    assert balanced_softmax_shift(torch.tensor([0.0, 4.0])).tolist() == pytest.approx([0.0, math.log(4.0)])


def test_class_counts_refuses_labels_beyond_the_model():
    assert class_counts([0, 0, 3], 4).tolist() == [2.0, 0.0, 0.0, 1.0]
    with pytest.raises(FedXViTError, match="4-class"):
        class_counts([0, 4], 4)


def test_train_epoch_with_balanced_softmax_changes_the_update(tmp_path):
    """The mechanism is active: same seed, data and model, but the tail class's prior shift moves the weights."""
    from fedxvit.data import make_loader
    from fedxvit.model import build_model
    from fedxvit.training import make_optimizer, train_epoch

    site = write_tiny_site(tmp_path / "site", train_per_class=[12, 6, 1, 1], class_names=EXPERT_CLASSES)
    states = {}
    for name, shift in (("ce", None), ("bsm", balanced_softmax_shift(torch.tensor([12.0, 6.0, 1.0, 1.0])))):
        torch.manual_seed(0)
        model = build_model("tiny", num_classes=4)
        loader = make_loader(site, "training", 32, 4, train=True, seed=0)
        train_epoch(model, loader, make_optimizer(model, 1e-2), torch.device("cpu"), logit_shift=shift)
        states[name] = model.state_dict()
    assert not torch.allclose(states["ce"]["head.bias"], states["bsm"]["head.bias"])


# ---- MAS


def test_linear_cka_sees_the_same_representation_through_rotation_and_scale():
    torch.manual_seed(0)
    x = torch.randn(50, 6)
    rotation, _ = torch.linalg.qr(torch.randn(6, 6))
    assert linear_cka(x, 3.0 * x @ rotation) == pytest.approx(1.0, abs=1e-9)
    assert linear_cka(x, torch.randn(50, 9)) < 0.5


def test_class_divergence_skips_classes_with_too_few_images():
    torch.manual_seed(0)
    features = torch.randn(12, 5)
    labels = [0] * 10 + [1] * 2
    divergence = class_divergence(features, features, labels, 3)
    assert divergence[0] == pytest.approx(0.0, abs=1e-9)
    assert divergence[1] is None and divergence[2] is None


def test_mas_weights_differ_from_sample_counts_and_sum_to_one():
    # site A: many images, divergence spread evenly over 4 classes; site B: few images, divergence in one class
    even, peaked = [0.2, 0.2, 0.2, 0.2], [0.7, 0.1, 0.1, 0.1]
    factors = {"A": mas_factor(even, even), "B": mas_factor(peaked, peaked)}
    assert factors["A"] == pytest.approx(0.25)
    assert factors["B"] == pytest.approx(0.49 + 3 * 0.01)
    weights = mas_weights(factors)
    sample_weights = {"A": 900 / 1000, "B": 100 / 1000}
    assert sum(weights.values()) == pytest.approx(1.0)
    assert weights["B"] > weights["A"] and weights["B"] > sample_weights["B"]
    # classes measured on one side only are left out; nothing measured gives factor 0, then no weight
    assert mas_factor([0.5, None], [0.5, 0.3]) == pytest.approx(1.0)
    assert mas_weights({"A": 0.3, "B": 0.0}) == {"A": 1.0, "B": 0.0}
    assert mas_weights({"A": 0.0, "B": float("nan")}) == {"A": 0.5, "B": 0.5}


def test_screen_mas_drops_sites_without_a_factor_or_with_another_prior():
    kept, rejected = screen_mas(
        {"site1": 0.3, "site2": 0.4, "site3": 0.5, "site4": None},
        {"site1": "aaa", "site2": "aaa", "site3": "bbb", "site4": None},
    )
    assert kept == ["site1", "site2"]
    assert "another MAS prior" in rejected["site3"] and "no MAS factor" in rejected["site4"]


def test_mas_weighting_needs_a_mean():
    with pytest.raises(FedXViTError, match="weighting='mas'"):
        ScreenedAssembler(aggregation="median", weighting="mas")
    with pytest.raises(FedXViTError, match="weighting='size'"):
        ScreenedAssembler(weighting="size")


# ---- the self-supervised prior


def test_contrastive_loss_rewards_matching_views():
    from tooling.pretrain_prior import contrastive_loss

    torch.manual_seed(0)
    z = torch.randn(16, 8)
    assert contrastive_loss(z, z + 0.01 * torch.randn(16, 8)) < contrastive_loss(z, torch.randn(16, 8))


@pytest.fixture(scope="module")
def tiny_prior(tmp_path_factory):
    """A prior pretrained for one epoch on a tiny 4-class folder (labels unused), through the CLI."""
    from tooling.pretrain_prior import main

    tmp = tmp_path_factory.mktemp("prior")
    public = write_tiny_site(tmp / "public", train_per_class=4, class_names=EXPERT_CLASSES)
    out = tmp / "ssl_prior.pt"
    meta = main(["--data", str(public), "--out", str(out), "--epochs", "1", "--batch-size", "8"])
    return out, meta


def test_prior_is_frozen_cached_and_named_by_its_hash(tiny_prior, capsys):
    from fedxvit.datalist import file_hash
    from fedxvit.ssl_prior import load_prior
    from tooling.pretrain_prior import main

    path, meta = tiny_prior
    encoder, sha = load_prior(path)
    assert sha == meta["sha256"] == file_hash(path)
    assert not encoder.training and not any(p.requires_grad for p in encoder.parameters())
    images = torch.rand(3, 1, 32, 32)
    assert torch.equal(encoder(images), encoder(images))  # eval: BatchNorm statistics fixed
    again = main(["--data", meta["data"], "--out", str(path), "--epochs", "1", "--batch-size", "8"])
    assert "reusing" in capsys.readouterr().out and again["sha256"] == sha
    with pytest.raises(FedXViTError, match="make ssl-prior"):
        load_prior(path.parent / "missing.pt")


# ---- the long-tailed scenario


def _args(*argv):
    from data_preparation.benchmark import parse_args, validate

    args = parse_args(["--scenario", "longtail", *argv])
    validate(args)
    return args


def test_longtail_partitions_are_long_tailed_and_deterministic():
    from data_preparation.benchmark import generation_params, product_jobs, site_class_counts

    homo, dirichlet = _args(), _args("--partition", "dirichlet")
    assert homo.out == "data/longtail/homo" and dirichlet.out == "data/longtail/dirichlet-0.5"
    for args in (homo, dirichlet):
        counts = site_class_counts(args)
        totals = {name: sum(site[name] for site in counts) for name in EXPERT_CLASSES}
        assert len(counts) >= 5
        assert max(totals.values()) / min(totals.values()) >= 20
        assert site_class_counts(args) == counts and generation_params(args) == generation_params(args)
    mixes = [np.array([site[c] for c in EXPERT_CLASSES]) / sum(site.values()) for site in site_class_counts(homo)]
    assert all(np.abs(mix - mixes[0]).max() < 0.01 for mix in mixes)  # homo: the same mix everywhere
    skewed = [np.array([site[c] for c in EXPERT_CLASSES]) / sum(site.values()) for site in site_class_counts(dirichlet)]
    assert max(np.abs(mix - skewed[0]).max() for mix in skewed) > 0.2
    assert site_class_counts(_args("--partition", "dirichlet", "--alpha", "5")) != site_class_counts(dirichlet)
    jobs = product_jobs(homo, homo.out and REPO / "unused")
    assert {job["label"] for job in jobs} == {0, 1, 2, 3}
    assert [(j["label"], j["expert_class"]) for j in jobs] == [
        (j["label"], j["expert_class"]) for j in product_jobs(homo, REPO / "unused")
    ]


def test_longtail_options_are_checked():
    from data_preparation.benchmark import main

    with pytest.raises(FedXViTError, match="--partition and --alpha apply to --scenario longtail"):
        main(["--partition", "dirichlet"])
    with pytest.raises(FedXViTError, match="--alpha applies to --partition dirichlet"):
        main(["--scenario", "longtail", "--alpha", "0.1"])
    few = ["--scenario", "longtail", "--site-sizes", "100,100", "--out", "/nonexistent/never"]
    with pytest.raises(FedXViTError, match="site1 gets pituitary"):  # validation and testing as fractions
        main([*few, "--val-per-class", "0", "--test-per-class", "0"])
    with pytest.raises(FedXViTError, match="--val-per-class 3 and --test-per-class 0: both at least 1"):
        main([*few, "--val-per-class", "3", "--test-per-class", "0"])
    assert _args("--site-sizes", "100,100").test_per_class == 50  # cohorts: 2 pituitary images train, fine


# ---- the FedMAS job in NVFlare's simulator


@pytest.mark.slow
def test_fedmas_job_weighs_sites_by_mas_factors_and_its_expert_transfers(tmp_path, tiny_prior, monkeypatch):
    from fedxvit.checkpoint import load_global_model, read_meta
    from fedxvit.datalist import file_hash
    from result_stat.compare import main as compare_main
    from result_stat.plot_tensorboard_events import read_scalars
    from tooling.expert import main as expert_cli
    from tooling.simulation import GLOBAL_MODEL, SIMULATOR_LOG
    from tooling.transfer import main as transfer

    prior, meta = tiny_prior
    mixes = ([12, 6, 3, 3], [6, 12, 3, 3], [12, 3, 6, 3])  # long-tailed, and each hospital's tail differs
    for k, mix in enumerate(mixes, start=1):
        write_tiny_site(tmp_path / "data" / f"site{k}", train_per_class=mix, class_names=EXPERT_CLASSES, seed=k)
    initial = tmp_path / "untrained_expert.pt"  # a federated Phase 1 from scratch
    expert_cli(["--untrained", str(initial), "--preset", "tiny"])
    job = tiny_job(tmp_path, REPO / "jobs" / "fedxvit_fedmas")
    client = job / "app" / "config" / "config_fed_client.json"
    config = json.loads(client.read_text())
    assert (config["loss"], config["num_classes"]) == ("bsm", 4)
    config["mas_prior"] = str(prior)
    monkeypatch.setenv("FEDXVIT_ALLOWED_ROOTS", str(prior.parent))  # outside the checkout: the sites allow it
    client.write_text(json.dumps(config))

    # through `make compare`'s own path: the 4-class job copies, the 4-class baselines, recall per class
    report = compare_main(
        ["--scenario-data", str(tmp_path / "data"), "--initial", str(initial), "--methods", f"fedavg={job}"]
        + ["--seeds", "0", "--quick", "--out", str(tmp_path / "results"), "--workspace", str(tmp_path / "ws")]
    )
    assert not report["failures"] and report["settings"]["class_names"] == list(EXPERT_CLASSES)
    for name in ("start", "fedavg", "centralized", "local-only"):
        assert len(report["methods"][name]["pooled_recall"]) == 4
    run = next(Path(r["folder"]) for r in report["runs"] if r["method"] == "fedavg")
    run_dir, log = run / "simulator" / "server" / "simulate_job", (run / "simulator" / SIMULATOR_LOG).read_text()

    rounds = re.findall(r"round (\d+): mas weights (.+)", log)
    assert [r for r, _ in rounds] == ["0", "1"]
    for _, text in rounds:
        weights = {site: float(w) for site, w in re.findall(r"(site\d) ([\d.]+)", text)}
        assert sorted(weights) == ["site1", "site2", "site3"] and sum(weights.values()) == pytest.approx(1, abs=2e-3)
        assert max(weights.values()) - min(weights.values()) > 1e-3  # not the uniform split
    assert len(re.findall(r"MAS factor", log)) == 6 and "dropped the update" not in log
    # every site measured with the same frozen prior, and training never touched it
    assert sorted(re.findall(r"fedxvit (site\d): .*MAS prior ([0-9a-f]{12})", log)) == [
        (f"site{k}", meta["sha256"][:12]) for k in (1, 2, 3)
    ]
    assert file_hash(prior) == meta["sha256"]
    table = json.loads((run_dir / "global_val.json").read_text())["rounds"]
    assert sum(table[-1]["aggregation_weights"].values()) == pytest.approx(1)
    tracked = read_scalars(run_dir / "tb_events")  # the per-round weights reach TensorBoard (and MLflow alike)
    assert any(tag.endswith("aggregation_weight.site3") for tags in tracked.values() for tag in tags)

    # the federated expert is a 4-class model, and the 4 -> 2 transfer starts from it as from the central one
    expert = load_global_model(run_dir / GLOBAL_MODEL, "tiny", num_classes=4)
    assert expert.num_classes == 4
    out = tmp_path / "initial_global.pt"
    transfer(["--expert", str(run_dir / GLOBAL_MODEL), "--preset", "tiny", "--out", str(out)])
    assert read_meta(out)["num_classes"] == 2 and read_meta(out)["transplanted_from"]["federated"]


def test_a_site_of_other_classes_or_an_unknown_loss_is_a_one_line_error(tmp_path):
    from fedxvit.executor import FedXViTExecutor
    from fedxvit.sites import site_data_dir

    with pytest.raises(FedXViTError, match="loss='focal' is unknown"):
        FedXViTExecutor(preset="tiny", loss="focal")
    write_tiny_site(tmp_path / "site1")  # Healthy/Tumor
    with pytest.raises(
        FedXViTError, match=r"site site1: .* has classes \['Healthy', 'Tumor'\], but the federated task"
    ):
        site_data_dir("site1", environ={"FEDXVIT_DATA_ROOT": str(tmp_path)}, class_names=EXPERT_CLASSES)
