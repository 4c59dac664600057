"""The non-federated baselines federation is judged against: centralized and local-only training.

"Is federation worth it?" is only a fair question when the alternatives start from the same
transplanted initial global model, train the same tensors (freeze policy) with the same
optimizer, batch size and learning rate, and see every image as often as the federated job
does (epochs = rounds x local epochs). So this module reuses the executor's pieces
(`fedxvit.training`) and reads those settings from the job's own config instead of
repeating them. Pooled site folders = a centralized model; one folder = that site alone.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Sequence

import torch

from fedxvit.checkpoint import build_model_from_checkpoint
from fedxvit.classes import TASK_CLASSES
from fedxvit.data import make_loader
from fedxvit.errors import FedXViTError
from fedxvit.paths import project_root
from fedxvit.training import apply_freeze_policy, make_optimizer, resolve_device, seed_everything, train_epoch

CLIENT_CONFIG = "config_fed_client.json"
SERVER_CONFIG = "config_fed_server.json"
DEFAULT_JOB_CONFIG = Path("jobs") / "fedxvit" / "app" / "config"


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise FedXViTError(f"job config {path} does not exist")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise FedXViTError(f"job config {path} is not valid JSON: {exc}") from None


def job_training_settings(config_dir: os.PathLike | None = None) -> dict:
    """train_on_sites keyword arguments matching a job: preset, epochs (= rounds x local epochs), lr,
    batch size, freeze policy, last_k, seed, read from the job's variables.

    `config_dir` holds config_fed_server.json and config_fed_client.json: a job's app/config, or
    the copy a finished run keeps in <run dir>/app_server/config (what that run really used).
    Default: the repository's jobs/fedxvit/app/config.
    """
    config_dir = Path(config_dir) if config_dir else project_root() / DEFAULT_JOB_CONFIG
    server, client = _read_json(config_dir / SERVER_CONFIG), _read_json(config_dir / CLIENT_CONFIG)
    try:
        return {
            "preset": str(client.get("preset", server.get("preset", "cpu"))),
            "epochs": int(server["num_rounds"]) * int(client.get("local_epochs", 1)),
            "lr": float(client.get("learning_rate", 3e-4)),
            "batch_size": int(client.get("batch_size", 16)),
            "freeze_policy": str(client.get("freeze_policy", "last-k")),
            "last_k": int(client.get("last_k", 1)),
            "seed": int(client.get("seed", 0)),
        }
    except (KeyError, TypeError, ValueError) as exc:
        raise FedXViTError(f"job config in {config_dir} lacks a usable setting: {type(exc).__name__}: {exc}") from None


def train_on_sites(site_dirs: Sequence[os.PathLike], init_checkpoint: os.PathLike, preset: str = "cpu",
                   epochs: int = 5, lr: float = 3e-4, batch_size: int = 16, freeze_policy: str = "last-k",
                   last_k: int = 1, seed: int = 0, device: str | None = None, progress: bool = False) -> dict:
    """Fine-tune the initial global model on the pooled training splits of `site_dirs`.

    Several folders: the centralized baseline (all hospitals' images in one place); one folder:
    the local-only baseline of that hospital. Returns {"model", "history" (one train_epoch dict
    per epoch), "train_images", "wall_s"} -- wall_s covers data caching and training.
    """
    if isinstance(site_dirs, (str, os.PathLike)):
        site_dirs = [site_dirs]
    site_dirs = [Path(d) for d in site_dirs]
    if not site_dirs:
        raise FedXViTError("train_on_sites needs at least one site folder")
    if int(epochs) < 1:
        raise FedXViTError(f"epochs={epochs}: train for at least one epoch")
    started = time.perf_counter()
    torch_device = resolve_device(device)
    seed_everything(seed)
    model, _ = build_model_from_checkpoint(init_checkpoint, preset=preset, num_classes=len(TASK_CLASSES),
                                           device=torch_device)
    loader = make_loader(site_dirs, "training", model.preset.image_size, batch_size, train=True, seed=seed)
    apply_freeze_policy(model, freeze_policy, last_k)
    optimizer = make_optimizer(model, lr)
    history = []
    epochs_iter = range(int(epochs))
    if progress:
        from tqdm.auto import tqdm

        names = "+".join(d.name for d in site_dirs)
        epochs_iter = tqdm(epochs_iter, desc=f"train {names}", unit="epoch")
    for _ in epochs_iter:
        history.append(train_epoch(model, loader, optimizer, torch_device))
    model.eval()
    return {"model": model, "history": history, "train_images": len(loader.dataset),
            "wall_s": time.perf_counter() - started}
