"""`make compare-flower`: does the Flower app give what jobs/fedxvit gives? Three systems, one data set, one initial
model, the same settings, several seeds: jobs/fedxvit in NVFlare's simulator, the Flower app in Flower's simulation
engine (tooling.flower) and the same app inside NVFlare (jobs/fedxvit_flower in NVFlare's simulator).

Each final global model is scored on every site's test split; each Flower system against jobs/fedxvit is a paired
difference of pooled balanced accuracy (result_stat.comparison.statistics: hierarchical bootstrap over seeds and
test images, Holm over the two differences; the expected verdict is *equivalent*). Wall times side by side.
-> <out>/flower_comparison.json and .md. What differs by design (docs/federated-jobs.md#fedxvit-as-a-flower-app):
Flower's FedAvg weighs a site by its training images, jobs/fedxvit by its optimizer steps, and the Flower rounds
re-seed each round, so the systems are not expected to give identical models.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from fedxvit.checkpoint import load_global_model, read_meta
from fedxvit.errors import ArgumentParser, FedXViTError, run_cli
from fedxvit.methods import BASE_JOB, FLOWER_JOB
from fedxvit.model import get_preset
from fedxvit.paths import project_root
from result_stat.comparison.runs import Scenario, pooled_accuracy
from result_stat.comparison.scores import headline_metrics
from result_stat.comparison.statistics import POOLED, Resampler, paired_difference, verdicts
from tooling import flower
from tooling.jobconfig import job_copy
from tooling.simulation import GLOBAL_MODEL, run_simulator

SYSTEMS = ("nvflare", "flower-native", "flower-in-nvflare")
REFERENCE = "nvflare"


def run_system(system: str, seed: int, rounds: int, scenario: Scenario, folder: Path, tracking_uri: str) -> Path:
    """One run of one system; the folder holding app_server/FL_global_model.pt."""
    jobs = project_root() / "jobs"
    common = {"num_rounds": rounds, "min_clients": len(scenario.sites), "preset": scenario.preset}
    common.update(tracking_uri=tracking_uri, registered_model_name="")
    env = {"MLFLOW_TRACKING_URI": tracking_uri}
    if system == "nvflare":
        job = job_copy(jobs / BASE_JOB, folder / "job", server=common, client={"seed": seed, "preset": scenario.preset})
        return run_simulator(job, folder / "simulator", scenario.data, scenario.sites, scenario.initial, 3600, env)
    if system == "flower-in-nvflare":
        job = job_copy(jobs / FLOWER_JOB, folder / "job", server={**common, "seed": seed})
        return run_simulator(job, folder / "simulator", scenario.data, scenario.sites, scenario.initial, 3600, env)
    settings = {"num-server-rounds": rounds, "min-nodes": len(scenario.sites), "preset": scenario.preset, "seed": seed}
    return flower.simulate(folder, scenario.data, scenario.sites, scenario.initial, settings, extra_env=env)


def compare(data: Path, sites: list, initial: Path, seeds: list, rounds: int, workspace: Path, out: Path) -> dict:
    preset = read_meta(initial).get("preset")
    scenario = Scenario(data, sites, initial, preset, get_preset(preset).image_size, None)
    tracking_uri = f"sqlite:///{(workspace / 'mlflow.db').resolve()}"
    workspace.mkdir(parents=True, exist_ok=True)
    predictions = {system: {} for system in SYSTEMS}
    rows = []
    for seed in seeds:
        for system in SYSTEMS:
            started = time.perf_counter()
            run_dir = run_system(system, seed, rounds, scenario, workspace / f"{system}-seed{seed}", tracking_uri)
            wall_s = time.perf_counter() - started
            model = load_global_model(run_dir / GLOBAL_MODEL, preset, scenario.num_classes, scenario.device)
            test = scenario.predict(model, "test")
            predictions[system][seed] = test
            labels = [y for p in test.values() for y in p["labels"]]
            probs = [q for p in test.values() for q in p["probs"]]
            rows.append(
                {
                    "system": system,
                    "seed": seed,
                    "wall_s": round(wall_s, 1),
                    "test_accuracy": pooled_accuracy(test),
                    "test_balanced_accuracy": headline_metrics(labels, probs)["balanced_accuracy"],
                }
            )
            print(f"{system} seed {seed}: {rows[-1]}", flush=True)
    reference = predictions[REFERENCE][seeds[0]]
    resampler = Resampler({site: p["labels"] for site, p in reference.items()}, seeds)
    differences = {
        f"{system} - {REFERENCE}": paired_difference(
            resampler, predictions[system], predictions[REFERENCE], POOLED, (system, REFERENCE)
        )
        for system in SYSTEMS
        if system != REFERENCE
    }
    verdicts(differences)
    for d in differences.values():
        d.pop("replicates")
    result = {"data": str(data), "sites": sites, "preset": preset, "rounds": rounds, "seeds": seeds}
    result.update(runs=rows, differences=differences)
    out.mkdir(parents=True, exist_ok=True)
    (out / "flower_comparison.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "flower_comparison.md").write_text(markdown(result))
    return result


def markdown(result: dict) -> str:
    lines = [
        f"# Flower app vs jobs/fedxvit ({result['preset']} preset, {result['rounds']} rounds, seeds {result['seeds']})",
        "",
        "| system | test balanced accuracy (mean over seeds) | test accuracy | wall time, s (mean) |",
        "|---|---:|---:|---:|",
    ]
    for system in SYSTEMS:
        runs = [r for r in result["runs"] if r["system"] == system]
        mean = {k: sum(r[k] for r in runs) / len(runs) for k in ("test_balanced_accuracy", "test_accuracy", "wall_s")}
        lines.append(
            f"| {system} | {100 * mean['test_balanced_accuracy']:.1f} | {100 * mean['test_accuracy']:.1f} | "
            f"{mean['wall_s']:.0f} |"
        )
    lines += ["", "| difference (pooled balanced accuracy) | points | 95% CI | Holm p | verdict |"]
    lines.append("|---|---:|---|---:|---|")
    for name, d in result["differences"].items():
        low, high = (100 * v for v in d["ci"])
        lines.append(
            f"| {name} | {100 * d['difference']:+.1f} | [{low:+.1f}, {high:+.1f}] | {d['p_adjusted']:.2f} | "
            f"{d['verdict']} |"
        )
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    parser = ArgumentParser(prog="python -m result_stat.flower_comparison", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("data"))
    parser.add_argument("--sites", default="site1,site2,site3")
    parser.add_argument("--initial", type=Path, default=Path("models") / "initial_global.pt")
    parser.add_argument("--seeds", default="0,1,2", help="training seeds, comma-separated")
    parser.add_argument("--rounds", type=int, default=5, help="rounds (jobs/fedxvit's default)")
    parser.add_argument("--workspace", type=Path, default=Path("workspace") / "compare-flower")
    parser.add_argument("--out", type=Path, default=Path("results"))
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    if not args.initial.is_file():
        raise FedXViTError(f"--initial {args.initial}: no such model (make transfer)")
    sites = [s.strip() for s in args.sites.split(",") if s.strip()]
    return compare(args.data, sites, args.initial, seeds, args.rounds, args.workspace, args.out)


if __name__ == "__main__":
    run_cli(main)
