"""Framework-free training pieces shared by the expert CLI, the NVFlare executor and the tests.

Nothing here knows about NVFlare or MLflow: callers pass an abort callback and log the
returned metric dicts wherever they like.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
from torch import nn
from torch.nn import functional as F

from fedxvit.errors import FedXViTError
from fedxvit.model import hold_frozen_batchnorm

FREEZE_POLICIES = ("head", "last-k", "full", "full-but-batchnorm")


def resolve_device(requested: str | None = None) -> torch.device:
    """An explicit device, else CUDA when present, else CPU."""
    if requested:
        if requested.startswith("cuda") and not torch.cuda.is_available():
            raise FedXViTError(f"device {requested!r} was asked for but CUDA is not available here")
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def apply_freeze_policy(model: nn.Module, policy: str, last_k: int = 1) -> list[str]:
    """Set requires_grad per policy and return the trainable parameter names.

    head:   only the classifier learns (cheapest to train and to send);
    last-k: the last k ViT blocks + final norm + head adapt, the CNN and early blocks stay;
    full:   everything learns;
    full-but-batchnorm: every layer but the BatchNorm ones, which keep the start's weights and statistics, and
            the model's own class token and position embeddings: what DP-SGD can train (Opacus bounds no layer
            holding buffers, and the model itself holds the BatchNorm buffers), and what a privacy filter's noise
            cannot break (a noised running variance can turn negative and make every prediction NaN).
    Frozen BatchNorm layers are also switched to eval so their running stats cannot drift.
    """
    if policy not in FREEZE_POLICIES:
        raise FedXViTError(f"unknown freeze policy {policy!r}; choose one of {', '.join(FREEZE_POLICIES)}")
    held = {  # what full-but-batchnorm freezes: the BatchNorm layers' parameters and the model's own
        f"{prefix}.{name}" if prefix else name
        for prefix, module in model.named_modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm) or not prefix
        for name, _ in module.named_parameters(recurse=False)
    }
    if policy in ("full", "full-but-batchnorm"):
        trainable_prefixes = ("",)
    elif policy == "head":
        trainable_prefixes = ("head.",)
    else:
        depth = len(model.blocks)
        if not 1 <= last_k <= depth:
            raise FedXViTError(f"last_k={last_k} is out of range: the model has {depth} ViT blocks")
        trainable_prefixes = tuple(f"blocks.{i}." for i in range(depth - last_k, depth)) + ("norm.", "head.")
    names = []
    for name, param in model.named_parameters():
        param.requires_grad = name.startswith(trainable_prefixes) and not (
            policy == "full-but-batchnorm" and name in held
        )
        if param.requires_grad:
            names.append(name)
    if model.training:
        set_train_mode(model)
    return names


def shared_state_keys(model: nn.Module, trainable: Iterable[str]) -> list[str]:
    """State entries a site sends: the trainable parameters plus the running mean/var of every
    BatchNorm layer that trains (only under `full`). Without them the global model would average
    weights learned under local statistics while keeping the expert's stale ones. The integer
    `num_batches_tracked` counter stays local: it is bookkeeping, not model."""
    trainable = list(trainable)
    training = set(trainable)
    buffers = [
        f"{prefix}.{buffer}" if prefix else buffer
        for prefix, module in model.named_modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm)
        and any(f"{prefix}.{name}" in training for name, _ in module.named_parameters(recurse=False))
        for buffer in ("running_mean", "running_var")
        if getattr(module, buffer, None) is not None
    ]
    return trainable + buffers


def set_train_mode(model: nn.Module) -> nn.Module:
    """model.train(), except that frozen BatchNorm layers stay in eval (works for any nn.Module)."""
    model.train()
    hold_frozen_batchnorm(model)
    return model


def make_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.05) -> torch.optim.AdamW:
    """AdamW over trainable parameters only; no decay on biases, norms, position/class tokens."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 or name in ("pos_embed", "cls_token") else decay).append(param)
    if not decay and not no_decay:
        raise FedXViTError("no trainable parameters: the freeze policy froze everything")
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr)


def make_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0, min_lr_ratio: float = 0.01
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step linear warm-up then cosine decay to min_lr_ratio x the base learning rate."""
    total_steps = max(1, int(total_steps))
    warmup_steps = min(max(0, int(warmup_steps)), total_steps - 1)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train_epoch(
    model: nn.Module,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    scheduler=None,
    should_abort: Callable[[], bool] | None = None,
    label_smoothing: float = 0.0,
    progress: Callable[[dict], None] | None = None,
    max_grad_norm: float | None = None,
    extra_loss: Callable[[], torch.Tensor | None] | None = None,
    after_step: Callable[[], None] | None = None,
    logit_shift: torch.Tensor | None = None,
) -> dict:
    """One pass over loader; stops between batches as soon as should_abort() is true.

    `max_grad_norm` clips the global gradient norm: training a ViT from scratch at a high
    learning rate otherwise has loss spikes that undo epochs of progress.

    The federated algorithms hook in here instead of copying the loop (fedxvit.algorithms):
    `extra_loss()` is added to each batch's loss before backward (FedProx's proximal term; None
    adds nothing) and `after_step()` runs after each optimizer step (SCAFFOLD's correction). The
    reported loss is the classification loss alone, so runs of different algorithms compare.
    `logit_shift` (per class) is added to the logits inside the loss only: Balanced Softmax with the
    log class counts (fedxvit.imbalance); accuracy is read from the plain logits.

    The scheduler (if any) is stepped per batch. Returns loss/accuracy means over the images
    seen, the number of optimizer steps and images, and whether it was aborted.
    """
    set_train_mode(model)
    total_loss, correct, images, steps, aborted = 0.0, 0, 0, 0, False
    for batch in loader:
        if should_abort is not None and should_abort():
            aborted = True
            break
        inputs, labels = batch["image"].to(device), batch["label"].to(device).long()
        logits = model(inputs)
        shifted = logits if logit_shift is None else logits + logit_shift
        loss = F.cross_entropy(shifted, labels, label_smoothing=label_smoothing)
        term = extra_loss() if extra_loss is not None else None
        optimizer.zero_grad(set_to_none=True)
        (loss if term is None else loss + term).backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], max_grad_norm)
        optimizer.step()
        if after_step is not None:
            after_step()
        if scheduler is not None:
            scheduler.step()
        steps += 1
        images += len(labels)
        if len(labels):  # DP-SGD's Poisson sampling draws empty batches too (a noised step, but a loss of nan)
            total_loss += loss.item() * len(labels)
        correct += (logits.argmax(1) == labels).sum().item()
        if progress is not None:
            progress({"loss": loss.item(), "images": images})
    return {
        "loss": total_loss / max(1, images),
        "accuracy": correct / max(1, images),
        "steps": steps,
        "images": images,
        "aborted": aborted,
    }


def balanced_accuracy(labels: list, predicted: list) -> float:
    """The mean recall over the classes present in `labels` (0.0 without labels): a site that is 91% Tumor
    scores 0.5, not 0.91, with a model that calls everything Tumor. The same definition as scikit-learn's
    balanced_accuracy_score, which the result scripts use; sites do not install scikit-learn."""
    recalls = [
        sum(int(p == c) for p, y in zip(predicted, labels) if y == c) / labels.count(c) for c in sorted(set(labels))
    ]
    return sum(recalls) / len(recalls) if recalls else 0.0


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: Iterable, device: torch.device, should_abort: Callable[[], bool] | None = None
) -> dict:
    """Mean loss, accuracy and balanced accuracy plus per-image labels and class probabilities (for reports
    and ROC).

    Stops between batches as soon as should_abort() is true, so a site told to stop is not held
    up by scoring a large validation split; the scores then cover only the images seen and
    "aborted" is True.
    """
    model.eval()
    total_loss, labels_all, probs_all, aborted = 0.0, [], [], False
    for batch in loader:
        if should_abort is not None and should_abort():
            aborted = True
            break
        inputs, labels = batch["image"].to(device), batch["label"].to(device).long()
        logits = model(inputs)
        total_loss += F.cross_entropy(logits, labels, reduction="sum").item()
        labels_all += labels.tolist()
        probs_all += logits.softmax(1).tolist()
    count = len(labels_all)
    predicted = [max(range(len(p)), key=p.__getitem__) for p in probs_all]
    correct = sum(int(c == y) for c, y in zip(predicted, labels_all))
    return {
        "loss": total_loss / max(1, count),
        "accuracy": correct / max(1, count),
        "balanced_accuracy": balanced_accuracy(labels_all, predicted),
        "count": count,
        "labels": labels_all,
        "probs": probs_all,
        "aborted": aborted,
    }


def weight_diff(new_state: dict, old_state: dict, keys: Iterable[str] | None = None) -> dict:
    """new - old for the given keys (default: all float tensors): what a site sends to the server."""
    keys = list(keys) if keys is not None else [k for k, v in new_state.items() if torch.is_floating_point(v)]
    return {k: (new_state[k].detach().cpu() - old_state[k].detach().cpu()) for k in keys}


def seed_everything(seed: int) -> None:
    """Same seed -> same init, shuffling and augmentation (MONAI's helper seeds torch, numpy, random)."""
    from monai.utils import set_determinism

    set_determinism(seed=seed)
