"""The generated algorithm jobs: up to date with their one source, and each one running in NVFlare's real
simulator (tiny preset and data, 2 rounds) with its mechanism visible in the run.

One simulator run per server: FedProx's proximal term at its site and Ditto's personalized model kept and tracked at
its site (one run: their servers agree), FedOpt's server SGD step every round, SCAFFOLD's control variates combined
at the server every round, and the cyclic relay visiting the sites
in the same order every round, passing the model on, and going on past a site whose update is NaN.
"""

import json
import re
from pathlib import Path

import pytest
import torch
from tiny import REPO, SITES, simulate, site_apps_job, tiny_job, tiny_sites_and_initial_model

from fedxvit.algorithms import PERSONALIZED_MODEL
from fedxvit.methods import BASE_JOB, JOBS, METHODS
from fedxvit.tracking import FEDERATED_EXPERIMENT, ROLE_TAG, SITE_TAG
from result_stat.comparison import plan
from tooling.jobconfig import CLIENT_FILE, SERVER_FILE
from tooling.jobs import ALGORITHM_CHANGES, ALGORITHM_JOBS, PRIVACY_CHANGES, differences, render_jobs

JOBS_DIR = REPO / "jobs"


def test_committed_algorithm_jobs_are_what_the_generator_writes():
    assert differences(JOBS_DIR) == [], "run `make jobs` (python -m tooling.jobs) and commit jobs/"
    assert all(not str(path).startswith(f"{BASE_JOB}/") for path in render_jobs(JOBS_DIR)), (
        "jobs/fedxvit is never written"
    )


def test_the_registry_defines_the_generated_jobs_and_their_sites_strategy():
    assert set(ALGORITHM_CHANGES) | set(PRIVACY_CHANGES) == set(JOBS) - {BASE_JOB}, "a change for every registry job"
    for path, text in render_jobs(JOBS_DIR).items():
        if path.name == Path(CLIENT_FILE).name:
            executor = json.loads(text)["executors"][0]["executor"]["args"]
            assert executor["algorithm"] == JOBS[path.parts[0]].site_strategy, path
    assert {m.job for m in METHODS.values()} <= set(JOBS)
    assert list(plan.METHOD_JOBS) == [name for name, m in METHODS.items() if m.comparison == "federated"]


def test_a_common_setting_changed_once_reaches_every_algorithm_job(tmp_path):
    jobs = tmp_path / "jobs"
    (jobs / BASE_JOB).mkdir(parents=True)
    for source in (JOBS_DIR / BASE_JOB).rglob("*"):
        if source.is_file():
            target = jobs / BASE_JOB / source.relative_to(JOBS_DIR / BASE_JOB)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(source.read_text())
    for name, value in ((SERVER_FILE, 7), (CLIENT_FILE, 2)):  # num_rounds on the server, local_epochs at the sites
        config = json.loads((jobs / BASE_JOB / name).read_text())
        config["num_rounds" if name == SERVER_FILE else "local_epochs"] = value
        (jobs / BASE_JOB / name).write_text(json.dumps(config))
    files = render_jobs(jobs)
    for job in ALGORITHM_JOBS:
        assert json.loads(files[Path(job) / SERVER_FILE])["num_rounds"] == 7, job
        assert json.loads(files[Path(job) / CLIENT_FILE])["local_epochs"] == 2, job


# ---- the simulator runs
# FedProx and Ditto change only the sites (their server configs agree but for the tracked algorithm name), so one
# run serves both: NVFlare's deploy_map gives site1 FedProx's client app and site2 Ditto's.
SHARED_SERVER_JOBS = {"site1": "fedxvit_fedprox", "site2": "fedxvit_ditto"}
EXPECTED = {  # run: (sites, the sites' executor, faults)
    "fedprox+ditto": (SITES[:2], None, {}),
    "fedxvit_fedopt": (SITES[:2], None, {}),
    "fedxvit_scaffold": (SITES[:2], None, {}),
    "fedxvit_cyclic": (SITES, "faulty_executor.FaultyExecutor", {"site3": "nan"}),
}
JOBS_BY_RUN = [name for name in EXPECTED if name.startswith("fedxvit_")]
TURN = re.compile(r"fedxvit (site\d) round (\d): global val_acc=\S+ val_loss=(\S+) -> .*; (.*)$", re.M)


def test_every_algorithm_job_is_run():
    assert {*JOBS_BY_RUN, *SHARED_SERVER_JOBS.values()} == set(ALGORITHM_JOBS) - {"fedxvit_fedsm", "fedxvit_fedmas"}


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    root = tmp_path_factory.mktemp("algorithms")
    return root, tiny_sites_and_initial_model(root)


def simulate_job(root: Path, initial: Path, job_name: str):
    sites, executor_path, faults = EXPECTED[job_name]
    if job_name in JOBS_BY_RUN:
        job = tiny_job(root / job_name, JOBS_DIR / job_name)
    else:
        first = JOBS_DIR / next(iter(SHARED_SERVER_JOBS.values()))
        apps = {site: JOBS_DIR / name for site, name in SHARED_SERVER_JOBS.items()}
        job = site_apps_job(root / job_name / "job", first, apps)
    if executor_path:
        client_config = job / "app" / "config" / "config_fed_client.json"
        config = json.loads(client_config.read_text())
        config["executors"][0]["executor"]["path"] = executor_path
        config["executors"][0]["executor"]["args"]["faults"] = faults
        client_config.write_text(json.dumps(config))
    store = f"sqlite:///{root / job_name / 'mlflow.db'}"
    run_dir, log = simulate(job, root / job_name / "workspace", root / "data", initial, sites, store)
    return run_dir, log, store


@pytest.mark.slow
@pytest.mark.parametrize("job_name", list(EXPECTED))
def test_algorithm_job_runs_in_the_simulator_with_its_mechanism_active(federation, job_name):
    root, initial = federation
    run_dir, log, store = simulate_job(root, initial, job_name)
    sites = EXPECTED[job_name][0]
    turns = [(int(r), site, float(loss), note) for site, r, loss, note in TURN.findall(log)]
    assert sorted((r, site) for r, site, _, _ in turns) == sorted((r, s) for r in (0, 1) for s in sites), log[-4000:]

    # every job: a finite global model that moved in the trainable tensors only, cross-site evaluation, tracking
    start = torch.load(initial, weights_only=True)
    final = torch.load(run_dir / "app_server" / "FL_global_model.pt", weights_only=True)["model"]
    assert all(torch.isfinite(torch.as_tensor(v)).all() for v in final.values())
    changed = [k for k in start if not torch.equal(torch.as_tensor(final[k]), start[k])]
    assert changed and all(k.startswith(("blocks.", "norm.", "head.")) for k in changed), changed
    cross_site = json.loads((run_dir / "cross_site_val" / "cross_val_results.json").read_text())
    assert set(cross_site) == set(sites) and all("SRV_FL_global_model.pt" in cross_site[s] for s in sites)
    server_job = job_name if job_name in JOBS_BY_RUN else next(iter(SHARED_SERVER_JOBS.values()))
    assert server_params(store)["algorithm"] == server_job.split("_")[1]

    if job_name != "fedxvit_cyclic":
        rounds = json.loads((run_dir / "global_val.json").read_text())["rounds"]
        assert [r["aggregated_sites"] for r in rounds] == [list(sites)] * 2
    if job_name == "fedprox+ditto":
        fedprox = [turn for turn in turns if turn[1] == "site1"]
        terms = [float(re.search(r"last proximal term (\S+)$", note).group(1)) for _, _, _, note in fedprox]
        assert all(note.startswith("fedprox mu=0.01,") for _, _, _, note in fedprox) and all(t > 0 for t in terms)
        check_ditto([turn for turn in turns if turn[1] == "site2"], run_dir.parents[1], ["site2"], store)
    elif job_name == "fedxvit_fedopt":
        steps = re.findall(
            r"FedOpt \(torch\.optim\.SGD, \w+\) server model update round (\d).* lr: 1\.0, "
            r"fedopt layers: (\d+)",
            log,
        )
        sent = {int(n) for n in re.findall(r"(\d+) tensors sent", log)}
        assert [r for r, _ in steps] == ["0", "1"] and {int(n) for _, n in steps} == sent, (steps, sent)
    elif job_name == "fedxvit_scaffold":
        sent = [float(re.search(r"control-variate change norm (\S+) sent", note).group(1)) for _, _, _, note in turns]
        combined = re.findall(
            r"round (\d): SCAFFOLD control variates of site1, site2 combined; "
            r"global control change norm (\S+)",
            log,
        )
        assert all(norm > 0 for norm in sent) and [r for r, _ in combined] == ["0", "1"]
        assert all(float(norm) > 0 for _, norm in combined)
    else:
        check_cyclic(turns, cross_site, log)


def check_ditto(turns: list, workspace: Path, sites, store: str) -> None:
    assert all(re.match(r"ditto lambda=0\.1: personalized model val_acc=\d", note) for _, _, _, note in turns), turns
    for site in sites:  # each site keeps its personalized model; it never travels
        app = workspace / site / "simulate_job" / f"app_{site}"
        assert (app / PERSONALIZED_MODEL).is_file() and (app / "personalized_model.pt").is_file(), site
    import mlflow

    client = mlflow.MlflowClient(store)
    experiment = client.get_experiment_by_name(FEDERATED_EXPERIMENT)
    site_runs = [r for r in client.search_runs([experiment.experiment_id]) if r.data.tags[ROLE_TAG] == "site"]
    ditto_runs = [r for r in site_runs if r.data.tags.get(SITE_TAG) in sites]
    assert len(ditto_runs) == len(sites) and all("personal_val_accuracy" in r.data.metrics for r in ditto_runs)


def check_cyclic(turns: list, cross_site: dict, log: str) -> None:
    order = [[site for r, site, _, _ in turns if r == round_number] for round_number in (0, 1)]
    assert order[0] == order[1] and sorted(order[0]) == list(SITES), order  # FIXED order: the same relay every round
    # a site scores the model it receives: the initial model until a good site before it has trained
    initial_loss = {site: scores["SRV_initial_global.pt"]["val_loss"] for site, scores in cross_site.items()}
    trained = False
    for site, loss in [(site, loss) for r, site, loss, _ in turns if r == 0]:
        assert (loss != pytest.approx(initial_loss[site], abs=1e-6)) == trained, (site, loss, initial_loss[site])
        trained = trained or site != "site3"
    skipped = re.findall(r"fedxvit: site3's turn changes nothing: rejected by the update filter: \S+: holds NaN", log)
    assert len(skipped) == 2, "site3's NaN update was neither rejected nor passed over in both rounds"


def server_params(store: str) -> dict:
    import mlflow

    client = mlflow.MlflowClient(store)
    experiment = client.get_experiment_by_name(FEDERATED_EXPERIMENT)
    (server,) = [r for r in client.search_runs([experiment.experiment_id]) if r.data.tags[ROLE_TAG] == "server"]
    return server.data.params
