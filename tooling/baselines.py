"""The non-federated baselines federation is judged against: centralized and local-only training.

    python -m tooling.baselines [--run-dir workspace/server/simulate_job] [--out models/baselines] [--force]

"Is federation worth it?" is only a fair question when the alternatives start from the same
transplanted initial global model, train the same tensors (freeze policy) with the same
optimizer, batch size and learning rate, and see every image as often as the federated job
does (epochs = rounds x local epochs). So this reuses the executor's pieces (`fedxvit.training`)
and reads those settings from the config the run really used (`tooling.jobconfig`). Pooled
site folders = a centralized model; one folder = that site alone.

Its own step (`make baselines`), so result scripts only score what it wrote: one checkpoint per
baseline (+ sidecar) and baselines.json (settings, sites, training images, wall time). Baselines
already trained for the same settings, sites, data and initial model are reused unless --force.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Sequence

from fedxvit.checkpoint import build_model_from_checkpoint, save_checkpoint
from fedxvit.classes import TASK_CLASSES
from fedxvit.data import make_loader
from fedxvit.datalist import read_dataset_info
from fedxvit.errors import ArgumentParser, FedXViTError, read_json, run_cli
from fedxvit.paths import project_root
from fedxvit.training import apply_freeze_policy, make_optimizer, resolve_device, seed_everything, train_epoch
from tooling.jobconfig import JobSettings, default_run_dir, read_job_settings, run_sites

DEFAULT_OUT = Path("models") / "baselines"
BASELINES_FILE = "baselines.json"
CENTRALIZED = "centralized (all sites pooled)"


def train_on_sites(
    site_dirs: Sequence[os.PathLike],
    init_checkpoint: os.PathLike,
    settings: JobSettings,
    device: str | None = None,
    progress: bool = False,
) -> dict:
    """Fine-tune the initial global model on the pooled training splits of `site_dirs`, for the job's
    equivalent epochs with its lr, batch size, freeze policy and seed.

    Several folders: the centralized baseline (all hospitals' images in one place); one folder:
    the local-only baseline of that hospital. Returns {"model", "history" (one train_epoch dict
    per epoch), "train_images", "wall_s"} -- wall_s covers data caching and training.
    """
    if isinstance(site_dirs, (str, os.PathLike)):
        site_dirs = [site_dirs]
    site_dirs = [Path(d) for d in site_dirs]
    if not site_dirs:
        raise FedXViTError("train_on_sites needs at least one site folder")
    if settings.equivalent_epochs < 1:
        raise FedXViTError(
            f"{settings.num_rounds} rounds x {settings.local_epochs} local epochs: train for at least one epoch"
        )
    started = time.perf_counter()
    torch_device = resolve_device(device)
    seed_everything(settings.seed)
    model, _ = build_model_from_checkpoint(
        init_checkpoint, preset=settings.preset, num_classes=settings.num_classes, device=torch_device
    )
    loader = make_loader(
        site_dirs, "training", model.preset.image_size, settings.batch_size, train=True, seed=settings.seed
    )
    apply_freeze_policy(model, settings.freeze_policy, settings.last_k)
    optimizer = make_optimizer(model, settings.learning_rate)
    history = []
    epochs_iter = range(settings.equivalent_epochs)
    if progress:
        from tqdm.auto import tqdm

        epochs_iter = tqdm(epochs_iter, desc=f"train {'+'.join(d.name for d in site_dirs)}", unit="epoch")
    for _ in epochs_iter:
        history.append(train_epoch(model, loader, optimizer, torch_device))
    model.eval()
    return {
        "model": model,
        "history": history,
        "train_images": len(loader.dataset),
        "wall_s": time.perf_counter() - started,
    }


def baseline_groups(site_dirs: dict) -> dict:
    """{baseline name: (checkpoint file name, site folders)}: the centralized one, then one per site."""
    groups = {CENTRALIZED: ("centralized.pt", list(site_dirs.values()))}
    groups.update({f"local-only {site}": (f"local-{site}.pt", [d]) for site, d in site_dirs.items()})
    return groups


def fingerprint(settings: JobSettings, site_dirs: dict, initial: Path) -> dict:
    """What the baselines depend on: the job's settings, each site's data hash, the initial model's bytes."""
    return {
        "settings": settings.as_dict(),
        "data_hash": {site: read_dataset_info(d).get("data_hash") for site, d in site_dirs.items()},
        "initial_sha256": hashlib.sha256(Path(initial).read_bytes()).hexdigest(),
    }


def read_baselines(out: os.PathLike) -> dict:
    """baselines.json of `make baselines`, or one line naming the command that writes it."""
    path = Path(out) / BASELINES_FILE
    return read_json(path, f"no baselines at {path}: run `make baselines` (python -m tooling.baselines) first")


def train_baselines(
    settings: JobSettings,
    site_dirs: dict,
    initial: os.PathLike,
    out: os.PathLike,
    device: str | None = None,
    force: bool = False,
    progress: bool = True,
) -> dict:
    """Train (or reuse) the centralized and local-only models; writes their checkpoints and baselines.json."""
    out, initial = Path(out), Path(initial)
    if not initial.is_file():
        raise FedXViTError(f"initial global model {initial} does not exist: run `make transfer` (or pass --initial)")
    stamp = fingerprint(settings, site_dirs, initial)
    if not force and (out / BASELINES_FILE).is_file():
        previous = read_baselines(out)
        if previous.get("fingerprint") == stamp and all((out / m["checkpoint"]).is_file() for m in previous["models"]):
            print(f"reusing the baselines in {out} (same settings, data and initial model); pass --force to retrain")
            return previous
    models = []
    for name, (file_name, dirs) in baseline_groups(site_dirs).items():
        trained = train_on_sites(dirs, initial, settings, device=device, progress=progress)
        last = trained["history"][-1]
        save_checkpoint(
            out / file_name,
            trained["model"],
            meta={
                "class_names": list(TASK_CLASSES),
                "baseline": name,
                "initial": os.fspath(initial),
                "sites": [d.name for d in dirs],
                "epochs": settings.equivalent_epochs,
            },
        )
        models.append(
            {
                "model": name,
                "checkpoint": file_name,
                "sites": [d.name for d in dirs],
                "train_images": trained["train_images"],
                "epochs": settings.equivalent_epochs,
                "train_wall_s": round(trained["wall_s"], 1),
                "final_train_loss": last["loss"],
                "final_train_accuracy": last["accuracy"],
            }
        )
        print(
            f"{name}: {trained['train_images']} images x {settings.equivalent_epochs} epochs, "
            f"train loss {last['loss']:.4f}, {trained['wall_s']:.0f} s",
            flush=True,
        )
    record = {"fingerprint": stamp, "initial": os.fspath(initial), "sites": list(site_dirs), "models": models}
    out.mkdir(parents=True, exist_ok=True)
    (out / BASELINES_FILE).write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out / BASELINES_FILE} and {len(models)} checkpoints")
    return record


def parse_args(argv=None) -> argparse.Namespace:
    parser = ArgumentParser(
        prog="python -m tooling.baselines",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--run-dir",
        default=None,
        help="finished run whose settings and sites to match (default <project>/workspace/server/simulate_job)",
    )
    parser.add_argument("--job", default=None, help="take the settings from this job folder instead of the run's")
    parser.add_argument("--sites", nargs="+", default=None, help="sites (default: the run's sites)")
    parser.add_argument(
        "--initial",
        default=None,
        help="transplanted start checkpoint (default: the job's, "
        "$FEDXVIT_INITIAL_MODEL else <project>/models/initial_global.pt)",
    )
    parser.add_argument("--out", default=None, help=f"output folder (default <project>/{DEFAULT_OUT.as_posix()})")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--force", action="store_true", help="retrain even when matching baselines exist")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    from fedxvit.persistor import resolve_initial_model  # the job's own lookup of the initial model
    from fedxvit.sites import site_data_dir

    args = parse_args(argv)
    run_dir = Path(args.run_dir) if args.run_dir else default_run_dir()
    if not (args.job and args.sites) and not run_dir.is_dir():
        raise FedXViTError(
            f"run folder {run_dir} does not exist: run `make simulate` first (or pass --run-dir, or --job and --sites)"
        )
    settings = read_job_settings(args.job or run_dir)
    sites = args.sites or run_sites(run_dir)
    out = Path(args.out) if args.out else project_root() / DEFAULT_OUT
    return train_baselines(
        settings,
        {site: site_data_dir(site) for site in sites},
        args.initial or resolve_initial_model(),
        out,
        device=args.device,
        force=args.force,
    )


if __name__ == "__main__":
    run_cli(main)
