"""Results where the data lives: a site scores a model on its own test split and returns only aggregates; the
server adds them up into the consortium's report (jobs/fedxvit_evaluate).

A site sends, per model: the confusion counts (true x predicted class), and per class the histograms of that
class's probability over the images that are and are not of it (enough for ROC-AUC to the bins' resolution);
with `explain_images`, per explanation method the pointing-game hits, images and summed energy in the mask over
its masked tumor test images (fedxvit.explain);
on request, bootstrap replicates of its confusion counts, resampled within each class with a seed the server
sends, the same resample for every model (so two models can be compared pairwise without pooling predictions).
No image, mask, file name or per-image value leaves. The server's NVFlare GlobalModelEval sends each model;
`ConsortiumReport` collects the answers and writes evaluation.json / evaluation.md into the run folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.filter import Filter
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.abstract.model_locator import ModelLocator
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.app_event_type import AppEventType
from nvflare.widgets.widget import Widget

from fedxvit.checkpoint import read_global_state
from fedxvit.errors import FedXViTError
from fedxvit.paths import job_path
from fedxvit.protocol import REPLICATES_HEADER, SCORE_BINS, SEED_HEADER

REPORT_DIR = "evaluation"
SERVER_MODEL_PREFIX = "SRV_"  # what NVFlare's CrossSiteModelEval puts before the server's model names


def auc_from_histograms(positive, negative) -> float | None:
    """ROC-AUC from the two probability histograms: P(score of a positive > a negative's), ties (same bin)
    counted half; None without both kinds of image."""
    positive, negative = np.asarray(positive, dtype=float), np.asarray(negative, dtype=float)
    if not positive.sum() or not negative.sum():
        return None
    below = np.concatenate([[0.0], np.cumsum(negative)[:-1]])  # negatives in lower bins
    return float((positive * (below + negative / 2)).sum() / (positive.sum() * negative.sum()))


def scores(matrix) -> dict:
    matrix = np.asarray(matrix, dtype=float)
    n, per_class = matrix.sum(), matrix.sum(1)
    recall = np.divide(np.diag(matrix), per_class, out=np.zeros(len(matrix)), where=per_class > 0)
    present = per_class > 0
    return {
        "n": int(n),
        "accuracy": float(np.trace(matrix) / n) if n else None,
        "balanced_accuracy": float(recall[present].mean()) if present.any() else None,
        "recall": recall.tolist(),
    }


def consortium_report(results: dict) -> dict:
    """{site: {model: site_aggregates (+ replicates)}} -> per model: pooled scores, ROC-AUC per class, each
    hospital's scores, the mean of hospitals, and the pooled bootstrap replicates' balanced accuracies."""
    models = sorted({model for per_site in results.values() for model in per_site})
    report = {}
    for model in models:
        answers = {site: per_site[model] for site, per_site in sorted(results.items()) if per_site.get(model)}
        if not answers:
            continue
        names = next(iter(answers.values()))["class_names"]
        pooled = np.sum([np.asarray(a["confusion"]) for a in answers.values()], axis=0)
        auc = {}
        for name in names:
            positive = np.sum([a["score_histograms"][name]["positive"] for a in answers.values()], axis=0)
            negative = np.sum([a["score_histograms"][name]["negative"] for a in answers.values()], axis=0)
            auc[name] = auc_from_histograms(positive, negative)
        hospitals = {site: scores(a["confusion"]) for site, a in answers.items()}
        entry = {
            "class_names": names,
            "sites": sorted(answers),
            "confusion": pooled.tolist(),
            **scores(pooled),
            "roc_auc": auc,
            "hospitals": hospitals,
            "hospital_mean_balanced_accuracy": float(
                np.mean([h["balanced_accuracy"] for h in hospitals.values() if h["balanced_accuracy"] is not None])
            ),
        }
        explained = [a.get("explanations") or {} for a in answers.values()]
        methods = sorted({method for e in explained for method in e})
        if methods:
            entry["explanations"] = {}
            for method in methods:
                n = sum(e[method]["n"] for e in explained if method in e)
                hits = sum(e[method]["hits"] for e in explained if method in e)
                energy = sum(e[method]["energy_sum"] for e in explained if method in e)
                entry["explanations"][method] = {
                    "n": n,
                    "pointing_game": hits / n if n else None,
                    "energy_in_mask": energy / n if n else None,
                }
        draws = [a.get("bootstrap_confusions") for a in answers.values()]
        if all(draws) and len({len(d) for d in draws}) == 1:
            entry["bootstrap_balanced_accuracy"] = [
                scores(np.sum([np.asarray(d[b]) for d in draws], axis=0))["balanced_accuracy"]
                for b in range(len(draws[0]))
            ]
        report[model] = entry
    return report


def report_markdown(report: dict) -> str:
    lines = [
        "# Consortium evaluation (federated)\n",
        "Each hospital scored each model on its own test split and returned counts and histograms only; "
        f"ROC-AUC is computed from {SCORE_BINS}-bin probability histograms.\n",
    ]
    for model, entry in report.items():
        names = entry["class_names"]
        lines += [
            f"## {model}\n",
            f"Pooled over {', '.join(entry['sites'])} ({entry['n']} images): accuracy {entry['accuracy']:.4f}, "
            f"balanced accuracy {entry['balanced_accuracy']:.4f}, mean of hospitals "
            f"{entry['hospital_mean_balanced_accuracy']:.4f}.\n",
            "| class | recall | ROC-AUC |",
            "|---|---:|---:|",
        ]
        for c, name in enumerate(names):
            auc = entry["roc_auc"][name]
            lines.append(f"| {name} | {entry['recall'][c]:.4f} | {'n/a' if auc is None else f'{auc:.4f}'} |")
        lines += ["", "| hospital | images | accuracy | balanced accuracy |", "|---|---:|---:|---:|"]
        for site, h in entry["hospitals"].items():
            balanced = "n/a" if h["balanced_accuracy"] is None else f"{h['balanced_accuracy']:.4f}"
            lines.append(f"| {site} | {h['n']} | {h['accuracy']:.4f} | {balanced} |")
        if entry.get("explanations"):
            lines += ["", "| explanation | tumor images | pointing game | energy in mask |", "|---|---:|---:|---:|"]
            for method, e in entry["explanations"].items():
                if e["n"]:
                    lines.append(f"| {method} | {e['n']} | {e['pointing_game']:.4f} | {e['energy_in_mask']:.4f} |")
        if "bootstrap_balanced_accuracy" in entry:
            draws = np.asarray(entry["bootstrap_balanced_accuracy"])
            low, high = np.percentile(draws, [2.5, 97.5])
            lines.append(f"\nBalanced accuracy 95% bootstrap interval ({len(draws)} draws): [{low:.4f}, {high:.4f}]")
        lines.append("")
    return "\n".join(lines)


class ModelFilesLocator(ModelLocator):
    """The models to evaluate, by name: `models` {name: file}, each inside the server's workspace or a root the
    server allows ($FEDXVIT_ALLOWED_ROOTS), as a job may not make the server read any file."""

    def __init__(self, models: dict):
        super().__init__()
        if not isinstance(models, dict) or not models:
            raise FedXViTError(f"job option models={models!r}: give at least one {{name: model file}}")
        self.models = dict(models)

    def get_model_names(self, fl_ctx: FLContext) -> list:
        return list(self.models)

    def locate_model(self, model_name: str, fl_ctx: FLContext) -> DXO:
        base = fl_ctx.get_engine().get_workspace().get_root_dir()
        path = job_path(f"models.{model_name}", self.models[model_name], base)
        state = read_global_state(path)
        return DXO(data_kind=DataKind.WEIGHTS, data={k: torch.as_tensor(v).cpu().numpy() for k, v in state.items()})


class ConsortiumReport(Widget):
    """Collects every site's aggregates as NVFlare's evaluation workflow receives them and, at the end of the run,
    writes <run>/evaluation/evaluation.json and evaluation.md."""

    def __init__(self):
        super().__init__()
        self.results: dict = {}

    def handle_event(self, event_type: str, fl_ctx: FLContext):
        if event_type == EventType.START_RUN:
            self.results = {}
        elif event_type == AppEventType.VALIDATION_RESULT_RECEIVED:
            site = fl_ctx.get_prop(AppConstants.DATA_CLIENT)
            model = fl_ctx.get_prop(AppConstants.MODEL_OWNER)
            model = model[len(SERVER_MODEL_PREFIX) :] if model.startswith(SERVER_MODEL_PREFIX) else model
            result = fl_ctx.get_prop(AppConstants.VALIDATION_RESULT)
            try:
                dxo = from_shareable(result)
            except Exception:  # an error reply: that site's answer is missing from the report
                return
            if dxo.data_kind == DataKind.METRICS and dxo.data.get("confusion") is not None:
                self.results.setdefault(site, {})[model] = dxo.data
        elif event_type == EventType.END_RUN and self.results:
            run_dir = Path(fl_ctx.get_engine().get_workspace().get_run_dir(fl_ctx.get_job_id()))
            out = run_dir / REPORT_DIR
            out.mkdir(parents=True, exist_ok=True)
            report = consortium_report(self.results)
            (out / "evaluation.json").write_text(json.dumps({"report": report, "sites": self.results}, indent=2))
            (out / "evaluation.md").write_text(report_markdown(report))
            self.log_info(fl_ctx, f"fedxvit: consortium evaluation of {', '.join(report)} in {out}")


class BootstrapRequest(Filter):
    """Server task-data filter on the evaluate task: asks every site for `replicates` bootstrap draws of its
    confusion counts with the server's `seed` (0 replicates: none)."""

    def __init__(self, seed: int = 0, replicates: int = 0):
        super().__init__()
        if isinstance(replicates, bool) or not isinstance(replicates, int) or replicates < 0:
            raise FedXViTError(f"job option bootstrap_replicates={replicates!r}: a whole number >= 0")
        self.seed, self.replicates = int(seed), replicates

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        if self.replicates:
            shareable.set_header(SEED_HEADER, self.seed)
            shareable.set_header(REPLICATES_HEADER, self.replicates)
        return shareable
