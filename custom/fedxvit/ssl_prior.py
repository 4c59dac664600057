"""FedMAS's auxiliary network as a site loads it: a small frozen CNN, the same file at every site.

The paper measures every site against MoCo-v2 weights pretrained on ImageNet; fedxvit downloads
nothing, so it pretrains its own encoder at the desk on the public 4-class archive
(`python -m tooling.pretrain_prior`, `make ssl-prior`). A site loads the file the job names, frozen; its
SHA-256 is what proves every site measures with the same one (fedxvit.imbalance).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from fedxvit.datalist import file_hash
from fedxvit.errors import FedXViTError

DEFAULT_OUT = Path("models") / "ssl_prior.pt"
PRIOR_SIZE = 64  # the encoder's input side: images are resized to it whatever the job's preset
WIDTHS = (32, 64, 128, 256)


class PriorEncoder(nn.Module):
    """Four strided conv blocks and global average pooling: (B, 1, S, S) -> (B, 256) features."""

    def __init__(self, widths=WIDTHS):
        super().__init__()
        layers, channels = [], 1
        for width in widths:
            layers += [nn.Conv2d(channels, width, 3, stride=2, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
            channels = width
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.dim = channels

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-1] != PRIOR_SIZE or images.shape[-2] != PRIOR_SIZE:
            images = F.interpolate(images, size=(PRIOR_SIZE, PRIOR_SIZE), mode="area")
        return self.body(images)


def freeze(encoder: PriorEncoder) -> PriorEncoder:
    """No gradients, eval mode (BatchNorm statistics fixed): the same function at every site."""
    for parameter in encoder.parameters():
        parameter.requires_grad = False
    return encoder.eval()


def load_prior(path: os.PathLike, device: str | torch.device = "cpu") -> tuple[PriorEncoder, str]:
    """(frozen encoder, SHA-256 of the file); one line when the file is missing or is not a prior."""
    path = Path(path)
    if not path.is_file():
        raise FedXViTError(f"MAS prior {path} does not exist: run `make ssl-prior` (or set the job's mas_prior)")
    encoder = PriorEncoder()
    try:
        encoder.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    except Exception as exc:
        raise FedXViTError(f"MAS prior {path} is not a fedxvit.ssl_prior encoder: {type(exc).__name__}") from None
    return freeze(encoder.to(device)), file_hash(path)
