"""A site's image statistics for NVFlare's federated statistics workflow (jobs/fedxvit_stats).

Before a consortium trains, it should see what decided every comparison so far: one hospital's scanner
is darker, another is 91% Tumor. NVFlare's StatisticsController asks each site for counts, sums,
variances and histograms per dataset and feature; this is the site's side of that. Datasets are the
datalist's splits; per split the features are

- `label`: each image's class index (its histogram is the label mix);
- `intensity`: every pixel's gray value, 0-255, as the site decodes it (grayscale, before any scaling):
  the scanner's brightness and contrast;
- `mean_intensity`: each image's mean gray value;
- `height`, `width`: each image's size in pixels;
- `lesion_area`: the fraction of each masked image inside its mask; only masked images are its records
  (NVFlare's own DataFrame statistics count present values; its mean is sum / count).

Only these aggregates leave, after the job's statistics privacy filter (NVFlare's cleansers) has
withheld what its rules say; images, masks, file names and per-image values never do.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.abstract.statistics_spec import Bin, DataType, Feature, Histogram, HistogramType, Statistics
from PIL import Image

from fedxvit.datalist import SPLITS, load_split
from fedxvit.errors import FedXViTError
from fedxvit.sites import site_data_dir

GRAY_LEVELS = 256
FEATURES = (
    Feature("label", DataType.INT),
    Feature("intensity", DataType.FLOAT),
    Feature("mean_intensity", DataType.FLOAT),
    Feature("height", DataType.INT),
    Feature("width", DataType.INT),
    Feature("lesion_area", DataType.FLOAT),
)


@dataclass
class FeatureValues:
    """One feature of one split: its values with their weights (a pixel histogram is 256 gray levels
    weighted by their pixel counts, so it costs no memory per pixel)."""

    values: np.ndarray
    weights: np.ndarray

    @classmethod
    def of(cls, values) -> "FeatureValues":
        values = np.asarray(values, dtype=np.float64)
        return cls(values, np.ones_like(values))

    @property
    def count(self) -> int:
        return int(self.weights.sum())

    def total(self) -> float:
        return float((self.values * self.weights).sum())

    def squared_deviations(self, mean: float) -> float:
        return float((((self.values - mean) ** 2) * self.weights).sum())

    def histogram(self, bins: int, low: float, high: float) -> list:
        """(low, high, count) per bin; a value outside the range counts in the nearest end bin, so none is lost."""
        values = np.clip(self.values, low, high)
        counts, edges = np.histogram(values, bins=bins, range=(low, high), weights=self.weights)
        return [(float(edges[i]), float(edges[i + 1]), int(round(counts[i]))) for i in range(bins)]

    def extreme(self, pick) -> float:
        present = self.values[self.weights > 0]
        return float(pick(present)) if present.size else 0.0


def gray_pixels(path: str) -> np.ndarray:
    """An image as the site decodes it for training (PIL, converted to one gray channel), as uint8."""
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("L"), dtype=np.uint8)
    except (OSError, ValueError) as exc:
        raise FedXViTError(f"{path}: cannot be read for statistics: {str(exc).splitlines()[0]}") from None


def split_values(site_dir: Path, split: str) -> dict | None:
    """feature -> FeatureValues of one split of a site folder, or None for a split without images."""
    items = load_split(site_dir, split)
    if not items:
        return None
    labels, means, heights, widths, areas = [], [], [], [], []
    gray_counts = np.zeros(GRAY_LEVELS, dtype=np.int64)
    for item in items:
        pixels = gray_pixels(item["image"])
        labels.append(int(item["label"]))
        means.append(float(pixels.mean()))
        heights.append(pixels.shape[0])
        widths.append(pixels.shape[1])
        gray_counts += np.bincount(pixels.ravel(), minlength=GRAY_LEVELS)
        if item.get("mask"):
            areas.append(float((gray_pixels(item["mask"]) > 0).mean()))
    intensity = FeatureValues(np.arange(GRAY_LEVELS, dtype=np.float64), gray_counts.astype(np.float64))
    return {
        "label": FeatureValues.of(labels),
        "intensity": intensity,
        "mean_intensity": FeatureValues.of(means),
        "height": FeatureValues.of(heights),
        "width": FeatureValues.of(widths),
        "lesion_area": FeatureValues.of(areas),
    }


def site_values(site_dir: Path, splits=SPLITS) -> dict:
    """split -> feature -> FeatureValues, for each split of the site that holds images."""
    found = {split: split_values(site_dir, split) for split in splits}
    return {split: values for split, values in found.items() if values is not None}


class SiteImageStatistics(Statistics):
    """NVFlare's `Statistics` over a site's data folder (found as the training job finds it, fedxvit.sites).

    `splits`: the datalist splits to describe (default all three)."""

    def __init__(self, splits=SPLITS):
        super().__init__()
        unknown = [s for s in splits if s not in SPLITS]
        if unknown:
            raise FedXViTError(
                f"fedxvit_stats job option splits: unknown split(s) {unknown}; expected some of {SPLITS}"
            )
        self.splits = tuple(splits)
        self.data: dict = {}

    def initialize(self, fl_ctx: FLContext):
        site = fl_ctx.get_identity_name()
        workspace = fl_ctx.get_engine().get_workspace()
        data_dir = site_data_dir(site, site_config_dir=workspace.get_site_config_dir(), class_names=None)
        self.data = site_values(data_dir, self.splits)
        self.log_info(fl_ctx, f"fedxvit {site}: statistics of {', '.join(self.data) or 'no split'}")

    def _feature(self, dataset_name: str, feature_name: str) -> FeatureValues:
        return self.data[dataset_name][feature_name]

    def features(self) -> dict:
        return {split: list(FEATURES) for split in self.data}

    def count(self, dataset_name: str, feature_name: str) -> int:
        return self._feature(dataset_name, feature_name).count

    def sum(self, dataset_name: str, feature_name: str) -> float:
        return self._feature(dataset_name, feature_name).total()

    def mean(self, dataset_name: str, feature_name: str) -> float:
        feature = self._feature(dataset_name, feature_name)
        return feature.total() / feature.count if feature.count else 0.0

    def stddev(self, dataset_name: str, feature_name: str) -> float:
        feature = self._feature(dataset_name, feature_name)
        if feature.count < 2:
            return 0.0
        return float(np.sqrt(feature.squared_deviations(self.mean(dataset_name, feature_name)) / (feature.count - 1)))

    def variance_with_mean(self, dataset_name: str, feature_name: str, global_mean: float, global_count: float):
        """This site's share of the federation's sample variance (NVFlare sums the shares)."""
        if global_count < 2:
            return 0.0
        return self._feature(dataset_name, feature_name).squared_deviations(global_mean) / (global_count - 1)

    def histogram(self, dataset_name: str, feature_name: str, num_of_bins: int, global_min_value, global_max_value):
        bins = self._feature(dataset_name, feature_name).histogram(num_of_bins, global_min_value, global_max_value)
        return Histogram(HistogramType.STANDARD, [Bin(low, high, count) for low, high, count in bins])

    def max_value(self, dataset_name: str, feature_name: str) -> float:
        return self._feature(dataset_name, feature_name).extreme(np.max)

    def min_value(self, dataset_name: str, feature_name: str) -> float:
        return self._feature(dataset_name, feature_name).extreme(np.min)
