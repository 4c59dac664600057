"""Learning from long-tailed hospitals: Balanced Softmax and FedMAS's self-supervised aggregation weights.

Plain torch/numpy functions; the executor (client) and the aggregation (server) call them.

**Balanced Softmax** (Ren et al., 2020; FedMAS's `--loss_fn_name BSM`): the training loss is the
cross-entropy of `logits + log(n_c)`, with n_c the site's training images of class c. A frequent class
is handicapped by its own prior during training, so the plain logits the model predicts with are
balanced. A class absent at the site counts as one image: its logit is still pushed down a little and
the adjusted logit never becomes -inf. Counts stay at the site; with equal counts the shift is the same
for every class and the loss is plain cross-entropy.

**MAS** (Elbatel et al., MICCAI 2023): every site measures, with the same frozen self-supervised
encoder (fedxvit.ssl_prior), how far its model's features of each class are from the encoder's, once
with the received global model and once after local training. Each measurement is normalized to a
distribution over classes, and the site's factor is their dot product: large when the divergence sits
in few classes, both before and after training. The server weights the sites' updates by their factors
normalized to sum to one, instead of by sample counts. Where fedxvit's reading differs from the paper
(docs/imbalance.md): the divergence is 1 - linear CKA between the class token and the encoder's
features, per class, so no projection head is added to the model or sent; the paper trains a projector
toward the encoder's features (its `free_u` loss), which fedxvit does not.
"""

from __future__ import annotations

import math
from typing import Dict, Sequence

import numpy as np
import torch
from torch.nn import functional as F

from fedxvit.errors import FedXViTError

LOSSES = ("ce", "bsm")
MIN_CLASS_IMAGES = 3  # fewer images of a class at a site give no divergence for it (CKA needs spread)


def check_loss(loss: str) -> str:
    if loss not in LOSSES:
        raise FedXViTError(f"job option loss={loss!r} is unknown; choose one of {', '.join(LOSSES)}")
    return loss


def class_counts(labels: Sequence[int], num_classes: int) -> torch.Tensor:
    """Images per class (float), for labels 0..num_classes-1."""
    labels = torch.as_tensor(list(labels), dtype=torch.long)
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise FedXViTError(f"labels {sorted(set(labels.tolist()))} do not fit a {num_classes}-class model")
    return torch.bincount(labels, minlength=num_classes).float()


def balanced_softmax_shift(counts: torch.Tensor) -> torch.Tensor:
    """The logit shift of Balanced Softmax: log(max(n_c, 1)) per class."""
    return torch.log(torch.clamp(torch.as_tensor(counts, dtype=torch.float32), min=1.0))


def balanced_softmax_loss(logits: torch.Tensor, labels: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Mean Balanced Softmax loss of a batch: cross-entropy of the prior-shifted logits."""
    return F.cross_entropy(logits + balanced_softmax_shift(counts).to(logits.device), labels)


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear centered kernel alignment of two feature sets of the same images (rows), in [0, 1];
    compares representations of different widths, unchanged by rotations and scaling of either."""
    x = x.double() - x.double().mean(0, keepdim=True)
    y = y.double() - y.double().mean(0, keepdim=True)
    cross = torch.linalg.matrix_norm(y.T @ x) ** 2
    norms = torch.linalg.matrix_norm(x.T @ x) * torch.linalg.matrix_norm(y.T @ y)
    return float(cross / norms) if norms > 0 else 0.0


def class_divergence(
    model_features: torch.Tensor, prior_features: torch.Tensor, labels: Sequence[int], num_classes: int
) -> list:
    """Per class, 1 - linear CKA between the model's and the prior's features of that class's images;
    None for a class with fewer than MIN_CLASS_IMAGES images here."""
    labels = torch.as_tensor(list(labels), dtype=torch.long)
    out = []
    for c in range(num_classes):
        rows = labels == c
        if int(rows.sum()) < MIN_CLASS_IMAGES:
            out.append(None)
        else:
            out.append(1.0 - linear_cka(model_features[rows], prior_features[rows]))
    return out


def mas_factor(before: Sequence, after: Sequence) -> float:
    """A site's MAS factor: dot product of its per-class divergences before and after local training,
    each normalized over the classes measured in both (None = not measured). 0 when nothing was measured."""
    classes = [c for c, (b, a) in enumerate(zip(before, after)) if b is not None and a is not None]
    b = np.array([max(float(before[c]), 0.0) for c in classes])
    a = np.array([max(float(after[c]), 0.0) for c in classes])
    if not classes or b.sum() <= 0 or a.sum() <= 0:
        return 0.0
    return float(np.dot(b / b.sum(), a / a.sum()))


def mas_weights(factors: Dict[str, float]) -> Dict[str, float]:
    """Aggregation weights from the sites' MAS factors: proportional, summing to one. Sites whose factor is
    not a positive number get none; if no site has one, every site weighs the same."""
    usable = {s: float(f) for s, f in factors.items() if f is not None and math.isfinite(float(f)) and float(f) > 0}
    if not usable:
        return {s: 1.0 / len(factors) for s in factors} if factors else {}
    total = sum(usable.values())
    return {s: usable.get(s, 0.0) / total for s in factors}


@torch.no_grad()
def measure_divergence(model, prior, loader, device, num_classes: int, should_abort=None) -> list | None:
    """class_divergence of a HybridViT's class token against the frozen prior's features over a loader's
    images (the site's training split, unaugmented); None when aborted."""
    model.eval()
    ours, theirs, labels = [], [], []
    for batch in loader:
        if should_abort is not None and should_abort():
            return None
        images = batch["image"].to(device)
        ours.append(model.forward_features(images)[:, 0].float().cpu())
        theirs.append(prior(images).float().cpu())
        labels += batch["label"].tolist()
    if not labels:
        return [None] * num_classes
    return class_divergence(torch.cat(ours), torch.cat(theirs), labels, num_classes)
