"""A bad hospital never takes the federation down (real NVFlare simulator, tiny preset and data).

Three good sites train beside three bad ones: one whose update is NaN every round (the update
filter rejects it), one whose train task raises in round 2, and one whose update is multiplied by
10^6 (finite, so only the norm screening catches it). A second run sends the x10^6 site with
screening off and the coordinate-wise median aggregator. Every run must finish every round with a
finite global model that scores on the good sites' validation images no worse (by 2 points) than
the pre-trained start; one absurd update averaged in scores 50% (chance).
"""

import json
from pathlib import Path

import pytest
import torch
from tiny import simulate, tiny_job, write_tiny_site

from fedxvit.checkpoint import save_checkpoint
from fedxvit.classes import TASK_CLASSES
from fedxvit.data import make_loader
from fedxvit.model import build_model
from fedxvit.training import apply_freeze_policy, evaluate, make_optimizer, seed_everything, train_epoch

pytestmark = pytest.mark.slow
GOOD = ("site1", "site2", "site3")
FAULTS = {"site4": "nan", "site5": "raise_in_round_2", "site6": "scale:1e6"}
ROUNDS = 3


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    """The sites' data (good and bad) and one initial model shared by all runs: like the real expert,
    trained beforehand on public images, so the sites fine-tune a model that already works (a random
    tiny model's BatchNorm statistics need more steps than three tiny rounds give)."""
    root = tmp_path_factory.mktemp("faults")
    for i, site in enumerate([*GOOD, *FAULTS]):
        write_tiny_site(root / "data" / site, train_per_class=4, val_per_class=10, seed=i)
    write_tiny_site(root / "public", train_per_class=16, seed=99)
    seed_everything(0)
    model = build_model("tiny", len(TASK_CLASSES))
    apply_freeze_policy(model, "full")
    optimizer = make_optimizer(model, 3e-3)
    loader = make_loader(root / "public", "training", 32, 8, train=True, seed=0)
    for _ in range(12):
        train_epoch(model, loader, optimizer, torch.device("cpu"))
    save_checkpoint(root / "initial_global.pt", model, meta={"class_names": list(TASK_CLASSES)})
    return root


def simulate_faulty(root: Path, name: str, sites, faults: dict, **server_changes) -> Path:
    """Run the real job (its executor swapped for FaultyExecutor) in the simulator; the server's run folder."""
    job = tiny_job(root / name, num_rounds=ROUNDS, **server_changes)
    server_config = job / "app" / "config" / "config_fed_server.json"  # MLflow is not under test here:
    config = json.loads(server_config.read_text())  # one process and store less per run
    config["components"] = [c for c in config["components"] if c["id"] != "mlflow_receiver"]
    server_config.write_text(json.dumps(config))
    client_config = job / "app" / "config" / "config_fed_client.json"
    config = json.loads(client_config.read_text())
    executor = config["executors"][0]["executor"]
    executor["path"] = "faulty_executor.FaultyExecutor"
    executor["args"]["faults"] = faults
    client_config.write_text(json.dumps(config))
    run_dir, log = simulate(job, root / name / "workspace", root / "data", root / "initial_global.pt", sites)
    for r in range(ROUNDS):
        assert f"Round {r} finished." in log, log[-4000:]
    return run_dir


def final_global_model(run_dir: Path) -> dict:
    state = torch.load(run_dir / "app_server" / "FL_global_model.pt", weights_only=True)["model"]
    assert all(torch.isfinite(torch.as_tensor(v)).all() for v in state.values()), f"{run_dir}: global model not finite"
    return state


def good_sites_accuracy(root: Path, state: dict) -> float:
    """Accuracy of a model state on the good sites' validation images, pooled."""
    model = build_model("tiny", len(TASK_CLASSES))
    model.load_state_dict({k: torch.as_tensor(v) for k, v in state.items()})
    loader = make_loader([root / "data" / s for s in GOOD], "validation", 32, 8, train=False)
    return evaluate(model, loader, torch.device("cpu"))["accuracy"]


@pytest.fixture(scope="module")
def reference(federation):
    """The start's accuracy on the good sites: what a federation that is not harmed keeps (or improves)."""
    start = torch.load(federation / "initial_global.pt", weights_only=True)
    accuracy = good_sites_accuracy(federation, start)
    assert accuracy > 0.8, "the pre-trained start must be good, or an untouched model would prove nothing"
    return accuracy


def rounds_of(run_dir: Path) -> list:
    return json.loads((run_dir / "global_val.json").read_text())["rounds"]


def test_nan_crashing_and_absurd_sites_are_dropped_and_every_round_finishes(federation, reference):
    run_dir = simulate_faulty(
        federation, "faulty", [*GOOD, *FAULTS], FAULTS, min_clients=3, wait_time_after_min_received=60
    )
    accuracy = good_sites_accuracy(federation, final_global_model(run_dir))
    assert accuracy >= reference - 0.02, (accuracy, reference)

    rows = rounds_of(run_dir)
    assert [r["round"] for r in rows] == list(range(ROUNDS))
    for row in rows:
        dropped = row["dropped_sites"]
        assert dropped["site4"].startswith("rejected by the update filter") and "NaN" in dropped["site4"]
        assert "median of the other sites'" in dropped["site6"], dropped
        assert set(row["sites"]) == set(row["aggregated_sites"]) and "site6" not in row["aggregated_sites"]
    assert "site5" in rows[0]["aggregated_sites"] and "site5" in rows[1]["aggregated_sites"]
    assert (
        rows[2]["dropped_sites"]["site5"] == "the site returned EXECUTION_RESULT_ERROR"
    )  # NVFlare's code for a RuntimeError
    assert sorted(rows[2]["aggregated_sites"]) == list(GOOD)
    log = (
        run_dir.parent / "log.txt"
    ).read_text()  # the server log: one line per round names who was aggregated and who was dropped
    assert "dropped site5: the site returned EXECUTION_RESULT_ERROR" in log
    assert "dropped the update of site6: update norm" in log


def test_median_aggregation_outvotes_an_absurd_site_without_screening(federation, reference):
    sites = [*GOOD, "site6"]
    run_dir = simulate_faulty(federation, "median", sites, {"site6": FAULTS["site6"]}, aggregation="median", norm_k=0)
    rows = rounds_of(run_dir)
    assert all(sorted(r["aggregated_sites"]) == sorted(sites) for r in rows), "screening was off: site6 was aggregated"
    accuracy = good_sites_accuracy(federation, final_global_model(run_dir))
    assert accuracy >= reference - 0.02, (accuracy, reference)


def test_a_simulator_run_over_its_time_limit_leaves_no_process_behind(tmp_path):
    """A run that hangs is stopped whole: the simulator and its client workers, not just the simulator."""
    import time

    import psutil
    from tiny import tiny_sites_and_initial_model

    from fedxvit.errors import FedXViTError
    from fedxvit.simulation import SIMULATOR_LOG, run_simulator

    initial = tiny_sites_and_initial_model(tmp_path)
    workspace = tmp_path / "workspace"
    with pytest.raises(FedXViTError, match="did not finish within 8 s"):
        run_simulator(tiny_job(tmp_path), workspace, tmp_path / "data", ["site1", "site2"], initial, timeout_s=8)
    time.sleep(1)
    left = [
        p.info["pid"]
        for p in psutil.process_iter(["pid", "cmdline"])
        if any(str(workspace) in part for part in (p.info["cmdline"] or []))
    ]
    assert left == [] and (workspace / SIMULATOR_LOG).is_file()
