"""The on-disk site format, read and written only here.

A site folder holds images (and tumor masks) plus two JSON files:
- `datalist.json`: MONAI decathlon-style lists `training`, `validation`, `testing` of
  `{"image": rel_path, "label": int, "mask"?: rel_path}`, paths relative to the site folder;
- `dataset.json`: class names in label order, counts per split and class, provenance
  (seed or source), a content hash per image and one `data_hash` for the whole site.
The generator, the importer, the executor and the result scripts all go through this module.
"""

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from fedxvit.errors import FedXViTError, read_json
from fedxvit.paths import ALLOWED_ROOTS_ENV, resolve_inside

DATALIST_FILE = "datalist.json"
DATASET_FILE = "dataset.json"
COUNTS_JSON = "counts.json"
COUNTS_MD = "counts.md"
SPLITS = ("training", "validation", "testing")


def pixel_hash(pixels: np.ndarray) -> str:
    """Hash of decoded image content, so the same picture saved twice (or as jpg and png) matches."""
    pixels = np.ascontiguousarray(pixels)
    digest = hashlib.sha256(f"{pixels.dtype}{pixels.shape}".encode())
    digest.update(pixels.tobytes())
    return digest.hexdigest()


def file_hash(path: os.PathLike) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _write_json(path: Path, payload: object) -> None:
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")


def write_site(site_dir: os.PathLike, entries: dict, class_names, provenance: dict) -> dict:
    """Write `datalist.json` and `dataset.json` for files already saved under `site_dir`.

    Returns the dataset description. Output is a pure function of the inputs and the file
    bytes (no timestamps), so a seeded generator produces byte-identical folders.
    """
    site_dir = Path(site_dir)
    class_names = list(class_names)
    datalist, counts, hashes = {}, {}, {}
    for split in SPLITS:
        items = sorted(entries.get(split, []), key=lambda e: e["image"])
        counts[split] = {name: 0 for name in class_names}
        for item in items:
            if not 0 <= int(item["label"]) < len(class_names):
                raise FedXViTError(f"{site_dir}: label {item['label']} of {item['image']} is not one of {class_names}")
            for key in ("image", "mask"):
                if key in item and not (site_dir / item[key]).is_file():
                    raise FedXViTError(f"{site_dir}: {key} file {item[key]} is missing")
            counts[split][class_names[int(item["label"])]] += 1
            hashes[item["image"]] = file_hash(site_dir / item["image"])
        datalist[split] = [{k: (int(v) if k == "label" else v) for k, v in item.items()} for item in items]
    data_hash = hashlib.sha256(
        json.dumps([[s, e["image"], e["label"], hashes[e["image"]]] for s in SPLITS for e in datalist[s]]).encode()
    ).hexdigest()
    info = {
        "name": site_dir.name,
        "class_names": class_names,
        "num_classes": len(class_names),
        "counts": counts,
        "num_images": sum(sum(c.values()) for c in counts.values()),
        "provenance": provenance,
        "content_hashes": hashes,
        "data_hash": data_hash,
    }
    _write_json(site_dir / DATALIST_FILE, datalist)
    _write_json(site_dir / DATASET_FILE, info)
    return info


def read_dataset_info(site_dir: os.PathLike) -> dict:
    """The site's `dataset.json`, or a one-line error naming the missing or broken file."""
    return read_json(
        Path(site_dir) / DATASET_FILE,
        f"no {DATASET_FILE} in {site_dir}: prepare the site's data first "
        "(make data, or data_preparation.import_folders)",
    )


def shown(path: os.PathLike, site_dir: os.PathLike) -> str:
    """A path as the site's logs and errors show it: relative to the data root holding the site folder
    (`site1/images/x.png`), so no log line carries where the hospital keeps its data."""
    root = Path(os.path.abspath(site_dir)).parent
    try:
        return Path(os.path.abspath(path)).relative_to(root).as_posix()
    except ValueError:
        return Path(path).name


def check_entries(site_dir: Path, raw: dict, split: str) -> None:
    """Every image and mask of a split lies inside the site folder (no absolute path, `..` or symlink leads out of
    it), or inside a root the site allows in $FEDXVIT_ALLOWED_ROOTS; else one line naming the file and the entry."""
    for item in raw.get(split) or []:
        for key in ("image", "mask"):
            entry = item.get(key) if isinstance(item, dict) else None
            if isinstance(entry, str) and resolve_inside(entry, site_dir) is None:
                raise FedXViTError(
                    f"{shown(site_dir / DATALIST_FILE, site_dir)}: {split} {key} {entry!r} lies outside the site's "
                    f"data folder (absolute path, '..' or a symlink); a site that keeps images elsewhere lists that "
                    f"folder in ${ALLOWED_ROOTS_ENV}"
                )


def load_split(site_dir: os.PathLike, split: str) -> list:
    """The entries of one split with absolute paths (MONAI's decathlon datalist loader), each checked to lie inside
    the site folder or a root the site allows (check_entries)."""
    from monai.data import load_decathlon_datalist

    site_dir = Path(site_dir)
    path = site_dir / DATALIST_FILE
    if split not in SPLITS:
        raise FedXViTError(f"unknown split {split!r}; expected one of {SPLITS}")
    if not path.is_file():
        raise FedXViTError(
            f"no {DATALIST_FILE} in {site_dir}: prepare the site's data first "
            "(make data, or data_preparation.import_folders)"
        )
    try:
        items = load_decathlon_datalist(str(path), is_segmentation=False, data_list_key=split, base_dir=str(site_dir))
    except (ValueError, json.JSONDecodeError) as exc:
        raise FedXViTError(f"{shown(path, site_dir)}: {exc}") from None
    check_entries(site_dir, read_json(path, f"no {DATALIST_FILE} in {site_dir}"), split)
    missing = [item["image"] for item in items if not os.path.isfile(item["image"])]
    if missing:
        raise FedXViTError(
            f"{shown(path, site_dir)}: {len(missing)} {split} image(s) missing, first {shown(missing[0], site_dir)}"
        )
    return items


def count_table(root: os.PathLike) -> dict:
    """site -> split -> class -> count, for every site folder (one holding dataset.json) under root."""
    table = {}
    for site_dir in sorted(Path(root).iterdir()):
        if (site_dir / DATASET_FILE).is_file():
            table[site_dir.name] = read_dataset_info(site_dir)["counts"]
    return table


def format_counts(table: dict) -> str:
    """The counts as Markdown: one table per class set (4-class public, 2-class sites), a row per site and split."""
    groups = {}
    for site, splits in table.items():
        classes = tuple(next(iter(splits.values()), {}))
        groups.setdefault(classes, []).append(site)
    tables = []
    for classes, sites in groups.items():
        lines = ["| site | split | " + " | ".join(classes) + " | total |", "|---|---|" + "---:|" * (len(classes) + 1)]
        for site in sites:
            for split in SPLITS:
                row = [table[site].get(split, {}).get(c, 0) for c in classes]
                lines.append(f"| {site} | {split} | " + " | ".join(map(str, row)) + f" | {sum(row)} |")
        tables.append("\n".join(lines) + "\n")
    return "\n".join(tables)


def write_counts(root: os.PathLike) -> str:
    """Save `counts.json` and `counts.md` beside the site folders and return the Markdown."""
    root = Path(root)
    table = count_table(root)
    markdown = format_counts(table)
    _write_json(root / COUNTS_JSON, table)
    (root / COUNTS_MD).write_text(markdown)
    return markdown
