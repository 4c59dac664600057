"""How long honest sites take per task, from a finished run's server log: the basis of a job's task limits
(`train_timeout`, `submit_model_timeout`, `validation_timeout`; docs/federated-jobs.md#fault-tolerance).

    python bench/task_times.py <workspace>/server/log.txt

Prints, as JSON, each round's time from "Round r started." to "Round r finished." (what `train_timeout`
must cover: a task's limit counts from its creation, so round 0 holds the simulator's client start-up),
the whole of cross-site evaluation (what `validation_timeout` must cover: a site's validate tasks wait
behind each other) and per task name the slowest sites' times from taking a task to answering it.
"""

from __future__ import annotations

import argparse
import json
import re
from datetime import datetime
from pathlib import Path

from fedxvit.errors import FedXViTError, run_cli

ASSIGNED = re.compile(r"assigned task to client (\S+): name=([^,\s]+), id=([^,\s]+)")
ANSWERED = re.compile(r"got result from client (\S+) for task: name=([^,\s]+), id=([^,\s]+)")
ROUND = re.compile(r"Round (\d+) (started|finished)\.")
CROSS_SITE = re.compile(r"Workflow:? cross_site_model_eval (\(.*\) started|finalizing)")


def stamp(line: str) -> float:
    return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()


def task_times(lines: list[str], slowest: int = 3) -> dict:
    """{"round_s": {round: s}, "cross_site_s": s or None, "task_s": {task: [[site, s], ...] slowest first}}."""
    assigned, tasks, rounds, cross = {}, {}, {}, []
    for line in lines:
        if match := ASSIGNED.search(line):
            assigned[match.group(3)] = stamp(line)
        elif (match := ANSWERED.search(line)) and match.group(3) in assigned:
            site, name, task_id = match.groups()
            tasks.setdefault(name, []).append([site, round(stamp(line) - assigned[task_id], 1)])
        if match := ROUND.search(line):
            rounds.setdefault(int(match.group(1)), {})[match.group(2)] = stamp(line)
        if CROSS_SITE.search(line):
            cross.append(stamp(line))
    return {
        "round_s": {r: round(t["finished"] - t["started"], 1) for r, t in sorted(rounds.items()) if len(t) == 2},
        "cross_site_s": round(cross[-1] - cross[0], 1) if len(cross) > 1 else None,
        "task_s": {name: sorted(times, key=lambda x: -x[1])[:slowest] for name, times in sorted(tasks.items())},
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python bench/task_times.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("log", help="a finished run's server log (<workspace>/server/log.txt)")
    args = parser.parse_args(argv)
    log = Path(args.log)
    if not log.is_file():
        raise FedXViTError(f"{log}: no such server log")
    print(json.dumps(task_times(log.read_text(errors="replace").splitlines()), indent=1))


if __name__ == "__main__":
    run_cli(main)
