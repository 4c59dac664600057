"""Phase 1: train the 4-class expert centrally on the public set and report its test accuracy.

    python -m tooling.expert --data data/public --out models [--preset cpu] [--epochs N] [--force]
    python -m tooling.expert --untrained models/untrained_expert.pt   (the start of a federated Phase 1)

Keeps the best-validation checkpoint as <out>/expert.pt (+ .json sidecar), writes TensorBoard
events to <out>/tb/expert, logs to MLflow (local store unless MLFLOW_TRACKING_URI says otherwise)
and the test report to <out>/expert_report.json. A finished expert for the same data and preset
is reused unless --force.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from pathlib import Path

import torch
from tqdm import tqdm

from fedxvit.checkpoint import build_model_from_checkpoint, read_meta, save_checkpoint, sidecar_path
from fedxvit.datalist import read_dataset_info
from fedxvit.errors import ArgumentParser, FedXViTError, run_cli
from fedxvit.model import DEFAULT_PRESET, PRESETS, TRAINING_DEFAULTS, build_model, get_preset, training_defaults
from fedxvit.training import (
    evaluate,
    make_optimizer,
    make_scheduler,
    resolve_device,
    seed_everything,
    train_epoch,
)

CHECKPOINT_NAME = "expert.pt"
REPORT_NAME = "expert_report.json"
EXPERIMENT = "fedxvit-expert"


def parse_args(argv=None) -> argparse.Namespace:
    parser = ArgumentParser(
        prog="python -m tooling.expert",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--data", default="data/public", help="public 4-class site folder (datalist.json + dataset.json)"
    )
    parser.add_argument(
        "--out", default="models", help="folder for expert.pt, its sidecar, the report and TensorBoard events"
    )
    parser.add_argument("--preset", default=DEFAULT_PRESET, choices=sorted(PRESETS), help="model preset")
    # None: the preset's training defaults (fedxvit.model.TRAINING_DEFAULTS): a preset brings its own
    parser.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="maximum epochs, early stopping usually ends sooner" + defaults_help("epochs"),
    )
    parser.add_argument("--lr", type=float, default=None, help="peak AdamW learning rate" + defaults_help("lr"))
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument(
        "--warmup-epochs",
        type=float,
        default=None,
        help="linear warm-up before the cosine decay" + defaults_help("warmup_epochs"),
    )
    parser.add_argument("--label-smoothing", type=float, default=0.05)
    parser.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (0: off)")
    parser.add_argument("--batch-size", type=int, default=None, help="images per step" + defaults_help("batch_size"))
    parser.add_argument(
        "--patience",
        type=int,
        default=None,
        help="stop after this many epochs without a better validation score" + defaults_help("patience"),
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--pretrained",
        default=None,
        help="backbone weights: 'timm' (downloads from the hub) or a local .pt/.pth file; default: none",
    )
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: all cores, at most 8; use fewer when other jobs share the machine, "
        "since oversubscribed OpenMP threads spin and run many times slower)",
    )
    parser.add_argument(
        "--num-workers", type=int, default=0, help="DataLoader workers (0 is fastest for cached small images)"
    )
    parser.add_argument(
        "--tracking-uri", default=None, help="MLflow URI (default: $MLFLOW_TRACKING_URI, else sqlite store in mlruns/)"
    )
    parser.add_argument("--no-mlflow", action="store_true", help="skip MLflow logging")
    parser.add_argument("--force", action="store_true", help="retrain even when a matching expert exists")
    parser.add_argument(
        "--untrained",
        default=None,
        metavar="PATH",
        help="write the 4-class model before any training (seeded; --pretrained backbone if given) to PATH and "
        "stop: the start of a federated Phase 1 (FEDXVIT_INITIAL_MODEL=PATH with a 4-class job; docs/imbalance.md)",
    )
    return with_preset_defaults(parser.parse_args(argv))


def defaults_help(option: str) -> str:
    """' (default: the preset's training defaults: tiny 2, cpu 24, anchor 30)' for --help; '%(default).0s' prints
    nothing but stops the defaults formatter from adding '(default: None)'."""
    values = ", ".join(f"{name} {getattr(defaults.expert, option):g}" for name, defaults in TRAINING_DEFAULTS.items())
    return f" (default: the preset's training defaults: {values})%(default).0s"


def with_preset_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the options left unset from the preset's expert training defaults."""
    defaults = training_defaults(args.preset).expert
    for option in ("epochs", "lr", "batch_size", "warmup_epochs", "patience"):
        if getattr(args, option) is None:
            setattr(args, option, getattr(defaults, option))
    return args


def existing_expert(checkpoint: Path, data_hash: str, preset: str) -> dict | None:
    """The sidecar of a finished expert trained on the same data with the same preset, else None."""
    if not checkpoint.is_file():
        return None
    try:
        meta = read_meta(checkpoint)
    except FedXViTError:
        return None
    if (
        meta.get("data_hash") == data_hash
        and meta.get("preset") == preset
        and (checkpoint.parent / REPORT_NAME).is_file()
    ):
        return meta
    return None


def per_class_report(labels: list, probs: list, class_names: list) -> tuple[dict, str]:
    """scikit-learn's precision/recall/F1 per class as (dict, printable table)."""
    from sklearn.metrics import classification_report, confusion_matrix

    predictions = [max(range(len(p)), key=p.__getitem__) for p in probs]
    indices = list(range(len(class_names)))
    kwargs = dict(labels=indices, target_names=list(class_names), digits=4, zero_division=0)
    report = classification_report(labels, predictions, output_dict=True, **kwargs)
    table = classification_report(labels, predictions, **kwargs)
    report["confusion_matrix"] = confusion_matrix(labels, predictions, labels=indices).tolist()
    return report, table


def train_expert(args: argparse.Namespace) -> dict:
    """Train, keep the best validation checkpoint, evaluate it on the test split; returns the report."""
    from fedxvit.data import make_loader
    from fedxvit.tracking import mlflow_run

    started = time.perf_counter()
    info = read_dataset_info(args.data)
    class_names = list(info["class_names"])
    preset = get_preset(args.preset)
    out = Path(args.out)
    checkpoint = out / CHECKPOINT_NAME
    if not args.force and (meta := existing_expert(checkpoint, info["data_hash"], preset.name)):
        print(
            f"reusing {checkpoint} (same data hash and preset '{preset.name}'; "
            f"test accuracy {meta.get('metrics', {}).get('test_accuracy', float('nan')):.4f}); pass --force to retrain"
        )
        return json.loads((out / REPORT_NAME).read_text())

    torch.set_num_threads(args.threads or min(8, os.cpu_count() or 1))
    seed_everything(args.seed)
    device = resolve_device(args.device)
    print(
        f"expert: preset '{preset.name}' ({preset.image_size} px), {len(class_names)} classes {class_names}, "
        f"device {device}, {torch.get_num_threads()} CPU threads"
    )
    loaders = {
        split: make_loader(
            args.data,
            split,
            preset.image_size,
            args.batch_size,
            train=(split == "training"),
            num_workers=args.num_workers,
            seed=args.seed,
        )
        for split in ("training", "validation", "testing")
    }
    if len(loaders["training"].dataset) == 0 or len(loaders["validation"].dataset) == 0:
        raise FedXViTError(f"{args.data}: the training and validation splits must not be empty")
    # channels-last convolutions: about 15% less time per training step on a 2-core CPU (docs/model.md); the
    # checkpoint is saved contiguous (fedxvit.checkpoint.save_checkpoint), as every other model
    model = build_model(preset.name, num_classes=len(class_names), pretrained=args.pretrained).to(
        device, memory_format=torch.channels_last
    )
    optimizer = make_optimizer(model, args.lr, args.weight_decay)
    steps_per_epoch = len(loaders["training"])
    scheduler = make_scheduler(optimizer, args.epochs * steps_per_epoch, int(args.warmup_epochs * steps_per_epoch))
    params = {k: v for k, v in vars(args).items() if k not in ("force", "no_mlflow", "tracking_uri")}
    params.update(
        param_count=model.param_count,
        data_hash=info["data_hash"],
        image_size=preset.image_size,
        train_images=len(loaders["training"].dataset),
    )

    from torch.utils.tensorboard import SummaryWriter

    best, best_epoch, history = None, -1, []
    with contextlib.ExitStack() as stack:
        writer = SummaryWriter(str(out / "tb" / "expert"))
        stack.callback(writer.close)
        mlflow = None
        if not args.no_mlflow:  # a failing run is marked FAILED by MLflow's own context manager
            mlflow = stack.enter_context(
                mlflow_run(EXPERIMENT, run_name=f"expert-{preset.name}", params=params, uri=args.tracking_uri)
            )
        for epoch in range(args.epochs):
            bar = tqdm(
                total=len(loaders["training"].dataset),
                desc=f"epoch {epoch + 1}/{args.epochs}",
                unit="img",
                leave=False,
                disable=None,
            )  # no bar spam in logs and pipes
            last = [0]

            def advance(step):
                bar.update(step["images"] - last[0])
                last[0] = step["images"]
                bar.set_postfix(loss=f"{step['loss']:.3f}")

            train = train_epoch(
                model,
                loaders["training"],
                optimizer,
                device,
                scheduler=scheduler,
                label_smoothing=args.label_smoothing,
                progress=advance,
                max_grad_norm=args.max_grad_norm or None,
            )
            bar.close()
            val = evaluate(model, loaders["validation"], device)
            metrics = {
                "train_loss": train["loss"],
                "train_accuracy": train["accuracy"],
                "val_loss": val["loss"],
                "val_accuracy": val["accuracy"],
                "lr": optimizer.param_groups[0]["lr"],
            }
            history.append({"epoch": epoch + 1, **metrics})
            for key, value in metrics.items():
                writer.add_scalar(key.replace("_", "/", 1), value, epoch + 1)
            if mlflow:
                mlflow.log_metrics(metrics, step=epoch + 1)
            improved = best is None or (val["accuracy"], -val["loss"]) > (best["accuracy"], -best["loss"])
            print(
                f"epoch {epoch + 1:>3}: train loss {train['loss']:.4f} acc {train['accuracy']:.4f} | "
                f"val loss {val['loss']:.4f} acc {val['accuracy']:.4f}{'  *' if improved else ''}",
                flush=True,
            )
            if improved:
                best, best_epoch = val, epoch + 1
                save_checkpoint(
                    checkpoint,
                    model,
                    {
                        "class_names": class_names,
                        "data_hash": info["data_hash"],
                        "data": os.fspath(args.data),
                        "epoch": best_epoch,
                        "seed": args.seed,
                        "pretrained": args.pretrained,
                        "metrics": {"val_accuracy": val["accuracy"], "val_loss": val["loss"]},
                    },
                )
            elif epoch + 1 - best_epoch >= args.patience:
                print(f"early stop: no better validation score for {args.patience} epochs")
                break

        model, meta = build_model_from_checkpoint(checkpoint, device=device)
        test = evaluate(model, loaders["testing"], device)
        per_class, table = per_class_report(test["labels"], test["probs"], class_names)
        wall = time.perf_counter() - started
        report = {
            "test_accuracy": test["accuracy"],
            "test_loss": test["loss"],
            "test_count": test["count"],
            "per_class": per_class,
            "class_names": class_names,
            "best_epoch": best_epoch,
            "epochs_run": len(history),
            "history": history,
            "preset": preset.name,
            "param_count": model.param_count,
            "data_hash": info["data_hash"],
            "wall_s": wall,
            "checkpoint": os.fspath(checkpoint),
        }
        meta["metrics"].update(test_accuracy=test["accuracy"], test_loss=test["loss"])
        save_checkpoint(checkpoint, model, meta)
        (out / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
        writer.add_scalar("test/accuracy", test["accuracy"], best_epoch)
        if mlflow:
            mlflow.log_metrics({"test_accuracy": test["accuracy"], "test_loss": test["loss"], "wall_s": wall})
            mlflow.log_artifact(str(out / REPORT_NAME))

    print(
        f"\nbest epoch {best_epoch}; test accuracy {test['accuracy']:.4f}, test loss {test['loss']:.4f} "
        f"on {test['count']} images ({wall:.0f} s)\n"
    )
    print(table)
    print(f"wrote {checkpoint}, {sidecar_path(checkpoint)}, {out / REPORT_NAME}")
    return report


def write_untrained(args: argparse.Namespace) -> dict:
    """The seeded 4-class model of the preset, untrained, as a checkpoint a federated job can start from."""
    from fedxvit.classes import EXPERT_CLASSES

    torch.manual_seed(args.seed)
    model = build_model(args.preset, num_classes=len(EXPERT_CLASSES), pretrained=args.pretrained)
    meta = save_checkpoint(
        args.untrained,
        model,
        {"class_names": list(EXPERT_CLASSES), "untrained": True, "pretrained": args.pretrained, "seed": args.seed},
    )
    print(f"wrote {args.untrained}: untrained 4-class '{args.preset}' model (seed {args.seed})")
    return meta


def main(argv=None) -> dict:
    args = parse_args(argv)
    return write_untrained(args) if args.untrained else train_expert(args)


if __name__ == "__main__":
    run_cli(main)
