"""`make results`: every result script with its defaults, then results/summary.json and report.md.

    python -m result_stat.run_all [--run-dir workspace/server/simulate_job] [--out results]

1. test report + "is federation worth it" comparison (result_stat.report; trains the
   centralized and local-only baselines, about as long as the federated run's training);
2. cross-site table (result_stat.cross_site);
3. TensorBoard curves (result_stat.plot_tensorboard_events), when the run wrote events;
4. Grad-CAM panels and their scores against the masks (result_stat.gradcam), plus the
   occlusion and Integrated Gradients checks beside them;
5. summary.json (keys of ../shared/DESIGN.md) and report.md; keys others add (timing_s) are kept;
6. when the job tracked to MLflow, the results folder is attached to the job's server run.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from fedxvit.errors import FedXViTError, run_cli
from fedxvit.paths import project_root

EXPERT_REPORT = Path("models") / "expert_report.json"
OWN_KEYS = ("expert", "federated", "xai", "comparison", "cross_site")


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def expert_summary(path: Path) -> dict | None:
    """test_accuracy, test_loss, per_class of the Phase-1 expert (models/expert_report.json)."""
    report = _read_json(path)
    if not isinstance(report, dict):
        return None
    per_class = {k: v for k, v in (report.get("per_class") or {}).items() if k != "confusion_matrix"}
    return {"test_accuracy": report.get("test_accuracy"), "test_loss": report.get("test_loss"), "per_class": per_class,
            "confusion_matrix": (report.get("per_class") or {}).get("confusion_matrix", report.get("confusion_matrix"))}


def round_rows(run_dir: Path) -> list[dict]:
    """Per-round global validation from <run dir>/global_val.json (fedxvit.widgets)."""
    table = _read_json(run_dir / "global_val.json") or {}
    return [{"round": r["round"], "global_val_accuracy": r["global_val_accuracy"], "global_val_loss": r["global_val_loss"]}
            for r in table.get("rounds", []) if {"round", "global_val_accuracy", "global_val_loss"} <= r.keys()]


def federated_summary(report: dict, rounds: list[dict]) -> dict:
    final, best = report["models"]["final"], report["models"]["best"]
    per_site = {site: {"test_accuracy": m["accuracy"], "test_loss": m["loss"], "roc_auc": m["roc_auc"], "count": m["count"]}
                for site, m in final.items() if site not in ("combined", "_raw")}
    return {"rounds": rounds, "final_test_accuracy": final["combined"]["accuracy"],
            "final_test_loss": final["combined"]["loss"], "final_test_roc_auc": final["combined"]["roc_auc"],
            "best_test_accuracy": best["combined"]["accuracy"], "best_test_loss": best["combined"]["loss"],
            "per_class": final["combined"]["per_class"], "confusion_matrix": final["combined"]["confusion_matrix"],
            "per_site": per_site}


def xai_summary(gradcam: dict, checks: dict) -> dict:
    """Grad-CAM's scores at the top level (DESIGN.md keys), each check (occlusion, ...) under its name."""
    per_site = {site: {**r["gradcam"], "baselines": r["baselines"], "mask_fraction": r["mask_fraction"]}
                for site, r in gradcam["per_site"].items()}
    summary = {"method": gradcam["description"], "pointing_game": gradcam["pointing_game"],
               "energy_in_mask": gradcam["energy_in_mask"], "n": gradcam["n"], "dilation_px": gradcam["dilation_px"],
               "baselines": gradcam["baselines"], "per_site": per_site}
    for name, check in checks.items():
        summary[name] = {"method": check["description"], "pointing_game": check["pointing_game"],
                         "energy_in_mask": check["energy_in_mask"], "n": check["n"],
                         "per_site": {s: r["gradcam"] for s, r in check["per_site"].items()}}
    return summary


def write_summary(out: Path, parts: dict) -> dict:
    """Merge our keys into summary.json, keeping keys written by others (timing_s, peak_rss_mb)."""
    path = out / "summary.json"
    summary = _read_json(path) if path.is_file() else None
    summary = summary if isinstance(summary, dict) else {}
    for key in OWN_KEYS:
        summary.pop(key, None)
    summary.update({k: v for k, v in parts.items() if v is not None})
    path.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def attach_to_mlflow(out: Path, run_dir: Path, uri: str | None = None) -> str:
    """Attach the results folder (under `results/`) to the job's server run, found through the run record
    the job's tracking wrote into its run folder (fedxvit.run_record); returns what happened."""
    from fedxvit.run_record import record_run

    try:
        return "; ".join(record_run(run_dir, uri, results=out))
    except FedXViTError as exc:
        return f"not attached to MLflow: {exc}"
    except Exception as exc:  # a store that cannot be read must not cost the results themselves
        return f"not attached to MLflow: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def report_markdown(summary: dict, parts_md: list[str], tb_files: dict) -> str:
    lines = ["# fedxvit results\n"]
    expert = summary.get("expert")
    if expert:
        lines.append(f"**Phase 1 expert** (4 classes): test accuracy {_pct(expert['test_accuracy'])}, "
                     f"loss {expert['test_loss']:.4f}.\n")
    federated = summary["federated"]
    if federated["rounds"]:
        lines += ["## Federated rounds\n", "Global model scored on all sites' validation data at the start of each round "
                  "(round r scores the model of round r-1).\n", "| round | global_val_accuracy | global_val_loss |",
                  "|---:|---:|---:|"]
        lines += [f"| {r['round']} | {r['global_val_accuracy']:.4f} | {r['global_val_loss']:.4f} |" for r in federated["rounds"]]
        lines.append("")
    for name, path in tb_files.items():
        lines.append(f"![TensorBoard {name} curves]({Path(path).name})\n")
    lines += [*parts_md, "![confusion matrix, final global model](confusion_matrix_final.png) "
              "![ROC](roc_curve.png) ![cross-site accuracy](cross_site_accuracy.png)\n"]
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m result_stat.run_all", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--run-dir", default=None, help="server run folder (default <project>/workspace/server/simulate_job)")
    parser.add_argument("--out", default="results", help="results folder")
    parser.add_argument("--initial", default=None, help="transplanted start checkpoint (default: the job's, "
                        "$FEDXVIT_INITIAL_MODEL else <project>/models/initial_global.pt)")
    parser.add_argument("--n", type=int, default=25, help="Grad-CAM: tumor test images per site")
    parser.add_argument("--seed", type=int, default=0, help="Grad-CAM image choice and random baseline")
    parser.add_argument("--smooth", type=float, default=0.8, help="TensorBoard curves: EMA weight (0 = raw)")
    parser.add_argument("--no-baselines", action="store_true", help="skip training the centralized and local-only models")
    parser.add_argument("--no-occlusion", action="store_true", help="skip the occlusion check beside Grad-CAM")
    parser.add_argument("--no-ig", action="store_true", help="skip the Integrated Gradients check beside Grad-CAM")
    parser.add_argument("--mlflow", choices=("auto", "off"), default="auto",
                        help="auto: attach the results to the job's MLflow run when one is found")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    from fedxvit.sites import site_data_dir
    from result_stat import cross_site, gradcam, plot_tensorboard_events, report

    args = parse_args(argv)
    started = time.perf_counter()
    run_dir = Path(args.run_dir) if args.run_dir else report.default_run_dir()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    print("== test report and baselines", flush=True)
    test_report = report.build_report(run_dir, initial=args.initial, device=args.device,
                                      baselines=not args.no_baselines)
    report.write_report(test_report, out)
    parts_md = [(out / "test_report.md").read_text().replace("# Test report\n", "## Test report\n", 1)]

    print("== cross-site table", flush=True)
    cross = None
    try:
        cross = cross_site.write_cross_site(run_dir, out)
        parts_md.append((out / "cross_site.md").read_text())
    except FedXViTError as exc:
        print(f"skipped: {exc}")

    print("== TensorBoard curves", flush=True)
    tb_files = {}
    try:
        tb_files = plot_tensorboard_events.plot_events(run_dir / "tb_events", out, args.smooth)["files"]
    except FedXViTError as exc:
        print(f"skipped: {exc}")

    print("== Grad-CAM", flush=True)
    model = gradcam.load_run_model(run_dir, "final", args.device)
    sites = {s: site_data_dir(s) for s in test_report["sites"]}
    cams = gradcam.explain_sites(model, sites, out, n=args.n, seed=args.seed, device=args.device)
    parts_md.append(gradcam.gradcam_markdown(cams))
    checks = {}
    for method, skip in (("occlusion", args.no_occlusion), ("integrated_gradients", args.no_ig)):
        if not skip:
            checks[method] = gradcam.explain_sites(model, sites, out, n=args.n, seed=args.seed, device=args.device,
                                                   method=method)
            parts_md.append(gradcam.gradcam_markdown(checks[method]))

    rounds = round_rows(run_dir)
    summary = write_summary(out, {
        "expert": expert_summary(project_root() / EXPERT_REPORT),
        "federated": federated_summary(test_report, rounds),
        "xai": xai_summary(cams, checks),
        "comparison": test_report["comparison"],
        "cross_site": cross,
    })
    (out / "report.md").write_text(report_markdown(summary, parts_md, tb_files))
    if args.mlflow == "auto":
        print(attach_to_mlflow(out, run_dir))
    print(report.comparison_markdown(test_report["comparison"], test_report["sites"]))
    print(f"Grad-CAM pointing game {_pct(cams['pointing_game'])} (random map {_pct(cams['baselines']['random']['pointing_game'])}, "
          f"image intensity {_pct(cams['baselines']['intensity']['pointing_game'])}, "
          f"ideal 16-px cell map {_pct(cams['baselines']['mask_cells']['pointing_game'])})"
          + "".join(f"; {name} {_pct(check['pointing_game'])}" for name, check in checks.items()))
    print(f"wrote {out}/summary.json and {out}/report.md in {time.perf_counter() - started:.0f} s")
    return summary


if __name__ == "__main__":
    run_cli(main)
