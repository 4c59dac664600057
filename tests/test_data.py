"""MONAI loading through public APIs only: the deterministic part cached, the augmentation run on
plain tensors with MONAI's global metadata switch off only meanwhile, seeded, never cached."""

import torch
from monai.data import CacheDataset, DataLoader, MetaTensor, get_track_meta
from monai.transforms import Compose, Randomizable, Transform

from fedxvit.data import (
    WithoutMetaTracking,
    augmentation_transforms,
    deterministic_transforms,
    make_dataset,
    make_loader,
)
from fedxvit.datalist import load_split


class RecordTrackMeta(Randomizable, Transform):
    """A random transform that notes whether MONAI tracks metadata while it runs."""

    seen = []

    def randomize(self, data=None):
        pass

    def __call__(self, data):
        self.seen.append(get_track_meta())
        return data


def test_augmentation_runs_without_metadata_tracking_and_restores_the_switch():
    RecordTrackMeta.seen = []
    augment = WithoutMetaTracking(RecordTrackMeta())
    assert get_track_meta() is True
    augment({"image": torch.zeros(1, 4, 4)})
    assert RecordTrackMeta.seen == [False] and get_track_meta() is True


def test_training_items_are_augmented_afresh_each_time_after_the_cached_part(tiny_site_dir):
    train = make_dataset(tiny_site_dir, "training", 32, train=True, seed=0)
    steps = train.transform.transforms
    first_random = next(i for i, t in enumerate(steps) if isinstance(t, Randomizable))
    assert first_random == len(deterministic_transforms(32)), "the whole deterministic part is cached"
    assert all(isinstance(t, WithoutMetaTracking) for t in steps if isinstance(t, Randomizable))
    first, second = train[0]["image"], train[0]["image"]
    assert type(first) is torch.Tensor and not isinstance(first, MetaTensor) and first.shape == (1, 32, 32)
    assert not torch.equal(first, second), "augmentation runs on every access, after the cache"
    again = make_dataset(tiny_site_dir, "training", 32, train=True, seed=0)
    assert torch.equal(again[0]["image"], first), "same seed, same augmentation"
    evaluation = make_dataset(tiny_site_dir, "validation", 32, train=False)
    assert torch.equal(evaluation[0]["image"], evaluation[0]["image"]), "no augmentation outside training"


def test_the_wrapper_changes_no_random_draw(tiny_site_dir):
    """Seeded by MONAI's DataLoader as in training, the wrapped transforms augment exactly as the bare ones."""
    items = [{"image": e["image"], "label": int(e["label"])} for e in load_split(tiny_site_dir, "training")]
    bare = CacheDataset(
        items, transform=Compose(deterministic_transforms(32) + augmentation_transforms(32)), progress=False
    )
    bare_loader = DataLoader(bare, batch_size=2, shuffle=True, generator=torch.Generator().manual_seed(0))
    wrapped_loader = make_loader(tiny_site_dir, "training", 32, 2, train=True, seed=0)
    for epoch in range(2):  # each loader run to its end: the sampler draws its next permutation only then
        bare_batches, wrapped_batches = list(bare_loader), list(wrapped_loader)
        assert len(bare_batches) == len(wrapped_batches) == 3
        assert all(torch.equal(a["image"], b["image"]) for a, b in zip(bare_batches, wrapped_batches)), f"epoch {epoch}"
