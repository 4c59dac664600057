"""The server's global validation: sites' scores of the global model pooled by validation count."""

import pytest

from fedxvit.widgets import format_round, weighted_global_metrics


def test_global_validation_is_the_count_weighted_mean_of_the_sites():
    sites = {
        "site1": {"val_accuracy": 0.5, "val_loss": 1.0, "val_count": 10},
        "site2": {"val_accuracy": 0.9, "val_loss": 0.2, "val_count": 30},
    }
    pooled = weighted_global_metrics(sites)
    # by hand: (0.5 * 10 + 0.9 * 30) / 40 and (1.0 * 10 + 0.2 * 30) / 40; the plain means would be 0.7 and 0.6
    assert pooled == {
        "global_val_accuracy": pytest.approx(0.8),
        "global_val_loss": pytest.approx(0.4),
        "val_count": 40,
        "num_sites": 2,
    }
    assert (
        format_round({"round": 3, **pooled})
        == "round 3: global_val_accuracy=0.8000 global_val_loss=0.4000 (n=40, 2 sites)"
    )


def test_no_scored_images_means_no_global_score():
    assert weighted_global_metrics({}) is None
    assert weighted_global_metrics({"site1": {"val_accuracy": 0.0, "val_loss": 0.0, "val_count": 0}}) is None
