"""MONAI loading through public APIs only: the deterministic part cached, the augmentation run on
plain tensors with MONAI's global metadata switch off only meanwhile, seeded, never cached."""

import torch
from monai.data import MetaTensor, get_track_meta
from monai.transforms import Randomizable, Transform

from fedxvit.data import WithoutMetaTracking, make_dataset


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
    augment = WithoutMetaTracking([RecordTrackMeta()])
    assert get_track_meta() is True
    augment({"image": torch.zeros(1, 4, 4)})
    assert RecordTrackMeta.seen == [False] and get_track_meta() is True


def test_training_items_are_augmented_afresh_each_time_after_the_cached_part(tiny_site_dir):
    train = make_dataset(tiny_site_dir, "training", 32, train=True, seed=0)
    steps = train.transform.transforms
    assert isinstance(steps[-1], WithoutMetaTracking) and not any(isinstance(t, Randomizable) for t in steps[:-1])
    first, second = train[0]["image"], train[0]["image"]
    assert type(first) is torch.Tensor and not isinstance(first, MetaTensor) and first.shape == (1, 32, 32)
    assert not torch.equal(first, second), "augmentation runs on every access, after the cache"
    again = make_dataset(tiny_site_dir, "training", 32, train=True, seed=0)
    assert torch.equal(again[0]["image"], first), "same seed, same augmentation"
    evaluation = make_dataset(tiny_site_dir, "validation", 32, train=False)
    assert torch.equal(evaluation[0]["image"], evaluation[0]["image"]), "no augmentation outside training"
