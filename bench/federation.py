"""What federation costs, each as a ratio measured in one run on this machine.

    python bench/federation.py [--data data] [--initial models/initial_global.pt] [--out bench/federation.json]

1. Wall time: the real job in NVFlare's simulator (the reference command, 3 sites, -t 3, the
   job's own rounds/epochs/preset) vs the same model trained centrally on the pooled site data
   for the same epochs (`tooling.baselines.train_on_sites`). Reported for the whole simulator
   process (start-up, rounds, cross-site evaluation, shutdown) and for its training phase alone
   (ScatterAndGather's first to last log line), since start-up is a fixed cost. Each round is split
   (task_times.round_breakdown: dispatch, the slowest site's validation passes and training,
   aggregation; its overhead is the round's wall time minus that site's training), and so are the
   fixed costs around the rounds (start-up, cross-site evaluation, shut-down). The overhead target is
   read from the same job run longer (--overhead-rounds, 12: ten steady rounds, not three).
2. Scale: the same job with 3, 6 and 12 sites (-t = sites; sites 4.. reuse sites 1-3's data, every
   site is waited for), a few rounds: start-up, round time and overhead as the federation grows.
3. Bytes on the wire: a site's `head`-mode train result vs the full global model, both as the
   Shareables NVFlare serializes with FOBS (`tooling.standalone.serialized_size`); and, for `head` and
   the job's policy, the task the server sends a site after its first (fedxvit.downlink) vs its update.
4. Training throughput: the executor's `train` task vs a bare PyTorch loop over the same model,
   data, optimizer and epochs (the task also scores the global and the local model on the
   validation split; the "training only" ratio removes those two timed passes).
Needs `make data transfer` first. Timings on a shared CPU are noisy: the load average is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import torch
from task_times import round_breakdown, run_phases, task_times

from fedxvit.errors import FedXViTError, run_cli
from fedxvit.paths import project_root
from fedxvit.site_policy import allow_classes
from fedxvit.sites import site_env_var
from tooling.baselines import train_on_sites
from tooling.jobconfig import DEFAULT_JOB, JobSettings, job_copy, read_job_settings

SITES = ("site1", "site2", "site3")
LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})")
PHASE_START, PHASE_END = "Beginning ScatterAndGather training phase", "Finished ScatterAndGather Training"


def _log_time(line: str) -> float:
    return datetime.strptime(LOG_TIME.match(line).group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()


def training_phase_seconds(server_log: Path) -> float:
    """Seconds between ScatterAndGather's start and finish lines in the server log."""
    lines = server_log.read_text(errors="replace").splitlines()
    start = next((line for line in lines if PHASE_START in line), None)
    end = next((line for line in lines if PHASE_END in line), None)
    if not (start and end):
        raise FedXViTError(f"{server_log}: no complete ScatterAndGather phase (did the run fail?)")
    return _log_time(end) - _log_time(start)


def median_of(rounds: dict, key: str) -> float | None:
    values = [row[key] for row in rounds.values()]
    return round(statistics.median(values), 3) if values else None


def time_simulator(job: Path, data: Path, initial: Path, scratch: Path, sites=SITES) -> dict:
    """Run the reference simulator command on the job (-t = the number of sites; a site past site3 reads site1-3's
    data in turn); wall seconds, total and training phase, each round's breakdown and the fixed costs around the
    rounds. The steady rounds (1 to the last but one) give the medians: round 0 also holds the sites' start-up,
    and only a round with a next one has its whole cost, start to start."""
    env = {
        **os.environ,
        "FEDXVIT_DATA_ROOT": str(data.resolve()),
        "FEDXVIT_INITIAL_MODEL": str(initial.resolve()),
        "MLFLOW_TRACKING_URI": f"sqlite:///{scratch / 'mlflow.db'}",
    }
    for number, site in enumerate(sites):
        env.pop(site_env_var(site), None)
        if site not in SITES:
            env[site_env_var(site)] = str((data / SITES[number % len(SITES)]).resolve())
    nvflare = Path(sys.executable).with_name("nvflare")
    env["PATH"] = f"{nvflare.parent}{os.pathsep}{env.get('PATH', '')}"
    workspace = scratch / "workspace"
    shutil.rmtree(workspace, ignore_errors=True)
    allow_classes(workspace / "local")  # jobs carry no code: the participants allow fedxvit's classes
    command = [
        *(str(nvflare), "simulator", str(job), "-w", str(workspace), "-c", ",".join(sites)),
        *("-gpu", "0", "-t", str(len(sites))),
    ]
    launched, started = time.time(), time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise FedXViTError(f"simulator failed (exit {done.returncode}); see {workspace / 'server' / 'log.txt'}")
    server_lines = (workspace / "server" / "log.txt").read_text(errors="replace").splitlines()
    site_lines = [line for site in sites for line in (workspace / site / "log.txt").read_text().splitlines()]
    rounds = round_breakdown(server_lines, site_lines)
    # steady rounds: not round 0 (the sites start inside it), nor the last (no next round starts after it)
    steady = {r: row for r, row in rounds.items() if 0 < r < max(rounds)}
    return {
        "sites": len(sites),
        "wall_s": wall,
        "training_phase_s": training_phase_seconds(workspace / "server" / "log.txt"),
        **run_phases(server_lines, launched, launched + wall),
        "cross_site_s": task_times(server_lines)["cross_site_s"],
        "round_0_s": rounds.get(0, {}).get("round_s"),
        "rounds": rounds,
        "steady_round": {key: median_of(steady, key) for key in next(iter(steady.values()), {})},
        # each steady round's overhead: NVFlare's 0.2-s task checks and the simulator's 0.5-s task retries move a
        # round by a few tenths of a second, so the spread is reported beside the median
        "steady_overheads_s": [row["overhead_s"] for _, row in sorted(steady.items())],
    }


def scale(job: Path, data: Path, initial: Path, scratch: Path, counts: list[int], rounds: int) -> list[dict]:
    """The job with 3, 6, 12... sites, `rounds` rounds, every site waited for (min_clients = sites)."""
    results = []
    for count in counts:
        sites = tuple(f"site{n}" for n in range(1, count + 1))
        copy = job_copy(job, scratch / f"job-{count}", server={"num_rounds": rounds, "min_clients": count})
        print(f"scale: {count} sites, {rounds} rounds ...", flush=True)
        measured = time_simulator(copy, data, initial, scratch / f"sites-{count}", sites)
        results.append({key: value for key, value in measured.items() if key != "rounds"})
    return results


def time_bare_loop(model, loader, lr: float, epochs: int, device) -> float:
    """Seconds for `epochs` plain forward/backward/AdamW passes: the yardstick for the executor."""
    from fedxvit.training import make_optimizer

    optimizer = make_optimizer(model, lr)
    model.train()
    started = time.perf_counter()
    for _ in range(epochs):
        for batch in loader:
            loss = torch.nn.functional.cross_entropy(model(batch["image"].to(device)), batch["label"].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return time.perf_counter() - started


def executor_measurements(site_dir: Path, initial: Path, settings: JobSettings, scratch: Path, epochs: int) -> dict:
    """Wire bytes (updates and the tasks after a site's first, head and the job's policy, vs the full model) and
    executor vs bare-loop throughput on one site, in process."""
    from nvflare.apis.dxo import DXO, DataKind
    from nvflare.apis.signal import Signal
    from nvflare.apis.utils.fl_context_utils import gen_new_peer_ctx
    from nvflare.app_common.app_constant import AppConstants

    from fedxvit.checkpoint import build_model_from_checkpoint
    from fedxvit.classes import TASK_CLASSES
    from fedxvit.data import make_loader
    from fedxvit.downlink import TrainableOnlyDownlink
    from fedxvit.executor import FedXViTExecutor, to_numpy_state
    from fedxvit.sites import site_env_var
    from fedxvit.training import apply_freeze_policy, evaluate
    from tooling.standalone import make_fl_ctx, serialized_size

    os.environ[site_env_var(site_dir.name)] = str(site_dir.resolve())
    threads = torch.get_num_threads()
    model, _ = build_model_from_checkpoint(initial, preset=settings.preset, num_classes=len(TASK_CLASSES))

    def task():
        shareable = DXO(DataKind.WEIGHTS, to_numpy_state(model.state_dict())).to_shareable()
        shareable.set_header(AppConstants.CURRENT_ROUND, 0)
        return shareable

    def executor(policy: str, local_epochs: int, name: str):
        ex = FedXViTExecutor(
            preset=settings.preset,
            local_epochs=local_epochs,
            learning_rate=settings.learning_rate,
            batch_size=settings.batch_size,
            freeze_policy=policy,
            last_k=settings.last_k,
            torch_threads=threads,
            seed=settings.seed,
            analytic_sender_id="",
        )
        return ex, make_fl_ctx(scratch / name, site=site_dir.name)

    def next_task_bytes(site_ctx) -> int:
        """The serialized task the server sends a site after its first one (fedxvit.downlink: a site that holds
        the frozen tensors gets the trainable ones only)."""
        server_ctx = make_fl_ctx(scratch / "server", site="server")
        server_ctx.set_peer_context(gen_new_peer_ctx(site_ctx))
        return serialized_size(TrainableOnlyDownlink().process(task(), server_ctx))

    head, ctx = executor("head", 1, "head")
    head_result = head.execute("train", task(), ctx, Signal())
    wire = {
        "full_model_bytes": serialized_size(task()),
        "head_update_bytes": serialized_size(head_result),
        "head_downlink_bytes": next_task_bytes(ctx),
    }
    default, ctx = executor(settings.freeze_policy, 1, "default")
    wire[f"{settings.freeze_policy}_update_bytes"] = serialized_size(default.execute("train", task(), ctx, Signal()))
    wire[f"{settings.freeze_policy}_downlink_bytes"] = next_task_bytes(ctx)

    timed, ctx = executor(settings.freeze_policy, epochs, "timed")
    timed.execute("validate", task(), ctx, Signal())  # set-up (data caching) outside the timing
    started = time.perf_counter()
    timed.execute("train", task(), ctx, Signal())
    executor_s = time.perf_counter() - started
    started = time.perf_counter()
    evaluate(timed.model, timed.val_loader, timed.device)
    validation_pass_s = time.perf_counter() - started

    bare, _ = build_model_from_checkpoint(initial, preset=settings.preset, num_classes=len(TASK_CLASSES))
    apply_freeze_policy(bare, settings.freeze_policy, settings.last_k)
    loader = make_loader(
        site_dir, "training", bare.preset.image_size, settings.batch_size, train=True, seed=settings.seed
    )
    bare_s = time_bare_loop(bare, loader, settings.learning_rate, epochs, torch.device("cpu"))
    images = len(loader.dataset) * epochs
    return {
        "wire": {
            **wire,
            "head_over_full": wire["head_update_bytes"] / wire["full_model_bytes"],
            "downlink_over_uplink": {
                policy: wire[f"{policy}_downlink_bytes"] / wire[f"{policy}_update_bytes"]
                for policy in ("head", settings.freeze_policy)
            },
        },
        "throughput": {
            "site": site_dir.name,
            "epochs": epochs,
            "train_images": images,
            "torch_threads": threads,
            "executor_task_s": executor_s,
            "validation_pass_s": validation_pass_s,
            "bare_loop_s": bare_s,
            "executor_img_s": images / executor_s,
            "bare_loop_img_s": images / bare_s,
            "executor_over_bare": bare_s / executor_s,
            "executor_training_only_over_bare": bare_s / max(1e-9, executor_s - 2 * validation_pass_s),
        },
    }


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--data", default="data", help="folder holding site1..site3")
    parser.add_argument("--initial", default="models/initial_global.pt", help="the transplanted initial global model")
    parser.add_argument(
        "--job", default=str(DEFAULT_JOB), help="the NVFlare job (its config gives rounds, epochs, preset)"
    )
    parser.add_argument("--throughput-epochs", type=int, default=3, help="local epochs of the executor-vs-bare run")
    parser.add_argument(
        "--scale-sites", default="3,6,12", help="site counts of the scale runs (comma-separated; empty: none)"
    )
    parser.add_argument("--scale-rounds", type=int, default=3, help="rounds of each scale run")
    parser.add_argument(
        "--overhead-rounds",
        type=int,
        default=12,
        help="rounds of the run that gives the round overhead (its steady rounds: all but the first and last)",
    )
    parser.add_argument("--out", default="bench/federation.json")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    root = project_root()
    data, initial, job = (
        root / p if not Path(p).is_absolute() else Path(p) for p in (args.data, args.initial, args.job)
    )
    for site in SITES:
        if not (data / site / "datalist.json").is_file():
            raise FedXViTError(f"{data / site}: no site data (run `make data`)")
    if not initial.is_file():
        raise FedXViTError(f"{initial}: no initial global model (run `make transfer`)")
    settings = read_job_settings(job)
    try:
        counts = [int(n) for n in args.scale_sites.split(",") if n.strip()]
    except ValueError:
        raise FedXViTError(f"--scale-sites {args.scale_sites!r}: give site counts like 3,6,12") from None
    if any(n < 1 for n in counts) or min(args.scale_rounds, args.overhead_rounds) < 3:
        raise FedXViTError(
            "--scale-sites: counts of at least 1; --scale-rounds and --overhead-rounds: at least 3 (round 0 holds "
            "start-up, and the last round has no next one to time it against)"
        )
    with tempfile.TemporaryDirectory(prefix="fedxvit-bench-") as tmp:
        scratch = Path(tmp)
        print(f"federated: nvflare simulator {job.name} -c {','.join(SITES)} -gpu 0 -t 3 ...", flush=True)
        federated = time_simulator(job, data, initial, scratch / "reference")
        print(f"round overhead: the same job, {args.overhead_rounds} rounds ...", flush=True)
        long_job = job_copy(job, scratch / "job-overhead", server={"num_rounds": args.overhead_rounds})
        long_run = time_simulator(long_job, data, initial, scratch / "overhead")
        overhead = {key: value for key, value in long_run.items() if key != "rounds"}
        scaled = scale(job, data, initial, scratch, counts, args.scale_rounds)
        print("centralized: same model, pooled site data, same epochs ...", flush=True)
        central = train_on_sites([data / s for s in SITES], initial, settings)
        print("executor: wire bytes and throughput ...", flush=True)
        measured = executor_measurements(data / SITES[-1], initial, settings, scratch, args.throughput_epochs)
    result = {
        "settings": settings.as_dict(),
        "federated_s": federated,
        "centralized_s": central["wall_s"],
        "federated_over_centralized": federated["wall_s"] / central["wall_s"],
        "federated_training_phase_over_centralized": federated["training_phase_s"] / central["wall_s"],
        "round_overhead": overhead,
        "scale": scaled,
        **measured,
        "machine": {"cpu_count": os.cpu_count(), "load_average": os.getloadavg(), "torch": torch.__version__},
    }
    rows = [
        ("federated ÷ centralized wall (whole simulator run)", result["federated_over_centralized"], "≤ 1.10"),
        (
            "federated ÷ centralized wall (training phase only)",
            result["federated_training_phase_over_centralized"],
            "≤ 1.10",
        ),
        ("head-mode update bytes ÷ full model bytes", measured["wire"]["head_over_full"], "≤ 0.001"),
        *(
            (f"{policy} downlink ÷ uplink bytes after a site's first task", ratio, "≤ 1 (framing included)")
            for policy, ratio in measured["wire"]["downlink_over_uplink"].items()
        ),
        ("executor ÷ bare loop, train task images/s", measured["throughput"]["executor_over_bare"], "≥ 0.90"),
        (
            "executor ÷ bare loop, training part only",
            measured["throughput"]["executor_training_only_over_bare"],
            "≥ 0.90",
        ),
    ]
    steady = overhead["steady_round"]
    rows += [
        ("round overhead s (start to start - slowest site's training)", steady["overhead_s"], "≤ 1"),
        ("  of which beyond the sites' train tasks, s", steady["beyond_tasks_s"], ""),
    ]
    for name, value, target in rows:
        print(f"  {name:<52} {value:>10.4g}   target {target}")
    print(
        "  steady round (median, s): "
        + ", ".join(f"{key.removesuffix('_s')} {value:.2f}" for key, value in steady.items())
        + f"\n  start-up to round 0 {federated['until_first_round_s']:.1f} s, round 0 {federated['round_0_s']:.1f} s, "
        f"cross-site {federated['cross_site_s']} s, shut-down {federated['shutdown_s']:.1f} s"
    )
    for row in scaled:
        print(
            f"  {row['sites']:>2} sites: wall {row['wall_s']:.0f} s, to round 0 {row['until_first_round_s']:.1f} s, "
            f"round 0 {row['round_0_s']:.1f} s, steady round {row['steady_round']['round_s']:.2f} s (overhead "
            f"{row['steady_round']['overhead_s']:.2f} s), shut-down {row['shutdown_s']:.1f} s"
        )
    out = root / args.out if not Path(args.out).is_absolute() else Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    run_cli(main)
