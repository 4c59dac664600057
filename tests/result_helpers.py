"""Tiny on-disk sites and runs for the result_stat and baselines tests (imported by those tests)."""

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fedxvit.checkpoint import save_checkpoint
from fedxvit.classes import TASK_CLASSES
from fedxvit.datalist import write_site
from fedxvit.model import build_model

ROOT = Path(__file__).resolve().parents[1]


def write_masked_site(root: Path, per_class: int = 4, size: int = 32, seed: int = 0, tests: int = 2) -> Path:
    """Noise images; a Tumor image has a bright square at a random place and its mask."""
    rng = np.random.default_rng(seed)
    entries = {}
    for split, count in (("training", per_class), ("validation", 2), ("testing", tests)):
        (root / "images").mkdir(parents=True, exist_ok=True)
        (root / "masks").mkdir(parents=True, exist_ok=True)
        entries[split] = []
        for label in range(len(TASK_CLASSES)):
            for i in range(count):
                pixels = (rng.random((size, size)) * 60).astype(np.uint8)
                rel = f"images/{split}_{label}_{i}.png"
                entry = {"image": rel, "label": label}
                if label:
                    r, c = rng.integers(0, size - 10, 2)
                    pixels[r:r + 10, c:c + 10] = 230
                    mask = np.zeros((size, size), np.uint8)
                    mask[r:r + 10, c:c + 10] = 255
                    entry["mask"] = f"masks/{split}_{label}_{i}.png"
                    Image.fromarray(mask).save(root / entry["mask"])
                Image.fromarray(pixels).save(root / rel)
                entries[split].append(entry)
    write_site(root, entries, TASK_CLASSES, {"generator": "tests"})
    return root


def write_job_config(config_dir: Path, num_rounds: int = 2, local_epochs: int = 1, preset: str = "tiny") -> Path:
    """The repository job's config with a tiny preset and few rounds (as a finished run keeps it)."""
    config_dir.mkdir(parents=True, exist_ok=True)
    for name in ("config_fed_server.json", "config_fed_client.json"):
        config = json.loads((ROOT / "jobs" / "fedxvit" / "app" / "config" / name).read_text())
        config["preset"] = preset
        if "num_rounds" in config:
            config["num_rounds"] = num_rounds
        if "local_epochs" in config:
            config["local_epochs"] = local_epochs
        (config_dir / name).write_text(json.dumps(config, indent=2))
    return config_dir


def write_tiny_run(tmp: Path, sites=("site1", "site2")) -> dict:
    """A finished-run folder as NVFlare's simulator leaves it (tiny preset), its sites and an initial model."""
    data = tmp / "data"
    for i, site in enumerate(sites):
        write_masked_site(data / site, seed=i)
    torch.manual_seed(0)
    model = build_model("tiny", num_classes=len(TASK_CLASSES))
    initial = tmp / "initial_global.pt"
    save_checkpoint(initial, model, meta={"class_names": list(TASK_CLASSES)})
    run = tmp / "run" / "simulate_job"
    write_job_config(run / "app_server" / "config")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.save({"model": state}, run / "app_server" / "FL_global_model.pt")  # PTFileModelPersistor's layout
    torch.save({"model": state}, run / "app_server" / "best_FL_global_model.pt")
    rounds = [{"round": r, "global_val_accuracy": 0.5 + 0.1 * r, "global_val_loss": 1.0 - 0.1 * r, "val_count": 8,
               "num_sites": len(sites), "sites": {s: {"val_accuracy": 0.5, "val_loss": 1.0, "val_count": 4} for s in sites}}
              for r in range(2)]
    (run / "global_val.json").write_text(json.dumps({"rounds": rounds}))
    cross = {s: {m: {"val_accuracy": 0.5 + 0.1 * i, "val_loss": 0.7, "val_count": 4}
                 for i, m in enumerate(["SRV_FL_global_model.pt", *sites])} for s in sites}
    (run / "cross_site_val").mkdir()
    (run / "cross_site_val" / "cross_val_results.json").write_text(json.dumps(cross))
    return {"run_dir": run, "data": data, "initial": initial, "sites": list(sites)}
