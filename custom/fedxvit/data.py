"""MONAI transforms and loaders for one site folder (read through fedxvit.datalist).

The deterministic part (decode, grayscale, [0, 1] scaling, resize) is cached once in RAM by
CacheDataset, so CPU epochs only pay for the light random augmentation, whose random
transforms run on plain tensors (WithoutMetaTracking).
"""

from __future__ import annotations

import os
from typing import Sequence

import torch
from monai.data import CacheDataset, DataLoader, PILReader, get_track_meta, set_track_meta
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    RandAffined,
    RandFlipd,
    Randomizable,
    RandScaleIntensityd,
    RandShiftIntensityd,
    Resized,
    ScaleIntensityd,
    Transform,
)

from fedxvit.datalist import load_split, shown
from fedxvit.errors import FedXViTError
from fedxvit.paths import resolve_inside

KEYS = ("image",)


def _to_grayscale(image):
    """Imported folders may hold RGB or palette PNG/JPEGs; the model sees one channel."""
    return image.convert("L")


class UnreadableImage(FedXViTError):
    """A site's image that cannot be decoded: the file and the first line of why."""

    def __init__(self, path: str, exc: Exception):
        self.path, self.why = path, (str(exc).splitlines() or [type(exc).__name__])[0]
        super().__init__(f"{path}: {self.why}")


class NamingLoad(Transform):
    """MONAI's LoadImaged, failing with the file's name: a corrupt image otherwise surfaces as a 100-line chain of
    MONAI's transform wrappers that never says which of a site's images it is."""

    def __init__(self, load: LoadImaged):
        self.load = load

    def __call__(self, data):
        try:
            return self.load(data)
        except Exception as exc:
            raise UnreadableImage(str(data[KEYS[0]]), exc) from None


def deterministic_transforms(image_size: int) -> list:
    """Decode -> (1, H, W) float in [0, 1] at image_size x image_size (rows = image rows)."""
    return [
        NamingLoad(
            LoadImaged(keys=KEYS, reader=PILReader(converter=_to_grayscale, reverse_indexing=False), image_only=True)
        ),
        EnsureChannelFirstd(keys=KEYS, channel_dim="no_channel"),
        ScaleIntensityd(keys=KEYS, minv=0.0, maxv=1.0),
        Resized(keys=KEYS, spatial_size=(image_size, image_size), mode="area"),
        EnsureTyped(keys=KEYS, dtype=torch.float32, track_meta=False),
    ]


def augmentation_transforms(image_size: int) -> list:
    """Small, anatomy-preserving changes: slight pose, left-right mirror, scanner-like intensity drift."""
    return [
        RandAffined(
            keys=KEYS,
            prob=0.5,
            rotate_range=0.12,  # about 7 degrees
            scale_range=0.06,
            translate_range=0.04 * image_size,
            padding_mode="zeros",
            mode="bilinear",
        ),
        RandFlipd(keys=KEYS, prob=0.5, spatial_axis=1),  # axis 1 = columns = left-right
        RandScaleIntensityd(keys=KEYS, factors=0.1, prob=0.5),
        RandShiftIntensityd(keys=KEYS, offsets=0.05, prob=0.5),
        EnsureTyped(keys=KEYS, dtype=torch.float32, track_meta=False),
    ]


class WithoutMetaTracking(Randomizable, Transform):
    """One random transform run on plain tensors instead of MetaTensors.

    MONAI's metadata tracking roughly doubles the CPU cost of the per-epoch augmentation and
    nothing downstream reads the metadata. The switch (`set_track_meta`) is global, so it is off
    only while the transform runs. Being a Randomizable Transform, CacheDataset caches every
    transform before it (and none from it on), and Compose or MONAI's DataLoader seed it exactly
    as they would seed the wrapped transform: same seed, same augmentation as without the wrapper.
    """

    def __init__(self, transform: Randomizable):
        self.transform = transform

    def set_random_state(self, seed: int | None = None, state=None) -> "WithoutMetaTracking":
        self.transform.set_random_state(seed=seed, state=state)
        return self

    def randomize(self, data=None) -> None:
        self.transform.randomize(data)

    def __call__(self, data):
        previous = get_track_meta()
        set_track_meta(False)
        try:
            return self.transform(data)
        finally:
            set_track_meta(previous)


def make_transforms(image_size: int, train: bool, seed: int | None = None) -> Compose:
    augmentation = (
        [WithoutMetaTracking(t) if isinstance(t, Randomizable) else t for t in augmentation_transforms(image_size)]
        if train
        else []
    )
    compose = Compose(deterministic_transforms(image_size) + augmentation)
    if seed is not None:
        compose.set_random_state(seed=seed)
    return compose


def make_dataset(
    site_dir: os.PathLike | Sequence[os.PathLike],
    split: str,
    image_size: int,
    train: bool,
    seed: int | None = None,
    progress: bool = False,
    cache_workers: int | None = 1,
) -> CacheDataset:
    """A CacheDataset over one split; only `image` and `label` keys are kept per item.

    Several site folders give their split pooled (the centralized baseline of result_stat)."""
    site_dirs = [site_dir] if isinstance(site_dir, (str, os.PathLike)) else list(site_dir)
    items = [{"image": e["image"], "label": int(e["label"])} for d in site_dirs for e in load_split(d, split)]
    try:  # every image is decoded here, once (cache_rate 1)
        return CacheDataset(
            items,
            transform=make_transforms(image_size, train, seed),
            cache_rate=1.0,
            num_workers=cache_workers,
            progress=progress,
        )
    except RuntimeError as exc:  # MONAI wraps what a transform raises, once per Compose level
        cause = exc
        while cause is not None and not isinstance(cause, UnreadableImage):
            cause = cause.__cause__
        if cause is None:
            raise
        path, why = cause.path, cause.why
        del cause
    # raised outside the handler: the chain would keep MONAI's cache threads' frames alive until exit
    owner = next((d for d in site_dirs if resolve_inside(path, d, environ={}) is not None), site_dirs[0])
    name = shown(path, owner)
    raise FedXViTError(
        f"{name}: this {split} image cannot be decoded ({why.replace(path, name)}); replace it, or remove it and "
        "rewrite the site's datalist"
    )


def make_loader(
    site_dir: os.PathLike | Sequence[os.PathLike],
    split: str,
    image_size: int,
    batch_size: int,
    train: bool,
    num_workers: int = 0,
    seed: int | None = None,
    progress: bool = False,
) -> DataLoader:
    """Batches of {"image": (B, 1, S, S) float, "label": (B,) long}; shuffled and augmented when train."""
    dataset = make_dataset(site_dir, split, image_size, train, seed=seed, progress=progress)
    generator = None
    if seed is not None:
        generator = torch.Generator()
        generator.manual_seed(seed)
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=train, num_workers=num_workers, generator=generator, drop_last=False
    )
