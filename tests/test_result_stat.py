"""result_stat: metrics on known outputs, the test report on a tiny finished run, the cross-site
table, the TensorBoard plots on events written by TensorBoard's own writer, and run_all."""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import classification_report, confusion_matrix, roc_auc_score

from fedxvit import run_record
from fedxvit.datalist import load_split
from fedxvit.errors import FedXViTError
from fedxvit.training import evaluate
from result_stat import cross_site, plot_tensorboard_events, report, run_all
from result_stat import summary as summary_module
from result_stat.metrics import classification_metrics

CPU = torch.device("cpu")


class MeanLogit(torch.nn.Module):
    """Known outputs: the Tumor logit is 8 x (image mean - 0.5), the Healthy logit 0."""

    def forward(self, images):
        tumor = 8 * (images.mean(dim=(1, 2, 3)) - 0.5)
        return torch.stack([torch.zeros_like(tumor), tumor], 1)


def constant_batches(values, labels):
    images = torch.stack([torch.full((1, 4, 4), v) for v in values])
    return [{"image": images, "label": torch.tensor(labels)}]


def test_metrics_on_a_model_with_known_outputs_agree_with_sklearn():
    values, labels = [0.1, 0.4, 0.6, 0.9, 0.45, 0.7], [0, 0, 1, 1, 1, 0]
    out = evaluate(MeanLogit(), constant_batches(values, labels), CPU)
    metrics = classification_metrics(out["labels"], out["probs"], ["Healthy", "Tumor"])
    p_tumor = [1 / (1 + math.exp(-8 * (v - 0.5))) for v in values]
    predicted = [int(p > 0.5) for p in p_tumor]  # 0, 0, 1, 1, 0, 1: two mistakes
    assert metrics["accuracy"] == pytest.approx(4 / 6)
    expected_loss = -np.mean([math.log(p if y else 1 - p) for p, y in zip(p_tumor, labels)])
    assert metrics["loss"] == pytest.approx(expected_loss, rel=1e-5)
    assert metrics["loss"] == pytest.approx(out["loss"], rel=1e-5)
    assert metrics["confusion_matrix"] == [[2, 1], [1, 2]] == confusion_matrix(labels, predicted).tolist()
    sk = classification_report(labels, predicted, target_names=["Healthy", "Tumor"], output_dict=True)
    assert metrics["per_class"]["Tumor"] == pytest.approx(sk["Tumor"])
    assert metrics["roc_auc"] == pytest.approx(roc_auc_score(labels, p_tumor))
    assert classification_metrics([1, 1], [[0.2, 0.8], [0.6, 0.4]], ["Healthy", "Tumor"])["roc_auc"] is None


@pytest.fixture
def site_data(tiny_run, monkeypatch):
    monkeypatch.setenv("FEDXVIT_DATA_ROOT", str(tiny_run["data"]))
    return tiny_run


@pytest.fixture(scope="module")
def baselines_dir(tiny_run, tmp_path_factory):
    """What `make baselines` writes for the tiny run (trained once for this module)."""
    from tooling.baselines import train_baselines
    from tooling.jobconfig import read_job_settings

    out = tmp_path_factory.mktemp("baselines")
    train_baselines(
        read_job_settings(tiny_run["run_dir"]),
        {s: tiny_run["data"] / s for s in tiny_run["sites"]},
        tiny_run["initial"],
        out,
        progress=False,
    )
    return out


def test_report_scores_global_models_and_baselines_on_every_site(site_data, baselines_dir, tmp_path):
    rep = report.build_report(site_data["run_dir"], initial=site_data["initial"], baselines=baselines_dir)
    assert rep["sites"] == ["site1", "site2"] and rep["settings"]["equivalent_epochs"] == 2
    final = rep["models"]["final"]
    assert final["combined"]["count"] == final["site1"]["count"] + final["site2"]["count"] == 8
    rows = {row["model"]: row for row in rep["comparison"]}
    assert list(rows)[0] == "transplanted start (initial_global)"
    start, final_row, best_row = (
        rows[name] for name in (list(rows)[0], "federated, final global model", "federated, best global model")
    )
    # tiny.write_tiny_run: the final global model predicts the opposite of the start, the best one is the start
    assert final_row["test_accuracy"] == pytest.approx(1 - start["test_accuracy"])
    assert (best_row["test_accuracy"], best_row["test_loss"]) == (
        start["test_accuracy"],
        pytest.approx(start["test_loss"]),
    )
    best_matrix = rep["models"]["best"]["combined"]["confusion_matrix"]
    assert final["combined"]["confusion_matrix"] == [row[::-1] for row in best_matrix] != best_matrix
    assert final_row["test_loss"] != pytest.approx(start["test_loss"])
    # the baselines of `make baselines`: the sites' 8 training images each, for the run's 2 rounds x 1 local epoch
    assert [
        (rows[n]["train_images"], rows[n]["epochs"])
        for n in ("centralized (all sites pooled)", "local-only site1", "local-only site2")
    ] == [(16, 2), (8, 2), (8, 2)]
    from fedxvit.checkpoint import build_model_from_checkpoint

    central, _ = build_model_from_checkpoint(baselines_dir / "centralized.pt")
    scored = report.score_model(
        central.eval(), report.test_loaders({s: site_data["data"] / s for s in site_data["sites"]}, 32), CPU
    )
    assert rows["centralized (all sites pooled)"]["test_loss"] == pytest.approx(scored["combined"]["loss"])
    assert rows["centralized (all sites pooled)"]["test_loss"] != pytest.approx(start["test_loss"])
    files = report.write_report(rep, tmp_path)
    saved = json.loads(files["json"].read_text())
    assert saved["models"]["final"]["combined"]["confusion_matrix"] == final["combined"]["confusion_matrix"]
    assert (tmp_path / "confusion_matrix_final.png").stat().st_size > 0 and (tmp_path / "roc_curve.png").is_file()
    markdown = files["markdown"].read_text()
    assert "Is federation worth it?" in markdown
    assert (
        f"| federated, final global model | {100 * final_row['test_accuracy']:.1f}% | {final_row['test_loss']:.4f} |"
        in markdown
    )


def test_report_refuses_missing_or_foreign_models(site_data, baselines_dir, tmp_path):
    with pytest.raises(FedXViTError, match="does not exist"):
        report.load_global_model(tmp_path / "none.pt", "tiny")
    with pytest.raises(FedXViTError, match="does not fit preset 'cpu'"):
        report.load_global_model(site_data["run_dir"] / "app_server" / "FL_global_model.pt", "cpu")
    with pytest.raises(FedXViTError, match="run folder"):
        report.build_report(tmp_path / "no-run")
    with pytest.raises(FedXViTError, match=r"no baselines at .*: run `make baselines`"):
        report.build_report(site_data["run_dir"], initial=site_data["initial"], baselines=tmp_path / "none")
    stale = tmp_path / "stale"
    shutil.copytree(baselines_dir, stale)
    record = json.loads((stale / "baselines.json").read_text())
    record["fingerprint"]["settings"]["learning_rate"] = 0.5  # trained for another run
    (stale / "baselines.json").write_text(json.dumps(record))
    with pytest.raises(
        FedXViTError, match=r"trained for other settings or sites than this run .*run `make baselines` again"
    ):
        report.build_report(site_data["run_dir"], initial=site_data["initial"], baselines=stale)


def test_cross_site_table_and_heatmap(tiny_run, tmp_path):
    matrix = cross_site.write_cross_site(tiny_run["run_dir"], tmp_path)
    assert matrix["data_sites"] == ["site1", "site2"]
    assert matrix["labels"][0] == "server: FL_global_model"
    assert matrix["values"][0] == [0.5, 0.5] and matrix["values"][2] == [pytest.approx(0.7)] * 2
    assert matrix["missing"] == []
    table = (tmp_path / "cross_site.md").read_text()
    assert "| site2 (best local) | 70.0% | 70.0% |" in table and "missing" not in table
    assert (tmp_path / "cross_site_accuracy.png").stat().st_size > 0
    with pytest.raises(FedXViTError, match="cross-site"):
        cross_site.write_cross_site(tmp_path, tmp_path)


def test_cross_site_marks_the_scores_a_dead_site_never_delivered(tmp_path):
    run = tmp_path / "run"
    (run / "cross_site_val").mkdir(parents=True)
    scores = {"val_accuracy": 0.75, "val_loss": 0.5, "val_count": 4}
    models = ["SRV_FL_global_model.pt", "site1", "site2"]
    # site3 trained in round 0 and died: it neither submitted its model nor validated anyone's
    (run / "global_val.json").write_text(
        json.dumps({"rounds": [{"round": 0, "sites": {s: scores for s in ("site1", "site2", "site3")}}]})
    )
    (run / "cross_site_val" / "cross_val_results.json").write_text(
        json.dumps({site: {m: scores for m in models} for site in ("site1", "site2")})
    )
    matrix = cross_site.write_cross_site(run, tmp_path / "out")

    assert matrix["data_sites"] == ["site1", "site2", "site3"] and matrix["models"] == [*models, "site3"]
    never_validated = [{"model": m, "data_site": "site3"} for m in models]
    never_submitted = [{"model": "site3", "data_site": s} for s in ("site1", "site2", "site3")]
    expected = never_validated + never_submitted
    assert sorted(matrix["missing"], key=json.dumps) == sorted(expected, key=json.dumps)
    assert json.loads((tmp_path / "out" / "cross_site.json").read_text())["missing"] == matrix["missing"]
    table = (tmp_path / "out" / "cross_site.md").read_text()
    assert "| site1 (n=4) | site2 (n=4) | site3 (n=?) |" in table
    assert "| site1 (best local) | 75.0% | 75.0% | missing |" in table
    assert "| site3 (best local) | missing | missing | missing |" in table
    assert "validation_timeout" in table


def test_plot_script_reads_events_written_by_tensorboard(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    events = tmp_path / "tb_events"
    for source in ("server", "site1", "site2"):
        writer = SummaryWriter(str(events / source))
        for step in range(4):
            if source == "server":
                writer.add_scalar("global_val_accuracy", 0.5 + 0.1 * step, step)
                writer.add_scalar("global_val_loss", 1.0 / (step + 1), step)
            else:
                writer.add_scalar("train_loss", 2.0 - step, step)
                writer.add_scalar("local_val_accuracy", 0.25 * step, step)
        writer.close()
    result = plot_tensorboard_events.main(["--events", str(events), "--out", str(tmp_path / "png"), "--smooth", "0.8"])
    scalars = result["scalars"]
    assert set(scalars) == {"server", "site1", "site2"}
    assert [v for _, v in scalars["server"]["global_val_accuracy"]] == pytest.approx([0.5, 0.6, 0.7, 0.8])
    assert [s for s, _ in scalars["site2"]["train_loss"]] == [0, 1, 2, 3]
    assert (tmp_path / "png" / "tb_global.png").stat().st_size > 0 and (tmp_path / "png" / "tb_sites.png").is_file()
    with pytest.raises(FedXViTError, match="no TensorBoard event files"):
        plot_tensorboard_events.plot_events(tmp_path / "png", tmp_path / "x")


def test_smoothing_is_tensorboards_debiased_ema():
    smooth = plot_tensorboard_events.smooth
    assert smooth([3.0, 3.0, 3.0], 0.8) == pytest.approx([3.0, 3.0, 3.0])
    assert smooth([0.0, 1.0], 0.5) == pytest.approx([0.0, 0.5 / 0.75])
    assert smooth([1.0, 2.0], 0.0) == [1.0, 2.0]
    with pytest.raises(FedXViTError, match="smooth"):
        smooth([1.0], 1.0)


def test_run_all_writes_summary_with_the_design_keys(site_data, tmp_path):
    out = tmp_path / "results"
    out.mkdir()
    (out / "timings.json").write_text(json.dumps({"data": {"wall_s": 1.0, "peak_rss_mb": 100.0}}))  # bench/timed.py's
    (out / "occlusion.json").write_text("{}")  # an earlier run's check, skipped this time
    summary = run_all.main(
        [
            "--run-dir",
            str(site_data["run_dir"]),
            "--out",
            str(out),
            "--no-baselines",
            "--initial",
            str(site_data["initial"]),
            "--no-occlusion",
            "--mlflow",
            "off",
            "--smooth",
            "0",
        ]
    )
    saved = json.loads((out / "summary.json").read_text())
    assert saved == json.loads(json.dumps(summary))
    assert saved["timing_s"] == {"data": 1.0, "total": 1.0} and saved["peak_rss_mb"] == {"data": 100, "max": 100}
    federated = saved["federated"]
    assert [r["round"] for r in federated["rounds"]] == [0, 1]
    assert set(federated) >= {"final_test_accuracy", "final_test_loss", "per_class", "per_site"}
    assert set(federated["per_site"]) == {"site1", "site2"}
    start = saved["comparison"][0]  # the final global model is the start's opposite, the best one the start
    assert federated["final_test_accuracy"] == pytest.approx(1 - start["test_accuracy"])
    assert federated["best_test_accuracy"] == start["test_accuracy"]
    assert set(saved["xai"]) >= {"pointing_game", "energy_in_mask", "per_site", "integrated_gradients"}
    assert "occlusion" not in saved["xai"] and not (out / "occlusion.json").exists()  # --no-occlusion
    assert set(saved["xai"]["baselines"]) == {"random", "centered", "intensity", "mask_cells"}
    ig = saved["xai"]["integrated_gradients"]
    per_site = ig["per_site"].values()
    assert ig["n"] == sum(s["n"] for s in per_site) == 4  # 2 tumor test images per site
    assert ig["pointing_game"] == pytest.approx(sum(s["pointing_game"] * s["n"] for s in per_site) / ig["n"])
    assert all({"model", "test_accuracy", "test_loss"} <= row.keys() for row in saved["comparison"])
    assert saved["cross_site"]["data_sites"] == ["site1", "site2"]
    text = (out / "report.md").read_text()
    assert "Is federation worth it?" in text and "pointing game" in text
    assert (out / "gradcam_site1.png").is_file()

    # what goes to a tracking server by default: no overlay of a test image, no image name, no probability
    shared = tmp_path / "shared"
    left_out = run_record.aggregate_results(out, shared)
    assert {"gradcam/", "integrated_gradients/", "gradcam_site1.png", "gradcam.json: images"} <= set(left_out)
    assert {p.name for p in shared.iterdir()} >= {"summary.json", "report.md", "test_report.json", "roc_curve.png"}
    sheets = [p for p in shared.iterdir() if p.suffix == ".png" and p.name.startswith(("gradcam", "integrated"))]
    assert not sheets and not [p for p in shared.iterdir() if p.is_dir()]
    assert (shared / "gradcam_stride16.json").is_file(), "the design card's Grad-CAM scores beside the panel's"
    tested = [e["image"] for site in ("site1", "site2") for e in load_split(site_data["data"] / site, "testing")]
    names = [Path(image).stem for image in tested]
    texts = {p.name: p.read_text() for p in shared.iterdir() if p.suffix in (".json", ".md")}
    assert not [(f, n) for f, text in texts.items() for n in names if n in text] and "p_tumor" not in str(texts)
    gradcam = json.loads(texts["gradcam.json"])
    assert gradcam["pointing_game"] == saved["xai"]["pointing_game"] and "images" not in gradcam["per_site"]["site1"]

    # summary.json is a function of the files alone: a later phase's timing comes in on a rewrite
    (out / "timings.json").write_text(
        json.dumps({"results": {"wall_s": 5.0, "peak_rss_mb": 300.0}, "data": {"wall_s": 1.0, "peak_rss_mb": 100.0}})
    )
    rewritten = summary_module.main(["--results", str(out)])
    assert rewritten["timing_s"] == {"data": 1.0, "results": 5.0, "total": 6.0}  # the demo's phase order
    assert {k: v for k, v in rewritten.items() if k not in ("timing_s", "peak_rss_mb")} == {
        k: v for k, v in saved.items() if k not in ("timing_s", "peak_rss_mb")
    }


def test_run_all_on_a_missing_run_folder_is_one_line_and_writes_nothing(tmp_path):
    out = tmp_path / "results"
    for run_dir in (tmp_path / "nope", tmp_path):  # a typo; a folder that is not a run
        with pytest.raises(FedXViTError, match=f"{run_dir}.*(does not exist|no config_fed_server.json)"):
            run_all.main(["--run-dir", str(run_dir), "--out", str(out), "--mlflow", "off"])
        assert not out.exists()


def test_a_ditto_run_adds_each_sites_personalized_model_on_its_own_test_split(tmp_path):
    """site1 kept a personalized model (the global one with its classes swapped: accuracy exactly 1 - the
    global model's there); site2 kept none and is scored with the global model."""
    from tiny import opposite_model, write_tiny_site

    from fedxvit.algorithms import PERSONALIZED_MODEL
    from fedxvit.model import build_model

    run_dir = tmp_path / "ws" / "server" / "simulate_job"
    (run_dir / "app_server").mkdir(parents=True)
    torch.manual_seed(0)
    state = build_model("tiny", 2).state_dict()
    for name in report.GLOBAL_MODELS.values():
        torch.save({"model": state}, run_dir / "app_server" / name)
    app = tmp_path / "ws" / "site1" / "simulate_job" / "app_site1"
    app.mkdir(parents=True)
    torch.save(opposite_model(state), app / PERSONALIZED_MODEL)
    dirs = {s: write_tiny_site(tmp_path / "data" / s, seed=k) for k, s in enumerate(("site1", "site2"))}
    loaders = report.test_loaders(dirs, 32)
    device = torch.device("cpu")
    row = report.ditto_row(run_dir, loaders, "tiny", device)
    global_model = build_model("tiny", 2)
    global_model.load_state_dict(state)
    global_row = report._summary_row("global", report.score_model(global_model.eval(), loaders, device))
    assert "site2 kept none" in row["model"]
    assert row["per_site_accuracy"]["site1"] == pytest.approx(1 - global_row["per_site_accuracy"]["site1"])
    assert row["per_site_accuracy"]["site2"] == pytest.approx(global_row["per_site_accuracy"]["site2"])
    assert report.ditto_row(tmp_path / "other" / "server" / "simulate_job", loaders, "tiny", device) is None


def test_four_class_roc_auc_averages_the_classes_a_hospital_has():
    """sklearn's macro one-vs-rest AUC when every class is present; over the present classes otherwise,
    where sklearn's has no value (a long-tailed hospital without pituitary images)."""
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(4), size=40)
    labels = np.arange(40) % 4
    every = classification_metrics(labels, probs, list("abcd"))["roc_auc"]
    assert every == pytest.approx(roc_auc_score(labels, probs, multi_class="ovr", labels=[0, 1, 2, 3]))
    some = np.where(labels == 3, 0, labels)  # no class 3 here
    expected = np.mean([roc_auc_score(some == c, probs[:, c]) for c in (0, 1, 2)])
    assert classification_metrics(some, probs, list("abcd"))["roc_auc"] == pytest.approx(expected)
