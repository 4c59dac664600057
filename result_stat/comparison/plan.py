"""What a comparison runs: the known methods (a job folder each, and the job variables a known
method sets), the grid each method is tuned over, the user's --methods and --set, and the plan of
runs — methods x seeds x the values they run with, then the baselines — built once and run in order."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from fedxvit.errors import FedXViTError
from fedxvit.methods import DP_EPSILONS, METHODS, compared
from tooling.jobconfig import CLIENT_FILE, SERVER_FILE, read_job_config

METHOD_JOBS = compared("federated")  # method -> job folder (or --methods name=folder); fedxvit.methods lists them
PRIVACY_METHOD_JOBS = compared("privacy")  # FedAvg behind a privacy filter or DP-SGD (make compare-privacy)
LONGTAIL_METHOD_JOBS = compared("longtail")  # long-tailed 4-class scenario (make compare-longtail)
KNOWN_METHODS = {**METHOD_JOBS, **PRIVACY_METHOD_JOBS, **LONGTAIL_METHOD_JOBS}
# client variables a known method sets on its job copy: one job, several settings (DP-SGD's budget per run)
METHOD_CLIENT_VARIABLES = {name: m.client_variables for name, m in METHODS.items() if m.client_variables}
REFERENCE, CENTRALIZED, LOCAL_ONLY, START = "fedavg", "centralized", "local-only", "start"


def personalized(name: str) -> str:
    """The row of a method's personalized models (Ditto, FedSM), beside the row of its global model."""
    return f"{name} (personalized)"


LEARNING_RATES = [{"learning_rate": lr} for lr in (3e-4, 1e-4, 1e-3)]  # the jobs' default first
# The values each method is tuned over on validation (result_stat.comparison.tuning), the job's defaults first
# (a tie keeps them). FedAvg's learning rate is tuned first, and every other method and the baselines train with
# it (inherit_reference) unless their own grid tunes it (SCAFFOLD's, whose correction changes the effective step);
# a method without a grid runs with its job's values and FedAvg's learning rate.
TUNING_GRIDS = {
    "fedavg": LEARNING_RATES,
    "fedprox": [{"mu": mu} for mu in (0.01, 0.001, 0.1, 1.0, 10.0)],  # 10: 2026-12-03's tuning chose its edge, 1
    "fedopt": [
        {"server_lr": lr, "server_momentum": m}
        for lr, m in ((1.0, 0.6), (1.0, 0.0), (1.0, 0.9), (0.5, 0.6), (2.0, 0.6))
    ],
    "scaffold": LEARNING_RATES,
    "ditto": [{"ditto_lambda": lam} for lam in (0.1, 0.01, 1.0)],
    "fedsm": [{"softpull_lambda": lam} for lam in (0.3, 0.1, 0.7)],
    "percentile": [{"percentile": p} for p in (90, 75, 95)],
    "svt": [{"fraction": f, "epsilon": e} for f, e in ((0.1, 0.1), (0.3, 0.1), (0.1, 1.0))],
    # 2026-12-05's tuning (seed 0, validation): clip 0.5 and 1 within 0.2 points at ε 1 and 3, 10⁻³ 2.5-3.6 below
    # 3·10⁻⁴; a DP-SGD run costs 2.5 FedAvg runs, so its two runs go to the learning rate, the untried side
    **{
        f"dp-sgd-eps{eps}": [{"learning_rate": lr, "dp_max_grad_norm": 1.0} for lr in (3e-4, 1e-4)]
        for eps in DP_EPSILONS
    },
}


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
        if name in methods:
            raise FedXViTError(f"--methods: {name!r} is listed twice")
        folder = Path(folder)
        if not (folder / SERVER_FILE).is_file():
            raise FedXViTError(f"--methods: job folder {folder} of method {name!r} has no {SERVER_FILE}")
        methods[name] = folder
    if REFERENCE not in methods:
        raise FedXViTError(f"--methods must include {REFERENCE!r}: it is the reference of the gap and of every verdict")
    return methods


def parse_seeds(text: str) -> list:
    """ "0,1,2" -> [0, 1, 2]; one line for anything else, a repeated seed included (it would count twice)."""
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise FedXViTError(f"--seeds {text!r}: expected comma-separated integers, e.g. 0,1,2") from None
    if not seeds:
        raise FedXViTError("--seeds: give at least one seed")
    repeated = sorted({s for s in seeds if seeds.count(s) > 1})
    if repeated:
        raise FedXViTError(f"--seeds {text!r}: seed {repeated[0]} is given twice; each seed is one training run")
    return seeds


def place_variables(job: Path, values: dict, where: str) -> dict:
    """{variable: value} -> {"server": {...}, "client": {...}}: each variable goes to whichever of the job's
    configs defines it (both, if both do); `where` names the source in the one-line error otherwise."""
    placed: dict = {}
    for variable, value in values.items():
        found = False
        for side, which in (("server", SERVER_FILE), ("client", CLIENT_FILE)):
            if variable in read_job_config(job, which):
                placed.setdefault(side, {})[variable] = value
                found = True
        if not found:
            raise FedXViTError(f"{where}: job folder {job} has no job variable {variable!r}")
    return placed


def parse_settings(entries: list | None, methods: dict) -> dict:
    """--set "method.variable=value" entries -> {method: {"server": {...}, "client": {...}}} (place_variables);
    the value is read as JSON (1, 0.5, true, "x"), else kept as text."""
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
        for side, values in place_variables(methods[name], {variable: value}, f"--set {entry!r}").items():
            out.setdefault(name, {}).setdefault(side, {}).update(values)
    return out


def inherit_reference(name: str, job: Path, chosen: dict) -> None:
    """A method trains with FedAvg's chosen client values (its learning rate) wherever its job has that variable,
    under its own --set or tuned values: the same optimizer settings for every method unless its grid tunes them."""
    inherited = {
        variable: value
        for variable, value in chosen.get(REFERENCE, {}).get("client", {}).items()
        if variable in read_job_config(job, CLIENT_FILE)
    }
    if inherited:
        chosen[name] = merge_variables({"client": inherited}, chosen.get(name, {}))


def merge_variables(*layers: dict) -> dict:
    """{"server": ..., "client": ...} layers, later ones winning per variable."""
    out: dict = {}
    for layer in layers:
        for side, values in (layer or {}).items():
            out.setdefault(side, {}).update(values)
    return out


@dataclass
class PlannedRun:
    """One run of the plan: its row name, seed (None: the start), the options that key its folder, its compute."""

    name: str
    seed: int | None
    options: dict
    compute: Callable[[Path], dict]
    note: str = ""

    @property
    def label(self) -> str:
        seed = "" if self.seed is None else f" seed {self.seed}"
        return self.name + seed + (f" ({self.note})" if self.note else "")


def federated_options(job: Path, job_digest: str, rounds: int, local_epochs: int, seed: int, variables: dict) -> dict:
    """What keys a federated run's folder: the job's content, the budget, the seed and the variables set on it."""
    options = {"kind": "federated", "job": job_digest, "rounds": rounds, "local_epochs": local_epochs, "seed": seed}
    if variables.get("client"):  # only then: the folders of runs without any keep their names
        options["client_variables"] = variables["client"]
    if variables.get("server"):
        options["server_variables"] = variables["server"]
    return options


def method_variables(name: str, chosen: dict) -> dict:
    """The variables a method's runs carry: the known method's own (DP-SGD's budget), then the chosen ones
    (--set, or tuned)."""
    return merge_variables({"client": METHOD_CLIENT_VARIABLES.get(name, {})}, chosen.get(name, {}))


def describe(values: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in values.items())


def federated(name, job, scenario, budget, seed, variables, tracking_uri, timeout_s, note="") -> PlannedRun:
    """The PlannedRun of one method's job at one seed with these variables ({"server", "client"})."""
    from result_stat.comparison.runs import federated_run, files_digest

    rounds, local_epochs = budget
    compute = federated_run(
        scenario,
        job,
        rounds,
        local_epochs,
        seed,
        tracking_uri,
        timeout_s,
        variables.get("client", {}),
        variables.get("server", {}),
    )
    options = federated_options(job, files_digest([job]), rounds, local_epochs, seed, variables)
    return PlannedRun(name, seed, options, compute, note)


def tuning_plan(name, job, scenario, budget, seed, chosen, tracking_uri, timeout_s) -> list:
    """One run per value set of the method's grid, at the first seed (the method's own variables kept)."""
    return [
        federated(
            name,
            job,
            scenario,
            budget,
            seed,
            merge_variables(method_variables(name, chosen), place_variables(job, values, f"tuning {name}")),
            tracking_uri,
            timeout_s,
            note=f"tuning {describe(values)}",
        )
        for values in TUNING_GRIDS[name]
    ]


def evaluation_plan(scenario, methods: dict, seeds: list, budget, chosen, settings, tracking_uri, timeout_s) -> list:
    """The start, then per seed every method (with its chosen variables), the centralized baseline and one
    local-only baseline per site (tooling.baselines with the reference's settings and that seed)."""
    from dataclasses import replace

    from result_stat.comparison.runs import baseline_run, start_run

    plan = [PlannedRun(START, None, {"kind": START}, start_run(scenario))]
    for seed in seeds:
        for name, job in methods.items():
            plan.append(
                federated(name, job, scenario, budget, seed, method_variables(name, chosen), tracking_uri, timeout_s)
            )
        seeded = replace(settings, seed=seed)
        plan.append(
            PlannedRun(
                CENTRALIZED,
                seed,
                {"kind": CENTRALIZED, "settings": seeded.as_dict()},
                baseline_run(scenario, seeded, scenario.sites),
            )
        )
        for site in scenario.sites:
            plan.append(
                PlannedRun(
                    f"{LOCAL_ONLY} {site}",
                    seed,
                    {"kind": LOCAL_ONLY, "site": site, "settings": seeded.as_dict()},
                    baseline_run(scenario, seeded, [site]),
                )
            )
    return plan
