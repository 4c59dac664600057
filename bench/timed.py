"""Time one Make phase: run its command, record wall time and peak memory, pass its exit code on.

    python bench/timed.py --phase simulate --log results/timings.json -- nvflare simulator ...

`make demo` prefixes each phase's recipe with this (Make runs the phases; nothing here calls
make). The peak memory is that of the whole process tree, sampled every 0.25 s: the simulator's
server and client processes together. <log> keeps the latest entry per phase; the summary of
`result_stat.summary` reads it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path


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


def run_timed(command: list[str], interval_s: float = 0.25) -> dict:
    """Run a command to completion; wall seconds, peak tree memory (MB) and the return code."""
    started = time.perf_counter()
    try:
        proc = subprocess.Popen(command)
    except OSError as exc:  # a missing program: one line, like a shell's
        print(f"error: cannot run {command[0]}: {exc.strerror}", file=sys.stderr)
        return {"wall_s": time.perf_counter() - started, "peak_rss_mb": 0.0, "returncode": 127}
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


def record(log: Path, phase: str, timing: dict) -> dict:
    """Put this phase's entry into the log (other phases' entries stay); returns the whole log."""
    try:
        timings = json.loads(log.read_text())
    except (OSError, json.JSONDecodeError):
        timings = {}
    timings[phase] = {
        "wall_s": round(timing["wall_s"], 3),
        "peak_rss_mb": round(timing["peak_rss_mb"], 1),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    log.parent.mkdir(parents=True, exist_ok=True)
    tmp = log.with_name(log.name + ".tmp")
    tmp.write_text(json.dumps(timings, indent=2) + "\n")
    os.replace(tmp, log)
    return timings


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--phase", required=True, help="the phase's name (the Make target)")
    parser.add_argument("--log", required=True, help="timings file to update")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- the command to run")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given after --")
    timing = run_timed(command)
    if timing["returncode"] == 0:  # a failed phase records nothing: Make stops there
        record(Path(args.log), args.phase, timing)
        print(f"=== {args.phase}: {timing['wall_s']:.0f} s, peak {timing['peak_rss_mb']:.0f} MB ===", flush=True)
    return timing["returncode"]


if __name__ == "__main__":
    sys.exit(main())
