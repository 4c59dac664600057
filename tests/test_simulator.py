"""One end-to-end run of the real NVFlare simulator: 3 sites x 2 rounds, tiny preset, tiny data."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fedxvit.checkpoint import save_checkpoint
from fedxvit.classes import TASK_CLASSES
from fedxvit.datalist import write_site
from fedxvit.model import build_model

REPO = Path(__file__).resolve().parents[1]
JOB = REPO / "jobs" / "fedxvit"
SITES = ("site1", "site2", "site3")


def write_site_images(root: Path, train_per_class: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    entries = {}
    for split, count in (("training", train_per_class), ("validation", 2), ("testing", 1)):
        (root / split).mkdir(parents=True, exist_ok=True)
        entries[split] = []
        for label in range(len(TASK_CLASSES)):
            for i in range(count):
                pixels = (rng.random((32, 32)) * 60).astype(np.uint8)
                if label:
                    pixels[6:16, 6:16] = 230
                rel = f"{split}/{label}_{i}.png"
                Image.fromarray(pixels).save(root / rel)
                entries[split].append({"image": rel, "label": label})
    write_site(root, entries, TASK_CLASSES, {"generator": "tests", "seed": seed})


def tiny_job(tmp: Path) -> Path:
    """The real job with its arguments overridden the way a user would: edit the top-level variables."""
    job = tmp / "job"
    shutil.copytree(JOB, job)
    for name, changes in (("config_fed_server.json", {"num_rounds": 2, "preset": "tiny"}),
                          ("config_fed_client.json", {"preset": "tiny", "batch_size": 4, "torch_threads": 1})):
        path = job / "app" / "config" / name
        config = json.loads(path.read_text())
        assert set(changes) <= set(config), f"{name} lost a job argument"
        config.update(changes)
        path.write_text(json.dumps(config))
    return job


def test_three_sites_two_rounds_in_the_simulator(tmp_path):
    for i, site in enumerate(SITES):
        write_site_images(tmp_path / "data" / site, train_per_class=3 + i, seed=i)
    torch.manual_seed(0)
    initial = tmp_path / "initial_global.pt"
    save_checkpoint(initial, build_model("tiny", len(TASK_CLASSES)), meta={"class_names": list(TASK_CLASSES)})
    workspace = tmp_path / "workspace"

    env = dict(os.environ, FEDXVIT_INITIAL_MODEL=str(initial), FEDXVIT_DATA_ROOT=str(tmp_path / "data"),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    command = [str(Path(sys.executable).parent / "nvflare"), "simulator", str(tiny_job(tmp_path)),
               "-w", str(workspace), "-c", ",".join(SITES), "-t", "3"]
    run = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=170)
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-4000:]
    assert "Round 1 finished." in log, log[-4000:]

    job_dir = workspace / "server" / "simulate_job"
    global_model = torch.load(job_dir / "app_server" / "FL_global_model.pt", weights_only=True)["model"]
    start = torch.load(initial, weights_only=True)
    assert set(global_model) == set(start)
    changed = [k for k in start if not torch.equal(torch.as_tensor(global_model[k]), start[k])]
    assert changed and all(k.startswith(("blocks.", "norm.", "head.")) for k in changed)  # last-k policy
    assert all(torch.isfinite(torch.as_tensor(v)).all() for v in global_model.values())

    rounds = json.loads((job_dir / "global_val.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [0, 1]
    assert all(r["num_sites"] == 3 and r["val_count"] == 12 for r in rounds)

    cross_site = json.loads((job_dir / "cross_site_val" / "cross_val_results.json").read_text())
    assert set(cross_site) == set(SITES)
    assert "SRV_FL_global_model.pt" in cross_site["site1"]
    for site in SITES:
        assert (workspace / site / "simulate_job" / f"app_{site}" / "best_local_model.pt").is_file()
