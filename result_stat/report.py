"""Test report of a finished federated run, plus the "is federation worth it" comparison.

    python -m result_stat.report [--run-dir workspace/server/simulate_job] [--out results]

Scores the final and the best global model (NVFlare's PTFileModelPersistor files in
<run dir>/app_server/) on every site's test split and on all of them pooled: accuracy, loss,
scikit-learn per-class report, confusion matrix (PNG), ROC-AUC. Then scores, on the same
pooled test set, the transplanted start (models/initial_global.pt) and the baselines that
`make baselines` (tooling.baselines) trained with the run's own settings: a centralized model
on the pooled site training data and one local-only model per site. Nothing is trained here.
A Ditto run adds its sites' personalized models (each on its own test split); a FedSM run
(jobs/fedxvit_fedsm) adds its super-model: the selector routes each image to a
personalized model or the global model, with the threshold chosen on the sites' validation splits.
Writes test_report.json and test_report.md (+ PNGs) into --out.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import torch

from fedxvit.checkpoint import build_model_from_checkpoint, load_global_model
from fedxvit.classes import TASK_CLASSES
from fedxvit.data import make_loader
from fedxvit.errors import ArgumentParser, FedXViTError, run_cli
from fedxvit.model import build_model
from fedxvit.paths import project_root
from fedxvit.sites import site_data_dir
from fedxvit.training import evaluate, resolve_device
from result_stat.metrics import (
    classification_metrics,
    confusion_markdown,
    per_class_markdown,
    save_confusion_png,
    save_roc_png,
)
from tooling.baselines import DEFAULT_OUT as DEFAULT_BASELINES
from tooling.baselines import read_baselines
from tooling.jobconfig import DEFAULT_RUN_DIR, default_run_dir, read_job_settings, run_sites

GLOBAL_MODELS = {"final": "FL_global_model.pt", "best": "best_FL_global_model.pt"}
COMBINED = "combined"


def test_loaders(site_dirs: dict, image_size: int, batch_size: int = 32) -> dict:
    """site -> test DataLoader (cached once, reused for every model scored)."""
    return {site: make_loader(d, "testing", image_size, batch_size, train=False) for site, d in site_dirs.items()}


def predict(model: torch.nn.Module, loaders: dict, device: torch.device) -> dict:
    """{site: {"labels", "probs"}} of a model on each site's loader."""
    return {site: evaluate(model, loader, device) for site, loader in loaders.items()}


def score_predictions(predictions: dict, class_names=TASK_CLASSES) -> dict:
    """{site: metrics, ..., "combined": metrics} with labels/probs kept under "_raw" for plots."""
    results, labels_all, probs_all = {}, [], []
    for site, out in predictions.items():
        results[site] = classification_metrics(out["labels"], out["probs"], class_names)
        labels_all += list(out["labels"])
        probs_all += list(out["probs"])
    results[COMBINED] = classification_metrics(labels_all, probs_all, class_names)
    results["_raw"] = {"labels": labels_all, "probs": probs_all}
    return results


def score_model(model: torch.nn.Module, loaders: dict, device: torch.device, class_names=TASK_CLASSES) -> dict:
    return score_predictions(predict(model, loaders, device), class_names)


def fedsm_row(run_dir: Path, dirs: dict, image_size: int, test: dict, preset: str, device: torch.device) -> dict | None:
    """The comparison row of a FedSM run's super-model (fedxvit.fedsm.super_model: the routing threshold chosen
    on the sites' validation splits, pooled balanced accuracy), or None for a run of another algorithm."""
    from fedxvit.fedsm import MODELS_FILE, load_fedsm_models, super_model
    from result_stat.comparison.scores import PRIMARY_METRIC, score_sites

    path = run_dir / "app_server" / MODELS_FILE
    if not path.is_file():
        return None
    global_model = load_global_model(run_dir / "app_server" / GLOBAL_MODELS["final"], preset, device=device)
    models = load_fedsm_models(path, global_model, preset, device)
    loaders = {
        "test": test,
        "validation": {s: make_loader(d, "validation", image_size, 32, train=False) for s, d in dirs.items()},
    }
    chosen = super_model(
        models,
        global_model,
        lambda model, split: predict(model, loaders[split], device),
        lambda p: score_sites(p)["pooled"][PRIMARY_METRIC],
    )
    routes = chosen["routes"]
    return _summary_row(
        f"FedSM super-model (threshold {chosen['threshold']:g} chosen on validation; routes: "
        f"{routes['own_site']:.0%} own site, {routes['other_site']:.0%} other site, {routes['global']:.0%} global; "
        f"selector identifies the site of {chosen['selector_test_accuracy']:.0%} of test images)",
        score_predictions(chosen["test"]),
        train_images=None,
    )


def ditto_row(run_dir: Path, test: dict, preset: str, device: torch.device) -> dict | None:
    """The comparison row of a Ditto run's personalized models: each site's own model on its own test split
    (the global model where a site kept none), or None for a run of another algorithm."""
    from result_stat.comparison.runs import personalized_models

    personal = personalized_models(run_dir.parent.parent, list(test), preset, device)
    if not personal:
        return None
    final = load_global_model(run_dir / "app_server" / GLOBAL_MODELS["final"], preset, device=device)
    predictions = {site: predict(personal[site] or final, {site: test[site]}, device)[site] for site in test}
    missing = [site for site, model in personal.items() if model is None]
    return _summary_row(
        "Ditto personalized models (each site's own, on its own test split"
        + (f"; {', '.join(missing)} kept none: global model" if missing else "")
        + ")",
        score_predictions(predictions),
        train_images=None,
    )


def _summary_row(name: str, scores: dict, **extra) -> dict:
    combined = scores[COMBINED]
    per_site = {s: m["accuracy"] for s, m in scores.items() if s not in (COMBINED, "_raw")}
    return {
        "model": name,
        "test_accuracy": combined["accuracy"],
        "test_loss": combined["loss"],
        "roc_auc": combined["roc_auc"],
        "per_site_accuracy": per_site,
        **extra,
    }


def baseline_rows(
    baselines_dir: os.PathLike, settings: dict, sites: list[str], loaders: dict, device: torch.device
) -> list[dict]:
    """Comparison rows of the models `make baselines` trained, refusing ones trained for another run."""
    baselines_dir = Path(baselines_dir)
    record = read_baselines(baselines_dir)
    trained_for = record.get("fingerprint", {}).get("settings")
    if trained_for != settings or sorted(record.get("sites", [])) != sorted(sites):
        raise FedXViTError(
            f"the baselines in {baselines_dir} were trained for other settings or sites than this run "
            f"(theirs: {trained_for}, sites {record.get('sites')}): run `make baselines` again"
        )
    rows = []
    for entry in record["models"]:
        model, _ = build_model_from_checkpoint(
            baselines_dir / entry["checkpoint"], preset=settings["preset"], num_classes=len(TASK_CLASSES), device=device
        )
        rows.append(
            _summary_row(
                entry["model"],
                score_model(model.eval(), loaders, device),
                train_images=entry["train_images"],
                train_wall_s=entry["train_wall_s"],
                epochs=entry["epochs"],
            )
        )
    return rows


def build_report(
    run_dir: os.PathLike | None = None,
    sites: list[str] | None = None,
    initial: os.PathLike | None = None,
    baselines: os.PathLike | bool | None = None,
    device: str | None = None,
) -> dict:
    """Everything the report shows, as one JSON-able dict (plus "_raw" predictions for the plots).

    `baselines`: the folder `make baselines` wrote (default <project>/models/baselines); False skips them."""
    run_dir = Path(run_dir) if run_dir else default_run_dir()
    if not run_dir.is_dir():
        raise FedXViTError(f"run folder {run_dir} does not exist: run `make simulate` first (or pass --run-dir)")
    settings = read_job_settings(run_dir).as_dict()
    preset = settings["preset"]
    torch_device = resolve_device(device)
    sites = sites or run_sites(run_dir)
    dirs = {site: site_data_dir(site) for site in sites}
    probe = build_model(preset, num_classes=len(TASK_CLASSES))
    loaders = test_loaders(dirs, probe.preset.image_size)

    report = {
        "run_dir": str(run_dir),
        "sites": sites,
        "class_names": list(TASK_CLASSES),
        "settings": settings,
        "models": {},
        "comparison": [],
    }
    for key, file_name in GLOBAL_MODELS.items():
        model = load_global_model(run_dir / "app_server" / file_name, preset, device=torch_device)
        report["models"][key] = score_model(model, loaders, torch_device)

    if not initial:
        from fedxvit.persistor import (
            resolve_initial_model,
        )  # the job's own lookup: $FEDXVIT_INITIAL_MODEL, else models/

        initial = resolve_initial_model()
    initial = Path(initial)
    initial_model, _ = build_model_from_checkpoint(
        initial, preset=preset, num_classes=len(TASK_CLASSES), device=torch_device
    )
    rows = [
        _summary_row(f"transplanted start ({initial.stem})", score_model(initial_model, loaders, torch_device)),
        _summary_row("federated, final global model", report["models"]["final"], train_images=None),
        _summary_row("federated, best global model", report["models"]["best"], train_images=None),
    ]
    fedsm = fedsm_row(run_dir, dirs, probe.preset.image_size, loaders, preset, torch_device)
    if fedsm is not None:  # a FedSM run: its super-model beside its global model
        rows.append(fedsm)
    ditto = ditto_row(run_dir, loaders, preset, torch_device)
    if ditto is not None:  # a Ditto run: the sites' personalized models beside the global model
        rows.append(ditto)
    if baselines is not False:
        baselines_dir = Path(baselines) if baselines not in (None, True) else project_root() / DEFAULT_BASELINES
        rows += baseline_rows(baselines_dir, settings, sites, loaders, torch_device)
    report["comparison"] = rows
    return report


def _pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def report_markdown(report: dict) -> str:
    """The human face of test_report.json."""
    names = report["class_names"]
    lines = [
        "# Test report\n",
        f"Run: `{report['run_dir']}`; settings: " + ", ".join(f"{k}={v}" for k, v in report["settings"].items()) + "\n",
    ]
    for key, scores in report["models"].items():
        combined = scores[COMBINED]
        lines += [
            f"## {key.capitalize()} global model\n",
            f"Combined test set ({combined['count']} images): accuracy **{_pct(combined['accuracy'])}**, "
            f"loss {combined['loss']:.4f}, "
            f"ROC-AUC {combined['roc_auc'] if combined['roc_auc'] is None else round(combined['roc_auc'], 4)}\n",
            per_class_markdown(combined["per_class"], names),
            confusion_markdown(combined["confusion_matrix"], names),
            "| site | test images | accuracy | loss | ROC-AUC |",
            "|---|---:|---:|---:|---:|",
        ]
        for site, m in scores.items():
            if site not in (COMBINED, "_raw"):
                auc = "n/a" if m["roc_auc"] is None else f"{m['roc_auc']:.4f}"
                lines.append(f"| {site} | {m['count']} | {_pct(m['accuracy'])} | {m['loss']:.4f} | {auc} |")
        lines.append("")
    lines += comparison_markdown(report["comparison"], report["sites"]).splitlines()
    return "\n".join(lines) + "\n"


def comparison_markdown(rows: list[dict], sites: list[str]) -> str:
    """Is federation worth it? Every model on the same pooled test set."""
    lines = [
        "## Is federation worth it?\n",
        "Every model scored on the same pooled test set of all sites.\n",
        "| model | test accuracy | test loss | ROC-AUC | " + " | ".join(sites) + " | training images |",
        "|---|---:|---:|---:|" + "---:|" * len(sites) + "---:|",
    ]
    for row in rows:
        auc = "n/a" if row.get("roc_auc") is None else f"{row['roc_auc']:.4f}"
        per_site = " | ".join(_pct(row["per_site_accuracy"].get(s)) for s in sites)
        images = row.get("train_images")
        lines.append(
            f"| {row['model']} | {_pct(row['test_accuracy'])} | {row['test_loss']:.4f} | {auc} | {per_site} | "
            f"{'—' if images is None else images} |"
        )
    return "\n".join(lines) + "\n"


def write_report(report: dict, out: os.PathLike) -> dict:
    """test_report.json/.md, a confusion matrix PNG per global model and one ROC PNG; returns the file paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = report["class_names"]
    files = {}
    curves = {}
    for key, scores in report["models"].items():
        files[f"confusion_{key}"] = save_confusion_png(
            scores[COMBINED]["confusion_matrix"],
            names,
            out / f"confusion_matrix_{key}.png",
            f"{key} global model, all sites' test data",
        )
        raw = scores["_raw"]
        curves[f"{key} global"] = (raw["labels"], np.asarray(raw["probs"])[:, 1])
    files["roc"] = save_roc_png(curves, out / "roc_curve.png", "Tumor vs Healthy, pooled test set")
    clean = {**report, "models": {k: {s: m for s, m in v.items() if s != "_raw"} for k, v in report["models"].items()}}
    (out / "test_report.json").write_text(json.dumps(clean, indent=2) + "\n")
    (out / "test_report.md").write_text(report_markdown(report))
    files.update(json=out / "test_report.json", markdown=out / "test_report.md")
    return files


def parse_args(argv=None) -> argparse.Namespace:
    parser = ArgumentParser(
        prog="python -m result_stat.report",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--run-dir", default=None, help=f"server run folder of the job (default <project>/{DEFAULT_RUN_DIR})"
    )
    parser.add_argument("--sites", nargs="+", default=None, help="sites to score (default: the run's sites)")
    parser.add_argument(
        "--initial",
        default=None,
        help="transplanted start checkpoint (default: the job's, "
        "$FEDXVIT_INITIAL_MODEL else <project>/models/initial_global.pt)",
    )
    parser.add_argument("--out", default="results", help="output folder")
    parser.add_argument(
        "--baselines",
        default=None,
        help=f"folder `make baselines` wrote (default <project>/{DEFAULT_BASELINES.as_posix()})",
    )
    parser.add_argument("--no-baselines", action="store_true", help="leave the centralized and local-only models out")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    report = build_report(
        args.run_dir,
        args.sites,
        args.initial,
        device=args.device,
        baselines=False if args.no_baselines else args.baselines,
    )
    files = write_report(report, args.out)
    print(comparison_markdown(report["comparison"], report["sites"]))
    print(f"wrote {files['markdown']} and {files['json']}")
    return report


if __name__ == "__main__":
    run_cli(main)
