"""The runs of a comparison: the scenario every run shares, one folder per run keyed by everything
that decides its result (options, data, initial model, the code and the libraries), reused when
finished, and the compute() of each kind of run (federated job, centralized or local-only
baseline, the untrained start). Each run stores per-image predictions; nothing here scores them."""

from __future__ import annotations

import hashlib
import json
import os
import time
from importlib import metadata
from pathlib import Path

import numpy as np

from fedxvit.errors import FedXViTError
from result_stat.comparison.scores import PRIMARY_METRIC, score_sites
from tooling.jobconfig import SERVER_FILE, job_copy, rewrite_job_config
from tooling.simulation import GLOBAL_MODEL, run_simulator

DONE_FILE = "result.json"
HELDOUT = "heldout"  # a scenario's held-out hospital (data_preparation.benchmark): scored, never trained on
SPLITS = {"test": "testing", "validation": "validation"}
# The first-party code a run executes (the sites' code, package fedxvit whole: the simulator's clients import it by
# name; this module, which computes each kind of run; the scoring it imports; the baselines' training; the
# simulator's launch) and the libraries whose versions change results: a run of other code or libraries is never
# reused. What only plans runs or reads finished ones (the grids, the tuning choice, the statistics, the report, the
# CLI) is left out: the plan's part in a run is in its options, and fixing a report keeps hours of runs.
# tests/test_compare.py checks that every first-party module these import, at any depth and inside functions, is here.
CODE_SOURCES = (
    "fedxvit",
    "result_stat.comparison.runs",
    "result_stat.comparison.scores",
    "result_stat.metrics",
    "tooling.baselines",
    "tooling.jobconfig",
    "tooling.simulation",
)
LIBRARIES = ("torch", "torchvision", "timm", "monai", "nvflare", "numpy", "opacus")


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


def code_fingerprint(packages=CODE_SOURCES, libraries=LIBRARIES) -> dict:
    """{"code": hash of every file of the first-party packages and modules (files_digest), "libraries": {name:
    version}}: part of every run's key, so a finished run of other code (an executor, the training loop, the
    baselines, the scoring) or of other library versions is run again rather than reused."""
    import importlib

    def source(name: str) -> Path:  # a package: its folder; a module: its file
        module = importlib.import_module(name)
        return Path(module.__file__).parent if hasattr(module, "__path__") else Path(module.__file__)

    code = files_digest(source(name) for name in packages)
    versions = {}
    for name in libraries:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {"code": code, "libraries": versions}


def run_folder(workspace: Path, name: str, options: dict, fingerprint: dict) -> Path:
    """Where a run keeps its result: named by the run and a hash of everything that decides it."""
    return workspace / "runs" / f"{name.replace(' ', '-')}-{options_digest({**options, **fingerprint})}"


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
    """The fixed part of every run: data, sites, initial model, preset, device; loaders built once, on first use.
    A `heldout/` folder beside the sites (a hospital that joins later) is scored by every global model."""

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
        self.heldout = HELDOUT if (data / HELDOUT / "datalist.json").is_file() else None
        scored = [*sites, *([HELDOUT] if self.heldout else [])]
        self.fingerprint = {
            "data": files_digest(data / s / f for s in scored for f in ("datalist.json", "dataset.json")),
            "initial": files_digest([initial]),
            "sites": sites,
            "preset": preset,
            **code_fingerprint(),
        }
        if self.num_classes != len(TASK_CLASSES):  # only then: the 2-class runs keep their folder names
            self.fingerprint["num_classes"] = self.num_classes

    def site_dir(self, site: str) -> Path:
        return self.data / site

    def cohort(self, split: str) -> dict:
        """{"sha256", "images"} of a split as scored: every scored hospital's images (the content hash its
        dataset.json records, else the file's bytes) with their labels, so a report names the exact cohort."""
        from fedxvit.datalist import file_hash, load_split, read_dataset_info

        digest, count = hashlib.sha256(), 0
        for site in [*self.sites, *([self.heldout] if self.heldout else [])]:
            recorded = read_dataset_info(self.site_dir(site)).get("content_hashes") or {}
            for entry in sorted(load_split(self.site_dir(site), SPLITS[split]), key=lambda e: e["image"]):
                relative = Path(os.path.relpath(entry["image"], self.site_dir(site))).as_posix()
                content = recorded.get(relative) or file_hash(entry["image"])
                digest.update(f"{site}\t{content}\t{int(entry['label'])}\n".encode())
                count += 1
        return {"sha256": digest.hexdigest(), "images": count}

    def loaders(self, split: str) -> dict:
        from fedxvit.data import make_loader

        if split not in self._loaders:
            scored = [*self.sites, *([self.heldout] if self.heldout else [])]
            self._loaders[split] = {
                s: make_loader(self.site_dir(s), SPLITS[split], self.image_size, 32, train=False) for s in scored
            }
        return self._loaders[split]

    def predict(self, model, split: str, sites=None) -> dict:
        """{site: {"labels", "probs"}} of a model on a split of the given sites (default all)."""
        from fedxvit.training import evaluate

        loaders = self.loaders(split)
        out = {}
        for site in sites or self.sites:
            result = evaluate(model, loaders[site], self.device)
            broken = sum(not np.isfinite(row).all() for row in result["probs"])
            if broken:  # a model that predicts NaN is broken (e.g. a noised BatchNorm variance below 0), not scored
                raise FedXViTError(
                    f"the final model's probabilities are not finite on {broken} of {len(result['probs'])} "
                    f"{SPLITS[split]} images of {site}: the model is broken, the run is not scored"
                )
            out[site] = {"labels": result["labels"], "probs": [[round(p, 6) for p in row] for row in result["probs"]]}
        return out

    def predict_heldout(self, model) -> dict:
        """{"heldout": {split: {"heldout": predictions}}} of a global model, or {} without a held-out hospital."""
        if not self.heldout:
            return {}
        return {HELDOUT: {split: self.predict(model, split, [self.heldout]) for split in SPLITS}}


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
    return super_model(models, global_model, scenario.predict, lambda p: score_sites(p)["pooled"][PRIMARY_METRIC])


def without_cross_site_evaluation(server: dict) -> None:
    """A comparison scores every final model on every site's splits itself and reads nothing of NVFlare's cross-site
    evaluation (every site validating every site's model: about 10 s of a skewed run), so its job copies leave
    that workflow out."""
    server["workflows"] = [w for w in server["workflows"] if not w["path"].endswith(".CrossSiteModelEval")]


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
        rewrite_job_config(copy, SERVER_FILE, without_cross_site_evaluation)
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
            **scenario.predict_heldout(model),
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
    """compute() of a centralized (all sites) or local-only (one site) model: tooling.baselines.train_on_sites."""
    from tooling.baselines import train_on_sites

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
            # the centralized model is a global model: the held-out hospital scores it (a local-only one: no)
            **(scenario.predict_heldout(trained["model"]) if list(sites) == list(scenario.sites) else {}),
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
            **scenario.predict_heldout(model),
        }

    return compute


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


def estimate_left(plan: list, unfinished: list, timed: dict) -> str:
    """ "; ETA ..." for the unfinished runs: each at the mean compute of the finished runs of its row (FedSM's runs
    take longer than FedAvg's, site1 alone longer than site6), else of its kind (federated, centralized, local-only,
    start); a lower bound while a kind has none. `timed`: {row or kind: [seconds]}, reused runs included (their
    result.json keeps what they took), so a resumed comparison knows its pace from its first line."""
    if not unfinished or not timed:
        return ""
    seconds, untimed = 0.0, set()
    for index in unfinished:
        run = plan[index]
        times = timed.get(run.name) or timed.get(run.options["kind"])
        if times:
            seconds += float(np.mean(times))
        else:
            untimed.add(run.options["kind"])
    missing = f"(no {', '.join(sorted(untimed))} run timed yet)"
    bound = f"{seconds / 60:.0f} min" if not untimed else f"at least {seconds / 60:.0f} min {missing}"
    if untimed and not seconds:
        bound = f"unknown {missing}"
    return f"; ETA {bound} for {len(unfinished)} run(s)"


def run_plan(plan: list, workspace: Path, fingerprint: dict, split: str, log=print) -> tuple[dict, list, list]:
    """Run or reuse every PlannedRun in order: ({(name, seed): result}, runs, failures). One progress line per
    run, with an ETA for the unfinished ones left (estimate_left; finished ones are reused, their compute counted)."""
    folders = [run_folder(workspace, run.name, run.options, fingerprint) for run in plan]
    unfinished = [i for i, folder in enumerate(folders) if not (folder / DONE_FILE).is_file()]
    results, runs, failures, timed = {}, [], [], {}
    for index, (run, folder) in enumerate(zip(plan, folders)):
        label = f"[{index + 1}/{len(plan)}] {run.label}"
        clock = time.perf_counter()
        unfinished = [i for i in unfinished if i != index]
        try:
            result, reused = run_or_reuse(folder, run.compute)
        except FedXViTError as exc:
            failures.append({"method": run.name, "seed": run.seed, "folder": str(folder), "error": str(exc)})
            log(f"{label}: FAILED after {time.perf_counter() - clock:.0f} s: {exc}", flush=True)
            continue
        for key in {run.name, run.options["kind"]}:
            timed.setdefault(key, []).append(result["wall_s"])
        results[(run.name, run.seed)] = result
        for site in result.get("personalized_fallback", []):
            log(f"{label}: {site} kept no personalized model; its personalized score is the global model's")
        runs.append(
            {"method": run.name, "seed": run.seed, "folder": str(folder), "reused": reused, "wall_s": result["wall_s"]}
        )
        score = score_sites(result[split])["pooled"][PRIMARY_METRIC] if split in result else float("nan")
        log(
            f"{label}: {'reused' if reused else 'ran'} in {time.perf_counter() - clock:.0f} s "
            f"(computed in {result['wall_s']:.0f} s); pooled {split} balanced accuracy {score:.3f}"
            + estimate_left(plan, unfinished, timed),
            flush=True,
        )
    return results, runs, failures
