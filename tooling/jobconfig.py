"""The one module that reads, copies and rewrites job folders, and reads what a finished run says about itself.

    read_job_settings("jobs/fedxvit")                     # a job folder (or its app/, or app/config/)
    read_job_settings("workspace/server/simulate_job")    # a finished run: the config it really used

The settings are the arguments NVFlare itself hands the components: the config's top-level
variables are substituted into the component args with NVFlare's own resolver
(`nvflare.fuel.utils.wfconf.resolve_var_refs`), so an argument edited in place and one set
through a variable read the same. The baselines, result_stat and bench read jobs only through
here; light on purpose (no torch), so table-making scripts stay quick to start. A run's copy of a job
(`job_copy`: new variable values, meta entries) and the POC drills' rewrites (`rewrite_job_config`) are made
here too; `tooling.jobs` generates the committed job folders with these readers.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from fedxvit.errors import FedXViTError, read_json
from fedxvit.paths import project_root

CLIENT_CONFIG = "config_fed_client.json"
SERVER_CONFIG = "config_fed_server.json"
META = "meta.json"
SERVER_FILE = Path("app") / "config" / SERVER_CONFIG  # in a job folder
CLIENT_FILE = Path("app") / "config" / CLIENT_CONFIG
# server job variables that bound a task in seconds; NVFlare reads 0 as "wait for ever"
TASK_LIMITS = ("train_timeout", "submit_model_timeout", "validation_timeout")
EXECUTOR_PATH = "fedxvit.executor.FedXViTExecutor"
DEFAULT_JOB = Path("jobs") / "fedxvit"
DEFAULT_RUN_DIR = Path("workspace") / "server" / "simulate_job"
RUN_CONFIG = Path("app_server") / "config"  # where the simulator and POC server keep the run's app config


@dataclass(frozen=True)
class JobSettings:
    """What a job trains: its executor's, its round-based workflow's and that workflow's persistor's arguments."""

    preset: str
    num_classes: int
    num_rounds: int
    local_epochs: int
    learning_rate: float
    batch_size: int
    freeze_policy: str
    last_k: int
    seed: int

    @property
    def equivalent_epochs(self) -> int:
        """Epochs that show a model every image as often as the federated job does: rounds x local epochs."""
        return self.num_rounds * self.local_epochs

    def as_dict(self) -> dict:
        return {**asdict(self), "equivalent_epochs": self.equivalent_epochs}


def job_folder(name: str = DEFAULT_JOB.name) -> Path:
    """<project>/jobs/<name>: a shipped job folder."""
    return project_root() / DEFAULT_JOB.parent / name


def default_run_dir() -> Path:
    """<project>/workspace/server/simulate_job: where `make simulate` leaves its run."""
    return project_root() / DEFAULT_RUN_DIR


def config_dir(path: os.PathLike | None = None) -> Path:
    """The folder holding the two config files, for a job folder, its app/ or app/config/, or a run folder."""
    path = Path(path) if path else project_root() / DEFAULT_JOB
    for candidate in (path, path / "config", path / "app" / "config", path / RUN_CONFIG):
        if (candidate / SERVER_CONFIG).is_file():
            return candidate
    raise FedXViTError(
        f"{path}: no {SERVER_CONFIG} there, nor in its config/, app/config/ or {RUN_CONFIG.as_posix()}/ "
        "(pass a job folder or a finished run folder)"
    )


def resolved_config(path: Path) -> dict:
    """A config file with its variables substituted into the args, as NVFlare resolves them."""
    from nvflare.fuel.utils.dict_utils import extract_first_level_primitive
    from nvflare.fuel.utils.json_scanner import JsonScanner
    from nvflare.fuel.utils.wfconf import resolve_var_refs

    if not path.is_file():
        raise FedXViTError(f"job config {path} does not exist")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise FedXViTError(f"job config {path} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise FedXViTError(f"job config {path} is not a JSON object")
    resolved = copy.deepcopy(config)
    try:
        resolve_var_refs(JsonScanner(resolved), extract_first_level_primitive(config))
    except Exception as exc:  # NVFlare's ConfigError and friends: one line naming the file
        raise FedXViTError(f"job config {path}: cannot resolve its variables: {exc}") from None
    return resolved


def pick_one(items: list, what: str, where: Path, prefer_path: str | None = None) -> dict:
    """The one component that fits; among several, the one with `prefer_path`; else a one-line error."""
    items = [item for item in items if isinstance(item, dict)]
    if len(items) > 1 and prefer_path:
        items = [item for item in items if item.get("path") == prefer_path]
    if len(items) != 1:
        raise FedXViTError(f"job config {where}: expected one {what}, found {len(items)}")
    return items[0]


def job_components(server: dict, client: dict, folder: Path) -> dict:
    """The args of the executor, the round-based workflow and the persistor that workflow names."""
    executor = pick_one(
        [e.get("executor") for e in client.get("executors", []) if isinstance(e, dict)],
        "executor",
        folder / CLIENT_CONFIG,
        EXECUTOR_PATH,
    )
    workflow = pick_one(
        [w for w in server.get("workflows", []) if "num_rounds" in (w.get("args") or {})],
        "workflow with num_rounds",
        folder / SERVER_CONFIG,
    )
    persistor_id = (workflow.get("args") or {}).get("persistor_id", "persistor")
    persistor = pick_one(
        [c for c in server.get("components", []) if c.get("id") == persistor_id],
        f"component '{persistor_id}' (the workflow's persistor)",
        folder / SERVER_CONFIG,
    )
    return {
        name: component.get("args") or {}
        for name, component in (("executor", executor), ("workflow", workflow), ("persistor", persistor))
    }


def read_job_settings(path: os.PathLike | None = None) -> JobSettings:
    """The settings of a job folder or of a finished run (default: the repository's jobs/fedxvit).

    A job must be explicit: every setting is an argument in its config, never a code default."""
    folder = config_dir(path)
    server, client = resolved_config(folder / SERVER_CONFIG), resolved_config(folder / CLIENT_CONFIG)
    args = job_components(server, client, folder)
    executor, persistor, workflow = args["executor"], args["persistor"], args["workflow"]

    def arg(args: dict, name: str, kind, file_name: str):
        if name not in args:
            raise FedXViTError(f"job config {folder / file_name}: no '{name}' argument (a job must set it)")
        try:
            return kind(args[name])
        except (TypeError, ValueError):
            raise FedXViTError(
                f"job config {folder / file_name}: '{name}' = {args[name]!r} is not {kind.__name__}"
            ) from None

    settings = JobSettings(
        preset=arg(executor, "preset", str, CLIENT_CONFIG),
        num_classes=arg(persistor, "num_classes", int, SERVER_CONFIG),
        num_rounds=arg(workflow, "num_rounds", int, SERVER_CONFIG),
        local_epochs=arg(executor, "local_epochs", int, CLIENT_CONFIG),
        learning_rate=arg(executor, "learning_rate", float, CLIENT_CONFIG),
        batch_size=arg(executor, "batch_size", int, CLIENT_CONFIG),
        freeze_policy=arg(executor, "freeze_policy", str, CLIENT_CONFIG),
        last_k=arg(executor, "last_k", int, CLIENT_CONFIG),
        seed=arg(executor, "seed", int, CLIENT_CONFIG),
    )
    server_preset = arg(persistor, "preset", str, SERVER_CONFIG)
    if server_preset != settings.preset:
        raise FedXViTError(
            f"job config in {folder}: the server's preset '{server_preset}' and the clients' '{settings.preset}' differ"
        )
    return settings


def run_sites(run_dir: os.PathLike) -> list[str]:
    """The sites of a finished run: its meta.json's job clients, else its global_val.json, else its
    cross-site results (a site that died early is still one of the run's sites)."""
    run_dir = Path(run_dir)

    def read(name: str):
        try:
            return json.loads((run_dir / name).read_text())
        except (OSError, json.JSONDecodeError):
            return None

    meta = read("meta.json") or {}
    names = sorted(c["name"] for c in meta.get("job_clients") or [] if isinstance(c, dict) and c.get("name"))
    if not names:
        rounds = (read("global_val.json") or {}).get("rounds") or []
        names = sorted({site for row in rounds for site in row.get("sites", {})})
    if not names:
        names = sorted(read(os.path.join("cross_site_val", "cross_val_results.json")) or {})
    if not names:
        raise FedXViTError(
            f"cannot tell the sites of run {run_dir} (no meta.json job clients, global_val.json or "
            "cross-site results): pass --sites"
        )
    return names


def check_site_options(path: os.PathLike | None = None) -> list[str]:
    """Build every fedxvit executor a job's sites would build, with the arguments NVFlare would hand it, so a bad
    job variable is one line naming the file before any simulator, POC or production run starts; what was checked.
    (The executor checks the same at start-up; here it is caught before a run spends minutes waiting on it.)"""
    import importlib

    folder = config_dir(path)
    client = resolved_config(folder / CLIENT_CONFIG)
    checked = []
    for entry in client.get("executors", []):
        executor = entry.get("executor") if isinstance(entry, dict) else None
        if not isinstance(executor, dict) or not str(executor.get("path", "")).startswith("fedxvit."):
            continue
        module, _, name = executor["path"].rpartition(".")
        try:
            getattr(importlib.import_module(module), name)(**(executor.get("args") or {}))
        except FedXViTError as exc:
            raise FedXViTError(f"{folder / CLIENT_CONFIG}: {exc}") from None
        except TypeError as exc:  # an argument the executor does not take
            raise FedXViTError(f"{folder / CLIENT_CONFIG}: {executor['path']}: {exc}") from None
        checked.append(executor["path"])
    return checked


def main(argv=None) -> None:
    from fedxvit.errors import ArgumentParser

    parser = ArgumentParser(
        prog="python -m tooling.jobconfig",
        description="Check a job's site options before running it (make simulate does, first).",
    )
    parser.add_argument("job", nargs="?", default=str(DEFAULT_JOB), help="job folder (default jobs/fedxvit)")
    args = parser.parse_args(argv)
    settings = read_job_settings(args.job)
    checked = check_site_options(args.job)
    print(
        f"{args.job}: {', '.join(checked)} accept the job's options ({settings.preset}, {settings.num_rounds} rounds)"
    )


# ---- copying and rewriting job folders (the one place; tooling.jobs generates the committed ones)
def read_job_config(job: Path, which: Path) -> dict:
    """One of a job folder's JSON files (SERVER_FILE, CLIENT_FILE, META) as written, variables unresolved."""
    return read_json(Path(job) / which, f"job folder {job} has no {which}")


def config_text(config: dict) -> str:
    """A job config as the committed job folders hold it."""
    return json.dumps(config, indent=2) + "\n"


def write_job_config(job: Path, which: Path, config: dict) -> None:
    (Path(job) / which).write_text(config_text(config))


def rewrite_job_config(job: Path, which: Path, change) -> None:
    """Apply `change(config)` (in place) to one of a job folder's JSON files and write it back."""
    config = read_job_config(job, which)
    change(config)
    write_job_config(job, which, config)


def unbounded_tasks(server_config: dict) -> list[str]:
    """The TASK_LIMITS a server config has that are not a positive whole number of seconds."""
    return [
        name
        for name in TASK_LIMITS
        if name in server_config
        and (
            isinstance(server_config[name], bool)
            or not isinstance(server_config[name], int)
            or server_config[name] <= 0
        )
    ]


def job_copy(
    source: os.PathLike,
    dest: os.PathLike,
    server: dict | None = None,
    client: dict | None = None,
    optional: tuple = (),
    meta: dict | None = None,
) -> Path:
    """A fresh copy of job `source` at `dest` with new values for its server and client variables (and `meta`
    entries in its meta.json).

    A variable the job lacks is an error naming the file, unless it is listed in `optional`
    (e.g. min_clients, which a cyclic job has no use for): then it is left out. So is a task limit
    (TASK_LIMITS) that is not a positive number of seconds."""
    source, dest = Path(source), Path(dest)
    for which in (SERVER_FILE, CLIENT_FILE):
        read_job_config(source, which)  # both files exist and parse before anything is copied
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(source, dest)
    for which, changes in ((SERVER_FILE, server or {}), (CLIENT_FILE, client or {})):
        if not changes:
            continue  # an unchanged file stays byte for byte the job's own
        config = read_job_config(dest, which)
        for key, value in changes.items():
            if key in config:
                config[key] = value
            elif key not in optional:
                raise FedXViTError(f"{source / which} has no job variable {key!r}")
        write_job_config(dest, which, config)
    if meta:
        rewrite_job_config(dest, META, lambda config: config.update(meta))
    server_config = read_job_config(dest, SERVER_FILE)
    unbounded = unbounded_tasks(server_config)
    if unbounded:
        values = ", ".join(f"{name}={server_config[name]!r}" for name in unbounded)
        raise FedXViTError(
            f"{dest / SERVER_FILE} (a copy of {source}): {values}: a task limit must be a positive number of "
            "seconds (0 lets one hung site stall a run that waits for its sites)"
        )
    return dest


if __name__ == "__main__":
    from fedxvit.errors import run_cli

    run_cli(main)
