"""`make bench`: every benchmark in one run on this machine, one table, bench/results.json.

    python bench/run.py [--skip-federation] [--out bench/results.json]

- federation costs as ratios (bench/federation.py): federated ÷ centralized wall time,
  head-mode update bytes ÷ full model bytes, executor ÷ bare-loop training throughput;
- model throughput and parameters per preset (bench/model_throughput.py; on a GPU the anchor
  preset's training step too);
- the demo's wall time per phase and peak memory, read from results/summary.json as the last
  `make demo` wrote it (the demo is not re-run here: it takes minutes and owns results/).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import federation
import model_throughput
import torch

from fedxvit.errors import ArgumentParser, run_cli
from fedxvit.paths import project_root


def demo_timing(summary_path: Path) -> dict | None:
    """timing_s and peak_rss_mb of the last `make demo`, or None when it has not run."""
    if not summary_path.is_file():
        return None
    summary = json.loads(summary_path.read_text())
    if "timing_s" not in summary:
        return None
    return {
        "timing_s": summary["timing_s"],
        "peak_rss_mb": summary.get("peak_rss_mb"),
        "written": summary_path.stat().st_mtime,
    }


def main(argv=None) -> dict:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--skip-federation", action="store_true", help="only the model and demo numbers")
    parser.add_argument("--out", default="bench/results.json")
    args = parser.parse_args(argv)
    root = project_root()
    bench = root / "bench"
    result = {"machine": {"cpu_count": os.cpu_count(), "cuda": torch.cuda.is_available(), "torch": torch.__version__}}

    print("== model throughput per preset ==", flush=True)
    cuda = torch.cuda.is_available()
    throughput_args = ["--out", str(bench / "model_throughput.json")]
    if cuda:
        throughput_args += ["--device", "cuda", "--anchor-train"]
    result["model_throughput"] = model_throughput.main(throughput_args)

    if not args.skip_federation:
        print("\n== federation costs ==", flush=True)
        result["federation"] = federation.main(["--out", str(bench / "federation.json")])

    result["demo"] = demo_timing(root / "results" / "summary.json")
    if result["demo"]:
        timing, rss = result["demo"]["timing_s"], result["demo"]["peak_rss_mb"] or {}
        print("\n== last make demo ==")
        for phase, seconds in timing.items():
            print(f"  {phase:<10} {seconds:>8.1f} s   peak {rss.get(phase if phase != 'total' else 'max', 0):>6.0f} MB")
    else:
        print("\n(no demo timings: run `make demo` first)")
    result["machine"]["load_average_end"] = os.getloadavg()
    out = root / args.out
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out}")
    return result


if __name__ == "__main__":
    run_cli(main)
