"""The embedded benchmark generator: determinism, lesion anatomy, site layout, reruns, CLI errors,
and the skewed scenario (issue #12) beside the unchanged default one.

Everything runs at 64 px with a handful of images so the module stays fast on 2 CPU cores; each
scenario is generated once per module and reused. Every test that generates one is marked slow.
"""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.ndimage import binary_fill_holes, distance_transform_edt
from tiny import REPO

from data_preparation import benchmark
from fedxvit.datalist import load_split, pixel_hash, read_dataset_info
from fedxvit.errors import FedXViTError

TINY = [
    "--image-size",
    "64",
    "--public-per-class",
    "12",
    "--site-sizes",
    "20,30,40",
    "--healthy-fraction",
    "0.4",
    "--val-frac",
    "0.2",
    "--test-frac",
    "0.2",
    "--workers",
    "1",
]
TINY_SKEWED = [
    "--scenario",
    "skewed",
    "--image-size",
    "64",
    "--site-sizes",
    "64,40,24,16,10,8",
    "--val-per-class",
    "2",
    "--test-per-class",
    "3",
    "--workers",
    "1",
]
SPLITS = ("training", "validation", "testing")
# What TINY wrote with the generator of commit 82be106 (before the scenarios existed; library versions pinned in
# requirements.txt), recorded in tests/default_tiny_fingerprint.json: the layout digest (file names, datalists,
# counts, parameters) and each image's mean gray level. Bytes are not compared: a few images differ in a pixel or
# (one of 138 here) more between CPU instruction sets, e.g. AVX-512 machines vs others.
DEFAULT_TINY_FINGERPRINT = Path(__file__).with_name("default_tiny_fingerprint.json")


def generate(out: Path, *extra: str) -> None:
    benchmark.main(["--out", str(out), *TINY, *extra])


def tree_hashes(root: Path) -> dict:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


PIXEL_HASHES = ("content_hashes", "data_hash")  # dataset.json's hashes of the pixels: they follow the bytes


def tree_fingerprint(root: Path) -> dict:
    """{"layout": digest of every file but the images (dataset.json without its pixel hashes) and the image
    names, "image_means": {image: mean gray level}}: what stays fixed across machines."""
    layout, means = {}, {}
    for p in sorted(root.rglob("*")):
        name = str(p.relative_to(root))
        if p.suffix == ".png":
            layout[name] = "image"
            means[name] = round(float(load_pixels(p).mean()), 3)
        elif p.name == "dataset.json":
            layout[name] = {k: v for k, v in json.loads(p.read_text()).items() if k not in PIXEL_HASHES}
        elif p.is_file():
            layout[name] = p.read_text()
    digest = hashlib.sha256(json.dumps(layout, sort_keys=True).encode()).hexdigest()
    return {"layout": digest, "image_means": means}


def load_pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path))


def entries(site: Path) -> list:
    return [e for split in SPLITS for e in load_split(site, split)]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench") / "data"
    generate(out)
    return out


@pytest.fixture(scope="module")
def skewed(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("skewed") / "skewed"
    benchmark.main(["--out", str(out), *TINY_SKEWED])
    return out


@pytest.fixture(scope="module")
def public_lesions(data) -> dict:
    """Per tumor class: (centroid row, col, distance to brain edge, brain center col) per mask."""
    found = {}
    for item in entries(data / "public"):
        name = benchmark.EXPERT_CLASSES[item["label"]]
        if "mask" not in item:
            continue
        mask = load_pixels(item["mask"]) > 127
        brain = binary_fill_holes(load_pixels(item["image"]) > 40)
        depth = distance_transform_edt(brain)
        rows, cols = np.nonzero(mask)
        r, c = int(round(rows.mean())), int(round(cols.mean()))
        found.setdefault(name, []).append((rows.mean(), cols.mean(), depth[r, c], np.nonzero(brain)[1].mean()))
    return {name: np.array(rows) for name, rows in found.items()}


@pytest.mark.slow
def test_same_seed_gives_identical_bytes_and_other_seed_differs(data, tmp_path):
    generate(tmp_path / "again")
    assert tree_hashes(tmp_path / "again") == tree_hashes(data)
    generate(tmp_path / "other", "--seed", "1")
    other, same = tree_hashes(tmp_path / "other"), tree_hashes(data)
    images = [k for k in same if "/images/" in k]
    assert images and all(other[k] != same[k] for k in images)


def render_in_reverse(options: list, out: Path, every: int = 1) -> list:
    """Render every `every`-th image job of a generation into `out`, last first; the jobs rendered."""
    jobs = benchmark.product_jobs(benchmark.parse_args(["--out", str(out), *options]), out)[::every]
    for job in jobs:
        for folder in ("images", "masks"):
            (Path(job["site_dir"]) / folder).mkdir(parents=True, exist_ok=True)
    for job in reversed(jobs):
        benchmark.render(job)
    return jobs


@pytest.mark.slow
def test_images_do_not_depend_on_generation_order(data, tmp_path):
    """Each image has its own RNG stream, so workers (or any order) give the same files."""
    render_in_reverse(TINY, tmp_path)
    rendered = tree_hashes(tmp_path)
    assert len(rendered) > 100
    assert rendered == {k: v for k, v in tree_hashes(data).items() if k in rendered}


@pytest.mark.slow
def test_mask_present_exactly_for_tumors_and_inside_the_head(data):
    for site, healthy in [("public", benchmark.EXPERT_CLASSES.index("notumor")), ("site1", 0), ("site2", 0)]:
        for item in entries(data / site):
            assert ("mask" in item) == (item["label"] != healthy), item["image"]
            if "mask" in item:
                mask = load_pixels(item["mask"])
                assert set(np.unique(mask)) <= {0, 255} and (mask == 255).sum() >= 3
                head = binary_fill_holes(load_pixels(item["image"]) > 15)  # low: the dark protocol site
                assert head[mask == 255].mean() > 0.9, item["mask"]


@pytest.mark.slow
def test_images_are_8bit_grayscale_of_the_requested_size(data):
    for item in entries(data / "site1"):
        image = Image.open(item["image"])
        assert image.mode == "L" and image.size == (64, 64)


@pytest.mark.slow
def test_meningioma_sits_nearer_the_brain_edge_than_glioma(public_lesions):
    meningioma_depth = np.median(public_lesions["meningioma"][:, 2])
    glioma_depth = np.median(public_lesions["glioma"][:, 2])
    assert meningioma_depth < glioma_depth


@pytest.mark.slow
def test_pituitary_lesions_are_midline_and_small(public_lesions):
    pituitary, glioma = public_lesions["pituitary"], public_lesions["glioma"]
    off_midline = np.abs(pituitary[:, 1] - pituitary[:, 3])
    assert np.median(off_midline) < 64 * 0.06
    assert np.median(off_midline) < np.median(np.abs(glioma[:, 1] - glioma[:, 3]))


@pytest.mark.slow
def test_public_has_four_classes_and_sites_two(data):
    assert read_dataset_info(data / "public")["class_names"] == list(benchmark.EXPERT_CLASSES)
    for k in (1, 2, 3):
        info = read_dataset_info(data / f"site{k}")
        assert info["class_names"] == list(benchmark.TASK_CLASSES)
        assert info["provenance"]["generator"] == "embedded-benchmark" and info["provenance"]["seed"] == 0
        for split in SPLITS:
            assert all(info["counts"][split][name] >= 1 for name in benchmark.TASK_CLASSES), (k, split)


@pytest.mark.slow
def test_site_sizes_differ_and_nothing_is_shared(data):
    sizes = [read_dataset_info(data / f"site{k}")["num_images"] for k in (1, 2, 3)]
    assert sizes == [20, 30, 40]
    owner = {}
    for product in ("public", "site1", "site2", "site3"):
        split_sets = []
        for split in SPLITS:
            hashes = {pixel_hash(load_pixels(e["image"])) for e in load_split(data / product, split)}
            split_sets.append(hashes)
            for h in hashes:
                assert owner.setdefault(h, (product, split)) == (product, split), (
                    f"{product}/{split} repeats {owner[h]}"
                )
        assert sum(map(len, split_sets)) == len(set().union(*split_sets))


@pytest.mark.slow
def test_each_hospital_has_a_scanner_the_public_set_never_shows(data):
    jobs = benchmark.product_jobs(benchmark.parse_args(["--out", str(data), *TINY]), data)
    profiles = {}
    for job in jobs:
        profiles.setdefault(Path(job["site_dir"]).name, set()).add(job["profile_index"])
    public = profiles.pop("public")
    assert public == set(range(benchmark.PUBLIC_SCANNERS))
    assert [len(p) for p in profiles.values()] == [1, 1, 1] and len(set.union(*profiles.values())) == 3
    assert not public & set.union(*profiles.values())
    names = [read_dataset_info(data / f"site{k}")["provenance"]["scanner_profile"] for k in (1, 2, 3)]
    assert names == [benchmark.SCANNER_PROFILES[i]["name"] for i in benchmark.DEFAULT_SITE_SCANNERS]

    def median_tissue(site):  # grey level of the head's pixels, all images of the site
        return np.median(np.concatenate([p[p > 10] for p in (load_pixels(e["image"]) for e in entries(data / site))]))

    assert median_tissue("site1") > 1.25 * median_tissue("site2")  # the bright protocol vs the dark one


@pytest.mark.slow
def test_site_healthy_share_follows_the_option(data):
    info = read_dataset_info(data / "site3")
    healthy = sum(info["counts"][s]["Healthy"] for s in SPLITS)
    assert healthy == round(40 * 0.4)


@pytest.mark.slow
def test_rerun_with_same_parameters_is_reused(data, capsys):
    before = tree_hashes(data)
    generate(data)
    assert "reusing" in capsys.readouterr().out
    assert tree_hashes(data) == before


@pytest.mark.slow
def test_rerun_with_other_parameters_refused_without_force(tmp_path):
    out = tmp_path / "data"
    generate(out)
    (out / "keep.txt").write_text("not ours")
    with pytest.raises(FedXViTError, match="--force"):
        generate(out, "--seed", "3")
    assert json.loads((out / "benchmark.json").read_text())["params"]["seed"] == 0
    benchmark.main(["--out", str(out), *TINY[:4], "--site-sizes", "20,20", *TINY[6:], "--seed", "3", "--force"])
    assert json.loads((out / "benchmark.json").read_text())["params"]["seed"] == 3
    assert not (out / "site3").exists() and (out / "keep.txt").read_text() == "not ours"


@pytest.mark.parametrize(
    "bad",
    [
        ["--image-size", "16"],
        ["--val-frac", "0.6", "--test-frac", "0.5"],
        ["--site-sizes", "150,4"],
        ["--healthy-fraction", "1.5"],
        ["--site-sizes", "1,x"],
        ["--scenario", "skewed", "--healthy-fraction", "0.3"],
        ["--scenario", "skewed", "--public-per-class", "10"],
        ["--scenario", "unknown"],
        ["--site-sizes", "80,4", "--scenario", "skewed", "--val-per-class", "0", "--test-per-class", "0"],
        ["--site-sizes", "80,1", "--scenario", "skewed"],
        ["--val-per-class", "2", "--scenario", "skewed", "--test-per-class", "0"],
        ["--val-per-class", "2"],
    ],
)
def test_bad_option_is_one_line_error(bad, tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "data_preparation.benchmark", "--out", str(tmp_path / "d"), *bad],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2
    assert run.stderr.startswith("error:") and len(run.stderr.strip().splitlines()) == 1
    assert "Traceback" not in run.stderr and bad[0] in run.stderr
    assert not (tmp_path / "d").exists()


@pytest.mark.slow
def test_default_scenario_is_what_it_was_before_scenarios(data):
    """Same files, labels, splits and counts; the images' mean gray levels as then, up to a CPU's arithmetic: a
    change of seed stream or transform moves most images by several levels, while another machine's floating point
    moves a few images (one by 0.52 levels on 2026-12-05's machine; another machine's 7 of 138 by a few pixels)."""
    expected, found = json.loads(DEFAULT_TINY_FINGERPRINT.read_text()), tree_fingerprint(data)
    assert found["layout"] == expected["layout"]
    assert found["image_means"].keys() == expected["image_means"].keys()
    shift = {k: abs(v - expected["image_means"][k]) for k, v in found["image_means"].items()}
    moved = sorted(k for k, d in shift.items() if d > 0.5)
    assert len(moved) <= 0.03 * len(shift), f"{len(moved)} of {len(shift)} images changed, e.g. {moved[0]}"
    assert float(np.median(list(shift.values()))) < 0.05, "the images' mean gray levels moved"
    assert "scenario" not in json.loads((data / "benchmark.json").read_text())["params"]


# ----------------------------------------------------------------------------- skewed scenario


def skewed_counts(root: Path, split: str = "training") -> dict:
    """site -> (images, Tumor images) of one split, from each site's dataset.json."""
    counts = {}
    for site in sorted(root.glob("site*")):
        info = read_dataset_info(site)
        counts[site.name] = (sum(info["counts"][split].values()), info["counts"][split]["Tumor"])
    return counts


def test_skewed_scenario_has_long_tailed_hospitals_with_extreme_tumor_shares():
    args = benchmark.parse_args(["--scenario", "skewed"])  # the real sizes: nothing is rendered
    sizes = args.site_sizes
    tumor_shares = [1 - healthy / size for healthy, size in zip(benchmark.site_healthy_counts(args), sizes)]
    assert len(sizes) >= 5 and min(sizes) <= max(sizes) / 8
    assert any(share <= 0.10 for share in tumor_shares) and any(share >= 0.85 for share in tumor_shares)
    assert args.out == "data/skewed" and not benchmark.SCENARIOS["skewed"]["public"]
    # evaluation cohorts large enough to decide: >= 100 test images per class per hospital, >= 500 validation
    assert args.test_per_class >= 100 and args.val_per_class * 2 * len(sizes) >= 500


def test_skewed_tumor_shares_follow_the_dirichlet_alpha(monkeypatch):
    """Small alpha: hospitals near 0% or 100% Tumor; large alpha: all near 50%. --seed changes none."""

    def shares(alpha):
        monkeypatch.setitem(benchmark.SCENARIOS["skewed"], "tumor_share_dirichlet", {"alpha": alpha, "seed": 0})
        return np.array(benchmark.tumor_shares("skewed", 40))

    skewed_draw, even_draw = shares(0.3), shares(100.0)
    assert np.mean(np.abs(skewed_draw - 0.5) > 0.35) > 0.3
    assert np.all(np.abs(even_draw - 0.5) < 0.2)
    monkeypatch.undo()
    counts = [
        benchmark.site_healthy_counts(benchmark.parse_args(["--scenario", "skewed", "--seed", seed]))
        for seed in ("0", "5")
    ]
    assert counts[0] == counts[1]


@pytest.mark.slow
def test_skewed_sites_train_on_their_skew_and_are_scored_on_balanced_cohorts(skewed):
    args = benchmark.parse_args(["--out", str(skewed), *TINY_SKEWED])
    planned = {
        f"site{k}": (size, size - healthy)
        for k, (size, healthy) in enumerate(zip(args.site_sizes, benchmark.site_healthy_counts(args)), start=1)
    }
    assert skewed_counts(skewed) == planned  # every hospital image trains, with the hospital's Tumor share
    assert len({tumor / size for size, tumor in planned.values()}) >= 4  # the shares really differ
    for split, per_class in (("validation", 2), ("testing", 3)):  # cohorts: balanced, the same size everywhere
        assert set(skewed_counts(skewed, split).values()) == {(2 * per_class, per_class)}
    for site in planned:
        assert read_dataset_info(skewed / site)["provenance"]["tumor_share"] == round(
            planned[site][1] / planned[site][0], 4
        )
    heldout = read_dataset_info(skewed / "heldout")
    assert heldout["counts"]["training"] == {"Healthy": 0, "Tumor": 0}
    assert heldout["counts"]["testing"] == {"Healthy": 3, "Tumor": 3}
    scanners = {read_dataset_info(skewed / f"site{k}")["provenance"]["scanner_profile"] for k in range(1, 7)}
    assert heldout["provenance"]["scanner_profile"] not in scanners | {
        p["name"] for p in benchmark.SCANNER_PROFILES[: benchmark.PUBLIC_SCANNERS]
    }
    params = json.loads((skewed / "benchmark.json").read_text())["params"]
    assert params["scenario"] == "skewed" and params["site_sizes"] == args.site_sizes
    assert params["cohorts"]["test_per_class"] == 3 and "test_frac" not in params
    assert not (skewed / "public").exists()


@pytest.mark.slow
def test_skewed_hospitals_each_have_a_scanner_of_their_own(skewed):
    names = [read_dataset_info(skewed / f"site{k}")["provenance"]["scanner_profile"] for k in range(1, 7)]
    public_names = {p["name"] for p in benchmark.SCANNER_PROFILES[: benchmark.PUBLIC_SCANNERS]}
    assert len(set(names)) == 6 and not set(names) & public_names

    def median_tissue(site):
        return np.median(np.concatenate([p[p > 10] for p in (load_pixels(e["image"]) for e in entries(skewed / site))]))

    assert len({round(float(median_tissue(f"site{k}")) / 8) for k in range(1, 7)}) >= 3  # visibly different contrasts


def lesion_contrast(items: list) -> tuple:
    """Median mask area (pixels) and median |lesion - surrounding tissue| grey level of tumor images."""
    areas, contrasts = [], []
    for item in items:
        if "mask" in item:
            mask, pixels = load_pixels(item["mask"]) > 127, load_pixels(item["image"]).astype(float)
            tissue = (pixels > 15) & ~mask
            areas.append(mask.sum())
            contrasts.append(abs(pixels[mask].mean() - np.median(pixels[tissue])))
    return np.median(areas), np.median(contrasts)


@pytest.mark.slow
def test_skewed_lesions_are_smaller_and_fainter(data, skewed):
    default_area, default_contrast = lesion_contrast([e for k in (1, 2, 3) for e in entries(data / f"site{k}")])
    skewed_area, skewed_contrast = lesion_contrast([e for k in range(1, 7) for e in entries(skewed / f"site{k}")])
    # midway between FAINT_LESION and LESION since 2026-12-05: here 0.63 and 0.68 of the default (faint: < 0.6)
    assert skewed_area < 0.75 * default_area
    assert skewed_contrast < 0.75 * default_contrast


@pytest.mark.slow
def test_skewed_is_deterministic_and_disjoint(skewed, tmp_path):
    jobs = render_in_reverse(TINY_SKEWED, tmp_path, every=7)
    rendered = tree_hashes(tmp_path)
    assert len(rendered) >= len(jobs)
    assert rendered == {k: v for k, v in tree_hashes(skewed).items() if k in rendered}
    owner = {}
    for k in [*range(1, 7), "heldout"]:
        site = skewed / (f"site{k}" if k != "heldout" else k)
        for split in SPLITS:
            for item in load_split(site, split):
                h = pixel_hash(load_pixels(item["image"]))
                assert owner.setdefault(h, (k, split)) == (k, split)


@pytest.mark.slow
def test_rerun_of_the_other_scenario_is_refused_without_force(skewed):
    with pytest.raises(FedXViTError, match="scenario"):
        generate(skewed)
