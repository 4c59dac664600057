"""How long honest sites take per task, from a finished run's server log: the basis of a job's task limits
(`train_timeout`, `submit_model_timeout`, `validation_timeout`; docs/federated-jobs.md#fault-tolerance).

    python bench/task_times.py <workspace>/server/log.txt

Prints, as JSON, each round's time from "Round r started." to "Round r finished." (what `train_timeout`
must cover: a task's limit counts from its creation, so round 0 holds the simulator's client start-up),
the whole of cross-site evaluation (what `validation_timeout` must cover: a site's validate tasks wait
behind each other) and per task name the slowest sites' times from taking a task to answering it.
`round_breakdown` splits each round of a finished run further, with the sites' own logs (issue #28's lean round).
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
# the executor's line for a train task (fedxvit.executor): the seconds of its three parts
SITE_TURN = re.compile(r"fedxvit (\S+) round (\d+): .* \(seconds: global val (\S+), training (\S+), local val (\S+)\)")
WORKFLOWS_DONE = ("Workflow: cross_site_model_eval finalizing", "Finished ScatterAndGather Training")


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


def round_breakdown(server_lines: list[str], site_lines: list[str]) -> dict:
    """Where each round's wall time goes, from the server log and the sites' logs of one run:
    {round: {round_s, dispatch_s (round start to the first train task taken), slowest_task_s (a site's train task,
    taken to answered, as the server saw it), aggregation_s (last answer to the round's end), between_s (the round's
    end to the next round's start: the workflow's snapshot and memory clean-up; 0 after the last round), and the
    slowest site's global_val_s, training_s and local_val_s; overhead_s = round_s + between_s - the slowest site's
    training_s, so a round's cost is counted start to start; beyond_tasks_s = round_s + between_s -
    slowest_task_s}}. Round 0 also holds the sites' start-up in the simulator."""
    starts, ends, taken, answered = {}, {}, {}, []
    for line in server_lines:
        if match := ROUND.search(line):
            (starts if match.group(2) == "started" else ends)[int(match.group(1))] = stamp(line)
        elif (match := ASSIGNED.search(line)) and match.group(2) == "train":
            taken[match.group(3)] = stamp(line)
        elif (match := ANSWERED.search(line)) and match.group(2) == "train" and match.group(3) in taken:
            answered.append((taken[match.group(3)], stamp(line)))
    parts = {}
    for line in site_lines:
        if match := SITE_TURN.search(line):
            site, r, *seconds = match.groups()
            parts.setdefault(int(r), {})[site] = [float(x) for x in seconds]
    rounds = {}
    for r in sorted(set(starts) & set(ends)):
        tasks = [(a, b) for a, b in answered if starts[r] <= a <= ends[r]]
        if not tasks or r not in parts:
            continue
        round_s, slowest_task = ends[r] - starts[r], max(b - a for a, b in tasks)
        between = starts[r + 1] - ends[r] if r + 1 in starts else 0.0
        slowest = max(parts[r].values(), key=lambda x: x[1])  # the longest local training
        rounds[r] = {
            "round_s": round(round_s, 3),
            "dispatch_s": round(min(a for a, _ in tasks) - starts[r], 3),
            "slowest_task_s": round(slowest_task, 3),
            "aggregation_s": round(ends[r] - max(b for _, b in tasks), 3),
            "between_s": round(between, 3),
            "global_val_s": slowest[0],
            "training_s": slowest[1],
            "local_val_s": slowest[2],
            "overhead_s": round(round_s + between - slowest[1], 3),
            "beyond_tasks_s": round(round_s + between - slowest_task, 3),
        }
    return rounds


def run_phases(server_lines: list[str], launched: float, exited: float) -> dict:
    """A simulator run's fixed costs around its rounds, in seconds: until_first_round_s (launch to round 0: the CLI,
    the server and its components), shutdown_s (the last workflow's end to the process exit)."""
    first = next((stamp(line) for line in server_lines if ROUND.search(line)), None)
    done = [stamp(line) for line in server_lines if any(text in line for text in WORKFLOWS_DONE)]
    return {
        "until_first_round_s": None if first is None else round(first - launched, 3),
        "shutdown_s": None if not done else round(exited - max(done), 3),
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
