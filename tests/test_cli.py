"""What a newcomer meets at the command line: a bad option, a missing command, an unreachable store or an
occupied output path is one line naming it, not a usage block, a traceback or minutes of silence."""

import time

import pytest
import torch
from tiny import free_port, tiny_job, write_initial_model, write_tiny_config

from fedxvit import he, run_record
from fedxvit.checkpoint import save_checkpoint
from fedxvit.errors import FedXViTError
from fedxvit.executor import FedXViTExecutor
from fedxvit.model import build_model
from tooling import expert as expert_cli
from tooling import transfer
from tooling.jobconfig import check_site_options
from tooling.simulation import failure_reason


@pytest.mark.parametrize(
    "main, args, expected",
    [
        (he.main, [], "the following arguments are required: COMMAND"),
        (he.main, ["encrypt"], "invalid choice: 'encrypt'"),
        (expert_cli.main, ["--preset", "huge"], "argument --preset: invalid choice: 'huge'"),
        (transfer.main, ["--num-classes", "two"], "argument --num-classes: invalid int value: 'two'"),
    ],
)
def test_a_bad_command_line_is_one_line_naming_the_option(capsys, main, args, expected):
    with pytest.raises(SystemExit) as exit_:
        main(args)
    out, err = capsys.readouterr()
    assert exit_.value.code == 2 and out == ""
    assert err.count("\n") == 1 and expected in err, err


def test_the_he_tool_lists_its_commands(capsys):
    with pytest.raises(SystemExit) as exit_:
        he.main(["--help"])
    assert exit_.value.code == 0 and "decrypt" in capsys.readouterr().out


def test_an_unreachable_tracking_server_is_one_line_within_the_timeout(tmp_path):
    (tmp_path / "run").mkdir()
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there: MLflow would retry for minutes
    started = time.monotonic()
    with pytest.raises(FedXViTError, match=r"MLflow tracking store .*127\.0\.0\.1"):
        run_record.main([str(tmp_path / "run"), "--tracking-uri", uri, "--job-id", "job1", "--timeout", "2"])
    assert time.monotonic() - started < 20


def expert(path, preset="tiny"):
    torch.manual_seed(0)
    return save_checkpoint(path, build_model(preset, num_classes=4), {"class_names": ["a", "b", "c", "d"]})


def test_transfer_refuses_a_preset_other_than_the_experts(tmp_path):
    expert(tmp_path / "expert.pt")
    with pytest.raises(FedXViTError, match="saved for preset 'tiny'.*preset 'cpu'"):
        transfer.main(["--expert", str(tmp_path / "expert.pt"), "--preset", "cpu", "--out", str(tmp_path / "i.pt")])


def test_transfer_replaces_its_own_output_but_not_a_file_it_did_not_write(tmp_path):
    expert(tmp_path / "expert.pt")
    out = tmp_path / "initial.pt"
    for _ in range(2):  # `make transfer` again: its own earlier output is replaced
        transfer.main(["--expert", str(tmp_path / "expert.pt"), "--out", str(out)])
    foreign = write_initial_model(tmp_path / "someone_elses.pt")  # a checkpoint without a transfer record
    before = foreign.read_bytes()
    with pytest.raises(FedXViTError, match="was not written by tooling.transfer"):
        transfer.main(["--expert", str(tmp_path / "expert.pt"), "--out", str(foreign)])
    assert foreign.read_bytes() == before
    transfer.main(["--expert", str(tmp_path / "expert.pt"), "--out", str(foreign), "--force"])
    assert foreign.read_bytes() != before


@pytest.mark.parametrize(
    "option, expected",
    [
        ({"freeze_policy": "last_k"}, "job option freeze_policy='last_k' is unknown; choose one of head, last-k, full"),
        ({"learning_rate": "fast"}, "job option learning_rate='fast' is not a number"),
        ({"learning_rate": 0}, "job option learning_rate=0 must be above 0"),
        ({"local_epochs": 1.5}, "job option local_epochs=1.5 is not a whole number"),
        ({"batch_size": 0}, "job option batch_size=0 must be at least 1"),
        ({"torch_threads": "many"}, "job option torch_threads='many' is not a whole number"),
        ({"preset": "huge"}, "unknown preset 'huge'"),
    ],
)
def test_a_bad_job_option_stops_the_executor_before_its_first_task(option, expected):
    with pytest.raises(FedXViTError) as error:
        FedXViTExecutor(**{"preset": "tiny", **option})
    assert expected in str(error.value) and "\n" not in str(error.value)


def test_a_bad_job_variable_is_one_line_naming_the_job_file_before_any_run(tmp_path):
    job = tiny_job(tmp_path)
    assert check_site_options(job) == ["fedxvit.executor.FedXViTExecutor"]
    write_tiny_config(job / "app" / "config", client_changes={"learning_rate": "fast"})
    with pytest.raises(FedXViTError) as error:
        check_site_options(job)
    message = str(error.value)
    assert message.startswith(str(job / "app" / "config" / "config_fed_client.json"))
    assert "job option learning_rate='fast' is not a number" in message and "\n" not in message


def test_a_failed_simulator_run_reports_the_sites_own_error_line():
    log = (
        "2026-12-02 18:13:33,790 - ERROR - Traceback (most recent call last):\n"
        "  File ..., in __init__\n"
        "fedxvit.errors.FedXViTError: job option freeze_policy='last_k' is unknown; choose one of head, last-k, full\n"
        "nvflare.fuel.common.excepts.ConfigError: Error processing '.../config_fed_client.json' in element {...}\n"
        "2026-12-02 18:13:35,162 - ERROR - do_one_task execute exception: ConfigError: ...\n"
    )
    assert failure_reason(log) == "job option freeze_policy='last_k' is unknown; choose one of head, last-k, full"
    assert failure_reason("a\n2026 - ERROR - the server stopped\nb\n") == "2026 - ERROR - the server stopped"
