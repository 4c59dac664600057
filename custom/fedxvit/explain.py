"""What a model looks at, scored against the tumor masks: the explanation maps (Captum) and their scores.

The site computes them on its own masked test tumors in the evaluation job (only the hit counts and energy sums
leave, fedxvit.evaluation); `result_stat.gradcam` draws, scores and chooses among them on the desk. Grad-CAM-style
maps (three weightings on the CNN stages and the ViT tokens), attention maps, occlusion and Integrated Gradients;
the pointing game (the map's maximum inside the dilated mask) and the energy in the mask. Captum and SciPy come
with the wheel's `explain` extra.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from fedxvit.classes import TASK_CLASSES
from fedxvit.data import deterministic_transforms
from fedxvit.datalist import load_split
from fedxvit.errors import FedXViTError

TUMOR = TASK_CLASSES.index("Tumor")
DEFAULT_DILATION = 0.03  # of the image side: 4 px at 128 px, about a quarter of a CAM cell


def unit_peak(maps: np.ndarray) -> np.ndarray:
    """Each (H, W) map divided by its maximum, so maps compare across images; all-zero maps stay zero."""
    peaks = maps.reshape(len(maps), -1).max(1)
    return maps / np.where(peaks > 0, peaks, 1.0)[:, None, None]


def cell_centre_offset(model: torch.nn.Module, layer: torch.nn.Module, image_size: int) -> float:
    """Pixels by which `layer`'s cells are centred lower-right of where bilinear upsampling puts them.

    Upsampling (LayerAttribution.interpolate) puts cell i of a stride-S map at S*i + (S-1)/2. The
    `tf_` EfficientNets pad like TensorFlow's 'SAME' (the extra pixel of a stride-2 conv at the
    bottom/right), so at stride 16 a cell's receptive field is centred 7.5 px lower-right: a map
    drawn without this correction points half a cell up-left of the evidence. Computed from the
    convolutions and poolings run before `layer` (kernel, stride, dilation, padding actually
    applied); 0 when their strides do not compose to the map's stride (branching geometry).
    """
    from timm.layers import Conv2dSame, get_same_padding

    windows, done = [], []  # (module, input side) of every sliding window run before `layer` ends

    def record(module, inputs, output):
        if not done and isinstance(module, (torch.nn.Conv2d, torch.nn.MaxPool2d, torch.nn.AvgPool2d)):
            windows.append((module, inputs[0].shape[-2]))

    def finish(module, inputs, output):
        done.append(output.shape[-2])

    hooks = [m.register_forward_hook(record) for m in model.modules()]
    hooks.append(layer.register_forward_hook(finish))  # after `record`, so a conv layer counts itself
    param = next(model.parameters())
    channels = model.preset.in_chans if hasattr(model, "preset") else 1
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, channels, image_size, image_size, device=param.device, dtype=param.dtype))
    finally:
        for hook in hooks:
            hook.remove()

    def first(v):  # square images: rows suffice
        return v[0] if isinstance(v, (tuple, list)) else v

    scale, centre = 1, 0.0  # input row = scale * row of the current map + centre
    for module, size in windows:
        kernel, stride, dilation = (
            first(module.kernel_size),
            first(module.stride),
            first(getattr(module, "dilation", 1)),
        )
        padding = module.padding
        if isinstance(module, Conv2dSame):  # padded at run time, the odd pixel after
            before = int(get_same_padding(size, kernel, stride, dilation)) // 2
        elif padding == "same":
            before = dilation * (kernel - 1) // 2
        else:
            before = 0 if padding == "valid" else first(padding)
        centre += scale * ((kernel - 1) * dilation / 2 - before)
        scale *= stride
    if not done or scale * done[0] != image_size:
        return 0.0
    return centre - (scale - 1) / 2


def _cells_to_image(
    cells: torch.Tensor, model: torch.nn.Module, layer: torch.nn.Module, size: int, align: bool
) -> np.ndarray:
    """(N, 1, rows, cols) cell evidence -> (N, size, size) maps in [0, 1]: bilinear upsampling (Captum's
    LayerAttribution.interpolate), moved onto the cells' receptive-field centres (cell_centre_offset of
    `layer`, whose output the cells are), negative part cut, each map divided by its maximum."""
    from captum.attr import LayerAttribution
    from scipy.ndimage import shift

    upsampled = LayerAttribution.interpolate(cells, (size, size), interpolate_mode="bilinear")
    maps = upsampled.detach().clamp_min(0)[:, 0].cpu().numpy().astype(np.float64)
    offset = cell_centre_offset(model, layer, size) if align else 0.0
    if offset:
        maps = np.stack([shift(m, (offset, offset), order=1, mode="nearest") for m in maps])
    return unit_peak(maps)


CAM_WEIGHTINGS = ("gradcam", "hirescam", "layercam")


def gradcam_maps(
    model: torch.nn.Module,
    images: torch.Tensor,
    target: int = TUMOR,
    layer: torch.nn.Module | None = None,
    align: bool = True,
    weighting: str = "gradcam",
) -> np.ndarray:
    """(N, H, W) class activation maps in [0, 1] for `target` on a feature-map layer (default the CNN's last
    stage, `cam_layer`), upsampled to the images' size. Three ways to weigh the activations by the gradients:

    - gradcam: one weight per channel, the gradient averaged over the map (Captum LayerGradCam; Selvaraju 2017);
    - hirescam: gradient x activation per cell, summed over channels (Captum LayerGradientXActivation; Draelos
      & Carin 2020): no averaging that can put one cell's evidence on another;
    - layercam: positive gradient x activation per cell (Jiang et al. 2021), built for the shallow stages where
      the cells are small.

    Negative evidence is cut; each map is divided by its maximum, so a map with no positive evidence stays all
    zero. `align` moves the upsampled map onto the cells' receptive-field centres (see cell_centre_offset).
    """
    from captum.attr import LayerActivation, LayerGradCam, LayerGradientXActivation

    model.eval()
    layer = layer if layer is not None else model.cam_layer
    if weighting == "gradcam":
        cells = LayerGradCam(model, layer).attribute(images, target=target, relu_attributions=True)
    elif weighting == "hirescam":
        cells = LayerGradientXActivation(model, layer).attribute(images, target=target).sum(1, keepdim=True)
    elif weighting == "layercam":
        gradients = LayerGradientXActivation(model, layer, multiply_by_inputs=False).attribute(images, target=target)
        with torch.no_grad():
            activations = LayerActivation(model, layer).attribute(images)
        cells = (gradients.clamp_min(0) * activations).sum(1, keepdim=True)
    else:
        raise FedXViTError(f"unknown CAM weighting {weighting!r}; choose one of {', '.join(CAM_WEIGHTINGS)}")
    return _cells_to_image(cells.detach(), model, layer, images.shape[-1], align)


def cnn_stage(model: torch.nn.Module, stride: int) -> torch.nn.Module:
    """The CNN's last stage (backbone block) whose output has `stride`, found by running the model once."""
    sizes = {}

    def record(k):
        def hook(module, inputs, output):
            sizes[k] = output.shape[-1]

        return hook

    hooks = [block.register_forward_hook(record(k)) for k, block in enumerate(model.backbone.blocks)]
    side = model.preset.image_size
    param = next(model.parameters())
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, model.preset.in_chans, side, side, device=param.device, dtype=param.dtype))
    finally:
        for hook in hooks:
            hook.remove()
    stages = [k for k, s in sizes.items() if s * stride == side]
    if not stages:
        raise FedXViTError(f"preset {model.preset.name!r}: the backbone has no stride-{stride} stage")
    return model.backbone.blocks[stages[-1]]


class TokenGrid(torch.nn.Module):
    """The model, with the patch tokens entering `model.blocks[index]` passed through `grid`, an identity on
    their (N, D, rows, cols) view: Captum's layer methods (LayerGradCam) then read the tokens as a feature map.
    Same logits as the model."""

    def __init__(self, model: torch.nn.Module, index: int):
        super().__init__()
        if not 0 <= index < len(model.blocks):
            raise FedXViTError(f"token block {index}: the model has ViT blocks 0..{len(model.blocks) - 1}")
        self.model, self.index, self.grid = model, index, torch.nn.Identity()
        self.preset = model.preset

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens, (rows, cols) = self.model.embed(images)
        for k, block in enumerate(self.model.blocks):
            if k == self.index:
                n, _, dim = tokens.shape
                patches = self.grid(tokens[:, 1:].transpose(1, 2).reshape(n, dim, rows, cols))
                tokens = torch.cat([tokens[:, :1], patches.flatten(2).transpose(1, 2)], dim=1)
            tokens = block(tokens)
        return self.model.classify(tokens)


def token_cam_maps(
    model: torch.nn.Module, images: torch.Tensor, target: int = TUMOR, block: int = -1, weighting: str = "gradcam"
) -> np.ndarray:
    """Class activation maps of the patch tokens entering a ViT block (default the last: the tokens the [CLS]
    token reads through its last attention), reshaped to the token grid. Past the last block the patch tokens
    no longer reach the head, so that is not a choice."""
    tapped = TokenGrid(model, block % len(model.blocks)).eval()
    return gradcam_maps(tapped, images, target, layer=tapped.grid, weighting=weighting)


def _attention_relevance(model: torch.nn.Module, images: torch.Tensor, target: int | None) -> torch.Tensor:
    """(N, 1, rows, cols) relevance of each patch token for the [CLS] token, from every block's attention.

    target None: attention rollout (Abnar & Zuidema 2020): head-averaged attention plus the residual
    identity, rows renormalized, multiplied through the blocks; class-blind. A target: gradient-weighted
    attention relevance (Chefer et al. 2021, "Generic attention-model explainability"): R += mean over heads
    of (dA/dlogit * A)+ @ R, starting from the identity; class-discriminative. timm computes attention with
    a fused kernel; its plain path (fused_attn off, restored after) exposes the probabilities at attn_drop.
    """
    model.eval()
    attentions, hooks, fused = [], [], []
    for block in model.blocks:
        fused.append(block.attn.fused_attn)
        block.attn.fused_attn = False
        hooks.append(block.attn.attn_drop.register_forward_hook(lambda m, i, o: attentions.append(o)))
    try:
        with torch.set_grad_enabled(target is not None):
            logits = model(images)
    finally:
        for block, was in zip(model.blocks, fused):
            block.attn.fused_attn = was
        for hook in hooks:
            hook.remove()
    n, _, tokens, _ = attentions[0].shape
    identity = torch.eye(tokens, device=images.device, dtype=attentions[0].dtype).expand(n, tokens, tokens)
    relevance = identity
    if target is None:
        for attention in attentions:
            mixed = 0.5 * attention.mean(1) + 0.5 * identity
            relevance = (mixed / mixed.sum(-1, keepdim=True)) @ relevance
    else:
        gradients = torch.autograd.grad(logits[:, target].sum(), attentions)
        for attention, gradient in zip(attentions, gradients):
            relevance = relevance + (gradient * attention).clamp_min(0).mean(1) @ relevance
    side = int(round((tokens - 1) ** 0.5))
    return relevance[:, 0, 1:].reshape(n, 1, side, side).detach()


def attention_rollout_maps(model: torch.nn.Module, images: torch.Tensor, target: int = TUMOR) -> np.ndarray:
    """Attention rollout on the token grid (class-blind: the same map whatever `target`)."""
    return _cells_to_image(_attention_relevance(model, images, None), model, model.proj, images.shape[-1], True)


def transformer_attribution_maps(model: torch.nn.Module, images: torch.Tensor, target: int = TUMOR) -> np.ndarray:
    """Gradient-weighted attention relevance of the token grid for `target` (see _attention_relevance)."""
    return _cells_to_image(_attention_relevance(model, images, target), model, model.proj, images.shape[-1], True)


def occlusion_maps(
    model: torch.nn.Module,
    images: torch.Tensor,
    target: int = TUMOR,
    window: int | None = None,
    stride: int | None = None,
) -> np.ndarray:
    """(N, H, W) occlusion maps in [0, 1]: how much the target logit drops when a window is filled
    with the image's mean intensity.

    The perturbation check beside Grad-CAM: it needs no gradients, so it is immune to the
    scale invariance of the ViT's LayerNorms that can blind gradient maps taken before them.
    Default window: one CAM cell (16 px), stride half of it.
    """
    from captum.attr import Occlusion

    model.eval()
    window = window or min(16, images.shape[-1] // 2)
    stride = stride or max(1, window // 2)
    fill = images.mean(dim=(1, 2, 3), keepdim=True).expand_as(images).contiguous()  # each image's mean grey
    with torch.no_grad():
        attributions = Occlusion(model).attribute(
            images,
            sliding_window_shapes=(images.shape[1], window, window),
            strides=(images.shape[1], stride, stride),
            target=target,
            baselines=fill,
            perturbations_per_eval=32,
        )
    maps = attributions.sum(1).clamp_min(0).cpu().numpy().astype(np.float64)
    return unit_peak(maps)


def integrated_gradients_maps(
    model: torch.nn.Module, images: torch.Tensor, target: int = TUMOR, steps: int = 32
) -> np.ndarray:
    """(N, H, W) Integrated Gradients maps in [0, 1]: per-pixel evidence for `target` along the
    straight path from a black image (the scans' background) to the scan; positive part.

    The pixel-level check beside Grad-CAM: it needs no feature map, so it is not blurred by the
    receptive field of a stride-16 cell (which at this depth spans most of the slice).
    """
    from captum.attr import IntegratedGradients

    model.eval()
    attributions = IntegratedGradients(model).attribute(
        images, target=target, n_steps=steps, internal_batch_size=max(steps, len(images))
    )
    maps = attributions.detach().sum(1).clamp_min(0).cpu().numpy().astype(np.float64)
    return unit_peak(maps)


def _cam_method(weighting: str, stride: int | None):
    """A METHODS entry: `weighting` on the CNN stage of `stride`, or (None) on the tokens entering the last block."""

    def maps(model: torch.nn.Module, images: torch.Tensor, target: int = TUMOR) -> np.ndarray:
        if stride is None:
            return token_cam_maps(model, images, target, weighting=weighting)
        return gradcam_maps(model, images, target, layer=cnn_stage(model, stride), weighting=weighting)

    return maps


# The candidates for the report's Grad-CAM panel (`python -m result_stat.gradcam --choose`: toy controls, then
# the validation split's masks); the design card's Grad-CAM is gradcam_stride16.
CAM_CANDIDATES = {
    **{
        f"{weighting}_{'tokens' if stride is None else f'stride{stride}'}": _cam_method(weighting, stride)
        for weighting in CAM_WEIGHTINGS
        for stride in (2, 4, 8, 16, None)
    },
    "attention_rollout": attention_rollout_maps,
    "transformer_attribution": transformer_attribution_maps,
}
CHOSEN_CAM = "layercam_stride2"  # chosen on the default scenario: docs/notes/2026-12-03-a-gradcam-that-localizes.md
METHODS = {
    "gradcam": CAM_CANDIDATES[CHOSEN_CAM],
    **CAM_CANDIDATES,
    "occlusion": occlusion_maps,
    "integrated_gradients": integrated_gradients_maps,
}
WEIGHTING_TITLES = {
    "gradcam": "Grad-CAM (Captum LayerGradCam: one weight per channel, the mean gradient)",
    "hirescam": "HiResCAM (Captum LayerGradientXActivation, summed over channels)",
    "layercam": "LayerCAM (positive gradient x activation per cell, from Captum's layer gradients and activations)",
}


OTHER_TITLES = {
    "attention_rollout": "attention rollout (Abnar & Zuidema 2020) of the ViT blocks; class-blind",
    "transformer_attribution": "gradient-weighted attention relevance (Chefer et al. 2021) of the ViT blocks",
    "occlusion": "occlusion (Captum Occlusion, one-cell window filled with the image mean, half-cell stride)",
    "integrated_gradients": "Integrated Gradients (Captum, 32 steps from a black image, positive part)",
}


def method_title(method: str) -> str:
    """One line saying what a METHODS entry computes (report headings)."""
    if method == "gradcam":
        return f"{method_title(CHOSEN_CAM)}; chosen on the validation masks"
    if method in OTHER_TITLES:
        return OTHER_TITLES[method]
    weighting, where = method.split("_", 1)
    place = (
        "the patch tokens entering the last ViT block, on the token grid"
        if where == "tokens"
        else f"the CNN stage at stride {where.removeprefix('stride')}"
    )
    return f"{WEIGHTING_TITLES[weighting]} on {place}, aligned to the cells' receptive-field centres"


# What a report shows: the Grad-CAM panel, the design card's stage Grad-CAM, and the two checks beside them.
REPORT_METHODS = ("gradcam", "gradcam_stride16", "occlusion", "integrated_gradients")


def dilate(mask: np.ndarray, pixels: int) -> np.ndarray:
    from scipy.ndimage import binary_dilation

    mask = np.asarray(mask, dtype=bool)
    return binary_dilation(mask, iterations=int(pixels)) if pixels > 0 else mask


def peak_location(heatmap: np.ndarray) -> tuple[int, int]:
    """(row, col) of the maximum. Upsampling a coarse map leaves flat maxima (a whole corner block
    at the border); then the maximal pixel nearest to their centroid, not the first in memory order."""
    heatmap = np.asarray(heatmap)
    rows, cols = np.nonzero(heatmap >= heatmap.max() - 1e-9 * max(1.0, abs(float(heatmap.max()))))
    nearest = np.argmin((rows - rows.mean()) ** 2 + (cols - cols.mean()) ** 2)
    return int(rows[nearest]), int(cols[nearest])


def pointing_hit(heatmap: np.ndarray, mask: np.ndarray, dilation_px: int = 0) -> bool:
    """True when the heatmap's (first) maximum lies in the dilated mask; a map with no positive value misses."""
    heatmap = np.asarray(heatmap)
    if not np.isfinite(heatmap).all() or heatmap.max() <= 0:
        return False
    row, col = peak_location(heatmap)
    return bool(dilate(mask, dilation_px)[row, col])


def energy_in_mask(heatmap: np.ndarray, mask: np.ndarray) -> float:
    """Share of the positive heatmap inside the mask (0 for a map with no positive value)."""
    positive = np.clip(np.asarray(heatmap, dtype=np.float64), 0, None)
    total = positive.sum()
    return float(positive[np.asarray(mask, dtype=bool)].sum() / total) if total > 0 else 0.0


def score_maps(heatmaps, masks, dilation_px: int) -> dict:
    """Pointing-game hit rate and mean energy in mask over paired maps and masks."""
    hits = [pointing_hit(h, m, dilation_px) for h, m in zip(heatmaps, masks)]
    energy = [energy_in_mask(h, m) for h, m in zip(heatmaps, masks)]
    return {
        "pointing_game": float(np.mean(hits)) if hits else None,
        "energy_in_mask": float(np.mean(energy)) if energy else None,
        "n": len(hits),
    }


def dilation_pixels(image_size: int, fraction: float = DEFAULT_DILATION) -> int:
    return max(1, round(image_size * fraction)) if fraction > 0 else 0


def load_tumor_cases(
    site_dir: os.PathLike, image_size: int, n: int = 25, seed: int = 0, split: str = "testing"
) -> list[dict]:
    """Up to n tumor images with masks of a site's split (seeded choice, in file order):
    [{"name", "image": (1, S, S) tensor as the model sees it, "mask": (S, S) bool}]."""
    site_dir = Path(site_dir).resolve()  # the datalist's paths come back joined to it: absolute, not cwd-relative
    entries = [e for e in load_split(site_dir, split) if int(e["label"]) == TUMOR and e.get("mask")]
    if not entries:
        raise FedXViTError(
            f"{site_dir}: no tumor images with a mask in the {split} split, nothing to score Grad-CAM on"
        )
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(len(entries), size=min(n, len(entries)), replace=False).tolist())
    from monai.transforms import Compose

    load = Compose(deterministic_transforms(image_size))
    cases = []
    for i in chosen:
        entry = entries[i]
        mask_path = Path(entry["mask"]) if Path(entry["mask"]).is_absolute() else site_dir / entry["mask"]
        if not mask_path.is_file():
            raise FedXViTError(f"{site_dir}: mask {entry['mask']} of {entry['image']} is missing")
        image = load({"image": entry["image"]})["image"]
        mask = load({"image": str(mask_path)})["image"][0].numpy() >= 0.5  # area-resized binary mask: majority
        cases.append({"name": Path(entry["image"]).stem, "image": torch.as_tensor(image), "mask": mask})
    return cases


def explanation_scores(
    model: torch.nn.Module, site_dir: os.PathLike, n: int = 25, seed: int = 0, dilation: float = DEFAULT_DILATION
) -> dict:
    """method -> {"hits", "n", "energy_sum"} over up to n masked tumor test images of a site (the same seeded
    choice and maps as result_stat.gradcam): sums a server can add up, nothing per image. {} without masks."""
    device = next(model.parameters()).device
    size = model.preset.image_size
    try:
        cases = load_tumor_cases(site_dir, size, n, seed)
    except FedXViTError:  # no masked tumor test image at this site
        return {}
    dilation_px = dilation_pixels(size, dilation)
    model.eval()
    scores = {}
    for method in REPORT_METHODS:
        maps_of = METHODS[method]
        hits, energy = 0, 0.0
        for case in cases:
            heatmap = maps_of(model, case["image"][None].to(device))[0]
            hits += pointing_hit(heatmap, case["mask"], dilation_px)
            energy += energy_in_mask(heatmap, case["mask"])
        scores[method] = {"hits": int(hits), "n": len(cases), "energy_sum": float(energy)}
    return scores
