"""The demo driver: phase timing, process-tree memory sampling, summary.json merge and printout."""

import json
import sys
import time

import pytest

from fedxvit.demo import format_summary, main, record_timing, run_timed
from fedxvit.errors import FedXViTError

ALLOCATE_IN_CHILD = (
    "import subprocess, sys; "
    "subprocess.run([sys.executable, '-c', 'import time; b = bytearray(300 * 2**20); time.sleep(1.5)'], check=True)"
)


def test_run_timed_sees_the_memory_of_grandchildren(tmp_path):
    started = time.perf_counter()
    result = run_timed([sys.executable, "-c", ALLOCATE_IN_CHILD], cwd=tmp_path, interval_s=0.1)
    elapsed = time.perf_counter() - started
    assert result["returncode"] == 0
    assert 1.5 <= result["wall_s"] <= elapsed, "seconds, up to the end of the grandchild's 1.5 s sleep"
    assert result["peak_rss_mb"] >= 300, result


def test_record_timing_keeps_the_results_keys_and_adds_totals(tmp_path):
    path = tmp_path / "summary.json"
    path.write_text(json.dumps({"expert": {"test_accuracy": 0.9}}))
    timings = {"data": {"wall_s": 10.0, "peak_rss_mb": 500}, "simulate": {"wall_s": 30.5, "peak_rss_mb": 1500}}
    summary = record_timing(path, timings)
    assert json.loads(path.read_text()) == summary
    assert summary["expert"] == {"test_accuracy": 0.9}
    assert summary["timing_s"] == {"data": 10.0, "simulate": 30.5, "total": 40.5}
    assert summary["peak_rss_mb"]["max"] == 1500


def test_summary_text_reports_every_phase():
    summary = {
        "expert": {"test_accuracy": 0.975, "test_loss": 0.1},
        "federated": {"rounds": [{"round": 1, "global_val_accuracy": 0.9, "global_val_loss": 0.3}],
                      "final_test_accuracy": 0.99, "final_test_loss": 0.05,
                      "per_class": {"Healthy": {"precision": 1.0, "recall": 0.98, "f1-score": 0.99, "support": 50}}},
        "comparison": [{"model": "centralized (pooled sites)", "test_accuracy": 0.995}],
        "xai": {"pointing_game": 0.92, "energy_in_mask": 0.6,
                "baselines": {"intensity": {"pointing_game": 0.97}, "mask_cells": {"pointing_game": 0.938}},
                "integrated_gradients": {"pointing_game": 1.0}},
        "timing_s": {"data": 10.0, "total": 10.0},
        "peak_rss_mb": {"max": 2048},
    }
    text = format_summary(summary, "results")
    for expected in ("97.5%", "0.9000", "99.0%", "Healthy", "centralized (pooled sites)", "99.5%",
                     "pointing game 92.0%", "image intensity 97.0%", "ideal 16-px cell map 93.8%",
                     "Integrated Gradients 100.0%", "peak memory 2.0 GB", "tensorboard --logdir", "mlflow ui"):
        assert expected in text, expected


def test_a_failing_phase_stops_the_demo_with_one_line(tmp_path, monkeypatch):
    (tmp_path / "Makefile").write_text("data:\n\t@exit 3\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("fedxvit.demo.project_root", lambda: tmp_path)
    with pytest.raises(FedXViTError, match=r"`make data` failed \(exit 2\)"):
        main(["--phases", "data"])
