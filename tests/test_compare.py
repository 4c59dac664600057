"""make compare (result_stat.compare and its flow, result_stat.comparison): scores on hand-made predictions,
the report's rows and verdicts, reuse of finished runs (and never of other code's), one-line errors, and
one real --quick comparison on tiny sites. The statistics themselves: test_statistics.py."""

import json
import re
from pathlib import Path

import pytest
import torch
from tiny import REPO, tiny_job, write_initial_model, write_tiny_site

from fedxvit.checkpoint import save_checkpoint
from fedxvit.classes import TASK_CLASSES
from fedxvit.errors import FedXViTError
from result_stat import compare
from result_stat.comparison import plan, runs, scores
from result_stat.comparison import report as comparison
from tooling.baselines import train_on_sites
from tooling.jobconfig import CLIENT_FILE, JobSettings, read_job_config

# site a: labels 0,0,0,1 -> predictions 0,0,1,1; site b holds Tumor images only and misses one of two
SITE_A = {"labels": [0, 0, 0, 1], "probs": [[0.9, 0.1], [0.6, 0.4], [0.4, 0.6], [0.45, 0.55]]}
SITE_B = {"labels": [1, 1], "probs": [[0.1, 0.9], [0.8, 0.2]]}


def test_headline_metrics_on_hand_made_predictions():
    a = scores.headline_metrics(SITE_A["labels"], SITE_A["probs"])
    assert a["accuracy"] == pytest.approx(3 / 4)
    assert a["balanced_accuracy"] == pytest.approx((2 / 3 + 1) / 2)
    assert a["macro_f1"] == pytest.approx((0.8 + 2 / 3) / 2)  # class 0: P 1, R 2/3; class 1: P 1/2, R 1
    assert a["roc_auc"] == pytest.approx(2 / 3)  # the Tumor image (0.55) ranks below one Healthy (0.6)
    b = scores.headline_metrics(SITE_B["labels"], SITE_B["probs"])
    assert (b["accuracy"], b["balanced_accuracy"]) == (0.5, 0.5)  # judged on the one class it holds
    assert b["macro_f1"] == pytest.approx(2 / 3) and b["roc_auc"] is None


def test_pooled_and_per_site_scores_and_the_worst_hospital():
    scored = scores.score_sites({"a": SITE_A, "b": SITE_B})
    pooled = scored["pooled"]
    assert pooled["count"] == 6 and pooled["accuracy"] == pytest.approx(4 / 6)
    assert pooled["balanced_accuracy"] == pytest.approx(2 / 3) and pooled["macro_f1"] == pytest.approx(2 / 3)
    assert pooled["roc_auc"] == pytest.approx(6 / 9)
    assert scored["sites"]["a"]["balanced_accuracy"] == pytest.approx(5 / 6)
    assert scored["worst_site"] == "b"


def test_mean_std_and_curve_bands():
    assert scores.mean_std([0.5, None, 0.7]) == {"mean": pytest.approx(0.6), "std": pytest.approx(0.02**0.5), "n": 2}
    assert scores.mean_std([0.5]) == {"mean": 0.5, "std": None, "n": 1}
    band = scores.curve_band([[0.5, None, 0.7], [0.7, 0.8, 0.9]])
    assert band["mean"] == pytest.approx([0.6, 0.8, 0.8]) and band["min"] == [0.5, 0.8, 0.7] and band["max"][2] == 0.9


def test_finished_runs_are_reused_and_unfinished_ones_redone(tmp_path):
    calls = []

    def compute(folder):
        calls.append(folder)
        return {"test": {}, "value": len(calls)}

    folder = tmp_path / f"fedavg-{runs.options_digest({'rounds': 2, 'seed': 0})}"
    first, reused = runs.run_or_reuse(folder, compute)
    again, reused_again = runs.run_or_reuse(folder, compute)
    assert (reused, reused_again) == (False, True) and again == first and len(calls) == 1 and "wall_s" in first
    (folder / runs.DONE_FILE).unlink()  # as after an interrupted run: no done marker
    assert runs.run_or_reuse(folder, compute) == ({"test": {}, "value": 2, "wall_s": pytest.approx(0, abs=1)}, False)
    assert runs.options_digest({"rounds": 3, "seed": 0}) != runs.options_digest({"rounds": 2, "seed": 0})


def test_a_finished_run_of_other_code_or_libraries_is_run_again(tmp_path, monkeypatch):
    """The run key holds a hash of every first-party module and the library versions: a result computed by
    older code is not reused."""
    calls = []

    def compute(folder):
        calls.append(folder)
        return {"test": {"a": SITE_A}}

    todo = [plan.PlannedRun("fedavg", 0, {"kind": "federated", "seed": 0}, compute)]
    fingerprint = runs.code_fingerprint()
    assert set(fingerprint["libraries"]) >= {"torch", "timm", "monai", "nvflare"} and fingerprint["libraries"]["torch"]
    for key in (fingerprint, fingerprint, {**fingerprint, "code": "changed"}):
        runs.run_plan(todo, tmp_path, key, "test", log=lambda *a, **k: None)
    assert len(calls) == 2 and calls[0] != calls[1]  # the second call reused, the third ran in a new folder
    newer = {**fingerprint, "libraries": {**fingerprint["libraries"], "torch": "9.9"}}
    assert runs.run_folder(tmp_path, "fedavg", {}, newer) != runs.run_folder(tmp_path, "fedavg", {}, fingerprint)

    # the code hash follows the packages' files
    package = tmp_path / "lib" / "somepkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(package.parent))
    before = runs.code_fingerprint(("somepkg",), ())
    (package / "train.py").write_text("LR = 1e-3\n")
    after = runs.code_fingerprint(("somepkg",), ())
    (package / "train.py").write_text("LR = 3e-4\n")
    assert len({before["code"], after["code"], runs.code_fingerprint(("somepkg",), ())["code"]}) == 3
    (package.parent / "somemodule.py").write_text("EPOCHS = 1\n")  # a plain module: its own file
    module_before = runs.code_fingerprint(("somepkg", "somemodule"), ())["code"]
    (package.parent / "somemodule.py").write_text("EPOCHS = 2\n")
    assert runs.code_fingerprint(("somepkg", "somemodule"), ())["code"] != module_before


def first_party_imports(module_names) -> set:
    """Every first-party module the given ones import, transitively, at module level and inside functions (an import
    inside a function runs only when a run calls it): read from their source, nothing executed."""
    import ast
    import importlib.util
    import os
    import pkgutil

    checkout = os.path.realpath(REPO) + os.sep

    def origin(name: str) -> str | None:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            return None
        path = os.path.realpath(spec.origin) if spec and spec.has_location and spec.origin else ""  # not "frozen"
        return path if path.startswith(checkout) and ".venv" not in path else None

    def modules_of(name: str) -> list:  # a package: every module in it; a module: itself
        path = origin(name)
        if path and path.endswith("__init__.py"):
            return [name] + [m.name for m in pkgutil.walk_packages([str(Path(path).parent)], prefix=f"{name}.")]
        return [name] if path else []

    seen, todo = set(), [m for name in module_names for m in modules_of(name)]
    while todo:
        name = todo.pop()
        path = None if name in seen else origin(name)
        if not path:
            continue
        seen.add(name)
        package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(Path(path).read_text())):
            if isinstance(node, ast.Import):
                todo += [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = importlib.util.resolve_name("." * node.level + (node.module or ""), package)
                todo += [base] + [f"{base}.{alias.name}" for alias in node.names]  # a name may be a submodule
    return seen


def test_the_run_key_covers_every_first_party_module_a_run_imports_and_no_report():
    """Wherever code moves, a module that a run's code or a job's config imports is in the run key; the report,
    statistics, tuning choice and CLI are not, so fixing a report keeps the runs."""

    def covered(name: str) -> bool:  # a package around a covered module counts (its __init__.py: a docstring)
        return any(name == c or name.startswith(c + ".") or c.startswith(name + ".") for c in runs.CODE_SOURCES)

    named = {  # the classes the jobs' configs name, and the modules behind them (the simulator imports them by name)
        path.rpartition(".")[0]
        for config in (REPO / "jobs").glob("*/app*/config/*.json")
        for path in re.findall(r'"(?:path|name)"\s*:\s*"([A-Za-z_][\w.]*\.[A-Za-z_]\w*)"', config.read_text())
    }
    imported = first_party_imports([*runs.CODE_SOURCES, *named])
    assert "fedxvit.executor" in named
    assert {"fedxvit.executor", "fedxvit.training", "tooling.baselines", "result_stat.metrics"} <= imported
    assert sorted(name for name in imported if not covered(name)) == []
    for reader in ("result_stat.compare", "result_stat.comparison.report", "result_stat.comparison.statistics"):
        assert not covered(reader) and reader not in imported  # a report's fix never invalidates a run
    # the walk itself sees an import made inside a function: scores imports result_stat.metrics only when it scores
    assert "result_stat.metrics" in first_party_imports(["result_stat.comparison.scores"])
    assert "result_stat.metrics" not in first_party_imports(["result_stat.comparison.statistics"])


def test_the_cohort_hash_follows_the_scored_images_and_labels_only(two_sites):
    """The scored cohort's SHA-256 changes with a test image's content or label, not with the training split."""
    data, initial = two_sites

    def cohort():
        return runs.Scenario(data, ["site1", "site2"], initial, "tiny", 32, "cpu").cohort("test")

    first = cohort()
    assert first["images"] == 8
    datalist_file = data / "site1" / "datalist.json"
    datalist = json.loads(datalist_file.read_text())
    datalist["training"] = datalist["training"][1:]
    datalist_file.write_text(json.dumps(datalist))
    assert cohort() == first
    datalist["testing"][0]["label"] = 1 - datalist["testing"][0]["label"]
    datalist_file.write_text(json.dumps(datalist))
    relabelled = cohort()
    assert relabelled["images"] == 8 and relabelled["sha256"] != first["sha256"]
    datalist["testing"][0]["label"] = 1 - datalist["testing"][0]["label"]
    datalist_file.write_text(json.dumps(datalist))
    assert cohort() == first
    image = data / "site1" / datalist["testing"][0]["image"]  # a test image with other content, where no hash is kept
    info_file = data / "site1" / "dataset.json"
    info = json.loads(info_file.read_text())
    info["content_hashes"] = {}
    info_file.write_text(json.dumps(info))
    assert cohort() == first  # the file's own bytes give the recorded hash
    image.write_bytes(image.read_bytes() + b"\0")
    assert cohort()["sha256"] != first["sha256"]


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


def times(predictions: dict, k: int) -> dict:
    """Every image of {site: predictions} k times: the same scores, enough images for the intervals to decide."""
    return {site: {key: values * k for key, values in p.items()} for site, p in predictions.items()}


def test_aggregate_composes_local_only_and_closes_half_the_gap(tmp_path):
    """Hand-made runs over two seeds, every image 20 times: FedAvg = SITE_A + SITE_B, centralized perfect,
    local-only = site a's own model (SITE_A) + site b's own model (perfect): pooled balanced accuracy 2/3, 1 and
    5/6 -> half the gap; local-only is judged on the mean of hospitals, 11/12 against FedAvg's 2/3."""
    perfect = {
        "a": {"labels": [0, 0, 0, 1], "probs": [[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.2, 0.8]]},
        "b": {"labels": [1, 1], "probs": [[0.2, 0.8], [0.3, 0.7]]},
    }
    fedavg, perfect = times({"a": SITE_A, "b": SITE_B}, 20), times(perfect, 20)
    results = {("start", None): {"test": fedavg, "final_val_accuracy": 0.5}}
    for seed in (0, 1):
        results[("fedavg", seed)] = {"test": fedavg, "val_curve": [0.5, 0.6 + seed / 10, None]}
        results[("centralized", seed)] = {"test": perfect, "final_val_accuracy": 0.9}
        results[("local-only a", seed)] = {"test": {"a": fedavg["a"]}}
        results[("local-only b", seed)] = {"test": {"b": perfect["b"]}}
    report = comparison.aggregate(results, ["fedavg"], [0, 1], ["a", "b"], replicates=500)
    rows = report["methods"]
    local, central = rows["local-only"], rows["centralized"]
    assert local["pooled"]["balanced_accuracy"] == {"mean": pytest.approx(5 / 6), "std": 0.0, "n": 2}
    assert local["vs_fedavg"]["statistic"] == "hospital_mean" and central["vs_fedavg"]["statistic"] == "pooled"
    assert local["vs_fedavg"]["difference"] == pytest.approx(11 / 12 - 2 / 3)
    assert local["vs_fedavg_other"]["difference"] == pytest.approx(5 / 6 - 2 / 3)  # pooled, beside it
    assert central["vs_fedavg"]["difference"] == pytest.approx(1 / 3)
    assert local["vs_fedavg"]["verdict"] == central["vs_fedavg"]["verdict"] == "better"
    assert report["statistics"]["family"] == ["centralized", "local-only"]
    assert local["gap_share"]["status"] == "ok" and local["gap_share"]["share"] == pytest.approx(0.5)
    assert "gap_share" not in central and "vs_fedavg" not in rows["fedavg"] and "vs_fedavg" not in rows["start"]
    assert local["worst_site"]["sites"] == ["a", "a"]
    assert rows["fedavg"]["val_curve"]["mean"] == pytest.approx([0.5, 0.65, None])
    assert rows["start"]["pooled"]["roc_auc"]["std"] is None

    files = comparison.write_outputs(finished(report, sites=["a", "b"]), tmp_path)
    markdown = files["markdown"].read_text()
    assert re.search(
        r"\| local-only \| mean of hospitals \| 91\.7 ± 0\.0 \| \+25\.0 \[\+\d+\.\d, \+\d+\.\d\] \| [<0-9.]+ \| "
        r"\*\*better\*\* \| 50% \[\d+, \d+\] \|",
        markdown,
    )
    assert "| fedavg | pooled | 66.7 ± 0.0 | — | — | reference | — |" in markdown
    assert "| start | pooled | 66.7 | — | — | not compared (the untrained start) | — |" in markdown
    assert "- **Better than FedAvg:** centralized, local-only." in markdown
    # every metric: accuracy 5/6, balanced 5/6, macro-F1 (0.8 + 6/7)/2, ROC-AUC 8/9, worst a, mean of a (5/6) and b (1)
    assert (
        "| local-only | 83.3 ± 0.0 | 83.3 ± 0.0 | 82.9 ± 0.0 | 88.9 ± 0.0 | 83.3 ± 0.0 (a) | 91.7 ± 0.0 | "
        "pooled: +16.7 [" in markdown
    )
    assert "| start | 66.7 | 66.7 | 66.7 | 66.7 | 50.0 (b) | 66.7 | — |" in markdown  # one value: no ±
    written = json.loads(files["json"].read_text())
    assert (
        written["methods"]["local-only"]["vs_fedavg"]["ci"][0] > 0
        and "replicates" not in written["methods"]["local-only"]["vs_fedavg"]
    )
    assert files["curves"].read_bytes()[:4] == files["forest"].read_bytes()[:4] == b"\x89PNG"


@pytest.fixture
def two_sites(tmp_path):
    for i, site in enumerate(("site1", "site2")):
        write_tiny_site(tmp_path / "data" / site, train_per_class=3 + i, val_per_class=2, test_per_class=2, seed=i)
    return tmp_path / "data", write_initial_model(tmp_path / "initial_global.pt")


def test_a_model_that_predicts_nan_is_a_failed_run_in_one_line_not_a_crash(two_sites, tmp_path):
    """A privacy filter's noise can break a model (a BatchNorm variance below 0): its run fails, named, and the
    comparison goes on; it is never scored as a model that answers "Healthy" to everything."""
    from fedxvit.model import build_model

    data, initial = two_sites
    scenario = runs.Scenario(data, ["site1", "site2"], initial, "tiny", 32, "cpu")
    model = build_model("tiny", len(TASK_CLASSES))
    with torch.no_grad():
        model.head.bias.fill_(float("nan"))
    with pytest.raises(FedXViTError, match=r"^the final model's probabilities are not finite on 4 of 4 testing images"):
        scenario.predict(model, "test")

    def broken(folder):
        return {"test": scenario.predict(model, "test")}

    todo = [plan.PlannedRun("svt", 0, {"kind": "federated", "seed": 0}, broken)]
    results, _, failures = runs.run_plan(todo, tmp_path / "ws", {"code": "x"}, "test", log=lambda *a, **k: None)
    assert results == {} and failures[0]["method"] == "svt" and "not finite" in failures[0]["error"]


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
        "--seeds",
        "0,1",
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
    assert error("--methods", "fedavg,fedprox,fedprox").startswith("--methods: 'fedprox' is listed twice")
    assert error("--seeds", "0,1,0").startswith("--seeds '0,1,0': seed 0 is given twice")
    with pytest.raises(SystemExit) as caught:
        compare.main([*base, "--freeze-policy", "frozen"])
    assert caught.value.code == 2 and "--freeze-policy: invalid choice: 'frozen'" in capsys.readouterr().err
    (data / "site2" / "datalist.json").unlink()
    assert "site site2" in error() and "datalist.json" in error()
    with pytest.raises(SystemExit) as caught:
        compare.parse_args(["--help"])
    assert caught.value.code == 0 and "--scenario-data" in capsys.readouterr().out


def trained_start(tmp: Path) -> Path:
    """A tiny initial model that already tells the classes apart (fine-tuned on a public tiny site by
    tooling.baselines), so that its scores are not the chance level every untrained model shares."""
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
    write_tiny_site(data / "heldout", train_per_class=0, val_per_class=2, test_per_class=3, seed=7)  # joins later
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
    assert [w["id"] for w in server["workflows"]] == ["scatter_and_gather"]  # no cross-site evaluation: not read
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
    for name in ("fedavg", "centralized", "local-only"):
        pooled = methods[name]["per_seed"]["3"]["pooled"]
        assert pooled["count"] == 8 and set(methods[name]["sites"]) == {"site1", "site2"}
    # each baseline against FedAvg on the same seed and test images: centralized pooled, local-only per hospital
    fedavg_scores = methods["fedavg"]["per_seed"]["3"]
    assert methods["centralized"]["vs_fedavg"]["difference"] == pytest.approx(
        methods["centralized"]["per_seed"]["3"]["pooled"]["balanced_accuracy"]
        - fedavg_scores["pooled"]["balanced_accuracy"]
    )
    assert methods["local-only"]["vs_fedavg"]["difference"] == pytest.approx(
        methods["local-only"]["hospital_mean"]["balanced_accuracy"]["mean"]
        - methods["fedavg"]["hospital_mean"]["balanced_accuracy"]["mean"]
    )
    assert report["settings"]["tuning"] == {}  # --quick does not tune

    # the held-out hospital scores every global model, in a verdict family of its own, and trains none
    heldout = report["heldout"]
    assert set(heldout["rows"]) == {"start", "fedavg", "centralized"} and heldout["family"] == ["centralized"]
    assert "vs_fedavg" in heldout["rows"]["centralized"] and "vs_fedavg" not in heldout["rows"]["fedavg"]
    centralized_run = next(Path(r["folder"]) for r in report["runs"] if r["method"] == "centralized")
    stored = json.loads((centralized_run / "result.json").read_text())
    assert len(stored["heldout"]["test"]["heldout"]["labels"]) == 6 and stored["train_images"] == 2 * 3 + 2 * 4

    written = json.loads((out / "compare.json").read_text())
    assert written["methods"]["fedavg"]["pooled"] == json.loads(json.dumps(methods["fedavg"]["pooled"]))
    cohort = written["settings"]["cohorts"]["test"]  # two sites' 4 test images each and the held-out hospital's 6
    assert cohort["images"] == 14 and written["settings"]["cohorts"]["validation"]["images"] == 2 * 4 + 4
    markdown = (out / "compare.md").read_text()
    assert f"14 testing images, SHA-256 `{cohort['sha256']}`" in markdown
    for row in ("| fedavg |", "| centralized |", "| local-only |", "## Per hospital: balanced accuracy", "joins later"):
        assert row in markdown
    for figure in ("compare_curves.png", "compare_forest.png"):
        assert (out / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    def must_not_run(*args, **kwargs):
        raise AssertionError("a finished run was run again")

    monkeypatch.setattr(runs, "run_simulator", must_not_run)
    monkeypatch.setattr("tooling.baselines.train_on_sites", must_not_run)
    again = compare.main(args)
    progress = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[")]
    assert len(progress) == 5 and all(": reused" in line for line in progress)
    assert (
        all(r["reused"] for r in again["runs"]) and again["methods"]["fedavg"]["pooled"] == methods["fedavg"]["pooled"]
    )
    costs = (out / "compare.md").read_text()  # what each part cost when it ran, said again when reused
    fedavg_s = next(r["wall_s"] for r in report["runs"] if r["method"] == "fedavg")
    assert f"| fedavg | 1 | 1 | {fedavg_s:.0f} | {fedavg_s:.0f} |" in costs and "| local-only | 2 | 2 |" in costs


def test_known_methods_include_the_privacy_jobs_and_default_to_the_algorithms():
    assert list(plan.parse_methods(None, REPO)) == list(plan.METHOD_JOBS)
    chosen = plan.parse_methods("fedavg,percentile,svt,exclude,dp-sgd-eps1", REPO)
    assert {name: folder.name for name, folder in chosen.items()} == {
        "fedavg": "fedxvit",
        "percentile": "fedxvit_percentile_privacy",
        "svt": "fedxvit_svt_privacy",
        "exclude": "fedxvit_exclude_vars",
        "dp-sgd-eps1": "fedxvit_dp_sgd",
    }
    assert plan.METHOD_CLIENT_VARIABLES["dp-sgd-eps1"] == {"dp_epsilon": 1.0}


def test_set_puts_a_variable_on_the_config_that_defines_it_for_one_method_only():
    """Tuning: the same job under two names, one with another value; a wrong name fails in one line."""
    methods = plan.parse_methods("fedavg,ditto,ditto-l1=ditto,fedsm", REPO)
    assert methods["ditto-l1"] == methods["ditto"]
    chosen = plan.parse_settings(["ditto-l1.ditto_lambda=1", "fedsm.softpull_lambda=0.8"], methods)
    assert chosen == {"ditto-l1": {"client": {"ditto_lambda": 1}}, "fedsm": {"server": {"softpull_lambda": 0.8}}}
    with pytest.raises(FedXViTError, match="has no job variable 'lambda'"):
        plan.parse_settings(["ditto.lambda=1"], methods)
    with pytest.raises(FedXViTError, match="method 'fedprox' is not among --methods"):
        plan.parse_settings(["fedprox.mu=1"], methods)
    with pytest.raises(FedXViTError, match="expected method.variable=value"):
        plan.parse_settings(["ditto_lambda=1"], methods)


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
    report = comparison.aggregate(results, ["fedavg", "ditto"], [0, 1], ["a", "b"])
    assert report["order"][:4] == ["start", "fedavg", "ditto", "ditto (personalized)"]
    assert "fedavg (personalized)" not in report["methods"]
    rows = report["methods"]
    assert rows["ditto (personalized)"]["sites"]["a"]["balanced_accuracy"]["mean"] == 1.0
    assert rows["ditto"]["sites"]["a"]["balanced_accuracy"]["mean"] < 1.0
    assert rows["ditto (personalized)"]["sites"]["b"] == rows["ditto"]["sites"]["b"]
    assert "val_curve" not in rows["ditto (personalized)"]  # the curves are the global model's
    # judged on the mean of hospitals: (1.0 + b) / 2 against FedAvg's (a + b) / 2, a = 5/6; the global model
    # (the same predictions as FedAvg's) on pooled balanced accuracy, exactly equal
    personal = rows["ditto (personalized)"]["vs_fedavg"]
    assert personal["statistic"] == "hospital_mean" and personal["difference"] == pytest.approx((1 - 5 / 6) / 2)
    assert rows["ditto"]["vs_fedavg"]["statistic"] == "pooled" and rows["ditto"]["vs_fedavg"]["ci"] == [0.0, 0.0]
    assert rows["ditto"]["vs_fedavg"]["verdict"] == "equivalent"
    tuning = comparison.aggregate(results, ["fedavg", "ditto"], [0, 1], ["a", "b"], split="validation")
    assert tuning["methods"]["ditto (personalized)"]["sites"] == tuning["methods"]["fedavg"]["sites"]
    del results[("ditto", 1)]["personalized_validation"]  # a run from before personalized validation scores
    with pytest.raises(FedXViTError, match="the runs of ditto predate validation scores"):
        comparison.aggregate(results, ["fedavg", "ditto"], [0, 1], ["a", "b"], split="validation")


def test_four_classes_get_recall_per_class_and_a_validation_split_scores_validation_only(tmp_path):
    """The long-tailed 4-class comparison: recall per class (None where a class is absent), the pooled recall
    row in the report, and --split validation reading each run's validation predictions, never its test ones."""
    four = {
        "labels": [0, 0, 1, 2, 3],
        "probs": [[0.7, 0.1, 0.1, 0.1], [0.1, 0.7, 0.1, 0.1]] + [[0.1, 0.1, 0.7, 0.1]] * 3,
    }
    scored = scores.headline_metrics(four["labels"], four["probs"])
    assert scored["recall"] == [0.5, 0.0, 1.0, 0.0]
    assert scored["balanced_accuracy"] == pytest.approx(0.375)  # the mean of the recalls
    assert scores.headline_metrics([2, 2], [[0, 0, 1, 0]] * 2)["recall"] == [None, None, 1.0, None]

    perfect = {"labels": four["labels"], "probs": [[1.0 if c == y else 0.0 for c in range(4)] for y in four["labels"]]}
    results = {}
    for seed in (0, 1):
        for name in ("fedavg", "fedmas", "centralized", "local-only a"):
            results[(name, seed)] = {"test": {"a": perfect}, "validation": {"a": four}, "final_val_accuracy": 0.4}
    report = comparison.aggregate(results, ["fedavg", "fedmas"], [0, 1], ["a"], split="validation")
    row = report["methods"]["fedmas"]
    assert row["pooled"]["balanced_accuracy"]["mean"] == pytest.approx(0.375)
    assert [r["mean"] for r in row["pooled_recall"]] == [0.5, 0.0, 1.0, 0.0]
    finished(report, sites=["a"], class_names=["glioma", "meningioma", "notumor", "pituitary"], split="validation")
    markdown = comparison.write_outputs(report, tmp_path)["markdown"].read_text()
    assert "## Pooled validation set: recall per class" in markdown and "**validation** split" in markdown
    assert "| fedmas | 50.0 ± 0.0 | 0.0 ± 0.0 | 100.0 ± 0.0 | 0.0 ± 0.0 |" in markdown
    del results[("fedmas", 1)]["validation"]
    with pytest.raises(FedXViTError, match="predate validation scores"):
        comparison.aggregate(results, ["fedavg", "fedmas"], [0, 1], ["a"], split="validation")


def test_longtail_methods_are_fedavg_with_balanced_softmax_and_the_fedmas_job():
    chosen = plan.parse_methods("fedavg,fedavg-bsm,fedmas", REPO)
    assert {name: folder.name for name, folder in chosen.items()} == {
        "fedavg": "fedxvit",
        "fedavg-bsm": "fedxvit",
        "fedmas": "fedxvit_fedmas",
    }
    assert plan.METHOD_CLIENT_VARIABLES["fedavg-bsm"] == {"loss": "bsm"}


def test_tuning_chooses_on_validation_and_the_evaluation_runs_use_the_choice(two_sites, tmp_path, monkeypatch):
    """compare(tuning=True) with a stand-in for the simulator (the orchestration is what is tested here; the
    real runs: the quick comparison above). FedProx's mu=0.1 is best on validation, mu=0.01 on test."""
    data, initial = two_sites
    seen, policies = [], set()

    def answers(scenario, split: str, right: bool) -> dict:
        """Every image of a split answered confidently, all right or all wrong."""
        labels = {s: p["labels"] for s, p in scenario.predict(model, split).items()}
        return {
            s: {"labels": ys, "probs": [[1.0, 0.0] if (y == 0) == right else [0.0, 1.0] for y in ys]}
            for s, ys in labels.items()
        }

    def fake_federated_run(scenario, job, rounds, local_epochs, seed, uri, timeout, client=None, server=None):
        policies.add(json.loads((job / "app" / "config" / "config_fed_client.json").read_text())["freeze_policy"])

        def compute(folder):
            seen.append((seed, dict(client or {})))
            best_on_validation = (client or {}).get("mu") == 0.1
            return {
                "validation": answers(scenario, "validation", best_on_validation),
                "test": answers(scenario, "test", not best_on_validation),
                "val_curve": [0.5],
                "final_val_accuracy": 0.5,
            }

        return compute

    from fedxvit.checkpoint import build_model_from_checkpoint

    model, _ = build_model_from_checkpoint(initial, preset="tiny")
    monkeypatch.setattr(runs, "federated_run", fake_federated_run)
    monkeypatch.setitem(plan.TUNING_GRIDS, "fedprox", [{"mu": 0.01}, {"mu": 0.1}])
    monkeypatch.setitem(plan.TUNING_GRIDS, "fedavg", [{"learning_rate": 1e-3}])
    methods = {
        "fedavg": tiny_job(tmp_path / "fedavg"),
        "fedprox": tiny_job(tmp_path / "fedprox", REPO / "jobs" / "fedxvit_fedprox"),
    }
    lines = []
    report = compare.compare(
        data,
        initial,
        methods,
        [0, 1],
        rounds=1,
        workspace=tmp_path / "ws",
        tuning=True,
        replicates=200,
        log=lambda *a, **k: lines.append(a[0]),
        freeze_policy="full",
    )
    # the budget's freeze policy: every method's runs and the baselines train the whole model, not the jobs' last-k
    assert policies == {"full"} and report["settings"]["baseline_training"]["freeze_policy"] == "full"
    assert report["settings"]["freeze_policy"] == "full"
    assert {read_job_config(methods[m], CLIENT_FILE)["freeze_policy"] for m in methods} == {"last-k"}  # untouched
    tuned = report["settings"]["tuning"]["fedprox"]
    assert tuned["chosen"] == {"mu": 0.1} and tuned["validation_scores"][1] > tuned["validation_scores"][0]
    # FedProx trains with FedAvg's chosen learning rate, tuning its own mu on top
    assert report["settings"]["method_variables"]["fedprox"] == {"client": {"learning_rate": 1e-3, "mu": 0.1}}
    fedprox_runs = [(seed, client) for seed, client in seen if "mu" in client]
    # the grid at seed 0 (two runs), then seed 1 at the chosen value; seed 0's evaluation run is the tuning run
    assert fedprox_runs == [(0, {"learning_rate": 1e-3, "mu": mu}) for mu in (0.01, 0.1)] + [
        (1, {"learning_rate": 1e-3, "mu": 0.1})
    ]
    assert report["settings"]["baseline_training"]["learning_rate"] == 1e-3  # the baselines too
    evaluation = [r for r in report["runs"] if r["method"] == "fedprox"]
    assert [(r["seed"], r["reused"]) for r in evaluation] == [(0, False), (0, False), (0, True), (1, False)]
    # what it cost: every run it computed once; seed 0's evaluation runs are tuning runs, listed twice, counted once
    assert report["compute_s"] == round(sum(r["wall_s"] for r in report["runs"] if not r["reused"]), 1)
    assert len(comparison.distinct_runs(report["runs"])) == len(report["runs"]) - 2  # FedAvg's and FedProx's
    assert any("fedprox: tuned on validation, chosen mu=0.1" in line for line in lines)
    assert any("ETA" in line for line in lines)
    assert "tuning: 3 of 3 grid runs done" in lines  # FedAvg's one run and FedProx's two


def test_the_eta_counts_each_row_at_its_own_pace_else_its_kinds():
    def planned(name, kind):
        return plan.PlannedRun(name, 0, {"kind": kind}, lambda folder: {})

    todo = [planned("fedavg", "federated"), planned("fedsm", "federated"), planned("fedsm", "federated")]
    todo.append(planned("centralized", "centralized"))
    timed = {"fedavg": [90.0, 150.0], "federated": [90.0, 150.0]}
    assert runs.estimate_left(todo, [1, 2], timed) == "; ETA 4 min for 2 run(s)"  # FedSM at the federated pace
    timed = {**timed, "fedsm": [300.0], "federated": [90.0, 150.0, 300.0]}
    assert runs.estimate_left(todo, [2], timed) == "; ETA 5 min for 1 run(s)"  # at FedSM's own
    assert runs.estimate_left(todo, [2, 3], timed) == (
        "; ETA at least 5 min (no centralized run timed yet) for 2 run(s)"
    )
    assert runs.estimate_left(todo, [3], timed) == "; ETA unknown (no centralized run timed yet) for 1 run(s)"
    assert runs.estimate_left(todo, [], timed) == "" == runs.estimate_left(todo, [3], {})


def test_a_resumed_comparison_counts_its_reused_runs_pace(tmp_path):
    """Runs finished earlier set the ETA of the ones left from the first progress line: it never reads 'at least
    0 min' because this call has not timed anything yet."""

    def compute(folder):
        return {"test": {"a": SITE_A}}

    def planned(name, seed):
        return plan.PlannedRun(name, seed, {"kind": "federated", "seed": seed}, compute)

    fingerprint = {"code": "x"}
    runs.run_plan([planned("fedavg", 0)], tmp_path, fingerprint, "test", log=lambda *a, **k: None)
    finished = runs.run_folder(tmp_path, "fedavg", {"kind": "federated", "seed": 0}, fingerprint) / runs.DONE_FILE
    finished.write_text(json.dumps({**json.loads(finished.read_text()), "wall_s": 600.0}))  # as if it took 10 min
    lines = []
    runs.run_plan(
        [planned("fedavg", 0), planned("fedavg", 1)], tmp_path, fingerprint, "test", log=lambda s, **k: lines.append(s)
    )
    assert "reused" in lines[0] and lines[0].endswith("; ETA 10 min for 1 run(s)")


def test_every_tuning_grid_names_its_jobs_variables_and_starts_at_their_defaults():
    """A grid that named a variable its job lacks would fail only hours into `make compare`."""
    from tooling.jobconfig import CLIENT_FILE, SERVER_FILE, read_job_config

    for name, grid in plan.TUNING_GRIDS.items():
        job = REPO / plan.KNOWN_METHODS[name]
        for values in grid:
            plan.place_variables(job, values, f"grid of {name}")
        configs = {**read_job_config(job, SERVER_FILE), **read_job_config(job, CLIENT_FILE)}
        assert {k: configs[k] for k in grid[0]} == grid[0], f"{name}: the first value set must be the job's own"
        assert len({json.dumps(v, sort_keys=True) for v in grid}) == len(grid), f"{name}: a value set twice"


def test_the_tuning_eta_takes_each_methods_runs_at_its_own_pace_else_the_mean_so_far():
    left, total = {"fedavg": 0, "svt": 2, "dp-sgd-eps3": 2}, 7
    assert compare.tuning_progress(left, {}, total) == "tuning: 3 of 7 grid runs done"  # nothing timed: no ETA
    timed = {"fedavg": [100.0, 200.0], "svt": [150.0]}  # a failed run is done but not timed
    # SVT at its own 150 s, DP-SGD at the mean of every timed run (150 s): 4 x 150 s
    assert compare.tuning_progress(left, timed, total) == (
        "tuning: 3 of 7 grid runs done; ETA 10 min for the 4 left, then the evaluation runs"
    )
    timed["dp-sgd-eps3"] = [450.0]
    assert compare.tuning_progress({**left, "dp-sgd-eps3": 1}, timed, total).endswith(
        "ETA 12 min for the 3 left, then the evaluation runs"
    )


def test_a_run_listed_twice_costs_once():
    """Seed 0's evaluation run of a tuned method is its chosen tuning run, reused: one run, one cost."""
    listed = [
        {"method": "fedavg", "folder": "runs/fedavg-1", "reused": False, "wall_s": 200.0},
        {"method": "fedavg", "folder": "runs/fedavg-2", "reused": False, "wall_s": 180.0},
        {"method": "fedavg", "folder": "runs/fedavg-1", "reused": True, "wall_s": 200.0},
        {"method": "local-only site1", "folder": "runs/local-only-site1", "reused": False, "wall_s": 5.0},
    ]
    assert comparison.run_costs(listed) == {
        "fedavg": {"runs": 2, "reused": 0, "compute_s": 380.0},
        "local-only": {"runs": 1, "reused": 0, "compute_s": 5.0},
    }
