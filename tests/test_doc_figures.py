"""The docs' pictures are made by a script from the data and a model on disk (result_stat.doc_figures)."""

import pytest
from tiny import write_initial_model, write_tiny_site

from fedxvit.errors import FedXViTError
from result_stat.doc_figures import main, scenario_sites


def test_pictures_of_every_scenario_present_and_a_missing_one_said(tmp_path, capsys):
    data = tmp_path / "data"
    for site in ("site1", "site2", "site10"):
        write_tiny_site(data / site, test_per_class=2, masks=True, seed=len(site))
    write_tiny_site(data / "skewed" / "site1", masks=True)
    write_tiny_site(data / "skewed" / "heldout", masks=True, train_per_class=0)
    model = write_initial_model(tmp_path / "initial_global.pt")
    found = scenario_sites(data)
    assert {name: [p.name for p in sites] for name, sites in found.items()} == {
        "default": ["site1", "site2", "site10"],  # number order
        "skewed": ["site1", "heldout"],  # the held-out hospital last
    }
    main(["--data", str(data), "--model", str(model), "--out", str(tmp_path / "img")])
    assert "left out (no data under" in capsys.readouterr().out
    for name in ("slices.png", "label_mix.png", "explanations.png"):
        assert (tmp_path / "img" / name).stat().st_size > 5_000, name


def test_no_data_or_no_model_is_one_line(tmp_path):
    with pytest.raises(FedXViTError, match=r"no site folders .* run `make data` first"):
        main(["--data", str(tmp_path), "--out", str(tmp_path / "img")])
    write_tiny_site(tmp_path / "site1", masks=True)
    with pytest.raises(FedXViTError, match=r"^--model .*missing.pt: no such file"):
        main(["--data", str(tmp_path), "--model", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "img")])
    assert not (tmp_path / "img").exists()
