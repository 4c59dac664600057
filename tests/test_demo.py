"""`make demo`: a Make chain whose phases run under bench/timed.py (wall time, process-tree memory,
exit code passed on), and the summary printed at the end from summary.json alone."""

import json
import os
import re
import subprocess
import sys
import time

import pytest
from tiny import REPO

from result_stat.summary import PHASES, format_summary

sys.path.insert(0, str(REPO / "bench"))
import timed  # noqa: E402  (bench/ holds scripts, not a package)

ALLOCATE_IN_CHILD = (
    "import subprocess, sys; "
    "subprocess.run([sys.executable, '-c', 'import time; b = bytearray(300 * 2**20); time.sleep(1.5)'], check=True)"
)


def test_run_timed_sees_the_memory_of_grandchildren():
    started = time.perf_counter()
    result = timed.run_timed([sys.executable, "-c", ALLOCATE_IN_CHILD], interval_s=0.1)
    elapsed = time.perf_counter() - started
    assert result["returncode"] == 0
    assert 1.5 <= result["wall_s"] <= elapsed, "seconds, up to the end of the grandchild's 1.5 s sleep"
    assert result["peak_rss_mb"] >= 300, result


def test_a_phase_is_recorded_beside_the_others_and_a_failure_is_passed_on(tmp_path, capsys):
    log = tmp_path / "results" / "timings.json"
    log.parent.mkdir()
    log.write_text(json.dumps({"data": {"wall_s": 10.0, "peak_rss_mb": 500.0}}))
    assert (
        timed.main(["--phase", "expert", "--log", str(log), "--", sys.executable, "-c", "import time; time.sleep(0.3)"])
        == 0
    )
    timings = json.loads(log.read_text())
    assert timings["data"] == {"wall_s": 10.0, "peak_rss_mb": 500.0} and timings["expert"]["wall_s"] >= 0.3
    assert "=== expert:" in capsys.readouterr().out
    assert (
        timed.main(["--phase", "transfer", "--log", str(log), "--", sys.executable, "-c", "raise SystemExit(3)"]) == 3
    )
    assert "transfer" not in json.loads(log.read_text()), "a failed phase records no timing"
    assert timed.main(["--phase", "x", "--log", str(log), "--", str(tmp_path / "no-such-program")]) == 127


def dry_run(target: str, stamp) -> list[str]:
    """The commands `make <target>` would run (-n runs none); a fresh STAMP makes the venv count as set up.
    Run as a top-level make: under `make test` the inherited MAKELEVEL/MAKEFLAGS would add directory lines."""
    stamp.touch()
    env = {k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")}
    return subprocess.run(
        ["make", "--no-print-directory", "-n", target, f"STAMP={stamp}", "PY=py"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()


def test_make_demo_is_a_chain_of_timed_phases_then_the_summary(tmp_path):
    stamp = tmp_path / "installed"
    plan = dry_run("demo", stamp)
    # before the simulator: the job's site options checked and the workspace's class allow list written (a second)
    checks = ["py -m tooling.jobconfig jobs/fedxvit", "py -m fedxvit.site_policy workspace/local"]
    at = next(i for i, line in enumerate(plan) if "--phase simulate" in line)
    assert [line.split(" >")[0] for line in plan[at - 2 : at]] == checks, plan
    plan = plan[: at - 2] + plan[at:]
    timed_phases = [re.search(r"py bench/timed.py --phase (\w+) --log results/timings.json -- ", line) for line in plan]
    assert [m.group(1) for m in timed_phases if m] == list(PHASES), plan
    assert all(timed_phases[: len(PHASES)]) and len(plan) == len(PHASES) + 1, "every phase is timed, nothing else runs"
    assert plan[-1] == "py -m result_stat.summary --results results --print"
    alone = "\n".join(dry_run("simulate", stamp))
    assert "timed.py" not in alone and "nvflare simulator jobs/fedxvit" in alone, "a phase run alone is not timed"
    assert dry_run("results", stamp) == ["py -m tooling.baselines", "py -m result_stat.run_all --out results"], (
        "results needs baselines"
    )


@pytest.mark.parametrize("target", ["bench", "bench-he"])
def test_the_bench_targets_scripts_start_with_makes_environment(tmp_path, target):
    """A bench script runs by its path, so the repository's top-level packages (tooling) must reach it through
    the target's own environment: its command, with --help, exits 0 (it once failed on `import tooling`)."""
    commands = [line for line in dry_run(target, tmp_path / "installed") if "bench/" in line]
    assert len(commands) == 1, commands
    command = commands[0].replace("py bench/", f"{sys.executable} bench/") + " --help"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MAKELEVEL", "MAKEFLAGS", "MFLAGS")}
    done = subprocess.run(["bash", "-c", command], cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == 0 and "usage" in done.stdout, done.stderr[-2000:]


def test_no_python_module_runs_make():
    sources = [
        p for folder in ("custom", "result_stat", "bench", "data_preparation") for p in (REPO / folder).rglob("*.py")
    ]
    assert sources
    assert [p.name for p in sources if re.search(r"""["']make["']""", p.read_text())] == []


def test_summary_text_reports_every_phase():
    summary = {
        "expert": {"test_accuracy": 0.975, "test_loss": 0.1},
        "federated": {
            "rounds": [{"round": 1, "global_val_accuracy": 0.9, "global_val_loss": 0.3}],
            "final_test_accuracy": 0.99,
            "final_test_loss": 0.05,
            "per_class": {"Healthy": {"precision": 1.0, "recall": 0.98, "f1-score": 0.99, "support": 50}},
        },
        "comparison": [{"model": "centralized (pooled sites)", "test_accuracy": 0.995}],
        "xai": {
            "pointing_game": 0.92,
            "energy_in_mask": 0.6,
            "baselines": {"intensity": {"pointing_game": 0.97}, "mask_cells": {"pointing_game": 0.938}},
            "integrated_gradients": {"pointing_game": 1.0},
        },
        "timing_s": {"data": 10.0, "total": 10.0},
        "peak_rss_mb": {"max": 2048},
    }
    text = format_summary(summary, "results")
    for expected in (
        "97.5%",
        "0.9000",
        "99.0%",
        "Healthy",
        "centralized (pooled sites)",
        "99.5%",
        "pointing game 92.0%",
        "image intensity 97.0%",
        "ideal 16-px cell map 93.8%",
        "Integrated Gradients 100.0%",
        "peak memory 2.0 GB",
        "tensorboard --logdir",
        "mlflow ui",
    ):
        assert expected in text, expected
