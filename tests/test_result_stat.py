"""result_stat: metrics on known outputs, the test report on a tiny finished run, the cross-site
table, the TensorBoard plots on events written by TensorBoard's own writer, and run_all."""

import json
import math

import numpy as np
import pytest
import torch
from sklearn.metrics import classification_report, confusion_matrix, roc_auc_score

from fedxvit.errors import FedXViTError
from fedxvit.training import evaluate
from result_helpers import write_tiny_run
from result_stat import cross_site, plot_tensorboard_events, report, run_all
from result_stat.metrics import classification_metrics

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


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


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return write_tiny_run(tmp_path_factory.mktemp("results"))


@pytest.fixture
def site_data(tiny_run, monkeypatch):
    monkeypatch.setenv("FEDXVIT_DATA_ROOT", str(tiny_run["data"]))
    return tiny_run


def test_report_scores_global_models_and_baselines_on_every_site(site_data, tmp_path):
    rep = report.build_report(site_data["run_dir"], initial=site_data["initial"], progress=False)
    assert rep["sites"] == ["site1", "site2"] and rep["settings"]["epochs"] == 2
    final = rep["models"]["final"]
    assert final["combined"]["count"] == final["site1"]["count"] + final["site2"]["count"] == 8
    names = [row["model"] for row in rep["comparison"]]
    assert names[0].startswith("transplanted start") and "centralized (all sites pooled)" in names
    assert {"local-only site1", "local-only site2"} <= set(names)
    start = rep["comparison"][0]
    # the run's global model is the initial model itself here, so both must score alike
    assert start["test_accuracy"] == rep["comparison"][1]["test_accuracy"]
    files = report.write_report(rep, tmp_path)
    saved = json.loads(files["json"].read_text())
    assert saved["models"]["final"]["combined"]["confusion_matrix"] == final["combined"]["confusion_matrix"]
    assert (tmp_path / "confusion_matrix_final.png").stat().st_size > 0 and (tmp_path / "roc_curve.png").is_file()
    assert "Is federation worth it?" in files["markdown"].read_text()


def test_report_refuses_missing_or_foreign_models(site_data, tmp_path):
    with pytest.raises(FedXViTError, match="does not exist"):
        report.load_global_model(tmp_path / "none.pt", "tiny")
    with pytest.raises(FedXViTError, match="does not fit preset 'cpu'"):
        report.load_global_model(site_data["run_dir"] / "app_server" / "FL_global_model.pt", "cpu")
    with pytest.raises(FedXViTError, match="run folder"):
        report.build_report(tmp_path / "no-run")


def test_cross_site_table_and_heatmap(tiny_run, tmp_path):
    matrix = cross_site.write_cross_site(tiny_run["run_dir"], tmp_path)
    assert matrix["data_sites"] == ["site1", "site2"]
    assert matrix["labels"][0] == "server: FL_global_model"
    assert matrix["values"][0] == [0.5, 0.5] and matrix["values"][2] == [pytest.approx(0.7)] * 2
    assert "| site2 (best local) | 70.0% | 70.0% |" in (tmp_path / "cross_site.md").read_text()
    assert (tmp_path / "cross_site_accuracy.png").stat().st_size > 0
    with pytest.raises(FedXViTError, match="cross-site"):
        cross_site.write_cross_site(tmp_path, tmp_path)


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
    (out / "summary.json").write_text(json.dumps({"timing_s": {"data": 1.0}}))  # the demo's key survives
    summary = run_all.main(["--run-dir", str(site_data["run_dir"]), "--out", str(out), "--no-baselines",
                            "--initial", str(site_data["initial"]),
                            "--no-occlusion", "--mlflow", "off", "--smooth", "0"])
    saved = json.loads((out / "summary.json").read_text())
    assert saved == json.loads(json.dumps(summary))
    assert saved["timing_s"] == {"data": 1.0}
    federated = saved["federated"]
    assert [r["round"] for r in federated["rounds"]] == [0, 1]
    assert set(federated) >= {"final_test_accuracy", "final_test_loss", "per_class", "per_site"}
    assert set(federated["per_site"]) == {"site1", "site2"}
    assert set(saved["xai"]) >= {"pointing_game", "energy_in_mask", "per_site", "integrated_gradients"}
    assert "occlusion" not in saved["xai"]  # --no-occlusion
    assert set(saved["xai"]["baselines"]) == {"random", "centered", "intensity", "mask_cells"}
    assert 0 <= saved["xai"]["integrated_gradients"]["pointing_game"] <= 1
    assert all({"model", "test_accuracy", "test_loss"} <= row.keys() for row in saved["comparison"])
    text = (out / "report.md").read_text()
    assert "Is federation worth it?" in text and "pointing game" in text
    assert (out / "gradcam_site1.png").is_file()
