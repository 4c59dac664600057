"""Heatmaps and their scores: Grad-CAM maps' shape/range/determinism, the pointing game and
energy-in-mask on hand-made maps, and positive/negative controls on tiny trained toy models."""

import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image

from fedxvit.datalist import write_site
from fedxvit.errors import FedXViTError
from fedxvit.explain import (
    CAM_CANDIDATES,
    CHOSEN_CAM,
    METHODS,
    TokenGrid,
    cell_centre_offset,
    cnn_stage,
    energy_in_mask,
    gradcam_maps,
    integrated_gradients_maps,
    occlusion_maps,
    peak_location,
    pointing_hit,
    score_maps,
)
from fedxvit.model import build_model
from fedxvit.training import evaluate
from result_stat.gradcam import (
    CONTROL_HIT,
    CONTROL_MISS,
    TOY_PATCH,
    TOY_SIZE,
    baseline_maps,
    choose_cam,
    explain_sites,
    overlay_image,
    toy_batches,
    toy_controls,
    toy_images,
    train_toy,
)

SIZE, PATCH = TOY_SIZE, TOY_PATCH
CPU = torch.device("cpu")
batches = toy_batches


@pytest.fixture(scope="module")
def patch_model():
    return train_toy()


@pytest.fixture(scope="module")
def shortcut_model():
    return train_toy(shortcut=True)


def tumor_cases(shortcut=False, n=32):
    images, labels, masks = toy_images(n, seed=1, shortcut=shortcut)
    keep = (labels == 1).numpy()
    return images, labels, images[labels == 1], list(masks[keep])


# ---- scores on hand-made maps (known answers)
def test_pointing_hit_and_energy_on_known_maps():
    mask = np.zeros((10, 10), bool)
    mask[2:4, 2:4] = True
    inside, outside, near = (np.zeros((10, 10)) for _ in range(3))
    inside[3, 3], outside[8, 8], near[5, 3] = 1.0, 1.0, 1.0
    assert pointing_hit(inside, mask) and not pointing_hit(outside, mask)
    assert not pointing_hit(near, mask, dilation_px=1) and pointing_hit(near, mask, dilation_px=2)
    assert not pointing_hit(np.zeros((10, 10)), mask), "a map with no positive evidence never hits"
    half = np.zeros((10, 10))
    half[2, 2], half[9, 9] = 1.0, 1.0
    assert energy_in_mask(half, mask) == pytest.approx(0.5)
    assert energy_in_mask(-inside, mask) == 0.0
    assert score_maps([inside, outside], [mask, mask], 0) == {"pointing_game": 0.5, "energy_in_mask": 0.5, "n": 2}


def test_peak_of_a_flat_maximum_is_its_middle():
    heat = np.zeros((12, 12))
    heat[0:6, 0:6] = 1.0  # bilinear upsampling clamps borders: flat corner blocks
    assert peak_location(heat) in {(2, 2), (2, 3), (3, 2), (3, 3)}


def test_baseline_maps_score_like_chance():
    rng = np.random.default_rng(0)
    mask = np.zeros((32, 32), bool)
    mask[12:20, 12:20] = True  # centred: the centred map hits, a corner mask it misses
    maps = baseline_maps(mask.shape, rng)
    assert pointing_hit(maps["centered"], mask)
    assert not pointing_hit(maps["centered"], np.roll(mask, 12, axis=(0, 1)))
    assert energy_in_mask(maps["random"], mask) == pytest.approx(mask.mean(), abs=0.03)
    assert "intensity" not in maps
    image = np.random.default_rng(1).random((32, 32)) * 0.5
    image[15, 16] = 1.0  # the brightest pixel, inside the mask: the intensity map points at it
    maps = baseline_maps(mask.shape, rng, image=image)
    assert pointing_hit(maps["intensity"], mask) and not pointing_hit(maps["intensity"], np.roll(mask, 12, axis=(0, 1)))


def test_mask_cells_ceiling_is_the_mask_seen_through_16px_cells():
    rng = np.random.default_rng(0)
    lesion = np.zeros((64, 64), bool)
    lesion[36:44, 20:28] = True  # inside cell (2, 1), around its centre: the coarse map still finds it
    coarse = baseline_maps(lesion.shape, rng, mask=lesion)["mask_cells"]
    assert 0.2 < coarse.max() <= 64 / 256 and pointing_hit(coarse, lesion)  # a cell 1/4 lesion
    assert "mask_cells" not in baseline_maps(lesion.shape, rng)
    grazing = np.zeros((64, 64), bool)
    grazing[13:16, 13:16] = True  # the far corner of cell (0, 0): even the ideal stride-16 map misses it
    assert not pointing_hit(baseline_maps(grazing.shape, rng, mask=grazing)["mask_cells"], grazing)


# ---- Grad-CAM maps
def test_gradcam_maps_shape_range_and_determinism(patch_model):
    _, _, images, _ = tumor_cases()
    first = gradcam_maps(patch_model, images[:4])
    second = gradcam_maps(patch_model, images[:4])
    assert first.shape == (4, SIZE, SIZE)
    assert first.min() >= 0 and first.max() <= 1
    for heat in first:
        assert heat.max() in (0.0, pytest.approx(1.0))
    np.testing.assert_array_equal(first, second)


def receptive_field_centre(model, layer, size, cell):
    """Centre of the input pixels that reach one cell of `layer` (nonzero gradient): with no global
    pooling in the way, that support is exactly the cell's receptive field, whatever the weights."""
    images = torch.rand(1, 1, size, size, dtype=torch.float64, requires_grad=True)
    captured = {}
    hook = layer.register_forward_hook(lambda m, i, o: captured.setdefault("map", o))
    model(images)
    hook.remove()
    (grad,) = torch.autograd.grad(captured["map"][0, :, cell, cell].sum(), images)
    rows = np.nonzero(grad[0, 0].abs().sum(1).numpy() > 0)[0]
    cols = np.nonzero(grad[0, 0].abs().sum(0).numpy() > 0)[0]
    assert rows[0] > 0 and rows[-1] < size - 1, "the receptive field must not touch the border"
    return (rows[0] + rows[-1]) / 2, (cols[0] + cols[-1]) / 2


def test_gradcam_alignment_is_the_receptive_field_centre():
    """The upsampled cell must sit on its receptive field (measured, not computed): half a cell
    lower-right for the TensorFlow-'SAME' EfficientNet, half a cell upper-left for a conv stack
    padded symmetrically as PyTorch does."""
    model = build_model("tiny", num_classes=2).double().eval()
    size, cell = 256, 8
    upsampled_centre = 16 * cell + 7.5  # where LayerAttribution.interpolate puts the cell
    offset = cell_centre_offset(model, model.cam_layer, size)
    assert offset == pytest.approx(7.5)
    probe = copy.deepcopy(model)  # squeeze-excite pools globally (reaches every pixel): out for the measurement
    for name, _ in list(probe.named_modules()):
        if name.endswith(".se"):
            setattr(probe.get_submodule(name.rsplit(".", 1)[0]), "se", torch.nn.Identity())
    centre = receptive_field_centre(probe, probe.cam_layer, size, cell)
    assert centre == (pytest.approx(upsampled_centre + offset), pytest.approx(upsampled_centre + offset))

    plain = torch.nn.Sequential(*(torch.nn.Conv2d(1, 1, 3, stride=2, padding=1) for _ in range(4))).double()
    offset = cell_centre_offset(plain, plain[-1], size)
    assert offset == pytest.approx(-7.5)
    centre = receptive_field_centre(plain, plain[-1], size, cell)
    assert centre == (pytest.approx(upsampled_centre + offset), pytest.approx(upsampled_centre + offset))


# ---- controls: a model whose evidence is the patch, and one whose evidence is elsewhere
def test_positive_control_heatmap_points_at_the_patch(patch_model):
    images, labels, tumors, masks = tumor_cases()
    assert evaluate(patch_model, batches(images, labels), CPU)["accuracy"] == 1.0
    scores = score_maps(occlusion_maps(patch_model, tumors, window=PATCH, stride=4), masks, dilation_px=2)
    chance = np.mean([m.mean() for m in masks])
    assert scores["pointing_game"] >= 0.9
    assert scores["energy_in_mask"] > 3 * chance
    ig = score_maps(integrated_gradients_maps(patch_model, tumors), masks, dilation_px=2)
    brightness = score_maps([image[0].numpy() for image in tumors], masks, dilation_px=2)
    assert ig["pointing_game"] >= 0.9
    assert ig["energy_in_mask"] > 2 * brightness["energy_in_mask"], "more than the patch's brightness alone"


def test_negative_control_shortcut_model_misses_the_patch(shortcut_model):
    images, labels, tumors, masks = tumor_cases(shortcut=True)
    assert evaluate(shortcut_model, batches(images, labels), CPU)["accuracy"] == 1.0
    maps = occlusion_maps(shortcut_model, tumors, window=PATCH, stride=4)
    scores = score_maps(maps, masks, dilation_px=2)
    assert scores["pointing_game"] <= 0.2
    corner = np.zeros((SIZE, SIZE), bool)
    corner[-8:, -8:] = True  # where its evidence really is
    assert score_maps(maps, [corner] * len(masks), 2)["pointing_game"] >= 0.9
    ig = integrated_gradients_maps(shortcut_model, tumors)
    assert score_maps(ig, masks, 2)["pointing_game"] <= 0.2
    assert score_maps(ig, [corner] * len(masks), 2)["pointing_game"] >= 0.9


def test_shipped_panel_follows_the_evidence_and_the_stage_gradcam_does_not_reach_it(patch_model, shortcut_model):
    """The report's Grad-CAM panel passes the toy controls (hits the patch its model uses, misses the one its
    model ignores); every class-discriminative map misses the ignored patch. The design card's stride-16
    Grad-CAM and the token maps do not find the used patch on the toy (docs/notes): they are not held to it."""
    discriminative = ["gradcam", "gradcam_stride16", "layercam_tokens", "transformer_attribution"]
    controls = toy_controls(discriminative, models=(patch_model, shortcut_model))
    assert controls["gradcam"]["passes"] and controls["gradcam"]["patch"] >= CONTROL_HIT
    for method in discriminative:
        assert controls[method]["shortcut_patch"] <= CONTROL_MISS, method
    assert controls["gradcam"]["shortcut_corner"] >= 0.8, "the shortcut model's panel points at its corner marker"


def test_token_grid_keeps_the_logits_and_shows_the_tokens_as_a_grid():
    model = build_model("tiny", num_classes=2).eval()
    images = torch.rand(3, 1, SIZE, SIZE)
    seen = {}
    tapped = TokenGrid(model, 0).eval()
    tapped.grid.register_forward_hook(lambda m, i, o: seen.update(shape=tuple(o.shape)))
    with torch.no_grad():
        torch.testing.assert_close(tapped(images), model(images))
    assert seen["shape"] == (3, model.preset.embed_dim, SIZE // 16, SIZE // 16)
    with pytest.raises(FedXViTError, match="token block 5"):
        TokenGrid(model, 5)


def test_attention_rollout_is_class_blind_and_attention_relevance_is_not(patch_model):
    _, _, tumors, _ = tumor_cases()
    fused = [block.attn.fused_attn for block in patch_model.blocks]
    rollout = [METHODS["attention_rollout"](patch_model, tumors[:4], target=t) for t in (0, 1)]
    np.testing.assert_array_equal(*rollout)
    relevance = [METHODS["transformer_attribution"](patch_model, tumors[:4], target=t) for t in (0, 1)]
    assert not np.allclose(*relevance)
    assert [block.attn.fused_attn for block in patch_model.blocks] == fused, "timm's fast attention is restored"
    for maps in (*rollout, *relevance):
        assert maps.shape == (4, SIZE, SIZE) and maps.min() >= 0 and maps.max() <= 1


def test_cam_weightings_are_their_definitions():
    """On a stride-1 layer (upsampling is the identity): Grad-CAM = ReLU(sum_c mean(grad_c) act_c),
    HiResCAM = ReLU(sum_c grad_c act_c), LayerCAM = sum_c ReLU(grad_c) act_c, each divided by its maximum."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(1, 4, 3, padding=1)
    model = torch.nn.Sequential(conv, torch.nn.Flatten(), torch.nn.Linear(4 * 8 * 8, 2)).double().eval()
    images = torch.rand(2, 1, 8, 8, dtype=torch.float64)
    activations = conv(images)
    (gradients,) = torch.autograd.grad(model[2](model[1](activations))[:, 1].sum(), activations)
    expected = {
        "gradcam": (gradients.mean((2, 3), keepdim=True) * activations).sum(1),
        "hirescam": (gradients * activations).sum(1),
        "layercam": (gradients.clamp_min(0) * activations).sum(1),
    }
    for weighting, raw in expected.items():
        raw = raw.detach().clamp_min(0).numpy()
        want = raw / raw.reshape(2, -1).max(1)[:, None, None]
        got = gradcam_maps(model, images, target=1, layer=conv, align=False, weighting=weighting)
        np.testing.assert_allclose(got, want, atol=1e-10, err_msg=weighting)
    with pytest.raises(FedXViTError, match="unknown CAM weighting 'mean'"):
        gradcam_maps(model, images, target=1, layer=conv, weighting="mean")


def test_cnn_stage_is_found_by_its_stride():
    model = build_model("tiny", num_classes=2).eval()
    assert cnn_stage(model, 16) is model.cam_layer
    size = model.preset.image_size
    for stride in (2, 4, 8):
        seen = {}
        hook = cnn_stage(model, stride).register_forward_hook(lambda m, i, o: seen.update(side=o.shape[-1]))
        with torch.no_grad():
            model(torch.zeros(1, 1, size, size))
        hook.remove()
        assert seen["side"] == size // stride
    with pytest.raises(FedXViTError, match="no stride-32 stage"):
        cnn_stage(model, 32)


# ---- the per-site driver on a site folder with masks
def toy_site(tmp_path):
    """A site folder of 12 toy images (masks for the tumors), the same in every split."""
    site = tmp_path / "site1"
    (site / "images").mkdir(parents=True)
    (site / "masks").mkdir()
    images, labels, masks = toy_images(12, seed=2)
    entries = []
    for i, (image, label, mask) in enumerate(zip(images, labels, masks)):
        Image.fromarray((image[0].numpy() * 255).astype(np.uint8)).save(site / "images" / f"{i}.png")
        entry = {"image": f"images/{i}.png", "label": int(label)}
        if label == 1:
            Image.fromarray(mask.astype(np.uint8) * 255).save(site / "masks" / f"{i}.png")
            entry["mask"] = f"masks/{i}.png"
        entries.append(entry)
    write_site(site, {"training": entries, "validation": entries, "testing": entries}, ["Healthy", "Tumor"], {})
    return site


def test_a_case_overlay_shows_the_mask_edge_the_peak_and_the_title():
    image = np.full((16, 16), 0.5)
    heatmap = np.zeros((16, 16))
    heatmap[3, 4] = 1.0
    mask = np.zeros((16, 16), dtype=bool)
    mask[8:12, 8:12] = True
    overlay = np.asarray(overlay_image(image, heatmap, mask, "site1-00001  p=0.90  miss", scale=2))
    assert overlay.shape == (32 + 14, 32, 3)  # the title bar above the image, twice its size
    picture = overlay[14:]
    assert (picture[16, 16] == 255).all() and (picture[20, 20] < 255).any()  # the mask's edge, not its inside
    assert tuple(picture[7, 9]) == (255, 0, 255)  # the x on the heatmap's peak (row 3, col 4)
    assert (overlay[:14] < 128).all(axis=2).any() and (picture[30, 2] < 255).all()  # title text; gray under jet


def test_explain_sites_writes_scores_and_panels(tmp_path, patch_model):
    site = toy_site(tmp_path)
    out = tmp_path / "out"
    result = explain_sites(patch_model, {"site1": site}, out, n=4, seed=0, progress=False, image_size=SIZE)
    assert result["per_site"]["site1"]["gradcam"]["n"] == 4
    images = result["per_site"]["site1"]["images"]
    assert result["pointing_game"] == pytest.approx(np.mean([image["hit"] for image in images]))
    assert result["energy_in_mask"] == pytest.approx(np.mean([image["energy_in_mask"] for image in images]))
    assert set(result["baselines"]) == {"random", "centered", "intensity", "mask_cells"}
    assert json.loads((out / "gradcam.json").read_text())["n"] == 4
    assert (out / "gradcam_site1.png").is_file() and len(list((out / "gradcam" / "site1").glob("*.png"))) == 4
    again = explain_sites(patch_model, {"site1": site}, None, n=4, seed=0, progress=False, image_size=SIZE)
    assert again["per_site"]["site1"]["images"] == result["per_site"]["site1"]["images"]


def test_choose_cam_picks_the_best_validation_score_among_candidates_that_pass_the_controls(tmp_path, patch_model):
    site = toy_site(tmp_path)
    controls = {
        method: {"patch": 0.0, "shortcut_patch": 0.0, "shortcut_corner": 0.0, "passes": False}
        for method in CAM_CANDIDATES
    }
    for method in ("gradcam_stride16", "layercam_stride2"):
        controls[method]["passes"] = True
    with pytest.raises(FedXViTError, match="no Grad-CAM candidate passes"):
        choose_cam(
            patch_model, {"site1": site}, None, n=4, controls={m: {**c, "passes": False} for m, c in controls.items()}
        )
    out = tmp_path / "out"
    result = choose_cam(patch_model, {"site1": site}, out, n=4, controls=controls)
    rows = {row["method"]: row for row in result["candidates"]}
    assert set(rows) == set(CAM_CANDIDATES) and result["shipped"] == CHOSEN_CAM
    eligible = [rows[m] for m in ("gradcam_stride16", "layercam_stride2")]
    best = max(eligible, key=lambda r: (r["validation_pointing_game"], r["validation_energy_in_mask"]))
    assert result["chosen"] == best["method"]
    direct = explain_sites(
        patch_model, {"site1": site}, None, n=4, progress=False, method=best["method"], split="validation"
    )
    assert best["validation_pointing_game"] == direct["pointing_game"] and best["validation_n"] == 4
    assert json.loads((out / "gradcam_choice.json").read_text())["chosen"] == result["chosen"]
    assert f"**{result['chosen']}**" in (out / "gradcam_choice.md").read_text()
