"""Results where the data lives: jobs/fedxvit_evaluate in NVFlare's real simulator. Two tiny sites score two
models (a seeded start and its exact opposite) on their own test splits and return counts and histograms only;
the server's consortium report must equal the pooled computation over the same images exactly for counts and
accuracies, and within the histograms' resolution for ROC-AUC."""

import json

import numpy as np
import pytest
import torch
from sklearn.metrics import confusion_matrix, roc_auc_score
from tiny import opposite_model, write_initial_model, write_tiny_site

from fedxvit.classes import TASK_CLASSES
from fedxvit.data import make_loader
from fedxvit.evaluation import auc_from_histograms, consortium_report
from fedxvit.explain import REPORT_METHODS
from fedxvit.model import build_model
from fedxvit.protocol import SCORE_BINS
from fedxvit.site_scores import bootstrap_confusions
from fedxvit.training import evaluate
from result_stat.federated_evaluation import run_evaluation
from result_stat.gradcam import explain_sites

TINY_SITE_SETTINGS = {"preset": "tiny", "batch_size": 4, "torch_threads": 1, "explain_images": 25}
SITES = ("site1", "site2")  # two processes fewer than three: the sums are the same code either way
SENT_KEYS = {"class_names", "confusion", "score_histograms", "bootstrap_confusions", "explanations"}


@pytest.fixture(scope="module")
def evaluation(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    for i, site in enumerate(SITES):
        write_tiny_site(root / "data" / site, test_per_class=4 + 2 * i, seed=i, masks=True)
    start = write_initial_model(root / "models" / "start.pt")
    state = torch.load(start, weights_only=True)
    torch.save({"model": opposite_model(state)}, root / "models" / "opposite.pt")  # NVFlare's persistor format
    models = {"start": start, "opposite": root / "models" / "opposite.pt"}
    folder = run_evaluation(models, root / "data", list(SITES), root / "workspace", client=TINY_SITE_SETTINGS)
    return {
        "root": root,
        "models": models,
        "saved": json.loads((folder / "evaluation.json").read_text()),
        "markdown": (folder / "evaluation.md").read_text(),
    }


def pooled_predictions(root, model_file):
    model = build_model("tiny", len(TASK_CLASSES))
    saved = torch.load(model_file, weights_only=True)
    model.load_state_dict({k: torch.as_tensor(v) for k, v in saved.get("model", saved).items()})
    loader = make_loader([root / "data" / s for s in SITES], "testing", 32, 8, train=False)
    result = evaluate(model, loader, torch.device("cpu"))
    return np.asarray(result["labels"]), np.asarray(result["probs"])


@pytest.mark.slow
def test_the_federated_report_equals_the_pooled_one(evaluation):
    report = evaluation["saved"]["report"]
    assert set(report) == {"start", "opposite"}
    for name, path in evaluation["models"].items():
        labels, probs = pooled_predictions(evaluation["root"], path)
        entry = report[name]
        assert entry["confusion"] == confusion_matrix(labels, probs.argmax(1), labels=[0, 1]).tolist()
        assert entry["n"] == len(labels)
        assert entry["accuracy"] == pytest.approx(float((probs.argmax(1) == labels).mean()), abs=1e-12)
        tumor = probs[:, 1]
        exact = roc_auc_score(labels, tumor)
        # pairs of a Tumor and a Healthy image whose scores share a bin are counted half: the only error
        bins = np.minimum((tumor * SCORE_BINS).astype(int), SCORE_BINS - 1)
        tied = np.mean([[bp == bn for bn in bins[labels == 0]] for bp in bins[labels == 1]])
        assert abs(entry["roc_auc"]["Tumor"] - exact) <= tied / 2 + 1e-9, (entry["roc_auc"], exact, tied)
        # the explanation scores: what result_stat.gradcam computes over the pooled sites' same tumor images
        model = build_model("tiny", len(TASK_CLASSES))
        saved = torch.load(path, weights_only=True)
        model.load_state_dict({k: torch.as_tensor(v) for k, v in saved.get("model", saved).items()})
        site_dirs = {s: evaluation["root"] / "data" / s for s in SITES}
        assert set(entry["explanations"]) == set(REPORT_METHODS)  # the panel, the stride-16 Grad-CAM, the two checks
        for method, federated in entry["explanations"].items():
            pooled = explain_sites(model, site_dirs, None, panels=False, progress=False, method=method)
            assert federated["n"] == pooled["n"] > 0, method
            assert federated["pointing_game"] == pytest.approx(pooled["pointing_game"], abs=1e-12), method
            assert federated["energy_in_mask"] == pytest.approx(pooled["energy_in_mask"], abs=1e-9), method
    start, opposite = report["start"], report["opposite"]
    assert opposite["accuracy"] == pytest.approx(1 - start["accuracy"])  # the opposite model, exactly
    assert "| start |" not in evaluation["markdown"] and "## start" in evaluation["markdown"]


@pytest.mark.slow
def test_a_site_sends_counts_and_histograms_only_with_paired_draws(evaluation):
    sites = evaluation["saved"]["sites"]
    assert set(sites) == set(SITES)
    names = [path.name for path in (evaluation["root"] / "data").rglob("*.png")]
    text = json.dumps(sites)
    assert not any(name in text for name in names)  # no file name

    def leaves(value):
        if isinstance(value, dict):
            return [leaf for v in value.values() for leaf in leaves(v)]
        if isinstance(value, list):
            return [leaf for v in value for leaf in leaves(v)]
        return [value]

    for site, per_model in sites.items():
        for model, sent in per_model.items():
            assert set(sent) == SENT_KEYS, (site, model)
            counts = {k: v for k, v in sent.items() if k not in ("class_names", "explanations")}
            assert all(isinstance(v, int) for v in leaves(counts)), (site, model)  # no per-image probability
            for method, scores in sent["explanations"].items():  # sums over the site's tumors, not per image
                assert set(scores) == {"hits", "n", "energy_sum"} and 0 <= scores["hits"] <= scores["n"], method
        draws = {model: np.asarray(sent["bootstrap_confusions"]) for model, sent in per_model.items()}
        assert draws["start"].shape == (200, 2, 2)
        # the same resample of the site's images for both models: same class sizes per draw, and the opposite
        # model's draw is the start's with the predicted columns swapped
        assert np.array_equal(draws["opposite"], draws["start"][:, :, ::-1])


def test_histogram_auc_and_bootstrap_draws_by_construction():
    assert auc_from_histograms([0, 0, 3], [2, 0, 0]) == 1.0
    assert auc_from_histograms([0, 2, 0], [0, 2, 0]) == 0.5  # all tied
    assert auc_from_histograms([1, 0], [0, 0]) is None
    labels, predicted = [0, 0, 0, 1, 1], [0, 1, 0, 1, 1]
    once = bootstrap_confusions(labels, predicted, 2, seed=7, site="site1", replicates=5)
    assert once == bootstrap_confusions(labels, predicted, 2, seed=7, site="site1", replicates=5)
    assert once != bootstrap_confusions(labels, predicted, 2, seed=7, site="site2", replicates=5)
    assert all(np.asarray(m).sum(1).tolist() == [3, 2] for m in once)  # resampled within each class
    report = consortium_report(
        {
            "a": {
                "m": {
                    "class_names": ["H", "T"],
                    "confusion": [[8, 2], [0, 10]],
                    "score_histograms": {
                        "H": {"positive": [0, 10], "negative": [10, 0]},
                        "T": {"positive": [0, 10], "negative": [10, 0]},
                    },
                }
            },
            "b": {
                "m": {
                    "class_names": ["H", "T"],
                    "confusion": [[1, 0], [1, 0]],
                    "score_histograms": {
                        "H": {"positive": [0, 1], "negative": [1, 0]},
                        "T": {"positive": [1, 0], "negative": [0, 1]},
                    },
                }
            },
        }
    )["m"]
    assert report["confusion"] == [[9, 2], [1, 10]] and report["n"] == 22
    assert report["balanced_accuracy"] == pytest.approx((9 / 11 + 10 / 11) / 2)
    assert report["hospitals"]["b"]["balanced_accuracy"] == pytest.approx(0.5)  # a hospital counts once
    assert report["hospital_mean_balanced_accuracy"] == pytest.approx((0.9 + 0.5) / 2)
