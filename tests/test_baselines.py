"""Centralized and local-only baselines: same start, same freeze policy, settings from the job config."""

import pytest
import torch

from fedxvit.baselines import job_training_settings, train_on_sites
from fedxvit.checkpoint import load_checkpoint
from fedxvit.errors import FedXViTError
from fedxvit.model import build_model
from fedxvit.training import apply_freeze_policy
from tiny import write_tiny_config


def test_settings_come_from_the_job_config(tmp_path):
    settings = job_training_settings(write_tiny_config(tmp_path, {"num_rounds": 3}, {"local_epochs": 2}))
    assert settings == {"preset": "tiny", "epochs": 6, "lr": 3e-4, "batch_size": 4, "freeze_policy": "last-k",
                        "last_k": 1, "seed": 0}
    with pytest.raises(FedXViTError, match="config_fed_server.json"):
        job_training_settings(tmp_path / "nowhere")


def test_pooled_and_local_training_start_from_the_initial_model_under_the_freeze_policy(tiny_run):
    dirs = [tiny_run["data"] / s for s in tiny_run["sites"]]
    initial, _ = load_checkpoint(tiny_run["initial"])
    kwargs = dict(preset="tiny", epochs=2, batch_size=4, freeze_policy="last-k", last_k=1, seed=0)
    pooled = train_on_sites(dirs, tiny_run["initial"], **kwargs)
    local = train_on_sites(dirs[:1], tiny_run["initial"], **kwargs)
    for run, images in ((pooled, 16), (local, 8)):  # 4 + 4 training images per site
        assert run["train_images"] == images
        assert [(h["images"], h["steps"], h["aborted"]) for h in run["history"]] == [(images, images // 4, False)] * 2
    state = pooled["model"].state_dict()
    trainable = apply_freeze_policy(build_model("tiny", 2), "last-k", 1)
    assert [name for name in trainable if torch.equal(state[name], initial[name])] == [], "every trainable tensor trains"
    frozen = set(state) - set(trainable)
    assert all(torch.equal(state[name], initial[name]) for name in frozen), "frozen tensors must not move"
    assert not torch.equal(local["model"].state_dict()["head.weight"], state["head.weight"]), "other data, other model"
    again = train_on_sites(dirs, tiny_run["initial"], **kwargs)
    assert torch.equal(again["model"].state_dict()["head.weight"], state["head.weight"]), "same seed, same model"


def test_bad_inputs_fail_with_one_line(tiny_run, tmp_path):
    with pytest.raises(FedXViTError, match="at least one"):
        train_on_sites([], tiny_run["initial"], preset="tiny")
    with pytest.raises(FedXViTError, match="does not exist"):
        train_on_sites([tiny_run["data"] / "site1"], tmp_path / "missing.pt", preset="tiny")
