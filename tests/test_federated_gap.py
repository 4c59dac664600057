"""data_preparation.federated_gap: the job copy it runs, how it scores (validation only, balanced
accuracy), and its verdict. The simulator run itself is the calibration (docs/measurements.md)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_preparation import federated_gap
from fedxvit.classes import TASK_CLASSES
from fedxvit.datalist import write_site
from fedxvit.errors import run_cli
from fedxvit.model import build_model

REPO = Path(__file__).resolve().parents[1]
SERVER_CONFIG = Path("app") / "config" / "config_fed_server.json"
CLIENT_CONFIG = Path("app") / "config" / "config_fed_client.json"


def test_job_copy_changes_only_min_clients(tmp_path):
    source = REPO / "jobs" / "fedxvit"
    before = (source / SERVER_CONFIG).read_text()
    job = federated_gap.federated_job(source, tmp_path / "job", min_clients=6)
    original, copied = json.loads(before), json.loads((job / SERVER_CONFIG).read_text())
    assert copied.pop("min_clients") == 6 and original.pop("min_clients") != 6
    assert copied == original
    assert (job / CLIENT_CONFIG).read_bytes() == (source / CLIENT_CONFIG).read_bytes()
    assert (source / SERVER_CONFIG).read_text() == before


def test_a_budget_sets_the_rounds_epochs_and_freeze_policy_of_the_copy_and_of_the_baselines(tmp_path):
    from tooling.jobconfig import read_job_settings

    job = federated_gap.federated_job(
        REPO / "jobs" / "fedxvit",
        tmp_path / "job",
        min_clients=6,
        budget={"rounds": 3, "local_epochs": 4, "freeze_policy": "full"},
    )
    assert json.loads((job / SERVER_CONFIG).read_text())["num_rounds"] == 3
    assert json.loads((job / CLIENT_CONFIG).read_text())["local_epochs"] == 4
    settings = read_job_settings(job)
    assert settings.equivalent_epochs == 12 and settings.freeze_policy == "full"
    old = federated_gap.federated_job(  # a budget file from before the policy was recorded: the job's own
        REPO / "jobs" / "fedxvit", tmp_path / "old", min_clients=6, budget={"rounds": 3, "local_epochs": 4}
    )
    assert read_job_settings(old).freeze_policy == "last-k"


def write_split_site(root: Path, counts: dict) -> Path:
    """Noise images; counts = {split: (healthy, tumor)}."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    entries = {}
    for split, per_label in counts.items():
        entries[split] = []
        for label, count in enumerate(per_label):
            for i in range(count):
                rel = f"images/{split}_{label}_{i}.png"
                Image.fromarray((rng.random((32, 32)) * 255).astype(np.uint8)).save(root / rel)
                entries[split].append({"image": rel, "label": label})
    write_site(root, entries, TASK_CLASSES, {"generator": "tests"})
    return root


def test_score_reads_only_validation_and_balances_the_classes(tmp_path):
    site = write_split_site(tmp_path / "siteA", {"training": (2, 2), "validation": (1, 3), "testing": (5, 5)})
    model = build_model("tiny", num_classes=len(TASK_CLASSES)).eval()
    with torch.no_grad():  # a model that calls everything Tumor
        model.head.weight.zero_()
        model.head.bias.copy_(torch.tensor([0.0, 5.0]))
    loaders = federated_gap.validation_loaders({"siteA": site}, model.preset.image_size)
    result = federated_gap.score(model, loaders, torch.device("cpu"))
    assert result["n"] == 4 and result["sites"]["siteA"]["n"] == 4  # the 10 test images are never read
    assert result["accuracy"] == 0.75 and result["balanced_accuracy"] == 0.5


def test_verdict_needs_the_gap_and_every_hospital_below_centralized():
    def report(fedavg, *local):
        models = {"centralized": {"balanced_accuracy": 0.90}, "fedavg_final": {"balanced_accuracy": fedavg}}
        models.update({f"local-only site{k}": {"balanced_accuracy": v} for k, v in enumerate(local, start=1)})
        return {"models": models}

    hard = federated_gap.verdict(report(0.80, 0.70, 0.89))
    assert hard == {"fedavg_gap": 0.1, "fedavg_gap_met": True, "every_local_below_centralized": True}
    assert not federated_gap.verdict(report(0.85, 0.70))["fedavg_gap_met"]  # 5 points: below the 8 asked
    assert not federated_gap.verdict(report(0.80, 0.70, 0.90))["every_local_below_centralized"]


@pytest.mark.parametrize("bad", [["--data", "no/such/folder"], ["--timeout", "0"], ["--initial", "no/such.pt"]])
def test_bad_option_is_one_line_error(bad, tmp_path, capsys):
    (tmp_path / "data").mkdir()
    args = ["--data", str(tmp_path / "data"), "--initial", str(REPO / "pyproject.toml"), *bad]
    with pytest.raises(SystemExit) as stopped:  # the module's entry point, as `python -m` runs it
        run_cli(lambda: federated_gap.main(args))
    stderr = capsys.readouterr().err
    assert stopped.value.code == 2 and stderr.startswith("error:") and len(stderr.strip().splitlines()) == 1
    assert bad[0] in stderr and not (tmp_path / "data" / federated_gap.GAP_FILE).exists()
