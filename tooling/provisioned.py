"""The production path, rehearsed on one machine: a system provisioned from a project.yml, started from its kits.

    python -m tooling.provisioned --workspace /tmp/fedxvit-prod [--project deploy/project.yml] [--job jobs/fedxvit]
        [--sites site1 site2 site3] [--port 8002] [--out workspace/provisioned]

A real consortium runs `nvflare provision -p deploy/project.yml` once and hands each participant its startup kit
(docs/deployment.md). This does the same on this machine: `nvflare provision` in a workspace it creates, every
participant's local/resources.json allowing fedxvit's classes, `nvflare preflight-check` on every kit (the server's
before it starts, a hospital's and the admin's once the server is up), each participant started with its own
`startup/start.sh` as its operator would, the job submitted, waited for and downloaded through the Flare API as the
project's admin, and the system shut down with the admin's `shutdown all`. The rehearsal's copy of the project
names the server `localhost` (the FQDN a real deployment uses need not resolve here), serves on `--port`, and with
`--sites` names the hospitals after this machine's data folders; a job with NVFlare's HE components gets the
project's HEBuilder. Drills and the rest of the system's handling are tooling.poc's PocSystem: only preparing,
starting, stopping and the participants' names differ. It never deletes or kills what it did not create or start.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fedxvit.errors import FedXViTError, run_cli
from fedxvit.site_policy import allow_classes
from tooling.jobconfig import DEFAULT_JOB
from tooling.poc import START_TIMEOUT_S, PocSystem, claim_workspace, nvflare, registered, round_rows, uses_he

DEFAULT_PROJECT = Path("deploy") / "project.yml"
HE_BUILDER = "nvflare.lighter.impl.he.HEBuilder"
SIGNATURE_BUILDER = "nvflare.lighter.impl.signature.SignatureBuilder"


def read_project(path: Path) -> dict:
    """The project.yml as a dict, with one server, at least one client and a project_admin; one line otherwise."""
    import yaml

    try:
        project = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        detail = " ".join(str(exc).split())  # YAML's messages span lines
        raise FedXViTError(f"{path}: cannot read the project file ({type(exc).__name__}: {detail})") from None
    participants = project.get("participants") if isinstance(project, dict) else None
    if not isinstance(participants, list) or not all(isinstance(p, dict) for p in participants):
        raise FedXViTError(f"{path}: not an NVFlare project file (no list of participants)")
    kinds = {kind: [p for p in participants if p.get("type") == kind] for kind in ("server", "client", "admin")}
    admins = [p for p in kinds["admin"] if p.get("role") == "project_admin"]
    if len(kinds["server"]) != 1 or not kinds["client"] or len(admins) != 1:
        raise FedXViTError(
            f"{path}: a project needs one server, at least one client and one project_admin "
            f"(found {len(kinds['server'])}, {len(kinds['client'])}, {len(admins)})"
        )
    return project


def participants(project: dict) -> tuple[dict, list[str], str]:
    """(the server's entry, the client names, the project admin's name) of a project read by read_project."""
    entries = project["participants"]
    server = next(p for p in entries if p["type"] == "server")
    clients = [p["name"] for p in entries if p["type"] == "client"]
    admin = next(p["name"] for p in entries if p["type"] == "admin" and p.get("role") == "project_admin")
    return server, clients, admin


def rehearsal_project(project: dict, port: int, sites=None, he: bool = False) -> dict:
    """A copy of the project for one machine: the server named `localhost` on `port`, the clients renamed to
    `sites` (each keeps the first client's org when there are more sites than clients), the HEBuilder added
    before the signature when `he`."""
    import copy

    rehearsal = copy.deepcopy(project)
    entries = rehearsal["participants"]
    server = next(p for p in entries if p["type"] == "server")
    server.update(name="localhost", fed_learn_port=port, admin_port=port)
    if sites:
        clients = [p for p in entries if p["type"] == "client"]
        template = clients[0]
        renamed = [{**(clients[i] if i < len(clients) else template), "name": site} for i, site in enumerate(sites)]
        others = [p for p in entries if p["type"] != "client"]
        rehearsal["participants"] = [others[0], *renamed, *others[1:]]
    builders = rehearsal.setdefault("builders", [])
    if he and not any(b.get("path") == HE_BUILDER for b in builders):
        at = next((i for i, b in enumerate(builders) if b.get("path") == SIGNATURE_BUILDER), len(builders))
        builders.insert(at, {"path": HE_BUILDER, "args": {}})
    return rehearsal


class ProvisionedSystem(PocSystem):
    """One provisioned system in a workspace of its own, started participant by participant from the startup kits
    `nvflare provision` wrote for `project` (a dict, see rehearsal_project); jobs, drills and waits as PocSystem's."""

    def __init__(
        self,
        workspace: Path,
        project: dict,
        env: dict | None = None,
        start_timeout_s: float = START_TIMEOUT_S,
        before_start=None,
    ):
        server, clients, admin = participants(project)
        has_he = any(b.get("path") == HE_BUILDER for b in project.get("builders", []))
        super().__init__(workspace, clients, int(server["fed_learn_port"]), has_he, env, start_timeout_s, before_start)
        self.project = project
        self.server, self.admin = server["name"], admin
        self.kits = None  # <workspace>/<project name>/prod_NN, once provisioned
        self.preflight: dict = {}  # participant -> the last line of its `nvflare preflight-check`

    def start(self) -> None:
        """Provision, allow fedxvit's classes, check and start the server, then check and start every site."""
        import yaml

        claim_workspace(self.workspace)
        self._tmp = tempfile.TemporaryDirectory(prefix="fedxvit-provisioned-")
        project_file = Path(self._tmp.name) / "project.yml"
        project_file.write_text(yaml.safe_dump(self.project, sort_keys=False))
        print(f"provisioning {self.project['name']} in {self.workspace}: {self.server}, {', '.join(self.sites)}")
        with tempfile.TemporaryDirectory(prefix="fedxvit-provision-home-") as home:
            nvflare(["provision", "-p", str(project_file), "-w", str(self.workspace)], self.workspace, home=Path(home))
        rounds = sorted((self.workspace / self.project["name"]).glob("prod_*"), key=lambda p: int(p.name[5:]))
        self.kits = rounds[-1]  # provisioning again in the same workspace writes prod_01, prod_02, ...
        for name in (self.server, *self.sites):
            allow_classes(self.site_dir(name) / "local")
        from fedxvit.flower_server import install_app  # jobs/fedxvit_flower's pre-deployed Flower app

        install_app(self.site_dir(self.server) / "local")
        if self.before_start is not None:
            self.before_start(self)
        self.started = True
        try:
            self.check(self.server)
            self.restart(self.server, self.start_timeout_s)
            with ThreadPoolExecutor(len(self.sites) + 1) as pool:  # each kit's check waits on the server's answer
                list(pool.map(self.check, (*self.sites, self.admin)))
            offset = (self.site_dir(self.server) / "log.txt").stat().st_size
            for site in self.sites:
                self.launch(site)
            self.wait_for_server_log([registered(site) for site in self.sites], offset, self.start_timeout_s)
            checks = ", ".join(f"{name} {line.removeprefix('overall: ')}" for name, line in self.preflight.items())
            print(f"nvflare preflight-check: {checks}; {', '.join(self.sites)} registered", flush=True)
        except FedXViTError:
            self.record_daemons(wait_s=0)
            raise

    def check(self, name: str) -> None:
        """`nvflare preflight-check` on one participant's kit (the server's: its ports are free and it starts; a
        site's and the admin's: the server answers); one line naming the participant when it fails."""
        try:
            output = nvflare(["preflight-check", "-p", str(self.site_dir(name))], self.workspace, 120, env=self.env)
        except FedXViTError as exc:
            raise FedXViTError(f"preflight check of {name} failed: {exc}") from None
        self.preflight[name] = output.strip().splitlines()[-1] if output.strip() else ""

    def stop(self) -> None:
        """The admin's `shutdown all`, then SIGKILL whatever of the recorded process trees still runs. Safe to call
        twice."""
        if self.started:
            self.started = False
            self.processes.refresh()
            if self.processes.tree(self.server):  # a server that never came up has nobody to log in to
                try:
                    with self.session(timeout_s=30) as session:
                        session.shutdown("all", wait=False)  # the wait below watches the processes themselves
                except Exception as exc:  # a server that died in a drill: the kill below ends what is left
                    print(f"warning: shutdown all: {type(exc).__name__}: {exc}", flush=True)
            deadline = time.monotonic() + 20
            while any(self.processes.tree(name) for name in (self.server, *self.sites)) and time.monotonic() < deadline:
                time.sleep(0.5)
            leftovers = self.processes.kill()
            if leftovers:
                print(f"killed {leftovers} leftover process(es) this driver started", flush=True)
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tooling.provisioned",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--project", default=str(DEFAULT_PROJECT), help="NVFlare project file")
    parser.add_argument(
        "--workspace", required=True, help="a new folder (or one this driver created) for the startup kits"
    )
    parser.add_argument("--job", default=str(DEFAULT_JOB), help="NVFlare job folder")
    parser.add_argument("--sites", nargs="+", default=None, help="name the hospitals so (default: the project's)")
    parser.add_argument("--port", type=int, default=8002, help="the server's port")
    parser.add_argument("--out", default="workspace/provisioned", help="where the job's results are downloaded")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds to wait for the job")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    job = Path(args.job)
    if not (job / "meta.json").is_file():
        raise FedXViTError(f"--job {job}: not an NVFlare job folder (no meta.json)")
    project = rehearsal_project(read_project(Path(args.project)), args.port, args.sites, he=uses_he(job))
    started = time.perf_counter()
    with ProvisionedSystem(Path(args.workspace), project, env=dict(os.environ)) as system:
        result = system.run_job(job, Path(args.out), args.timeout)
    for row in round_rows(result["result_dir"]):
        print(f"  round {row['round']}: global_val_accuracy={row['global_val_accuracy']:.4f} from {row['sites']}")
    print(f"job {result['job_id']}: {result['status']}, results in {result['result_dir']}")
    print(f"{time.perf_counter() - started:.0f} s from provisioning to shut-down")
    if result["status"] != "FINISHED:COMPLETED":
        raise FedXViTError(f"job {result['job_id']} ended {result['status']}; logs under {result['result_dir']}")
    return {**result, "preflight": system.preflight, "wall_s": time.perf_counter() - started}


if __name__ == "__main__":
    run_cli(main)
