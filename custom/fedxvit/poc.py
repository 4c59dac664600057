"""Run the job in NVFlare's POC deployment: a real server and real clients talking over the network.

    python -m fedxvit.poc [--job jobs/fedxvit] [--workspace /tmp/nvflare/poc] [--out workspace/poc]
    python -m fedxvit.poc --min-clients 2 --kill-site site3 --kill-after-round 1   # a hospital dies mid-run

Each step is NVFlare's own CLI, the commands a user would type: `nvflare poc prepare -c site1
site2 site3`, `nvflare poc start -ex admin@nvidia.com` (server + clients, no console),
`nvflare job submit -j <job>`, `nvflare job wait`, `nvflare job download`, `nvflare poc stop`.
The job is submitted unchanged unless --min-clients asks for a copy with fewer required sites.
The processes inherit this environment, so FEDXVIT_DATA_ROOT / FEDXVIT_DATA_<SITE>,
FEDXVIT_INITIAL_MODEL and MLFLOW_TRACKING_URI work as in the simulator. The POC system is
stopped at the end, also on failure.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fedxvit.errors import FedXViTError, run_cli

ADMIN = "admin@nvidia.com"
DEFAULT_SITES = ("site1", "site2", "site3")


def poc_env(workspace: Path) -> dict:
    """This environment, with the POC workspace set and this Python's nvflare first on PATH
    (the start scripts run `python3`, which must be the one that has fedxvit installed)."""
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "NVFLARE_POC_WORKSPACE": str(workspace), "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}


def nvflare(args: list[str], workspace: Path, timeout: float = 120) -> str:
    """Run one `nvflare` CLI command; its output, or one line naming the command that failed."""
    command = [str(Path(sys.executable).with_name("nvflare")), *args]
    try:
        done = subprocess.run(command, env=poc_env(workspace), capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise FedXViTError(f"`nvflare {' '.join(args)}` did not finish in {timeout:.0f} s") from None
    output = done.stdout + done.stderr
    if done.returncode != 0:
        last = output.strip().splitlines()[-1] if output.strip() else "no output"
        raise FedXViTError(f"`nvflare {' '.join(args)}` failed (exit {done.returncode}): {last}")
    return output


def prepare(workspace: Path, sites=DEFAULT_SITES) -> None:
    nvflare(["poc", "prepare", "-c", *sites, "--force"], workspace)


def start(workspace: Path) -> None:
    """Server and clients in the background (their logs: <workspace>/example_project/prod_00/<site>/)."""
    nvflare(["poc", "start", "-ex", ADMIN], workspace, timeout=180)


def stop(workspace: Path) -> None:
    """`nvflare poc stop`; whatever of this workspace still runs afterwards (e.g. a server that never
    came up, so the stop command could not reach it) is killed, so no process outlives the run."""
    try:
        nvflare(["poc", "stop"], workspace, timeout=180)
    except FedXViTError as exc:
        print(f"warning: {exc}", file=sys.stderr)
    leftovers = kill_processes_under(workspace)
    if leftovers:
        print(f"killed {leftovers} leftover POC process(es) under {workspace}", file=sys.stderr)


def submit(workspace: Path, job: Path) -> str:
    output = nvflare(["job", "submit", "-j", str(job)], workspace)
    match = re.search(r"job_id:\s*(\S+)", output)
    if not match:
        raise FedXViTError(f"`nvflare job submit` printed no job id: {output.strip()[-200:]}")
    return match.group(1)


def wait(workspace: Path, job_id: str, timeout_s: float) -> str:
    """The job's final status line, e.g. FINISHED:COMPLETED."""
    output = nvflare(["job", "wait", job_id, "--timeout", str(int(timeout_s))], workspace, timeout=timeout_s + 60)
    match = re.search(r"status:\s*\S+\s*\(([^)]+)\)", output)
    return match.group(1) if match else output.strip().splitlines()[-1]


def download(workspace: Path, job_id: str, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    nvflare(["job", "download", job_id, "-o", str(out), "--force"], workspace)
    return out / job_id


def site_dir(workspace: Path, site: str) -> Path:
    return workspace / "example_project" / "prod_00" / site


def server_log(workspace: Path) -> Path:
    return site_dir(workspace, "server") / "log.txt"


def kill_site(workspace: Path, site: str) -> int:
    """SIGKILL every process of one site (its parent and job processes): a hospital going dark."""
    return kill_processes_under(site_dir(workspace, site))


def kill_processes_under(folder: Path) -> int:
    """SIGKILL the processes started from `folder`: an argument or the working directory lies in it.
    This process and its parents (whose arguments may name the folder) are spared."""
    import psutil

    marker = str(folder)

    def inside(path: str) -> bool:
        return path == marker or path.startswith(marker + os.sep)

    me = psutil.Process()
    spared = {me.pid, *(parent.pid for parent in me.parents())}
    victims = []
    for proc in psutil.process_iter(["pid", "cmdline", "cwd"]):
        if proc.info["pid"] in spared:
            continue
        paths = [*(proc.info["cmdline"] or []), proc.info["cwd"] or ""]
        if any(inside(path) for path in paths):
            victims.append(proc)
    for proc in victims:
        try:
            proc.send_signal(signal.SIGKILL)
        except psutil.Error:
            pass
    return len(victims)


def wait_for_server_log(workspace: Path, text: str, timeout_s: float) -> Path:
    """Block until a server log holds `text`; that log. The running job logs to
    server/<job_id>/log.txt (moved to the job store when it ends), the server itself to server/log.txt."""
    server = site_dir(workspace, "server")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for log in [server / "log.txt", *server.glob("*/log.txt")]:
            try:
                if text in log.read_text(errors="replace"):
                    return log
            except OSError:
                continue
        time.sleep(0.5)
    raise FedXViTError(f"the server did not log {text!r} within {timeout_s:.0f} s (see {server_log(workspace)})")


def wait_for_round(workspace: Path, round_number: int, timeout_s: float) -> None:
    wait_for_server_log(workspace, f"Round {round_number} started", timeout_s)


def job_with_min_clients(job: Path, min_clients: int, into: Path) -> Path:
    """A copy of the job that needs only `min_clients` sites per round (server config and meta.json)."""
    copy = into / job.name
    shutil.copytree(job, copy)
    server = copy / "app" / "config" / "config_fed_server.json"
    config = json.loads(server.read_text())
    config["min_clients"] = min_clients
    server.write_text(json.dumps(config, indent=2))
    meta = copy / "meta.json"
    meta_json = json.loads(meta.read_text())
    meta_json["min_clients"] = min_clients
    meta.write_text(json.dumps(meta_json, indent=2))
    return copy


def run(job: Path, workspace: Path, out: Path, sites=DEFAULT_SITES, min_clients: int | None = None,
        kill: str | None = None, kill_after_round: int = 1, timeout_s: float = 1800) -> dict:
    """prepare -> start -> submit -> (kill a site) -> wait -> download -> stop; returns what happened."""
    if not (job / "meta.json").is_file():
        raise FedXViTError(f"{job}: not an NVFlare job folder (no meta.json)")
    if kill and kill not in sites:
        raise FedXViTError(f"--kill-site {kill} is not one of the sites {', '.join(sites)}")
    workspace.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fedxvit-poc-job-") as tmp:
        if min_clients:
            job = job_with_min_clients(job, min_clients, Path(tmp))
        print(f"POC workspace {workspace}: preparing {', '.join(sites)}", flush=True)
        prepare(workspace, sites)
        try:
            start(workspace)
            job_id = submit(workspace, job)
            print(f"submitted {job.name} as job {job_id}", flush=True)
            killed = 0
            if kill:
                wait_for_round(workspace, kill_after_round, timeout_s)
                killed = kill_site(workspace, kill)
                print(f"killed {killed} process(es) of {kill} after round {kill_after_round} started", flush=True)
            if kill:
                # The server's workflows finish without the dead site (its cross-site tasks time out),
                # but NVFlare keeps the job open until the dead client's heartbeat expires, which can
                # take many minutes; the drill reads the finished server run folder instead of waiting.
                log = wait_for_server_log(workspace, "Server runner finished", timeout_s)
                status = "SERVER_FINISHED"
                result_dir = out / job_id
                shutil.copytree(log.parent, result_dir / "workspace", dirs_exist_ok=True)
            else:
                status = wait(workspace, job_id, timeout_s)
                result_dir = download(workspace, job_id, out)
            print(f"job {job_id}: {status}", flush=True)
        finally:
            stop(workspace)
    rounds = []
    global_val = result_dir / "workspace" / "global_val.json"
    if global_val.is_file():
        rounds = json.loads(global_val.read_text()).get("rounds", [])
    summary = {"job_id": job_id, "status": status, "result_dir": str(result_dir), "killed_site": kill,
               "killed_processes": killed, "wall_s": time.perf_counter() - started,
               "rounds": [{"round": r["round"], "sites": sorted(r.get("sites", {})),
                           "global_val_accuracy": r["global_val_accuracy"]} for r in rounds]}
    for row in summary["rounds"]:
        print(f"  round {row['round']}: global_val_accuracy={row['global_val_accuracy']:.4f} from {', '.join(row['sites'])}")
    print(f"results in {result_dir} ({summary['wall_s']:.0f} s)")
    return summary


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m fedxvit.poc", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--job", default="jobs/fedxvit", help="NVFlare job folder")
    parser.add_argument("--workspace", default=os.path.join(tempfile.gettempdir(), "nvflare", "poc"),
                        help="POC workspace (NVFLARE_POC_WORKSPACE); replaced by `poc prepare`")
    parser.add_argument("--out", default="workspace/poc", help="where the job's results are downloaded")
    parser.add_argument("--sites", nargs="+", default=list(DEFAULT_SITES))
    parser.add_argument("--min-clients", type=int, default=None, help="submit a copy needing only this many sites")
    parser.add_argument("--kill-site", default=None, help="SIGKILL this site's processes mid-run (fault drill)")
    parser.add_argument("--kill-after-round", type=int, default=1, help="kill once this round has started")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds to wait for the job")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    summary = run(Path(args.job), Path(args.workspace), Path(args.out), tuple(args.sites), args.min_clients,
                  args.kill_site, args.kill_after_round, args.timeout)
    if summary["status"] not in ("FINISHED:COMPLETED", "SERVER_FINISHED"):
        raise FedXViTError(f"job {summary['job_id']} ended {summary['status']}; logs under {summary['result_dir']}")
    return summary


if __name__ == "__main__":
    run_cli(main)
