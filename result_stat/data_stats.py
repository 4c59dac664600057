"""`make stats`: know the data before training, with NVFlare's federated statistics.

    python -m result_stat.data_stats [--data data] [--sites site1,site2] [--out results/stats]

Runs jobs/fedxvit_stats in NVFlare's simulator over the site folders under --data (each site computes its
images' statistics, fedxvit.site_stats; NVFlare's cleansers withhold what their rules say before anything
leaves; the server adds them up), then writes under --out:
- stats.json: what the server received and computed (NVFlare's output, per site and "Global");
- stats.md: per split, each site's images, label mix, gray-value and image-mean statistics, image size and
  lesion area, and what the cleansers withheld;
- intensity_histograms.png: each site's gray-value distribution (the scanner), training split;
- label_mix.png: each site's share of each class per split.
The same job runs in POC or production (`nvflare job submit`); this tool reads its output either way.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from fedxvit.classes import TASK_CLASSES
from fedxvit.datalist import SPLITS
from fedxvit.errors import ArgumentParser, FedXViTError, run_cli
from tooling.jobconfig import job_copy, job_folder
from tooling.simulation import run_simulator

STATS_JOB = "fedxvit_stats"
OUTPUT = "statistics/image_statistics.json"  # the job's output_path, under the server's run folder
GLOBAL = "Global"  # NVFlare's name for the federation's row


def run_stats_job(data: Path, sites: list, workspace: Path, job: Path | None = None, timeout_s: int = 1800) -> dict:
    """The statistics job in NVFlare's simulator over <data>/<site>; the server's statistics."""
    # every site, so the federation's row is the whole consortium
    copy = job_copy(job or job_folder(STATS_JOB), workspace / "job", server={"min_clients": len(sites)})
    run_dir = run_simulator(copy, workspace / "simulator", data, sites, None, timeout_s, expect=OUTPUT)
    return json.loads((run_dir / OUTPUT).read_text())


def value(stats: dict, feature: str, statistic: str, site: str, split: str):
    """One statistic, or None where the site's cleansers withheld it (or it was not computed)."""
    return stats.get(feature, {}).get(statistic, {}).get(site, {}).get(split)


def sites_of(stats: dict) -> list:
    """The sites in the server's output, in natural order (site2 before site10)."""
    sites = [site for site in stats.get("label", {}).get("count", {}) if site != GLOBAL]
    return sorted(sites, key=lambda s: [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", s)])


def class_counts(stats: dict, site: str, split: str) -> list | None:
    bins = value(stats, "label", "histogram", site, split)
    return None if bins is None else [int(b[2]) for b in bins]


def withheld(stats: dict, site: str, split: str) -> dict:
    """feature -> the statistics the site's cleansers held back, for a split the site has (its counts always
    arrive)."""
    asked = sorted({statistic for feature in stats.values() for statistic in feature} - {"count"})
    held = {}
    for feature in stats:
        if value(stats, feature, "count", site, split):
            missing = [statistic for statistic in asked if value(stats, feature, statistic, site, split) is None]
            if missing:
                held[feature] = "all but the count" if len(missing) == len(asked) else ", ".join(missing)
    return held


def _fmt(number, digits: int = 1) -> str:
    return "withheld" if number is None else f"{number:.{digits}f}"


def mean_sd(stats: dict, feature: str, site: str, split: str, digits: int) -> str:
    mean, sd = value(stats, feature, "mean", site, split), value(stats, feature, "stddev", site, split)
    return "withheld" if mean is None else f"{mean:.{digits}f} ± {_fmt(sd, digits)}"


def markdown(stats: dict, class_names=TASK_CLASSES) -> str:
    sites = sites_of(stats)
    lines = [
        "# Site statistics (NVFlare federated statistics)\n",
        "Computed at each site by `jobs/fedxvit_stats`; only these aggregates left the sites, after NVFlare's "
        "statistics cleansers (a statistic of fewer than `min_count` values, a histogram with as many bins as "
        "`max_bins_percent` of its values, and exact minima/maxima are withheld or noised). Gray values are 0-255 "
        f"as decoded, before any scaling. The `{GLOBAL}` row adds the sites that sent each statistic.\n",
    ]
    for split in SPLITS:
        rows = [site for site in [*sites, GLOBAL] if value(stats, "label", "count", site, split) is not None]
        if not rows:
            continue
        lines += [
            f"## {split}\n",
            "| site | images | " + " | ".join(class_names) + f" | {class_names[-1]} share | gray value mean ± sd | "
            "image mean ± sd | lesion area mean ± sd (masks) |",
            "|---|---:|" + "---:|" * len(class_names) + "---:|---:|---:|---:|",
        ]
        for site in rows:
            counts = class_counts(stats, site, split)
            mix = ["withheld"] * len(class_names) if counts is None else [str(c) for c in counts]
            cells = [
                mean_sd(stats, feature, site, split, d)
                for feature, d in (("intensity", 1), ("mean_intensity", 1), ("lesion_area", 3))
            ]
            masks = value(stats, "lesion_area", "count", site, split)
            cells[2] = f"{cells[2]} ({masks})" if masks else "no masks"
            share = value(stats, "label", "mean", site, split)  # of a 0/1 label: the share of class 1
            share = _fmt(None if share is None else 100 * share) + ("%" if share is not None else "")
            lines.append(
                f"| {site} | {value(stats, 'label', 'count', site, split)} | " + " | ".join(mix) + f" | {share} | "
                f"{' | '.join(cells)} |"
            )
        lines.append("")
        for site in sites:
            held = withheld(stats, site, split)
            if held:
                lines.append(f"- {site} withheld: " + "; ".join(f"{f} ({what})" for f, what in held.items()))
        lines.append("")
    return "\n".join(lines)


def plot(stats: dict, out: Path, class_names=TASK_CLASSES) -> list:
    """The two figures; the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sites = sites_of(stats)
    written = []
    fig, ax = plt.subplots(figsize=(7, 4))
    for site in sites:
        bins = value(stats, "intensity", "histogram", site, "training")
        if bins is None:
            continue
        total = sum(b[2] for b in bins) or 1
        shares = [b[2] / total for b in bins]
        ax.step([b[0] for b in bins] + [bins[-1][1]], shares + shares[-1:], where="post", label=site)
    ax.set(
        xlabel="gray value (0-255, as decoded)", ylabel="share of the site's pixels (log)", xlim=(0, 256), yscale="log"
    )
    ax.set_title("Gray values per site (training split)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    written.append(out / "intensity_histograms.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)

    splits = [s for s in SPLITS if any(value(stats, "label", "count", site, s) for site in sites)]
    fig, axes = plt.subplots(1, len(splits), figsize=(4 * len(splits), 3.5), squeeze=False, sharey=True)
    for ax, split in zip(axes[0], splits):
        bottom = [0.0] * len(sites)
        for k, name in enumerate(class_names):
            shares = []
            for site in sites:
                counts = class_counts(stats, site, split)
                shares.append(counts[k] / (sum(counts) or 1) if counts else 0.0)
            ax.bar(sites, shares, bottom=bottom, label=name)
            bottom = [b + s for b, s in zip(bottom, shares)]
        for i, site in enumerate(sites):
            if class_counts(stats, site, split) is None:
                ax.text(i, 0.5, "withheld", rotation=90, ha="center", va="center", fontsize=8)
        ax.set(title=split, ylim=(0, 1))
        ax.tick_params(axis="x", rotation=45)
    axes[0][0].set_ylabel("share of the split's images")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    written.append(out / "label_mix.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)
    return written


def write_report(stats: dict, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / "stats.json").write_text(json.dumps(stats, indent=2))
    (out / "stats.md").write_text(markdown(stats))
    plot(stats, out)
    return out / "stats.md"


def main(argv=None) -> None:
    from data_preparation.calibrate import site_dirs

    parser = ArgumentParser(prog="python -m result_stat.data_stats", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("data"), help="folder of site folders (default: data)")
    parser.add_argument("--sites", help="comma-separated site folders under --data (default: every siteN there)")
    parser.add_argument("--out", type=Path, default=Path("results/stats"), help="default: results/stats")
    parser.add_argument("--workspace", type=Path, default=Path("workspace/stats"), help="default: workspace/stats")
    args = parser.parse_args(argv)
    if args.sites:
        sites = [s.strip() for s in args.sites.split(",") if s.strip()]
        missing = [s for s in sites if not (args.data / s).is_dir()]
        if missing:
            raise FedXViTError(f"--sites: no folder {args.data / missing[0]}")
    else:
        sites = [d.name for d in site_dirs(args.data)]
    if len(sites) < 2:
        raise FedXViTError(f"--sites: the statistics job needs at least 2 sites, got {sites}")
    start = time.monotonic()
    stats = run_stats_job(args.data.resolve(), sites, args.workspace.resolve())
    report = write_report(stats, args.out)
    print(report.read_text())
    print(f"{report} and figures in {args.out} ({time.monotonic() - start:.0f} s)")


if __name__ == "__main__":
    run_cli(main)
