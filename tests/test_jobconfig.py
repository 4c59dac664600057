"""The one reader of a job's settings: job folders and run folders, NVFlare's variable substitution,
one-line errors, a finished run's sites, and the shipped job and executor kept equal to the cpu training defaults."""

import inspect
import json
import shutil

import pytest
from tiny import JOB, write_tiny_config

from fedxvit.errors import FedXViTError
from fedxvit.executor import FedXViTExecutor
from fedxvit.model import DEFAULT_PRESET, PRESETS, TRAINING_DEFAULTS, training_defaults
from tooling.jobconfig import JobSettings, read_job_settings, run_sites


def test_a_job_folder_its_app_its_config_and_a_run_folder_read_the_same(tmp_path):
    expected = JobSettings(
        preset="tiny",
        num_classes=2,
        num_rounds=3,
        local_epochs=2,
        learning_rate=3e-4,
        batch_size=4,
        freeze_policy="last-k",
        last_k=1,
        seed=0,
    )
    job = tmp_path / "job"
    shutil.copytree(JOB, job)
    write_tiny_config(job / "app" / "config", {"num_rounds": 3}, {"local_epochs": 2})
    run = tmp_path / "run"
    shutil.copytree(job / "app", run / "app_server")  # where the simulator keeps the config a run used
    for folder in (job, job / "app", job / "app" / "config", run):
        assert read_job_settings(folder) == expected, folder
    assert expected.equivalent_epochs == 6 and expected.as_dict()["equivalent_epochs"] == 6


def test_an_argument_edited_in_place_wins_over_the_variable_as_in_nvflare(tmp_path):
    config = write_tiny_config(tmp_path / "config")
    client = json.loads((config / "config_fed_client.json").read_text())
    client["executors"][0]["executor"]["args"]["learning_rate"] = 0.01  # no longer "{learning_rate}"
    (config / "config_fed_client.json").write_text(json.dumps(client))
    server = json.loads((config / "config_fed_server.json").read_text())
    next(w for w in server["workflows"] if w["id"] == "scatter_and_gather")["args"]["num_rounds"] = 7
    (config / "config_fed_server.json").write_text(json.dumps(server))
    settings = read_job_settings(config)
    assert (settings.learning_rate, settings.num_rounds, settings.batch_size) == (0.01, 7, 4)


def test_bad_jobs_fail_in_one_line_naming_the_file(tmp_path):
    with pytest.raises(FedXViTError, match=r"nowhere: no config_fed_server.json"):
        read_job_settings(tmp_path / "nowhere")
    config = write_tiny_config(tmp_path / "config")
    client = json.loads((config / "config_fed_client.json").read_text())
    del client["executors"][0]["executor"]["args"]["seed"]
    (config / "config_fed_client.json").write_text(json.dumps(client))
    with pytest.raises(FedXViTError, match=r"config_fed_client.json: no 'seed' argument"):
        read_job_settings(config)
    config = write_tiny_config(tmp_path / "mixed", {"preset": "cpu"})
    with pytest.raises(FedXViTError, match="the server's preset 'cpu' and the clients' 'tiny' differ"):
        read_job_settings(config)
    config = write_tiny_config(tmp_path / "words", None, {"batch_size": "many"})
    with pytest.raises(FedXViTError, match=r"'batch_size' = 'many' is not int"):
        read_job_settings(config)
    (config / "config_fed_server.json").write_text("{not json")
    with pytest.raises(FedXViTError, match=r"config_fed_server.json is not valid JSON"):
        read_job_settings(config)


def test_the_shipped_job_and_the_executor_defaults_equal_the_cpu_training_defaults():
    """Training defaults live in fedxvit.model.TRAINING_DEFAULTS; the job stays explicit, and this keeps it equal."""
    site = training_defaults(DEFAULT_PRESET).site
    settings = read_job_settings(JOB)
    assert settings.preset == DEFAULT_PRESET == "cpu"
    assert (settings.learning_rate, settings.batch_size, settings.local_epochs) == (
        site.learning_rate,
        site.batch_size,
        site.local_epochs,
    )
    for preset in PRESETS:  # what a job leaves out, the executor takes from that preset's defaults
        executor, defaults = FedXViTExecutor(preset=preset), training_defaults(preset).site
        assert (executor.learning_rate, executor.batch_size, executor.local_epochs) == (
            defaults.learning_rate,
            defaults.batch_size,
            defaults.local_epochs,
        )
    assert inspect.signature(FedXViTExecutor.__init__).parameters["preset"].default == DEFAULT_PRESET
    assert set(TRAINING_DEFAULTS) == set(PRESETS), "every preset has a defaults"


def test_the_expert_cli_takes_its_defaults_from_the_chosen_presets_training_defaults():
    from tooling.expert import parse_args

    for preset in PRESETS:
        args, defaults = parse_args(["--preset", preset]), training_defaults(preset).expert
        assert (args.lr, args.batch_size, args.epochs, args.warmup_epochs, args.patience) == (
            defaults.lr,
            defaults.batch_size,
            defaults.epochs,
            defaults.warmup_epochs,
            defaults.patience,
        )
    assert parse_args(["--preset", "anchor", "--lr", "0.1"]).lr == 0.1  # an explicit option wins
    assert training_defaults("anchor").expert.lr != training_defaults("cpu").expert.lr, "the presets really differ"


def test_the_sites_of_a_run_come_from_its_meta_else_its_tables(tmp_path):
    run = tmp_path / "run"
    (run / "cross_site_val").mkdir(parents=True)
    (run / "cross_site_val" / "cross_val_results.json").write_text(json.dumps({"b": {}, "a": {}}))
    assert run_sites(run) == ["a", "b"]
    (run / "global_val.json").write_text(json.dumps({"rounds": [{"round": 0, "sites": {"x": {}, "c": {}}}]}))
    assert run_sites(run) == ["c", "x"]
    (run / "meta.json").write_text(json.dumps({"job_clients": [{"name": "site2"}, {"name": "site1"}]}))
    assert run_sites(run) == ["site1", "site2"]  # NVFlare's own list of the job's clients
    with pytest.raises(FedXViTError, match="cannot tell the sites of run .*: pass --sites"):
        run_sites(tmp_path / "empty")
