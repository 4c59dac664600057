"""How long should a comparison train? FedAvg's validation curve says, on the calibration seed's data.

    python -m result_stat.budget --scenario-data data/skewed-calibration [--passes 12] [--local-epochs 1,2,4]
                                 [--freeze-policy full]

FedAvg (jobs/fedxvit) runs in NVFlare's simulator once per local-epoch setting E, each for the same
number of passes over the sites' data (rounds = passes / E), and records the pooled validation
accuracy after every round (global_val.json; the sites' validation cohorts, never test). Each curve is
judged smoothed: a round's value is the mean of the rounds that trained the last --window-passes passes
(default: the largest E, so every setting is judged over the same stretch of training, and one lucky
round on a noisy curve picks nothing). For each E the budget is the first round from which the smoothed
curve stays within --tolerance of its best; among the settings whose best is within --tolerance of the
overall best, the one with the fewest rounds wins (a round costs a task exchange and a validation of every
site, an epoch only training). A curve that comes within --tolerance of its best only in its last round
(still rising, or dipping at the end) has not been seen to flatten: budget.json says so ("flattened":
false) and the tool asks for more --passes. Writes
budget.json into --out (default: the scenario folder); `make compare` reads it with --budget, and
every method of the comparison, and the baselines, then train rounds x local epochs with the budget's
freeze policy. The comparisons train the whole model by default: with only the last block trainable,
FedAvg and centralized training land within a point of each other on the skewed scenario's
calibration data, so no comparison could tell methods apart (docs/measurements.md).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fedxvit.errors import ArgumentParser, FedXViTError, run_cli

BUDGET_FILE = "budget.json"
TOLERANCE = 0.01
FREEZE_POLICY = "full"  # what the comparisons train (see the module doc)


def flattened(curve: list, tolerance: float = TOLERANCE) -> int:
    """The number of rounds after which a validation curve (curve[r]: after r rounds; curve[0] the start) has
    flattened: the first r from which every later value stays within `tolerance` of the curve's best."""
    values = [v for v in curve if v is not None]
    if not values:
        raise FedXViTError("the validation curve is empty: the run scored no round")
    best = max(values)
    for r, value in enumerate(curve):
        if value is not None and all(v is None or v >= best - tolerance for v in curve[r:]):
            return max(r, 1)
    return len(curve) - 1


def smoothed(curve: list, rounds_per_value: int) -> list:
    """The curve with each round's value replaced by the mean of it and the rounds before it, `rounds_per_value`
    rounds in all (fewer at the start; curve[0], the start, stays as it is and is never averaged in)."""
    out = list(curve[:1])
    for r in range(1, len(curve)):
        window = [v for v in curve[max(1, r - rounds_per_value + 1) : r + 1] if v is not None]
        out.append(sum(window) / len(window) if window else None)
    return out


def choose_budget(curves: dict, tolerance: float = TOLERANCE, window_passes: int | None = None) -> dict:
    """{local epochs: validation curve} -> {"rounds", "local_epochs", "passes", "per_setting", ...}: the setting
    (among those whose smoothed best is within `tolerance` of the overall best) whose smoothed curve flattens in
    the fewest rounds. Smoothing averages the rounds of the last `window_passes` passes (default: the largest
    setting's epochs, one of its rounds)."""
    window = window_passes or max(int(e) for e in curves)
    per_setting = {}
    for epochs, curve in curves.items():
        per_value = max(1, window // int(epochs))
        judged = smoothed(curve, per_value)
        rounds, best = flattened(judged, tolerance), max(v for v in judged if v is not None)
        # near its best only from the last round on (still rising, or dipping at the end): not seen to settle
        settled = rounds < len(curve) - 1
        per_setting[int(epochs)] = {"rounds": rounds, "best": best, "settled": settled, "rounds_averaged": per_value}
    top = max(row["best"] for row in per_setting.values())
    eligible = [e for e, row in per_setting.items() if row["best"] >= top - tolerance]
    epochs = min(eligible, key=lambda e: (per_setting[e]["rounds"], e))
    rounds = per_setting[epochs]["rounds"]
    # a curve that never rises above its start by more than the tolerance "flattens" only at its end: then the
    # budget is simply every pass measured, and the report says FedAvg did not learn on this data
    improved = any(max(v for v in c if v is not None) > c[0] + tolerance for c in curves.values() if c[0] is not None)
    return {
        "rounds": rounds,
        "local_epochs": epochs,
        "passes": rounds * epochs,
        "per_setting": per_setting,
        "fedavg_improved_on_start": improved,
        "flattened": per_setting[epochs]["settled"],
        "window_passes": window,
    }


def read_budget(path: Path) -> dict:
    """A budget.json's {"rounds", "local_epochs", "freeze_policy" (None in a file without one: each job's own),
    ...}; one line naming the file otherwise."""
    from fedxvit.training import FREEZE_POLICIES

    try:
        budget = json.loads(Path(path).read_text())
        rounds, epochs = int(budget["rounds"]), int(budget["local_epochs"])
        policy = budget.get("freeze_policy")
    except FileNotFoundError:
        raise FedXViTError(f"--budget {path} does not exist: run `python -m result_stat.budget` first") from None
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise FedXViTError(f"--budget {path}: not a budget file ({exc})") from None
    if rounds < 1 or epochs < 1:
        raise FedXViTError(f"--budget {path}: rounds {rounds} and local_epochs {epochs} must be at least 1")
    if policy is not None and policy not in FREEZE_POLICIES:
        raise FedXViTError(f"--budget {path}: freeze_policy {policy!r} is not one of {', '.join(FREEZE_POLICIES)}")
    return {**budget, "freeze_policy": policy, "file": str(path)}


def what_fedavg_did(budget: dict) -> str:
    """What FedAvg's calibration curve did at the chosen setting, for the report that trains with the budget. A
    budget.json written before "flattened" (or "fedavg_improved_on_start") existed gets them from its curves."""
    epochs = int(budget["local_epochs"])
    facts = dict(budget)
    if "curves" in budget and not {"flattened", "fedavg_improved_on_start"} <= budget.keys():
        measured = choose_budget(budget["curves"], budget.get("tolerance", TOLERANCE), budget.get("window_passes"))
        facts.setdefault("fedavg_improved_on_start", measured["fedavg_improved_on_start"])
        if epochs in measured["per_setting"]:
            facts.setdefault("flattened", measured["per_setting"][epochs]["settled"])
    passes = f"all {int(budget['rounds']) * epochs} passes measured"
    if not facts.get("fedavg_improved_on_start", True):
        return f"FedAvg's validation curve never rose above the start there: {passes}"
    if not facts.get("flattened", True):
        return f"FedAvg's validation curve did not settle near its best before its last round there: {passes}"
    return "FedAvg's validation curve flattened there"


def measure(
    data: Path,
    initial: Path,
    passes: int,
    settings: list,
    workspace: Path,
    timeout_s: int,
    freeze_policy: str = FREEZE_POLICY,
    log=print,
):
    """{local epochs: validation curve} of FedAvg runs with this freeze policy (run or reused, as `make compare`
    keeps its runs)."""
    from fedxvit.paths import project_root
    from result_stat.comparison.plan import METHOD_JOBS, REFERENCE, federated
    from result_stat.comparison.runs import Scenario, check_scenario, run_plan
    from tooling.jobconfig import job_copy

    sites, preset, image_size, class_names = check_scenario(data, None, initial, None)
    scenario = Scenario(data, sites, initial, preset, image_size, None, class_names)
    job = job_copy(project_root() / METHOD_JOBS[REFERENCE], workspace / "job", client={"freeze_policy": freeze_policy})
    curves = {}
    for epochs in settings:
        if passes % epochs:
            raise FedXViTError(f"--local-epochs {epochs} does not divide --passes {passes}")
        run = federated(
            REFERENCE,
            job,
            scenario,
            (passes // epochs, epochs),
            0,
            {},
            f"sqlite:///{workspace / 'mlflow.db'}",
            timeout_s,
            note=f"{epochs} local epoch(s)",
        )
        results, _, failures = run_plan([run], workspace, scenario.fingerprint, "validation", log)
        if failures:
            raise FedXViTError(f"the FedAvg run with {epochs} local epoch(s) failed: {failures[0]['error']}")
        curves[epochs] = results[(run.name, run.seed)]["val_curve"]
    return curves


def main(argv=None) -> dict:
    from fedxvit.persistor import resolve_initial_model
    from fedxvit.training import FREEZE_POLICIES

    parser = ArgumentParser(
        prog="python -m result_stat.budget", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scenario-data", default="data/skewed-calibration", help="the calibration seed's sites")
    parser.add_argument("--passes", type=int, default=12, help="passes over the data per run (default: 12)")
    parser.add_argument("--local-epochs", default="1,2,4", help="settings to try (default: 1,2,4)")
    parser.add_argument("--tolerance", type=float, default=TOLERANCE, help="flat = within this of the best")
    parser.add_argument(
        "--window-passes",
        type=int,
        default=None,
        help="judge each curve by the mean over the rounds of this many passes (default: the largest --local-epochs)",
    )
    parser.add_argument(
        "--freeze-policy",
        default=FREEZE_POLICY,
        choices=FREEZE_POLICIES,
        help=f"what every run trains, recorded in budget.json for the comparisons (default: {FREEZE_POLICY})",
    )
    parser.add_argument("--initial", default=None, help="initial model (default: models/initial_global.pt)")
    parser.add_argument("--workspace", default="workspace/budget", help="runs, reused when finished")
    parser.add_argument("--out", default=None, help="folder for budget.json (default: --scenario-data)")
    parser.add_argument("--timeout", type=int, default=7200, help="seconds one simulator run may take")
    args = parser.parse_args(argv)
    try:
        settings = sorted({int(e) for e in args.local_epochs.split(",") if e.strip()})
    except ValueError:
        raise FedXViTError(f"--local-epochs {args.local_epochs!r}: expected integers, e.g. 1,2,4") from None
    if not settings or min([*settings, args.passes, args.window_passes or 1]) < 1:
        raise FedXViTError("--passes, --window-passes and every --local-epochs value must be at least 1")
    data = Path(args.scenario_data).resolve()
    initial = Path(args.initial) if args.initial else resolve_initial_model()
    workspace = Path(args.workspace).resolve()
    curves = measure(data, initial.resolve(), args.passes, settings, workspace, args.timeout, args.freeze_policy)
    budget = {
        **choose_budget(curves, args.tolerance, args.window_passes),
        "freeze_policy": args.freeze_policy,
        "curves": curves,
        "data": str(data),
        "tolerance": args.tolerance,
    }
    out = Path(args.out) if args.out else data
    (out / BUDGET_FILE).write_text(json.dumps(budget, indent=2) + "\n")
    print(
        f"budget: {budget['rounds']} rounds x {budget['local_epochs']} local epoch(s), freeze policy "
        f"{args.freeze_policy}; wrote {out / BUDGET_FILE}"
    )
    if budget["fedavg_improved_on_start"] and not budget["flattened"]:
        print(
            f"FedAvg's validation curve with {budget['local_epochs']} local epoch(s) did not settle within "
            f"{args.tolerance:.3f} of its best before its last round: the budget is every pass measured; measure more "
            f"--passes (now {args.passes}) to see it flatten"
        )
    if not budget["fedavg_improved_on_start"]:
        print(
            f"FedAvg's validation never rose more than {args.tolerance:.3f} above the start in any setting: the "
            "budget is all the passes measured, in the fewest rounds"
        )
    return budget


if __name__ == "__main__":
    run_cli(main)
