"""Which algorithm should the hospitals use? Every method on the same data, initial model, rounds and epochs.

    python -m result_stat.compare [--scenario-data data/skewed] [--methods fedavg,fedprox,...] [--seeds 0,1,2] [--quick]

For each seed, every federated method (a job folder run in NVFlare's simulator over all sites),
the centralized baseline (all sites' training splits pooled) and the local-only baseline (each
hospital alone) start from the same initial model and see every training image equally often
(baselines: epochs = rounds x local epochs, fedxvit.baselines). Each final model is scored on
every site's TEST split; nothing is selected or tuned on it (the curves use validation splits).
A method whose sites keep personalized models gets a second row, "<method> (personalized)": Ditto's,
each hospital's own model on its own test split (a hospital without one: the global model, said
in one line); FedSM's, the super-model (fedsm_super_model: the selector routes each image, with
the threshold chosen on validation). Writes compare.json, compare.md and compare_curves.png into --out. Every finished
run keeps its result in <workspace>/runs/<method>-<options hash>/result.json, so a re-run reuses it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
import warnings
from pathlib import Path

import numpy as np

from fedxvit.errors import ArgumentParser, FedXViTError, run_cli
from fedxvit.simulation import CLIENT_CONFIG, GLOBAL_MODEL, SERVER_CONFIG, job_copy, read_job_config, run_simulator

METHOD_JOBS = {  # method -> job folder; a personalized method joins by adding its job here (or --methods name=folder)
    "fedavg": "jobs/fedxvit",
    "fedprox": "jobs/fedxvit_fedprox",
    "fedopt": "jobs/fedxvit_fedopt",
    "scaffold": "jobs/fedxvit_scaffold",
    "cyclic": "jobs/fedxvit_cyclic",
    "ditto": "jobs/fedxvit_ditto",  # also scored as "ditto (personalized)": each site's own model
    "fedsm": "jobs/fedxvit_fedsm",  # also scored as "fedsm (personalized)": the selector-routed super-model
}
PRIVACY_METHOD_JOBS = {  # FedAvg behind one of NVFlare's privacy filters (make compare-privacy; docs/privacy.md)
    "percentile": "jobs/fedxvit_percentile_privacy",
    "svt": "jobs/fedxvit_svt_privacy",
    "exclude": "jobs/fedxvit_exclude_vars",
    **{f"dp-sgd-eps{eps}": "jobs/fedxvit_dp_sgd" for eps in (1, 3, 8)},
}
LONGTAIL_METHOD_JOBS = {  # long-tailed 4-class scenario (make compare-longtail; docs/imbalance.md)
    "fedavg-bsm": "jobs/fedxvit",  # FedAvg, the sites training with Balanced Softmax
    "fedmas": "jobs/fedxvit_fedmas",  # Balanced Softmax + MAS aggregation weights
}
KNOWN_METHODS = {**METHOD_JOBS, **PRIVACY_METHOD_JOBS, **LONGTAIL_METHOD_JOBS}
# client variables a known method sets on its job copy: one job, several settings (DP-SGD's budget per run)
METHOD_CLIENT_VARIABLES = {
    **{f"dp-sgd-eps{eps}": {"dp_epsilon": float(eps)} for eps in (1, 3, 8)},
    "fedavg-bsm": {"loss": "bsm"},
}
REFERENCE, CENTRALIZED, LOCAL_ONLY, START = "fedavg", "centralized", "local-only", "start"
METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "roc_auc")
GAP_METRIC = "balanced_accuracy"
DONE_FILE = "result.json"
QUICK_ROUNDS = 2
SPLITS = {"test": "testing", "validation": "validation"}


# ---- scoring and aggregation: plain functions on predictions ----


def headline_metrics(labels, probs) -> dict:
    """accuracy, balanced accuracy, macro-F1, ROC-AUC, recall per class and count of one set of predictions.

    Balanced accuracy (the mean of the per-class recalls) and macro-F1 average over the classes present in
    `labels` (a hospital whose test split holds one class is judged on that class, not punished for the
    absent one); `recall` lists every class, None where absent. Accuracy and ROC-AUC come from
    result_stat.metrics, the project's one home for them."""
    from sklearn.metrics import balanced_accuracy_score, f1_score

    from result_stat.metrics import classification_metrics

    num_classes = len(probs[0]) if len(probs) else 2
    full = classification_metrics(labels, probs, [str(c) for c in range(num_classes)])
    if not full["count"]:
        return {**{m: None for m in METRICS}, "recall": [None] * num_classes, "count": 0}
    labels = np.asarray(labels, dtype=int)
    predictions = np.asarray(probs, dtype=float).argmax(1)
    with warnings.catch_warnings():  # one class present: sklearn warns about the absent one, which we leave out
        warnings.simplefilter("ignore")
        balanced = float(balanced_accuracy_score(labels, predictions))
    macro_f1 = float(
        f1_score(labels, predictions, labels=sorted(set(labels.tolist())), average="macro", zero_division=0)
    )
    present = set(labels.tolist())  # scikit-learn's report gives an absent class recall 0; here it has none
    recall = [float(full["per_class"][str(c)]["recall"]) if c in present else None for c in range(num_classes)]
    return {
        "accuracy": full["accuracy"],
        "balanced_accuracy": balanced,
        "macro_f1": macro_f1,
        "roc_auc": full["roc_auc"],
        "recall": recall,
        "count": full["count"],
    }


def score_sites(predictions: dict) -> dict:
    """{site: {"labels", "probs"}} -> {"pooled": metrics, "sites": {site: metrics}, "worst_site": name}:
    pooled = all sites' test images together; worst hospital = lowest balanced accuracy."""
    sites = {site: headline_metrics(p["labels"], p["probs"]) for site, p in predictions.items()}
    labels = [y for p in predictions.values() for y in p["labels"]]
    probs = [q for p in predictions.values() for q in p["probs"]]
    worst = min(sites, key=lambda s: sites[s]["balanced_accuracy"])
    return {"pooled": headline_metrics(labels, probs), "sites": sites, "worst_site": worst}


def mean_std(values) -> dict:
    """Mean and sample standard deviation (ddof 1) of the values that are not None; std None for fewer than 2."""
    values = [float(v) for v in values if v is not None]
    if not values:
        return {"mean": None, "std": None, "n": 0}
    return {
        "mean": float(np.mean(values)),
        "std": float(np.std(values, ddof=1)) if len(values) > 1 else None,
        "n": len(values),
    }


def versus_reference(method: dict, reference: dict) -> dict:
    """method - reference per seed ({seed: value} each) with a verdict: "better" / "worse" only when the
    mean difference exceeds the seeds' spread of it; one seed gives no verdict."""
    seeds = sorted(set(method) & set(reference))
    deltas = [method[s] - reference[s] for s in seeds]
    summary = mean_std(deltas)
    if summary["std"] is None:
        verdict = "one seed: no verdict" if deltas else "no common seed"
    elif summary["mean"] > summary["std"]:
        verdict = "better"
    elif -summary["mean"] > summary["std"]:
        verdict = "worse"
    else:
        verdict = "no clear difference"
    return {**summary, "per_seed": dict(zip(seeds, deltas)), "verdict": verdict}


def gap_share(method: dict, fedavg: dict, centralized: dict) -> dict:
    """Share of the FedAvg->centralized gap a method closes: (method - fedavg) / (centralized - fedavg)
    per seed ({seed: value} each), then mean +- std. "n/a" when the mean gap is not larger than its
    spread over seeds (std of the per-seed gaps): a share of noise would be noise."""
    seeds = sorted(set(method) & set(fedavg) & set(centralized))
    gaps = {s: centralized[s] - fedavg[s] for s in seeds}
    gap = mean_std(gaps.values())
    spread = gap["std"] or 0.0
    if gap["mean"] is None or gap["mean"] <= spread:
        what = (
            "no common seed"
            if gap["mean"] is None
            else (f"the FedAvg->centralized gap {gap['mean']:+.4f} is not above its spread over seeds {spread:.4f}")
        )
        return {"mean": None, "std": None, "n": 0, "per_seed": {}, "gap": gap, "status": "n/a", "why": what}
    per_seed = {s: (method[s] - fedavg[s]) / gaps[s] if gaps[s] > 0 else None for s in seeds}
    return {**mean_std(per_seed.values()), "per_seed": per_seed, "gap": gap, "status": "ok"}


def summarize_method(per_seed: dict) -> dict:
    """{seed: score_sites result} -> mean +- std over seeds of every pooled and per-site metric and of
    the worst site."""
    scores = list(per_seed.values())
    sites = list(scores[0]["sites"]) if scores else []
    num_classes = len(scores[0]["pooled"].get("recall", [])) if scores else 0
    return {
        "pooled": {m: mean_std(s["pooled"][m] for s in scores) for m in METRICS},
        "pooled_recall": [mean_std(s["pooled"]["recall"][c] for s in scores) for c in range(num_classes)],
        "sites": {site: {m: mean_std(s["sites"][site][m] for s in scores) for m in METRICS} for site in sites},
        "worst_site": {
            "balanced_accuracy": mean_std(s["sites"][s["worst_site"]]["balanced_accuracy"] for s in scores),
            "sites": [s["worst_site"] for s in scores],
        },
        # every hospital counts once, whatever its test split's size (pooled scores favour the large ones)
        "hospital_mean": {"balanced_accuracy": mean_std(hospital_mean(s) for s in scores)},
    }


def hospital_mean(scores: dict) -> float:
    """The mean of the per-hospital balanced accuracies of one score_sites result: every hospital counts once,
    whatever its split's size (pooled scores favour the large ones)."""
    return float(np.mean([site["balanced_accuracy"] for site in scores["sites"].values()]))


def curve_band(curves: list) -> dict:
    """Per-seed curves (lists, None where a round has no value) -> mean, min and max per round."""
    length = max((len(c) for c in curves), default=0)
    columns = [[c[i] for c in curves if i < len(c) and c[i] is not None] for i in range(length)]
    return {
        key: [float(f(col)) if col else None for col in columns]
        for key, f in (("mean", np.mean), ("min", np.min), ("max", np.max))
    }


# ---- runs: folder per option set, reused when finished ----


def options_digest(options: dict) -> str:
    return hashlib.sha256(json.dumps(options, sort_keys=True, default=str).encode()).hexdigest()[:10]


def files_digest(paths) -> str:
    """Content hash of files (folders: every file under them, by relative path)."""
    digest = hashlib.sha256()
    for path in map(Path, paths):
        files = (
            sorted(p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
            if path.is_dir()
            else [path]
        )
        for file in files:
            digest.update(str(file.relative_to(path) if path.is_dir() else file.name).encode())
            digest.update(file.read_bytes())
    return digest.hexdigest()[:16]


def run_or_reuse(folder: Path, compute) -> tuple[dict, bool]:
    """(result, reused): the result.json of a finished run in `folder`, else compute(folder), saved there.
    The file is written last and atomically, so an interrupted run is redone, never half reused."""
    done = folder / DONE_FILE
    if done.is_file():
        return json.loads(done.read_text()), True
    folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    result = compute(folder)
    result["wall_s"] = round(time.perf_counter() - started, 1)
    tmp = done.with_name(DONE_FILE + ".tmp")
    tmp.write_text(json.dumps(result) + "\n")
    os.replace(tmp, done)
    return result, False


class Scenario:
    """The fixed part of every run: data, sites, initial model, preset, device; loaders built once, on first use."""

    def __init__(
        self,
        data: Path,
        sites: list,
        initial: Path,
        preset: str,
        image_size: int,
        device: str | None,
        class_names: list | None = None,
    ):
        from fedxvit.classes import TASK_CLASSES
        from fedxvit.training import resolve_device

        self.data, self.sites, self.initial, self.preset = data, sites, initial, preset
        self.class_names = list(class_names or TASK_CLASSES)
        self.num_classes = len(self.class_names)
        self.image_size, self.device = image_size, resolve_device(device)
        self._loaders = {}
        self.fingerprint = {
            "data": files_digest(data / s / f for s in sites for f in ("datalist.json", "dataset.json")),
            "initial": files_digest([initial]),
            "sites": sites,
            "preset": preset,
        }
        if self.num_classes != len(TASK_CLASSES):  # only then: the 2-class runs keep their folder names
            self.fingerprint["num_classes"] = self.num_classes

    def site_dir(self, site: str) -> Path:
        return self.data / site

    def loaders(self, split: str) -> dict:
        from fedxvit.data import make_loader

        if split not in self._loaders:
            self._loaders[split] = {
                s: make_loader(self.site_dir(s), SPLITS[split], self.image_size, 32, train=False) for s in self.sites
            }
        return self._loaders[split]

    def predict(self, model, split: str, sites=None) -> dict:
        """{site: {"labels", "probs"}} of a model on a split of the given sites (default all)."""
        from fedxvit.training import evaluate

        loaders = self.loaders(split)
        out = {}
        for site in sites or self.sites:
            result = evaluate(model, loaders[site], self.device)
            out[site] = {"labels": result["labels"], "probs": [[round(p, 6) for p in row] for row in result["probs"]]}
        return out


def pooled_accuracy(predictions: dict) -> float:
    labels = [y for p in predictions.values() for y in p["labels"]]
    correct = [int(np.argmax(q) == y) for p in predictions.values() for q, y in zip(p["probs"], p["labels"])]
    return sum(correct) / max(1, len(labels))


def validation_curve(run_dir: Path, rounds: int) -> list:
    """Pooled global validation accuracy after 0..rounds-1 rounds from global_val.json (round r scores the model
    of round r-1, round 0 the start); [] when the job writes none (e.g. cyclic). A short table is a failed run."""
    path = run_dir / "global_val.json"
    if not path.is_file():
        return []
    rows = sorted(json.loads(path.read_text()).get("rounds", []), key=lambda r: r["round"])
    if len(rows) < rounds:
        raise FedXViTError(f"{path}: the run finished {len(rows)} of {rounds} rounds")
    return [row.get("global_val_accuracy") for row in rows[:rounds]]


def personalized(name: str) -> str:
    """The row of a method's personalized models (Ditto), beside the row of its global model."""
    return f"{name} (personalized)"


def personalized_models(simulator_dir: Path, sites: list, preset: str, device, num_classes: int = 2) -> dict:
    """{site: model or None} of the personalized models a simulator run's sites kept (Ditto's best one, in each
    site's app folder); {} when the job keeps none. None: that site has none, so it is scored with the global
    model."""
    from fedxvit.algorithms import PERSONALIZED_MODEL
    from fedxvit.checkpoint import load_global_model

    files = {s: simulator_dir / s / "simulate_job" / f"app_{s}" / PERSONALIZED_MODEL for s in sites}
    if not any(f.is_file() for f in files.values()):
        return {}
    return {s: load_global_model(f, preset, num_classes, device) if f.is_file() else None for s, f in files.items()}


def fedsm_super_model(run_dir: Path, scenario: Scenario, global_model) -> dict | None:
    """FedSM's super-model of a run (fedxvit.fedsm.super_model; None without its saved models), its routing
    threshold chosen on pooled validation balanced accuracy."""
    from fedxvit.fedsm import MODELS_FILE, load_fedsm_models, super_model

    path = run_dir / "app_server" / MODELS_FILE
    if not path.is_file():
        return None
    models = load_fedsm_models(path, global_model, scenario.preset, scenario.device)
    return super_model(models, global_model, scenario.predict, lambda p: score_sites(p)["pooled"][GAP_METRIC])


def federated_run(
    scenario: Scenario,
    job: Path,
    rounds: int,
    local_epochs: int,
    seed: int,
    tracking_uri: str,
    timeout_s: int,
    client_variables: dict | None = None,
    server_variables: dict | None = None,
):
    """compute() of one federated run: the job copy with this run's variables (and the method's own
    variables, e.g. DP-SGD's budget or a --set value), the simulator, then scores."""
    from fedxvit.checkpoint import load_global_model

    def compute(folder: Path) -> dict:
        copy = job_copy(
            job,
            folder / "job",
            server={
                **(server_variables or {}),
                "num_rounds": rounds,
                "min_clients": len(scenario.sites),
                "preset": scenario.preset,
                "num_classes": scenario.num_classes,
                "tracking_uri": tracking_uri,
                "registered_model_name": "",  # a comparison's models are experiments, not versions to deploy
            },
            client={
                **(client_variables or {}),
                "local_epochs": local_epochs,
                "seed": seed,
                "preset": scenario.preset,
                "num_classes": scenario.num_classes,
            },
            optional=("min_clients", "tracking_uri", "registered_model_name"),
        )
        run_dir = run_simulator(copy, folder / "simulator", scenario.data, scenario.sites, scenario.initial, timeout_s)
        model = load_global_model(run_dir / GLOBAL_MODEL, scenario.preset, scenario.num_classes, scenario.device)
        validation = scenario.predict(model, "validation")
        final_val = pooled_accuracy(validation)
        curve = validation_curve(run_dir, rounds)
        result = {
            "run_dir": str(run_dir),
            "test": scenario.predict(model, "test"),
            "validation": validation,
            "final_val_accuracy": final_val,
            "val_curve": (curve or [None] * rounds) + [final_val],
        }
        super_model = fedsm_super_model(run_dir, scenario, model)
        if super_model:  # FedSM: the selector routes each image; scored like a personalized model
            result["personalized_test"] = super_model.pop("test")
            result["personalized_validation"] = super_model.pop("validation")  # at the threshold chosen on it
            result["personalized_fallback"] = super_model["missing_personalized"]
            result["fedsm"] = super_model
        personal = personalized_models(
            folder / "simulator", scenario.sites, scenario.preset, scenario.device, scenario.num_classes
        )
        if personal:  # each site's own model on its own split; the global model where a site kept none
            for split in SPLITS:
                result[f"personalized_{split}"] = {
                    site: scenario.predict(m, split, [site])[site] if m is not None else result[split][site]
                    for site, m in personal.items()
                }
            result["personalized_fallback"] = [site for site, m in personal.items() if m is None]
        return result

    return compute


def baseline_run(scenario: Scenario, settings, sites: list):
    """compute() of a centralized (all sites) or local-only (one site) model: fedxvit.baselines.train_on_sites."""
    from fedxvit.baselines import train_on_sites

    def compute(folder: Path) -> dict:
        trained = train_on_sites(
            [scenario.site_dir(s) for s in sites], scenario.initial, settings, device=str(scenario.device)
        )
        validation = scenario.predict(trained["model"], "validation", sites)
        return {
            "test": scenario.predict(trained["model"], "test", sites),
            "validation": validation,
            "train_images": trained["train_images"],
            "final_val_accuracy": pooled_accuracy(validation),
        }

    return compute


def start_run(scenario: Scenario):
    """compute() scoring the untrained initial model: where every method starts."""
    from fedxvit.checkpoint import build_model_from_checkpoint

    def compute(folder: Path) -> dict:
        model, _ = build_model_from_checkpoint(scenario.initial, preset=scenario.preset, device=scenario.device)
        validation = scenario.predict(model, "validation")
        return {
            "test": scenario.predict(model, "test"),
            "validation": validation,
            "final_val_accuracy": pooled_accuracy(validation),
        }

    return compute


# ---- the comparison ----


def parse_methods(text: str | None, root: Path) -> dict:
    """ "fedavg,fedprox", "name=job folder" or "name=known method" entries -> {method: job folder}; the reference
    FedAvg must be one."""
    methods = {}
    for entry in [e.strip() for e in (text or ",".join(METHOD_JOBS)).split(",") if e.strip()]:
        name, _, folder = entry.partition("=")
        if folder in KNOWN_METHODS:  # "ditto-l1=ditto": a known method's job under another name (with --set)
            folder = root / KNOWN_METHODS[folder]
        if not folder:
            if name not in KNOWN_METHODS:
                raise FedXViTError(
                    f"--methods: unknown method {name!r}; use one of {', '.join(KNOWN_METHODS)} or name=<job folder>"
                )
            folder = root / KNOWN_METHODS[name]
        if name in (CENTRALIZED, LOCAL_ONLY, START):
            raise FedXViTError(f"--methods: {name!r} is a baseline name, always run; pick another method name")
        folder = Path(folder)
        if not (folder / SERVER_CONFIG).is_file():
            raise FedXViTError(f"--methods: job folder {folder} of method {name!r} has no {SERVER_CONFIG}")
        methods[name] = folder
    if REFERENCE not in methods:
        raise FedXViTError(f"--methods must include {REFERENCE!r}: it is the reference of the gap and of every verdict")
    return methods


def parse_settings(entries: list | None, methods: dict) -> dict:
    """--set "method.variable=value" entries -> {method: {"server": {...}, "client": {...}}}: the variable goes
    to whichever of the method's job configs defines it (both, if both do); the value is read as JSON
    (1, 0.5, true, "x"), else kept as text."""
    out: dict = {}
    for entry in entries or []:
        target, equals, text = entry.partition("=")
        name, dot, variable = target.strip().partition(".")
        if not (equals and dot and name and variable):
            raise FedXViTError(f"--set {entry!r}: expected method.variable=value, e.g. ditto.ditto_lambda=1.0")
        if name not in methods:
            raise FedXViTError(f"--set {entry!r}: method {name!r} is not among --methods ({', '.join(methods)})")
        try:
            value = json.loads(text)
        except ValueError:
            value = text
        found = False
        for side, which in (("server", SERVER_CONFIG), ("client", CLIENT_CONFIG)):
            if variable in read_job_config(methods[name], which):
                out.setdefault(name, {}).setdefault(side, {})[variable] = value
                found = True
        if not found:
            raise FedXViTError(f"--set {entry!r}: job folder {methods[name]} has no job variable {variable!r}")
    return out


def check_scenario(data: Path, sites: list | None, initial: Path, preset: str | None) -> tuple[list, str, int, list]:
    """(sites, preset, image size, class names) after checking every input; one line naming the option otherwise.
    The initial model's class count decides the task (2: Tumor/Healthy, 4: the long-tailed scenario's)."""
    from fedxvit.checkpoint import read_meta
    from fedxvit.datalist import load_split
    from fedxvit.sites import DATA_ROOT_ENV, site_data_dir

    if not data.is_dir():
        raise FedXViTError(f"--scenario-data {data} does not exist: run `make data` (or `make data-skewed`) first")
    if not sites:
        sites = sorted(
            (p.name for p in data.glob("site*") if p.is_dir() and p.name[4:].isdigit()), key=lambda name: int(name[4:])
        )
        if len(sites) < 2:
            raise FedXViTError(
                f"--scenario-data {data} holds {len(sites)} site folders (site1, site2, ...): a federation needs 2"
            )
    for site in sites:
        site_data_dir(site, environ={DATA_ROOT_ENV: str(data)}, class_names=None)  # classes: checked below
        if not load_split(data / site, "testing"):
            raise FedXViTError(f"site {site}: {data / site} has no testing images to score on")
    if not initial.is_file():
        raise FedXViTError(f"--initial {initial} does not exist: run `make transfer` first")
    meta = read_meta(initial)
    if preset and preset != meta.get("preset"):
        raise FedXViTError(f"--preset {preset} does not match --initial {initial} (preset {meta.get('preset')!r})")
    from fedxvit.classes import EXPERT_CLASSES, TASK_CLASSES
    from fedxvit.datalist import read_dataset_info

    num_classes = int(meta.get("num_classes", len(TASK_CLASSES)))
    class_names = meta.get("class_names") or list(
        EXPERT_CLASSES if num_classes == len(EXPERT_CLASSES) else TASK_CLASSES
    )
    for site in sites:
        found = read_dataset_info(data / site).get("num_classes")
        if found is not None and int(found) != num_classes:
            raise FedXViTError(
                f"site {site}: {data / site} holds {found} classes but --initial {initial} is a {num_classes}-class "
                "model (the long-tailed 4-class scenario starts from models/expert.pt)"
            )
    return list(sites), meta["preset"], int(meta["image_size"]), list(class_names)


def compare(
    data: Path,
    initial: Path,
    methods: dict,
    seeds: list,
    rounds: int | None = None,
    local_epochs: int | None = None,
    sites: list | None = None,
    preset: str | None = None,
    workspace: Path = Path("workspace/compare"),
    device: str | None = None,
    timeout_s: int = 3600,
    log=print,
    split: str = "test",
    method_variables: dict | None = None,
) -> dict:
    """Run or reuse every run of the comparison and aggregate it (see the module doc); the report dict.
    `method_variables`: {method: {"server": {...}, "client": {...}}} set on that method's job copies (--set)."""
    from dataclasses import replace

    from fedxvit.jobconfig import read_job_settings

    started = time.perf_counter()
    data, initial, workspace = Path(data).resolve(), Path(initial).resolve(), Path(workspace).resolve()
    sites, preset, image_size, class_names = check_scenario(data, sites, initial, preset)
    reference_server = read_job_config(methods[REFERENCE], SERVER_CONFIG)
    reference_client = read_job_config(methods[REFERENCE], CLIENT_CONFIG)
    rounds = int(reference_server["num_rounds"] if rounds is None else rounds)
    local_epochs = int(reference_client.get("local_epochs", 1) if local_epochs is None else local_epochs)
    if rounds < 1 or local_epochs < 1:
        raise FedXViTError(f"--rounds {rounds} and --local-epochs {local_epochs} must be at least 1")
    scenario = Scenario(data, sites, initial, preset, image_size, device, class_names)
    tracking_uri = f"sqlite:///{workspace / 'mlflow.db'}"  # the comparison's runs stay out of the project's store

    # the baselines train like the reference job: its settings with this comparison's rounds, epochs and seed
    settings_job = job_copy(
        methods[REFERENCE],
        workspace / "reference_job",
        server={"num_rounds": rounds, "preset": preset, "num_classes": len(class_names)},
        client={"local_epochs": local_epochs, "preset": preset, "num_classes": len(class_names)},
    )
    base_settings = read_job_settings(settings_job)

    plan = [(START, None, {"kind": START}, start_run(scenario))]
    for seed in seeds:
        for name, job in methods.items():
            options = {
                "kind": "federated",
                "job": files_digest([job]),
                "rounds": rounds,
                "local_epochs": local_epochs,
                "seed": seed,
            }
            variables = {
                **METHOD_CLIENT_VARIABLES.get(name, {}),
                **(method_variables or {}).get(name, {}).get("client", {}),
            }
            server_variables = (method_variables or {}).get(name, {}).get("server", {})
            if variables:  # only then: the folders of runs without any keep their names
                options["client_variables"] = variables
            if server_variables:
                options["server_variables"] = server_variables
            run = federated_run(
                scenario, job, rounds, local_epochs, seed, tracking_uri, timeout_s, variables, server_variables
            )
            plan.append((name, seed, options, run))
        settings = replace(base_settings, seed=seed)
        plan.append(
            (
                CENTRALIZED,
                seed,
                {"kind": CENTRALIZED, "settings": settings.as_dict()},
                baseline_run(scenario, settings, sites),
            )
        )
        for site in sites:
            plan.append(
                (
                    f"{LOCAL_ONLY} {site}",
                    seed,
                    {"kind": LOCAL_ONLY, "site": site, "settings": settings.as_dict()},
                    baseline_run(scenario, settings, [site]),
                )
            )

    results, runs, failures = {}, [], []
    for index, (name, seed, options, compute) in enumerate(plan, 1):
        folder = workspace / "runs" / f"{name.replace(' ', '-')}-{options_digest({**options, **scenario.fingerprint})}"
        label = f"[{index}/{len(plan)}] {name}" + ("" if seed is None else f" seed {seed}")
        clock = time.perf_counter()
        try:
            result, reused = run_or_reuse(folder, compute)
        except FedXViTError as exc:
            failures.append({"method": name, "seed": seed, "folder": str(folder), "error": str(exc)})
            log(f"{label}: FAILED after {time.perf_counter() - clock:.0f} s: {exc}", flush=True)
            continue
        results[(name, seed)] = result
        for site in result.get("personalized_fallback", []):
            log(f"{label}: {site} kept no personalized model; its {personalized(name)} score is the global model's")
        runs.append({"method": name, "seed": seed, "folder": str(folder), "reused": reused, "wall_s": result["wall_s"]})
        score = score_sites(result[split])["pooled"][GAP_METRIC] if split in result else float("nan")
        log(
            f"{label}: {'reused' if reused else 'ran'} in {time.perf_counter() - clock:.0f} s "
            f"(computed in {result['wall_s']:.0f} s); pooled {split} balanced accuracy {score:.3f}",
            flush=True,
        )

    report = aggregate(results, list(methods), seeds, sites, split)
    report.update(
        settings={
            "data": str(data),
            "sites": sites,
            "initial": str(initial),
            "preset": preset,
            "class_names": class_names,
            "split": split,
            "rounds": rounds,
            "local_epochs": local_epochs,
            "seeds": seeds,
            "baseline_training": base_settings.as_dict() | {"seed": "per seed"},
            "methods": {name: str(job) for name, job in methods.items()},
            "method_variables": method_variables or {},
            "workspace": str(workspace),
        },
        runs=runs,
        failures=failures,
        wall_s=round(time.perf_counter() - started, 1),
        compute_s=round(sum(r["wall_s"] for r in runs), 1),
    )
    return report


def aggregate(results: dict, methods: list, seeds: list, sites: list, split: str = "test") -> dict:
    """Per method: scores per seed, mean +- std, the gap share, the difference to FedAvg and the validation curves.

    `results`: {(run name, seed): result.json}; the local-only row scores each hospital's own model on its own
    split (what a hospital alone would deploy), pooled over hospitals. `split`: "test" (the report), or
    "validation" (calibrating a scenario or tuning a method: FedSM's super-model is then scored with the
    threshold chosen on that same split, an optimistic score)."""
    if split not in SPLITS:
        raise FedXViTError(f"--split {split!r}: use one of {', '.join(SPLITS)}")
    stale = sorted(
        {
            name
            for (name, _), result in results.items()
            if split not in result or ("personalized_test" in result and f"personalized_{split}" not in result)
        }
    )
    if stale:
        raise FedXViTError(
            f"--split {split}: the runs of {', '.join(stale)} predate validation scores; remove them from the workspace"
        )
    predictions = {}  # method -> {seed: {site: predictions}}
    for name in [*methods, CENTRALIZED]:
        predictions[name] = {seed: results[(name, seed)][split] for seed in seeds if (name, seed) in results}
    for name in methods:
        personal = {
            seed: results[(name, seed)].get(f"personalized_{split}") for seed in seeds if (name, seed) in results
        }
        if any(personal.values()):
            predictions[personalized(name)] = {seed: p for seed, p in personal.items() if p}
    predictions[LOCAL_ONLY] = {
        seed: {site: results[(f"{LOCAL_ONLY} {site}", seed)][split][site] for site in sites}
        for seed in seeds
        if all((f"{LOCAL_ONLY} {site}", seed) in results for site in sites)
    }
    if (START, None) in results:
        predictions[START] = {"-": results[(START, None)][split]}
    scores = {name: {seed: score_sites(p) for seed, p in per_seed.items()} for name, per_seed in predictions.items()}
    pooled = {
        name: {seed: s["pooled"][GAP_METRIC] for seed, s in per_seed.items()} for name, per_seed in scores.items()
    }
    hospitals = {  # the mean of the hospitals' balanced accuracies, per seed: personalization's own yardstick
        name: {seed: hospital_mean(s) for seed, s in per_seed.items()} for name, per_seed in scores.items()
    }

    table = {}
    for name, per_seed in scores.items():
        row = (
            {"per_seed": {str(seed): s for seed, s in per_seed.items()}, **summarize_method(per_seed)}
            if per_seed
            else {}
        )
        if name != START and per_seed:
            row["gap_share"] = gap_share(pooled[name], pooled.get(REFERENCE, {}), pooled.get(CENTRALIZED, {}))
            row["vs_fedavg"] = versus_reference(pooled[name], pooled.get(REFERENCE, {}))
            row["vs_fedavg_hospitals"] = versus_reference(hospitals[name], hospitals.get(REFERENCE, {}))
            curves = [
                results[(name, seed)]["val_curve"] for seed in per_seed if "val_curve" in results.get((name, seed), {})
            ]
            if curves:
                row["val_curve"] = {"per_seed": curves, **curve_band(curves)}
            elif name == CENTRALIZED:
                row["final_val_accuracy"] = mean_std(results[(name, seed)]["final_val_accuracy"] for seed in per_seed)
        table[name] = row
    if START in table and (START, None) in results:
        table[START]["final_val_accuracy"] = results[(START, None)]["final_val_accuracy"]
    order = [START, *[row for name in methods for row in (name, personalized(name)) if row in table]]
    return {"metric_of_gap": GAP_METRIC, "methods": table, "order": [*order, CENTRALIZED, LOCAL_ONLY]}


# ---- outputs ----


def _cell(summary: dict | None) -> str:
    """A fraction's mean +- std as percent points, e.g. "81.2 ± 1.3"; n/a when there is no value."""
    if not summary or summary.get("mean") is None:
        return "n/a"
    text = f"{100 * summary['mean']:.1f}"
    return text + (f" ± {100 * summary['std']:.1f}" if summary.get("std") is not None else "")


def _versus_text(versus: dict | None, name: str) -> str:
    if versus is None or name == REFERENCE:
        return "—"
    return f"{100 * versus['mean']:+.1f} pts: {versus['verdict']}" if versus["mean"] is not None else versus["verdict"]


def compare_markdown(report: dict) -> str:
    s, table = report["settings"], report["methods"]
    names = [n for n in report["order"] if table.get(n)]
    seeds = ", ".join(map(str, s["seeds"]))
    lines = [
        "# Choosing an algorithm\n",
        f"Scenario `{s['data']}` ({', '.join(s['sites'])}), initial model `{s['initial']}` (preset {s['preset']}), "
        f"{s['rounds']} rounds x {s['local_epochs']} local epoch(s); baselines train {s['rounds'] * s['local_epochs']} "
        f"epochs from the same start. Seeds {seeds}: every cell is mean ± std over seeds, in percent.\n",
        f"Scores: the final global model of each method on every hospital's **{SPLITS[s.get('split', 'test')]}** "
        "split, pooled and per hospital (nothing was tuned or selected on test). Local-only: each hospital's own "
        "model on its own split. "
        "`<method> (personalized)`: Ditto: each hospital's personalized model on its own split; FedSM: the "
        "super-model (the selector routes each image to a personalized model or the global one, threshold chosen on "
        "validation). "
        "Start: the initial model, untrained (one value).\n",
        f"## Pooled {SPLITS[s.get('split', 'test')]} set\n",
        "| method | accuracy | balanced accuracy | macro-F1 | ROC-AUC | worst hospital (balanced accuracy) | "
        "mean of hospitals (balanced accuracy) | FedAvg→centralized gap closed | vs FedAvg (pooled balanced "
        "accuracy) | vs FedAvg (mean of hospitals) |",
        "|---|---:|---:|---:|---:|---|---:|---:|---|---|",
    ]
    for name in names:
        row = table[name]
        worst_sites = sorted(set(row["worst_site"]["sites"]))
        share = row.get("gap_share")
        share_text = "—" if share is None else ("n/a" if share["status"] == "n/a" else _cell(share))
        versus = [_versus_text(row.get(key), name) for key in ("vs_fedavg", "vs_fedavg_hospitals")]
        lines.append(
            f"| {name} | "
            + " | ".join(_cell(row["pooled"][m]) for m in METRICS)
            + f" | {_cell(row['worst_site']['balanced_accuracy'])} ({', '.join(worst_sites)}) | "
            f"{_cell(row['hospital_mean']['balanced_accuracy'])} | {share_text} | {versus[0]} | {versus[1]} |"
        )
    gap = next((table[n]["gap_share"]["gap"] for n in names if table[n].get("gap_share")), None)
    if gap and gap["mean"] is not None:
        lines.append(
            f"\nFedAvg→centralized gap (pooled balanced accuracy): {_cell(gap)} points. Gap closed = "
            "(method − FedAvg) / (centralized − FedAvg) per seed; n/a when the gap is not above its spread "
            'over seeds. "better"/"worse" only when the mean difference to FedAvg exceeds its spread.'
        )
    if any(n.endswith(" (personalized)") for n in names):
        lines.append(
            "\nJudge personalized rows by the worst hospital and the mean of hospitals: pooled over hospitals whose "
            "majority classes differ, models that each call everything their hospital's majority class score well."
        )
    not_helping = [
        n
        for n in names
        if n not in (START, REFERENCE, CENTRALIZED)
        and table[n].get("vs_fedavg", {}).get("verdict") in ("worse", "no clear difference")
    ]
    if not_helping:
        lines.append(f"\n**Does not help over FedAvg here:** {', '.join(not_helping)}.")
    classes = s.get("class_names") or [str(c) for c in range(len(table[names[0]].get("pooled_recall", [])))]
    if names and table[names[0]].get("pooled_recall"):
        lines += [
            f"\n## Pooled {SPLITS[s.get('split', 'test')]} set: recall per class\n",
            "| method | " + " | ".join(classes) + " |",
            "|---|" + "---:|" * len(classes),
        ]
        lines += [f"| {n} | " + " | ".join(_cell(r) for r in table[n].get("pooled_recall", [])) + " |" for n in names]
    for metric in METRICS:
        lines += [
            f"\n## Per hospital: {metric.replace('_', ' ')}\n",
            "| method | " + " | ".join(s["sites"]) + " |",
            "|---|" + "---:|" * len(s["sites"]),
        ]
        lines += [
            f"| {n} | " + " | ".join(_cell(table[n]["sites"][site][metric]) for site in s["sites"]) + " |"
            for n in names
        ]
    lines.append("\n## Runs\n")
    lines.append(
        f"{len(report['runs'])} runs, {report['compute_s']:.0f} s of compute when run from scratch; this call "
        f"took {report['wall_s']:.0f} s. Curves of pooled validation accuracy per round: compare_curves.png."
    )
    for failure in report["failures"]:
        lines.append(f"- FAILED {failure['method']} seed {failure['seed']}: {failure['error']}")
    return "\n".join(lines) + "\n"


def save_curves_png(report: dict, path: Path) -> Path:
    """Pooled global validation accuracy per round, one line per federated method (mean over seeds, band
    min..max); the centralized baseline's final value as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name in report["order"]:
        row = report["methods"].get(name) or {}
        if "val_curve" in row:
            band = row["val_curve"]
            xs = [i for i, v in enumerate(band["mean"]) if v is not None]
            (line,) = ax.plot(xs, [band["mean"][i] for i in xs], marker="o", label=name)
            ax.fill_between(
                xs, [band["min"][i] for i in xs], [band["max"][i] for i in xs], color=line.get_color(), alpha=0.2
            )
        elif name == CENTRALIZED and row.get("final_val_accuracy", {}).get("mean") is not None:
            ax.axhline(row["final_val_accuracy"]["mean"], ls="--", color="black", label="centralized (final)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("rounds trained")
    ax.set_ylabel("pooled validation accuracy")
    ax.set_title(
        f"Global validation per round, seeds {', '.join(map(str, report['settings']['seeds']))} (band: min..max)"
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_outputs(report: dict, out: Path) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = {"json": out / "compare.json", "markdown": out / "compare.md", "curves": out / "compare_curves.png"}
    files["json"].write_text(json.dumps(report, indent=2) + "\n")
    files["markdown"].write_text(compare_markdown(report))
    save_curves_png(report, files["curves"])
    return files


def parse_args(argv=None) -> argparse.Namespace:
    parser = ArgumentParser(
        prog="python -m result_stat.compare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scenario-data", default="data/skewed", help="folder of site1..siteN (default: data/skewed)")
    parser.add_argument(
        "--sites", default=None, help="comma-separated sites (default: every siteN under --scenario-data)"
    )
    parser.add_argument(
        "--methods",
        default=None,
        help=f"comma-separated methods, each a known name ({', '.join(KNOWN_METHODS)}) or name=<job folder> "
        f"(default: {','.join(METHOD_JOBS)}; {REFERENCE} is required)",
    )
    parser.add_argument(
        "--set",
        action="append",
        metavar="METHOD.VARIABLE=VALUE",
        help="a job variable of one method's runs, e.g. ditto.ditto_lambda=1.0 (repeatable; for tuning, "
        "add a method twice under two names: --methods fedavg,ditto,ditto-l1=ditto)",
    )
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default: 0,1,2)")
    parser.add_argument(
        "--rounds", type=int, default=None, help="rounds of every method (default: the FedAvg job's num_rounds)"
    )
    parser.add_argument(
        "--local-epochs", type=int, default=None, help="local epochs per round (default: the FedAvg job's)"
    )
    parser.add_argument("--quick", action="store_true", help=f"one seed (the first), {QUICK_ROUNDS} rounds")
    parser.add_argument(
        "--split",
        choices=sorted(SPLITS),
        default="test",
        help="split every score is on: test (the report, default) or validation (calibrating a scenario, tuning)",
    )
    parser.add_argument(
        "--initial",
        default=None,
        help="initial global model (default: $FEDXVIT_INITIAL_MODEL, else models/initial_global.pt)",
    )
    parser.add_argument("--preset", default=None, help="model preset (default: the initial model's, from its sidecar)")
    parser.add_argument("--out", default="results", help="output folder (default: results)")
    parser.add_argument(
        "--workspace", default="workspace/compare", help="runs, reused when finished (default: workspace/compare)"
    )
    parser.add_argument("--timeout", type=int, default=3600, help="seconds one simulator run may take (default: 3600)")
    parser.add_argument(
        "--device", default=None, help="torch device for baselines and scoring (default: cuda if present)"
    )
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    from fedxvit.paths import project_root
    from fedxvit.persistor import resolve_initial_model

    args = parse_args(argv)
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise FedXViTError(f"--seeds {args.seeds!r}: expected comma-separated integers, e.g. 0,1,2") from None
    if not seeds:
        raise FedXViTError("--seeds: give at least one seed")
    rounds = args.rounds
    if args.quick:
        seeds, rounds = seeds[:1], QUICK_ROUNDS
    methods = parse_methods(args.methods, project_root())
    sites = [s.strip() for s in args.sites.split(",") if s.strip()] if args.sites else None
    initial = Path(args.initial) if args.initial else resolve_initial_model()
    report = compare(
        Path(args.scenario_data),
        initial,
        methods,
        seeds,
        rounds,
        args.local_epochs,
        sites,
        args.preset,
        Path(args.workspace),
        args.device,
        args.timeout,
        split=args.split,
        method_variables=parse_settings(args.set, methods),
    )
    files = write_outputs(report, Path(args.out))
    print(f"wrote {files['markdown']}, {files['json']} and {files['curves']} ({report['wall_s']:.0f} s)")
    if report["failures"]:
        raise FedXViTError(f"{len(report['failures'])} runs failed, first: {report['failures'][0]['error']}")
    return report


if __name__ == "__main__":
    run_cli(main)
