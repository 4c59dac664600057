"""`make results`: every result script with its defaults, then results/summary.json and report.md.

    python -m result_stat.run_all [--run-dir workspace/server/simulate_job] [--out results]

Reads what the run and `make baselines` left; trains nothing.
1. test report + "is federation worth it" comparison (result_stat.report; scores the
   centralized and local-only models of `make baselines`);
2. cross-site table (result_stat.cross_site);
3. TensorBoard curves (result_stat.plot_tensorboard_events), when the run wrote events;
4. Grad-CAM panels and their scores against the masks (result_stat.gradcam), plus the design
   card's stride-16 Grad-CAM and the occlusion and Integrated Gradients checks beside them;
5. summary.json (the keys docs/results.md lists, written by result_stat.summary from the files
   above) and report.md;
6. when the job tracked to MLflow, the results folder is attached to the job's server run: its aggregates,
   the per-image parts (overlays of test images, their names and probabilities) only with --upload-per-image.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from fedxvit.errors import ArgumentParser, FedXViTError, run_cli
from result_stat.summary import CHECKS, write_summary


def attach_to_mlflow(out: Path, run_dir: Path, uri: str | None = None, per_image: bool = False) -> str:
    """Attach the results folder (under `results/`) to the job's server run, found through the run record
    the job's tracking wrote into its run folder (fedxvit.run_record); its aggregates only, unless `per_image`
    (the test images' overlays, names and probabilities); returns what happened."""
    from fedxvit.run_record import record_run

    try:
        return "; ".join(record_run(run_dir, uri, results=out, per_image=per_image))
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
        lines.append(
            f"**Phase 1 expert** (4 classes): test accuracy {_pct(expert['test_accuracy'])}, "
            f"loss {expert['test_loss']:.4f}.\n"
        )
    federated = summary["federated"]
    if federated["rounds"]:
        lines += [
            "## Federated rounds\n",
            "Global model scored on all sites' validation data at the start of each round "
            "(round r scores the model of round r-1).\n",
            "| round | global_val_accuracy | global_val_loss |",
            "|---:|---:|---:|",
        ]
        lines += [
            f"| {r['round']} | {r['global_val_accuracy']:.4f} | {r['global_val_loss']:.4f} |"
            for r in federated["rounds"]
        ]
        lines.append("")
    for name, path in tb_files.items():
        lines.append(f"![TensorBoard {name} curves]({Path(path).name})\n")
    lines += [
        *parts_md,
        "![confusion matrix, final global model](confusion_matrix_final.png) "
        "![ROC](roc_curve.png) ![cross-site accuracy](cross_site_accuracy.png)\n",
    ]
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    parser = ArgumentParser(
        prog="python -m result_stat.run_all",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--run-dir", default=None, help="server run folder (default <project>/workspace/server/simulate_job)"
    )
    parser.add_argument("--out", default="results", help="results folder")
    parser.add_argument(
        "--initial",
        default=None,
        help="transplanted start checkpoint (default: the job's, "
        "$FEDXVIT_INITIAL_MODEL else <project>/models/initial_global.pt)",
    )
    parser.add_argument("--n", type=int, default=25, help="Grad-CAM: tumor test images per site")
    parser.add_argument("--seed", type=int, default=0, help="Grad-CAM image choice and random baseline")
    parser.add_argument("--smooth", type=float, default=0.8, help="TensorBoard curves: EMA weight (0 = raw)")
    parser.add_argument(
        "--baselines", default=None, help="folder `make baselines` wrote (default <project>/models/baselines)"
    )
    parser.add_argument("--no-baselines", action="store_true", help="leave the centralized and local-only models out")
    parser.add_argument("--no-occlusion", action="store_true", help="skip the occlusion check beside Grad-CAM")
    parser.add_argument("--no-ig", action="store_true", help="skip the Integrated Gradients check beside Grad-CAM")
    parser.add_argument(
        "--mlflow",
        choices=("auto", "off"),
        default="auto",
        help="auto: attach the results to the job's MLflow run when one is found",
    )
    parser.add_argument(
        "--upload-per-image",
        action="store_true",
        help="attach the per-image parts too (Grad-CAM overlays of test images, image names, probabilities); "
        "default: aggregates only",
    )
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    from fedxvit.sites import site_data_dir
    from result_stat import cross_site, gradcam, plot_tensorboard_events, report
    from tooling.jobconfig import config_dir, default_run_dir

    args = parse_args(argv)
    started = time.perf_counter()
    run_dir = Path(args.run_dir) if args.run_dir else default_run_dir()
    if not run_dir.is_dir():  # checked before anything is written: no empty results folder for a typo
        raise FedXViTError(f"run folder {run_dir} does not exist: run `make simulate` first, or pass --run-dir")
    config_dir(run_dir)  # a finished run's folder, not any folder
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    print("== test report and the baselines' scores", flush=True)
    test_report = report.build_report(
        run_dir, initial=args.initial, device=args.device, baselines=False if args.no_baselines else args.baselines
    )
    report.write_report(test_report, out)
    parts_md = [(out / "test_report.md").read_text().replace("# Test report\n", "## Test report\n", 1)]

    print("== cross-site table", flush=True)
    try:
        cross_site.write_cross_site(run_dir, out)
        parts_md.append((out / "cross_site.md").read_text())
    except FedXViTError as exc:
        print(f"skipped: {exc}")
        (out / "cross_site.json").unlink(missing_ok=True)  # never summarized from an earlier run

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
    skipped = {"occlusion": args.no_occlusion, "integrated_gradients": args.no_ig}
    for method in CHECKS:
        if skipped.get(method):  # a check skipped now must not be summarized from an earlier run's file
            for stale in (out / f"{method}.json", out / f"{method}.md"):
                stale.unlink(missing_ok=True)
            continue
        checks[method] = gradcam.explain_sites(
            model, sites, out, n=args.n, seed=args.seed, device=args.device, method=method
        )
        parts_md.append(gradcam.gradcam_markdown(checks[method]))

    summary = write_summary(out)
    (out / "report.md").write_text(report_markdown(summary, parts_md, tb_files))
    if args.mlflow == "auto":
        print(attach_to_mlflow(out, run_dir, per_image=args.upload_per_image))
    print(report.comparison_markdown(test_report["comparison"], test_report["sites"]))
    print(
        f"Grad-CAM pointing game {_pct(cams['pointing_game'])} "
        f"(random map {_pct(cams['baselines']['random']['pointing_game'])}, "
        f"image intensity {_pct(cams['baselines']['intensity']['pointing_game'])}, "
        f"ideal 16-px cell map {_pct(cams['baselines']['mask_cells']['pointing_game'])})"
        + "".join(f"; {name} {_pct(check['pointing_game'])}" for name, check in checks.items())
    )
    print(f"wrote {out}/summary.json and {out}/report.md in {time.perf_counter() - started:.0f} s")
    return summary


if __name__ == "__main__":
    run_cli(main)
