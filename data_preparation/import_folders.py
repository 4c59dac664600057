"""Import folder data sets (one folder per class) into the per-site format.

    python -m data_preparation.import_folders SOURCE --out data/imported [options]

Layouts recognised (a single wrapper folder, as zip downloads often add, is stepped into):
- per hospital:  SOURCE/<client>/{Training,Validation,Testing}/<class>/  -> sites = clients, splits kept
- public split:  SOURCE/{Training,Testing}/<class>/  -> split over --sites, Testing stays testing
- class folders: SOURCE/<class>/                     -> split over --sites and train/val/test

Real downloads are messy, so every file is decoded with PIL and re-saved as 8-bit grayscale
PNG; unreadable, truncated and stray files are skipped and listed in the import report, and
the same picture found twice (by decoded-pixel hash) is imported once. SOURCE is only read.
"""

import argparse
import json
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm import tqdm

from data_preparation.splits import METHODS, assign_sites, train_val_test
from fedxvit.classes import EXPERT_CLASSES, TASK_CLASSES
from fedxvit.datalist import DATASET_FILE, SPLITS, format_counts, pixel_hash, write_counts, write_site
from fedxvit.errors import ArgumentParser, FedXViTError, run_cli

REPORT_JSON = "import_report.json"
REPORT_MD = "import_report.md"
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"}
STRAY_NAMES = {".ds_store", "thumbs.db", "desktop.ini"}
STRAY_DIRS = {"__macosx"}
SPLIT_ALIASES = {
    "training": "training",
    "train": "training",
    "validation": "validation",
    "val": "validation",
    "valid": "validation",
    "testing": "testing",
    "test": "testing",
}
# folder name (normalised) -> class, per task; --class-map adds to or overrides these
EXPERT_ALIASES = {
    "glioma": "glioma",
    "glioma_tumor": "glioma",
    "meningioma": "meningioma",
    "meningioma_tumor": "meningioma",
    "pituitary": "pituitary",
    "pituitary_tumor": "pituitary",
    "notumor": "notumor",
    "no_tumor": "notumor",
    "healthy": "notumor",
    "normal": "notumor",
    "no": "notumor",
}
TUMOR_ALIASES = {
    **{name: ("Healthy" if cls == "notumor" else "Tumor") for name, cls in EXPERT_ALIASES.items()},
    "tumor": "Tumor",
    "tumour": "Tumor",
    "yes": "Tumor",
}
TASKS = {"tumor": (TASK_CLASSES, TUMOR_ALIASES), "expert": (EXPERT_CLASSES, EXPERT_ALIASES)}


@dataclass
class ClassFolder:
    """One folder of images of one class, with where it belongs if the source already says so."""

    path: Path
    label: int
    site: str | None = None
    split: str | None = None


@dataclass
class Candidate:
    """One decodable image: its source path, label, where it must go, and the staged PNG."""

    rel: str
    label: int
    site: str | None
    split: str | None
    digest: str = ""
    staged: Path | None = None


@dataclass
class Report:
    skipped: list = field(default_factory=list)
    duplicates: list = field(default_factory=list)

    def skip(self, rel: str, reason: str) -> None:
        self.skipped.append({"source": rel, "reason": reason})


def normalise(name: str) -> str:
    """Folder names differ in case, spaces and dashes between downloads ('No Tumor', 'no-tumor')."""
    return re.sub(r"[\s\-]+", "_", name.strip().lower())


def parse_class_map(text: str | None, class_names) -> dict:
    """`--class-map name=Class,...` -> {normalised folder name: class}, classes checked against the task."""
    mapping = {}
    by_lower = {c.lower(): c for c in class_names}
    for pair in filter(None, (p.strip() for p in (text or "").split(","))):
        name, sep, cls = pair.partition("=")
        if not sep or not name.strip() or cls.strip().lower() not in by_lower:
            raise FedXViTError(
                f"--class-map entry {pair!r} must be folder=Class with Class one of {', '.join(class_names)}"
            )
        mapping[normalise(name)] = by_lower[cls.strip().lower()]
    return mapping


def is_stray(path: Path) -> bool:
    """OS and archive litter that no one means as data (Finder, Explorer, macOS zip forks)."""
    return path.name.lower() in STRAY_NAMES or path.name.startswith(".") or path.name.lower() in STRAY_DIRS


def visible_dirs(folder: Path) -> list:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not is_stray(p))


def visible_files(folder: Path) -> list:
    return sorted(p for p in folder.iterdir() if p.is_file() and not is_stray(p))


def split_name(folder: Path) -> str | None:
    return SPLIT_ALIASES.get(normalise(folder.name))


def check_paths(source: Path, out: Path, force: bool) -> None:
    """Refuse paths that would re-import our own output or overwrite the source or an earlier import."""
    if not source.is_dir():
        raise FedXViTError(f"source folder {source} does not exist or is not a folder")
    if out == source:
        raise FedXViTError(f"--out {out} is the source folder: choose a folder outside it")
    if source in out.parents:
        raise FedXViTError(f"--out {out} lies inside the source folder {source}: choose a folder outside it")
    if out in source.parents:
        raise FedXViTError(f"--out {out} contains the source folder {source}: choose a folder outside it")
    if out.exists() and not out.is_dir():
        raise FedXViTError(f"--out {out} exists and is not a folder")
    if previous_import(out) and not force:
        raise FedXViTError(f"--out {out} already holds an import: pass --force to replace it, or choose another folder")


def previous_import(out: Path) -> bool:
    return out.is_dir() and (
        (out / REPORT_JSON).is_file() or any((d / DATASET_FILE).is_file() for d in visible_dirs(out))
    )


def class_label(folder: Path, aliases: dict, class_names, source: Path) -> int:
    name = aliases.get(normalise(folder.name))
    if name is None:
        raise FedXViTError(
            f"class folder {folder.relative_to(source)} has no class mapping: "
            f"add --class-map '{folder.name}=<{'|'.join(class_names)}>'"
        )
    return list(class_names).index(name)


def unwrap(source: Path) -> Path:
    """Step into lone wrapper folders ('archive/', 'brain-tumor-mri-dataset/') that zips add."""
    root = source
    while len(visible_dirs(root)) == 1 and not visible_files(root):
        only = visible_dirs(root)[0]
        if split_name(only) or not visible_dirs(only):
            break
        root = only
    return root


def detect_layout(source: Path, aliases: dict, class_names) -> tuple:
    """(layout name, class folders) for the three supported layouts, decided from folder names."""
    root = unwrap(source)
    top = visible_dirs(root)
    if not top:
        raise FedXViTError(f"source folder {source} has no class folders")

    def classes_in(folder: Path, **where) -> list:
        folders = visible_dirs(folder)
        if not folders:
            raise FedXViTError(f"folder {folder.relative_to(source)} has no class folders inside")
        return [ClassFolder(f, class_label(f, aliases, class_names, source), **where) for f in folders]

    if all(split_name(d) for d in top):
        layout = "public-split"
        folders = [cf for d in top for cf in classes_in(d, split=split_name(d))]
    elif any(split_name(s) for d in top for s in visible_dirs(d)):
        layout = "per-hospital"
        folders = []
        for client in top:
            splits = visible_dirs(client)
            unknown = [s.name for s in splits if not split_name(s)]
            if unknown or not splits:
                raise FedXViTError(
                    f"hospital folder {client.relative_to(source)} must hold only Training/Validation/Testing "
                    f"folders, found {unknown or 'none'}"
                )
            folders += [cf for s in splits for cf in classes_in(s, site=client.name, split=split_name(s))]
    else:
        layout = "class-folders"
        folders = [ClassFolder(d, class_label(d, aliases, class_names, source)) for d in top]
    return layout, root, folders


def list_files(folder: ClassFolder, source: Path, report: Report) -> list:
    """Image-looking files under one class folder; everything else goes to the report."""
    kept, anything = [], False
    for path in sorted(p for p in folder.path.rglob("*") if p.is_file()):
        rel = path.relative_to(source).as_posix()
        if any(is_stray(Path(part)) for part in path.relative_to(folder.path).parts):
            report.skip(rel, "system or hidden file")
            continue
        anything = True
        if path.suffix.lower() in IMAGE_EXTENSIONS:
            kept.append(path)
        else:
            report.skip(rel, f"not an image file extension ({path.suffix or 'none'})")
    if not anything:
        raise FedXViTError(f"class folder {folder.path.relative_to(source)} is empty: remove it or add its images")
    return kept


def report_outside_files(source: Path, folders: list, report: Report) -> None:
    """Files beside the class folders (README, .DS_Store at the top) are not data; say so."""
    inside = {folder.path for folder in folders}
    for path in sorted(p for p in source.rglob("*") if p.is_file()):
        if not inside.intersection(path.parents):
            report.skip(path.relative_to(source).as_posix(), "outside the class folders")


def to_gray8(image: Image.Image) -> np.ndarray:
    """Any PIL mode -> 8-bit grayscale; high-bit images are stretched over their own value range."""
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        values = np.asarray(image, dtype=np.float64)
        low, high = values.min(), values.max()
        scaled = (values - low) / (high - low) * 255 if high > low else np.zeros_like(values)
        return np.round(scaled).astype(np.uint8)
    if image.mode in ("RGBA", "LA", "PA", "P") or "transparency" in image.info:
        # transparent parts become black, the background of an MRI slice
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba)
    if image.mode != "L":
        image = image.convert("RGB").convert("L")
    return np.asarray(image, dtype=np.uint8)


def decode(path: Path) -> np.ndarray:
    """Fully decode (so truncation shows now, not in training) and apply the EXIF orientation."""
    with Image.open(path) as image:
        image.load()
        return to_gray8(ImageOps.exif_transpose(image))


def content_name(digest: str) -> str:
    """An imported file's name: the start of its decoded pixels' hash, unique after de-duplication. Never the
    source's name: real exports often name a file by patient ID, and names travel into reports and logs. The
    datalist keeps each image's `source` path for the site itself."""
    return f"{digest[:20]}.png"


def stage_images(files: list, source: Path, staging: Path, report: Report) -> list:
    """Decode every file once (sorted path order), keep the first of equal pixel content."""
    seen, kept = {}, []
    for path, folder in tqdm(files, desc="decoding", unit="img", disable=None):
        rel = path.relative_to(source).as_posix()
        if path.stat().st_size == 0:
            report.skip(rel, "empty file (0 bytes)")
            continue
        try:
            pixels = decode(path)
        except UnidentifiedImageError:
            report.skip(rel, "not an image (PIL cannot identify the format)")
            continue
        except Exception as exc:  # untrusted files fail in many ways (OSError, SyntaxError, struct errors...)
            report.skip(rel, f"unreadable image: {type(exc).__name__}: {exc}")
            continue
        digest = pixel_hash(pixels)
        if digest in seen:
            first = seen[digest]
            report.duplicates.append(
                {"source": rel, "duplicate_of": first.rel, "label_conflict": first.label != folder.label}
            )
            continue
        staged = staging / content_name(digest)
        Image.fromarray(pixels).save(staged, format="PNG")
        seen[digest] = Candidate(rel, folder.label, folder.site, folder.split, digest, staged)
        kept.append(seen[digest])
    return kept


def site_name(folder_name: str) -> str:
    """A hospital folder name as an NVFlare client name (letters, digits, '-', '_', '.')."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", folder_name.strip()).strip("_.") or "site"


def place_by_source(images: list, args) -> dict:
    """Per-hospital trees: the source says each image's site and split.

    A hospital without a Validation (or Testing) folder gets one carved from its training
    images, stratified, so every site can score the global model.
    """
    placed, owner = {}, {}
    for image in images:
        name = site_name(image.site)
        if owner.setdefault(name, image.site) != image.site:
            raise FedXViTError(
                f"hospital folders {owner[name]!r} and {image.site!r} both become site name {name!r}: rename one"
            )
        placed.setdefault(name, {s: [] for s in SPLITS})[image.split].append(image)
    rng = np.random.default_rng(args.seed)
    for splits in placed.values():
        val_frac = 0.0 if splits["validation"] else args.val_frac
        test_frac = 0.0 if splits["testing"] else args.test_frac
        if val_frac or test_frac:
            train = splits["training"]
            labels = np.array([image.label for image in train], dtype=int)
            carved = train_val_test(np.arange(len(train)), labels, val_frac, test_frac, rng)
            for split, chosen in carved.items():
                splits[split] = (splits[split] if split != "training" else []) + [train[i] for i in chosen]
    return placed


def place_by_split(images: list, args, class_names) -> dict:
    """Spread images over site1..siteN; fixed Validation/Testing folders stay in their split."""
    labels = np.array([image.label for image in images])
    rng = np.random.default_rng(args.seed)
    parts = assign_sites(labels, args.sites, args.split, args.alpha, rng, class_names=class_names)
    fixed = {image.split for image in images} - {None, "training"}
    val_frac = 0.0 if "validation" in fixed else args.val_frac
    test_frac = 0.0 if "testing" in fixed else args.test_frac
    placed = {}
    for number, indices in enumerate(parts, start=1):
        splits = {s: [images[i] for i in indices if images[i].split == s] for s in fixed}
        free = np.array([i for i in indices if images[i].split not in fixed], dtype=int)
        for split, chosen in train_val_test(free, labels, val_frac, test_frac, rng).items():
            splits.setdefault(split, []).extend(images[i] for i in chosen)
        placed[f"site{number}"] = splits
    return placed


def clear_previous(out: Path, sites: list) -> None:
    """With --force: remove only site folders and reports an import wrote; refuse foreign folders."""
    old_sites = []
    if (out / REPORT_JSON).is_file():
        try:
            old_sites = json.loads((out / REPORT_JSON).read_text()).get("sites", [])
        except json.JSONDecodeError:
            old_sites = []
    for name in sorted(set(old_sites) | set(sites)):
        if not isinstance(name, str) or Path(name).name != name:
            continue
        site_dir = out / name
        if site_dir.is_dir() and not (site_dir / DATASET_FILE).is_file():
            raise FedXViTError(f"{site_dir} exists but is not a site folder: move it away, it will not be replaced")
        if site_dir.is_dir():
            shutil.rmtree(site_dir)
    for name in (REPORT_JSON, REPORT_MD):
        (out / name).unlink(missing_ok=True)


def write_sites(out: Path, placed: dict, class_names, provenance: dict) -> dict:
    """Move staged PNGs into each site's images/ and write its datalist and dataset files."""
    imported = {}
    for site, splits in sorted(placed.items()):
        images_dir = out / site / "images"
        images_dir.mkdir(parents=True)
        entries = {}
        for split, images in splits.items():
            entries[split] = []
            for image in images:
                image.staged.replace(images_dir / image.staged.name)
                entries[split].append(
                    {"image": f"images/{image.staged.name}", "label": image.label, "source": image.rel}
                )
        imported[site] = write_site(out / site, entries, class_names, provenance)["counts"]
    return imported


def report_markdown(report: dict) -> str:
    lines = [
        f"# Import report\n\nsource: `{report['source']}`  \nlayout: {report['layout']}, task: {report['task']}, "
        f"split: {report['split']}, seed: {report['seed']}\n",
        f"{report['num_imported']} images imported, {len(report['skipped'])} files skipped, "
        f"{len(report['duplicates'])} duplicates dropped.\n",
        "## Imported\n",
        format_counts(report["imported"]),
        "## Skipped files\n",
        "| file | reason |",
        "|---|---|",
        *[f"| `{s['source']}` | {s['reason']} |" for s in report["skipped"]],
        "\n## Duplicates (same decoded pixels; the first in path order is kept)\n",
        "| file | duplicate of | label conflict |",
        "|---|---|---|",
        *[f"| `{d['source']}` | `{d['duplicate_of']}` | {d['label_conflict']} |" for d in report["duplicates"]],
    ]
    return "\n".join(lines) + "\n"


def import_folders(args) -> dict:
    """The whole import; returns the report. Nothing under --out changes until the inputs check out."""
    source, out = Path(args.source).resolve(), Path(args.out).resolve()
    check_paths(source, out, args.force)
    class_names, aliases = TASKS[args.task]
    aliases = {**aliases, **parse_class_map(args.class_map, class_names)}
    layout, root, folders = detect_layout(source, aliases, class_names)
    report = Report()
    report_outside_files(source, folders, report)
    files = [(path, folder) for folder in folders for path in list_files(folder, source, report)]
    files.sort(key=lambda pair: pair[0].relative_to(source).as_posix())
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        with tempfile.TemporaryDirectory(dir=out, prefix=".import-staging-") as staging:
            images = stage_images(files, source, Path(staging), report)
            if not images:
                raise FedXViTError(f"no readable image in {source}: every file was unreadable, empty or not an image")
            placed = (
                place_by_source(images, args) if layout == "per-hospital" else place_by_split(images, args, class_names)
            )
            clear_previous(out, list(placed))
            provenance = {
                "importer": "folders",
                "source": str(source),
                "layout": layout,
                "split": "source" if layout == "per-hospital" else args.split,
                "alpha": args.alpha,
                "seed": args.seed,
                "task": args.task,
            }
            imported = write_sites(out, placed, class_names, provenance)
    except FedXViTError:
        if created and not any(out.iterdir()):
            out.rmdir()
        raise
    result = {
        **provenance,
        "root": root.relative_to(source).as_posix(),
        "out": str(out),
        "class_names": list(class_names),
        "sites": sorted(placed),
        "imported": imported,
        "num_imported": sum(sum(c.values()) for s in imported.values() for c in s.values()),
        "skipped": sorted(report.skipped, key=lambda s: s["source"]),
        "duplicates": report.duplicates,
    }
    (out / REPORT_JSON).write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    (out / REPORT_MD).write_text(report_markdown(result))
    return result


def parse_args(argv=None) -> argparse.Namespace:
    parser = ArgumentParser(
        prog="python -m data_preparation.import_folders",
        description=__doc__.split("\n\n", 2)[1].strip() + "\n\n" + __doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("source", help="folder to import (read only, never modified)")
    parser.add_argument(
        "--out", default="data/imported", help="output folder, one sub-folder per site (default: %(default)s)"
    )
    parser.add_argument(
        "--task",
        choices=sorted(TASKS),
        default="tumor",
        help="tumor: 2 classes Healthy/Tumor (every tumor type -> Tumor); expert: 4 classes "
        f"{', '.join(EXPERT_CLASSES)} (default: %(default)s)",
    )
    parser.add_argument(
        "--class-map",
        metavar="NAME=CLASS,...",
        help="extra or overriding folder-name mappings, e.g. 'Brain Tumor=Tumor,ctrl=Healthy'",
    )
    parser.add_argument(
        "--sites",
        type=int,
        default=3,
        help="number of sites site1..siteN (ignored for per-hospital trees; default: %(default)s)",
    )
    parser.add_argument(
        "--split",
        choices=METHODS,
        default="iid",
        help="iid, dirichlet (label skew) or quantity (size skew) (default: %(default)s)",
    )
    parser.add_argument(
        "--alpha", type=float, default=0.5, help="Dirichlet concentration, smaller = more skew (default: %(default)s)"
    )
    parser.add_argument(
        "--val-frac", type=float, default=0.15, help="validation share per site and class (default: %(default)s)"
    )
    parser.add_argument(
        "--test-frac",
        type=float,
        default=0.15,
        help="testing share, unused when the source has a Testing folder (default: %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for every random choice (default: %(default)s)")
    parser.add_argument(
        "--force", action="store_true", help="replace the site folders and reports of an earlier import in --out"
    )
    args = parser.parse_args(argv)
    if not args.alpha > 0:
        raise FedXViTError(f"--alpha must be greater than 0, got {args.alpha}")
    if args.sites < 1:
        raise FedXViTError(f"--sites must be at least 1, got {args.sites}")
    if not (0 <= args.val_frac < 1 and 0 <= args.test_frac < 1 and args.val_frac + args.test_frac < 1):
        raise FedXViTError(
            f"--val-frac {args.val_frac} and --test-frac {args.test_frac} must each be in [0, 1) and sum to less than 1"
        )
    return args


def print_summary(result: dict, counts: str) -> None:
    print(counts)
    print(
        f"imported {result['num_imported']} images ({result['layout']} layout, task {result['task']}) "
        f"into {len(result['sites'])} sites under {result['out']}"
    )
    print(
        f"skipped {len(result['skipped'])} files, dropped {len(result['duplicates'])} duplicates; "
        f"details in {Path(result['out']) / REPORT_MD}"
    )


def main(argv=None) -> None:
    result = import_folders(parse_args(argv))
    print_summary(result, write_counts(result["out"]))


if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1:]))
