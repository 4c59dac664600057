"""Site and split assignment: disjoint, complete, seeded, and as skewed as asked."""

import numpy as np
import pytest

from data_preparation.splits import assign_sites, train_val_test
from fedxvit.errors import FedXViTError

LABELS = np.repeat(np.arange(4), [300, 200, 250, 250])


def class_shares(labels, parts):
    """Per site, the fraction of its samples in each class."""
    return np.array([np.bincount(labels[p], minlength=4) / len(p) for p in parts])


def mean_kl_to_global(labels, parts):
    """How far site label distributions are from the pooled one (0 = IID)."""
    pooled = np.bincount(labels, minlength=4) / len(labels)
    shares = class_shares(labels, parts)
    return float(np.mean([np.sum(s * np.log((s + 1e-9) / pooled)) for s in shares]))


@pytest.mark.parametrize("method", ["iid", "dirichlet", "quantity"])
def test_sites_are_disjoint_and_cover_everything(method):
    parts = assign_sites(LABELS, 5, method, 0.5, np.random.default_rng(1))
    joined = np.concatenate(parts)
    assert len(parts) == 5
    assert len(joined) == len(np.unique(joined)) == len(LABELS)
    assert set(joined) == set(range(len(LABELS)))
    assert min(len(p) for p in parts) >= 2


@pytest.mark.parametrize("method", ["iid", "dirichlet", "quantity"])
def test_same_seed_same_assignment_other_seed_differs(method):
    first = assign_sites(LABELS, 3, method, 0.5, np.random.default_rng(7))
    again = assign_sites(LABELS, 3, method, 0.5, np.random.default_rng(7))
    other = assign_sites(LABELS, 3, method, 0.5, np.random.default_rng(8))
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other))


def test_iid_sites_share_the_global_class_ratio():
    parts = assign_sites(LABELS, 3, "iid", rng=np.random.default_rng(0))
    pooled = np.bincount(LABELS) / len(LABELS)
    assert np.abs(class_shares(LABELS, parts) - pooled).max() < 0.01
    assert max(len(p) for p in parts) - min(len(p) for p in parts) <= 2


def test_small_alpha_dirichlet_skews_labels_visibly():
    iid = assign_sites(LABELS, 4, "iid", rng=np.random.default_rng(0))
    skewed = assign_sites(LABELS, 4, "dirichlet", 0.1, np.random.default_rng(0))
    assert mean_kl_to_global(LABELS, iid) < 0.01
    assert mean_kl_to_global(LABELS, skewed) > 0.3
    assert class_shares(LABELS, skewed).max() > 0.7


def test_large_alpha_dirichlet_is_close_to_iid():
    parts = assign_sites(LABELS, 4, "dirichlet", 1000.0, np.random.default_rng(0))
    assert mean_kl_to_global(LABELS, parts) < 0.02


def test_quantity_skew_gives_unequal_sizes_with_iid_labels():
    parts = assign_sites(LABELS, 4, "quantity", 0.5, np.random.default_rng(3))
    sizes = sorted(len(p) for p in parts)
    assert sizes[-1] > 2 * sizes[0]
    big = max(parts, key=len)
    assert np.abs(class_shares(LABELS, [big]) - np.bincount(LABELS) / len(LABELS)).max() < 0.08


def test_stratified_split_keeps_class_ratios_and_is_disjoint():
    indices = np.arange(len(LABELS))
    splits = train_val_test(indices, LABELS, 0.15, 0.2, np.random.default_rng(0))
    joined = np.concatenate(list(splits.values()))
    assert sorted(joined) == list(indices)
    pooled = np.bincount(LABELS) / len(LABELS)
    for split, expected in {"training": 0.65, "validation": 0.15, "testing": 0.2}.items():
        assert len(splits[split]) == pytest.approx(expected * len(LABELS), abs=4)
        assert np.abs(np.bincount(LABELS[splits[split]], minlength=4) / len(splits[split]) - pooled).max() < 0.01


def test_stratified_split_keeps_tiny_classes_in_training():
    labels = np.array([0] * 20 + [1])
    splits = train_val_test(np.arange(21), labels, 0.3, 0.3, np.random.default_rng(0))
    assert 20 in splits["training"]


@pytest.mark.parametrize("alpha", [0.0, -1.0])
def test_non_positive_alpha_is_refused(alpha):
    with pytest.raises(FedXViTError, match="--alpha"):
        assign_sites(LABELS, 3, "dirichlet", alpha, np.random.default_rng(0))


def test_more_sites_than_images_is_refused():
    with pytest.raises(FedXViTError, match="--sites 6"):
        assign_sites(np.array([0, 1, 0, 1, 0]), 6, "iid", rng=np.random.default_rng(0))


def test_iid_refuses_a_class_smaller_than_the_site_count_and_names_it():
    labels = np.array([0] * 30 + [1] * 2)
    with pytest.raises(FedXViTError, match="meningioma"):
        assign_sites(labels, 3, "iid", rng=np.random.default_rng(0), class_names=["glioma", "meningioma"])


def test_impossible_dirichlet_minimum_is_refused():
    with pytest.raises(FedXViTError, match="dirichlet"):
        assign_sites(np.zeros(8, int), 4, "dirichlet", 0.01, np.random.default_rng(0), min_per_site=2)


def test_bad_fractions_are_refused():
    with pytest.raises(FedXViTError, match="--val-frac"):
        train_val_test(np.arange(10), np.zeros(10, int), 0.6, 0.5)
