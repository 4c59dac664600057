"""`make evaluate`: the test report computed where the data lives (jobs/fedxvit_evaluate in NVFlare's simulator).

    python -m result_stat.federated_evaluation [--run-dir workspace/server/simulate_job] [--data data]
        [--sites site1,site2,site3] [--out results/evaluation]

Each site scores the run's final and best global models on its own test split and returns counts and
probability histograms only (fedxvit.evaluation); the server writes the consortium's report. This copies the job,
names the run's two models in it (the server may read that run folder: $FEDXVIT_ALLOWED_ROOTS), runs it and
copies evaluation.json / evaluation.md to --out. In POC or production, submit the job with `models` set to
the server's model files; the report lands in the server's run folder.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from fedxvit.errors import ArgumentParser, FedXViTError, run_cli
from fedxvit.evaluation import REPORT_DIR
from fedxvit.paths import ALLOWED_ROOTS_ENV
from result_stat.report import GLOBAL_MODELS
from tooling.jobconfig import default_run_dir, job_copy, job_folder, run_sites
from tooling.simulation import run_simulator

EVALUATE_JOB = "fedxvit_evaluate"


def run_evaluation(models: dict, data: Path, sites: list, workspace: Path, client: dict | None = None) -> Path:
    """The evaluation job in the simulator over <data>/<site> for {name: model file}; the folder of its report.
    `client` changes the sites' job variables (a test's tiny preset)."""
    models = {name: str(Path(path).resolve()) for name, path in models.items()}
    copy = job_copy(job_folder(EVALUATE_JOB), workspace / "job", server={"models": models}, client=client)
    roots = os.pathsep.join(sorted({str(Path(path).resolve().parent) for path in models.values()}))
    run_dir = run_simulator(
        copy,
        workspace / "simulator",
        data,
        sites,
        None,
        extra_env={ALLOWED_ROOTS_ENV: roots},
        expect=f"{REPORT_DIR}/evaluation.json",
    )
    return run_dir / REPORT_DIR


def main(argv=None) -> None:
    parser = ArgumentParser(prog="python -m result_stat.federated_evaluation", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", type=Path, default=None, help="default: workspace/server/simulate_job")
    parser.add_argument("--data", type=Path, default=Path("data"), help="default: data")
    parser.add_argument("--sites", help="comma-separated (default: the run's sites)")
    parser.add_argument("--out", type=Path, default=Path("results/evaluation"), help="default: results/evaluation")
    parser.add_argument(
        "--workspace", type=Path, default=Path("workspace/evaluation"), help="default: workspace/evaluation"
    )
    args = parser.parse_args(argv)
    run_dir = args.run_dir or default_run_dir()
    models = {name: run_dir / "app_server" / file for name, file in GLOBAL_MODELS.items()}
    missing = [str(path) for path in models.values() if not path.is_file()]
    if missing:
        raise FedXViTError(f"--run-dir {run_dir}: no {missing[0]}: run `make simulate` first")
    sites = [s.strip() for s in args.sites.split(",")] if args.sites else run_sites(run_dir)
    start = time.monotonic()
    report = run_evaluation(models, args.data.resolve(), sites, args.workspace.resolve())
    args.out.mkdir(parents=True, exist_ok=True)
    for name in ("evaluation.json", "evaluation.md"):
        shutil.copy2(report / name, args.out / name)
    print((args.out / "evaluation.md").read_text())
    print(f"{args.out / 'evaluation.md'} ({time.monotonic() - start:.0f} s)")


if __name__ == "__main__":
    run_cli(main)
