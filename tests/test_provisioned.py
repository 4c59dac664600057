"""The production path on this machine: deploy/project.yml provisioned with `nvflare provision` (plus NVFlare's
HEBuilder), every participant's kit checked with `nvflare preflight-check` and started with its own startup script,
and the HE job submitted through the Flare API as the project's admin (tooling.provisioned). The HE job's model is
compared with conftest.plain_fedavg_run's plain FedAvg on the same sites, initial model, rounds and seeds. The
system shares the POC tests' worker (conftest.SHARED_RUN_FILES): never two systems at once."""

import json
import socket
import time

import pytest
import torch
from tiny import REPO, SITES, free_port, system_env, tiny_job

from fedxvit.checkpoint import encrypted_tensors
from fedxvit.errors import FedXViTError
from fedxvit.filters import UPDATE_SIZES_FILE
from fedxvit.he import decrypt_main
from tooling.poc import uses_he
from tooling.provisioned import HE_BUILDER, ProvisionedSystem, participants, read_project, rehearsal_project

JOB_TIMEOUT_S = 400
TEMPLATE = REPO / "deploy" / "project.yml"


def test_the_template_is_a_consortium_of_one_server_hospitals_and_an_admin():
    project = read_project(TEMPLATE)
    server, clients, admin = participants(project)
    assert "." in server["name"] and server["fed_learn_port"] == server["admin_port"]  # an FQDN, one port
    assert len(clients) >= 2 and admin.count("@") == 1


def test_the_rehearsal_runs_the_project_on_this_machine_under_this_machines_site_names():
    project = read_project(TEMPLATE)
    rehearsal = rehearsal_project(project, 9123, ["site1", "site2", "site3", "site4"], he=True)
    server, clients, admin = participants(rehearsal)
    assert (server["name"], server["fed_learn_port"], server["admin_port"]) == ("localhost", 9123, 9123)
    assert clients == ["site1", "site2", "site3", "site4"] and admin == participants(project)[2]
    paths = [builder["path"] for builder in rehearsal["builders"]]
    assert paths.index(HE_BUILDER) == len(paths) - 2 and paths[-1].endswith("SignatureBuilder")
    assert participants(project)[0]["name"] != "localhost" and HE_BUILDER not in str(project)  # the template kept


@pytest.mark.parametrize(
    "text, expected",
    [
        ("participants: nope", "not an NVFlare project file"),
        (
            "participants:\n  - {name: s, type: server}\n  - {name: a@b.c, type: admin, role: project_admin}",
            "found 1, 0, 1",
        ),
        ("participants: [", "cannot read the project file"),
    ],
)
def test_a_bad_project_file_is_one_line_naming_it(tmp_path, text, expected):
    bad = tmp_path / "project.yml"
    bad.write_text(text)
    with pytest.raises(FedXViTError, match=expected) as error:
        read_project(bad)
    assert str(bad) in str(error.value) and "\n" not in str(error.value)


@pytest.mark.slow
def test_a_server_port_in_use_fails_the_servers_preflight_check_in_one_line_and_starts_nothing(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        project = rehearsal_project(read_project(TEMPLATE), busy.getsockname()[1], SITES[:2])
        system = ProvisionedSystem(tmp_path / "workspace", project)
        started = time.monotonic()
        with pytest.raises(FedXViTError, match=r"^preflight check of localhost failed: .*overall: fail$") as error:
            with system:
                pass
    assert "\n" not in str(error.value) and time.monotonic() - started < 60
    assert (system.site_dir("localhost") / "startup" / "start.sh").is_file()  # provisioned, never started
    assert not system.processes.daemons and not system.started


@pytest.fixture(scope="module")
def provisioned(plain_fedavg_run, tmp_path_factory):
    """The provisioned system (with HE keys) on the plain run's sites and initial model; the shared tmp folder."""
    tmp = tmp_path_factory.mktemp("provisioned")
    env = system_env(plain_fedavg_run, tmp)
    project = rehearsal_project(read_project(TEMPLATE), free_port(), SITES, he=True)
    with ProvisionedSystem(tmp / "workspace", project, env=env) as system:
        yield {"system": system, "tmp": tmp}


@pytest.mark.slow
def test_every_kit_passed_its_preflight_check_and_every_site_came_up(provisioned):
    system = provisioned["system"]
    assert system.preflight == {name: "overall: pass" for name in ("localhost", *SITES, system.admin)}
    assert system.kits == system.workspace / "fedxvit_consortium" / "prod_00"
    assert all((system.site_dir(site) / "startup" / "client_context.tenseal").is_file() for site in SITES)
    assert not (system.site_dir("localhost") / "startup" / "client_context.tenseal").exists()  # no secret key


@pytest.mark.slow
def test_he_in_the_provisioned_system_sends_only_ciphertext_and_matches_plain_fedavg(provisioned, plain_fedavg_run):
    system, tmp = provisioned["system"], provisioned["tmp"]
    rounds = plain_fedavg_run["rounds"]
    (tmp / "he").mkdir()
    he_job = tiny_job(
        tmp / "he",
        job_dir=REPO / "jobs" / "fedxvit_he",
        num_rounds=rounds,
        submit_model_timeout=10,
        validation_timeout=60,
    )
    assert uses_he(he_job)  # tooling.provisioned adds the HEBuilder for such a job, as this system has it
    # every site in every round, as in the plain run (whose 30 s wait after 2 of 3 takes all three)
    result = system.run_job(he_job, tmp / "he-results", JOB_TIMEOUT_S, min_clients=len(SITES))
    assert result["status"] == "FINISHED:COMPLETED"
    he_run = result["result_dir"] / "workspace"

    # what reached the server's aggregator: every tensor of every update was ciphertext
    updates = json.loads((he_run / UPDATE_SIZES_FILE).read_text())["updates"]
    assert {(u["round"], u["site"]) for u in updates} == {(r, s) for r in range(rounds) for s in SITES}
    assert all(u["encrypted"] == u["tensors"] > 0 and u["in_clear"] == 0 for u in updates), updates
    # what the server kept: its global model's trained tensors are ciphertext, the frozen ones the start's
    saved = torch.load(he_run / "app_server" / "FL_global_model.pt", weights_only=True)["model"]
    start = torch.load(plain_fedavg_run["initial"], weights_only=True)
    encrypted = set(encrypted_tensors(saved))
    assert len(encrypted) == updates[0]["tensors"]
    assert all(torch.equal(torch.as_tensor(saved[k]), start[k]) for k in saved if k not in encrypted)

    # plain FedAvg on the same sites, start, rounds and seeds, in the simulator
    plain_run = plain_fedavg_run["job_dir"]
    plain = torch.load(plain_run / "app_server" / "FL_global_model.pt", weights_only=True)["model"]
    context = system.site_dir("site1") / "startup" / "client_context.tenseal"
    decrypted = torch.load(
        decrypt_main(
            [
                str(he_run / "app_server" / "FL_global_model.pt"),
                "--context",
                str(context),
                "--preset",
                "tiny",
                "--out",
                str(tmp / "he_model.pt"),
            ]
        ),
        weights_only=True,
    )
    moved = max(float((torch.as_tensor(plain[k]).float() - start[k].float()).abs().max()) for k in encrypted)
    off = max(float((decrypted[k].float() - torch.as_tensor(plain[k]).float()).abs().max()) for k in encrypted)
    assert moved > 1e-3 and off < moved / 100, (moved, off)  # the same training, up to CKKS's rounding

    he_scores = json.loads((he_run / "cross_site_val" / "cross_val_results.json").read_text())
    plain_scores = json.loads((plain_run / "cross_site_val" / "cross_val_results.json").read_text())
    for site in SITES:  # each site decrypted the server's final model and scored it
        he_final, plain_final = he_scores[site]["SRV_FL_global_model.pt"], plain_scores[site]["SRV_FL_global_model.pt"]
        assert abs(he_final["val_accuracy"] - plain_final["val_accuracy"]) <= 0.01, (site, he_final, plain_final)
        assert abs(he_final["val_loss"] - plain_final["val_loss"]) < 1e-3, (site, he_final, plain_final)
        assert not any(name.startswith(site) for name in he_scores[site])  # no local model reached the server
