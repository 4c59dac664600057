"""The report's Grad-CAM panel and the other explanation maps, scored against the tumor masks.

    python -m result_stat.gradcam [--run-dir workspace/server/simulate_job] [--n 25] [--out results]
    python -m result_stat.gradcam --choose      # every Grad-CAM candidate: toy controls, validation masks

The maps come from fedxvit.explain (Captum). The panel called "gradcam" is the candidate chosen by
the toy controls and the validation split's masks (`explain.CHOSEN_CAM`, see `--choose`); the
design card's Grad-CAM on the CNN's last stage (stride 16) stays as `--method gradcam_stride16`.
For each site, N tumor test images (seeded choice) get an overlay PNG and one contact sheet.
Looking at heatmaps proves little, so they are also scored where masks exist:

- pointing game: the heatmap's maximum lies inside the tumor mask dilated by a few pixels;
- energy in mask: the share of the positive heatmap that lies inside the (undilated) mask;

per site and overall, next to the same scores of a random map, a centered map and the image's
own intensity (what a model that looks nowhere in particular, at the middle of the brain, or at
the brightest pixel would get), and of the mask itself coarsened to the 16-px CAM cells (the
ceiling of any map read off the stride-16 stage). `--method occlusion` and `--method
integrated_gradients` score the same images with perturbation and pixel-gradient maps (run_all
reports them, and the stage Grad-CAM, beside the panel).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import torch

from fedxvit.classes import TASK_CLASSES
from fedxvit.errors import ArgumentParser, FedXViTError, run_cli
from fedxvit.explain import (
    CAM_CANDIDATES,
    CHOSEN_CAM,
    DEFAULT_DILATION,
    METHODS,
    TUMOR,
    dilation_pixels,
    energy_in_mask,
    load_tumor_cases,
    method_title,
    peak_location,
    pointing_hit,
    score_maps,
)
from fedxvit.model import PATCH_STRIDE
from fedxvit.training import resolve_device

BASELINES = ("random", "centered", "intensity", "mask_cells")


def baseline_maps(
    shape: tuple[int, int],
    rng: np.random.Generator,
    image: np.ndarray | None = None,
    mask: np.ndarray | None = None,
    cell: int = PATCH_STRIDE,
) -> dict:
    """Reference maps: uniform noise, a Gaussian on the image centre (sigma = side / 6); given the
    image, the image itself ("intensity": what pointing at the brightest pixel scores; on the
    synthetic benchmark the lesions are bright, so this is the bar a model's map must clear); given
    the mask, the mask itself averaged over the CAM's `cell`-pixel grid and upsampled like Grad-CAM
    ("mask_cells": the ceiling of any map read off that grid, since a cell's centre may miss a small
    lesion that only grazes it)."""
    from captum.attr import LayerAttribution

    rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]]
    sigma = max(shape) / 6
    centered = np.exp(-(((rows - (shape[0] - 1) / 2) ** 2 + (cols - (shape[1] - 1) / 2) ** 2) / (2 * sigma**2)))
    maps = {"random": rng.random(shape), "centered": centered}
    if image is not None:
        maps["intensity"] = np.asarray(image, dtype=np.float64)
    if mask is not None:
        grid = tuple(max(1, side // cell) for side in shape)
        cells = torch.nn.functional.adaptive_avg_pool2d(torch.as_tensor(mask, dtype=torch.float64)[None, None], grid)
        maps["mask_cells"] = LayerAttribution.interpolate(cells, tuple(shape), interpolate_mode="bilinear")[
            0, 0
        ].numpy()
    return maps


def overlay_image(image: np.ndarray, heatmap: np.ndarray, mask: np.ndarray, title: str, scale: int = 2):
    """One case's picture, built from arrays: the gray image under the heatmap (jet, 40%), the mask's edge in
    white, the heatmap's peak as a magenta x, the title above. Drawn as a matplotlib figure, each case cost about
    0.17 s, most of the report's explanation time for a few hundred cases."""
    from matplotlib import colormaps
    from PIL import Image, ImageDraw
    from scipy.ndimage import binary_erosion

    gray = np.repeat(np.clip(np.asarray(image, dtype=np.float64), 0, 1)[..., None], 3, axis=2)
    heat = colormaps["jet"](np.clip(np.asarray(heatmap, dtype=np.float64), 0, 1))[..., :3]
    rgb = 0.6 * gray + 0.4 * heat
    mask = np.asarray(mask, dtype=bool)
    rgb[mask & ~binary_erosion(mask)] = 1.0
    picture = Image.fromarray((rgb * 255).round().astype(np.uint8)).resize(
        (rgb.shape[1] * scale, rgb.shape[0] * scale), Image.NEAREST
    )
    canvas = Image.new("RGB", (picture.width, picture.height + 14), "white")
    canvas.paste(picture, (0, 14))
    draw = ImageDraw.Draw(canvas)
    draw.text((2, 1), title, fill="black")
    if np.asarray(heatmap).max() > 0:
        row, col = peak_location(heatmap)
        y, x, arm = row * scale + scale // 2 + 14, col * scale + scale // 2, 3 * scale
        draw.line((x - arm, y - arm, x + arm, y + arm), fill="magenta", width=2)
        draw.line((x - arm, y + arm, x + arm, y - arm), fill="magenta", width=2)
    return canvas


def save_panels(site: str, cases: list[dict], out: os.PathLike, columns: int = 5, method: str = "gradcam") -> dict:
    """One overlay PNG per case under <out>/<method>/<site>/ and a contact sheet <out>/<method>_<site>.png: the
    overlays pasted in a grid under a title line (PIL; as a matplotlib figure a sheet took about 0.9 s)."""
    from PIL import Image, ImageDraw

    out = Path(out)
    folder = out / method / site
    folder.mkdir(parents=True, exist_ok=True)
    overlays = [overlay_image(case["image"][0].numpy(), case["heatmap"], case["mask"], case["title"]) for case in cases]
    for case, overlay in zip(cases, overlays):
        overlay.save(folder / f"{case['name']}.png")
    gap, title_height = 6, 20
    cell_w = max((o.width for o in overlays), default=128) + gap
    cell_h = max((o.height for o in overlays), default=128) + gap
    rows = max(1, -(-len(cases) // columns))
    sheet_image = Image.new("RGB", (gap + columns * cell_w, title_height + rows * cell_h), "white")
    ImageDraw.Draw(sheet_image).text(
        (gap, 4), f"{site}: {method} of the Tumor logit (white: tumor mask, x: heatmap max)", fill="black"
    )
    for i, overlay in enumerate(overlays):
        sheet_image.paste(overlay, (gap + (i % columns) * cell_w, title_height + (i // columns) * cell_h))
    sheet = out / f"{method}_{site}.png"
    sheet_image.save(sheet)
    return {"folder": folder, "sheet": sheet}


def explain_sites(
    model: torch.nn.Module,
    site_dirs: dict,
    out: os.PathLike | None,
    n: int = 25,
    seed: int = 0,
    dilation: float = DEFAULT_DILATION,
    device: str | torch.device | None = None,
    progress: bool = True,
    panels: bool = True,
    method: str = "gradcam",
    image_size: int | None = None,
    split: str = "testing",
    cases: dict | None = None,
) -> dict:
    """Heatmaps of `method` (explain.METHODS) for up to n tumor images of each site's `split`, scored
    against the masks; writes <out>/<method>.json/.md and the panels, returns the JSON dict. `cases`:
    {site: load_tumor_cases(...)} already loaded with these n, seed and split (choose_cam reuses them)."""
    from tqdm.auto import tqdm

    if method not in METHODS:
        raise FedXViTError(f"unknown attribution method {method!r}; choose one of {', '.join(METHODS)}")

    torch_device = resolve_device(device) if not isinstance(device, torch.device) else device
    model = model.to(torch_device).eval()
    size = image_size or model.preset.image_size  # another size only for toy models (tests)
    dilation_px = dilation_pixels(size, dilation)
    rng = np.random.default_rng(seed)
    result = {
        "method": method,
        "description": method_title(method),
        "target": TASK_CLASSES[TUMOR],
        "split": split,
        "dilation_px": dilation_px,
        "image_size": size,
        "per_site": {},
    }
    all_maps, all_masks, all_base = [], [], {name: [] for name in BASELINES}
    for site, site_dir in site_dirs.items():
        site_cases = cases[site] if cases else load_tumor_cases(site_dir, size, n, seed, split=split)
        for case in tqdm(site_cases, desc=f"{method} {site}", unit="img", disable=not progress):
            image = case["image"][None].to(torch_device)
            with torch.no_grad():
                case["p_tumor"] = float(model(image).softmax(1)[0, TUMOR])
            case["heatmap"] = METHODS[method](model, image)[0]
            case["hit"] = pointing_hit(case["heatmap"], case["mask"], dilation_px)
            case["energy"] = energy_in_mask(case["heatmap"], case["mask"])
            case["title"] = f"{case['name']}  p={case['p_tumor']:.2f}  {'hit' if case['hit'] else 'miss'}"
        maps, masks = [c["heatmap"] for c in site_cases], [c["mask"] for c in site_cases]
        base = [baseline_maps(c["mask"].shape, rng, image=c["image"][0].numpy(), mask=c["mask"]) for c in site_cases]
        site_result = {
            "gradcam": score_maps(maps, masks, dilation_px),
            "baselines": {name: score_maps([b[name] for b in base], masks, dilation_px) for name in all_base},
            "mask_fraction": float(np.mean([m.mean() for m in masks])),
            "images": [
                {"image": c["name"], "p_tumor": c["p_tumor"], "hit": c["hit"], "energy_in_mask": c["energy"]}
                for c in site_cases
            ],
        }
        if panels and out is not None:
            files = save_panels(site, site_cases, out, method=method)
            site_result["contact_sheet"] = str(files["sheet"])
        result["per_site"][site] = site_result
        all_maps += maps
        all_masks += masks
        for name in all_base:
            all_base[name] += [b[name] for b in base]
    overall = score_maps(all_maps, all_masks, dilation_px)
    result.update(
        pointing_game=overall["pointing_game"],
        energy_in_mask=overall["energy_in_mask"],
        n=overall["n"],
        baselines={name: score_maps(maps, all_masks, dilation_px) for name, maps in all_base.items()},
    )
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / f"{method}.json").write_text(json.dumps(result, indent=2) + "\n")
        (Path(out) / f"{method}.md").write_text(gradcam_markdown(result))
    return result


def gradcam_markdown(result: dict) -> str:
    def pct(v):
        return "n/a" if v is None else f"{100 * v:.1f}%"

    lines = [
        f"## {result['method']} heatmaps against the tumor masks\n",
        f"{result['description']}, target {result['target']}, {result.get('split', 'testing')} split; "
        "pointing game with the mask "
        f"dilated by {result['dilation_px']} px at {result['image_size']} px.\n",
        "| site | images | pointing game | energy in mask | random map: PG / energy | centered map: PG / energy "
        "| image intensity: PG / energy | mask on the 16-px cells (ceiling): PG / energy | mask area |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    rows = [(site, r["gradcam"], r["baselines"], r["mask_fraction"]) for site, r in result["per_site"].items()]
    rows.append(
        (
            "**all**",
            {"n": result["n"], "pointing_game": result["pointing_game"], "energy_in_mask": result["energy_in_mask"]},
            result["baselines"],
            None,
        )
    )
    for site, g, b, area in rows:
        lines.append(
            f"| {site} | {g['n']} | {pct(g['pointing_game'])} | {pct(g['energy_in_mask'])} | "
            f"{pct(b['random']['pointing_game'])} / {pct(b['random']['energy_in_mask'])} | "
            f"{pct(b['centered']['pointing_game'])} / {pct(b['centered']['energy_in_mask'])} | "
            f"{pct(b['intensity']['pointing_game'])} / {pct(b['intensity']['energy_in_mask'])} | "
            f"{pct(b['mask_cells']['pointing_game'])} / {pct(b['mask_cells']['energy_in_mask'])} | "
            f"{'' if area is None else pct(area)} |"
        )
    return "\n".join(lines) + "\n"


# ---- the toy controls: does a map follow the model's evidence? (Adebayo et al. 2018's question, on a task
# where the evidence is known)
TOY_SIZE, TOY_PATCH = 64, 16  # the tiny preset at 64 px: one patch = one 16-px cell
CONTROL_HIT, CONTROL_MISS = 0.9, 0.2  # pointing game on the patch: least for the patch model, most for the shortcut


def toy_images(n: int, seed: int, shortcut: bool = False):
    """(images, labels, masks) of the toy task. Noise images; patch task: class 1 holds a bright 16-px patch at a
    random place (its mask). Shortcut task: every image holds such a patch, and class 1 is told apart only by a
    marker in the bottom-right corner, so the model's evidence is never the masked patch."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 1, TOY_SIZE, TOY_SIZE, generator=g) * 0.3
    labels = torch.arange(n) % 2
    masks = np.zeros((n, TOY_SIZE, TOY_SIZE), bool)
    for i in range(n):
        if labels[i] == 1 or shortcut:
            r, c = torch.randint(0, TOY_SIZE - TOY_PATCH - 8, (2,), generator=g).tolist()
            images[i, :, r : r + TOY_PATCH, c : c + TOY_PATCH] = 0.9
            masks[i, r : r + TOY_PATCH, c : c + TOY_PATCH] = True
        if shortcut and labels[i] == 1:
            images[i, :, -8:, -8:] = 1.0
    return images, labels, masks


def toy_batches(images, labels, size: int = 16) -> list[dict]:
    return [{"image": images[i : i + size], "label": labels[i : i + size]} for i in range(0, len(images), size)]


def train_toy(shortcut: bool = False, epochs: int = 20) -> torch.nn.Module:
    """A tiny-preset model trained on the toy task (seeded, CPU, seconds)."""
    from fedxvit.model import build_model
    from fedxvit.training import make_optimizer, seed_everything, train_epoch

    seed_everything(0)
    model = build_model("tiny", num_classes=2)
    optimizer = make_optimizer(model, 1e-3)
    images, labels, _ = toy_images(128, seed=0, shortcut=shortcut)
    for _ in range(epochs):
        train_epoch(model, toy_batches(images, labels), optimizer, torch.device("cpu"))
    return model.eval()


def toy_controls(methods, models: tuple | None = None, n: int = 64) -> dict:
    """method -> pointing game of its maps on held-out toy tumors: "patch" (patch model: should hit the patch),
    "shortcut_patch" (shortcut model: should miss it) and "shortcut_corner" (where that model's evidence is),
    and "passes" (hit >= CONTROL_HIT and miss <= CONTROL_MISS). `models`: (patch, shortcut), trained if None."""
    patch_model, shortcut_model = models or (train_toy(), train_toy(shortcut=True))
    corner = np.zeros((TOY_SIZE, TOY_SIZE), bool)
    corner[-8:, -8:] = True
    cases = {}
    for shortcut in (False, True):
        images, labels, masks = toy_images(n, seed=1, shortcut=shortcut)
        cases[shortcut] = (images[labels == 1], list(masks[(labels == 1).numpy()]))
    results = {}
    for method in methods:
        on_patch = METHODS[method](patch_model, cases[False][0])
        on_shortcut = METHODS[method](shortcut_model, cases[True][0])
        row = {
            "patch": score_maps(on_patch, cases[False][1], 2)["pointing_game"],
            "shortcut_patch": score_maps(on_shortcut, cases[True][1], 2)["pointing_game"],
            "shortcut_corner": score_maps(on_shortcut, [corner] * len(cases[True][1]), 2)["pointing_game"],
        }
        row["passes"] = row["patch"] >= CONTROL_HIT and row["shortcut_patch"] <= CONTROL_MISS
        results[method] = row
    return results


def choose_cam(
    model: torch.nn.Module,
    site_dirs: dict,
    out: os.PathLike | None,
    n: int = 25,
    seed: int = 0,
    dilation: float = DEFAULT_DILATION,
    device: str | torch.device | None = None,
    controls: dict | None = None,
) -> dict:
    """The report's Grad-CAM panel, chosen in two steps. Every candidate (explain.CAM_CANDIDATES) first faces the
    toy controls (toy_controls: it must hit the patch the model uses and miss the one it ignores); among those that
    pass, the best pointing game on the validation split's masks wins (energy in the mask breaks ties). Test
    scores are computed for the record and never take part. Writes <out>/gradcam_choice.json/.md."""
    controls = controls or toy_controls(CAM_CANDIDATES)
    size = model.preset.image_size
    cases = {
        split: {site: load_tumor_cases(site_dir, size, n, seed, split=split) for site, site_dir in site_dirs.items()}
        for split in ("validation", "testing")
    }
    rows = []
    for method in CAM_CANDIDATES:
        scores = {
            split: explain_sites(
                model,
                site_dirs,
                None,
                n,
                seed,
                dilation,
                device,
                progress=False,
                method=method,
                split=split,
                cases=cases[split],
            )
            for split in cases
        }
        rows.append(
            {
                "method": method,
                "description": method_title(method),
                "toy_controls": controls[method],
                **{
                    f"{split}_{key}": scores[split][key]
                    for split in scores
                    for key in ("pointing_game", "energy_in_mask", "n")
                },
            }
        )
    eligible = [r for r in rows if r["toy_controls"]["passes"]]
    if not eligible:
        raise FedXViTError("no Grad-CAM candidate passes the toy controls; nothing to choose")
    best = max(eligible, key=lambda r: (r["validation_pointing_game"], r["validation_energy_in_mask"]))
    result = {"chosen": best["method"], "shipped": CHOSEN_CAM, "candidates": rows}
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "gradcam_choice.json").write_text(json.dumps(result, indent=2) + "\n")
        (Path(out) / "gradcam_choice.md").write_text(choice_markdown(result))
    return result


def choice_markdown(result: dict) -> str:
    def pct(v):
        return "n/a" if v is None else f"{100 * v:.1f}%"

    rows = result["candidates"]
    lines = [
        "## Choosing the Grad-CAM panel: toy controls, then the validation masks\n",
        f"Best validation pointing game among the candidates that pass the toy controls (energy in the mask breaks "
        f"ties): **{result['chosen']}**; the report ships **{result['shipped']}**"
        + (" (the same)." if result["chosen"] == result["shipped"] else " (a different one: see the note).")
        + f" Toy controls: pointing game on the patch >= {CONTROL_HIT:.0%} for a model that uses it, <= "
        f"{CONTROL_MISS:.0%} for one that uses a corner marker. Validation: {rows[0]['validation_n']} masked tumors; "
        f"test: {rows[0]['testing_n']} (not used to choose).\n",
        "| candidate | toy: patch model / shortcut model on the patch (on its corner) | passes "
        "| validation: pointing game | validation: energy in mask | test: pointing game | test: energy in mask |",
        "|---|---:|:-:|---:|---:|---:|---:|",
    ]

    def rank(r):
        return not r["toy_controls"]["passes"], -r["validation_pointing_game"], -r["validation_energy_in_mask"]

    for r in sorted(rows, key=rank):
        toy = r["toy_controls"]
        lines.append(
            f"| {r['method']} | {pct(toy['patch'])} / {pct(toy['shortcut_patch'])} ({pct(toy['shortcut_corner'])}) "
            f"| {'yes' if toy['passes'] else 'no'} "
            f"| {pct(r['validation_pointing_game'])} | {pct(r['validation_energy_in_mask'])} | "
            f"{pct(r['testing_pointing_game'])} | {pct(r['testing_energy_in_mask'])} |"
        )
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    parser = ArgumentParser(
        prog="python -m result_stat.gradcam",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--run-dir", default=None, help="server run folder (default <project>/workspace/server/simulate_job)"
    )
    parser.add_argument(
        "--model",
        default="final",
        help="'final' or 'best' global model of the run, or a path to a global model file / fedxvit checkpoint",
    )
    parser.add_argument("--sites", nargs="+", default=None, help="sites (default: the run's sites)")
    parser.add_argument("--n", type=int, default=25, help="tumor test images per site")
    parser.add_argument("--seed", type=int, default=0, help="seed of the image choice and the random baseline")
    parser.add_argument(
        "--dilation",
        type=float,
        default=DEFAULT_DILATION,
        help="mask dilation for the pointing game, as a fraction of the image side",
    )
    parser.add_argument("--method", default="gradcam", choices=list(METHODS), help="attribution method")
    parser.add_argument(
        "--choose",
        action="store_true",
        help="choose the Grad-CAM panel instead: every candidate through the toy controls, then scored on the "
        "validation masks (and test, for the record)",
    )
    parser.add_argument("--out", default="results", help="output folder")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    return parser.parse_args(argv)


def load_run_model(run_dir: os.PathLike | None, which: str = "final", device=None) -> torch.nn.Module:
    """The run's final/best global model, or any fedxvit checkpoint / persistor file given by path."""
    from fedxvit.checkpoint import build_model_from_checkpoint, load_global_model, sidecar_path
    from result_stat.report import GLOBAL_MODELS
    from tooling.jobconfig import default_run_dir, read_job_settings

    run_dir = Path(run_dir) if run_dir else default_run_dir()
    if which in GLOBAL_MODELS:
        preset = read_job_settings(run_dir).preset
        return load_global_model(run_dir / "app_server" / GLOBAL_MODELS[which], preset, device=device or "cpu")
    if sidecar_path(which).is_file():
        return build_model_from_checkpoint(which, num_classes=len(TASK_CLASSES), device=device or "cpu")[0].eval()
    preset = read_job_settings(run_dir).preset
    return load_global_model(which, preset, device=device or "cpu")


def main(argv=None) -> dict:
    from fedxvit.sites import site_data_dir
    from tooling.jobconfig import default_run_dir, run_sites

    args = parse_args(argv)
    if args.n < 1:
        raise FedXViTError(f"--n {args.n}: ask for at least one image per site")
    run_dir = Path(args.run_dir) if args.run_dir else default_run_dir()
    model = load_run_model(run_dir, args.model, args.device)
    sites = args.sites or run_sites(run_dir)
    if args.choose:
        result = choose_cam(
            model, {s: site_data_dir(s) for s in sites}, args.out, args.n, args.seed, args.dilation, args.device
        )
        print(choice_markdown(result))
        return result
    result = explain_sites(
        model,
        {s: site_data_dir(s) for s in sites},
        args.out,
        n=args.n,
        seed=args.seed,
        dilation=args.dilation,
        device=args.device,
        method=args.method,
    )
    print(gradcam_markdown(result))
    return result


if __name__ == "__main__":
    run_cli(main)
