"""The pictures in the docs, made from the data and a model on this machine (`make doc-figures`).

    python -m result_stat.doc_figures [--data data] [--model models/initial_global.pt] [--out docs/img]

- slices.png: per scenario found under --data (default data/site*, skewed data/skewed/site* and its
  held-out hospital, long-tailed data/longtail/homo/site*), one Tumor test image of every hospital, its mask
  outlined, titled with the hospital's scanner;
- label_mix.png: per scenario, each hospital's training images by class (from dataset.json);
- explanations.png: tumor test images of the default scenario's site1, each with its mask, the report's
  Grad-CAM panel, the design card's stride-16 Grad-CAM, occlusion and Integrated Gradients of --model's
  Tumor logit (fedxvit.explain), mask outlined.
A scenario whose folder is missing is left out (and said so); nothing is downloaded or trained.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedxvit.datalist import load_split, read_dataset_info
from fedxvit.errors import ArgumentParser, FedXViTError, run_cli
from fedxvit.site_stats import gray_pixels

DPI = 72  # the docs show them at about this size; higher only makes the repository heavier
SCENARIOS = {"default": "", "skewed": "skewed", "longtail": "longtail/homo"}  # make data, data-skewed, data-longtail


def scenario_sites(data: Path) -> dict:
    """scenario -> [site folder], in number order, the held-out hospital last; only scenarios present."""
    from data_preparation.calibrate import site_dirs

    found = {}
    for scenario, sub in SCENARIOS.items():
        root = data / sub if sub else data
        try:
            sites = site_dirs(root)
        except FedXViTError:  # not generated
            continue
        found[scenario] = sites + ([root / "heldout"] if (root / "heldout" / "dataset.json").is_file() else [])
    return found


def first_tumor(site: Path) -> tuple[np.ndarray, np.ndarray]:
    """The first test image with a mask (any tumor class), decoded as the site decodes it: (pixels, mask)."""
    for item in load_split(site.resolve(), "testing"):
        if item.get("mask"):
            return gray_pixels(item["image"]), gray_pixels(item["mask"]) > 0
    raise FedXViTError(f"{site}: no test image with a mask")


def _figure(rows: int, columns: int, size: float = 1.9):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(rows, columns, figsize=(size * columns, size * rows + 0.3), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    return plt, fig, axes


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def slices(scenarios: dict, out: Path) -> Path:
    plt, fig, axes = _figure(len(scenarios), max(len(s) for s in scenarios.values()))
    for row, (scenario, sites) in enumerate(scenarios.items()):
        for column, site in enumerate(sites):
            image, mask = first_tumor(site)
            ax = axes[row][column]
            ax.imshow(image, cmap="gray", vmin=0, vmax=255)
            ax.contour(mask.astype(float), levels=[0.5], colors="red", linewidths=0.7)
            scanner = read_dataset_info(site)["provenance"].get("scanner_profile", "")
            ax.set_title(f"{scenario}: {site.name}\n{scanner}", fontsize=7)
    return _save(plt, fig, out / "slices.png")


def label_mix(scenarios: dict, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(scenarios), figsize=(4.2 * len(scenarios), 3.4), squeeze=False)
    for ax, (scenario, sites) in zip(axes[0], scenarios.items()):
        training = [
            s for s in sites if sum(read_dataset_info(s)["counts"]["training"].values())
        ]  # the held-out trains on none
        classes = read_dataset_info(training[0])["class_names"]
        bottom = np.zeros(len(training))
        for name in classes:
            counts = np.array([read_dataset_info(s)["counts"]["training"].get(name, 0) for s in training], dtype=float)
            ax.bar([s.name for s in training], counts, bottom=bottom, label=name)
            bottom += counts
        ax.set(title=f"{scenario}: training images", ylabel="images")
        ax.tick_params(axis="x", rotation=45)
        ax.legend(fontsize=7)
    return _save(plt, fig, out / "label_mix.png")


def explanations(site: Path, model_path: Path, out: Path, n: int = 3) -> Path:
    import torch

    from fedxvit.explain import METHODS, load_tumor_cases
    from result_stat.gradcam import load_run_model

    model = load_run_model(None, str(model_path))
    cases = load_tumor_cases(site, model.preset.image_size, n=n)
    images = torch.stack([case["image"] for case in cases])
    titles = {
        "gradcam": "Grad-CAM panel",
        "gradcam_stride16": "stride-16 Grad-CAM",
        "occlusion": "occlusion",
        "integrated_gradients": "Integrated Gradients",
    }
    maps = {title: METHODS[method](model, images) for method, title in titles.items()}
    plt, fig, axes = _figure(len(cases), 2 + len(maps))
    for row, case in enumerate(cases):
        image, mask = case["image"][0].numpy(), case["mask"]
        axes[row][0].imshow(image, cmap="gray", vmin=0, vmax=1)
        axes[row][1].imshow(mask, cmap="gray")
        for column, (name, heatmaps) in enumerate(maps.items(), start=2):
            axes[row][column].imshow(image, cmap="gray", vmin=0, vmax=1)
            axes[row][column].imshow(heatmaps[row], cmap="jet", alpha=0.45, vmin=0, vmax=1)
            axes[row][column].contour(mask.astype(float), levels=[0.5], colors="white", linewidths=0.7)
        if row == 0:
            for column, name in enumerate(["image", "mask", *maps]):
                axes[0][column].set_title(name, fontsize=8)
    fig.suptitle(f"{site.name} test tumors, {model_path.name}: what the Tumor logit looks at", fontsize=8)
    return _save(plt, fig, out / "explanations.png")


def main(argv=None) -> None:
    parser = ArgumentParser(prog="python -m result_stat.doc_figures", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("data"), help="default: data")
    parser.add_argument("--model", type=Path, default=Path("models/initial_global.pt"), help="for explanations.png")
    parser.add_argument("--out", type=Path, default=Path("docs/img"), help="default: docs/img")
    args = parser.parse_args(argv)
    scenarios = scenario_sites(args.data)
    if "default" not in scenarios:
        raise FedXViTError(f"--data {args.data}: no site folders (site1, site2, ...): run `make data` first")
    if not args.model.is_file():
        raise FedXViTError(f"--model {args.model}: no such file (make transfer writes models/initial_global.pt)")
    missing = [name for name in SCENARIOS if name not in scenarios]
    if missing:
        print(f"left out (no data under {args.data}): {', '.join(missing)}")
    args.out.mkdir(parents=True, exist_ok=True)
    for path in (
        slices(scenarios, args.out),
        label_mix(scenarios, args.out),
        explanations(scenarios["default"][0], args.model, args.out),
    ):
        print(path)


if __name__ == "__main__":
    run_cli(main)
