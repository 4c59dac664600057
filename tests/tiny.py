"""Tiny sites, jobs and finished runs on disk, shared by the tests (plain helpers; the fixtures
built on them are in conftest.py). Everything uses the `tiny` preset at 32 px, so a site is a
few dozen PNGs and a training step takes milliseconds."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fedxvit.checkpoint import save_checkpoint
from fedxvit.classes import TASK_CLASSES
from fedxvit.datalist import write_site
from fedxvit.errors import FedXViTError
from fedxvit.model import build_model
from tooling.jobconfig import CLIENT_FILE, SERVER_FILE
from tooling.poc import free_port  # noqa: F401 - the tests take it from here
from tooling.simulation import SIMULATOR_LOG, run_simulator

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
JOB = REPO / "jobs" / "fedxvit"
SITES = ("site1", "site2", "site3")
SQUARE = 10  # side of the bright "tumor" square, px
# Registering a model (torch.export, twice) costs ~15 s a run on 2 cores: only the runs that test it register
TINY_SERVER = {"num_rounds": 2, "preset": "tiny", "registered_model_name": ""}
TINY_CLIENT = {"preset": "tiny", "batch_size": 4, "torch_threads": 1}
# what the tests' jobs may build besides NVFlare's classes: fedxvit's and the test components in this folder
TEST_CLASSES = ("fedxvit.", "faulty_executor.", "sent_recorder.")


def write_tiny_site(
    root: Path,
    train_per_class: int = 3,
    val_per_class: int = 2,
    test_per_class: int = 1,
    size: int = 32,
    seed: int = 0,
    masks: bool = False,
    class_names=TASK_CLASSES,
) -> Path:
    """A 2-class site of noise images in which a Tumor image holds a bright square: at a fixed place,
    or with `masks` at a random place with its mask (for the heatmap scores). Returns root.
    With more `class_names`, label k > 0 puts its square at its own place; `train_per_class` may then be
    a list (images of each class in training)."""
    rng = np.random.default_rng(seed)
    for folder in ("images", "masks") if masks else ("images",):
        (root / folder).mkdir(parents=True, exist_ok=True)
    entries = {}
    for split, count in (("training", train_per_class), ("validation", val_per_class), ("testing", test_per_class)):
        entries[split] = []
        for label in range(len(class_names)):
            for i in range(count[label] if isinstance(count, (list, tuple)) else count):
                pixels = (rng.random((size, size)) * 60).astype(np.uint8)
                entry = {"image": f"images/{split}_{label}_{i}.png", "label": label}
                if label:
                    r, c = rng.integers(0, size - SQUARE, 2) if masks else (4, 4 + 6 * (label - 1))
                    pixels[r : r + SQUARE, c : c + SQUARE] = 230
                    if masks:
                        mask = np.zeros((size, size), np.uint8)
                        mask[r : r + SQUARE, c : c + SQUARE] = 255
                        entry["mask"] = f"masks/{split}_{label}_{i}.png"
                        Image.fromarray(mask).save(root / entry["mask"])
                Image.fromarray(pixels).save(root / entry["image"])
                entries[split].append(entry)
    write_site(root, entries, class_names, {"generator": "tests", "seed": seed})
    return root


def write_tiny_config(
    config_dir: Path, server_changes: dict | None = None, client_changes: dict | None = None, job_dir: Path = JOB
) -> Path:
    """A repository job's two config files (default jobs/fedxvit) with the tiny preset, 2 rounds, batch 4 and
    one thread, plus the changes, edited the way a user would: the variables at the top of each file."""
    config_dir.mkdir(parents=True, exist_ok=True)
    for name, changes in (
        ("config_fed_server.json", {**TINY_SERVER, **(server_changes or {})}),
        ("config_fed_client.json", {**TINY_CLIENT, **(client_changes or {})}),
    ):
        config = json.loads((job_dir / "app" / "config" / name).read_text())
        assert set(changes) <= set(config), f"{name} lost a job argument"
        config.update(changes)
        (config_dir / name).write_text(json.dumps(config, indent=2))
    return config_dir


def tiny_job(tmp: Path, job_dir: Path = JOB, **server_changes) -> Path:
    """A copy of a repository job (default jobs/fedxvit) in tmp/job with the tiny settings (write_tiny_config)
    and server_changes."""
    job = tmp / "job"
    shutil.copytree(job_dir, job)
    write_tiny_config(job / "app" / "config", server_changes, job_dir=job_dir)
    return job


def site_apps_job(job: Path, server_job: Path, site_jobs: dict) -> Path:
    """One tiny job (at `job`) whose server app is `server_job`'s and whose sites run other jobs' client apps
    ({site: job folder}); NVFlare's deploy_map sends each app to its site. Every site is required."""
    apps = {"app_server": ["server"], **{f"app_{site}": [site] for site in site_jobs}}
    job.mkdir(parents=True)
    meta = {"name": job.name, "resource_spec": {}, "min_clients": len(site_jobs), "deploy_map": apps}
    (job / "meta.json").write_text(json.dumps(meta))
    server = write_tiny_config(job / "app_server" / "config", {"min_clients": len(site_jobs)}, job_dir=server_job)
    (server / CLIENT_FILE.name).unlink()
    for site, site_job in site_jobs.items():
        (write_tiny_config(job / f"app_{site}" / "config", job_dir=site_job) / SERVER_FILE.name).unlink()
    return job


def simulate(job: Path, workspace: Path, data_root: Path, initial: Path, sites=SITES, store: str | None = None):
    """The job in NVFlare's real simulator (tooling.simulation, as `make compare` runs it) with this
    folder importable by the sites (test executors such as FaultyExecutor); (server run folder, log)."""
    extra = {"PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    if store:
        extra["MLFLOW_TRACKING_URI"] = store
    try:
        run_dir = run_simulator(
            job, workspace, data_root, sites, initial, timeout_s=400, extra_env=extra, allow=TEST_CLASSES
        )
    except FedXViTError as error:
        log = workspace / SIMULATOR_LOG
        pytest.fail(f"{error}\n{log.read_text()[-4000:] if log.is_file() else ''}")
    return run_dir, (workspace / SIMULATOR_LOG).read_text()


def tiny_site_training(site_dir: Path, app_dir: Path | None = None):
    """fedxvit.algorithms.SiteTraining of one tiny site: seeded last-k tiny models (any head size), its loaders
    (training shuffled with seed 0), the CPU, learning rate 1e-2."""
    from fedxvit.algorithms import SiteTraining
    from fedxvit.data import make_loader
    from fedxvit.training import apply_freeze_policy

    def new_model(num_classes: int = len(TASK_CLASSES)):
        torch.manual_seed(0)
        model = build_model("tiny", num_classes)
        apply_freeze_policy(model, "last-k", 1)
        return model

    if app_dir is not None:
        app_dir.mkdir(parents=True, exist_ok=True)  # NVFlare's app folder always exists
    return SiteTraining(
        new_model=new_model,
        train_loader=make_loader(site_dir, "training", 32, 2, train=True, seed=0),
        val_loader=make_loader(site_dir, "validation", 32, 2, train=False),
        device=torch.device("cpu"),
        learning_rate=1e-2,
        app_dir=app_dir or site_dir,
    )


def system_env(run: dict, tmp: Path) -> dict:
    """What a POC or provisioned system's processes need to train on a finished tiny run's sites from its initial
    model, tracking into a store of their own under tmp."""
    return {
        "FEDXVIT_INITIAL_MODEL": str(run["initial"]),
        "FEDXVIT_DATA_ROOT": str(run["data"]),
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}",
    }


def write_initial_model(path: Path) -> Path:
    """A seeded tiny 2-class model, saved as `make transfer` saves initial_global.pt."""
    torch.manual_seed(0)
    save_checkpoint(path, build_model("tiny", len(TASK_CLASSES)), meta={"class_names": list(TASK_CLASSES)})
    return path


def tiny_sites_and_initial_model(tmp: Path, train_per_class=lambda i: 3 + i) -> Path:
    """tmp/data/site1..3 of tiny images and tmp/initial_global.pt (a seeded tiny model); the model's path."""
    for i, site in enumerate(SITES):
        write_tiny_site(tmp / "data" / site, train_per_class=train_per_class(i), seed=i)
    return write_initial_model(tmp / "initial_global.pt")


def opposite_model(state: dict) -> dict:
    """The same weights with the two classes' head rows swapped: every prediction turns into the other
    class with the same confidence, so its accuracy is exactly 1 - the original's."""
    swapped = {k: v.clone() for k, v in state.items()}
    for name in ("head.weight", "head.bias"):
        swapped[name] = state[name].flip(0).clone()
    return swapped


def write_tiny_run(tmp: Path, sites=("site1", "site2")) -> dict:
    """A finished-run folder as NVFlare's simulator leaves it (tiny preset, 2 rounds), its sites with
    masks and the initial model. The final global model is the opposite of the start (opposite_model),
    the best one is the start itself (as when round 0 scored best), so a report that scored the wrong
    file shows it."""
    data = tmp / "data"
    for i, site in enumerate(sites):
        write_tiny_site(data / site, train_per_class=4, test_per_class=2, seed=i, masks=True)
    initial = write_initial_model(tmp / "initial_global.pt")
    run = tmp / "run" / "simulate_job"
    write_tiny_config(run / "app_server" / "config")
    start = torch.load(initial, weights_only=True)
    torch.save(
        {"model": opposite_model(start)}, run / "app_server" / "FL_global_model.pt"
    )  # PTFileModelPersistor's layout
    torch.save({"model": start}, run / "app_server" / "best_FL_global_model.pt")
    rounds = [
        {
            "round": r,
            "global_val_accuracy": 0.5 + 0.1 * r,
            "global_val_loss": 1.0 - 0.1 * r,
            "val_count": 8,
            "num_sites": len(sites),
            "sites": {s: {"val_accuracy": 0.5, "val_loss": 1.0, "val_count": 4} for s in sites},
        }
        for r in range(2)
    ]
    (run / "global_val.json").write_text(json.dumps({"rounds": rounds}))
    cross = {
        s: {
            m: {"val_accuracy": 0.5 + 0.1 * i, "val_loss": 0.7, "val_count": 4}
            for i, m in enumerate(["SRV_FL_global_model.pt", *sites])
        }
        for s in sites
    }
    (run / "cross_site_val").mkdir()
    (run / "cross_site_val" / "cross_val_results.json").write_text(json.dumps(cross))
    return {"run_dir": run, "data": data, "initial": initial, "sites": list(sites)}
