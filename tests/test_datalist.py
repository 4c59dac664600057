"""The site format: written once, read back with absolute paths, counted, and bad sites named."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from tiny import REPO

from fedxvit.datalist import (
    DATALIST_FILE,
    count_table,
    format_counts,
    load_split,
    pixel_hash,
    read_dataset_info,
    write_counts,
    write_site,
)
from fedxvit.errors import FedXViTError
from fedxvit.paths import ALLOWED_ROOTS_ENV


def _site(tmp_path, name="site1", n=3):
    site = tmp_path / name
    (site / "images").mkdir(parents=True)
    (site / "masks").mkdir()
    entries = {"training": [], "validation": [], "testing": []}
    for i in range(n):
        for split in entries:
            image = f"images/{split}_{i}.png"
            Image.fromarray(np.full((8, 8), i * 10 + len(split), np.uint8)).save(site / image)
            item = {"image": image, "label": i % 2}
            if i % 2:
                item["mask"] = f"masks/{split}_{i}.png"
                Image.fromarray(np.zeros((8, 8), np.uint8)).save(site / item["mask"])
            entries[split].append(item)
    return site, entries


def test_round_trip_gives_absolute_paths_counts_and_hashes(tmp_path):
    site, entries = _site(tmp_path)
    info = write_site(site, entries, ["Healthy", "Tumor"], {"seed": 1})
    assert info["counts"]["training"] == {"Healthy": 2, "Tumor": 1}
    assert info["num_images"] == 9 and len(info["content_hashes"]) == 9
    assert read_dataset_info(site)["data_hash"] == info["data_hash"]
    items = load_split(site, "training")
    assert [i["label"] for i in items] == [0, 1, 0]
    assert all(i["image"].startswith(str(site)) for i in items)
    assert items[1]["mask"] == str(site / "masks/training_1.png")


def test_data_hash_changes_with_content_and_not_with_rewrite(tmp_path):
    site, entries = _site(tmp_path)
    first = write_site(site, entries, ["Healthy", "Tumor"], {})["data_hash"]
    assert write_site(site, entries, ["Healthy", "Tumor"], {})["data_hash"] == first
    Image.fromarray(np.full((8, 8), 200, np.uint8)).save(site / entries["testing"][0]["image"])
    assert write_site(site, entries, ["Healthy", "Tumor"], {})["data_hash"] != first


def test_bad_label_and_missing_files_are_named(tmp_path):
    site, entries = _site(tmp_path)
    entries["training"][0]["label"] = 5
    with pytest.raises(FedXViTError, match="label 5"):
        write_site(site, entries, ["Healthy", "Tumor"], {})
    with pytest.raises(FedXViTError, match=f"no {DATALIST_FILE} in .*nowhere"):
        load_split(tmp_path / "nowhere", "training")
    entries["training"][0]["label"] = 0
    write_site(site, entries, ["Healthy", "Tumor"], {})
    (site / "images/validation_2.png").unlink()
    with pytest.raises(FedXViTError, match="validation_2.png"):
        load_split(site, "validation")


def test_pixel_hash_sees_content_not_encoding(tmp_path):
    pixels = np.arange(64, dtype=np.uint8).reshape(8, 8)
    assert pixel_hash(pixels) == pixel_hash(pixels.copy())
    assert pixel_hash(pixels) != pixel_hash(pixels.T)
    assert pixel_hash(pixels) != pixel_hash(pixels.astype(np.uint16))


def test_counts_table_and_cli(tmp_path):
    for name in ("site1", "site2"):
        site, entries = _site(tmp_path, name, n=2 if name == "site1" else 4)
        write_site(site, entries, ["Healthy", "Tumor"], {})
    table = count_table(tmp_path)
    assert set(table) == {"site1", "site2"}
    markdown = write_counts(tmp_path)
    assert "| site2 | training | 2 | 2 | 4 |" in markdown
    assert json.loads((tmp_path / "counts.json").read_text()) == table
    assert format_counts(table) == markdown
    # cwd=REPO: the tooling runs from the checkout (only fedxvit is an installed package)
    run = subprocess.run(
        [sys.executable, "-m", "data_preparation.counts", "--data", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0 and "| site1 | testing | 1 | 1 | 2 |" in run.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "data_preparation.counts", "--data", str(tmp_path / "none")],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and bad.stderr.startswith("error:") and "Traceback" not in bad.stderr


def test_counts_make_one_table_per_class_set(tmp_path):
    site, entries = _site(tmp_path, "site1")
    write_site(site, entries, ["Healthy", "Tumor"], {})
    public, entries = _site(tmp_path, "public", n=4)
    write_site(public, entries, ["glioma", "meningioma", "notumor", "pituitary"], {})
    markdown = format_counts(count_table(tmp_path))
    assert markdown.count("| site | split |") == 2
    assert "| public | training | 2 | 2 | 0 | 0 | 4 |" in markdown
    assert "| site1 | training | 2 | 1 | 3 |" in markdown


def test_entries_that_lead_out_of_the_site_folder_are_refused_unless_the_site_allows_their_root(tmp_path, monkeypatch):
    monkeypatch.delenv(ALLOWED_ROOTS_ENV, raising=False)
    site, entries = _site(tmp_path / "data")
    write_site(site, entries, ["Healthy", "Tumor"], {})
    store = tmp_path / "store"  # another hospital folder, or anything else on the machine
    store.mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(store / "x.png")
    (site / "images" / "link.png").symlink_to(store / "x.png")
    datalist = json.loads((site / DATALIST_FILE).read_text())
    for key, entry in [
        ("image", "../../store/x.png"),
        ("image", str(store / "x.png")),
        ("image", "images/link.png"),
        ("mask", "/etc/hostname"),
    ]:
        changed = json.loads(json.dumps(datalist))
        changed["training"][1][key] = entry
        (site / DATALIST_FILE).write_text(json.dumps(changed))
        with pytest.raises(FedXViTError) as refused:
            load_split(site, "training")
        message = str(refused.value)
        assert (
            message.startswith(f"site1/{DATALIST_FILE}: training {key} {entry!r} lies outside") and "\n" not in message
        )
        assert ALLOWED_ROOTS_ENV in message
        load_split(site, "validation")  # the other splits are untouched
        if key == "image":  # the site's own setting lets a root in, and only that one
            monkeypatch.setenv(ALLOWED_ROOTS_ENV, str(store))
            assert load_split(site, "training")[1]["image"] == os.path.normpath(site / entry)
            monkeypatch.delenv(ALLOWED_ROOTS_ENV)
    monkeypatch.setenv(ALLOWED_ROOTS_ENV, str(store))
    with pytest.raises(FedXViTError, match="mask '/etc/hostname' lies outside"):
        load_split(site, "training")
