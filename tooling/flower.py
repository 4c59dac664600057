"""The Flower app natively, in Flower's simulation engine (`make flower`): the same app jobs/fedxvit_flower runs
inside NVFlare, on the same site folders and initial model.

Everything happens in <workspace>, which this tool creates (it refuses a folder it did not make, and empties only
one it made before):
1. FLWR_HOME=<workspace>/flwr_home with one SuperLink connection: Flower's simulation with one node per site,
   one CPU each;
2. a local Ray head (`ray start`, on 127.0.0.1, no usage reports) that Flower's simulation connects to, tried again
   when it misses Ray's fixed 30 s start-up limit on a busy machine, and `flower-superlink --simulation` on free
   local ports; each in its own process group, stopped at the end;
3. `flwr run <app folder> --run-config ...`: out-dir <workspace>/run, the sites, and any setting given here;
4. waits until `flwr list` says the run finished, keeps `flwr log` in <workspace>/flower_run.log.
Ray keeps its session files in a temporary folder of the run (RAY_TMPDIR), removed with Ray's processes.
The ServerApp leaves what a jobs/fedxvit run leaves in <workspace>/run: global_val.json,
app_server/FL_global_model.pt and best_FL_global_model.pt, tb_events/ and mlflow_runs.json. Flower's simulation
needs `flwr[simulation]` (Ray), which requirements.txt installs.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fedxvit.errors import ArgumentParser, FedXViTError, run_cli
from fedxvit.flower_server import APP_FOLDER
from fedxvit.persistor import INITIAL_MODEL_ENV
from fedxvit.sites import DATA_ROOT_ENV, site_env_var
from tooling.poc import free_port
from tooling.simulation import stop_group  # the group and every process it started, setsid or not

CONNECTION = "fedxvit-simulation"
MARKER = ".fedxvit-flower"  # a workspace this tool made (and may empty again)
RUN_DIR = "run"
RUN_LOG = "flower_run.log"
RAY_LOG = "ray_start.log"
POLL_S = 1.0
RAY_STARTS = 3  # Ray gives a starting node a fixed 30 s, which a busy 2-core machine can miss


def claim_workspace(workspace: Path) -> None:
    """A fresh workspace, or one this tool made before (emptied); anything else is refused, never deleted."""
    if workspace.exists() and any(workspace.iterdir()):
        if not (workspace / MARKER).is_file():
            raise FedXViTError(f"{workspace} exists and was not made by tooling.flower: choose another --workspace")
        shutil.rmtree(workspace)
    workspace.mkdir(parents=True, exist_ok=True)
    (workspace / MARKER).write_text("made by tooling.flower\n")


def write_flower_home(home: Path, control_address: str, nodes: int) -> Path:
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(
        "[superlink]\n"
        f'default = "{CONNECTION}"\n\n'
        f"[superlink.{CONNECTION}]\n"
        f'address = "{control_address}"\n'
        "insecure = true\n"
        f"options.num-supernodes = {nodes}\n"
        "options.backend.client-resources.num-cpus = 1\n"
        "options.backend.client-resources.num-gpus = 0\n"
    )
    return home


def run_config_args(settings: dict) -> list[str]:
    """`--run-config KEY=VALUE` for each setting, the value written as TOML (text quoted, booleans lower case)."""
    args = []
    for key, value in settings.items():
        text = json.dumps(value) if isinstance(value, (str, bool)) else value
        args += ["--run-config", f"{key}={text}"]
    return args


def flwr(env: dict, *args: str, timeout_s: float = 120) -> dict:
    """`flwr <args> --format json`, its JSON answer; one line when it fails."""
    command = [str(Path(sys.executable).parent / "flwr"), *args, "--format", "json"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout_s)
    try:
        answer = json.loads(done.stdout)
    except json.JSONDecodeError:
        answer = None
    if done.returncode != 0 or not isinstance(answer, dict) or answer.get("success") is False:
        why = (answer or {}).get("error-message") if isinstance(answer, dict) else None
        text = why or done.stderr or done.stdout or ""  # its last line says why (a warning may come first)
        lines = [line.strip() for line in str(text).splitlines() if line.strip()]
        raise FedXViTError(f"`flwr {args[0]}` failed: {(lines or ['no output'])[-1][:300]}")
    return answer


def run_status(env: dict, run_id: int) -> str:
    runs = flwr(env, "list", "--run-id", str(run_id), CONNECTION).get("runs") or [{}]
    return str(runs[0].get("status", ""))


def simulate(
    workspace: os.PathLike,
    data_root: os.PathLike,
    sites,
    initial: os.PathLike | None = None,
    settings: dict | None = None,
    timeout_s: float = 3600,
    extra_env: dict | None = None,
    overrides: list[str] = (),
) -> Path:
    """One native Flower simulation of the app over <data_root>/<site> for each site; the run folder
    (<workspace>/run), or one line saying why there is none. `settings` are Python values, `overrides` KEY=VALUE
    texts as `flwr run --run-config` reads them (TOML values)."""
    workspace, sites = Path(workspace).resolve(), list(sites)
    claim_workspace(workspace)
    run_dir = workspace / RUN_DIR
    control = f"127.0.0.1:{free_port()}"
    env = dict(os.environ)
    for site in sites:  # a per-site override in the caller's shell would silently swap the data
        env.pop(site_env_var(site), None)
    env.update(
        {
            "FLWR_HOME": str(write_flower_home(workspace / "flwr_home", control, len(sites))),
            DATA_ROOT_ENV: str(Path(data_root).resolve()),
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
            "FEDXVIT_TORCH_THREADS": env.get("FEDXVIT_TORCH_THREADS", "1"),  # one CPU per simulated node
            **({INITIAL_MODEL_ENV: str(Path(initial).resolve())} if initial else {}),
            **(extra_env or {}),
        }
    )
    # Ray's session files (and its sockets, whose paths must stay short) in a folder of this run, removed after
    ray_tmp = Path(tempfile.mkdtemp(prefix="fxray-"))
    env.update(RAY_TMPDIR=str(ray_tmp), RAY_USAGE_STATS_ENABLED="0")
    superlink_log = open(workspace / "superlink.log", "w")
    ray = superlink = None
    try:
        ray, env["RAY_ADDRESS"] = start_ray(env, ray_tmp, workspace / RAY_LOG)
        superlink = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "flower-superlink"),
                "--insecure",
                "--simulation",
                "--isolation",
                "subprocess",
                "--control-api-address",
                control,
                "--serverappio-api-address",
                f"127.0.0.1:{free_port()}",
                "--database",
                str(workspace / "superlink.db"),
            ],
            cwd=workspace,
            env=env,
            stdout=superlink_log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        settings = {**(settings or {}), "sites": ",".join(sites), "out-dir": str(run_dir)}
        config_args = [*run_config_args(settings), *(arg for item in overrides for arg in ("--run-config", item))]
        run_id = start_run(env, workspace, superlink, control, config_args)
        status = wait(env, run_id, superlink, time.monotonic() + timeout_s)
        log = run_log(env, run_id)
        (workspace / RUN_LOG).write_text(log)
    finally:
        for group in (superlink, ray):  # the SuperLink first: it stops its simulation
            if group:
                stop_group(group)
        superlink_log.close()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    if not status.endswith("completed") or not (run_dir / "app_server" / "FL_global_model.pt").is_file():
        cause = first_error(log)
        raise FedXViTError(
            f"the Flower run ended {status or 'without a status'}{f': {cause}' if cause else ''}"
            f" (log {workspace / RUN_LOG})"
        )
    return run_dir


def start_ray(env: dict, ray_tmp: Path, log_path: Path) -> tuple[subprocess.Popen, str]:
    """A local Ray head for Flower's simulation, which connects to it (RAY_ADDRESS): the `ray start` that leads its
    process group, and its address.
    Started here rather than inside the simulation because Ray gives a starting node a fixed 30 s, which a busy
    machine can miss; inside the simulation that fails the run, here the half-started node is stopped and started
    again before any run exists. Its processes stay on this machine (127.0.0.1), without usage reports."""
    with open(log_path, "w") as log:
        for attempt in range(1, RAY_STARTS + 1):
            address = f"127.0.0.1:{free_port()}"
            command = [
                str(Path(sys.executable).parent / "ray"),
                "start",
                "--head",
                "--node-ip-address=127.0.0.1",
                f"--port={address.rsplit(':', 1)[1]}",
                f"--ray-client-server-port={free_port()}",
                "--include-dashboard=false",
                "--disable-usage-stats",
                f"--temp-dir={ray_tmp}",
            ]
            log.write(f"$ {' '.join(command)}\n")
            log.flush()
            process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                if process.wait(timeout=180) == 0:
                    return process, address
            except subprocess.TimeoutExpired:
                pass
            stop_group(process)
            print(f"Ray did not start (attempt {attempt} of {RAY_STARTS}, log {log_path})", file=sys.stderr)
    lines = [line.strip() for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
    raise FedXViTError(f"Ray did not start in {RAY_STARTS} attempts: {lines[-1][:300]} (log {log_path})")


def first_error(log: str) -> str:
    """The first `SomeError: why` line of a run's log: with chained exceptions, the cause."""
    for line in log.splitlines():
        name, sep, why = line.strip().partition(": ")
        if sep and why and name.rsplit(".", 1)[-1].endswith(("Error", "Exception")) and " " not in name:
            return line.strip()[:300]
    return ""


def start_run(env: dict, workspace: Path, superlink, control: str, config_args: list) -> int:
    """`flwr run` once the SuperLink's Control API accepts connections (a few seconds after it started)."""
    host, port = control.rsplit(":", 1)
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection((host, int(port)), timeout=1).close()
            break
        except OSError:
            if superlink.poll() is not None:
                raise FedXViTError(f"flower-superlink stopped (log {workspace / 'superlink.log'})") from None
            if time.monotonic() > deadline:
                raise FedXViTError(f"flower-superlink did not answer on {control} within 60 s") from None
            time.sleep(POLL_S)
    return int(flwr(env, "run", str(APP_FOLDER), CONNECTION, *config_args)["run-id"])


def wait(env: dict, run_id: int, superlink, deadline: float) -> str:
    while time.monotonic() < deadline:
        status = run_status(env, run_id)
        if status.startswith("finished"):
            return status
        if superlink.poll() is not None:
            raise FedXViTError("flower-superlink stopped during the run")
        time.sleep(POLL_S)
    raise FedXViTError(f"the Flower run {run_id} did not finish in time")


def run_log(env: dict, run_id: int) -> str:
    command = [str(Path(sys.executable).parent / "flwr"), "log", str(run_id), CONNECTION, "--show"]
    try:
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=60).stdout
    except subprocess.TimeoutExpired:
        return "flwr log did not answer within 60 s\n"


def parse_args(argv=None):
    parser = ArgumentParser(prog="python -m tooling.flower", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("data"), help="folder of site folders (default: data)")
    parser.add_argument("--sites", default="site1,site2,site3", help="comma-separated site folders, one node each")
    parser.add_argument("--initial", type=Path, help="initial global model (default: models/initial_global.pt)")
    parser.add_argument("--workspace", type=Path, default=Path("workspace") / "flower")
    parser.add_argument(
        "--run-config", action="append", default=[], metavar="KEY=VALUE", help="a setting of the app's pyproject.toml"
    )
    return parser.parse_args(argv)


def main(argv=None) -> Path:
    args = parse_args(argv)
    for item in args.run_config:
        if "=" not in item:
            raise FedXViTError(f"--run-config {item!r}: write KEY=VALUE (a TOML value: 5, 0.001, '\"last-k\"')")
    sites = [s.strip() for s in args.sites.split(",") if s.strip()]
    started = time.perf_counter()
    run_dir = simulate(args.workspace, args.data, sites, args.initial, overrides=args.run_config)
    print(f"Flower run finished in {time.perf_counter() - started:.1f} s: {run_dir}")
    return run_dir


if __name__ == "__main__":
    run_cli(main)
