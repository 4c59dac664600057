"""What homomorphic encryption costs: the HE job against plain FedAvg in NVFlare's POC, per freeze policy.

    PYTHONPATH=. python bench/he_cost.py [--data data] [--initial models/initial_global.pt] [--freeze head,last-k]
                                          [--out bench/he.json]

For each freeze policy, jobs/fedxvit (plain) and jobs/fedxvit_he (HE) run in a POC system on the same
sites, initial model, rounds, epochs and seed (every site in every round: min_clients = all). Measured:
the training phase's seconds per round (ScatterAndGather's first to last log line, server log), the
bytes of the updates the server received per round (UpdateSizeLog: ciphertext vs float32 arrays),
and the final global model's pooled test accuracy and balanced accuracy (HE: decrypted with site1's
key, as a hospital would). Needs `make data transfer`. Timings on a shared CPU are noisy: the load
average is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from federation import SITES, training_phase_seconds

from fedxvit.errors import FedXViTError, run_cli
from fedxvit.filters import UPDATE_SIZES_FILE
from fedxvit.paths import project_root
from fedxvit.widgets import GLOBAL_VAL_FILE
from tooling.poc import free_port

JOBS = {"plain": "jobs/fedxvit", "he": "jobs/fedxvit_he"}


def bytes_per_round(run_dir: Path) -> float:
    """Mean over rounds of the bytes all sites' updates held when the server received them."""
    rows = json.loads((run_dir / UPDATE_SIZES_FILE).read_text())["updates"]
    per_round = {}
    for row in rows:
        per_round[row["round"]] = per_round.get(row["round"], 0) + row["bytes"]
    return sum(per_round.values()) / len(per_round)


def final_model(run_dir: Path, he: bool, poc: Path, preset: str, scratch: Path):
    """The run's final global model; the HE one decrypted with site1's key, as a hospital would."""
    from fedxvit.checkpoint import build_model_from_checkpoint, load_global_model

    path = run_dir / "app_server" / "FL_global_model.pt"
    if not he:
        return load_global_model(path, preset)
    from fedxvit.he import decrypt_main

    context = poc / "example_project" / "prod_00" / SITES[0] / "startup" / "client_context.tenseal"
    decrypted = decrypt_main(
        [str(path), "--context", str(context), "--preset", preset, "--out", str(scratch / "he.pt")]
    )
    return build_model_from_checkpoint(decrypted, preset=preset)[0]


def run_one(kind: str, freeze: str, data: Path, initial: Path, scratch: Path, scenario) -> dict:
    from result_stat.comparison.scores import score_sites
    from tooling.jobconfig import job_copy

    job = job_copy(
        project_root() / JOBS[kind],
        scratch / f"{kind}-{freeze}",
        server={"min_clients": len(SITES), "preset": scenario.preset},
        client={"freeze_policy": freeze, "preset": scenario.preset},
    )
    out = scratch / "results"
    command = [sys.executable, "-m", "tooling.poc", "--job", str(job), "--workspace", str(scratch / "poc")]
    command += ["--out", str(out), "--port", str(free_port()), "--timeout", "3600"]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)  # its own process: one POC system per run
    wall = time.perf_counter() - started
    if done.returncode != 0:
        last = (done.stdout + done.stderr).strip().splitlines()[-1:] or ["no output"]
        raise FedXViTError(f"{kind} FedAvg, freeze {freeze}: the POC run failed: {last[0]}")
    (run_dir,) = [p / "workspace" for p in out.iterdir() if p.is_dir()]
    rounds = len(json.loads((run_dir / GLOBAL_VAL_FILE).read_text())["rounds"])
    model = final_model(run_dir, kind == "he", scratch / "poc", scenario.preset, scratch)
    pooled = score_sites(scenario.predict(model, "test"))["pooled"]
    return {
        "job": JOBS[kind],
        "freeze_policy": freeze,
        "rounds": rounds,
        "wall_s": wall,
        "s_per_round": training_phase_seconds(run_dir / "log.txt") / rounds,
        "bytes_per_round": bytes_per_round(run_dir),
        "test_accuracy": pooled["accuracy"],
        "test_balanced_accuracy": pooled["balanced_accuracy"],
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python bench/he_cost.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="data", help="folder of site1..site3 (default: data)")
    parser.add_argument("--initial", default="models/initial_global.pt")
    parser.add_argument("--freeze", default="head,last-k", help="freeze policies to measure (default: head,last-k)")
    parser.add_argument("--out", default="bench/he.json")
    args = parser.parse_args(argv)
    from result_stat.comparison.runs import Scenario, check_scenario

    root = project_root()
    data, initial = ((root / p if not Path(p).is_absolute() else Path(p)) for p in (args.data, args.initial))
    sites, preset, image_size = check_scenario(data, list(SITES), initial, None)
    scenario = Scenario(data, sites, initial, preset, image_size, "cpu")
    os.environ.update(FEDXVIT_DATA_ROOT=str(data.resolve()), FEDXVIT_INITIAL_MODEL=str(initial.resolve()))
    for site in SITES:
        os.environ.pop(f"FEDXVIT_DATA_{site.upper()}", None)
    rows = []
    with tempfile.TemporaryDirectory(prefix="fedxvit-he-bench-") as tmp:
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{Path(tmp) / 'mlflow.db'}"
        for freeze in [f.strip() for f in args.freeze.split(",") if f.strip()]:
            for kind in JOBS:
                print(f"{kind} FedAvg, freeze {freeze}: POC run ...", flush=True)
                rows.append(
                    {"kind": kind, **run_one(kind, freeze, data, initial, Path(tmp) / f"{kind}-{freeze}", scenario)}
                )
    ratios = {}
    for freeze in {r["freeze_policy"] for r in rows}:
        plain, he = (next(r for r in rows if r["freeze_policy"] == freeze and r["kind"] == k) for k in JOBS)
        ratios[freeze] = {
            "time_per_round": he["s_per_round"] / plain["s_per_round"],
            "bytes_per_round": he["bytes_per_round"] / plain["bytes_per_round"],
            "test_accuracy_difference": he["test_accuracy"] - plain["test_accuracy"],
        }
    result = {
        "runs": rows,
        "he_over_plain": ratios,
        "machine": {"cpu_count": os.cpu_count(), "load_average": os.getloadavg()},
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print("| freeze | job | s/round | MB/round | test acc | test bal. acc |\n|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['freeze_policy']} | {r['kind']} | {r['s_per_round']:.1f} | {r['bytes_per_round'] / 1e6:.2f} "
            f"| {r['test_accuracy']:.3f} | {r['test_balanced_accuracy']:.3f} |"
        )
    for freeze, ratio in ratios.items():
        print(
            f"{freeze}: HE/plain time per round x{ratio['time_per_round']:.2f}, bytes per round "
            f"x{ratio['bytes_per_round']:.1f}, test accuracy {ratio['test_accuracy_difference']:+.4f}"
        )
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    run_cli(main)
