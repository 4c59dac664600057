"""Jobs in NVFlare's real POC deployment (server + 3 client processes over the network), on ONE POC
system, which the slow tests below share in file order: one drill job run in a privacy scope that every site
defines in its own privacy.json (a hospital killed mid-run, min_clients = 2 of 3 letting the other two go on;
then the server killed and restarted, the training resuming after the last finished round with the hospital
back), and the stop. The HE job runs in the provisioned system (test_provisioned.py).
The suite's only POC system, on one worker (conftest.SHARED_RUN_FILES), on a free port. The fast tests
check that the driver never deletes a folder it did not create and kills only the processes it started."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tiny import SITES, free_port, system_env, tiny_job

from fedxvit.errors import FedXViTError
from fedxvit.site_policy import write_privacy
from tooling.poc import (
    MARKER,
    RESUME_MODEL_FILE,
    PocSystem,
    ProcessTrees,
    alive,
    claim_workspace,
    continuation_job,
    main,
    site_dir,
    validate,
)

JOB_TIMEOUT_S = 400
# Cross-site evaluation waits out these timeouts for a dead site; tiny models submit and score in a second or two
DRILL_SETTINGS = dict(num_rounds=4, wait_time_after_min_received=5, submit_model_timeout=6, validation_timeout=12)
# Every site's local/privacy.json defines this scope (the classifier head and the local model never leave), not as
# its default: the drill's job names it.
PRIVACY_SCOPE = "no-head-no-local-model"
SCOPE_FILTERS = [
    {"path": "nvflare.app_common.filters.exclude_vars.ExcludeVars", "args": {"exclude_vars": "^head\\."}},
    {"path": "fedxvit.site_policy.KeepLocalModel", "args": {}},
]


@pytest.fixture(scope="module")
def poc(plain_fedavg_run, tmp_path_factory):
    """The one POC system of this file, on the plain run's sites and initial model; the shared tmp folder."""
    tmp = tmp_path_factory.mktemp("poc")
    env = system_env(plain_fedavg_run, tmp)
    with PocSystem(tmp / "poc", SITES, free_port(), env=env, before_start=privacy_scopes) as system:
        yield {"system": system, "tmp": tmp}


def privacy_scopes(system: PocSystem):
    for site in SITES:
        write_privacy(system.site_dir(site) / "local", SCOPE_FILTERS, scope=PRIVACY_SCOPE, default=False)


def drill_job(tmp: Path, name: str, **settings) -> Path:
    """A tiny job (default: DRILL_SETTINGS) without the MLflow tracker: the drills are about the run, not its
    tracking (tested in test_tracking.py), and registering the model at the end of a run costs tens of seconds on
    a busy machine."""
    (tmp / name).mkdir()
    job = tiny_job(tmp / name, **(settings or DRILL_SETTINGS))
    server = job / "app" / "config" / "config_fed_server.json"
    config = json.loads(server.read_text())
    config["components"] = [c for c in config["components"] if c["id"] != "mlflow_receiver"]
    server.write_text(json.dumps(config, indent=2))
    return job


@pytest.mark.slow
def test_a_hospital_then_the_server_die_and_the_training_resumes_in_the_sites_privacy_scope(poc, plain_fedavg_run):
    """One drill job, plain FedAvg with no privacy filter of its own, run in the privacy scope every site defines
    in its own privacy.json: site3 is killed once round 1 has started (min_clients = 2 lets the other two go on),
    the server once round 2 has finished; both are restarted with their startup scripts, and the training resumes
    at round 3 with site3 back. NVFlare applies the sites' filters to every result of both jobs, so the global
    head never moves while the rest of the trainable model does, and cross-site evaluation scores the server's
    models only."""
    system, tmp = poc["system"], poc["tmp"]
    job = drill_job(tmp, "drill")
    client = json.loads((job / "app" / "config" / "config_fed_client.json").read_text())
    assert not [f for chain in client["task_result_filters"] for f in chain["filters"] if "nvflare" in f["path"]]
    meta = json.loads((job / "meta.json").read_text())
    (job / "meta.json").write_text(json.dumps({**meta, "scope": PRIVACY_SCOPE}, indent=2))

    drill = system.server_crash_drill(
        job, 2, tmp / "drill-results", 5, JOB_TIMEOUT_S, min_clients=2, kill_site="site3", kill_site_after_round=1
    )
    killed_job, resumed_job = drill["job_id"], drill["resumed_job_id"]
    assert drill["killed_site_processes"] > 0 and drill["killed_processes"] >= 1
    # NVFlare 2.9.0 writes no run snapshots and brings no job back after a server restart (see tooling.poc)
    assert not drill["nvflare_restored"] and drill["snapshot_files"] == 0, drill
    assert resumed_job != killed_job and drill["status"] == "FINISHED:COMPLETED", drill

    # the hospital: all three trained before the kill, two after it; back for the resumed rounds
    killed_run = system.site_dir("server") / killed_job
    killed_rows = json.loads((killed_run / "global_val.json").read_text())["rounds"]
    assert [row["round"] for row in killed_rows] == [0, 1, 2]
    assert sorted(killed_rows[0]["sites"]) == list(SITES) and sorted(killed_rows[2]["sites"]) == ["site1", "site2"]

    # the server: the resumed job ran only the round the crash left, from the killed run's round-2 model
    resumed_run = drill["result_dir"] / "workspace"
    log = (resumed_run / "log.txt").read_text()
    assert re.findall(r"Round (\d+) started", log) == ["3"] and drill["resumed_at_round"] == 3
    assert "Loading checkpoint from " in log and RESUME_MODEL_FILE in log
    rows = json.loads((resumed_run / "global_val.json").read_text())["rounds"]
    assert [row["round"] for row in rows] == [0, 1, 2, 3]  # every round exactly once
    assert rows[:3] == killed_rows  # carried, not redone
    assert sorted(rows[3]["sites"]) == list(SITES)
    round_two = torch.load(killed_run / "app_server" / "FL_global_model.pt", weights_only=True)["model"]
    final = torch.load(resumed_run / "app_server" / "FL_global_model.pt", weights_only=True)["model"]
    assert final.keys() == round_two.keys() and all(torch.isfinite(t).all() for t in final.values())
    assert any(not torch.equal(final[name], round_two[name]) for name in final)  # round 3 trained on from round 2

    # the sites' privacy scope: last-k trained blocks and norm moved, the head stayed at the sites
    start = torch.load(plain_fedavg_run["initial"], weights_only=True)
    moved = {k.split(".")[0] for k in start if not torch.equal(torch.as_tensor(final[k]), start[k])}
    assert moved == {"blocks", "norm"}
    cross_site = json.loads((resumed_run / "cross_site_val" / "cross_val_results.json").read_text())
    assert set(cross_site) == set(SITES)
    assert all(name.startswith("SRV_") for scores in cross_site.values() for name in scores), cross_site


@pytest.mark.slow
def test_poc_stop_ends_what_it_started_and_nothing_else(poc):
    system = poc["system"]
    assert (system.workspace / MARKER).is_file()  # `poc prepare --force` replaced the workspace: marked again
    claim_workspace(system.workspace)  # so a later run may use it again
    started = [proc for name in ("server", *SITES) for proc in system.processes.tree(name)]
    assert len(started) >= 8  # a daemon and a participant process each, at least
    bystander = sleeper(system.site_dir("server"))  # a user's process in the workspace, naming it
    try:
        system.stop()
        assert not [proc.pid for proc in started if alive(proc)]
        assert bystander.poll() is None, "stop killed a process it did not start"
        leftovers = subprocess.run(["pgrep", "-f", str(system.workspace)], capture_output=True, text=True).stdout
        assert leftovers.split() == [str(bystander.pid)], f"POC processes left running: {leftovers}"
    finally:
        bystander.kill()
        bystander.wait()


def sleeper(cwd: Path) -> subprocess.Popen:
    """A process whose working directory and arguments lie in `cwd`, as a user's own might."""
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)", str(cwd)], cwd=cwd)


def test_an_existing_folder_it_did_not_create_is_refused_and_kept(tmp_path):
    job = tiny_job(tmp_path)
    for folder in (tmp_path / "mine", tmp_path / "empty"):
        folder.mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("a user's file")
    for folder in (tmp_path / "mine", tmp_path / "empty"):
        with pytest.raises(FedXViTError, match=rf"^POC workspace {re.escape(str(folder))} exists and was not created"):
            main(["--job", str(job), "--workspace", str(folder), "--out", str(tmp_path / "out")])
        assert not (folder / MARKER).exists()
    assert (tmp_path / "mine" / "notes.txt").read_text() == "a user's file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "job", "mine"]  # nothing else was made


def test_a_workspace_it_created_is_reused(tmp_path):
    workspace = tmp_path / "new" / "poc"
    claim_workspace(workspace)  # a new folder: created and marked
    assert (workspace / MARKER).is_file()
    (workspace / "project.yml").write_text("what `nvflare poc prepare` left")
    claim_workspace(workspace)  # its own: accepted (prepare may replace it)
    assert (workspace / "project.yml").is_file()


def fake_daemon(kit: Path) -> subprocess.Popen:
    """A participant's daemon as NVFlare's sub_start.sh runs: it writes its id to <kit>/daemon_pid.fl and
    runs a child, which runs a grandchild."""
    script = kit / "startup" / "sub_start.sh"
    script.parent.mkdir(parents=True)
    script.write_text(
        '#!/usr/bin/env bash\necho $BASHPID > "$(dirname "$0")/../daemon_pid.fl"\nbash -c "sleep 300; :" &\nwait\n'
    )
    script.chmod(0o755)
    return subprocess.Popen([str(script)], cwd=kit, start_new_session=True)


def test_stop_kills_the_process_trees_it_recorded_and_spares_others_in_the_workspace(tmp_path):
    workspace = tmp_path / "poc"
    claim_workspace(workspace)
    kit = site_dir(workspace, "site1")
    daemon = fake_daemon(kit)
    bystander = sleeper(kit)  # not started by the driver, though its cwd and arguments lie in the workspace
    try:
        trees = ProcessTrees()
        assert trees.record("site1", kit, timeout_s=30).pid == daemon.pid
        deadline = time.monotonic() + 30
        while len(tree := trees.tree("site1")) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(tree) == 3  # the daemon, its child and its grandchild
        assert trees.kill() == 3
        assert not [proc.pid for proc in tree if alive(proc)]
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()
        try:
            os.killpg(daemon.pid, signal.SIGKILL)  # the fake daemon's group, should the test fail
        except ProcessLookupError:
            pass
        daemon.wait()


def test_a_daemon_id_that_names_another_process_is_not_recorded(tmp_path):
    kit = tmp_path / "site1"
    kit.mkdir()
    other = sleeper(kit)
    (kit / "daemon_pid.fl").write_text(f"{other.pid}\n")  # a stale file whose id was reused
    try:
        with pytest.raises(FedXViTError, match=r"no live NVFlare daemon of site1 in .*daemon_pid.fl"):
            ProcessTrees().record("site1", kit, timeout_s=0)
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()


def write_killed_run(run_dir: Path, rounds: list[int]) -> None:
    (run_dir / "app_server").mkdir(parents=True)
    (run_dir / "app_server" / "FL_global_model.pt").write_bytes(b"round model")
    (run_dir / "global_val.json").write_text(
        json.dumps({"rounds": [{"round": r, "global_val_accuracy": r / 10} for r in rounds]})
    )


def test_continuation_job_trains_the_remaining_rounds_from_the_saved_model(tmp_path):
    job = tiny_job(tmp_path, num_rounds=5)
    write_killed_run(tmp_path / "run", rounds=[0, 1, 2])  # round 2's row exists, but resume at 2 redoes it
    copy = continuation_job(job, tmp_path / "run", start_round=2, into=tmp_path / "out")

    config = json.loads((copy / "app" / "config" / "config_fed_server.json").read_text())
    workflow = next(w for w in config["workflows"] if w["id"] == "scatter_and_gather")["args"]
    assert (workflow["start_round"], workflow["num_rounds"]) == (2, 3)  # rounds 2, 3, 4 of 5
    components = {c["id"]: c["args"] for c in config["components"]}
    model = Path(components["persistor"]["source_ckpt_file_full_name"])
    assert model.is_absolute() and model.read_bytes() == b"round model"
    assert [row["round"] for row in components["global_validation"]["earlier_rounds"]] == [0, 1]
    assert components["mlflow_receiver"]["continue_job"] == "run"  # the killed job's id: its runs go on
    original = json.loads((job / "app" / "config" / "config_fed_server.json").read_text())
    assert original["workflows"][0]["args"]["start_round"] == 0  # the job itself is untouched


def test_continuation_job_needs_the_killed_runs_global_model(tmp_path):
    with pytest.raises(FedXViTError, match="no global model"):
        continuation_job(tiny_job(tmp_path), tmp_path / "missing-run", start_round=1, into=tmp_path / "out")


def test_server_kill_round_must_leave_a_round_to_resume(tmp_path):
    job = tiny_job(tmp_path, num_rounds=3)
    validate(job, ("site1",), None, 1)
    with pytest.raises(FedXViTError, match=r"--kill-server-after-round 2: .* rounds 0\.\.2"):
        validate(job, ("site1",), None, 2)
    with pytest.raises(FedXViTError, match="the site is killed first, then the server"):
        validate(job, ("site1",), "site1", 0, kill_after_round=1)
    validate(job, ("site1",), "site1", 1, kill_after_round=1)  # killed in round 1, the server after it
