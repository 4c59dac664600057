"""Draw a run's TensorBoard curves (global and per site) to PNG.

    python -m result_stat.plot_tensorboard_events [--events workspace/server/simulate_job/tb_events] [--out results]

NVFlare's TBAnalyticsReceiver writes one folder per metric origin under the job's
tb_events/ (the server and every site). Event files are found recursively; the folder
holding an event file, relative to --events, names its source. Server-side tags
(global_val_accuracy, global_val_loss, clients_per_round) go into tb_global.png, every other
tag into tb_sites.png with one line per site (step = round). --smooth applies TensorBoard's
exponential moving average (the FedSM example plots with 0.8); raw points stay visible.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

from fedxvit.errors import ArgumentParser, FedXViTError, run_cli
from fedxvit.paths import project_root
from fedxvit.protocol import SERVER_ROUND_METRICS, SITE_ROUND_METRICS
from tooling.jobconfig import DEFAULT_RUN_DIR

DEFAULT_EVENTS = DEFAULT_RUN_DIR / "tb_events"
GLOBAL_TAGS = SERVER_ROUND_METRICS  # the metric names have one home: fedxvit.tracking
SITE_TAGS = SITE_ROUND_METRICS


def find_event_files(root: os.PathLike) -> list[Path]:
    return sorted(p for p in Path(root).rglob("*") if p.is_file() and "tfevents" in p.name)


def read_scalars(root: os.PathLike) -> dict:
    """{source: {tag: [(step, value), ...]}} for every event file under root (steps sorted, last write wins)."""
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    root = Path(root)
    if not root.is_dir():
        raise FedXViTError(
            f"TensorBoard folder {root} does not exist: run the job with its TensorBoard receiver (or pass --events)"
        )
    files = find_event_files(root)
    if not files:
        raise FedXViTError(f"no TensorBoard event files (*tfevents*) under {root}")
    scalars: dict = {}
    for path in files:
        source = path.parent.relative_to(root).as_posix()
        source = root.name if source == "." else source
        accumulator = EventAccumulator(str(path), size_guidance={SCALARS: 0})
        accumulator.Reload()
        for tag in accumulator.Tags().get("scalars", []):
            points = scalars.setdefault(source, {}).setdefault(tag, {})
            for event in accumulator.Scalars(tag):
                points[int(event.step)] = float(event.value)
    return {source: {tag: sorted(points.items()) for tag, points in tags.items()} for source, tags in scalars.items()}


def smooth(values: list[float], weight: float) -> list[float]:
    """TensorBoard's debiased exponential moving average (weight 0 = raw values)."""
    if not 0 <= weight < 1:
        raise FedXViTError(f"--smooth {weight}: use a weight in [0, 1)")
    out, last, debias = [], 0.0, 0.0
    for value in values:
        if not math.isfinite(value):
            out.append(value)
            continue
        last = last * weight + (1 - weight) * value
        debias = debias * weight + (1 - weight)
        out.append(last / debias)
    return out


def _plot_panels(panels: dict, path: Path, title: str, weight: float) -> Path:
    """panels: tag -> {line label: [(step, value)]}; one subplot per tag."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    cols = min(2, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.4 * rows), squeeze=False)
    for ax, (tag, lines) in zip(axes.flat, panels.items()):
        for i, (label, points) in enumerate(sorted(lines.items())):
            steps, values = [s for s, _ in points], [v for _, v in points]
            color = f"C{i}"
            if weight > 0:
                ax.plot(steps, values, color=color, alpha=0.25, marker=".")
                ax.plot(steps, smooth(values, weight), color=color, label=label)
            else:
                ax.plot(steps, values, color=color, marker="o", label=label)
        ax.set_title(tag)
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle(title + (f" (smoothed, weight {weight})" if weight > 0 else ""))
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_events(events: os.PathLike, out: os.PathLike, smooth_weight: float = 0.0, all_tags: bool = False) -> dict:
    """tb_global.png (server tags) and tb_sites.png (per-site tags); returns {"files", "scalars"}.

    By default only the job's per-round tags are drawn when the events hold any of them (run
    parameters logged as one-point scalars and per-epoch tags would only crowd the page);
    all_tags draws every tag.
    """
    scalars = read_scalars(events)
    smooth([], smooth_weight)  # validates the weight before anything is drawn
    known = set(GLOBAL_TAGS + SITE_TAGS)
    present = {tag.rsplit("/", 1)[-1] for tags in scalars.values() for tag in tags}
    keep = (lambda name: True) if all_tags or not (present & known) else (lambda name: name in known)
    global_panels, site_panels = {}, {}
    for source, tags in scalars.items():
        for tag, points in tags.items():
            name = tag.rsplit("/", 1)[-1]
            if not keep(name):
                continue
            target = global_panels if name in GLOBAL_TAGS else site_panels
            target.setdefault(tag, {})[source] = points
    order = {t: i for i, t in enumerate(GLOBAL_TAGS + SITE_TAGS)}

    def sort(panels):
        return dict(sorted(panels.items(), key=lambda kv: (order.get(kv[0].rsplit("/", 1)[-1], 99), kv[0])))

    out = Path(out)
    files = {}
    if global_panels:
        files["global"] = _plot_panels(
            sort(global_panels), out / "tb_global.png", "global model per round", smooth_weight
        )
    if site_panels:
        files["sites"] = _plot_panels(sort(site_panels), out / "tb_sites.png", "per-site curves", smooth_weight)
    return {"files": files, "scalars": scalars}


def parse_args(argv=None) -> argparse.Namespace:
    parser = ArgumentParser(
        prog="python -m result_stat.plot_tensorboard_events",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--events", default=None, help=f"folder searched for event files (default <project>/{DEFAULT_EVENTS})"
    )
    parser.add_argument("--out", default="results", help="output folder")
    parser.add_argument("--smooth", type=float, default=0.0, help="EMA weight in [0, 1); the FedSM example uses 0.8")
    parser.add_argument(
        "--all-tags", action="store_true", help="draw every scalar tag, not only the job's per-round ones"
    )
    parser.add_argument("--json", action="store_true", help="also print the scalars as JSON")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    result = plot_events(args.events or project_root() / DEFAULT_EVENTS, args.out, args.smooth, args.all_tags)
    for source, tags in result["scalars"].items():
        print(f"{source}: " + ", ".join(f"{tag} ({len(points)} points)" for tag, points in sorted(tags.items())))
    for path in result["files"].values():
        print(f"wrote {path}")
    if args.json:
        print(json.dumps(result["scalars"], indent=1))
    return result


if __name__ == "__main__":
    run_cli(main)
