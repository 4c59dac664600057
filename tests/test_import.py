"""The folder importer on small messy trees built here: odd formats, broken files, layouts, errors."""

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile
from tiny import REPO

from data_preparation.import_folders import main
from fedxvit.classes import EXPERT_CLASSES, TASK_CLASSES
from fedxvit.datalist import SPLITS, pixel_hash, read_dataset_info
from fedxvit.errors import FedXViTError

RNG = np.random.default_rng(0)


def noise(size=(24, 20), channels=None, dtype=np.uint8, high=256):
    shape = (size[1], size[0]) + ((channels,) if channels else ())
    return RNG.integers(0, high, shape).astype(dtype)


def save(path: Path, image: Image.Image, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    return path


def plain_images(folder: Path, count: int, prefix: str) -> list:
    """`count` distinct grayscale PNGs, different sizes."""
    return [save(folder / f"{prefix}_{i}.png", Image.fromarray(noise((16 + i, 18)))) for i in range(count)]


def odd_images(folder: Path) -> tuple:
    """Every awkward format and name real downloads contain; returns (good files, bad files, duplicate)."""
    good = [
        save(folder / "Tr-gl (1).jpg", Image.fromarray(noise((30, 20), 3)), format="JPEG"),
        save(folder / "scan.v2.final.JPG", Image.fromarray(noise((20, 20))), format="JPEG"),
        save(folder / "with spaces.jpeg", Image.fromarray(noise((40, 32), 3)), format="JPEG"),
        save(folder / "sixteen bit.png", Image.fromarray(noise((22, 22), dtype=np.uint16, high=4000)).convert("I;16")),
        save(folder / "rgb.PNG", Image.fromarray(noise((25, 19), 3))),
        save(folder / "rgba.png", Image.fromarray(noise((18, 26), 4), "RGBA")),
        save(folder / "cmyk.jpg", Image.fromarray(noise((21, 23), 4), "CMYK"), format="JPEG"),
        save(folder / "palette.png", Image.fromarray(noise((27, 17), 3)).convert("P")),
        save(folder / "gray alpha.png", Image.fromarray(noise((19, 29), 2), "LA")),
    ]
    (folder / "zero.jpg").write_bytes(b"")
    whole = Image.fromarray(noise((64, 64), 3))
    save(folder / "full.jpg", whole, format="JPEG")
    data = (folder / "full.jpg").read_bytes()
    (folder / "full.jpg").unlink()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (folder / "notes.png").write_text("this is not an image\n")
    (folder / "readme.txt").write_text("scanner settings\n")
    (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (folder / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    (folder / "._Tr-gl (1).jpg").write_bytes(b"\x00\x05\x16\x07")
    duplicate = folder / "zz copy of rgb.PNG"
    shutil.copyfile(folder / "rgb.PNG", duplicate)
    bad = {"zero.jpg", "truncated.jpg", "notes.png", "readme.txt", ".DS_Store", "Thumbs.db", "._Tr-gl (1).jpg"}
    return good, {folder / name for name in bad}, duplicate


def public_tree(root: Path) -> dict:
    """The public 4-class layout; returns {good file: expert class} plus the bad and duplicate files."""
    expected = {}
    for split, count in (("Training", 6), ("Testing", 2)):
        for cls in EXPERT_CLASSES:
            for path in plain_images(root / split / cls, count, f"{split[:2]}-{cls}"):
                expected[path] = cls
    good, bad, duplicate = odd_images(root / "Training" / "glioma")
    expected.update({path: "glioma" for path in good})
    (root / ".DS_Store").write_bytes(b"\x00")
    bad.add(root / ".DS_Store")
    return {"expected": expected, "bad": bad, "duplicates": {duplicate}}


def snapshot(root: Path) -> dict:
    """Every path under root with the hash of its bytes (None for folders)."""
    return {
        p.relative_to(root).as_posix(): (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None)
        for p in sorted(root.rglob("*"))
    }


def entries(out: Path) -> list:
    """(site, split, entry) for every datalist entry under out."""
    found = []
    for datalist in sorted(out.glob("*/datalist.json")):
        for split, items in json.loads(datalist.read_text()).items():
            found += [(datalist.parent.name, split, item) for item in items]
    return found


def cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "data_preparation.import_folders", *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture(scope="module")
def public(tmp_path_factory):
    """One messy public tree imported once (tumor task, 2 sites) for the checks below."""
    root = tmp_path_factory.mktemp("public")
    source, out = root / "Brain Tumor MRI", root / "out"
    tree = public_tree(source)
    before = snapshot(source)
    main([str(source), "--out", str(out), "--sites", "2", "--seed", "3"])
    return {
        **tree,
        "source": source,
        "out": out,
        "before": before,
        "report": json.loads((out / "import_report.json").read_text()),
    }


def test_every_good_image_is_imported_once_with_its_label(public):
    found = entries(public["out"])
    sources = [item["source"] for _, _, item in found]
    assert len(sources) == len(set(sources))
    expected = {p.relative_to(public["source"]).as_posix(): cls for p, cls in public["expected"].items()}
    assert set(sources) == set(expected)
    for _, _, item in found:
        assert TASK_CLASSES[item["label"]] == ("Healthy" if expected[item["source"]] == "notumor" else "Tumor")
    assert {site for site, _, _ in found} == {"site1", "site2"}
    assert public["report"]["num_imported"] == len(expected)


def test_imported_file_names_are_content_hashes_never_source_names(public):
    found = entries(public["out"])
    for site, _, item in found:
        pixels = np.asarray(Image.open(public["out"] / site / item["image"]))
        assert item["image"] == f"images/{pixel_hash(pixels)[:20]}.png"  # nothing of e.g. "Tr-gl (1).jpg"
    assert len({item["image"] for _, _, item in found}) == len(found)


def test_imported_files_are_8bit_grayscale_pngs_of_the_original_size(public):
    for site, _, item in entries(public["out"]):
        with Image.open(public["out"] / site / item["image"]) as image:
            assert image.format == "PNG" and image.mode == "L"
            with Image.open(public["source"] / item["source"]) as original:
                assert image.size == original.size
        assert " " not in item["image"] and "(" not in item["image"]
    site, _, sixteen = next(found for found in entries(public["out"]) if found[2]["source"].endswith("sixteen bit.png"))
    pixels = np.asarray(Image.open(public["out"] / site / sixteen["image"]))
    raw = np.asarray(Image.open(public["source"] / sixteen["source"]), dtype=float)
    assert np.array_equal(pixels, np.round((raw - raw.min()) / (raw.max() - raw.min()) * 255))


def test_bad_and_stray_files_are_reported_with_a_reason(public):
    skipped = {s["source"]: s["reason"] for s in public["report"]["skipped"]}
    expected_bad = {p.relative_to(public["source"]).as_posix() for p in public["bad"]}
    assert set(skipped) == expected_bad
    glioma = "Training/glioma/"
    assert "0 bytes" in skipped[glioma + "zero.jpg"]
    assert "unreadable" in skipped[glioma + "truncated.jpg"]
    assert "not an image" in skipped[glioma + "notes.png"]
    assert "extension" in skipped[glioma + "readme.txt"]
    assert "system" in skipped[glioma + "Thumbs.db"] and "system" in skipped[glioma + "._Tr-gl (1).jpg"]
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    markdown = (public["out"] / "import_report.md").read_text()
    assert "truncated.jpg" in markdown and "zz copy of rgb.PNG" in markdown


def test_duplicates_are_dropped_and_reported(public):
    assert public["report"]["duplicates"] == [
        {
            "source": "Training/glioma/zz copy of rgb.PNG",
            "duplicate_of": "Training/glioma/rgb.PNG",
            "label_conflict": False,
        }
    ]
    hashes = [read_dataset_info(d)["content_hashes"] for d in sorted(public["out"].glob("site*"))]
    all_hashes = [h for site in hashes for h in site.values()]
    assert len(all_hashes) == len(set(all_hashes))


def test_public_testing_folder_stays_testing(public):
    found = entries(public["out"])
    for _, split, item in found:
        assert (split == "testing") == item["source"].startswith("Testing/")
    assert {split for _, split, _ in found} == set(SPLITS)


def test_source_tree_is_unchanged(public):
    assert snapshot(public["source"]) == public["before"]


def test_provenance_and_counts_are_written(public):
    info = read_dataset_info(public["out"] / "site1")
    assert info["provenance"] == {
        "importer": "folders",
        "source": str(public["source"].resolve()),
        "layout": "public-split",
        "split": "iid",
        "alpha": 0.5,
        "seed": 3,
        "task": "tumor",
    }
    counts = json.loads((public["out"] / "counts.json").read_text())
    assert sum(n for site in counts.values() for split in site.values() for n in split.values()) == len(
        public["expected"]
    )


def test_expert_task_keeps_four_classes_and_aliases(tmp_path):
    source = tmp_path / "src"
    for folder, count in (("glioma_tumor", 4), ("Meningioma", 4), ("no_tumor", 4), ("pituitary tumor", 4)):
        plain_images(source / folder, count, folder)
    main([str(source), "--out", str(tmp_path / "out"), "--task", "expert", "--sites", "2"])
    expected = {
        "glioma_tumor": "glioma",
        "Meningioma": "meningioma",
        "no_tumor": "notumor",
        "pituitary tumor": "pituitary",
    }
    found = entries(tmp_path / "out")
    assert len(found) == 16
    for _, _, item in found:
        assert EXPERT_CLASSES[item["label"]] == expected[item["source"].split("/")[0]]
    assert read_dataset_info(tmp_path / "out" / "site1")["class_names"] == list(EXPERT_CLASSES)


def test_per_hospital_tree_keeps_client_and_split(tmp_path):
    source = tmp_path / "hospitals"
    layout = {"Hospital A": ("train", "Val", "TEST"), "hospital_b": ("Training", "Validation", "Testing")}
    for client, splits in layout.items():
        for split in splits:
            plain_images(source / client / split / "yes", 2, f"{client}{split}y")
            plain_images(source / client / split / "no", 1, f"{client}{split}n")
    main([str(source), "--out", str(tmp_path / "out")])
    canonical = {
        "train": "training",
        "val": "validation",
        "test": "testing",
        "training": "training",
        "validation": "validation",
        "testing": "testing",
    }
    found = entries(tmp_path / "out")
    assert len(found) == 18
    for site, split, item in found:
        client, source_split, cls, _ = item["source"].split("/")
        assert site == client.replace(" ", "_") and split == canonical[source_split.lower()]
        assert TASK_CLASSES[item["label"]] == ("Tumor" if cls == "yes" else "Healthy")
    assert read_dataset_info(tmp_path / "out" / "Hospital_A")["provenance"]["layout"] == "per-hospital"


def test_hospital_without_validation_folder_gets_one_from_training(tmp_path):
    source = tmp_path / "hospitals"
    for client in ("h1", "h2"):
        plain_images(source / client / "Training" / "Tumor", 10, f"{client}t")
        plain_images(source / client / "Training" / "Healthy", 10, f"{client}h")
    plain_images(source / "h1" / "Testing" / "Tumor", 2, "h1test")
    main([str(source), "--out", str(tmp_path / "out")])
    counts = {site: read_dataset_info(tmp_path / "out" / site)["counts"] for site in ("h1", "h2")}
    for site, per_split in counts.items():
        assert per_split["validation"] == {"Healthy": 2, "Tumor": 2}, site
    assert counts["h1"]["testing"] == {"Healthy": 0, "Tumor": 2}  # its Testing folder is kept as is
    assert counts["h2"]["testing"] == {"Healthy": 2, "Tumor": 2}
    sources = [item["source"] for _, _, item in entries(tmp_path / "out")]
    assert len(sources) == len(set(sources)) == 42


def test_dirichlet_split_is_deterministic_for_a_seed(tmp_path):
    source = tmp_path / "src"
    plain_images(source / "Tumor", 30, "t")
    plain_images(source / "Healthy", 30, "h")
    for name in ("a", "b"):
        main([str(source), "--out", str(tmp_path / name), "--split", "dirichlet", "--alpha", "0.3", "--seed", "5"])
    lists = [[(p.parent.name, p.read_text()) for p in sorted((tmp_path / n).glob("*/datalist.json"))] for n in "ab"]
    assert lists[0] == lists[1] and len(lists[0]) == 3


def test_lone_wrapper_folder_is_stepped_into(tmp_path):
    source = tmp_path / "download"
    for split in ("Training", "Testing"):
        for cls in ("Tumor", "Healthy"):
            plain_images(source / "archive" / split / cls, 3, split + cls)
    result = main([str(source), "--out", str(tmp_path / "out"), "--sites", "2"])
    assert result is None
    report = json.loads((tmp_path / "out" / "import_report.json").read_text())
    assert report["layout"] == "public-split" and report["root"] == "archive"


def test_class_map_adds_a_folder_name(tmp_path):
    source = tmp_path / "src"
    plain_images(source / "Brain Lesion", 4, "l")
    plain_images(source / "control", 4, "c")
    with pytest.raises(FedXViTError, match=r"Brain Lesion.*--class-map"):
        main([str(source), "--out", str(tmp_path / "out1"), "--sites", "2"])
    main(
        [
            str(source),
            "--out",
            str(tmp_path / "out2"),
            "--sites",
            "2",
            "--class-map",
            "Brain Lesion=tumor,control=Healthy",
        ]
    )
    for _, _, item in entries(tmp_path / "out2"):
        assert TASK_CLASSES[item["label"]] == ("Tumor" if item["source"].startswith("Brain") else "Healthy")


def assert_one_line_error(result, *words):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert "Traceback" not in result.stderr
    for word in words:
        assert word in lines[0]


def test_cli_errors_are_one_line_with_exit_code_2(tmp_path):
    source = tmp_path / "src"
    plain_images(source / "yes", 3, "y")
    plain_images(source / "no", 3, "n")
    assert_one_line_error(cli(tmp_path / "missing", "--out", tmp_path / "o"), "missing")
    assert_one_line_error(cli(source, "--out", source / "out"), "inside")
    assert_one_line_error(cli(source, "--out", tmp_path / "o", "--split", "dirichlet", "--alpha", "0"), "--alpha")
    assert_one_line_error(cli(source, "--out", tmp_path / "o", "--sites", "4"), "--sites")
    assert not (tmp_path / "o").exists()


def test_bad_inputs_name_what_is_wrong(tmp_path):
    source = tmp_path / "src"
    plain_images(source / "yes", 3, "y")
    plain_images(source / "no", 3, "n")
    with pytest.raises(FedXViTError, match="contains the source"):
        main([str(source), "--out", str(tmp_path)])
    with pytest.raises(FedXViTError, match="--sites 30"):
        main([str(source), "--out", str(tmp_path / "o"), "--sites", "30"])
    (source / "no" / "n_2.png").rename(tmp_path / "moved.png")
    plain_images(source / "yes", 6, "more")
    with pytest.raises(FedXViTError, match="class Healthy has 2 images, fewer than --sites 3"):
        main([str(source), "--out", str(tmp_path / "o"), "--sites", "3"])
    (source / "maybe").mkdir()
    (source / "maybe" / ".DS_Store").write_bytes(b"\x00")
    with pytest.raises(FedXViTError, match="maybe.*empty"):
        main([str(source), "--out", str(tmp_path / "o"), "--class-map", "maybe=Tumor"])


def test_previous_import_needs_force_and_force_touches_only_its_own_files(tmp_path):
    source = tmp_path / "src"
    plain_images(source / "yes", 6, "y")
    plain_images(source / "no", 6, "n")
    out = tmp_path / "out"
    main([str(source), "--out", str(out), "--sites", "3"])
    (out / "notes.txt").write_text("mine\n")
    (out / "other").mkdir()
    (out / "other" / "keep.txt").write_text("keep\n")
    result = cli(source, "--out", out, "--sites", "2")
    assert_one_line_error(result, "--force")
    assert (out / "site3").is_dir()
    main([str(source), "--out", str(out), "--sites", "2", "--force"])
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["counts.json", "counts.md", "import_report.json", "import_report.md", "notes.txt", "other", "site1", "site2"]
    )
    assert (out / "other" / "keep.txt").read_text() == "keep\n"
    assert len(entries(out)) == 12
