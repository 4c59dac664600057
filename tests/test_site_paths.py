"""What a site reads and what its logs say: datalist paths stay inside the site folder (tests/test_datalist.py), a
job's path stays inside the checkout unless the site allows its folder, a corrupt image is one line naming it, and
the site's log lines name no folder where the hospital keeps its data."""

import logging
import shutil
from pathlib import Path

import pytest
from nvflare.apis.dxo import DXO, DataKind
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.shareable import Shareable
from nvflare.apis.signal import Signal

from fedxvit.classes import TASK_CLASSES
from fedxvit.data import make_loader
from fedxvit.datalist import load_split
from fedxvit.errors import FedXViTError
from fedxvit.executor import FedXViTExecutor, to_numpy_state
from fedxvit.model import build_model
from fedxvit.paths import ALLOWED_ROOTS_ENV, job_path
from fedxvit.sites import site_env_var
from tooling.standalone import make_fl_ctx


@pytest.fixture
def site(tiny_site_dir, tmp_path, monkeypatch):
    """A copy of the tiny site this test may break, found by the executor through $FEDXVIT_DATA_SITE1."""
    copy = shutil.copytree(tiny_site_dir, tmp_path / "hospital-data" / "site1")
    monkeypatch.setenv(site_env_var("site1"), str(copy))
    monkeypatch.delenv(ALLOWED_ROOTS_ENV, raising=False)
    return Path(copy)


def run_task(tmp_path, caplog, executor, task="validate") -> tuple[Shareable, list[str]]:
    """One task on a fresh executor; (reply, every fedxvit log line it wrote)."""
    weights = to_numpy_state(build_model("tiny", len(TASK_CLASSES)).state_dict())
    caplog.clear()
    with caplog.at_level(logging.INFO):
        reply = executor.execute(
            task, DXO(DataKind.WEIGHTS, weights).to_shareable(), make_fl_ctx(tmp_path / "ws"), Signal()
        )
    return reply, [record.getMessage() for record in caplog.records if "fedxvit" in record.getMessage()]


def test_a_corrupt_image_is_one_line_naming_it_in_the_loader_and_the_site_log(site, tmp_path, caplog):
    broken = Path(load_split(site, "training")[1]["image"])
    broken.write_bytes(broken.read_bytes()[:60])  # a truncated PNG
    with pytest.raises(FedXViTError) as refused:
        make_loader(site, "training", 32, 2, train=True)
    message = str(refused.value)
    assert message.startswith(f"site1/images/{broken.name}: this training image cannot be decoded"), message
    assert "\n" not in message and str(tmp_path) not in message
    reply, lines = run_task(tmp_path, caplog, FedXViTExecutor(preset="tiny", batch_size=2, torch_threads=1))
    assert reply.get_return_code() == ReturnCode.EXECUTION_EXCEPTION
    (error,) = [line for line in lines if "cannot be decoded" in line]
    assert f"site1/images/{broken.name}" in error and "\n" not in error and "Traceback" not in error


def test_site_log_lines_name_no_data_folder(site, tmp_path, caplog):
    reply, lines = run_task(tmp_path, caplog, FedXViTExecutor(preset="tiny", batch_size=2, torch_threads=1))
    assert reply.get_return_code(ReturnCode.OK) == ReturnCode.OK
    assert any("6 train" in line for line in lines) and any("val_acc" in line for line in lines)
    assert not [line for line in lines if str(site.parent) in line]


def test_a_job_path_outside_the_checkout_is_refused_before_anything_reads_it(site, tmp_path, caplog, monkeypatch):
    for outside in ("/etc/hostname", "../" * 12 + "etc/hostname"):
        reply, lines = run_task(
            tmp_path, caplog, FedXViTExecutor(preset="tiny", batch_size=2, mas_prior=outside), "train"
        )
        assert reply.get_return_code() == ReturnCode.EXECUTION_EXCEPTION
        assert any(f"job option mas_prior={outside!r} lies outside" in line for line in lines), lines
    prior = tmp_path / "priors" / "ssl_prior.pt"
    prior.parent.mkdir()
    prior.write_bytes(b"")
    with pytest.raises(FedXViTError, match=f"mas_prior={str(prior)!r} lies outside .*{ALLOWED_ROOTS_ENV}"):
        job_path("mas_prior", str(prior))
    (prior.parent / "link.pt").symlink_to("/etc/hostname")  # a symlink inside an allowed root does not lead out
    monkeypatch.setenv(ALLOWED_ROOTS_ENV, str(prior.parent))
    assert job_path("mas_prior", str(prior)) == prior
    with pytest.raises(FedXViTError, match="lies outside"):
        job_path("mas_prior", str(prior.parent / "link.pt"))
    assert job_path("mas_prior", "models/ssl_prior.pt").parent.name == "models"  # the job's default stays valid


def test_a_job_cannot_choose_where_the_server_writes_its_round_table():
    from fedxvit.widgets import GlobalValidationTracker

    for path in ("../../outside.json", "/tmp/global_val.json", ".."):
        with pytest.raises(FedXViTError, match=f"file_name={path!r}: a file name in the run folder"):
            GlobalValidationTracker(file_name=path)
    assert GlobalValidationTracker(file_name="global_val.json").file_name == "global_val.json"
