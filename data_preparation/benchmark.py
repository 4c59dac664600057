"""Embedded benchmark: synthetic brain-tumor MRI slices on real MNI152 anatomy.

No data leaves or enters the machine: the anatomy is the MNI152 T1 template that ships inside
the nilearn wheel. Each image is an axial slice of it, warped by a per-"patient" affine +
elastic deformation, with an inserted lesion (glioma, meningioma, pituitary or none) and a
hospital "scanner profile" of MONAI intensity and MRI-artifact transforms.

Three named scenarios (--scenario):
  default  public/ + site1..site3 under --out (default: data), as `make data` writes them
  skewed   site1..site6 under --out (default: data/skewed), where federation is hard: long-tailed
           sizes (480 down to 40), each hospital's Tumor share drawn from a Dirichlet, a scanner of
           its own per hospital, smaller and fainter lesions. No public set: the expert made on the
           default scenario's data/public serves both.
  longtail site1..site5 with the 4 Phase-1 classes (glioma, meningioma, notumor, pituitary), long-
           tailed overall (notumor : pituitary = 22 : 1), each hospital its own scanner.
           --partition homo: every hospital the same mix; dirichlet: each class cut among the
           hospitals by Dirichlet(--alpha). Out: data/longtail/homo or data/longtail/dirichlet-<alpha>.

Evaluation cohorts (skewed and longtail): each hospital's images are all TRAINING (the scenario's
skew and long tail stay there), and its validation and testing splits are cohorts of their own,
balanced by class and large enough to decide comparisons (--val-per-class, --test-per-class), drawn
from the same hospital's scanner. A `heldout/` hospital with a scanner no training hospital has holds
only such cohorts: never trained on, it is scored as a hospital that joins later. --val-per-class 0
--test-per-class 0 gives the earlier layout (--val-frac/--test-frac of each hospital's images).

Products under --out:
  public/        4-class set (glioma, meningioma, notumor, pituitary) for the Phase-1 expert (default only)
  site1..siteN/  private 2-class sets (Healthy, Tumor) of different sizes and scanner profiles
  heldout/       the held-out hospital's validation and testing cohorts (skewed and longtail)
  benchmark.json the generation parameters (a rerun with the same ones is a no-op)
  counts.json, counts.md

Every image draws from its own RNG keyed by (seed, product, index), so output does not depend
on generation order and the same options give byte-identical files.
"""

import argparse
import json
import shutil
import sys
import time
from functools import lru_cache
from pathlib import Path

import numpy as np

from fedxvit.classes import EXPERT_CLASSES, HEALTHY_NAME, TASK_CLASSES, TUMOR_TYPES, task_label
from fedxvit.datalist import SPLITS, pixel_hash, write_counts, write_site
from fedxvit.errors import FedXViTError, run_cli

GENERATOR = "embedded-benchmark"
FORMAT_VERSION = (
    3  # 2: more conspicuous gliomas and meningiomas; 3: hospital scanners unseen in public, lesion-free window
)
PARAMS_FILE = "benchmark.json"
PUBLIC = "public"
PUBLIC_PRODUCT_ID = 0
MIN_IMAGE_SIZE = 32
CANVAS_MM = 208  # square field of view (mm): the 145 x 181 mm brain with a margin for the warp

# Axial slice ranges in MNI z (mm). Pituitary adenomas sit in the sella turcica, seen on low
# slices; healthy slices also come from there sometimes so slice level alone is no tumor tell.
MID_BRAIN_Z = (-6, 48)
SELLAR_Z = (-24, -14)
HEALTHY_SELLAR_SHARE = 0.2
SELLA_MNI_Y = 5.0  # suprasellar cistern, anterior-posterior position on those slices

# Lesion appearance, calibrated by data_preparation.calibrate (see its report): visible to a
# trained eye yet not trivial for a small CNN trained on one small site.
LESION = {
    "glioma_radius_mm": (15.0, 26.0),
    "glioma_edema_darkening": (0.25, 0.45),
    "glioma_rim_gain": (1.4, 1.7),
    "glioma_necrosis_level": (0.25, 0.45),
    "meningioma_radius_mm": (12.0, 20.0),
    "meningioma_level": (1.25, 1.5),
    "pituitary_radius_mm": (8.0, 12.0),
    "pituitary_level": (1.1, 1.3),
    "min_radius_px": 2.0,
}

WINDOW_GAIN = (0.9, 1.3)  # export window relative to the brain's 99.5th percentile

# Per-patient deformation (pixels are relative to the output image size).
DEFORM = {
    "rotate_rad": 0.26,
    "shear": 0.06,
    "scale": 0.10,
    "translate_frac": 0.04,
    "elastic_spacing_frac": 0.2,
    "elastic_magnitude": (1.0, 2.5),
}

# Scanner profiles, each built from MONAI transforms in `scanner_transforms`. The public archive
# was acquired elsewhere: its images mix the first three profiles, while each hospital has one
# profile of its own that the public set never shows (format 3). So the expert's features meet
# unfamiliar contrasts at the sites, a model fitted to one hospital's contrast fails on another's,
# and pooling hospitals (centrally or federated) is what covers them all.
PUBLIC_SCANNERS = 3
SCANNER_PROFILES = (
    {
        "name": "scanner-A-1.5T",
        "gamma": 1.25,
        "bias_coeff": (0.15, 0.3),
        "noise": "rician",
        "noise_std": (0.02, 0.05),
        "lowres_zoom": (0.45, 0.65),
        "gibbs_alpha": 0.35,
        "spike_prob": 0.0,
    },
    {
        "name": "scanner-B-3T",
        "gamma": 0.8,
        "bias_coeff": (0.05, 0.15),
        "noise": "gaussian",
        "noise_std": (0.01, 0.03),
        "lowres_zoom": (0.85, 1.0),
        "gibbs_alpha": 0.1,
        "spike_prob": 0.0,
    },
    {
        "name": "scanner-C-legacy",
        "gamma": 1.0,
        "bias_coeff": (0.2, 0.4),
        "noise": "rician",
        "noise_std": (0.03, 0.06),
        "lowres_zoom": (0.6, 0.8),
        "gibbs_alpha": 0.2,
        "spike_prob": 0.15,
    },
    # the hospitals' own: a bright protocol, a dark one, and a blurry, ringing older scanner
    {
        "name": "hospital-bright-3T",
        "gamma": 0.6,
        "bias_coeff": (0.1, 0.2),
        "noise": "gaussian",
        "noise_std": (0.01, 0.03),
        "lowres_zoom": (0.8, 1.0),
        "gibbs_alpha": 0.1,
        "spike_prob": 0.0,
    },
    {
        "name": "hospital-dark-1.5T",
        "gamma": 1.5,
        "bias_coeff": (0.1, 0.2),
        "noise": "gaussian",
        "noise_std": (0.01, 0.03),
        "lowres_zoom": (0.8, 1.0),
        "gibbs_alpha": 0.1,
        "spike_prob": 0.0,
    },
    {
        "name": "hospital-legacy-1T",
        "gamma": 1.3,
        "bias_coeff": (0.15, 0.3),
        "noise": "rician",
        "noise_std": (0.02, 0.04),
        "lowres_zoom": (0.55, 0.7),
        "gibbs_alpha": 0.3,
        "spike_prob": 0.0,
    },
    # three more hospitals for the skewed scenario: a noisy low-field magnet, a 3T with k-space
    # spikes, and a strongly ringing scanner with a deep bias field
    {
        "name": "hospital-lowfield-0.5T",
        "gamma": 1.1,
        "bias_coeff": (0.2, 0.35),
        "noise": "rician",
        "noise_std": (0.04, 0.07),
        "lowres_zoom": (0.45, 0.6),
        "gibbs_alpha": 0.2,
        "spike_prob": 0.0,
    },
    {
        "name": "hospital-spikes-3T",
        "gamma": 0.9,
        "bias_coeff": (0.05, 0.1),
        "noise": "gaussian",
        "noise_std": (0.01, 0.02),
        "lowres_zoom": (0.9, 1.0),
        "gibbs_alpha": 0.05,
        "spike_prob": 0.3,
    },
    {
        "name": "hospital-ringing-1.5T",
        "gamma": 1.2,
        "bias_coeff": (0.3, 0.45),
        "noise": "gaussian",
        "noise_std": (0.02, 0.04),
        "lowres_zoom": (0.7, 0.85),
        "gibbs_alpha": 0.5,
        "spike_prob": 0.0,
    },
    # the held-out hospital's scanner (evaluation cohorts): no training hospital, nor the public set, has it
    {
        "name": "hospital-heldout-0.7T",
        "gamma": 0.8,
        "bias_coeff": (0.1, 0.25),
        "noise": "rician",
        "noise_std": (0.03, 0.05),
        "lowres_zoom": (0.6, 0.75),
        "gibbs_alpha": 0.15,
        "spike_prob": 0.1,
    },
)
HELDOUT = "heldout"
DEFAULT_SITE_SCANNERS = (3, 4, 5)  # indices into SCANNER_PROFILES: bright, dark, legacy

# Faint lesions: smaller and closer to the surrounding tissue than LESION, so that no single hospital
# learns them from its own few images. The long-tailed scenario's (and the skewed one's until 2026-12-05).
FAINT_LESION = {
    "glioma_radius_mm": (8.0, 14.0),
    "glioma_edema_darkening": (0.05, 0.15),
    "glioma_rim_gain": (1.0, 1.12),
    "glioma_necrosis_level": (0.5, 0.7),
    "meningioma_radius_mm": (7.0, 12.0),
    "meningioma_level": (0.95, 1.05),
    "pituitary_radius_mm": (5.0, 8.0),
    "pituitary_level": (0.9, 1.0),
    "min_radius_px": 2.0,
}
# Skewed scenario lesions, midway between FAINT_LESION and LESION: on the calibration seed's validation cohorts
# centralized training learns them (91.9% at the comparisons' budget) while FedAvg over near-one-class hospitals
# barely moves (72.0%, from 68.2). With FAINT_LESION neither learns (gap 6.7 points), with LESION both do (4.8):
# docs/measurements.md, "Toward the 8-point gap".
SKEWED_LESION = {
    "glioma_radius_mm": (11.0, 18.0),
    "glioma_edema_darkening": (0.12, 0.25),
    "glioma_rim_gain": (1.1, 1.3),
    "glioma_necrosis_level": (0.4, 0.6),
    "meningioma_radius_mm": (9.0, 15.0),
    "meningioma_level": (1.05, 1.2),
    "pituitary_radius_mm": (6.0, 10.0),
    "pituitary_level": (1.0, 1.15),
    "min_radius_px": 2.0,
}

# Named scenarios, as data. `default` is what `make data` has always written (its options come
# from the command line); `skewed` fixes its hospitals: sizes, the Dirichlet rule for their
# Tumor shares (a seed of its own, so every --seed gives the same hospital mix), lesions and
# scanners. --seed varies the images only.
SCENARIOS = {
    "default": {
        "out": "data",
        "public": True,
        "site_sizes": (150, 300, 450),
        "healthy_fraction": 0.37,
        "lesion": LESION,
        "site_scanners": DEFAULT_SITE_SCANNERS,
    },
    "skewed": {
        "out": "data/skewed",
        "public": False,
        "site_sizes": (480, 300, 180, 120, 60, 40),
        "tumor_share_dirichlet": {"alpha": 0.1, "seed": 2},  # 0.5 until issue #26: too mild to need federation
        "lesion": SKEWED_LESION,
        "site_scanners": (3, 4, 5, 6, 7, 8),
        # per hospital and class: 6 x 2 x 100 = 1200 test and 6 x 2 x 42 = 504 validation images
        "cohorts": {"val_per_class": 42, "test_per_class": 100, "heldout_scanner": 9},
    },
}
DEFAULT_SCENARIO = "default"

# The long-tailed 4-class scenario (FedMAS, issue #14): class shares of all hospitals' images together;
# notumor : pituitary = 0.44 : 0.02 = 22 : 1. `homo` gives every hospital this mix; `dirichlet` cuts each
# class among the hospitals by Dirichlet(alpha) from the scenario's own seed (same mix for every --seed).
LONGTAIL_CLASS_SHARES = {"glioma": 0.34, "meningioma": 0.20, "notumor": 0.44, "pituitary": 0.02}
PARTITIONS = ("homo", "dirichlet")
DEFAULT_ALPHA = 0.5
SCENARIOS["longtail"] = {
    "out": "data/longtail",
    "public": False,
    "site_sizes": (600, 480, 360, 300, 240),
    "class_shares": LONGTAIL_CLASS_SHARES,
    "partition_seed": 3,
    "lesion": FAINT_LESION,  # faint and small: the expert made on data/public is far from done
    "site_scanners": (3, 4, 5, 6, 7),
    # per hospital and class: 5 x 50 = 250 test images of every class pooled, 5 x 4 x 25 = 500 validation
    "cohorts": {"val_per_class": 25, "test_per_class": 50, "heldout_scanner": 9},
}


# ----------------------------------------------------------------------------- anatomy


@lru_cache(maxsize=1)
def mni_volumes() -> dict:
    """The T1 template and its masks, loaded once from the nilearn wheel (no download)."""
    from nilearn import datasets

    template = datasets.load_mni152_template(resolution=1)
    return {
        "t1": np.asarray(template.get_fdata(), dtype=np.float32),
        "brain": np.asarray(datasets.load_mni152_brain_mask(resolution=1).get_fdata() > 0.5),
        "wm": np.asarray(datasets.load_mni152_wm_mask(resolution=1).get_fdata() > 0.5),
        "affine": np.asarray(template.affine),
    }


def _canvas_offset(length: int) -> int:
    """Where index 0 of a centered axis of `length` lands on the canvas (negative when cropped)."""
    return (CANVAS_MM - length) // 2


def _centered_window(length: int) -> tuple:
    """(source slice, canvas slice) that center-crop or center-pad an axis onto the canvas."""
    offset = _canvas_offset(length)
    start, stop = max(0, -offset), min(length, CANVAS_MM - offset)
    return slice(start, stop), slice(start + offset, stop + offset)


def _to_canvas(plane: np.ndarray, size: int, smooth: bool) -> np.ndarray:
    """Rotate to radiological view (anterior up), center on the square canvas, resize to `size`."""
    import torch
    import torch.nn.functional as F

    plane = np.rot90(plane).astype(np.float32)
    canvas = np.zeros((CANVAS_MM, CANVAS_MM), np.float32)
    (src_r, dst_r), (src_c, dst_c) = (_centered_window(n) for n in plane.shape)
    canvas[dst_r, dst_c] = plane[src_r, src_c]
    tensor = torch.from_numpy(canvas)[None, None]
    mode = dict(mode="bilinear", antialias=True, align_corners=False) if smooth else dict(mode="area")
    return F.interpolate(tensor, size=(size, size), **mode)[0, 0].numpy()


@lru_cache(maxsize=512)
def anatomy_slice(z_mm: int, size: int) -> dict:
    """One axial slice of template, brain and white-matter masks at the output size (cached)."""
    volumes = mni_volumes()
    k = int(round((np.linalg.inv(volumes["affine"]) @ np.array([0.0, 0.0, z_mm, 1.0]))[2]))
    return {
        "t1": _to_canvas(volumes["t1"][:, :, k], size, smooth=True),
        "brain": _to_canvas(volumes["brain"][:, :, k], size, smooth=False) > 0.5,
        "wm": _to_canvas(volumes["wm"][:, :, k], size, smooth=False) > 0.5,
    }


def mni_to_pixel(x_mm: float, y_mm: float, size: int) -> tuple:
    """(row, col) of an MNI (x, y) point on the canvas, matching `_to_canvas`."""
    volumes = mni_volumes()
    inv = np.linalg.inv(volumes["affine"])
    i, j = (inv @ np.array([x_mm, y_mm, 0.0, 1.0]))[:2]
    nx, ny = volumes["t1"].shape[:2]
    # rot90 maps voxel (i, j) to (row = ny - 1 - j, col = i); then the centered padding
    row = (ny - 1 - j) + _canvas_offset(ny)
    col = i + _canvas_offset(nx)
    scale = size / CANVAS_MM
    return (row + 0.5) * scale - 0.5, (col + 0.5) * scale - 0.5


# ----------------------------------------------------------------------------- lesions


def _smooth_noise(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    """Zero-mean, unit-std smooth random field: the irregularity of boundaries and texture."""
    from scipy.ndimage import gaussian_filter

    field = gaussian_filter(rng.standard_normal((size, size)).astype(np.float32), sigma)
    return field / (field.std() + 1e-6)


def _radius_px(rng, radius_range_mm, size, min_radius_px) -> float:
    return max(rng.uniform(*radius_range_mm) * size / CANVAS_MM, min_radius_px)


def _distance_map(size: int, row: float, col: float, stretch=(1.0, 1.0)) -> np.ndarray:
    rows, cols = np.mgrid[0:size, 0:size].astype(np.float32)
    return np.hypot((rows - row) / stretch[0], (cols - col) / stretch[1])


def _pick_pixel(rng, candidates: np.ndarray) -> tuple:
    rows, cols = np.nonzero(candidates)
    pick = rng.integers(len(rows))
    return float(rows[pick]), float(cols[pick])


def insert_glioma(image, anatomy, rng, lesion=LESION):
    """Intra-axial, irregular, heterogeneous: enhancing rim, necrotic core, edema, in white matter."""
    from scipy.ndimage import distance_transform_edt

    size = image.shape[0]
    radius = _radius_px(rng, lesion["glioma_radius_mm"], size, lesion["min_radius_px"])
    depth = distance_transform_edt(anatomy["brain"])
    candidates = anatomy["wm"] & (depth > radius * 0.9)
    if not candidates.any():
        candidates = depth >= depth.max() * 0.6
    row, col = _pick_pixel(rng, candidates)
    shape_noise = _smooth_noise(rng, size, sigma=max(radius / 2.5, 1.0))
    distance = _distance_map(size, row, col) / radius + 0.25 * shape_noise
    whole = (distance < 1.0) & anatomy["brain"]
    core = distance < rng.uniform(0.55, 0.75)
    necrosis = distance < rng.uniform(0.2, 0.35)
    texture = 1.0 + 0.12 * _smooth_noise(rng, size, sigma=1.0)
    out = image.copy()
    edema_gain = 1.0 - rng.uniform(*lesion["glioma_edema_darkening"])
    out[whole] *= edema_gain
    bright_tissue = np.percentile(image[anatomy["brain"]], 95)
    out[core & whole] = (rng.uniform(*lesion["glioma_rim_gain"]) * bright_tissue * texture)[core & whole]
    out[necrosis & whole] = (rng.uniform(*lesion["glioma_necrosis_level"]) * texture)[necrosis & whole]
    return out, whole


def insert_meningioma(image, anatomy, rng, lesion=LESION):
    """Extra-axial, well-circumscribed, homogeneous, its flat side on the dura at the brain's edge."""
    from scipy.ndimage import binary_erosion

    size = image.shape[0]
    radius = _radius_px(rng, lesion["meningioma_radius_mm"], size, lesion["min_radius_px"])
    brain = anatomy["brain"]
    edge = brain & ~binary_erosion(brain)
    row, col = _pick_pixel(rng, edge)
    center_r, center_c = np.array(np.nonzero(brain)).mean(axis=1)
    inward = np.array([center_r - row, center_c - col])
    inward /= np.linalg.norm(inward) + 1e-6
    depth = rng.uniform(0.2, 0.5) * radius
    stretch = (1.0, rng.uniform(1.0, 1.4))
    distance = _distance_map(size, row + inward[0] * depth, col + inward[1] * depth, stretch) / radius
    inside = (distance < 1.0) & brain
    out = image.copy()
    level = rng.uniform(*lesion["meningioma_level"])
    out[inside] = level * (1.0 + 0.03 * _smooth_noise(rng, size, sigma=1.5))[inside]
    return out, inside


def insert_pituitary(image, anatomy, rng, lesion=LESION):
    """Small, round, midline lesion in the sellar region of a low slice."""
    size = image.shape[0]
    radius = _radius_px(rng, lesion["pituitary_radius_mm"], size, lesion["min_radius_px"])
    row, col = mni_to_pixel(rng.uniform(-1.5, 1.5), SELLA_MNI_Y + rng.uniform(-3.0, 3.0), size)
    distance = _distance_map(size, row, col, stretch=(rng.uniform(0.8, 1.0), 1.0)) / radius
    inside = distance < 1.0
    out = image.copy()
    level = rng.uniform(*lesion["pituitary_level"])
    out[inside] = level * (1.0 + 0.05 * _smooth_noise(rng, size, sigma=1.0))[inside]
    return out, inside


LESION_MAKERS = {"glioma": insert_glioma, "meningioma": insert_meningioma, "pituitary": insert_pituitary}


def slice_level(tumor_class: str, rng: np.random.Generator) -> int:
    """Axial MNI z (mm) of the slice: sellar for pituitary, mid-brain for the others."""
    if tumor_class == "pituitary" or (tumor_class == HEALTHY_NAME and rng.random() < HEALTHY_SELLAR_SHARE):
        return int(rng.integers(SELLAR_Z[0], SELLAR_Z[1] + 1))
    return int(rng.integers(MID_BRAIN_Z[0], MID_BRAIN_Z[1] + 1))


# ----------------------------------------------------------------------------- MONAI transforms


@lru_cache(maxsize=8)
def patient_deformation(size: int):
    """Affine + elastic warp applied to image and mask together (bilinear / nearest)."""
    from monai.transforms import Rand2DElasticd

    return Rand2DElasticd(
        keys=("image", "mask"),
        prob=1.0,
        spacing=max(size * DEFORM["elastic_spacing_frac"], 4.0),
        magnitude_range=DEFORM["elastic_magnitude"],
        rotate_range=DEFORM["rotate_rad"],
        shear_range=DEFORM["shear"],
        scale_range=DEFORM["scale"],
        translate_range=size * DEFORM["translate_frac"],
        mode=("bilinear", "nearest"),
        padding_mode="zeros",
    )


@lru_cache(maxsize=16)
def scanner_transforms(profile_index: int):
    """A hospital's acquisition: bias field, contrast, resolution loss, Gibbs ringing, spikes, noise."""
    from monai.transforms import (
        AdjustContrast,
        Compose,
        GibbsNoise,
        RandBiasField,
        RandGaussianNoise,
        RandKSpaceSpikeNoise,
        RandRicianNoise,
        RandSimulateLowResolution,
    )

    profile = SCANNER_PROFILES[profile_index]
    noise_cls = RandRicianNoise if profile["noise"] == "rician" else RandGaussianNoise
    return Compose(
        [
            RandBiasField(degree=3, coeff_range=profile["bias_coeff"], prob=1.0),
            AdjustContrast(gamma=profile["gamma"]),
            RandSimulateLowResolution(
                prob=1.0, zoom_range=profile["lowres_zoom"], downsample_mode="area", upsample_mode="bilinear"
            ),
            GibbsNoise(alpha=profile["gibbs_alpha"]),
            RandKSpaceSpikeNoise(prob=profile["spike_prob"], intensity_range=(5.5, 7.0)),
            noise_cls(prob=1.0, mean=0.0, std=profile["noise_std"][1], sample_std=True),
        ]
    )


def to_uint8(image: np.ndarray, brain: np.ndarray, window_gain: float = 1.0) -> np.ndarray:
    """Window to the tissue's bright end like a scanner's PNG export, then quantize.

    Callers pass the brain without the lesion as `brain`: a window set on the bright lesion
    would dim the rest of a tumor slice, and mean brightness alone would tell tumor from healthy
    (format 2: 74% against a 63% majority; 89% within one site). `window_gain` varies the export
    window per image, as viewers and PACS do."""
    reference = (np.percentile(image[brain], 99.5) if brain.any() else image.max()) * window_gain
    return np.clip(np.round(np.clip(image, 0.0, None) / max(reference, 1e-6) * 255.0), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- one image


def image_rng(seed: int, product_id: int, index: int, purpose: int = 0) -> np.random.Generator:
    """Independent stream per (seed, product, image): order-free and disjoint between products."""
    return np.random.default_rng(np.random.SeedSequence(entropy=seed, spawn_key=(product_id, purpose, index)))


def synthesize(
    expert_class: str, size: int, profile_index: int, rng: np.random.Generator, lesion: dict = LESION
) -> tuple:
    """One slice: anatomy -> lesion -> patient deformation -> scanner profile; (uint8 image, bool mask)."""
    import torch

    anatomy = anatomy_slice(slice_level(expert_class, rng), size)
    image = anatomy["t1"] * rng.uniform(0.92, 1.08)
    mask = np.zeros_like(anatomy["brain"])
    if expert_class in LESION_MAKERS:
        image, mask = LESION_MAKERS[expert_class](image, anatomy, rng, lesion)
    warp = patient_deformation(size)
    warp.set_random_state(seed=int(rng.integers(2**31)))
    warped = warp(
        {
            "image": torch.from_numpy(np.ascontiguousarray(image, np.float32))[None],
            "mask": torch.from_numpy(np.stack([mask, anatomy["brain"]]).astype(np.float32)),
        }
    )
    image = np.asarray(warped["image"])[0]
    mask, brain = np.asarray(warped["mask"]) > 0.5
    scanner = scanner_transforms(profile_index)
    scanner.set_random_state(seed=int(rng.integers(2**31)))
    image = np.asarray(scanner(torch.from_numpy(np.clip(image, 0.0, None))[None]), dtype=np.float32)[0]
    return to_uint8(image, brain & ~mask, window_gain=rng.uniform(*WINDOW_GAIN)), mask  # lesion-free window


def render(job: dict) -> dict:
    """Make and save one image (and mask); retries the draw if a warp pushed the lesion off the slice."""
    from PIL import Image

    rng = image_rng(job["seed"], job["product_id"], job["index"])
    for _ in range(20):
        pixels, mask = synthesize(
            job["expert_class"], job["size"], job["profile_index"], rng, SCENARIOS[job["scenario"]]["lesion"]
        )
        if (job["expert_class"] == HEALTHY_NAME) or mask.sum() >= 3:
            break
    site_dir = Path(job["site_dir"])
    entry = {"image": f"images/{job['name']}.png", "label": job["label"]}
    Image.fromarray(pixels, mode="L").save(site_dir / entry["image"])
    if job["expert_class"] != HEALTHY_NAME:
        entry["mask"] = f"masks/{job['name']}.png"
        Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(site_dir / entry["mask"])
    return {"entry": entry, "pixel_hash": pixel_hash(pixels), "product": site_dir.name}


# ----------------------------------------------------------------------------- products


def public_plan(args) -> list:
    """(expert class, label) per public image, `--public-per-class` of each, shuffled so a file's
    name or index says nothing about its class."""
    classes = [name for name in EXPERT_CLASSES for _ in range(args.public_per_class)]
    order = image_rng(args.seed, PUBLIC_PRODUCT_ID, 0, purpose=1).permutation(len(classes))
    return [(classes[i], EXPERT_CLASSES.index(classes[i])) for i in order]


def splits_possible(n: int, val_frac: float, test_frac: float) -> bool:
    """Whether a class of n images gets at least one image in training, validation and testing."""
    n_val, n_test = round(n * val_frac), round(n * test_frac)
    return n_val >= 1 and n_test >= 1 and n - n_val - n_test >= 1


def min_class_images(val_frac: float, test_frac: float) -> int:
    """The fewest images of a class that still reach every split."""
    return next(n for n in range(1, 10_000) if splits_possible(n, val_frac, test_frac))


def cohorts_on(args) -> bool:
    """Whether validation and testing are evaluation cohorts of their own (not fractions of the images)."""
    return bool(getattr(args, "val_per_class", 0) or getattr(args, "test_per_class", 0))


def class_floor(args) -> int:
    """The fewest images a class present at a hospital may have: one for training when the cohorts are the
    validation and testing splits, else enough to reach every split."""
    return 1 if cohorts_on(args) else min_class_images(args.val_frac, args.test_frac)


def cohort_plan(args, product_id: int, four_classes: bool) -> list:
    """(expert class, label, split) of one hospital's validation and testing cohorts: per class
    --val-per-class and --test-per-class images (a 2-class Tumor cohort spreads over the tumor types),
    shuffled within each split."""
    if four_classes:
        classes = [[(name, EXPERT_CLASSES.index(name))] for name in EXPERT_CLASSES]
    else:
        classes = [[(HEALTHY_NAME, task_label(HEALTHY_NAME))], [(t, task_label(t)) for t in TUMOR_TYPES]]
    plan = []
    for purpose, (split, per_class) in enumerate(
        (("validation", args.val_per_class), ("testing", args.test_per_class)), start=4
    ):
        items = [kinds[i % len(kinds)] for kinds in classes for i in range(per_class)]
        order = image_rng(args.seed, product_id, 0, purpose=purpose).permutation(len(items))
        plan += [(*items[i], split) for i in order]
    return plan


def tumor_shares(scenario: str, n_sites: int) -> list:
    """Each hospital's target Tumor share, Dirichlet([alpha, alpha]) per hospital from the
    scenario's own seed (the same for every --seed and for the first n of any longer list)."""
    rule = SCENARIOS[scenario]["tumor_share_dirichlet"]
    rng = np.random.default_rng(rule["seed"])
    return [float(share) for share in rng.dirichlet([rule["alpha"], rule["alpha"]], size=n_sites)[:, 0]]


def site_healthy_counts(args) -> list:
    """Healthy images per site: the --healthy-fraction everywhere (default scenario), or each
    hospital's Dirichlet Tumor share, kept far enough from 0% and 100% that both classes reach
    every split."""
    if "tumor_share_dirichlet" not in SCENARIOS[args.scenario]:
        return [int(round(size * args.healthy_fraction)) for size in args.site_sizes]
    floor = class_floor(args)
    counts = []
    for size, share in zip(args.site_sizes, tumor_shares(args.scenario, len(args.site_sizes))):
        n_tumor = min(max(int(round(size * share)), floor), size - floor)
        counts.append(size - n_tumor)
    return counts


def site_plan(args, site_number: int, size: int, n_healthy: int) -> list:
    """(expert class, task label) per site image: n_healthy healthy, tumors spread evenly over the
    three types, shuffled so the index says nothing about the class."""
    rng = image_rng(args.seed, site_number, 0, purpose=1)
    classes = [HEALTHY_NAME] * n_healthy + [TUMOR_TYPES[i % len(TUMOR_TYPES)] for i in range(size - n_healthy)]
    return [(classes[i], task_label(classes[i])) for i in rng.permutation(len(classes))]


def apportion(total: int, proportions) -> list:
    """Whole counts summing to `total` in the given proportions (largest remainder, ties to the first)."""
    raw = np.asarray(proportions, dtype=float) * total / max(float(np.sum(proportions)), 1e-12)
    counts = np.floor(raw).astype(int)
    for i in np.argsort(-(raw - counts), kind="stable")[: total - int(counts.sum())]:
        counts[i] += 1
    return [int(c) for c in counts]


def site_class_counts(args) -> list:
    """{expert class: images} per hospital of a class-share scenario (longtail).

    homo: each hospital its size x the shares. dirichlet: each class's total (all sizes x its share) cut
    among the hospitals by Dirichlet(alpha); a hospital's share of a class too small to reach every split
    goes to the hospital holding most of that class, so every class present at a hospital is trained,
    validated and tested there."""
    scenario = SCENARIOS[args.scenario]
    shares = scenario["class_shares"]
    if args.partition == "homo":
        return [dict(zip(shares, apportion(size, list(shares.values())))) for size in args.site_sizes]
    floor = class_floor(args)
    rng = np.random.default_rng([scenario["partition_seed"], int(round(args.alpha * 1000))])
    totals = apportion(sum(args.site_sizes), list(shares.values()))
    per_site = [dict.fromkeys(shares, 0) for _ in args.site_sizes]
    for name, total in zip(shares, totals):
        counts = apportion(total, rng.dirichlet([args.alpha] * len(args.site_sizes)))
        keeper = int(np.argmax(counts))
        for k, count in enumerate(counts):
            target = k if count >= floor else keeper
            per_site[target][name] += count
    return per_site


def class_count_plan(args, site_number: int, counts: dict) -> list:
    """(expert class, 4-class label) per site image of a class-share scenario, shuffled."""
    rng = image_rng(args.seed, site_number, 0, purpose=1)
    classes = [name for name, n in counts.items() for _ in range(n)]
    return [(classes[i], EXPERT_CLASSES.index(classes[i])) for i in rng.permutation(len(classes))]


def split_entries(product_id: int, args, labels: list, entries: list) -> dict:
    """Stratified training/validation/testing lists, seeded per product."""
    from data_preparation.splits import train_val_test

    labels = np.asarray(labels)
    parts = train_val_test(
        np.arange(len(labels)),
        labels,
        args.val_frac,
        args.test_frac,
        rng=image_rng(args.seed, product_id, 0, purpose=2),
    )
    return {split: [entries[i] for i in indices] for split, indices in parts.items()}


def product_jobs(args, out: Path) -> list:
    """Every image to render, as picklable job dicts, with its product's folder and profile."""
    jobs = []
    scenario = SCENARIOS[args.scenario]
    site_scanners = scenario["site_scanners"]
    products = [(PUBLIC, PUBLIC_PRODUCT_ID, public_plan(args))] if scenario["public"] else []
    if "class_shares" in scenario:
        products += [
            (f"site{k}", k, class_count_plan(args, k, counts))
            for k, counts in enumerate(site_class_counts(args), start=1)
        ]
    else:
        products += [
            (f"site{k}", k, site_plan(args, k, size, n_healthy))
            for k, (size, n_healthy) in enumerate(zip(args.site_sizes, site_healthy_counts(args)), start=1)
        ]
    four_classes = "class_shares" in scenario
    if cohorts_on(args):  # every hospital image trains; each hospital and the held-out one get cohorts
        products = [
            (name, product_id, [(*item, "training") for item in plan] + cohort_plan(args, product_id, four_classes))
            for name, product_id, plan in products
        ]
        products.append((HELDOUT, len(args.site_sizes) + 1, cohort_plan(args, len(args.site_sizes) + 1, four_classes)))
    for name, product_id, plan in products:
        for index, (expert_class, label, *split) in enumerate(plan):
            profile_rng = image_rng(args.seed, product_id, index, purpose=3)
            if name == PUBLIC:
                profile_index = int(profile_rng.integers(PUBLIC_SCANNERS))
            elif name == HELDOUT:
                profile_index = scenario["cohorts"]["heldout_scanner"]
            else:
                profile_index = site_scanners[(product_id - 1) % len(site_scanners)]
            jobs.append(
                {
                    "seed": args.seed,
                    "product_id": product_id,
                    "index": index,
                    "label": label,
                    "expert_class": expert_class,
                    "size": args.image_size,
                    "profile_index": profile_index,
                    "scenario": args.scenario,
                    "site_dir": str(out / name),
                    "name": f"{name}-{index:05d}",
                    **({"split": split[0]} if split else {}),
                }
            )
    return jobs


def _worker_init() -> None:
    import torch

    torch.set_num_threads(1)


def render_all(jobs: list, workers: int) -> list:
    """Render every job with a tqdm bar; results come back in job order whatever the worker count."""
    from tqdm import tqdm

    bar = dict(total=len(jobs), desc="benchmark images", unit="img", file=sys.stdout, mininterval=1.0)
    if workers <= 1:
        _worker_init()
        return [render(job) for job in tqdm(jobs, **bar)]
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(workers, initializer=_worker_init) as pool:
        return list(tqdm(pool.imap(render, jobs, chunksize=16), **bar))


def check_disjoint(results: list) -> None:
    """No picture may appear twice, within or across products (public vs private leakage)."""
    seen = {}
    for result in results:
        other = seen.setdefault(result["pixel_hash"], result["entry"]["image"])
        if other != result["entry"]["image"]:
            raise RuntimeError(f"duplicate image content: {other} and {result['entry']['image']} ({result['product']})")


def write_products(args, out: Path, jobs: list, results: list) -> None:
    """datalist.json + dataset.json per product, through fedxvit.datalist."""
    by_product = {}
    for job, result in zip(jobs, results):
        by_product.setdefault(Path(job["site_dir"]).name, []).append((job, result))
    params = generation_params(args)
    for name, pairs in by_product.items():
        job0 = pairs[0][0]
        if "split" in job0:  # evaluation cohorts: each image's split was planned with it
            entries = {split: [r["entry"] for j, r in pairs if j["split"] == split] for split in SPLITS}
        else:
            entries = split_entries(
                job0["product_id"], args, [j["label"] for j, _ in pairs], [r["entry"] for _, r in pairs]
            )
        is_public = name == PUBLIC
        four_classes = is_public or "site_class_counts" in params
        provenance = {
            "generator": GENERATOR,
            "seed": args.seed,
            "product": name,
            **params,
            "scanner_profile": "mixed" if is_public else SCANNER_PROFILES[job0["profile_index"]]["name"],
            "anatomy": "MNI152 T1 1mm template (nilearn)",
        }
        if name == HELDOUT:
            provenance["role"] = "held-out hospital: validation and testing cohorts only, never trained on"
        elif "site_tumor_shares" in params and not is_public:
            provenance["tumor_share"] = params["site_tumor_shares"][job0["product_id"] - 1]
        if "site_class_counts" in params and not is_public and name != HELDOUT:
            provenance["class_counts"] = params["site_class_counts"][job0["product_id"] - 1]
        write_site(out / name, entries, EXPERT_CLASSES if four_classes else TASK_CLASSES, provenance)


# ----------------------------------------------------------------------------- CLI and reuse


def generation_params(args) -> dict:
    """Everything that determines the output bytes; compared on rerun. The default scenario's
    dict is what it has always been (no "scenario" key), so its files stay byte-identical."""
    if args.scenario == DEFAULT_SCENARIO:
        return {
            "format_version": FORMAT_VERSION,
            "seed": args.seed,
            "image_size": args.image_size,
            "public_per_class": args.public_per_class,
            "site_sizes": list(args.site_sizes),
            "healthy_fraction": args.healthy_fraction,
            "val_frac": args.val_frac,
            "test_frac": args.test_frac,
        }
    scenario = SCENARIOS[args.scenario]
    if "class_shares" in scenario:
        counts = site_class_counts(args)
        sizes = [sum(c.values()) for c in counts]
        own = {
            "partition": args.partition,
            **({"alpha": args.alpha} if args.partition == "dirichlet" else {}),
            "class_shares": scenario["class_shares"],
            "site_class_counts": counts,
        }
    else:
        healthy, sizes = site_healthy_counts(args), list(args.site_sizes)
        own = {
            "tumor_share_dirichlet": scenario["tumor_share_dirichlet"],
            "site_tumor_shares": [round(1 - h / size, 4) for h, size in zip(healthy, sizes)],
        }
    scanners = scenario["site_scanners"]
    params = {
        "format_version": FORMAT_VERSION,
        "scenario": args.scenario,
        "seed": args.seed,
        "image_size": args.image_size,
        "site_sizes": sizes,
        **own,
        "site_scanners": [
            SCANNER_PROFILES[scanners[(k - 1) % len(scanners)]]["name"] for k in range(1, len(sizes) + 1)
        ],
        "lesion": scenario["lesion"],
    }
    if cohorts_on(args):
        params["cohorts"] = {
            "val_per_class": args.val_per_class,
            "test_per_class": args.test_per_class,
            "heldout_scanner": SCANNER_PROFILES[scenario["cohorts"]["heldout_scanner"]]["name"],
        }
    else:
        params.update(val_frac=args.val_frac, test_frac=args.test_frac)
    return json.loads(json.dumps(params))  # tuples as lists: equal to the copy read back from benchmark.json


def owned_paths(out: Path, params: dict) -> list:
    """The paths a run with `params` writes under out (only these are ever deleted)."""
    names = [PUBLIC] + [f"site{k}" for k in range(1, len(params.get("site_sizes", [])) + 1)]
    names += [HELDOUT] if "cohorts" in params else []
    names += [PARAMS_FILE, "counts.json", "counts.md", "calibration.json", "federated_gap.json", "budget.json"]
    return [out / name for name in names]


def remove_paths(paths: list) -> None:
    for path in paths:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def prepare_out(out: Path, params: dict, force: bool) -> bool:
    """True when `out` already holds this exact benchmark; clears stale products otherwise."""
    params_path = out / PARAMS_FILE
    previous = None
    if params_path.is_file():
        try:
            previous = json.loads(params_path.read_text()).get("params")
        except (json.JSONDecodeError, AttributeError):
            previous = {}
        if previous == params and not force:
            return True
        if not force:
            changed = sorted(k for k in set(params) | set(previous or {}) if (previous or {}).get(k) != params.get(k))
            raise FedXViTError(
                f"{out} holds a benchmark made with other parameters ({', '.join(changed)}): "
                f"use --force to regenerate it or choose another --out"
            )
    leftovers = [p for p in owned_paths(out, params) if p.exists()]
    if previous is None and leftovers and not force:
        raise FedXViTError(
            f"{leftovers[0]} exists but {params_path} does not (an interrupted run?): use --force to regenerate"
        )
    remove_paths(owned_paths(out, previous or {}) + owned_paths(out, params))
    return False


def site_sizes(text: str) -> list:
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not sizes:
        raise argparse.ArgumentTypeError("needs at least one site size")
    return sizes


def validate(args) -> None:
    """One-line errors naming the option, before anything is written."""
    if args.image_size < MIN_IMAGE_SIZE:
        raise FedXViTError(f"--image-size must be at least {MIN_IMAGE_SIZE}, got {args.image_size}")
    public = SCENARIOS[args.scenario]["public"]
    if public and not 0.0 < args.healthy_fraction < 1.0:
        raise FedXViTError(f"--healthy-fraction must be between 0 and 1 (exclusive), got {args.healthy_fraction}")
    if not (0 < args.val_frac < 1 and 0 < args.test_frac < 1 and args.val_frac + args.test_frac < 1):
        raise FedXViTError(
            f"--val-frac {args.val_frac} and --test-frac {args.test_frac} must each be in (0, 1) and sum to less than 1"
        )
    if args.workers < 1:
        raise FedXViTError(f"--workers must be at least 1, got {args.workers}")
    if public and not splits_possible(args.public_per_class, args.val_frac, args.test_frac):
        raise FedXViTError(
            f"--public-per-class {args.public_per_class} is too small to give every class "
            f"images in training, validation and testing"
        )
    if any(size < 1 for size in args.site_sizes):
        raise FedXViTError(f"--site-sizes must all be at least 1, got {','.join(map(str, args.site_sizes))}")
    if cohorts_on(args) and min(args.val_per_class, args.test_per_class) < 1:
        raise FedXViTError(
            f"--val-per-class {args.val_per_class} and --test-per-class {args.test_per_class}: both at least 1 "
            "(or both 0 for validation and testing as --val-frac/--test-frac of each hospital's images)"
        )
    if cohorts_on(args):  # every image of a hospital trains: each class present has one at least (class_floor)
        if "class_shares" in SCENARIOS[args.scenario]:
            empty = [k for k, counts in enumerate(site_class_counts(args), start=1) if not sum(counts.values())]
            if empty:
                raise FedXViTError(
                    f"--site-sizes: site{empty[0]} gets no training image (larger sizes, or another --alpha)"
                )
            return
        for k, (size, n_healthy) in enumerate(zip(args.site_sizes, site_healthy_counts(args)), start=1):
            if not 1 <= n_healthy < size:
                raise FedXViTError(f"--site-sizes: site{k} size {size} cannot train on both Healthy and Tumor images")
        return
    if "class_shares" in SCENARIOS[args.scenario]:
        if not args.alpha > 0:
            raise FedXViTError(f"--alpha must be greater than 0, got {args.alpha}")
        for k, counts in enumerate(site_class_counts(args), start=1):
            short = [
                f"{name} {n}"
                for name, n in counts.items()
                if n and not splits_possible(n, args.val_frac, args.test_frac)
            ]
            if short or sum(counts.values()) == 0:
                raise FedXViTError(
                    f"--site-sizes: site{k} gets {', '.join(short) or 'no image'}: too few to give every class "
                    "images in training, validation and testing (larger sizes, or another --alpha)"
                )
        return
    for k, (size, n_healthy) in enumerate(zip(args.site_sizes, site_healthy_counts(args)), start=1):
        if not (
            splits_possible(n_healthy, args.val_frac, args.test_frac)
            and splits_possible(size - n_healthy, args.val_frac, args.test_frac)
        ):
            raise FedXViTError(
                f"--site-sizes: site{k} size {size} is too small to give Healthy and Tumor images "
                f"in training, validation and testing"
            )


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse whose mistakes surface as the project's one-line `error:` (exit 2), no usage dump."""

    def error(self, message):
        raise FedXViTError(f"{message} (see --help)")


SCENARIO_FIXED_OPTIONS = {"public_per_class": "--public-per-class", "healthy_fraction": "--healthy-fraction"}


def apply_scenario(args) -> argparse.Namespace:
    """Fill the options left unset from the scenario; refuse those the scenario decides itself."""
    scenario = SCENARIOS[args.scenario]
    if "class_shares" in scenario:
        args.partition = args.partition or "homo"
        args.alpha = DEFAULT_ALPHA if args.alpha is None else args.alpha
        if args.alpha != DEFAULT_ALPHA and args.partition != "dirichlet":
            raise FedXViTError("--alpha applies to --partition dirichlet only")
        partition = "homo" if args.partition == "homo" else f"dirichlet-{args.alpha:g}"
        args.out = args.out if args.out is not None else str(Path(scenario["out"]) / partition)
    elif args.partition is not None or args.alpha is not None:
        raise FedXViTError(f"--partition and --alpha apply to --scenario longtail, not {args.scenario}")
    args.out = args.out if args.out is not None else scenario["out"]
    args.site_sizes = args.site_sizes if args.site_sizes is not None else list(scenario["site_sizes"])
    if scenario["public"]:
        for attribute, option in (("val_per_class", "--val-per-class"), ("test_per_class", "--test-per-class")):
            if getattr(args, attribute) is not None:
                raise FedXViTError(f"{option} applies to --scenario skewed and longtail, not {args.scenario}")
            setattr(args, attribute, 0)
        args.public_per_class = 500 if args.public_per_class is None else args.public_per_class
        args.healthy_fraction = scenario["healthy_fraction"] if args.healthy_fraction is None else args.healthy_fraction
        return args
    for attribute, option in SCENARIO_FIXED_OPTIONS.items():
        if getattr(args, attribute) is not None:
            raise FedXViTError(f"{option} does not apply to --scenario {args.scenario}, which sets it itself")
    cohorts = scenario.get("cohorts", {})
    for attribute in ("val_per_class", "test_per_class"):
        if getattr(args, attribute) is None:
            setattr(args, attribute, cohorts.get(attribute, 0))
    return args


def parse_args(argv=None):
    parser = OneLineErrorParser(
        prog="python -m data_preparation.benchmark",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--scenario",
        choices=sorted(SCENARIOS),
        default=DEFAULT_SCENARIO,
        help="named benchmark layout (default: default; see above)",
    )
    parser.add_argument(
        "--out",
        default=None,
        help="output folder (default: data; data/skewed; data/longtail/homo or data/longtail/dirichlet-<alpha>)",
    )
    parser.add_argument(
        "--partition",
        choices=PARTITIONS,
        default=None,
        help="longtail only: homo (every hospital the same long-tailed mix, default) or dirichlet",
    )
    parser.add_argument(
        "--alpha",
        type=float,
        default=None,
        help=f"longtail --partition dirichlet: concentration, smaller = more skewed (default: {DEFAULT_ALPHA})",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="master seed; same seed and options give identical files (default: 0)"
    )
    parser.add_argument(
        "--image-size", type=int, default=128, help=f"square image side in pixels, >= {MIN_IMAGE_SIZE} (default: 128)"
    )
    parser.add_argument(
        "--public-per-class",
        type=int,
        default=None,
        help="public 4-class set: images per class, split like the sites (default: 500; default scenario only)",
    )
    parser.add_argument(
        "--site-sizes",
        type=site_sizes,
        default=None,
        help="comma-separated image count per private site; their number is the number of sites "
        "(default: 150,300,450; skewed: 480,300,180,120,60,40; longtail: 600,480,360,300,240)",
    )
    parser.add_argument(
        "--healthy-fraction",
        type=float,
        default=None,
        help="share of Healthy images per site (default: 0.37; default scenario only)",
    )
    parser.add_argument(
        "--val-frac", type=float, default=0.15, help="validation share, stratified per class (default: 0.15)"
    )
    parser.add_argument(
        "--test-frac", type=float, default=0.15, help="testing share, stratified per class (default: 0.15)"
    )
    parser.add_argument(
        "--val-per-class",
        type=int,
        default=None,
        help="skewed/longtail: validation cohort images per class per hospital and for the held-out hospital "
        "(default: skewed 42, longtail 25; 0 with --test-per-class 0: --val-frac of each hospital's images)",
    )
    parser.add_argument(
        "--test-per-class",
        type=int,
        default=None,
        help="skewed/longtail: test cohort images per class per hospital and for the held-out hospital "
        "(default: skewed 100, longtail 50)",
    )
    parser.add_argument(
        "--workers", type=int, default=2, help="rendering processes; does not change the output (default: 2)"
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="regenerate even if --out already holds a benchmark (same or other parameters)",
    )
    return apply_scenario(parser.parse_args(argv))


def main(argv=None) -> None:
    args = parse_args(argv)
    validate(args)
    out = Path(args.out)
    params = generation_params(args)
    if out.exists() and not out.is_dir():
        raise FedXViTError(f"--out {out} is a file, not a folder")
    if prepare_out(out, params, args.force):
        print(f"reusing {out} (same parameters as {out / PARAMS_FILE}; --force regenerates)")
        return
    started = time.perf_counter()
    jobs = product_jobs(args, out)
    for site_dir in {job["site_dir"] for job in jobs}:
        (Path(site_dir) / "images").mkdir(parents=True, exist_ok=True)
        (Path(site_dir) / "masks").mkdir(parents=True, exist_ok=True)
    results = render_all(jobs, args.workers)
    check_disjoint(results)
    write_products(args, out, jobs, results)
    print(write_counts(out), end="")
    (out / PARAMS_FILE).write_text(
        json.dumps({"generator": GENERATOR, "params": params}, indent=2, sort_keys=True) + "\n"
    )
    print(f"wrote {len(jobs)} images to {out} in {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    run_cli(main)
