"""results/summary.json: its one writer, built only from files the earlier steps left.

    python -m result_stat.summary [--results results] [--print]

Reads <results>/test_report.json (required; it names the run folder, whose global_val.json
gives the rounds), cross_site.json, gradcam.json, occlusion.json, integrated_gradients.json,
models/expert_report.json and <results>/timings.json (the demo's per-phase wall time and
peak memory, from bench/timed.py) -- whichever exist. Being a pure function of those files,
it can be rewritten at any time: `make results` writes it, `make demo` rewrites it once the
results phase's own timing is in, then prints the few lines a newcomer reads.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fedxvit.errors import ArgumentParser, FedXViTError, run_cli
from fedxvit.paths import project_root

SUMMARY_FILE = "summary.json"
TIMINGS_FILE = "timings.json"
EXPERT_REPORT = Path("models") / "expert_report.json"
PHASES = ("data", "expert", "transfer", "simulate", "baselines", "results")  # the demo's Make targets, in order
CHECKS = ("gradcam_stride16", "occlusion", "integrated_gradients")  # maps shown beside the Grad-CAM panel


def read_json(path: Path):
    """The file's JSON, or None when it is absent or unreadable (optional parts of the summary)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def expert_summary(path: Path) -> dict | None:
    """test_accuracy, test_loss, per_class of the Phase-1 expert (models/expert_report.json)."""
    report = read_json(path)
    if not isinstance(report, dict):
        return None
    per_class = {k: v for k, v in (report.get("per_class") or {}).items() if k != "confusion_matrix"}
    return {
        "test_accuracy": report.get("test_accuracy"),
        "test_loss": report.get("test_loss"),
        "per_class": per_class,
        "confusion_matrix": (report.get("per_class") or {}).get("confusion_matrix", report.get("confusion_matrix")),
    }


def round_rows(run_dir: Path) -> list[dict]:
    """Per-round global validation from <run dir>/global_val.json (fedxvit.widgets)."""
    table = read_json(Path(run_dir) / "global_val.json") or {}
    return [
        {"round": r["round"], "global_val_accuracy": r["global_val_accuracy"], "global_val_loss": r["global_val_loss"]}
        for r in table.get("rounds", [])
        if {"round", "global_val_accuracy", "global_val_loss"} <= r.keys()
    ]


def federated_summary(report: dict, rounds: list[dict]) -> dict:
    final, best = report["models"]["final"], report["models"]["best"]
    per_site = {
        site: {"test_accuracy": m["accuracy"], "test_loss": m["loss"], "roc_auc": m["roc_auc"], "count": m["count"]}
        for site, m in final.items()
        if site not in ("combined", "_raw")
    }
    return {
        "rounds": rounds,
        "final_test_accuracy": final["combined"]["accuracy"],
        "final_test_loss": final["combined"]["loss"],
        "final_test_roc_auc": final["combined"]["roc_auc"],
        "best_test_accuracy": best["combined"]["accuracy"],
        "best_test_loss": best["combined"]["loss"],
        "per_class": final["combined"]["per_class"],
        "confusion_matrix": final["combined"]["confusion_matrix"],
        "per_site": per_site,
    }


def xai_summary(gradcam: dict, checks: dict) -> dict:
    """Grad-CAM's scores at the top level (keys listed in docs/results.md), each check under its name."""
    per_site = {
        site: {**r["gradcam"], "baselines": r["baselines"], "mask_fraction": r["mask_fraction"]}
        for site, r in gradcam["per_site"].items()
    }
    summary = {
        "method": gradcam["description"],
        "pointing_game": gradcam["pointing_game"],
        "energy_in_mask": gradcam["energy_in_mask"],
        "n": gradcam["n"],
        "dilation_px": gradcam["dilation_px"],
        "baselines": gradcam["baselines"],
        "per_site": per_site,
    }
    for name, check in checks.items():
        summary[name] = {
            "method": check["description"],
            "pointing_game": check["pointing_game"],
            "energy_in_mask": check["energy_in_mask"],
            "n": check["n"],
            "per_site": {s: r["gradcam"] for s, r in check["per_site"].items()},
        }
    return summary


def timing_summary(timings: dict) -> dict:
    """timing_s and peak_rss_mb per phase (in the demo's order) plus total and max."""
    phases = sorted(timings, key=lambda p: (PHASES.index(p) if p in PHASES else len(PHASES), p))
    if not phases:
        return {}
    return {
        "timing_s": {
            **{p: round(timings[p]["wall_s"], 1) for p in phases},
            "total": round(sum(timings[p]["wall_s"] for p in phases), 1),
        },
        "peak_rss_mb": {
            **{p: round(timings[p]["peak_rss_mb"]) for p in phases},
            "max": round(max(timings[p]["peak_rss_mb"] for p in phases)),
        },
    }


def build_summary(results: Path, expert_report: Path | None = None) -> dict:
    """The summary of a results folder, from its files alone."""
    results = Path(results)
    report = read_json(results / "test_report.json")
    if not isinstance(report, dict):
        raise FedXViTError(f"no test report at {results / 'test_report.json'}: run `make results` first")
    summary = {
        "expert": expert_summary(expert_report or project_root() / EXPERT_REPORT),
        "federated": federated_summary(report, round_rows(Path(report["run_dir"]))),
        "comparison": report["comparison"],
        "cross_site": (read_json(results / "cross_site.json") or {}).get("val_accuracy"),
    }
    gradcam = read_json(results / "gradcam.json")
    if gradcam:
        summary["xai"] = xai_summary(
            gradcam, {name: check for name in CHECKS if (check := read_json(results / f"{name}.json"))}
        )
    summary.update(timing_summary(read_json(results / TIMINGS_FILE) or {}))
    return {key: value for key, value in summary.items() if value is not None}


def write_summary(results: Path, expert_report: Path | None = None) -> dict:
    summary = build_summary(results, expert_report)
    (Path(results) / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def format_summary(summary: dict, results_dir) -> str:
    """The few lines a newcomer reads after the demo, from summary.json alone."""
    lines = ["", "=" * 72, "fedxvit demo summary", "=" * 72]
    expert = summary.get("expert") or {}
    if expert:
        lines.append(
            f"Phase 1 expert (4 classes): test accuracy {_pct(expert.get('test_accuracy'))}, "
            f"loss {expert.get('test_loss', float('nan')):.4f}"
        )
    federated = summary.get("federated") or {}
    rounds = federated.get("rounds") or []
    if rounds:
        lines += [
            "",
            "Phase 2 federated rounds (global model scored on all sites' validation data):",
            "  round  global_val_accuracy  global_val_loss",
        ]
        lines += [
            f"  {r['round']:>5}  {r['global_val_accuracy']:>19.4f}  {r['global_val_loss']:>15.4f}" for r in rounds
        ]
    if "final_test_accuracy" in federated:
        lines.append(
            f"\nFinal global model, combined test set: accuracy {_pct(federated['final_test_accuracy'])}, "
            f"loss {federated.get('final_test_loss', float('nan')):.4f}"
        )
        for name, row in (federated.get("per_class") or {}).items():
            if isinstance(row, dict) and "precision" in row and name not in ("macro avg", "weighted avg"):
                lines.append(
                    f"  {name:<10} precision {row['precision']:.4f}  recall {row['recall']:.4f}  "
                    f"f1 {row['f1-score']:.4f}  n={int(row['support'])}"
                )
    comparison = summary.get("comparison") or []
    if comparison:
        lines += ["", "Is federation worth it? (combined test accuracy)"]
        lines += [f"  {row['model']:<34} {_pct(row.get('test_accuracy'))}" for row in comparison]
    xai = summary.get("xai") or {}
    if xai:
        lines.append(
            f"\nPhase 3 Grad-CAM vs tumor masks: pointing game {_pct(xai.get('pointing_game'))}, "
            f"heatmap energy inside the mask {_pct(xai.get('energy_in_mask'))}"
        )
        baselines = xai.get("baselines") or {}  # what the pointing game means on this data
        references = {
            "image intensity": baselines.get("intensity"),
            "ideal 16-px cell map": baselines.get("mask_cells"),
            "design card's stride-16 Grad-CAM": xai.get("gradcam_stride16"),
            "occlusion": xai.get("occlusion"),
            "Integrated Gradients": xai.get("integrated_gradients"),
        }
        shown = [f"{label} {_pct(ref.get('pointing_game'))}" for label, ref in references.items() if ref]
        if shown:
            lines.append("  pointing game for reference: " + ", ".join(shown))
    timing = summary.get("timing_s") or {}
    if timing:
        lines.append(
            "\nWall time: "
            + ", ".join(f"{k} {v:.0f} s" for k, v in timing.items())
            + f"; peak memory {summary.get('peak_rss_mb', {}).get('max', 0) / 1024:.1f} GB"
        )
    lines += [
        "",
        f"Where to look: {results_dir}/report.md and the PNGs beside it",
        "  tensorboard --logdir workspace/server/simulate_job/tb_events",
        f"  mlflow ui --backend-store-uri sqlite:///{project_root()}/mlruns/mlflow.db",
        "",
    ]
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = ArgumentParser(
        prog="python -m result_stat.summary",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--results", default="results", help="results folder of `make results`")
    parser.add_argument("--expert-report", default=None, help=f"default <project>/{EXPERT_REPORT.as_posix()}")
    parser.add_argument(
        "--print", action="store_true", help="print the newcomer's summary (what `make demo` ends with)"
    )
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    summary = write_summary(Path(args.results), Path(args.expert_report) if args.expert_report else None)
    if args.print:
        print(format_summary(summary, args.results))
    else:
        print(f"wrote {Path(args.results) / SUMMARY_FILE}")
    return summary


if __name__ == "__main__":
    run_cli(main)
