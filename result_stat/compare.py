"""Which algorithm should the hospitals use? Every method on the same data, initial model and budget.

    python -m result_stat.compare [--scenario-data data/skewed] [--methods fedavg,fedprox,...] [--seeds 0,1,2] [--quick]

First each method with a tuning grid is tuned on the sites' VALIDATION splits (one seed; --no-tune or
--quick skip it). Then, for each seed, every federated method (a job folder run in NVFlare's
simulator over all sites, without the cross-site evaluation nothing here reads), the centralized
baseline (all sites' training splits pooled) and the local-only baseline (each hospital alone) start
from the same initial model and see every training image equally often (baselines: epochs = rounds x
local epochs, tooling.baselines). Each final model is scored on every site's TEST split; nothing is
selected or tuned on it. Every row's difference to FedAvg gets a paired hierarchical-bootstrap
interval, a Holm-adjusted p-value and a verdict.
Writes compare.json, compare.md, compare_forest.png and compare_curves.png into --out.

The flow lives in result_stat.comparison: plan (methods x seeds x values) -> runs (each in
<workspace>/runs/<row>-<hash of its options, data, initial model, code and libraries>/result.json,
reused when finished, so an interrupted comparison resumes) -> tuning -> statistics -> report.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from fedxvit.errors import ArgumentParser, FedXViTError, run_cli
from result_stat.comparison import plan as planning
from result_stat.comparison.plan import KNOWN_METHODS, METHOD_JOBS, REFERENCE, TUNING_GRIDS
from result_stat.comparison.report import aggregate, distinct_runs, write_outputs
from result_stat.comparison.runs import SPLITS, Scenario, check_scenario, run_plan
from result_stat.comparison.statistics import REPLICATES
from result_stat.comparison.tuning import choose
from tooling.jobconfig import CLIENT_FILE, SERVER_FILE, job_copy, read_job_config

QUICK_ROUNDS = 2


def tuning_progress(left: dict, timed: dict, total: int) -> str:
    """ "tuning: 5 of 13 grid runs done; ETA ..." — each method's runs left at its own pace so far (a DP-SGD run
    takes 2.5 FedAvg runs), else at the mean of every tuning run timed (reused ones count their recorded compute)."""
    todo = sum(left.values())
    line = f"tuning: {total - todo} of {total} grid runs done"
    every = [s for t in timed.values() for s in t]
    if not todo or not every:
        return line
    seconds = sum(n * float(np.mean(timed.get(name) or every)) for name, n in left.items())
    return f"{line}; ETA {seconds / 60:.0f} min for the {todo} left, then the evaluation runs"


def tune(scenario, methods, budget, seed, chosen, tracking_uri, timeout_s, workspace, log) -> tuple[dict, list, list]:
    """({method: tuning.choose result}, runs, failures) for every method with a grid that --set did not fix, FedAvg
    first: every other method starts from FedAvg's chosen values (planning.inherit_reference) and tunes its own
    on top. `chosen` gets each method's values."""
    tuned, runs, failures = {}, [], []
    fixed = set(chosen)  # --set: not tuned
    order = [REFERENCE, *[n for n in methods if n != REFERENCE]]
    left = {n: len(TUNING_GRIDS[n]) for n in order if n in TUNING_GRIDS and n not in fixed}  # grid runs to go
    timed, total = {}, sum(left.values())
    for name in order:
        job = methods[name]
        if name != REFERENCE:
            planning.inherit_reference(name, job, chosen)
        if name not in TUNING_GRIDS:
            continue
        if name in fixed:
            log(f"{name}: not tuned, its --set values are used")
            continue
        grid_runs = planning.tuning_plan(name, job, scenario, budget, seed, chosen, tracking_uri, timeout_s)
        results = []
        for run in grid_runs:
            done, ran, failed = run_plan([run], workspace, scenario.fingerprint, "validation", log)
            results.append(done.get((run.name, run.seed)))
            runs += ran
            failures += failed
            if results[-1]:
                timed.setdefault(name, []).append(results[-1]["wall_s"])
            left[name] -= 1
            log(tuning_progress(left, timed, total), flush=True)
        tuned[name] = choose(TUNING_GRIDS[name], results)
        if tuned[name]["chosen"] is None:
            raise FedXViTError(f"tuning {name}: every run of its grid failed, first: {failures[-1]['error']}")
        values = planning.place_variables(job, tuned[name]["chosen"], f"tuning {name}")
        chosen[name] = planning.merge_variables(chosen.get(name, {}), values)
        log(f"{name}: tuned on validation, chosen {planning.describe(tuned[name]['chosen'])}", flush=True)
    return tuned, runs, failures


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
    tuning: bool = False,
    replicates: int = REPLICATES,
    budget_source: str | None = None,
    freeze_policy: str | None = None,
) -> dict:
    """Tune (with `tuning`), run or reuse every run of the comparison and aggregate it (see the module doc); the
    report dict. `method_variables`: {method: {"server": {...}, "client": {...}}} fixed by the user (--set);
    `freeze_policy` (the budget's): what every method and baseline trains, instead of each job's own."""
    from tooling.jobconfig import read_job_settings

    started = time.perf_counter()
    data, initial, workspace = Path(data).resolve(), Path(initial).resolve(), Path(workspace).resolve()
    sites, preset, image_size, class_names = check_scenario(data, sites, initial, preset)
    reference_server = read_job_config(methods[REFERENCE], SERVER_FILE)
    reference_client = read_job_config(methods[REFERENCE], CLIENT_FILE)
    rounds = int(reference_server["num_rounds"] if rounds is None else rounds)
    local_epochs = int(reference_client.get("local_epochs", 1) if local_epochs is None else local_epochs)
    if rounds < 1 or local_epochs < 1:
        raise FedXViTError(f"--rounds {rounds} and --local-epochs {local_epochs} must be at least 1")
    planning.parse_seeds(",".join(map(str, seeds)))  # a repeated seed would count twice
    scenario = Scenario(data, sites, initial, preset, image_size, device, class_names)
    tracking_uri = f"sqlite:///{workspace / 'mlflow.db'}"  # the comparison's runs stay out of the project's store
    sources = {name: str(job) for name, job in methods.items()}
    if freeze_policy:  # each method's job copied with it: its runs (and their cache keys) carry it
        methods = {
            name: job_copy(job, workspace / "jobs" / name, client={"freeze_policy": freeze_policy})
            for name, job in methods.items()
        }
    budget = (rounds, local_epochs)
    chosen = {name: dict(v) for name, v in (method_variables or {}).items()}

    if tuning:
        tuned, tuning_runs, tuning_failures = tune(
            scenario, methods, budget, seeds[0], chosen, tracking_uri, timeout_s, workspace, log
        )
    else:
        tuned, tuning_runs, tuning_failures = {}, [], []
        for name, job in methods.items():
            if name != REFERENCE:
                planning.inherit_reference(name, job, chosen)
    # the baselines train like the reference job: its settings (FedAvg's chosen values included) with this
    # comparison's rounds, epochs and seed
    settings_job = job_copy(
        methods[REFERENCE],
        workspace / "reference_job",
        server={"num_rounds": rounds, "preset": preset, "num_classes": len(class_names)},
        client={
            **chosen.get(REFERENCE, {}).get("client", {}),
            "local_epochs": local_epochs,
            "preset": preset,
            "num_classes": len(class_names),
        },
    )
    base_settings = read_job_settings(settings_job)
    plan = planning.evaluation_plan(scenario, methods, seeds, budget, chosen, base_settings, tracking_uri, timeout_s)
    results, runs, failures = run_plan(plan, workspace, scenario.fingerprint, split, log)

    report = aggregate(results, list(methods), seeds, sites, split, replicates)
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
            "budget_source": budget_source
            or "the FedAvg job's num_rounds and local_epochs, or --rounds/--local-epochs",
            "seeds": seeds,
            "baseline_training": base_settings.as_dict() | {"seed": "per seed"},
            "freeze_policy": freeze_policy or "each job's own",
            "methods": sources,
            "method_variables": chosen,
            "tuning": tuned,
            "code": {k: scenario.fingerprint[k] for k in ("code", "libraries")},
            "cohorts": {name: scenario.cohort(name) for name in SPLITS},
            "workspace": str(workspace),
        },
        runs=tuning_runs + runs,
        failures=tuning_failures + failures,
        wall_s=round(time.perf_counter() - started, 1),
        compute_s=round(sum(r["wall_s"] for r in distinct_runs(tuning_runs + runs)), 1),
    )
    return report


def parse_args(argv=None) -> argparse.Namespace:
    from fedxvit.training import FREEZE_POLICIES

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
        help="a job variable of one method's runs, e.g. ditto.ditto_lambda=1.0 (repeatable; that method is then "
        "not tuned; to try two values side by side: --methods fedavg,ditto,ditto-l1=ditto)",
    )
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated distinct seeds (default: 0,1,2)")
    parser.add_argument(
        "--rounds", type=int, default=None, help="rounds of every method (default: the FedAvg job's num_rounds)"
    )
    parser.add_argument(
        "--local-epochs", type=int, default=None, help="local epochs per round (default: the FedAvg job's)"
    )
    parser.add_argument(
        "--budget",
        default=None,
        help="budget.json of result_stat.budget: rounds x local epochs where FedAvg's validation curve flattened on "
        "the calibration seed's data, and the freeze policy every method trains with; not with --rounds or "
        "--local-epochs",
    )
    parser.add_argument(
        "--freeze-policy",
        default=None,
        choices=FREEZE_POLICIES,
        help="what every method and baseline trains, over --budget's: full-but-batchnorm for the privacy jobs, which "
        "DP-SGD needs and a filter's noise cannot break (default: the budget's, else each job's own)",
    )
    parser.add_argument("--quick", action="store_true", help=f"one seed (the first), {QUICK_ROUNDS} rounds, no tuning")
    parser.add_argument(
        "--no-tune", action="store_true", help="run every method with its job's values (default: tune on validation)"
    )
    parser.add_argument(
        "--split",
        choices=sorted(SPLITS),
        default="test",
        help="split every score is on: test (the report, default) or validation (calibrating a scenario)",
    )
    parser.add_argument(
        "--replicates", type=int, default=REPLICATES, help=f"bootstrap replicates (default: {REPLICATES})"
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
    seeds = planning.parse_seeds(args.seeds)
    if args.replicates < 100:
        raise FedXViTError(f"--replicates {args.replicates}: use at least 100 (a 95% interval needs its tails)")
    rounds, local_epochs, budget_source, freeze_policy = args.rounds, args.local_epochs, None, None
    if args.budget:
        from result_stat.budget import read_budget, what_fedavg_did

        if rounds is not None or local_epochs is not None:
            raise FedXViTError("--budget sets the rounds and local epochs: drop --rounds and --local-epochs")
        budget = read_budget(Path(args.budget))
        rounds, local_epochs, freeze_policy = budget["rounds"], budget["local_epochs"], budget["freeze_policy"]
        budget_source = f"{args.budget} ({what_fedavg_did(budget)}, on the calibration seed's data)"
    freeze_policy = args.freeze_policy or freeze_policy
    if args.quick:
        seeds, rounds, budget_source = seeds[:1], QUICK_ROUNDS, "--quick"
    methods = planning.parse_methods(args.methods, project_root())
    sites = [s.strip() for s in args.sites.split(",") if s.strip()] if args.sites else None
    initial = Path(args.initial) if args.initial else resolve_initial_model()
    report = compare(
        Path(args.scenario_data),
        initial,
        methods,
        seeds,
        rounds,
        local_epochs,
        sites,
        args.preset,
        Path(args.workspace),
        args.device,
        args.timeout,
        split=args.split,
        method_variables=planning.parse_settings(args.set, methods),
        tuning=not (args.quick or args.no_tune),
        replicates=args.replicates,
        budget_source=budget_source,
        freeze_policy=freeze_policy,
    )
    files = write_outputs(report, Path(args.out))
    print(f"wrote {files['markdown']}, {files['json']} and the figures ({report['wall_s']:.0f} s)")
    if report["failures"]:
        raise FedXViTError(f"{len(report['failures'])} runs failed, first: {report['failures'][0]['error']}")
    return report


if __name__ == "__main__":
    run_cli(main)
