"""Check that the embedded benchmark is informative, not trivial and not hopeless.

Two measurements, printed and saved to <data>/calibration.json:
1. Data-size effect (the reason to federate): one small plain CNN, same seed and epochs,
   trained on the smallest site's training split alone vs on all sites' training splits
   pooled, both scored on the pooled sites' validation splits (--split; the test splits stay
   unseen while a benchmark is tuned). Pooled should be clearly higher.
2. No shortcut: logistic regression on each image's mean intensity alone (5-fold CV over the
   training and validation splits) should score near the majority-class rate on the
   Healthy/Tumor sites and on the 4-class public set.
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np

from fedxvit.datalist import load_split, read_dataset_info
from fedxvit.errors import ArgumentParser, FedXViTError, run_cli

CALIBRATION_FILE = "calibration.json"
EVAL_SPLITS = ("validation", "testing")


def site_dirs(data: Path) -> list:
    """The private site folders (site1, site2, ...) in number order."""
    sites = [p for p in data.glob("site*") if (p / "dataset.json").is_file() and p.name[4:].isdigit()]
    if not sites:
        raise FedXViTError(f"no site folders with dataset.json under --data {data}: run `make data` first")
    return sorted(sites, key=lambda p: int(p.name[4:]))


def load_images(entries: list, size: int) -> tuple:
    """(N, 1, size, size) float32 in [0, 1] and int labels; resized for a fast CPU check."""
    from PIL import Image

    pixels = [
        np.asarray(Image.open(e["image"]).convert("L").resize((size, size), Image.BILINEAR), np.float32) / 255.0
        for e in entries
    ]
    images = np.stack(pixels)[:, None]
    # per-image standardization, the usual first defence against scanner-to-scanner shifts
    images = (images - images.mean(axis=(1, 2, 3), keepdims=True)) / (images.std(axis=(1, 2, 3), keepdims=True) + 1e-6)
    return images.astype(np.float32), np.array([int(e["label"]) for e in entries])


def small_cnn(num_classes: int):
    """A deliberately plain few-layer CNN: enough to learn, too small to hide a data shortage."""
    from torch import nn

    def block(cin, cout):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2))

    return nn.Sequential(
        block(1, 16),
        block(16, 32),
        block(32, 64),
        block(64, 64),
        nn.AdaptiveMaxPool2d(1),
        nn.Flatten(),
        nn.Linear(64, num_classes),
    )


def train_and_score(train: tuple, test: tuple, num_classes: int, epochs: int, seed: int) -> float:
    """Accuracy on `test` (a held-out split) after a fixed, seeded training run (Adam, batch 8, no augmentation)."""
    import torch

    torch.manual_seed(seed)
    model = small_cnn(num_classes)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x_train, y_train = torch.from_numpy(train[0]), torch.from_numpy(train[1])
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        for batch in torch.randperm(len(x_train), generator=generator).split(8):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x_train[batch]), y_train[batch]).backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        predictions = torch.cat([model(chunk).argmax(1) for chunk in torch.from_numpy(test[0]).split(64)])
    return float((predictions.numpy() == test[1]).mean())


def mean_intensity_accuracy(entries: list) -> dict:
    """5-fold CV accuracy of logistic regression on mean intensity, beside the majority rate."""
    from PIL import Image
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    means = np.array([[np.asarray(Image.open(e["image"]), np.float32).mean()] for e in entries])
    labels = np.array([int(e["label"]) for e in entries])
    folds = StratifiedKFold(n_splits=5, shuffle=True, random_state=0)
    scores = cross_val_score(make_pipeline(StandardScaler(), LogisticRegression()), means, labels, cv=folds)
    return {
        "accuracy": round(float(scores.mean()), 4),
        "majority_rate": round(float(np.bincount(labels).max() / len(labels)), 4),
        "n": int(len(labels)),
    }


def seen_entries(site: Path) -> list:
    """Training and validation images: what calibration may look at (never the test split)."""
    return [e for split in ("training", "validation") for e in load_split(site, split)]


def calibrate(data: Path, epochs: int, seed: int, input_size: int, split: str = "validation") -> dict:
    """Run both measurements, the CNN scored on the pooled `split`, and return the calibration report."""
    import torch

    torch.set_num_threads(1)
    sites = site_dirs(data)
    sizes = {s.name: read_dataset_info(s)["num_images"] for s in sites}
    smallest = min(sites, key=lambda s: (sizes[s.name], s.name))
    num_classes = read_dataset_info(smallest)["num_classes"]
    pooled_train = load_images([e for s in sites for e in load_split(s, "training")], input_size)
    pooled_eval = load_images([e for s in sites for e in load_split(s, split)], input_size)
    smallest_train = load_images(load_split(smallest, "training"), input_size)
    started = time.perf_counter()
    report = {
        "cnn": {
            "input_size": input_size,
            "epochs": epochs,
            "seed": seed,
            "eval_split": split,
            "eval_images": int(len(pooled_eval[1])),
            "smallest_site": smallest.name,
            "smallest_site_train_images": int(len(smallest_train[1])),
            "pooled_train_images": int(len(pooled_train[1])),
            "smallest_site_accuracy": round(train_and_score(smallest_train, pooled_eval, num_classes, epochs, seed), 4),
            "pooled_accuracy": round(train_and_score(pooled_train, pooled_eval, num_classes, epochs, seed), 4),
        },
        "mean_intensity": {"sites_pooled": mean_intensity_accuracy([e for s in sites for e in seen_entries(s)])},
    }
    report["cnn"]["gap"] = round(report["cnn"]["pooled_accuracy"] - report["cnn"]["smallest_site_accuracy"], 4)
    report["cnn"]["train_seconds"] = round(time.perf_counter() - started, 1)
    for site in sites:
        report["mean_intensity"][site.name] = mean_intensity_accuracy(seen_entries(site))
    public = data / "public"
    if (public / "dataset.json").is_file():
        report["mean_intensity"]["public_4class"] = mean_intensity_accuracy(seen_entries(public))
    return report


def format_report(report: dict) -> str:
    cnn = report["cnn"]
    lines = [
        f"small CNN ({cnn['epochs']} epochs, {cnn['input_size']}px), scored on {cnn['eval_images']} pooled site "
        f"{cnn['eval_split']} images:",
        f"  trained on {cnn['smallest_site']} only ({cnn['smallest_site_train_images']} images): "
        f"{cnn['smallest_site_accuracy']:.3f}",
        f"  trained on all sites pooled ({cnn['pooled_train_images']} images): {cnn['pooled_accuracy']:.3f}"
        f"  (gap {cnn['gap']:+.3f})",
        "mean-intensity logistic regression (5-fold CV) vs majority-class rate:",
    ]
    for name, row in report["mean_intensity"].items():
        lines.append(f"  {name:14s} {row['accuracy']:.3f} vs {row['majority_rate']:.3f}  (n={row['n']})")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = ArgumentParser(
        prog="python -m data_preparation.calibrate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--data", default="data", help="benchmark folder made by data_preparation.benchmark (default: data)"
    )
    parser.add_argument("--epochs", type=int, default=30, help="training epochs for both CNN runs (default: 30)")
    parser.add_argument("--seed", type=int, default=0, help="torch seed for both CNN runs (default: 0)")
    parser.add_argument(
        "--input-size", type=int, default=64, help="images are resized to this for a fast CPU run (default: 64)"
    )
    parser.add_argument(
        "--split",
        choices=EVAL_SPLITS,
        default="validation",
        help="pooled split the CNN runs are scored on (default: validation; calibrate on it, "
        "keep testing for the final report)",
    )
    args = parser.parse_args(argv)
    if args.epochs < 1:
        raise FedXViTError(f"--epochs must be at least 1, got {args.epochs}")
    if args.input_size < 16:
        raise FedXViTError(f"--input-size must be at least 16, got {args.input_size}")
    data = Path(args.data)
    if not data.is_dir():
        raise FedXViTError(f"--data {data} does not exist: run `make data` first")
    report = calibrate(data, args.epochs, args.seed, args.input_size, args.split)
    (data / CALIBRATION_FILE).write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    print(format_report(report))
    print(f"wrote {data / CALIBRATION_FILE}")


if __name__ == "__main__":
    run_cli(main)
