"""One anchor for default data, models and the MLflow store, wherever NVFlare's workers run."""

from tiny import REPO

from fedxvit.paths import project_root
from fedxvit.persistor import resolve_initial_model
from fedxvit.sites import locate_site_data
from fedxvit.tracking import local_store


def test_root_found_from_a_subfolder_and_from_outside_the_checkout(tmp_path, monkeypatch):
    assert project_root(REPO / "custom" / "fedxvit") == REPO
    assert project_root(tmp_path) == REPO  # editable install remembers the checkout
    monkeypatch.chdir(tmp_path)  # like a simulator worker in its workspace folder
    assert local_store()[0] == f"sqlite:///{REPO / 'mlruns' / 'mlflow.db'}"
    assert locate_site_data("site2", environ={})[0] == REPO / "data" / "site2"
    assert resolve_initial_model({}) == REPO / "models" / "initial_global.pt"


def test_another_checkout_found_upward_wins(tmp_path):
    other = tmp_path / "clinic-copy"
    (other / "custom" / "fedxvit").mkdir(parents=True)
    (other / "pyproject.toml").write_text("")
    assert project_root(other / "custom") == other
