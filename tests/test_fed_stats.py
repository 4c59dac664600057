"""Federated statistics (jobs/fedxvit_stats): each site's image statistics through NVFlare's real statistics
workflow in the simulator. One run serves every check: site1 and site2 run the job's client app without the
cleansers (NVFlare's deploy_map), so what the server received must equal a computation over their images done
here from the pixels; site3 runs the job as shipped, so what it withheld must be what each cleanser promises."""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tiny import REPO, write_tiny_site

from fedxvit.site_stats import site_values
from result_stat.data_stats import GLOBAL, OUTPUT, markdown, write_report
from tooling.simulation import run_simulator

JOB = REPO / "jobs" / "fedxvit_stats"
OPEN, CLEANSED = ("site1", "site2"), "site3"
TRAIN_PER_CLASS = {"site1": 6, "site2": 10, "site3": 14}  # site3: 28 training images, 4 validation, 2 test


def local_statistics(site_dir: Path) -> dict:
    """split -> feature -> (values, weights) straight from the site's files, without fedxvit's code."""
    datalist = json.loads((site_dir / "datalist.json").read_text())
    result = {}
    for split, items in datalist.items():
        pixels = [np.asarray(Image.open(site_dir / item["image"]).convert("L")) for item in items]
        masks = [np.asarray(Image.open(site_dir / item["mask"])) > 0 for item in items if "mask" in item]
        levels = np.bincount(np.concatenate([p.ravel() for p in pixels]), minlength=256)
        result[split] = {
            "label": [float(item["label"]) for item in items],
            "mean_intensity": [float(p.mean()) for p in pixels],
            "height": [float(p.shape[0]) for p in pixels],
            "width": [float(p.shape[1]) for p in pixels],
            "lesion_area": [float(m.mean()) for m in masks],
            "intensity": (np.arange(256.0), levels.astype(float)),
        }
    return result


def described(values) -> dict:
    values, weights = values if isinstance(values, tuple) else (np.asarray(values), np.ones(len(values)))
    n = weights.sum()
    mean = (values * weights).sum() / n if n else 0.0
    return {
        "count": int(n),
        "sum": float((values * weights).sum()),
        "mean": float(mean),
        "stddev": float(math.sqrt(((values - mean) ** 2 * weights).sum() / (n - 1))) if n > 1 else 0.0,
        "values": values[weights > 0],
        "weights": weights,
        "raw": values,
    }


def histogram(values, bins: int, low: float, high: float) -> list:
    values, weights = values if isinstance(values, tuple) else (np.asarray(values), None)
    values = np.clip(values, low, high)  # the end bins hold what lies beyond them
    return np.histogram(values, bins=bins, range=(low, high), weights=weights)[0].round().astype(int).tolist()


def test_the_site_component_computes_what_the_pixels_say(tmp_path):
    site = write_tiny_site(tmp_path / "site1", train_per_class=5, seed=3, masks=True)
    expected = local_statistics(site)
    got = site_values(site)
    assert set(got) == set(expected)
    for split, features in expected.items():
        for name, values in features.items():
            mine, theirs = got[split][name], described(values)
            assert mine.count == theirs["count"], (split, name)
            assert mine.total() == pytest.approx(theirs["sum"]), (split, name)
        assert got[split]["lesion_area"].count == features["label"].count(1.0)  # a mask per Tumor image


@pytest.fixture(scope="module")
def stats_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("stats")
    for i, site in enumerate(TRAIN_PER_CLASS):
        write_tiny_site(root / "data" / site, train_per_class=TRAIN_PER_CLASS[site], seed=i, masks=site != "site2")
    job = root / "job"
    shutil.copytree(JOB, job)
    shutil.copytree(job / "app", job / "app_open")
    client = job / "app_open" / "config" / "config_fed_client.json"
    config = json.loads(client.read_text())
    config["task_result_filters"] = []  # the cleansers off at site1 and site2
    client.write_text(json.dumps(config))
    meta = json.loads((job / "meta.json").read_text())
    meta["deploy_map"] = {"app": ["server", CLEANSED], "app_open": list(OPEN)}
    (job / "meta.json").write_text(json.dumps(meta))
    sites = [*OPEN, CLEANSED]
    run_dir = run_simulator(job, root / "workspace", root / "data", sites, None, timeout_s=400, expect=OUTPUT)
    return {"stats": json.loads((run_dir / OUTPUT).read_text()), "data": root / "data", "root": root}


def server_config() -> dict:
    workflow = json.loads((JOB / "app" / "config" / "config_fed_server.json").read_text())["workflows"][0]
    return workflow["args"]["statistic_configs"]


def histogram_config(feature: str) -> dict:
    config = server_config()["histogram"]
    return config.get(feature, config["*"])


@pytest.mark.slow
def test_without_cleansers_the_server_gets_exactly_what_the_images_hold(stats_run):
    stats = stats_run["stats"]
    for site in OPEN:
        for split, features in local_statistics(stats_run["data"] / site).items():
            for name, values in features.items():
                expected, got = described(values), {s: stats[name][s].get(site, {}).get(split) for s in stats[name]}
                assert got["count"] == expected["count"], (site, split, name)
                if not expected["count"]:
                    continue
                assert got["sum"] == pytest.approx(expected["sum"], abs=1e-3), (site, split, name)
                assert got["mean"] == pytest.approx(expected["mean"], abs=1e-4), (site, split, name)
                assert got["stddev"] == pytest.approx(expected["stddev"], abs=1e-3), (site, split, name)
                config = histogram_config(name)
                low, high = config.get("range", (None, None))
                if low is None:  # no fixed range: the site's own exact minimum and maximum, and bins between
                    low, high = got["min"], got["max"]
                    assert (low, high) == (expected["values"].min(), expected["values"].max()), (site, split, name)
                    low, high = stats[name]["min"][GLOBAL][split], stats[name]["max"][GLOBAL][split]
                bins = [int(b[2]) for b in got["histogram"]]
                assert bins == histogram(values, config["bins"], low, high), (site, split, name)
    for name in server_config()["histogram"]:
        if name == "*":
            continue
        for split in ("training", "validation", "testing"):
            counts = [stats[name]["count"][site][split] for site in (*OPEN, CLEANSED)]
            assert stats[name]["count"][GLOBAL][split] == sum(counts)  # counts always arrive, and add up
    # the federation's mean and standard deviation are the pooled images' (every site sent these two features)
    pooled = [local_statistics(stats_run["data"] / site)["training"] for site in (*OPEN, CLEANSED)]
    for name in ("intensity", "lesion_area"):
        if name == "intensity":
            values = (np.arange(256.0), np.sum([p[name][1] for p in pooled], axis=0))
        else:
            values = [v for p in pooled for v in p[name]]
        expected = described(values)
        assert stats[name]["mean"][GLOBAL]["training"] == pytest.approx(expected["mean"], rel=1e-4), name
        assert stats[name]["stddev"][GLOBAL]["training"] == pytest.approx(expected["stddev"], rel=1e-3), name
    # the federation's gray-value histogram adds the sites that sent one, bin by bin
    sent = [s for s in (*OPEN, CLEANSED) if "training" in stats["intensity"]["histogram"].get(s, {})]
    assert CLEANSED in sent
    total = np.sum([[b[2] for b in stats["intensity"]["histogram"][s]["training"]] for s in sent], axis=0)
    assert [b[2] for b in stats["intensity"]["histogram"][GLOBAL]["training"]] == total.tolist()


@pytest.mark.slow
def test_the_shipped_cleansers_withhold_what_they_promise(stats_run):
    stats = stats_run["stats"]
    client = json.loads((JOB / "app" / "config" / "config_fed_client.json").read_text())
    min_count, max_bins_percent = client["min_count"], client["max_bins_percent"]
    low_noise, high_noise = client["min_noise_level"], client["max_noise_level"]
    local = local_statistics(stats_run["data"] / CLEANSED)
    checked = {"withheld": 0, "sent": 0, "histograms withheld": 0}
    for split, features in local.items():
        for name, values in features.items():
            expected = described(values)
            got = {s: stats[name][s].get(CLEANSED, {}).get(split) for s in stats[name]}
            assert got["count"] == expected["count"]  # counts always leave
            if expected["count"] < min_count:  # MinCountCleanser: nothing but the count
                assert [s for s, v in got.items() if v is not None] == ["count"], (split, name, got)
                checked["withheld"] += 1
                continue
            checked["sent"] += 1
            assert got["mean"] == pytest.approx(expected["mean"], abs=1e-4)
            bins = histogram_config(name)["bins"]
            if bins >= round(expected["count"] * max_bins_percent / 100):  # HistogramBinsCleanser
                assert got["histogram"] is None, (split, name)
                checked["histograms withheld"] += 1
            else:
                assert got["histogram"] is not None, (split, name)
            if "range" not in histogram_config(name):  # AddNoiseToMinMax: true extremes moved outward, 10-30%
                true_min, true_max = expected["values"].min(), expected["values"].max()
                assert true_min * (1 - high_noise) <= got["min"] <= true_min * (1 - low_noise), (split, name)
                assert true_max * (1 + low_noise) <= got["max"] <= true_max * (1 + high_noise), (split, name)
    assert min(checked.values()) > 0, checked  # each rule was exercised by this run's data


@pytest.mark.slow
def test_the_report_shows_every_site_and_what_was_withheld(stats_run):
    stats = stats_run["stats"]
    out = stats_run["root"] / "report"
    report = write_report(stats, out).read_text()
    assert report == markdown(stats)
    for site in (*OPEN, CLEANSED, GLOBAL):
        assert f"| {site} | " in report
    assert f"- {CLEANSED} withheld: " in report
    assert not any(f"- {site} withheld" in report for site in OPEN)
    assert (out / "intensity_histograms.png").stat().st_size > 10_000
    assert (out / "label_mix.png").stat().st_size > 10_000
    names = [
        item["image"]
        for site in TRAIN_PER_CLASS
        for items in json.loads((stats_run["data"] / site / "datalist.json").read_text()).values()
        for item in items
    ]
    sent = json.dumps(stats)
    assert not any(Path(name).name in sent for name in names)  # no file name reached the server


def test_bad_options_are_one_line(tmp_path):
    from fedxvit.errors import FedXViTError
    from result_stat.data_stats import main

    write_tiny_site(tmp_path / "site1")
    with pytest.raises(FedXViTError, match=r"^--sites: no folder .*site9$"):
        main(["--data", str(tmp_path), "--sites", "site1,site9"])
    with pytest.raises(FedXViTError, match=r"needs at least 2 sites, got \['site1'\]"):
        main(["--data", str(tmp_path)])
    with pytest.raises(FedXViTError, match="no site folders with dataset.json under --data"):
        main(["--data", str(tmp_path / "empty")])
