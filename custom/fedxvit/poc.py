"""Run the job in NVFlare's POC deployment: a real server and real clients talking over the network.

    python -m fedxvit.poc [--job jobs/fedxvit] [--workspace /tmp/nvflare/poc] [--out workspace/poc]
    python -m fedxvit.poc --min-clients 2 --kill-site site3 --kill-after-round 1   # a hospital dies mid-run
    python -m fedxvit.poc --kill-server-after-round 1                              # the server dies mid-run

The system is NVFlare's own: `nvflare poc prepare -c site1 site2 site3` and `nvflare poc start -ex
admin@nvidia.com` (server + clients, no console) are CLI commands; the job is submitted, waited for
and downloaded through NVFlare's Flare API session, logged in with the POC admin's startup kit;
`nvflare poc stop` ends it. A copy of the job is submitted (NVFlare signs the folder it submits, in
place), unchanged unless --min-clients asks for fewer required sites; a job with NVFlare's HE
components gets a POC provisioned for HE (`prepare -he`). The processes inherit this environment,
so FEDXVIT_DATA_ROOT / FEDXVIT_DATA_<SITE>, FEDXVIT_INITIAL_MODEL and MLFLOW_TRACKING_URI work as in
the simulator. The POC system is stopped at the end, also on failure.

The server-crash drill kills the server's process tree once round K has finished and restarts it
with its own startup script. NVFlare 2.9.0 does not restore a running job after a server restart
(its ServerEngine.persist_components is a no-op, so the POC's snapshot storage stays empty, and the
job stays RUNNING in the job store with no process behind it, which abort_job refuses, so `nvflare
poc stop` fails and the leftover processes are killed); the drill checks that, says so, and
resumes the training itself: it submits a continuation job that starts at round K+1 from the
round-K global model the dead run saved, carrying the finished rounds' global-validation rows.
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
from contextlib import contextmanager
from pathlib import Path

from fedxvit.errors import FedXViTError, run_cli
from fedxvit.widgets import GLOBAL_VAL_FILE

ADMIN = "admin@nvidia.com"
DEFAULT_SITES = ("site1", "site2", "site3")
DEFAULT_PORT = 8002  # NVFlare's POC server port
RESUME_MODEL_FILE = "resume_global_model.pt"
HE_COMPONENTS = "nvflare.app_opt.he."
CONFIG_FILES = ("config_fed_server.json", "config_fed_client.json")


def poc_env(workspace: Path) -> dict:
    """This environment, with the POC workspace set and this Python's nvflare first on PATH
    (the start scripts run `python3`, which must be the one that has fedxvit installed)."""
    bin_dir = str(Path(sys.executable).parent)
    return {
        **os.environ,
        "NVFLARE_POC_WORKSPACE": str(workspace),
        "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
    }


def nvflare(args: list[str], workspace: Path, timeout: float = 120, home: Path | None = None) -> str:
    """Run one `nvflare` CLI command (HOME=`home` if given); its output, or one line naming the command that failed."""
    command = [str(Path(sys.executable).with_name("nvflare")), *args]
    env = poc_env(workspace) if home is None else {**poc_env(workspace), "HOME": str(home)}
    try:
        done = subprocess.run(
            command, env=env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired:
        raise FedXViTError(f"`nvflare {' '.join(args)}` did not finish in {timeout:.0f} s") from None
    output = done.stdout + done.stderr
    if done.returncode != 0:
        last = output.strip().splitlines()[-1] if output.strip() else "no output"
        raise FedXViTError(f"`nvflare {' '.join(args)}` failed (exit {done.returncode}): {last}")
    return output


def uses_he(job: Path) -> bool:
    """Whether the job holds NVFlare's homomorphic-encryption components (it then needs HE keys: `prepare -he`)."""
    return any(HE_COMPONENTS in (job / "app" / "config" / name).read_text() for name in CONFIG_FILES)


def prepare(workspace: Path, sites=DEFAULT_SITES, port: int = DEFAULT_PORT, he: bool = False) -> None:
    """`nvflare poc prepare` (with `-he`, every kit gets TenSEAL keys: the sites the secret key, the server
    only the public context). Another port than NVFlare's 8002 (two POC systems on one machine) is set in
    the project.yml it wrote, and the workspace prepared again from that. It runs with a HOME of its own
    (<workspace>-nvflare/): it would otherwise make these kits the default in ~/.nvflare/config.conf,
    where every `nvflare job submit` of this user would then send its jobs (this run names its kit itself)."""
    setup = workspace.with_name(f"{workspace.name}-nvflare")  # outside the workspace, which prepare replaces
    setup.mkdir(parents=True, exist_ok=True)
    nvflare(["poc", "prepare", "-c", *sites, "--force", *(["-he"] if he else [])], workspace, home=setup)
    if port != DEFAULT_PORT:
        import yaml

        project = yaml.safe_load((workspace / "project.yml").read_text())
        for participant in project["participants"]:
            if participant["type"] == "server":
                participant.update(fed_learn_port=port, admin_port=port)
        (setup / "project.yml").write_text(yaml.safe_dump(project))
        nvflare(
            ["poc", "prepare", "-i", str(setup / "project.yml"), "--force", *(["-he"] if he else [])],
            workspace,
            home=setup,
        )


def start(workspace: Path) -> None:
    """Server and clients in the background (their logs: <workspace>/example_project/prod_00/<site>/).
    They get 150 s to come up instead of NVFlare's 30 s, which a busy machine can miss."""
    nvflare(["poc", "start", "-ex", ADMIN, "--timeout", "150"], workspace, timeout=210)


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


@contextmanager
def admin_session(workspace: Path, timeout_s: float = 60):
    """A Flare API session logged in as the POC admin (its startup kit is in the POC workspace)."""
    from nvflare.fuel.flare_api.flare_api import new_secure_session

    kit = site_dir(workspace, ADMIN)
    try:
        session = new_secure_session(ADMIN, str(kit), timeout=timeout_s)
    except Exception as exc:
        raise FedXViTError(
            f"cannot log in to the POC server as {ADMIN} with {kit} within {timeout_s:.0f} s: "
            f"{type(exc).__name__}: {exc}"
        ) from None
    try:
        yield session
    finally:
        session.close()


def submit(session, job: Path) -> str:
    try:
        return session.submit_job(str(job))
    except Exception as exc:
        raise FedXViTError(f"the POC server refused job {job}: {type(exc).__name__}: {exc}") from None


def wait(session, job_id: str, timeout_s: float) -> str:
    """The job's final status, e.g. FINISHED:COMPLETED."""
    from nvflare.fuel.flare_api.api_spec import JobTimeout

    try:
        return session.wait_for_job(job_id, timeout=timeout_s)["status"]
    except JobTimeout:
        raise FedXViTError(f"job {job_id} did not finish within {timeout_s:.0f} s (--timeout)") from None


def download(session, job_id: str, out: Path) -> Path:
    """The job's result folder, out/<job_id> (its server run folder is out/<job_id>/workspace)."""
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out / job_id, ignore_errors=True)
    return Path(session.download_job_result(job_id, destination=str(out.resolve())))


def site_dir(workspace: Path, site: str) -> Path:
    return workspace / "example_project" / "prod_00" / site


def server_log(workspace: Path) -> Path:
    return site_dir(workspace, "server") / "log.txt"


def kill_site(workspace: Path, site: str) -> int:
    """SIGKILL every process of one site (its parent and job processes): a hospital going dark."""
    return kill_processes_under(site_dir(workspace, site))


def kill_processes_under(folder: Path) -> int:
    """SIGKILL the processes started from `folder`: an argument or the working directory lies in it,
    and wait until they are gone (a start script refuses to start while its old daemon still exists).
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
    psutil.wait_procs(victims, timeout=15)
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


def server_config_path(job: Path) -> Path:
    return job / "app" / "config" / "config_fed_server.json"


def job_with_min_clients(job: Path, min_clients: int, into: Path) -> Path:
    """A copy of the job that needs only `min_clients` sites per round (server config and meta.json)."""
    copy = into / job.name
    shutil.copytree(job, copy)
    server = server_config_path(copy)
    config = json.loads(server.read_text())
    config["min_clients"] = min_clients
    server.write_text(json.dumps(config, indent=2))
    meta = copy / "meta.json"
    meta_json = json.loads(meta.read_text())
    meta_json["min_clients"] = min_clients
    meta.write_text(json.dumps(meta_json, indent=2))
    return copy


def kill_site_drill(workspace: Path, job_id: str, site: str, after_round: int, out: Path, timeout_s: float):
    """Kill a site once `after_round` has started; (status, result folder, processes killed).
    The server's workflows finish without the dead site (its cross-site tasks time out), but NVFlare
    keeps the job open until the dead client's heartbeat expires, which can take many minutes, so
    the drill copies the finished server run folder instead of waiting for the job."""
    wait_for_round(workspace, after_round, timeout_s)
    killed = kill_site(workspace, site)
    print(f"killed {killed} process(es) of {site} after round {after_round} started", flush=True)
    log = wait_for_server_log(workspace, "Server runner finished", timeout_s)
    result_dir = out / job_id
    shutil.copytree(log.parent, result_dir / "workspace", dirs_exist_ok=True)
    return "SERVER_FINISHED", result_dir, killed


def kill_server(workspace: Path) -> int:
    """SIGKILL the server's process tree: its start-script daemon (which would restart it), the server
    process and the job's server process - the machine going down."""
    return kill_processes_under(site_dir(workspace, "server"))


def restart_server(workspace: Path) -> None:
    """Start the server again with its own startup script, as an operator would (console output
    appended to its poc_console.log, like `nvflare poc start`)."""
    server = site_dir(workspace, "server")
    script = server / "startup" / "start.sh"
    with open(server / "poc_console.log", "a") as console:
        console.write(f"\n--- fedxvit.poc server restart {time.asctime()} ---\n")
        console.flush()
        try:
            subprocess.run(
                [str(script)],
                env=poc_env(workspace),
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
                timeout=60,
                check=True,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            raise FedXViTError(f"{script} could not restart the server: {exc}") from None


def server_runs_job(workspace: Path, job_id: str) -> bool:
    """Whether a server job process for `job_id` runs (its command line names the job and the server)."""
    import psutil

    server = str(site_dir(workspace, "server"))
    for proc in psutil.process_iter(["cmdline"]):
        args = proc.info["cmdline"] or []
        if job_id in args and any(arg.startswith(server) for arg in args):
            return True
    return False


def wait_for_restored_job(workspace: Path, job_id: str, wait_s: float) -> bool:
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if server_runs_job(workspace, job_id):
            return True
        time.sleep(1)
    return False


def snapshot_files(workspace: Path) -> tuple[str, int]:
    """Where the POC server's snapshot_persistor (local/resources.json) keeps run snapshots, and how many
    files it holds."""
    resources = json.loads((site_dir(workspace, "server") / "local" / "resources.json").read_text())
    try:
        root = Path(resources["snapshot_persistor"]["args"]["storage"]["args"]["root_dir"])
    except (KeyError, TypeError):
        return "no snapshot_persistor configured", 0
    return str(root), sum(1 for path in root.rglob("*") if path.is_file()) if root.is_dir() else 0


def continuation_job(job: Path, run_dir: Path, start_round: int, into: Path) -> Path:
    """A copy of the job that trains rounds start_round..num_rounds-1 from the global model the dead run
    saved after round start_round-1, carries that run's global-validation rows of the finished rounds,
    and tracks into the dead job's MLflow runs (run_dir is the server's folder of that job, named by its id)."""
    model = run_dir / "app_server" / "FL_global_model.pt"
    if not model.is_file():
        raise FedXViTError(f"the killed job left no global model at {model}: nothing to resume from")
    rows_file = run_dir / GLOBAL_VAL_FILE
    rows = json.loads(rows_file.read_text()).get("rounds", []) if rows_file.is_file() else []
    copy = into / "continuation" / job.name
    shutil.copytree(job, copy)
    shutil.copy2(model, copy.parent / RESUME_MODEL_FILE)
    path = server_config_path(copy)
    config = json.loads(path.read_text())
    for entry in config["workflows"]:
        if entry["path"].endswith(".ScatterAndGather"):
            entry["args"].update(start_round=start_round, num_rounds=int(config["num_rounds"]) - start_round)
    for entry in config["components"]:
        if entry["id"] == "persistor":
            entry["args"]["source_ckpt_file_full_name"] = str((copy.parent / RESUME_MODEL_FILE).resolve())
        elif entry["path"].endswith(".GlobalValidationTracker"):
            entry["args"]["earlier_rounds"] = [row for row in rows if row["round"] < start_round]
        elif entry["path"].endswith(".FederatedMLflowTracking"):
            entry["args"]["continue_job"] = run_dir.name  # the killed job's MLflow runs go on
    path.write_text(json.dumps(config, indent=2))
    return copy


def first_round_started(run_log: Path) -> int | None:
    """The first 'Round N started' of a server run log: where a job's training began."""
    match = re.search(r"Round (\d+) started", run_log.read_text(errors="replace")) if run_log.is_file() else None
    return int(match.group(1)) if match else None


def server_crash_drill(
    workspace: Path,
    job: Path,
    job_id: str,
    after_round: int,
    tmp: Path,
    out: Path,
    restore_wait_s: float,
    timeout_s: float,
) -> dict:
    """Kill the server once `after_round` has finished, restart it, and see the training through:
    NVFlare's own restore if it brings the job back, else a continuation job from the last saved round."""
    wait_for_server_log(workspace, f"Round {after_round} finished", timeout_s)
    killed = kill_server(workspace)
    print(f"killed {killed} server process(es) after round {after_round} finished", flush=True)
    continuation = continuation_job(job, site_dir(workspace, "server") / job_id, after_round + 1, tmp)
    restart_server(workspace)
    with admin_session(workspace, timeout_s=120) as session:
        restored = wait_for_restored_job(workspace, job_id, restore_wait_s)
        storage, snapshots = snapshot_files(workspace)
        drill = {
            "after_round": after_round,
            "killed_processes": killed,
            "nvflare_restored": restored,
            "snapshot_storage": storage,
            "snapshot_files": snapshots,
        }
        if restored:
            print(f"NVFlare restored job {job_id} after the server restart", flush=True)
            resumed_job = job_id
        else:
            drill["stale_job_status"] = session.get_job_meta(job_id)["status"]
            print(
                f"NVFlare did not restore job {job_id}: no server process runs it {restore_wait_s:.0f} s after the "
                f"restart, its status stays {drill['stale_job_status']}, snapshot storage {storage} holds "
                f"{snapshots} file(s)",
                flush=True,
            )
            resumed_job = submit(session, continuation)
            print(
                f"resuming as job {resumed_job}: rounds {after_round + 1}.. from the round-{after_round} global model",
                flush=True,
            )
        drill["status"] = wait(session, resumed_job, timeout_s)
        drill["result_dir"] = str(download(session, resumed_job, out))
    drill["resumed_job_id"] = resumed_job
    drill["resumed_at_round"] = first_round_started(Path(drill["result_dir"]) / "workspace" / "log.txt")
    print(f"the resumed training started at round {drill['resumed_at_round']}", flush=True)
    return drill


def validate(job: Path, sites, kill: str | None, kill_server_after_round: int | None) -> None:
    if not (job / "meta.json").is_file():
        raise FedXViTError(f"{job}: not an NVFlare job folder (no meta.json)")
    if kill and kill not in sites:
        raise FedXViTError(f"--kill-site {kill} is not one of the sites {', '.join(sites)}")
    if kill and kill_server_after_round is not None:
        raise FedXViTError("--kill-site and --kill-server-after-round are separate drills: choose one")
    if kill_server_after_round is not None:
        rounds = int(json.loads(server_config_path(job).read_text())["num_rounds"])
        if not 0 <= kill_server_after_round < rounds - 1:
            raise FedXViTError(
                f"--kill-server-after-round {kill_server_after_round}: {job} trains rounds "
                f"0..{rounds - 1}, so the server can only be killed after rounds 0..{rounds - 2} "
                "(one must be left to resume)"
            )


def run(
    job: Path,
    workspace: Path,
    out: Path,
    sites=DEFAULT_SITES,
    min_clients: int | None = None,
    kill: str | None = None,
    kill_after_round: int = 1,
    timeout_s: float = 1800,
    kill_server_after_round: int | None = None,
    restore_wait_s: float = 30,
    port: int = DEFAULT_PORT,
) -> dict:
    """prepare -> start -> submit -> (a drill) -> wait -> download -> stop; returns what happened."""
    validate(job, sites, kill, kill_server_after_round)
    workspace.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    killed, server_crash = 0, None
    with tempfile.TemporaryDirectory(prefix="fedxvit-poc-job-") as tmp:
        # NVFlare signs the folder it submits, in place: submit a copy, so the user's job folder stays as it was
        job = (
            job_with_min_clients(job, min_clients, Path(tmp))
            if min_clients
            else shutil.copytree(job, Path(tmp) / job.name)
        )
        he = uses_he(job)
        print(f"POC workspace {workspace}: preparing {', '.join(sites)}{' with HE keys' if he else ''}", flush=True)
        prepare(workspace, sites, port, he)
        try:
            start(workspace)
            with admin_session(workspace) as session:
                job_id = submit(session, job)
            print(f"submitted {job.name} as job {job_id}", flush=True)
            if kill:
                status, result_dir, killed = kill_site_drill(workspace, job_id, kill, kill_after_round, out, timeout_s)
            elif kill_server_after_round is not None:
                server_crash = server_crash_drill(
                    workspace, job, job_id, kill_server_after_round, Path(tmp), out, restore_wait_s, timeout_s
                )
                status, result_dir = server_crash["status"], Path(server_crash["result_dir"])
            else:
                with admin_session(workspace) as session:
                    status = wait(session, job_id, timeout_s)
                    result_dir = download(session, job_id, out)
            print(f"job {result_dir.name}: {status}", flush=True)
        finally:
            stop(workspace)
    rounds = []
    global_val = result_dir / "workspace" / GLOBAL_VAL_FILE
    if global_val.is_file():
        rounds = json.loads(global_val.read_text()).get("rounds", [])
    summary = {
        "job_id": job_id,
        "status": status,
        "result_dir": str(result_dir),
        "killed_site": kill,
        "killed_processes": killed,
        "server_crash": server_crash,
        "wall_s": time.perf_counter() - started,
        "rounds": [
            {"round": r["round"], "sites": sorted(r.get("sites", {})), "global_val_accuracy": r["global_val_accuracy"]}
            for r in rounds
        ],
    }
    for row in summary["rounds"]:
        print(
            f"  round {row['round']}: global_val_accuracy={row['global_val_accuracy']:.4f} "
            f"from {', '.join(row['sites'])}"
        )
    print(f"results in {result_dir} ({summary['wall_s']:.0f} s)")
    return summary


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m fedxvit.poc",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--job", default="jobs/fedxvit", help="NVFlare job folder")
    parser.add_argument(
        "--workspace",
        default=os.path.join(tempfile.gettempdir(), "nvflare", "poc"),
        help="POC workspace (NVFLARE_POC_WORKSPACE); replaced by `poc prepare`",
    )
    parser.add_argument("--out", default="workspace/poc", help="where the job's results are downloaded")
    parser.add_argument("--sites", nargs="+", default=list(DEFAULT_SITES))
    parser.add_argument("--min-clients", type=int, default=None, help="submit a copy needing only this many sites")
    parser.add_argument("--kill-site", default=None, help="SIGKILL this site's processes mid-run (fault drill)")
    parser.add_argument("--kill-after-round", type=int, default=1, help="kill the site once this round has started")
    parser.add_argument(
        "--kill-server-after-round",
        type=int,
        default=None,
        metavar="K",
        help="SIGKILL the server once round K has finished, restart it and resume (fault drill)",
    )
    parser.add_argument(
        "--restore-wait",
        type=float,
        default=30,
        help="seconds to wait for NVFlare to restore the job after the server restart",
    )
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="the POC server's port")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds to wait for the job")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    summary = run(
        Path(args.job),
        Path(args.workspace),
        Path(args.out),
        tuple(args.sites),
        args.min_clients,
        args.kill_site,
        args.kill_after_round,
        args.timeout,
        args.kill_server_after_round,
        args.restore_wait,
        args.port,
    )
    if summary["status"] not in ("FINISHED:COMPLETED", "SERVER_FINISHED"):
        raise FedXViTError(f"job {summary['job_id']} ended {summary['status']}; logs under {summary['result_dir']}")
    return summary


if __name__ == "__main__":
    run_cli(main)
