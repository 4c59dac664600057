"""`make demo`: the whole story in one command, timed.

    python -m fedxvit.demo [--results results] [--phases data expert transfer simulate results]

Runs each phase as its own Make target (the Makefile stays the one home of the commands):
data -> expert -> transfer -> simulate (the design-card `nvflare simulator ... -gpu 0 -t 3`) ->
results. Every phase is timed and the peak memory of its whole process tree (the simulator's
server and client processes together) is sampled. The timings go into `results/summary.json`
under `timing_s` (plus `peak_rss_mb`), then a short summary is printed. Re-running reuses the
data and the expert (their own targets decide), so a second demo costs the federated part only.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import threading
import time
from pathlib import Path

from fedxvit.errors import FedXViTError, run_cli
from fedxvit.paths import project_root

PHASES = ("data", "expert", "transfer", "simulate", "results")


def tree_rss_bytes(pid: int) -> int:
    """Memory of a process and all its descendants right now (0 once it is gone).

    Proportional set size where the OS reports it: the simulator's processes share the torch
    libraries, and plain RSS would count those pages once per process."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for proc in procs:
        try:
            info = proc.memory_full_info()
            total += getattr(info, "pss", info.rss)
        except psutil.Error:
            pass
    return total


def run_timed(command: list[str], cwd: Path, interval_s: float = 0.25) -> dict:
    """Run a command to completion; wall seconds, peak tree RSS (MB) and the return code."""
    started = time.perf_counter()
    proc = subprocess.Popen(command, cwd=cwd)
    peak = [0]
    done = threading.Event()

    def sample():
        while not done.wait(interval_s):
            peak[0] = max(peak[0], tree_rss_bytes(proc.pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    returncode = proc.wait()
    done.set()
    sampler.join()
    return {"wall_s": time.perf_counter() - started, "peak_rss_mb": peak[0] / 2**20, "returncode": returncode}


def record_timing(summary_path: Path, timings: dict) -> dict:
    """Merge the phase timings into summary.json (written by the results phase) and return it."""
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    summary["timing_s"] = {**{p: round(t["wall_s"], 1) for p, t in timings.items()},
                           "total": round(sum(t["wall_s"] for t in timings.values()), 1)}
    summary["peak_rss_mb"] = {**{p: round(t["peak_rss_mb"]) for p, t in timings.items()},
                              "max": round(max(t["peak_rss_mb"] for t in timings.values()))}
    summary_path.parent.mkdir(parents=True, exist_ok=True)
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def format_summary(summary: dict, results_dir: Path) -> str:
    """The few lines a newcomer reads after the demo, from summary.json alone."""
    lines = ["", "=" * 72, "fedxvit demo summary", "=" * 72]
    expert = summary.get("expert") or {}
    if expert:
        lines.append(f"Phase 1 expert (4 classes): test accuracy {_pct(expert.get('test_accuracy'))}, "
                     f"loss {expert.get('test_loss', float('nan')):.4f}")
    federated = summary.get("federated") or {}
    rounds = federated.get("rounds") or []
    if rounds:
        lines += ["", "Phase 2 federated rounds (global model scored on all sites' validation data):",
                  "  round  global_val_accuracy  global_val_loss"]
        lines += [f"  {r['round']:>5}  {r['global_val_accuracy']:>19.4f}  {r['global_val_loss']:>15.4f}" for r in rounds]
    if "final_test_accuracy" in federated:
        lines.append(f"\nFinal global model, combined test set: accuracy {_pct(federated['final_test_accuracy'])}, "
                     f"loss {federated.get('final_test_loss', float('nan')):.4f}")
        for name, row in (federated.get("per_class") or {}).items():
            if isinstance(row, dict) and "precision" in row and name not in ("macro avg", "weighted avg"):
                lines.append(f"  {name:<10} precision {row['precision']:.4f}  recall {row['recall']:.4f}  "
                             f"f1 {row['f1-score']:.4f}  n={int(row['support'])}")
    comparison = summary.get("comparison") or []
    if comparison:
        lines += ["", "Is federation worth it? (combined test accuracy)"]
        lines += [f"  {row['model']:<34} {_pct(row.get('test_accuracy'))}" for row in comparison]
    xai = summary.get("xai") or {}
    if xai:
        lines.append(f"\nPhase 3 Grad-CAM vs tumor masks: pointing game {_pct(xai.get('pointing_game'))}, "
                     f"heatmap energy inside the mask {_pct(xai.get('energy_in_mask'))}")
        baselines = xai.get("baselines") or {}  # what the pointing game means on this data
        references = {"image intensity": baselines.get("intensity"), "ideal 16-px cell map": baselines.get("mask_cells"),
                      "occlusion": xai.get("occlusion"), "Integrated Gradients": xai.get("integrated_gradients")}
        shown = [f"{label} {_pct(ref.get('pointing_game'))}" for label, ref in references.items() if ref]
        if shown:
            lines.append("  pointing game for reference: " + ", ".join(shown))
    timing = summary.get("timing_s") or {}
    if timing:
        lines.append("\nWall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in timing.items())
                     + f"; peak memory {summary.get('peak_rss_mb', {}).get('max', 0) / 1024:.1f} GB")
    lines += ["", f"Where to look: {results_dir}/report.md and the PNGs beside it",
              "  tensorboard --logdir workspace/server/simulate_job/tb_events",
              f"  mlflow ui --backend-store-uri sqlite:///{project_root()}/mlruns/mlflow.db", ""]
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m fedxvit.demo", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--results", default="results", help="results folder (where `make results` writes summary.json)")
    parser.add_argument("--phases", nargs="+", default=list(PHASES), choices=PHASES, help="Make targets to run, in order")
    parser.add_argument("--make", default="make", help="the make program")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    root = project_root()
    timings = {}
    for phase in args.phases:
        print(f"\n=== make {phase} ===", flush=True)
        timings[phase] = run_timed([args.make, "--no-print-directory", phase], cwd=root)
        if timings[phase]["returncode"] != 0:
            raise FedXViTError(f"`make {phase}` failed (exit {timings[phase]['returncode']}); see its output above")
        print(f"=== make {phase}: {timings[phase]['wall_s']:.0f} s, peak {timings[phase]['peak_rss_mb']:.0f} MB ===",
              flush=True)
    results_dir = root / args.results
    summary = record_timing(results_dir / "summary.json", timings)
    print(format_summary(summary, Path(args.results)))
    return summary


if __name__ == "__main__":
    run_cli(main)
