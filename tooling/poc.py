"""Run jobs in NVFlare's POC deployment: a real server and real clients talking over the network.

    python -m tooling.poc [--job jobs/fedxvit] [--workspace /tmp/nvflare/poc] [--out workspace/poc]
    python -m tooling.poc --min-clients 2 --kill-site site3 --kill-after-round 1   # a hospital dies mid-run
    python -m tooling.poc --kill-server-after-round 1                              # the server dies mid-run
    python -m tooling.poc --min-clients 2 --kill-site site3 --kill-server-after-round 2  # a hospital, then the server

The system is NVFlare's own: `nvflare poc prepare -c site1 site2 site3` and `nvflare poc start -ex
admin@nvidia.com --no-wait` (server + clients, no console; the driver then waits until the server's log
shows every site registered) are CLI commands; jobs are submitted, waited for
and downloaded through NVFlare's Flare API session, logged in with the POC admin's startup kit;
`nvflare poc stop` ends it. A copy of each job is submitted (NVFlare signs the folder it submits, in
place), unchanged unless min_clients asks for fewer required sites; a job with NVFlare's HE
components gets a POC provisioned for HE (`prepare -he`). The processes inherit this environment
(plus PocSystem's `env`), so FEDXVIT_DATA_ROOT / FEDXVIT_DATA_<SITE>, FEDXVIT_INITIAL_MODEL and
MLFLOW_TRACKING_URI work as in the simulator. The CLI runs one job, with an optional drill; as a
library one system serves several jobs and drills in a row (one start-up, never two systems at once):

    with PocSystem(workspace, sites, port, he=True) as system:
        system.run_job(job, out)
        system.kill_site_drill(job, "site3", 1, out, min_clients=2)  # site3 comes back for the next job
        system.server_crash_drill(job, 1, out, min_clients=3)
        system.server_crash_drill(job, 2, out, min_clients=2, kill_site="site3")  # site3 in round 1, then the server

It never deletes or kills what it did not start. `nvflare poc prepare --force` deletes the workspace
it is given, so the driver uses only a workspace it created: it writes a marker file (.fedxvit-poc)
into it and refuses an existing folder without one. It records the process id of each participant's
daemon (NVFlare's start script writes it to <kit>/daemon_pid.fl) after every start and restart, and
kills only those process trees: a participant in a drill, and whatever `nvflare poc stop` left.

The server-crash drill kills the server's process tree once round K has finished and restarts it
with its own startup script. NVFlare 2.9.0 does not restore a running job after a server restart
(its ServerEngine.persist_components is a no-op, so the POC's snapshot storage stays empty, and the
job stays RUNNING in the job store with no process behind it, which abort_job refuses, so `nvflare
poc stop` fails and the recorded processes are killed); the drill checks that, says so, and
resumes the training itself: it submits a continuation job that starts at round K+1 from the
round-K global model the dead run saved, carrying the finished rounds' global-validation rows.

Why not NVFlare 2.9's PocEnv: it deploys `FedJob` objects only (fedxvit's jobs are JSON folders with job
variables, docs/federated-jobs.md), and every `deploy` stops a running POC, deletes its workspace
(`stop(clean_up=True)`: shutil.rmtree) and prepares a fresh one, so one system cannot serve several jobs and
drills, and a workspace this driver did not create would be removed. What NVFlare does offer is used: its
`poc prepare/start/stop` commands, each participant's own startup script, and the Flare API session.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from fedxvit.errors import FedXViTError, run_cli
from fedxvit.site_policy import allow_classes
from fedxvit.widgets import GLOBAL_VAL_FILE
from tooling.jobconfig import CLIENT_FILE, DEFAULT_JOB, SERVER_FILE, job_copy, read_job_config, rewrite_job_config

ADMIN = "admin@nvidia.com"
DEFAULT_SITES = ("site1", "site2", "site3")
DEFAULT_PORT = 8002  # NVFlare's POC server port


def free_port() -> int:
    """A local port nothing listens on (bound, then released): for a server a tool or test starts, or must not
    reach."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


RESUME_MODEL_FILE = "resume_global_model.pt"
HE_COMPONENTS = "nvflare.app_opt.he."
MARKER = ".fedxvit-poc"  # in a workspace this driver created, and so may let `nvflare poc prepare --force` replace
DAEMON_PID_FILE = "daemon_pid.fl"  # written by NVFlare's sub_start.sh: the participant's restart loop
START_TIMEOUT_S = 240  # for the server to log every site registered after `nvflare poc start`
SERVER = "server"
POC_KITS = Path("example_project") / "prod_00"  # where `nvflare poc prepare` writes the startup kits
SERVER_UP = "Server started"  # in the server's log.txt once it serves
LOGIN_TRY_S = 30  # one login try; NVFlare's own login never gives up


def registered(site: str) -> str:
    """What the server logs when a site registers (joins, or joins again after a restart of its own)."""
    return f"client {site} registered"


def poc_env(workspace: Path, extra: dict | None = None) -> dict:
    """This environment plus `extra`, with the POC workspace set and this Python's nvflare first on PATH
    (the start scripts run `python3`, which must be the one that has fedxvit installed)."""
    bin_dir = str(Path(sys.executable).parent)
    return {
        **os.environ,
        **(extra or {}),
        "NVFLARE_POC_WORKSPACE": str(workspace),
        "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
    }


def nvflare(
    args: list[str], workspace: Path, timeout: float = 120, home: Path | None = None, env: dict | None = None
) -> str:
    """Run one `nvflare` CLI command (HOME=`home` if given, `env` added); its output, or one line naming the
    command that failed."""
    command = [str(Path(sys.executable).with_name("nvflare")), *args]
    environment = poc_env(workspace, env) if home is None else {**poc_env(workspace, env), "HOME": str(home)}
    try:
        done = subprocess.run(
            command, env=environment, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
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
    return any(HE_COMPONENTS in (job / which).read_text() for which in (SERVER_FILE, CLIENT_FILE))


def mark_workspace(workspace: Path) -> None:
    (workspace / MARKER).write_text("created by tooling.poc, which lets `nvflare poc prepare --force` replace it\n")


def claim_workspace(workspace: Path) -> None:
    """Create the workspace with the marker, or accept one that holds it. `nvflare poc prepare --force`
    deletes the folder it is given, so an existing folder without the marker (not created here) is refused."""
    if workspace.exists() and not (workspace / MARKER).is_file():
        raise FedXViTError(
            f"POC workspace {workspace} exists and was not created by tooling.poc (no {MARKER} in it): "
            "`nvflare poc prepare` would delete it; choose a new --workspace"
        )
    workspace.mkdir(parents=True, exist_ok=True)
    mark_workspace(workspace)


def prepare(workspace: Path, sites=DEFAULT_SITES, port: int = DEFAULT_PORT, he: bool = False, env=None) -> None:
    """`nvflare poc prepare --force` in a claimed workspace (claim_workspace), which it replaces; the marker is
    written again. With `-he`, every kit gets TenSEAL keys: the sites the secret key, the server only the public
    context. Another port than NVFlare's 8002 is set in the project.yml it wrote, and the workspace prepared
    again from that. It runs with a temporary HOME: it would otherwise make these kits the default in
    ~/.nvflare/config.conf, where every `nvflare job submit` of this user would then send its jobs."""
    he_flag = ["-he"] if he else []
    with tempfile.TemporaryDirectory(prefix="fedxvit-poc-home-") as home_dir:
        home = Path(home_dir)
        try:
            nvflare(["poc", "prepare", "-c", *sites, "--force", *he_flag], workspace, home=home, env=env)
            if port != DEFAULT_PORT:
                import yaml

                project = yaml.safe_load((workspace / "project.yml").read_text())
                for participant in project["participants"]:
                    if participant["type"] == "server":
                        participant.update(fed_learn_port=port, admin_port=port)
                project_file = home / "project.yml"  # outside the workspace, which prepare replaces
                project_file.write_text(yaml.safe_dump(project))
                nvflare(["poc", "prepare", "-i", str(project_file), "--force", *he_flag], workspace, home=home, env=env)
            # jobs carry no code: each participant allows the classes fedxvit's jobs build (site_policy.JOB_CLASSES)
            for participant in (SERVER, *sites):
                allow_classes(site_dir(workspace, participant) / "local")
            from fedxvit.flower_server import install_app  # jobs/fedxvit_flower's pre-deployed Flower app

            install_app(site_dir(workspace, SERVER) / "local")
        finally:
            if workspace.is_dir():
                mark_workspace(workspace)


def login(kit: Path, timeout_s: float, admin: str = ADMIN):
    """A Flare API session as `admin` (its startup kit `kit`) within timeout_s. NVFlare's login itself has no time
    limit (one sent while the server was starting up on a busy machine hung for minutes), so each try runs in a
    thread of its own, and one that hangs past LOGIN_TRY_S is left behind for a new try."""
    from nvflare.fuel.flare_api.flare_api import new_secure_session

    deadline = time.monotonic() + timeout_s
    error: Exception | None = None
    while (left := deadline - time.monotonic()) > 0:
        box: dict = {}

        def attempt(box=box, left=left):
            try:
                box["session"] = new_secure_session(admin, str(kit), timeout=max(1.0, min(left, LOGIN_TRY_S)))
            except Exception as exc:  # NVFlare's many connection errors: try again until the deadline
                box["error"] = exc

        thread = threading.Thread(target=attempt, name="fedxvit-poc-login", daemon=True)
        thread.start()
        thread.join(min(left, LOGIN_TRY_S) + 5)
        if "session" in box:
            return box["session"]
        error = box.get("error", error)
    detail = f"{type(error).__name__}: {error}" if error else f"no answer to the login within {LOGIN_TRY_S:.0f} s"
    raise FedXViTError(f"cannot log in to the server as {admin} with {kit} within {timeout_s:.0f} s: {detail}")


@contextmanager
def admin_session(kit: Path, timeout_s: float = 60, admin: str = ADMIN):
    """A Flare API session logged in as `admin` with its startup kit `kit`."""
    session = login(kit, timeout_s, admin)
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
    return workspace / POC_KITS / site


def alive(proc) -> bool:
    import psutil

    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def read_daemon(pid_file: Path):
    """The live daemon (a sub_start.sh process) whose id `pid_file` holds, else None: a stale file of a killed
    daemon, or an id reused by another process, names nothing."""
    import psutil

    try:
        proc = psutil.Process(int(pid_file.read_text().strip()))
        is_daemon = any(arg.endswith("sub_start.sh") for arg in proc.cmdline())
    except (OSError, ValueError, psutil.Error):
        return None
    return proc if is_daemon and alive(proc) else None


class ProcessTrees:
    """The NVFlare processes this driver started, by process id, never by folder: each participant's daemon
    and every process below it (the participant and its job processes). Descendants are remembered whenever
    the trees are read, so a job process whose parent died first is still known."""

    def __init__(self):
        self.daemons: dict = {}  # participant -> its daemon (psutil.Process: id and start time, never reused)
        self.known: dict = {}  # participant -> every process seen in its tree

    def record(self, name: str, kit: Path, timeout_s: float = 60):
        """Wait until participant `name`'s daemon (started from its kit folder) has written its id; remember it."""
        pid_file, deadline = kit / DAEMON_PID_FILE, time.monotonic() + timeout_s
        while (daemon := read_daemon(pid_file)) is None or daemon == self.daemons.get(name):
            if time.monotonic() > deadline:
                raise FedXViTError(f"no live NVFlare daemon of {name} in {pid_file} after {timeout_s:.0f} s")
            time.sleep(0.5)
        self.daemons[name] = daemon
        self.known.setdefault(name, set()).add(daemon)
        self.refresh()
        return daemon

    def refresh(self) -> None:
        import psutil

        for name, daemon in self.daemons.items():
            try:
                self.known[name].update(daemon.children(recursive=True))
            except psutil.Error:
                pass

    def tree(self, name: str) -> list:
        """The running processes of participant `name`."""
        self.refresh()
        return [proc for proc in self.known.get(name, ()) if alive(proc)]

    def kill(self, *names: str, wait_s: float = 15) -> int:
        """SIGKILL the trees of these participants (every recorded one if none is named) and wait until they
        are gone; how many were running."""
        import psutil

        self.refresh()
        names = names or tuple(self.known)
        victims = [proc for name in names for proc in self.known.pop(name, ()) if alive(proc)]
        for name in names:
            self.daemons.pop(name, None)
        for proc in victims:
            try:
                proc.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(victims, timeout=wait_s)  # until reaped: a start script takes a zombie for a live daemon
        return len(victims)


def job_with_min_clients(job: Path, min_clients: int, into: Path) -> Path:
    """A copy of the job that needs only `min_clients` sites per round (server config and meta.json)."""
    return job_copy(job, into / job.name, server={"min_clients": min_clients}, meta={"min_clients": min_clients})


def snapshot_files(server_kit: Path) -> tuple[str, int]:
    """Where the server's snapshot_persistor (local/resources.json) keeps run snapshots, and how many
    files it holds."""
    resources = json.loads((server_kit / "local" / "resources.json").read_text())
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
    copy = job_copy(job, into / "continuation" / job.name)
    shutil.copy2(model, copy.parent / RESUME_MODEL_FILE)

    def resume(config: dict) -> None:
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

    rewrite_job_config(copy, SERVER_FILE, resume)
    return copy


def first_round_started(run_log: Path) -> int | None:
    """The first 'Round N started' of a server run log: where a job's training began."""
    match = re.search(r"Round (\d+) started", run_log.read_text(errors="replace")) if run_log.is_file() else None
    return int(match.group(1)) if match else None


class PocSystem:
    """One NVFlare POC system in a workspace of its own that serves several jobs and drills in a row;
    `with PocSystem(...) as system:` stops it at the end, also on failure. `env` is added to the
    environment of every NVFlare process it starts."""

    def __init__(
        self,
        workspace: Path,
        sites=DEFAULT_SITES,
        port: int = DEFAULT_PORT,
        he: bool = False,
        env: dict | None = None,
        start_timeout_s: float = START_TIMEOUT_S,
        before_start=None,
    ):
        self.workspace = Path(workspace).absolute()
        self.before_start = before_start  # called with the system once prepared: a site's own local/ files
        self.sites, self.port, self.he = tuple(sites), port, he
        self.server, self.admin = SERVER, ADMIN  # participant names: NVFlare's POC ones
        self.kits = self.workspace / POC_KITS  # every participant's startup kit folder
        self.env = dict(env or {})
        self.start_timeout_s = start_timeout_s
        self.processes = ProcessTrees()
        self.started = False  # whether `nvflare poc stop` has something to stop
        self._tmp = None  # job copies
        self._copies = itertools.count()

    def __enter__(self) -> PocSystem:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def site_dir(self, name: str) -> Path:
        return self.kits / name

    def start(self) -> None:
        """Claim the workspace, prepare it, start server and clients and record their daemons."""
        claim_workspace(self.workspace)
        self._tmp = tempfile.TemporaryDirectory(prefix="fedxvit-poc-jobs-")
        keys = " with HE keys" if self.he else ""
        print(f"POC workspace {self.workspace}: preparing {', '.join(self.sites)}{keys}", flush=True)
        prepare(self.workspace, self.sites, self.port, self.he, self.env)
        if self.before_start is not None:
            self.before_start(self)
        self.started = True
        try:  # NVFlare's readiness wait logs in while the server starts and can hang (see login): wait here
            nvflare(["poc", "start", "-ex", ADMIN, "--no-wait"], self.workspace, 120, env=self.env)
            self.record_daemons(wait_s=60)
            self.wait_for_server_log([SERVER_UP, *map(registered, self.sites)], 0, self.start_timeout_s)
        except FedXViTError:
            self.record_daemons(wait_s=0)  # what came up, so that stop() ends it
            raise

    def record_daemons(self, wait_s: float) -> None:
        """Record the daemon of the server and of every site; with no wait, only those already up."""
        for name in (self.server, *self.sites):
            try:
                self.processes.record(name, self.site_dir(name), timeout_s=wait_s)
            except FedXViTError:
                if wait_s:
                    raise

    def stop(self) -> None:
        """`nvflare poc stop`, then SIGKILL whatever of the recorded process trees still runs (e.g. a server
        that never came up, so the stop command could not reach it). Safe to call twice."""
        if self.started:
            self.started = False
            self.processes.refresh()
            try:
                nvflare(["poc", "stop"], self.workspace, timeout=180, env=self.env)
            except FedXViTError as exc:
                print(f"warning: {exc}", file=sys.stderr)
            leftovers = self.processes.kill()
            if leftovers:
                print(f"killed {leftovers} leftover POC process(es) this driver started", file=sys.stderr)
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def session(self, timeout_s: float = 60):
        return admin_session(self.site_dir(self.admin), timeout_s, self.admin)

    def new_dir(self) -> Path:
        folder = Path(self._tmp.name) / str(next(self._copies))
        folder.mkdir()
        return folder

    def submit(self, job: Path, min_clients: int | None = None) -> tuple[str, Path]:
        """Submit a copy of the job (needing only `min_clients` sites if given); its id and the copy."""
        into = self.new_dir()
        copy = job_with_min_clients(job, min_clients, into) if min_clients else shutil.copytree(job, into / job.name)
        with self.session() as session:
            job_id = submit(session, copy)
        print(f"submitted {copy.name} as job {job_id}", flush=True)
        return job_id, copy

    def run_job(self, job: Path, out: Path, timeout_s: float = 1800, min_clients: int | None = None) -> dict:
        """Submit, wait, download: {job_id, status, result_dir}."""
        job_id, _ = self.submit(job, min_clients)
        with self.session() as session:
            status = wait(session, job_id, timeout_s)
            result_dir = download(session, job_id, Path(out))
        print(f"job {job_id}: {status}", flush=True)
        return {"job_id": job_id, "status": status, "result_dir": result_dir}

    def wait_for_job_log(self, job_id: str, text: str, timeout_s: float) -> Path:
        """Block until the server's log of this job (server/<job_id>/log.txt) holds `text`; that log."""
        log = self.site_dir(self.server) / job_id / "log.txt"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.processes.refresh()  # job processes are known while their parents live
            try:
                if text in log.read_text(errors="replace"):
                    return log
            except OSError:
                pass
            time.sleep(0.5)
        raise FedXViTError(f"the server did not log {text!r} within {timeout_s:.0f} s (see {log})")

    def wait_for_server_log(self, texts: list[str], offset: int, timeout_s: float) -> None:
        """Until the server's own log (server/log.txt), from byte `offset` on, holds every one of `texts`."""
        log = self.site_dir(self.server) / "log.txt"
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with open(log, "rb") as handle:
                    handle.seek(offset)
                    new = handle.read().decode(errors="replace")
            except OSError:
                new = ""
            missing = [text for text in texts if text not in new]
            if not missing:
                return
            if time.monotonic() > deadline:
                raise FedXViTError(f"the POC server did not log {missing[0]!r} within {timeout_s:.0f} s (see {log})")
            time.sleep(0.5)

    def restart(self, name: str, timeout_s: float = 180) -> None:
        """Start participant `name` again with its own startup script (launch) and wait until the server is up
        again (a site: until the server has registered it again)."""
        log = self.site_dir(self.server) / "log.txt"
        offset = log.stat().st_size if log.is_file() else 0
        self.launch(name)
        self.wait_for_server_log([SERVER_UP if name == self.server else registered(name)], offset, timeout_s)

    def launch(self, name: str) -> None:
        """Run participant `name`'s startup script, as an operator would (console output appended to its
        poc_console.log, like `nvflare poc start`), and record its new daemon; no wait for it to serve."""
        folder = self.site_dir(name)
        script = folder / "startup" / "start.sh"
        with open(folder / "poc_console.log", "a") as console:
            console.write(f"\n--- tooling.poc {name} start {time.asctime()} ---\n")
            console.flush()
            try:
                subprocess.run(
                    [str(script)],
                    env=poc_env(self.workspace, self.env),
                    stdin=subprocess.DEVNULL,
                    stdout=console,
                    stderr=subprocess.STDOUT,
                    timeout=60,
                    check=True,
                )
            except (OSError, subprocess.SubprocessError) as exc:
                raise FedXViTError(f"{script} could not start {name}: {exc}") from None
        self.processes.record(name, folder)

    def kill_site_drill(
        self,
        job: Path,
        site: str,
        after_round: int,
        out: Path,
        timeout_s: float = 1800,
        min_clients: int | None = None,
        bring_back: bool = True,
    ) -> dict:
        """SIGKILL a site's process tree once `after_round` has started: a hospital going dark.
        The server's workflows finish without the dead site (its cross-site tasks time out), but NVFlare
        keeps the job open until the dead client's heartbeat expires, which can take many minutes, so
        the drill copies the finished server run folder instead of waiting for the job. With `bring_back`
        the job is then aborted and the site restarted with its own startup script, for the next job.
        {job_id, status: SERVER_FINISHED, result_dir, killed_processes}."""
        job_id, _ = self.submit(job, min_clients)
        self.wait_for_job_log(job_id, f"Round {after_round} started", timeout_s)
        killed = self.processes.kill(site)
        print(f"killed {killed} process(es) of {site} after round {after_round} started", flush=True)
        log = self.wait_for_job_log(job_id, "Server runner finished", timeout_s)
        result_dir = Path(out) / job_id
        shutil.copytree(log.parent, result_dir / "workspace", dirs_exist_ok=True)
        print(f"job {job_id}: SERVER_FINISHED", flush=True)
        if bring_back:
            with self.session() as session:
                session.abort_job(job_id)
            self.restart(site)
            print(f"{site} restarted with its startup script and registered again", flush=True)
        return {"job_id": job_id, "status": "SERVER_FINISHED", "result_dir": result_dir, "killed_processes": killed}

    def server_runs_job(self, job_id: str) -> bool:
        """Whether a server job process for `job_id` runs (one of the server's processes names the job)."""
        import psutil

        for proc in self.processes.tree(self.server):
            try:
                if job_id in proc.cmdline():
                    return True
            except psutil.Error:
                continue
        return False

    def wait_for_restored_job(self, job_id: str, wait_s: float) -> bool:
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if self.server_runs_job(job_id):
                return True
            time.sleep(1)
        return False

    def server_crash_drill(
        self,
        job: Path,
        after_round: int,
        out: Path,
        restore_wait_s: float = 30,
        timeout_s: float = 1800,
        min_clients: int | None = None,
        kill_site: str | None = None,
        kill_site_after_round: int = 1,
    ) -> dict:
        """Kill the server's process tree (its daemon, which would restart it, the server and the job's server
        process: the machine going down) once `after_round` has finished, restart it, and see the training
        through: NVFlare's own restore if it brings the job back, else a continuation job from the last saved
        round. With `kill_site`, that site's process tree is killed first, once `kill_site_after_round` has
        started (a hospital going dark; the rounds go on with `min_clients`), and it is restarted with the
        server: the resumed rounds need every site.
        {job_id (the killed one), status, result_dir, resumed_job_id, resumed_at_round, killed_processes,
        killed_site_processes, ...}."""
        job_id, copy = self.submit(job, min_clients)
        killed_site = 0
        if kill_site:
            self.wait_for_job_log(job_id, f"Round {kill_site_after_round} started", timeout_s)
            killed_site = self.processes.kill(kill_site)
            print(f"killed {killed_site} process(es) of {kill_site} in round {kill_site_after_round}", flush=True)
        self.wait_for_job_log(job_id, f"Round {after_round} finished", timeout_s)
        killed = self.processes.kill(self.server)
        print(f"killed {killed} server process(es) after round {after_round} finished", flush=True)
        continuation = continuation_job(copy, self.site_dir(self.server) / job_id, after_round + 1, self.new_dir())
        self.restart(self.server)
        if kill_site:  # it is back: the resumed rounds wait for every site
            self.restart(kill_site)
            print(f"{kill_site} restarted with its startup script and registered again", flush=True)
            continuation = job_with_min_clients(continuation, len(self.sites), self.new_dir())
        with self.session(timeout_s=120) as session:
            restored = self.wait_for_restored_job(job_id, restore_wait_s)
            storage, snapshots = snapshot_files(self.site_dir(self.server))
            drill = {
                "job_id": job_id,
                "after_round": after_round,
                "killed_processes": killed,
                "killed_site_processes": killed_site,
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
                    f"NVFlare did not restore job {job_id}: no server process runs it {restore_wait_s:.0f} s after "
                    f"the restart, its status stays {drill['stale_job_status']}, snapshot storage {storage} holds "
                    f"{snapshots} file(s)",
                    flush=True,
                )
                resumed_job = submit(session, continuation)
                print(
                    f"resuming as job {resumed_job}: rounds {after_round + 1}.. from the round-{after_round} global "
                    "model",
                    flush=True,
                )
            drill["status"] = wait(session, resumed_job, timeout_s)
            drill["result_dir"] = download(session, resumed_job, Path(out))
        print(f"job {resumed_job}: {drill['status']}", flush=True)
        drill["resumed_job_id"] = resumed_job
        drill["resumed_at_round"] = first_round_started(drill["result_dir"] / "workspace" / "log.txt")
        print(f"the resumed training started at round {drill['resumed_at_round']}", flush=True)
        return drill


def validate(
    job: Path, sites, kill: str | None, kill_server_after_round: int | None, kill_after_round: int = 1
) -> None:
    if not (job / "meta.json").is_file():
        raise FedXViTError(f"{job}: not an NVFlare job folder (no meta.json)")
    if kill and kill not in sites:
        raise FedXViTError(f"--kill-site {kill} is not one of the sites {', '.join(sites)}")
    if kill and kill_server_after_round is not None and kill_after_round > kill_server_after_round:
        raise FedXViTError(
            f"--kill-after-round {kill_after_round} is after --kill-server-after-round {kill_server_after_round}: "
            "the site is killed first, then the server"
        )
    if kill_server_after_round is not None:
        rounds = int(read_job_config(job, SERVER_FILE)["num_rounds"])
        if not 0 <= kill_server_after_round < rounds - 1:
            raise FedXViTError(
                f"--kill-server-after-round {kill_server_after_round}: {job} trains rounds "
                f"0..{rounds - 1}, so the server can only be killed after rounds 0..{rounds - 2} "
                "(one must be left to resume)"
            )


def round_rows(result_dir: Path) -> list[dict]:
    """Per round of a downloaded result: the sites aggregated and the global model's validation accuracy."""
    global_val = Path(result_dir) / "workspace" / GLOBAL_VAL_FILE
    rounds = json.loads(global_val.read_text()).get("rounds", []) if global_val.is_file() else []
    return [
        {"round": r["round"], "sites": sorted(r.get("sites", {})), "global_val_accuracy": r["global_val_accuracy"]}
        for r in rounds
    ]


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
    """One POC system for one job: prepare -> start -> submit -> (a drill) -> wait -> download -> stop."""
    validate(job, sites, kill, kill_server_after_round, kill_after_round)
    started = time.perf_counter()
    server_crash = None
    with PocSystem(workspace, sites, port, he=uses_he(job)) as system:
        if kill_server_after_round is not None:  # a site first, if asked, then the server
            result = server_crash = system.server_crash_drill(
                job, kill_server_after_round, out, restore_wait_s, timeout_s, min_clients, kill, kill_after_round
            )
        elif kill:  # the system stops next: the site need not come back
            result = system.kill_site_drill(job, kill, kill_after_round, out, timeout_s, min_clients, bring_back=False)
        else:
            result = system.run_job(job, out, timeout_s, min_clients)
    summary = {
        "job_id": result["job_id"],
        "status": result["status"],
        "result_dir": str(result["result_dir"]),
        "killed_site": kill,
        "killed_processes": result.get("killed_site_processes", result.get("killed_processes")) if kill else 0,
        "server_crash": server_crash,
        "wall_s": time.perf_counter() - started,
        "rounds": round_rows(result["result_dir"]),
    }
    for row in summary["rounds"]:
        print(
            f"  round {row['round']}: global_val_accuracy={row['global_val_accuracy']:.4f} "
            f"from {', '.join(row['sites'])}"
        )
    print(f"results in {result['result_dir']} ({summary['wall_s']:.0f} s)")
    return summary


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tooling.poc",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--job", default=str(DEFAULT_JOB), help="NVFlare job folder")
    parser.add_argument(
        "--workspace",
        default=os.path.join(tempfile.gettempdir(), "nvflare", "poc"),
        help=f"POC workspace (NVFLARE_POC_WORKSPACE), replaced by `poc prepare`: a new folder, or one this "
        f"driver created (it holds {MARKER}); any other existing folder is refused",
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
