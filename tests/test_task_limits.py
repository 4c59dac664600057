"""A hung site cannot stall a run: every task of every shipped job, and of every copy fedxvit runs (the
comparison's and the gap check's, which require every site), is bounded by a job variable above 0.
The simulator run with a hung site is in test_faults.py. A run whose site never started is run again."""

import json

import pytest
from tiny import REPO

from fedxvit.errors import FedXViTError
from tooling.jobconfig import SERVER_FILE, TASK_LIMITS, job_copy, unbounded_tasks

JOBS = sorted(path for path in (REPO / "jobs").iterdir() if (path / SERVER_FILE).is_file())


@pytest.mark.parametrize("job", JOBS, ids=lambda path: path.name)
def test_every_shipped_job_bounds_every_task_it_waits_for(job):
    config = json.loads((job / SERVER_FILE).read_text())
    assert unbounded_tasks(config) == []
    workflows = {workflow["id"]: workflow["args"] for workflow in config["workflows"]}
    if "fed_stats_controller" in workflows:  # NVFlare's StatisticsController has no task limit: a site that has
        # not answered is left out this long after min_clients did (docs/data.md#know-the-data-before-training)
        limits = ("wait_time_after_min_received", "result_wait_timeout")
        assert all(workflows["fed_stats_controller"][limit] == "{" + limit + "}" for limit in limits)
        assert all(isinstance(config[limit], int) and config[limit] > 0 for limit in limits)
        return
    if "flower_controller" in workflows:  # the Flower job: Flower's own rounds wait round_timeout for the sites
        run_config = workflows["flower_controller"]["run_config"]
        assert run_config["round-timeout"] == "{round_timeout}" and config["round_timeout"] > 0
        return
    waits_for = {"cross_site_model_eval": ("submit_model_timeout", "validation_timeout")}
    if "global_model_eval" in workflows:  # the evaluation job: the server's models only, no submit_model task
        waits_for = {"global_model_eval": ("validation_timeout",)}
    if "scatter_and_gather" in workflows:  # the cyclic job's relay has no result limit (docs/federated-jobs.md)
        waits_for["scatter_and_gather"] = ("train_timeout",)
    for workflow, limits in waits_for.items():
        for limit in limits:
            assert workflows[workflow][limit] == "{" + limit + "}", (workflow, limit)
            assert isinstance(config[limit], int) and config[limit] > 0, (limit, config[limit])


def test_a_job_copy_that_would_wait_for_ever_is_refused(tmp_path):
    from data_preparation.federated_gap import federated_job

    base = REPO / "jobs" / "fedxvit"
    shipped = json.loads((base / SERVER_FILE).read_text())
    copy = json.loads((federated_job(base, tmp_path / "gap", min_clients=6) / SERVER_FILE).read_text())
    assert copy["min_clients"] == 6 and all(copy[limit] == shipped[limit] > 0 for limit in TASK_LIMITS)
    for value in (0, -5, "600", None):
        with pytest.raises(FedXViTError, match=rf"train_timeout={value!r}: a task limit must be a positive number"):
            job_copy(base, tmp_path / "copy", server={"train_timeout": value})
    assert unbounded_tasks({"train_timeout": 60, "validation_timeout": True, "other": 0}) == ["validation_timeout"]


def test_task_times_reads_rounds_cross_site_and_tasks_from_a_server_log():
    import sys

    sys.path.insert(0, str(REPO / "bench"))
    from task_times import task_times

    prefix = "2026-12-02 18:34:{:06.3f} - X - INFO - [identity=simulator_server] - ".format
    lines = [
        prefix(0).replace(".", ",") + "Round 0 started.",
        prefix(1).replace(".", ",") + "assigned task to client site1: name=train, id=a1",
        prefix(2).replace(".", ",") + "assigned task to client site2: name=train, id=a2",
        prefix(5.5).replace(".", ",") + "got result from client site2 for task: name=train, id=a2",
        prefix(9).replace(".", ",") + "got result from client site1 for task: name=train, id=a1",
        prefix(10).replace(".", ",") + "Round 0 finished.",
        prefix(11).replace(".", ",") + "Workflow cross_site_model_eval (<class 'x'>) started",
        prefix(30).replace(".", ",") + "Workflow: cross_site_model_eval finalizing ...",
    ]
    assert task_times(lines) == {
        "round_s": {0: 10.0},
        "cross_site_s": 19.0,
        "task_s": {"train": [["site1", 8.0], ["site2", 3.5]]},
    }


def test_a_run_whose_site_lost_its_port_at_start_up_is_started_again_then_given_up(tmp_path, monkeypatch, capsys):
    """NVFlare's simulator frees a worker's port before the worker binds it; a run that lost a site that way is
    run again (a dead site would otherwise leave the run without it, or stall it until its task limits)."""
    from tooling import simulation

    workspace = tmp_path / "workspace"
    attempts = []

    def simulate_once(job, workspace, *args):
        attempts.append(job)
        (workspace / "site2").mkdir(parents=True, exist_ok=True)
        log = workspace / "site2" / "log.txt"  # what NVFlare's worker writes when its port was taken
        log.write_text("OSError: [Errno 98] Address already in use\n" if len(attempts) < lose else "ok\n")
        (workspace / "server" / "simulate_job" / "app_server").mkdir(parents=True, exist_ok=True)
        (workspace / "server" / "simulate_job" / simulation.GLOBAL_MODEL).write_bytes(b"model")
        (workspace / simulation.SIMULATOR_LOG).write_text("")
        return 0, simulation.port_race_victims(workspace, ["site1", "site2"])

    monkeypatch.setattr(simulation, "simulate_once", simulate_once)
    lose = 2  # the first attempt loses site2's port, the second does not
    run_dir = simulation.run_simulator(tmp_path / "job", workspace, tmp_path, ["site1", "site2"], tmp_path / "m.pt")
    assert len(attempts) == 2 and run_dir == workspace / "server" / "simulate_job"
    assert "attempt 1: the worker of site2 lost its port" in capsys.readouterr().err

    attempts.clear()
    lose = simulation.START_ATTEMPTS + 1  # every attempt loses it
    with pytest.raises(FedXViTError, match=f"gave up after {simulation.START_ATTEMPTS} attempts"):
        simulation.run_simulator(tmp_path / "job", workspace, tmp_path, ["site1", "site2"], tmp_path / "m.pt")
    assert len(attempts) == simulation.START_ATTEMPTS
