"""Centralized and local-only baselines: same start, same freeze policy, the run's settings; their own
step that writes checkpoints and baselines.json, reused until something they depend on changes."""

import dataclasses
import json

import pytest
import torch

from fedxvit.checkpoint import load_checkpoint
from fedxvit.errors import FedXViTError
from fedxvit.model import build_model
from fedxvit.training import apply_freeze_policy
from tooling import baselines
from tooling.baselines import read_baselines, train_baselines, train_on_sites
from tooling.jobconfig import read_job_settings


@pytest.fixture
def settings(tiny_run):
    """The tiny run's own settings (tiny preset, 2 rounds x 1 local epoch, batch 4, last-k 1)."""
    return read_job_settings(tiny_run["run_dir"])


def test_pooled_and_local_training_start_from_the_initial_model_under_the_freeze_policy(tiny_run, settings):
    dirs = [tiny_run["data"] / s for s in tiny_run["sites"]]
    initial, _ = load_checkpoint(tiny_run["initial"])
    pooled = train_on_sites(dirs, tiny_run["initial"], settings)
    local = train_on_sites(dirs[:1], tiny_run["initial"], settings)
    for run, images in ((pooled, 16), (local, 8)):  # 4 + 4 training images per site, 2 rounds x 1 epoch
        assert run["train_images"] == images
        assert [(h["images"], h["steps"], h["aborted"]) for h in run["history"]] == [(images, images // 4, False)] * 2
    state = pooled["model"].state_dict()
    trainable = apply_freeze_policy(build_model("tiny", 2), "last-k", 1)
    assert [name for name in trainable if torch.equal(state[name], initial[name])] == [], (
        "every trainable tensor trains"
    )
    frozen = set(state) - set(trainable)
    assert all(torch.equal(state[name], initial[name]) for name in frozen), "frozen tensors must not move"
    assert not torch.equal(local["model"].state_dict()["head.weight"], state["head.weight"]), "other data, other model"
    again = train_on_sites(dirs, tiny_run["initial"], settings)
    assert torch.equal(again["model"].state_dict()["head.weight"], state["head.weight"]), "same seed, same model"
    three_rounds = train_on_sites(dirs[:1], tiny_run["initial"], dataclasses.replace(settings, num_rounds=3))
    assert len(three_rounds["history"]) == 3, "epochs = rounds x local epochs"


def test_the_baselines_step_writes_checkpoints_and_a_record_then_reuses_them(tiny_run, settings, tmp_path, capsys):
    site_dirs = {s: tiny_run["data"] / s for s in tiny_run["sites"]}
    out = tmp_path / "baselines"
    record = train_baselines(settings, site_dirs, tiny_run["initial"], out, progress=False)
    assert record == read_baselines(out)
    assert [(m["model"], m["checkpoint"], m["train_images"], m["epochs"]) for m in record["models"]] == [
        ("centralized (all sites pooled)", "centralized.pt", 16, 2),
        ("local-only site1", "local-site1.pt", 8, 2),
        ("local-only site2", "local-site2.pt", 8, 2),
    ]
    trained = train_on_sites([site_dirs["site1"]], tiny_run["initial"], settings)["model"].state_dict()
    saved, meta = load_checkpoint(out / "local-site1.pt", "tiny", 2)
    assert torch.equal(saved["head.weight"], trained["head.weight"]) and meta["sites"] == ["site1"]
    assert record["fingerprint"]["settings"] == settings.as_dict()

    before = (out / "centralized.pt").stat().st_mtime_ns
    assert train_baselines(settings, site_dirs, tiny_run["initial"], out, progress=False) == record
    assert "reusing the baselines" in capsys.readouterr().out
    assert (out / "centralized.pt").stat().st_mtime_ns == before, "nothing retrained"
    other = train_baselines(
        dataclasses.replace(settings, learning_rate=1e-2), site_dirs, tiny_run["initial"], out, progress=False
    )
    assert other["fingerprint"]["settings"]["learning_rate"] == 1e-2, "new settings, new baselines"
    assert (out / "centralized.pt").stat().st_mtime_ns != before


def test_the_cli_matches_the_run_and_bad_inputs_fail_with_one_line(tiny_run, settings, tmp_path, monkeypatch):
    monkeypatch.setenv("FEDXVIT_DATA_ROOT", str(tiny_run["data"]))
    out = tmp_path / "b"
    record = baselines.main(
        ["--run-dir", str(tiny_run["run_dir"]), "--initial", str(tiny_run["initial"]), "--out", str(out)]
    )
    assert record["sites"] == ["site1", "site2"] and json.loads((out / "baselines.json").read_text()) == record
    with pytest.raises(FedXViTError, match=r"run folder .*nowhere does not exist: run `make simulate` first"):
        baselines.main(["--run-dir", str(tmp_path / "nowhere"), "--out", str(out)])
    with pytest.raises(FedXViTError, match=r"no baselines at .*baselines.json: run `make baselines`"):
        read_baselines(tmp_path / "none")
    with pytest.raises(FedXViTError, match="at least one"):
        train_on_sites([], tiny_run["initial"], settings)
    with pytest.raises(FedXViTError, match="does not exist"):
        train_on_sites([tiny_run["data"] / "site1"], tmp_path / "missing.pt", settings)
