"""Run a job folder in NVFlare's simulator on a chosen set of sites: the one helper behind the
comparison runner (result_stat.compare), the benchmark's gap check (data_preparation.federated_gap)
and the tests that run the simulator.

The job itself is never edited: a copy gets new values for its *variables* (the keys at the top
of config_fed_server.json / config_fed_client.json), so any job folder that follows the
repository's conventions can be run, whatever its components. A copy must keep every task bounded
(TASK_LIMITS above 0): the comparison and the gap check require every site in every round, so a
site that takes a task and never answers would otherwise hold the run for as long as it hangs.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fedxvit.errors import FedXViTError, read_json
from fedxvit.persistor import INITIAL_MODEL_ENV
from fedxvit.site_policy import allow_classes
from fedxvit.sites import DATA_ROOT_ENV, site_env_var
from tooling.jobconfig import SERVER_FILE

GLOBAL_MODEL = Path("app_server") / "FL_global_model.pt"
SIMULATOR_LOG = "simulator_output.log"


def simulator_env(
    data_root: Path, sites, initial: Path | None, environ: dict | None = None, extra: dict | None = None
) -> dict:
    """The environment of a simulator run: every site reads <data_root>/<site> (a per-site override
    such as FEDXVIT_DATA_SITE1 in the caller's shell is dropped, it would silently swap the data),
    the job starts from `initial`, and the simulator's workers find this interpreter's nvflare.
    `extra` adds variables (an MLflow store, a folder of test executors on PYTHONPATH)."""
    env = dict(os.environ if environ is None else environ)
    for site in sites:
        env.pop(site_env_var(site), None)
    bin_dir = Path(sys.executable).parent
    env.update(
        {
            DATA_ROOT_ENV: str(Path(data_root).resolve()),
            **({INITIAL_MODEL_ENV: str(Path(initial).resolve())} if initial else {}),
            "PATH": f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",
            **(extra or {}),
        }
    )
    return env


def failure_reason(log: str) -> str:
    """The line of a failed run's log a user needs: fedxvit's own one-line error when a site or the server raised
    one (a bad job variable, a missing data folder), else the last error line NVFlare printed."""
    lines = log.splitlines()
    own = [line.split("FedXViTError: ", 1)[1] for line in lines if line.startswith("fedxvit.errors.FedXViTError: ")]
    if own:
        return own[-1].strip()
    errors = [line for line in lines if "ERROR" in line or "Error" in line]
    return (errors or log.strip().splitlines() or ["no output"])[-1].strip()[:300]


# NVFlare's simulator picks a free port for each client worker, frees it and passes it on; the worker binds it only
# after its imports (seconds), so another process can take it in between. The worker then dies at start-up.
PORT_TAKEN = "Address already in use"
START_ATTEMPTS = 3
POLL_S = 1.0
START_OF_LOG_CHARS = 65536


def port_race_victims(workspace: Path, sites) -> list[str]:
    """The sites whose simulator worker died because its port was taken before it could bind it (PORT_TAKEN). Only
    the start of each site's log is read: it happens at start-up, and a long run's logs grow to megabytes."""
    victims = []
    for site in sites:
        try:
            with open(workspace / site / "log.txt", errors="replace") as log:
                if PORT_TAKEN in log.read(START_OF_LOG_CHARS):
                    victims.append(site)
        except OSError:
            pass
    return victims


def run_simulator(
    job: os.PathLike,
    workspace: os.PathLike,
    data_root: os.PathLike,
    sites,
    initial: os.PathLike | None,
    timeout_s: int = 3600,
    extra_env: dict | None = None,
    allow: tuple = (),
    expect: str = GLOBAL_MODEL,
) -> Path:
    """`nvflare simulator <job> -w <workspace> -c <sites> -t <n sites>` (one client process per site,
    so none waits for a turn); the server's run folder, or one line saying why there is none. A run succeeded when
    it exited 0 and wrote `expect` in that folder (the final global model; a job that trains no model, such as the
    statistics job, names its own output); `initial` is the model to start from (None: a job that needs none).
    The whole output is kept in <workspace>/simulator_output.log. Jobs carry no code: every participant
    builds the classes fedxvit's jobs need and those `allow` names (<workspace>/local/resources.json,
    fedxvit.site_policy.allow_classes). A run whose site worker lost its port to another process before
    binding it (NVFlare's own race, PORT_TAKEN) is stopped at once and started again, up to START_ATTEMPTS
    times: such a run would otherwise go on without that site, or wait for it until its task limits."""
    job, workspace, sites = Path(job), Path(workspace), list(sites)
    for attempt in range(1, START_ATTEMPTS + 1):
        returncode, victims = simulate_once(job, workspace, data_root, sites, initial, timeout_s, extra_env, allow)
        if not victims:
            break
        log = workspace / SIMULATOR_LOG
        note = f"fedxvit: attempt {attempt}: the worker of {', '.join(victims)} lost its port ({PORT_TAKEN}); "
        if attempt == START_ATTEMPTS:
            raise FedXViTError(f"the simulator run of {job}: {note}gave up after {attempt} attempts (log {log})")
        print(note + "starting the run again", file=sys.stderr)
    run_dir = workspace / "server" / "simulate_job"
    if returncode != 0 or not (run_dir / expect).is_file():
        log = workspace / SIMULATOR_LOG
        raise FedXViTError(
            f"the simulator run of {job} failed (exit {returncode}, log {log}): "
            f"{failure_reason(log.read_text(errors='replace'))}"
        )
    return run_dir


def runs_predeployed_flower_app(job: Path) -> bool:
    """Whether the job runs a Flower app pre-deployed at the server (jobs/fedxvit_flower: NVFlare's FlowerController
    with a `flower_app_path`), in whichever of its apps the server's config is."""
    for server_config in sorted(job.glob(f"*/config/{SERVER_FILE.name}")):
        config = read_json(server_config, f"{server_config} cannot be read")
        if any("flower_app_path" in (entry.get("args") or {}) for entry in config.get("workflows", [])):
            return True
    return False


def simulate_once(
    job: Path, workspace: Path, data_root, sites: list, initial, timeout_s: int, extra_env, allow
) -> tuple[int, list[str]]:
    """One simulator run in a fresh `workspace`, its output in SIMULATOR_LOG there: (exit code, the sites that lost
    their port at start-up: the run was stopped, or it finished without them)."""
    if workspace.exists():
        shutil.rmtree(workspace)
    workspace.parent.mkdir(parents=True, exist_ok=True)
    allow_classes(workspace / "local", allow)
    if runs_predeployed_flower_app(job):  # the simulator copies <workspace>/local/ to the server's local/
        from fedxvit.flower_server import install_app  # flwr is imported for a Flower job only

        install_app(workspace / "local")
    command = [
        str(Path(sys.executable).parent / "nvflare"),
        "simulator",
        str(job),
        "-w",
        str(workspace),
        "-c",
        ",".join(sites),
        "-t",
        str(len(sites)),
    ]
    deadline = time.monotonic() + timeout_s
    # the output goes beside the workspace while the simulator runs (it empties the workspace at start), then in it
    with tempfile.NamedTemporaryFile("w", dir=workspace.parent, prefix=f".{workspace.name}-", delete=False) as log:
        # its own process group: on a timeout the simulator's client workers are stopped with it, not orphaned
        process = subprocess.Popen(
            command,
            env=simulator_env(Path(data_root), sites, initial, extra=extra_env),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            victims, timed_out = watch(process, workspace, sites, deadline)
        finally:
            if process.poll() is None:  # interrupted (Ctrl-C): the run stops with its caller
                stop_group(process)
    workspace.mkdir(parents=True, exist_ok=True)
    shutil.move(log.name, workspace / SIMULATOR_LOG)
    if timed_out:
        raise FedXViTError(f"the simulator run of {job} did not finish within {timeout_s} s (workspace {workspace})")
    return process.returncode, victims


def watch(process: subprocess.Popen, workspace: Path, sites: list, deadline: float) -> tuple[list[str], bool]:
    """Wait for the run to end; stop it early when a site lost its port or past the deadline: (victims, timed out)."""
    while process.poll() is None:
        victims = port_race_victims(workspace, sites)
        if victims or time.monotonic() > deadline:
            stop_group(process)
            return victims, not victims
        time.sleep(POLL_S)
    return port_race_victims(workspace, sites), False


def stop_group(process: subprocess.Popen) -> None:
    """SIGKILL the simulator's process group and every process it started: NVFlare starts each client worker in a
    session of its own (setsid), which the group signal misses and which would live on, orphaned. The group is
    frozen first, so that no worker starts between listing the tree and killing it."""
    import psutil

    try:
        os.killpg(process.pid, signal.SIGSTOP)
        tree = psutil.Process(process.pid).children(recursive=True)
    except (ProcessLookupError, psutil.NoSuchProcess):  # it ended on its own meanwhile
        tree = []
    for child in tree:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not all(map(ended, tree)):
        time.sleep(0.1)


def ended(proc) -> bool:
    """Gone, or a zombie its new parent has yet to reap (not every container's init reaps)."""
    import psutil

    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
