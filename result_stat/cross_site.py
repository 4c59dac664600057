"""Cross-site table: every model x every site's data, from NVFlare's cross-site evaluation.

    python -m result_stat.cross_site [--run-dir workspace/server/simulate_job] [--out results]

NVFlare's CrossSiteModelEval sends every site's best local model and the server's models
(initial, final and best global) to every site, which scores them on its local validation
split; the server keeps the results in <run dir>/cross_site_val/cross_val_results.json as
{data site: {model: {val_accuracy, val_loss, val_count}}}. This turns that file into a
Markdown table and a heatmap PNG (rows: models, columns: data sites).

A site that died or hung never answers: NVFlare gives up on it after the job's
`submit_model_timeout` / `validation_timeout` and the file simply lacks its scores. The run's
sites (from its global_val.json) still get their row and column, and every score nobody
delivered is marked "missing" in the table and listed under "missing" in cross_site.json.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np

from fedxvit.errors import ArgumentParser, FedXViTError, run_cli
from tooling.jobconfig import default_run_dir, run_sites

CROSS_VAL_FILE = Path("cross_site_val") / "cross_val_results.json"
SERVER_PREFIX = "SRV_"
MISSING = "missing"


def load_cross_site(path: os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FedXViTError(
            f"no cross-site results at {path}: the run has not finished its cross-site evaluation (or pass --run-dir)"
        )
    try:
        results = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise FedXViTError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(results, dict) or not all(isinstance(v, dict) for v in results.values()):
        raise FedXViTError(f"{path} is not a {{data site: {{model: metrics}}}} table")
    return results


def model_label(name: str) -> str:
    """'SRV_FL_global_model.pt' -> 'server: FL_global_model'; a site name stays (its best local model)."""
    if name.startswith(SERVER_PREFIX):
        return "server: " + name[len(SERVER_PREFIX) :].removesuffix(".pt")
    return f"{name} (best local)"


def cross_site_matrix(results: dict, metric: str = "val_accuracy", sites=()) -> dict:
    """{"models", "labels", "data_sites", "values": rows x cols (None where missing), "counts": {site: n},
    "missing": [{"model", "data_site"}, ...]}.

    `sites` are the run's sites: each is a data site and owns a best local model, so a site that
    never answered still gets its column and row, with its cells missing.
    """
    data_sites = sorted(set(results) | set(sites))
    names = sorted(
        {m for per_model in results.values() for m in per_model} | set(sites),
        key=lambda n: (not n.startswith(SERVER_PREFIX), n),
    )
    values = [[results.get(site, {}).get(name, {}).get(metric) for site in data_sites] for name in names]
    counts = {
        site: next((m.get("val_count") for m in results.get(site, {}).values() if "val_count" in m), None)
        for site in data_sites
    }
    missing = [
        {"model": name, "data_site": site}
        for name, row in zip(names, values)
        for site, value in zip(data_sites, row)
        if value is None
    ]
    return {
        "metric": metric,
        "models": names,
        "labels": [model_label(n) for n in names],
        "data_sites": data_sites,
        "values": values,
        "counts": counts,
        "missing": missing,
    }


def matrix_markdown(matrix: dict) -> str:
    sites = matrix["data_sites"]
    head = " | ".join(f"{s} (n={'?' if matrix['counts'][s] is None else matrix['counts'][s]})" for s in sites)
    lines = [f"| model \\ data ({matrix['metric']}) | {head} |", "|---|" + "---:|" * len(sites)]
    for label, row in zip(matrix["labels"], matrix["values"]):
        cells = [
            MISSING if v is None else (f"{100 * v:.1f}%" if "accuracy" in matrix["metric"] else f"{v:.4f}") for v in row
        ]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    if matrix["missing"]:
        lines += [
            "",
            f"{MISSING}: the score never arrived -- the model's owner never submitted it or the data site "
            "never validated it (a dead or hung site, given up on after the job's submit_model_timeout / "
            "validation_timeout).",
        ]
    return "\n".join(lines) + "\n"


def save_heatmap(matrix: dict, path: os.PathLike, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.array([[np.nan if v is None else v for v in row] for row in matrix["values"]], dtype=float)
    fig, ax = plt.subplots(figsize=(2.6 + 1.3 * len(matrix["data_sites"]), 0.8 + 0.5 * len(matrix["labels"])))
    image = ax.imshow(
        data,
        cmap="viridis",
        aspect="auto",
        vmin=np.nanmin(data) if np.isfinite(data).any() else 0,
        vmax=np.nanmax(data) if np.isfinite(data).any() else 1,
    )
    ax.set_xticks(range(len(matrix["data_sites"])), matrix["data_sites"])
    ax.set_yticks(range(len(matrix["labels"])), matrix["labels"])
    ax.set_xlabel("data site (validation split)")
    for (r, c), v in np.ndenumerate(data):
        if np.isfinite(v):
            ax.text(c, r, f"{v:.3f}", ha="center", va="center", color="w" if v < np.nanmean(data) else "k", fontsize=8)
        else:
            ax.text(c, r, MISSING, ha="center", va="center", color="r", fontsize=8)
    fig.colorbar(image, ax=ax, label=matrix["metric"])
    ax.set_title(title or f"cross-site {matrix['metric']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_cross_site(run_dir: os.PathLike | None, out: os.PathLike) -> dict:
    """cross_site.md/.json and cross_site_accuracy.png; returns the accuracy matrix."""
    run_dir = Path(run_dir) if run_dir else default_run_dir()
    results = load_cross_site(run_dir / CROSS_VAL_FILE)
    sites = run_sites(run_dir)  # every site of the run, also one that never answered the cross-site tasks
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    accuracy, loss = cross_site_matrix(results, "val_accuracy", sites), cross_site_matrix(results, "val_loss", sites)
    save_heatmap(accuracy, out / "cross_site_accuracy.png")
    (out / "cross_site.json").write_text(
        json.dumps({"val_accuracy": accuracy, "val_loss": loss, "missing": accuracy["missing"]}, indent=2) + "\n"
    )
    (out / "cross_site.md").write_text(
        "## Cross-site evaluation\n\nEvery model on every site's validation split "
        "(NVFlare CrossSiteModelEval).\n\n" + matrix_markdown(accuracy) + "\n" + matrix_markdown(loss)
    )
    return accuracy


def parse_args(argv=None) -> argparse.Namespace:
    parser = ArgumentParser(
        prog="python -m result_stat.cross_site",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--run-dir", default=None, help="server run folder (default <project>/workspace/server/simulate_job)"
    )
    parser.add_argument("--out", default="results", help="output folder")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    matrix = write_cross_site(args.run_dir, args.out)
    print(matrix_markdown(matrix))
    return matrix


if __name__ == "__main__":
    run_cli(main)
