"""The hybrid CNN-ViT classifier and its named presets (the one preset registry).

An EfficientNetV2 trunk turns the MRI slice into a 1/16-resolution feature map (local
texture the CNN is good at); a 1x1 conv projects it to the ViT width, each cell becomes a
token, and ViT blocks relate distant regions before a linear head reads the class token.
Grayscale in by default; pretrained backbone weights only when asked for, because timm's
`pretrained=True` downloads and hospital machines are usually offline.

timm is imported where a model is built, not with this module: the server reads presets and moves
state dicts but never builds a model, and each of its processes would otherwise spend about 1.5 s
of CPU importing timm (and torchvision, and torch._dynamo through it).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch
from torch import nn

from fedxvit.errors import FedXViTError

PATCH_STRIDE = 16  # the backbone stage we tap, so one token covers 16x16 pixels like ViT-B/16


@dataclass(frozen=True)
class Preset:
    """Everything that fixes the architecture; checkpoints record the name, not the fields."""

    name: str
    backbone: str
    image_size: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    channel_multiplier: float = 1.0  # <1 shrinks the EfficientNet widths (no pretrained weights then)
    depth_multiplier: float = 1.0
    in_chans: int = 1
    drop_path_rate: float = 0.0
    description: str = ""

    @property
    def grid_size(self) -> int:
        return self.image_size // PATCH_STRIDE

    @property
    def shrunk(self) -> bool:
        return self.channel_multiplier != 1.0 or self.depth_multiplier != 1.0


PRESETS: dict[str, Preset] = {
    preset.name: preset
    for preset in (
        Preset(
            name="tiny",
            backbone="tf_efficientnetv2_b0",
            image_size=32,
            embed_dim=32,
            depth=1,
            num_heads=2,
            channel_multiplier=0.25,
            depth_multiplier=0.25,
            description="unit tests: runs in milliseconds, learns only toy problems",
        ),
        Preset(
            name="cpu",
            backbone="tf_efficientnetv2_b0",
            image_size=128,
            embed_dim=128,
            depth=2,
            num_heads=4,
            mlp_ratio=2.0,
            channel_multiplier=0.5,
            depth_multiplier=0.5,
            drop_path_rate=0.05,
            description="demo default: expert + federated rounds in minutes on 2 CPU cores",
        ),
        Preset(
            name="anchor",
            backbone="tf_efficientnetv2_s",
            image_size=224,
            embed_dim=768,
            depth=12,
            num_heads=12,
            drop_path_rate=0.1,
            description="published Fed-X-ViT shape: EfficientNetV2-S + ViT-Base/16 at 224 px (GPU)",
        ),
    )
}
DEFAULT_PRESET = "cpu"


@dataclass(frozen=True)
class ExpertDefaults:
    """Phase 1, centralized: AdamW peak lr with linear warm-up and cosine decay, early stopping."""

    lr: float
    batch_size: int
    epochs: int
    warmup_epochs: float
    patience: int


@dataclass(frozen=True)
class SiteDefaults:
    """Phase 2, at each hospital per round: the executor's AdamW lr, batch size and local epochs."""

    learning_rate: float
    batch_size: int
    local_epochs: int


@dataclass(frozen=True)
class TrainingDefaults:
    """How a preset is trained; the one home of training defaults (expert CLI, executor, baselines)."""

    expert: ExpertDefaults
    site: SiteDefaults


TRAINING_DEFAULTS: dict[str, TrainingDefaults] = {
    # toy problems in milliseconds: tiny batches so a site of a dozen images still takes several steps
    "tiny": TrainingDefaults(
        ExpertDefaults(lr=2e-3, batch_size=4, epochs=2, warmup_epochs=0.0, patience=1),
        SiteDefaults(learning_rate=3e-4, batch_size=4, local_epochs=1),
    ),
    # measured on the embedded benchmark (docs/model.md): clipping keeps the ViT stable on CPU; 14 epochs of cosine
    # decay run to the end (patience = epochs), since a noisy validation curve stopped a 24-epoch schedule early
    "cpu": TrainingDefaults(
        ExpertDefaults(lr=2e-3, batch_size=16, epochs=14, warmup_epochs=1.0, patience=14),
        SiteDefaults(learning_rate=3e-4, batch_size=16, local_epochs=1),
    ),
    # ViT-Base-sized: the values that learned on one GPU (docs/measurements.md, "The anchor preset on a GPU");
    # the cpu training defaults' lr 2e-3 leaves this model at chance
    "anchor": TrainingDefaults(
        ExpertDefaults(lr=3e-4, batch_size=32, epochs=10, warmup_epochs=2.0, patience=4),
        SiteDefaults(learning_rate=3e-4, batch_size=16, local_epochs=1),
    ),
}


def get_preset(name: str) -> Preset:
    """The preset of that name, or a one-line error listing the known ones."""
    if isinstance(name, Preset):
        return name
    try:
        return PRESETS[name]
    except KeyError:
        raise FedXViTError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None


def training_defaults(preset: str | Preset = DEFAULT_PRESET) -> TrainingDefaults:
    """The training defaults of a preset (every preset has them)."""
    return TRAINING_DEFAULTS[get_preset(preset).name]


def _is_frozen_batchnorm(module: nn.Module) -> bool:
    params = list(module.parameters(recurse=False))
    return (
        isinstance(module, nn.modules.batchnorm._BatchNorm)
        and bool(params)
        and not any(p.requires_grad for p in params)
    )


def hold_frozen_batchnorm(model: nn.Module) -> None:
    """Put BatchNorm layers whose affine params are frozen in eval mode.

    A frozen layer must stay frozen: in train mode BN would keep updating its running
    mean/var (and the counter) from local batches, silently changing a "frozen" backbone.
    """
    for module in model.modules():
        if _is_frozen_batchnorm(module):
            module.eval()


def _stride16_stage(backbone: nn.Module) -> int:
    """Index into `backbone.feature_info` of the last stage at stride 16."""
    reductions = backbone.feature_info.reduction()
    return max(i for i, r in enumerate(reductions) if r == PATCH_STRIDE)


def _load_local_backbone_weights(backbone: nn.Module, weights_path: str, in_chans: int) -> None:
    """Load an EfficientNetV2 state_dict from disk (offline), adapting the stem to `in_chans`."""
    path = Path(weights_path)
    if not path.is_file():
        raise FedXViTError(f"pretrained weights file {weights_path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle/zip errors carry long messages; keep one line
        raise FedXViTError(
            f"cannot read pretrained weights {weights_path}: {type(exc).__name__}: {str(exc).splitlines()[0]}"
        ) from None
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    own = backbone.state_dict()
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if "conv_stem.weight" in state and state["conv_stem.weight"].shape[1] != in_chans:
        from timm.models import adapt_input_conv

        state["conv_stem.weight"] = adapt_input_conv(in_chans, state["conv_stem.weight"])
    missing = [k for k in own if k not in state]
    wrong = [k for k in own if k in state and state[k].shape != own[k].shape]
    if missing or wrong:
        detail = (
            f"{len(missing)} missing (first: {missing[0]})"
            if missing
            else f"{len(wrong)} of another shape (first: {wrong[0]})"
        )
        raise FedXViTError(
            f"pretrained weights {weights_path} do not fit backbone "
            f"{backbone.default_cfg.get('architecture', '?')}: {detail}"
        )
    backbone.load_state_dict({k: state[k] for k in own})


class HybridViT(nn.Module):
    """EfficientNetV2 stages to stride 16 -> 1x1 projection -> tokens + [CLS] -> ViT blocks -> head."""

    def __init__(self, preset: str | Preset = DEFAULT_PRESET, num_classes: int = 4, pretrained: str | None = None):
        import timm
        from timm.models.vision_transformer import Block

        super().__init__()
        self.preset = get_preset(preset)
        self.num_classes = int(num_classes)
        p = self.preset
        from_timm = pretrained == "timm"
        if from_timm and p.shrunk:
            raise FedXViTError(
                f"preset {p.name!r} shrinks {p.backbone}; timm has no pretrained weights for it "
                "(use --pretrained timm with preset 'anchor', or a weights file of this shape)"
            )
        extra = (
            {} if not p.shrunk else {"channel_multiplier": p.channel_multiplier, "depth_multiplier": p.depth_multiplier}
        )
        probe = timm.create_model(p.backbone, features_only=True, in_chans=p.in_chans, **extra)
        stage = _stride16_stage(probe)
        self.backbone = timm.create_model(
            p.backbone, features_only=True, out_indices=(stage,), in_chans=p.in_chans, pretrained=from_timm, **extra
        )
        del probe
        if pretrained and not from_timm:
            _load_local_backbone_weights(self.backbone, os.fspath(pretrained), p.in_chans)
        # timm's feature module still builds (and runs) the stride-32 stage; drop the blocks
        # after our tap so no dead weights get trained, sent to the server or averaged.
        last_block = int(self.backbone.feature_info.module_name()[-1].split(".")[1])
        self.backbone.blocks = self.backbone.blocks[: last_block + 1]
        feature_channels = self.backbone.feature_info.channels()[-1]

        self.proj = nn.Conv2d(feature_channels, p.embed_dim, kernel_size=1)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, p.embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + p.grid_size**2, p.embed_dim))
        drop_path = torch.linspace(0, p.drop_path_rate, p.depth).tolist()
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        self.blocks = nn.Sequential(
            *(
                Block(
                    p.embed_dim, p.num_heads, mlp_ratio=p.mlp_ratio, qkv_bias=True, drop_path=dp, norm_layer=norm_layer
                )
                for dp in drop_path
            )
        )
        self.norm = norm_layer(p.embed_dim)
        self.head = nn.Linear(p.embed_dim, self.num_classes)
        self._init_transformer()

    def _init_transformer(self) -> None:
        from timm.layers import trunc_normal_

        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        for module in [self.proj, *self.blocks.modules(), self.head]:
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def reset_head(self, num_classes: int | None = None) -> None:
        """Fresh classifier (transfer surgery): same init as a new model's head."""
        from timm.layers import trunc_normal_

        self.num_classes = int(num_classes or self.num_classes)
        self.head = nn.Linear(self.preset.embed_dim, self.num_classes).to(self.cls_token.device)
        trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    @property
    def cam_layer(self) -> nn.Module:
        """The CNN's last conv stage (stride 16): where the design card's Grad-CAM hooks activations and gradients."""
        return self.backbone.blocks[-1]

    @property
    def param_count(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def train(self, mode: bool = True):
        """Like nn.Module.train, but frozen BatchNorm layers stay in eval (see hold_frozen_batchnorm)."""
        super().train(mode)
        if mode:
            hold_frozen_batchnorm(self)
        return self

    def _pos_embed_for(self, grid: tuple[int, int]) -> torch.Tensor:
        """Position embeddings for this token grid; resampled when the input size differs from the preset's."""
        if grid == (self.preset.grid_size, self.preset.grid_size):
            return self.pos_embed
        from timm.layers import resample_abs_pos_embed

        return resample_abs_pos_embed(self.pos_embed, list(grid), num_prefix_tokens=1)

    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Tokens entering the first ViT block ([CLS] first, position embeddings added) and the token grid's
        (rows, cols): patch token r * cols + c is CNN cell (r, c)."""
        fmap = self.proj(self.backbone(images)[-1])
        tokens = fmap.flatten(2).transpose(1, 2)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        grid = tuple(fmap.shape[-2:])
        return torch.cat([cls, tokens], dim=1) + self._pos_embed_for(grid), grid

    def classify(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits from the last block's token sequence (the head reads the normalized [CLS] token)."""
        return self.head(self.norm(tokens)[:, 0])

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """Normalized token sequence; index 0 is the class token."""
        return self.norm(self.blocks(self.embed(images)[0]))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classify(self.blocks(self.embed(images)[0]))


def build_model(
    preset: str | Preset = DEFAULT_PRESET, num_classes: int = 4, pretrained: str | None = None
) -> HybridViT:
    """The model for a preset. `pretrained`: None, "timm" (downloads) or a local weights file."""
    return HybridViT(preset, num_classes=num_classes, pretrained=pretrained)


def preset_table() -> list[dict]:
    """Preset fields plus parameter counts (4-class head), for --help texts and benchmarks."""
    rows = []
    for name, preset in PRESETS.items():
        rows.append({**asdict(preset), "params": build_model(name, num_classes=4).param_count})
    return rows
