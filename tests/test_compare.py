"""make compare (result_stat.compare): scores on hand-made predictions, the gap share and verdicts,
reuse of finished runs, one-line errors, and one real --quick comparison of two methods on tiny sites."""

import json
from pathlib import Path

import pytest
from tiny import REPO, tiny_job, write_initial_model, write_tiny_site

from fedxvit.baselines import train_on_sites
from fedxvit.checkpoint import save_checkpoint
from fedxvit.classes import TASK_CLASSES
from fedxvit.errors import FedXViTError
from fedxvit.jobconfig import JobSettings
from result_stat import compare

# site a: labels 0,0,0,1 -> predictions 0,0,1,1; site b holds Tumor images only and misses one of two
SITE_A = {"labels": [0, 0, 0, 1], "probs": [[0.9, 0.1], [0.6, 0.4], [0.4, 0.6], [0.45, 0.55]]}
SITE_B = {"labels": [1, 1], "probs": [[0.1, 0.9], [0.8, 0.2]]}


def test_headline_metrics_on_hand_made_predictions():
    a = compare.headline_metrics(SITE_A["labels"], SITE_A["probs"])
    assert a["accuracy"] == pytest.approx(3 / 4)
    assert a["balanced_accuracy"] == pytest.approx((2 / 3 + 1) / 2)
    assert a["macro_f1"] == pytest.approx((0.8 + 2 / 3) / 2)  # class 0: P 1, R 2/3; class 1: P 1/2, R 1
    assert a["roc_auc"] == pytest.approx(2 / 3)  # the Tumor image (0.55) ranks below one Healthy (0.6)
    b = compare.headline_metrics(SITE_B["labels"], SITE_B["probs"])
    assert (b["accuracy"], b["balanced_accuracy"]) == (0.5, 0.5)  # judged on the one class it holds
    assert b["macro_f1"] == pytest.approx(2 / 3) and b["roc_auc"] is None


def test_pooled_and_per_site_scores_and_the_worst_hospital():
    scores = compare.score_sites({"a": SITE_A, "b": SITE_B})
    pooled = scores["pooled"]
    assert pooled["count"] == 6 and pooled["accuracy"] == pytest.approx(4 / 6)
    assert pooled["balanced_accuracy"] == pytest.approx(2 / 3) and pooled["macro_f1"] == pytest.approx(2 / 3)
    assert pooled["roc_auc"] == pytest.approx(6 / 9)
    assert scores["sites"]["a"]["balanced_accuracy"] == pytest.approx(5 / 6)
    assert scores["worst_site"] == "b"


def test_gap_share_per_seed_then_mean_and_std():
    fedavg, central = {0: 0.60, 1: 0.62, 2: 0.58}, {0: 0.80, 1: 0.82, 2: 0.78}
    half = compare.gap_share({0: 0.70, 1: 0.72, 2: 0.68}, fedavg, central)
    assert half["status"] == "ok" and half["mean"] == pytest.approx(0.5) and half["std"] == pytest.approx(0, abs=1e-9)
    mixed = compare.gap_share({0: 0.60, 1: 0.72, 2: 0.58}, fedavg, central)
    assert [mixed["per_seed"][s] for s in range(3)] == pytest.approx([0, 0.5, 0], abs=1e-9)
    assert mixed["mean"] == pytest.approx(1 / 6) and mixed["std"] == pytest.approx((1 / 12) ** 0.5)
    assert compare.gap_share(central, fedavg, central)["mean"] == pytest.approx(1.0)
    # gaps +0.1, -0.1, +0.05: mean 0.017 below their spread 0.10 -> n/a, with the reason
    noisy = compare.gap_share({0: 0.7, 1: 0.7, 2: 0.7}, {0: 0.6, 1: 0.7, 2: 0.5}, {0: 0.7, 1: 0.6, 2: 0.55})
    assert noisy["status"] == "n/a" and noisy["mean"] is None and "spread" in noisy["why"]


def test_verdict_against_fedavg_needs_a_difference_above_the_seeds_spread():
    fedavg = {0: 0.60, 1: 0.62, 2: 0.58}
    assert compare.versus_reference({0: 0.70, 1: 0.72, 2: 0.68}, fedavg)["verdict"] == "better"
    assert compare.versus_reference({0: 0.50, 1: 0.52, 2: 0.48}, fedavg)["verdict"] == "worse"
    unclear = compare.versus_reference({0: 0.70, 1: 0.52, 2: 0.60}, fedavg)
    assert unclear["verdict"] == "no clear difference" and unclear["mean"] == pytest.approx(0.02 / 3)
    assert compare.versus_reference({0: 0.9}, {0: 0.6})["verdict"] == "one seed: no verdict"


def test_mean_std_and_curve_bands():
    assert compare.mean_std([0.5, None, 0.7]) == {"mean": pytest.approx(0.6), "std": pytest.approx(0.02**0.5), "n": 2}
    assert compare.mean_std([0.5]) == {"mean": 0.5, "std": None, "n": 1}
    band = compare.curve_band([[0.5, None, 0.7], [0.7, 0.8, 0.9]])
    assert band["mean"] == pytest.approx([0.6, 0.8, 0.8]) and band["min"] == [0.5, 0.8, 0.7] and band["max"][2] == 0.9


def test_finished_runs_are_reused_and_unfinished_ones_redone(tmp_path):
    calls = []

    def compute(folder):
        calls.append(folder)
        return {"test": {}, "value": len(calls)}

    folder = tmp_path / f"fedavg-{compare.options_digest({'rounds': 2, 'seed': 0})}"
    first, reused = compare.run_or_reuse(folder, compute)
    again, reused_again = compare.run_or_reuse(folder, compute)
    assert (reused, reused_again) == (False, True) and again == first and len(calls) == 1 and "wall_s" in first
    (folder / compare.DONE_FILE).unlink()  # as after an interrupted run: no done marker
    assert compare.run_or_reuse(folder, compute) == ({"test": {}, "value": 2, "wall_s": pytest.approx(0, abs=1)}, False)
    assert compare.options_digest({"rounds": 3, "seed": 0}) != compare.options_digest({"rounds": 2, "seed": 0})


def finished(report: dict, **settings) -> dict:
    """An aggregated report with what compare() adds around it: its settings (2 rounds x 1 epoch, seeds 0 and 1,
    plus `settings`), no runs or failures, the times."""
    report.update(
        settings={"data": "d", "initial": "i", "preset": "tiny", "rounds": 2, "local_epochs": 1, "seeds": [0, 1]}
        | settings,
        runs=[],
        failures=[],
        wall_s=1.0,
        compute_s=2.0,
    )
    return report


def test_aggregate_composes_local_only_and_closes_half_the_gap(tmp_path):
    """Hand-made runs over two seeds: FedAvg = SITE_A + SITE_B, centralized perfect, local-only = site a's own
    model (SITE_A) + site b's own model (perfect): pooled balanced accuracy 2/3, 1 and 5/6 -> half the gap."""
    perfect = {
        "a": {"labels": [0, 0, 0, 1], "probs": [[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.2, 0.8]]},
        "b": {"labels": [1, 1], "probs": [[0.2, 0.8], [0.3, 0.7]]},
    }
    results = {("start", None): {"test": {"a": SITE_A, "b": SITE_B}, "final_val_accuracy": 0.5}}
    for seed in (0, 1):
        results[("fedavg", seed)] = {"test": {"a": SITE_A, "b": SITE_B}, "val_curve": [0.5, 0.6 + seed / 10, None]}
        results[("centralized", seed)] = {"test": perfect, "final_val_accuracy": 0.9}
        results[("local-only a", seed)] = {"test": {"a": SITE_A}}
        results[("local-only b", seed)] = {"test": {"b": perfect["b"]}}
    report = compare.aggregate(results, ["fedavg"], [0, 1], ["a", "b"])
    local = report["methods"]["local-only"]
    assert local["pooled"]["balanced_accuracy"] == {"mean": pytest.approx(5 / 6), "std": 0.0, "n": 2}
    assert local["gap_share"]["mean"] == pytest.approx(0.5) and local["gap_share"]["gap"]["mean"] == pytest.approx(
        1 / 3
    )
    assert local["vs_fedavg"]["verdict"] == "better" and local["worst_site"]["sites"] == ["a", "a"]
    assert report["methods"]["centralized"]["gap_share"]["mean"] == pytest.approx(1.0)
    assert report["methods"]["fedavg"]["val_curve"]["mean"] == pytest.approx([0.5, 0.65, None])
    assert report["methods"]["start"]["pooled"]["roc_auc"]["std"] is None

    files = compare.write_outputs(finished(report, sites=["a", "b"]), tmp_path)
    markdown = files["markdown"].read_text()
    # accuracy 5/6, balanced 5/6, macro-F1 (0.8 + 6/7)/2, ROC-AUC 8/9, worst a, mean of a (5/6) and b (1),
    # half the gap, +1/6 over FedAvg
    assert (
        "| local-only | 83.3 ± 0.0 | 83.3 ± 0.0 | 82.9 ± 0.0 | 88.9 ± 0.0 | 83.3 ± 0.0 (a) | 91.7 ± 0.0 | 50.0 ± 0.0 | "
        "+16.7 pts: better |"
    ) in markdown
    assert "| start | 66.7 | 66.7 | 66.7 | 66.7 | 50.0 (b) | 66.7 | — | — |" in markdown  # one value: no ±
    assert json.loads(files["json"].read_text())["methods"]["local-only"]["gap_share"]["per_seed"] == pytest.approx(
        {"0": 0.5, "1": 0.5}
    )
    assert files["curves"].read_bytes()[:4] == b"\x89PNG"


@pytest.fixture
def two_sites(tmp_path):
    for i, site in enumerate(("site1", "site2")):
        write_tiny_site(tmp_path / "data" / site, train_per_class=3 + i, val_per_class=2, test_per_class=2, seed=i)
    return tmp_path / "data", write_initial_model(tmp_path / "initial_global.pt")


def test_bad_input_is_one_line_naming_the_option(two_sites, tmp_path, capsys):
    data, initial = two_sites
    job = tiny_job(tmp_path / "fedavg")
    base = [
        "--scenario-data",
        str(data),
        "--initial",
        str(initial),
        "--methods",
        f"fedavg={job}",
        "--workspace",
        str(tmp_path / "ws"),
        "--out",
        str(tmp_path / "out"),
    ]

    def error(*changes):
        args = list(base)
        for option, value in zip(changes[::2], changes[1::2]):
            args[args.index(option) + 1] = value
        with pytest.raises(FedXViTError) as caught:
            compare.main(args)
        return str(caught.value)

    assert error("--scenario-data", str(tmp_path / "nowhere")).startswith(
        f"--scenario-data {tmp_path / 'nowhere'} does not exist"
    )
    assert error("--initial", str(tmp_path / "none.pt")).startswith(f"--initial {tmp_path / 'none.pt'} does not exist")
    assert "job folder" in error("--methods", f"fedavg={tmp_path / 'nojob'}") and "nojob" in error(
        "--methods", f"fedavg={tmp_path / 'nojob'}"
    )
    assert error("--methods", f"median={job}").startswith("--methods must include 'fedavg'")
    assert error("--methods", "fedavg,fedbogus").startswith("--methods: unknown method 'fedbogus'")
    (data / "site2" / "datalist.json").unlink()
    assert "site site2" in error() and "datalist.json" in error()
    with pytest.raises(SystemExit) as caught:
        compare.parse_args(["--help"])
    assert caught.value.code == 0 and "--scenario-data" in capsys.readouterr().out


def trained_start(tmp: Path) -> Path:
    """A tiny initial model that already tells the classes apart (fine-tuned on a public tiny site by
    fedxvit.baselines), so that its scores are not the chance level every untrained model shares."""
    public = write_tiny_site(tmp / "public", train_per_class=16, seed=99)
    settings = JobSettings(
        preset="tiny",
        num_classes=len(TASK_CLASSES),
        num_rounds=12,
        local_epochs=1,
        learning_rate=3e-3,
        batch_size=8,
        freeze_policy="full",
        last_k=1,
        seed=0,
    )
    trained = train_on_sites([public], write_initial_model(tmp / "random.pt"), settings)
    save_checkpoint(tmp / "trained_start.pt", trained["model"], meta={"class_names": list(TASK_CLASSES)})
    return tmp / "trained_start.pt"


@pytest.mark.slow
def test_quick_comparison_writes_the_report_and_reuses_every_run(two_sites, tmp_path, monkeypatch, capsys):
    """FedAvg with the coordinate-wise median (a job that differs from the shipped one in a variable), the
    start and the baselines on two tiny sites, --quick, in the real simulator; then the same call again must
    run nothing. (Several methods at once: the aggregation tests above, on hand-made runs.)"""
    data, _ = two_sites
    initial = trained_start(tmp_path)
    median = tiny_job(tmp_path / "median", aggregation="median")
    out, workspace = tmp_path / "results", tmp_path / "workspace"
    args = [
        "--scenario-data",
        str(data),
        "--initial",
        str(initial),
        "--methods",
        f"fedavg={median}",
        "--seeds",
        "3,4",
        "--quick",
        "--out",
        str(out),
        "--workspace",
        str(workspace),
    ]
    report = compare.main(args)
    progress = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[")]
    assert (
        len(progress) == 5
        and progress[0].startswith("[1/5] start")
        and progress[1].startswith("[2/5] fedavg seed 3: ran")
    )
    assert not report["failures"] and {r["seed"] for r in report["runs"]} == {None, 3}  # --quick: the first seed only
    s = report["settings"]
    assert (s["rounds"], s["local_epochs"], s["seeds"]) == (2, 1, [3])
    training = s["baseline_training"]  # rounds x local epochs
    assert training["equivalent_epochs"] == 2 and training["preset"] == "tiny"

    # the simulator ran the job copy with this comparison's variables and kept the job's own, both sites every round
    fedavg_run = next(Path(r["folder"]) for r in report["runs"] if r["method"] == "fedavg")
    server = json.loads((fedavg_run / "job" / "app" / "config" / "config_fed_server.json").read_text())
    client = json.loads((fedavg_run / "job" / "app" / "config" / "config_fed_client.json").read_text())
    assert (server["num_rounds"], server["min_clients"], client["seed"], client["local_epochs"]) == (2, 2, 3, 1)
    assert server["aggregation"] == "median"
    rounds = json.loads((fedavg_run / "simulator" / "server" / "simulate_job" / "global_val.json").read_text())[
        "rounds"
    ]
    assert [sorted(r["aggregated_sites"]) for r in rounds] == [["site1", "site2"]] * 2

    methods = report["methods"]
    assert set(methods) == {"start", "fedavg", "centralized", "local-only"}
    # round 0 of the global validation scores the untouched initial model: the start's pooled validation accuracy
    start_accuracy = methods["start"]["final_val_accuracy"]
    assert start_accuracy > 0.5, "the trained start should beat chance, else round 0 == start proves nothing"
    curve = methods["fedavg"]["val_curve"]["per_seed"][0]
    assert len(curve) == 3 and curve[0] == pytest.approx(start_accuracy, abs=1e-9)
    assert methods["fedavg"]["gap_share"]["per_seed"].keys() <= {3}
    for name in ("fedavg", "centralized", "local-only"):
        pooled = methods[name]["per_seed"]["3"]["pooled"]
        assert pooled["count"] == 8 and set(methods[name]["sites"]) == {"site1", "site2"}
    for name in ("centralized", "local-only"):  # each baseline against FedAvg on the same seed and test images
        delta = methods[name]["vs_fedavg"]["per_seed"][3]
        expected = methods[name]["per_seed"]["3"]["pooled"][compare.GAP_METRIC]
        assert delta == pytest.approx(expected - methods["fedavg"]["per_seed"]["3"]["pooled"][compare.GAP_METRIC])

    written = json.loads((out / "compare.json").read_text())
    assert written["methods"]["fedavg"]["pooled"] == json.loads(json.dumps(methods["fedavg"]["pooled"]))
    markdown = (out / "compare.md").read_text()
    for row in ("| fedavg |", "| centralized |", "| local-only |", "## Per hospital: balanced accuracy"):
        assert row in markdown
    assert (out / "compare_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    def must_not_run(*args, **kwargs):
        raise AssertionError("a finished run was run again")

    monkeypatch.setattr(compare, "run_simulator", must_not_run)
    monkeypatch.setattr("fedxvit.baselines.train_on_sites", must_not_run)
    again = compare.main(args)
    progress = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[")]
    assert len(progress) == 5 and all(": reused" in line for line in progress)
    assert (
        all(r["reused"] for r in again["runs"]) and again["methods"]["fedavg"]["pooled"] == methods["fedavg"]["pooled"]
    )


def test_known_methods_include_the_privacy_jobs_and_default_to_the_algorithms():
    assert list(compare.parse_methods(None, REPO)) == list(compare.METHOD_JOBS)
    chosen = compare.parse_methods("fedavg,percentile,svt,exclude,dp-sgd-eps1", REPO)
    assert {name: folder.name for name, folder in chosen.items()} == {
        "fedavg": "fedxvit",
        "percentile": "fedxvit_percentile_privacy",
        "svt": "fedxvit_svt_privacy",
        "exclude": "fedxvit_exclude_vars",
        "dp-sgd-eps1": "fedxvit_dp_sgd",
    }
    assert compare.METHOD_CLIENT_VARIABLES["dp-sgd-eps1"] == {"dp_epsilon": 1.0}


def test_set_puts_a_variable_on_the_config_that_defines_it_for_one_method_only():
    """Tuning: the same job under two names, one with another value; a wrong name fails in one line."""
    methods = compare.parse_methods("fedavg,ditto,ditto-l1=ditto,fedsm", REPO)
    assert methods["ditto-l1"] == methods["ditto"]
    chosen = compare.parse_settings(["ditto-l1.ditto_lambda=1", "fedsm.softpull_lambda=0.8"], methods)
    assert chosen == {"ditto-l1": {"client": {"ditto_lambda": 1}}, "fedsm": {"server": {"softpull_lambda": 0.8}}}
    with pytest.raises(FedXViTError, match="has no job variable 'lambda'"):
        compare.parse_settings(["ditto.lambda=1"], methods)
    with pytest.raises(FedXViTError, match="method 'fedprox' is not among --methods"):
        compare.parse_settings(["fedprox.mu=1"], methods)
    with pytest.raises(FedXViTError, match="expected method.variable=value"):
        compare.parse_settings(["ditto_lambda=1"], methods)


def test_personalized_models_get_a_row_of_their_own_beside_their_methods_global_model():
    """Ditto's sites kept their own models: site a's is perfect, so its row differs from the global model's."""
    perfect_a = {"labels": SITE_A["labels"], "probs": [[1.0, 0.0] if y == 0 else [0.0, 1.0] for y in SITE_A["labels"]]}
    results = {}
    for seed in (0, 1):
        both = {"test": {"a": SITE_A, "b": SITE_B}, "validation": {"a": SITE_B, "b": SITE_B}}
        results[("fedavg", seed)] = {**both, "val_curve": [0.5, 0.6]}
        results[("ditto", seed)] = {
            **both,
            "val_curve": [0.5, 0.6],
            "personalized_test": {"a": perfect_a, "b": SITE_B},
            "personalized_validation": {"a": SITE_B, "b": SITE_B},
        }
    report = compare.aggregate(results, ["fedavg", "ditto"], [0, 1], ["a", "b"])
    assert report["order"][:4] == ["start", "fedavg", "ditto", "ditto (personalized)"]
    assert "fedavg (personalized)" not in report["methods"]
    rows = report["methods"]
    assert rows["ditto (personalized)"]["sites"]["a"]["balanced_accuracy"]["mean"] == 1.0
    assert rows["ditto"]["sites"]["a"]["balanced_accuracy"]["mean"] < 1.0
    assert rows["ditto (personalized)"]["sites"]["b"] == rows["ditto"]["sites"]["b"]
    assert "val_curve" not in rows["ditto (personalized)"]  # the curves are the global model's
    # its own verdict on the mean of hospitals: (1.0 + b) / 2 against FedAvg's (a + b) / 2, every seed
    assert rows["ditto (personalized)"]["vs_fedavg_hospitals"]["verdict"] == "better"
    assert rows["ditto"]["vs_fedavg_hospitals"]["verdict"] == "no clear difference"
    tuning = compare.aggregate(results, ["fedavg", "ditto"], [0, 1], ["a", "b"], split="validation")
    assert tuning["methods"]["ditto (personalized)"]["sites"] == tuning["methods"]["fedavg"]["sites"]
    del results[("ditto", 1)]["personalized_validation"]  # a run from before personalized validation scores
    with pytest.raises(FedXViTError, match="the runs of ditto predate validation scores"):
        compare.aggregate(results, ["fedavg", "ditto"], [0, 1], ["a", "b"], split="validation")


def test_four_classes_get_recall_per_class_and_a_validation_split_scores_validation_only(tmp_path):
    """The long-tailed 4-class comparison: recall per class (None where a class is absent), the pooled recall
    row in the report, and --split validation reading each run's validation predictions, never its test ones."""
    four = {
        "labels": [0, 0, 1, 2, 3],
        "probs": [[0.7, 0.1, 0.1, 0.1], [0.1, 0.7, 0.1, 0.1]] + [[0.1, 0.1, 0.7, 0.1]] * 3,
    }
    scores = compare.headline_metrics(four["labels"], four["probs"])
    assert scores["recall"] == [0.5, 0.0, 1.0, 0.0]
    assert scores["balanced_accuracy"] == pytest.approx(0.375)  # the mean of the recalls
    assert compare.headline_metrics([2, 2], [[0, 0, 1, 0]] * 2)["recall"] == [None, None, 1.0, None]

    perfect = {"labels": four["labels"], "probs": [[1.0 if c == y else 0.0 for c in range(4)] for y in four["labels"]]}
    results = {}
    for seed in (0, 1):
        for name in ("fedavg", "fedmas", "centralized", "local-only a"):
            results[(name, seed)] = {"test": {"a": perfect}, "validation": {"a": four}, "final_val_accuracy": 0.4}
    report = compare.aggregate(results, ["fedavg", "fedmas"], [0, 1], ["a"], split="validation")
    row = report["methods"]["fedmas"]
    assert row["pooled"]["balanced_accuracy"]["mean"] == pytest.approx(0.375)
    assert [r["mean"] for r in row["pooled_recall"]] == [0.5, 0.0, 1.0, 0.0]
    finished(report, sites=["a"], class_names=["glioma", "meningioma", "notumor", "pituitary"], split="validation")
    markdown = compare.write_outputs(report, tmp_path)["markdown"].read_text()
    assert "## Pooled validation set: recall per class" in markdown and "**validation** split" in markdown
    assert "| fedmas | 50.0 ± 0.0 | 0.0 ± 0.0 | 100.0 ± 0.0 | 0.0 ± 0.0 |" in markdown
    del results[("fedmas", 1)]["validation"]
    with pytest.raises(FedXViTError, match="predate validation scores"):
        compare.aggregate(results, ["fedavg", "fedmas"], [0, 1], ["a"], split="validation")


def test_longtail_methods_are_fedavg_with_balanced_softmax_and_the_fedmas_job():
    chosen = compare.parse_methods("fedavg,fedavg-bsm,fedmas", REPO)
    assert {name: folder.name for name, folder in chosen.items()} == {
        "fedavg": "fedxvit",
        "fedavg-bsm": "fedxvit",
        "fedmas": "fedxvit_fedmas",
    }
    assert compare.METHOD_CLIENT_VARIABLES["fedavg-bsm"] == {"loss": "bsm"}
