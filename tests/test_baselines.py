"""Centralized and local-only baselines: same start, same freeze policy, settings from the job config."""

import pytest
import torch

from fedxvit.baselines import job_training_settings, train_on_sites
from fedxvit.checkpoint import load_checkpoint
from fedxvit.errors import FedXViTError
from result_helpers import write_job_config, write_tiny_run


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return write_tiny_run(tmp_path_factory.mktemp("baselines"))


def test_settings_come_from_the_job_config(tmp_path):
    settings = job_training_settings(write_job_config(tmp_path, num_rounds=3, local_epochs=2))
    assert settings["epochs"] == 6 and settings["preset"] == "tiny"
    assert settings["freeze_policy"] == "last-k" and settings["batch_size"] > 0
    with pytest.raises(FedXViTError, match="config_fed_server.json"):
        job_training_settings(tmp_path / "nowhere")


def test_pooled_and_local_training_start_from_the_initial_model_under_the_freeze_policy(tiny_run):
    dirs = [tiny_run["data"] / s for s in tiny_run["sites"]]
    initial, _ = load_checkpoint(tiny_run["initial"])
    kwargs = dict(preset="tiny", epochs=2, batch_size=4, freeze_policy="last-k", last_k=1, seed=0)
    pooled = train_on_sites(dirs, tiny_run["initial"], **kwargs)
    local = train_on_sites(dirs[:1], tiny_run["initial"], **kwargs)
    assert pooled["train_images"] == 16 and local["train_images"] == 8
    assert len(pooled["history"]) == 2 and pooled["history"][0]["images"] == 16 and pooled["wall_s"] > 0
    state = pooled["model"].state_dict()
    assert torch.equal(state["backbone.conv_stem.weight"], initial["backbone.conv_stem.weight"]), "frozen CNN must not move"
    assert not torch.equal(state["head.weight"], initial["head.weight"]), "the head trains"
    again = train_on_sites(dirs, tiny_run["initial"], **kwargs)
    assert torch.equal(again["model"].state_dict()["head.weight"], state["head.weight"]), "same seed, same model"


def test_bad_inputs_fail_with_one_line(tiny_run, tmp_path):
    with pytest.raises(FedXViTError, match="at least one"):
        train_on_sites([], tiny_run["initial"], preset="tiny")
    with pytest.raises(FedXViTError, match="does not exist"):
        train_on_sites([tiny_run["data"] / "site1"], tmp_path / "missing.pt", preset="tiny")
