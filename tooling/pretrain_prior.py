"""FedMAS's auxiliary network, made offline: a small CNN pretrained self-supervised on the public archive.

    python -m tooling.pretrain_prior --data data/public --out models/ssl_prior.pt     (make ssl-prior)

The paper measures every site against MoCo-v2 weights pretrained on ImageNet; fedxvit downloads
nothing, so it pretrains its own encoder on the public 4-class archive (public, as ImageNet was for
the paper; its labels are never read for training) with SimCLR's contrastive loss: two random views of
each image (crop, mirror, contrast, noise) must be nearer to each other than to the batch's other
images. The projection head used for that loss is dropped; the encoder's pooled features are what
sites compare against (fedxvit.imbalance). The file is cached under models/ and reused while the
data and settings are the same; its SHA-256 is what proves every site measures with the same one.

The sidecar also records a nearest-class-mean accuracy of the frozen features on the public
validation split: a check that the features separate tumor types at all (labels used for that only).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from fedxvit.datalist import file_hash, read_dataset_info
from fedxvit.errors import ArgumentParser, FedXViTError, read_json, run_cli
from fedxvit.ssl_prior import DEFAULT_OUT, PRIOR_SIZE, WIDTHS, PriorEncoder


def two_views(images: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Two random views per image: random crop (50-100% of the side) resized back, mirror, contrast and
    brightness change, Gaussian noise."""

    def view() -> torch.Tensor:
        batch, _, size, _ = images.shape
        out = torch.empty_like(images)
        for i in range(batch):
            side = int(size * (0.5 + 0.5 * torch.rand(1, generator=generator).item()))
            top, left = (int(torch.randint(0, size - side + 1, (1,), generator=generator)) for _ in range(2))
            crop = images[i : i + 1, :, top : top + side, left : left + side]
            crop = F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False)
            if torch.rand(1, generator=generator).item() < 0.5:
                crop = crop.flip(-1)
            out[i : i + 1] = crop
        contrast = 0.7 + 0.6 * torch.rand(batch, 1, 1, 1, generator=generator)
        shift = 0.2 * (torch.rand(batch, 1, 1, 1, generator=generator) - 0.5)
        noise = 0.05 * torch.rand(batch, 1, 1, 1, generator=generator) * torch.randn(out.shape, generator=generator)
        return (out - 0.5) * contrast + 0.5 + shift + noise

    return view(), view()


def contrastive_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    """SimCLR's NT-Xent: each view's positive is the other view of its image, its negatives the rest."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    similarity = z @ z.T / temperature
    similarity.fill_diagonal_(float("-inf"))
    n = len(z1)
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)])
    return F.cross_entropy(similarity, targets)


def _images(data: Path, split: str) -> tuple[torch.Tensor, list]:
    from fedxvit.data import make_loader

    loader = make_loader(data, split, PRIOR_SIZE, 256, train=False)
    batches = list(loader)
    return torch.cat([b["image"] for b in batches]), [y for b in batches for y in b["label"].tolist()]


@torch.no_grad()
def nearest_mean_accuracy(encoder: PriorEncoder, train: tuple, val: tuple) -> float:
    """Accuracy of classifying validation images by the nearest class mean of training features (cosine)."""
    encoder.eval()
    train_f, val_f = F.normalize(encoder(train[0]), dim=1), F.normalize(encoder(val[0]), dim=1)
    labels = torch.as_tensor(train[1])
    classes = sorted(set(train[1]))
    means = F.normalize(torch.stack([train_f[labels == c].mean(0) for c in classes]), dim=1)
    predicted = torch.as_tensor(classes)[(val_f @ means.T).argmax(1)]
    return float((predicted == torch.as_tensor(val[1])).float().mean())


def pretrain(data: Path, epochs: int, batch_size: int, lr: float, seed: int, log=print) -> tuple[PriorEncoder, dict]:
    """SimCLR on the training and validation images of `data` (labels unused); (encoder, report)."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    train, val = _images(data, "training"), _images(data, "validation")
    images = torch.cat([train[0], val[0]])
    encoder = PriorEncoder()
    projector = nn.Sequential(nn.Linear(encoder.dim, encoder.dim), nn.ReLU(inplace=True), nn.Linear(encoder.dim, 64))
    parameters = [*encoder.parameters(), *projector.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=1e-4)
    started, losses = time.perf_counter(), []
    before = nearest_mean_accuracy(encoder, train, val)
    for epoch in range(epochs):
        encoder.train()
        order = torch.randperm(len(images), generator=generator)
        total, batches = 0.0, 0
        for start in range(0, len(order) - 1, batch_size):
            batch = images[order[start : start + batch_size]]
            if len(batch) < 2:
                continue
            view1, view2 = two_views(batch, generator)
            loss = contrastive_loss(projector(encoder(view1)), projector(encoder(view2)))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total, batches = total + loss.item(), batches + 1
        losses.append(total / max(1, batches))
        log(f"ssl prior epoch {epoch + 1}/{epochs}: contrastive loss {losses[-1]:.4f}", flush=True)
    encoder.eval()
    report = {
        "contrastive_loss_per_epoch": [round(v, 4) for v in losses],
        "nearest_class_mean_val_accuracy": {
            "untrained": before,
            "pretrained": nearest_mean_accuracy(encoder, train, val),
        },
        "images": len(images),
        "wall_s": round(time.perf_counter() - started, 1),
    }
    return encoder, report


def parse_args(argv=None) -> argparse.Namespace:
    parser = ArgumentParser(prog="python -m tooling.pretrain_prior", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data", default="data/public", help="public image folder (datalist.json; default data/public)"
    )
    parser.add_argument("--out", default=str(DEFAULT_OUT), help=f"encoder file (default {DEFAULT_OUT})")
    parser.add_argument("--epochs", type=int, default=30, help="contrastive epochs (default 30)")
    parser.add_argument("--batch-size", type=int, default=128, help="images per batch, each seen twice (default 128)")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default 1e-3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="retrain even when a prior of these settings exists")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    data, out = Path(args.data), Path(args.out)
    if not (data / "datalist.json").is_file():
        raise FedXViTError(f"--data {data} holds no datalist.json: run `make data` first")
    if args.epochs < 1 or args.batch_size < 2:
        raise FedXViTError(f"--epochs {args.epochs} must be >= 1 and --batch-size {args.batch_size} >= 2")
    settings = {
        "data_hash": read_dataset_info(data).get("data_hash"),
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "seed": args.seed,
        "prior_size": PRIOR_SIZE,
        "widths": list(WIDTHS),
    }
    sidecar = Path(f"{out}.json")
    if out.is_file() and sidecar.is_file() and not args.force:
        meta = read_json(sidecar, f"sidecar of {out}")
        if meta.get("settings") == settings and meta.get("sha256") == file_hash(out):
            print(f"reusing {out} (same data and settings; --force retrains)")
            return meta
    encoder, report = pretrain(data, args.epochs, args.batch_size, args.lr, args.seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    torch.save({k: v.detach().cpu() for k, v in encoder.state_dict().items()}, tmp)
    os.replace(tmp, out)
    meta = {"settings": settings, **report, "sha256": file_hash(out), "data": str(data)}
    sidecar.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    accuracy = report["nearest_class_mean_val_accuracy"]
    print(
        f"wrote {out} ({report['wall_s']} s): nearest-class-mean validation accuracy of its features "
        f"{accuracy['pretrained']:.3f} (untrained {accuracy['untrained']:.3f})"
    )
    return meta


if __name__ == "__main__":
    run_cli(main)
