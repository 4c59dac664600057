"""FedSM (Xu et al., CVPR 2022): a global model, one personalized model per site and a selector.

Every round each site trains three models from what the server sent it:
- the global model, as in FedAvg (its weight difference, step-weighted mean at the server);
- its personalized model, from the server's *SoftPull* aggregate for this site: site i gets
  lambda * p_i + (1 - lambda) / (N - 1) * sum over the other sites j of p_j (`softpull_lambda`: the
  weight of a site's own model; the rest is shared equally by the others'). Only the site's own
  aggregate is sent to it (a server task-data filter);
- the selector: the same network with one output per training site, taught to tell which site an
  image comes from. Each site holds images of its own label only, so plain averaging of weights
  would let every round's local training collapse the selector onto that label; as the FedSM
  example says, the Adam moments are averaged and sent back with the weights.

Sites send differences, never whole models: the global model's, the personalized model's and the
selector's (weights and Adam moments) trainable tensors minus what the site started the round from.
The server knows every starting point (it sent them; in a site's first round the personalized model
starts as the global model and the selector as the global backbone with a head drawn from
SELECTOR_SEED), so it rebuilds each model as start + difference before SoftPull and averaging
(fedxvit.server_algorithms.FedSMShareableGenerator, which holds FedSM's state between rounds).

At inference (fedxvit.fedsm.route, `result_stat`), the selector routes an image to the personalized
model of the site it most likely comes from when its probability is above a threshold chosen on
validation, else to the global model; threshold 1.0 means "global model only".

The site's side is the strategy fedxvit.algorithms.FedSMSite, the server's the components in
fedxvit.server_algorithms (SoftPull, the selector's average, the models kept between rounds); this module holds
what both need (the parts' names, the models and their arithmetic) and the inference, and imports neither side.
Only trainable tensors travel (the freeze policy's; the frozen backbone is the same everywhere).
The server keeps the personalized models and the selector (the method needs them for routing) in
<run>/app_server/fedsm_models.pt, rewritten every round.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict

import numpy as np
import torch
from torch import nn

from fedxvit.errors import FedXViTError

PERSONALIZED = "fedsm_personalized"  # task/result part: {tensor name: array} of one site's personalized model
SELECTOR = "fedsm_selector"  # task/result part: {"weights": {...}, "exp_avg": {...}, "exp_avg_sq": {...}, "step": n}
SITES = "fedsm_sites"  # meta of the selector part: the training sites, in the selector's output order
MODELS_FILE = "fedsm_models.pt"  # in the server's app folder
SELECTOR_SEED = 20220  # every site builds the same initial selector head from it


# ---- plain functions: the method's arithmetic


def added(start: dict, difference: dict) -> dict:
    """{name: start + difference} for every tensor of the difference (a tensor without a start is refused)."""
    missing = sorted(set(difference) - set(start))
    if missing:
        raise FedXViTError(f"FedSM: a difference for {missing[0]} has no starting tensor on the server")
    return {
        name: (np.asarray(start[name], dtype=np.float32) + np.asarray(value, dtype=np.float32)).reshape(
            np.shape(start[name])
        )
        for name, value in difference.items()
    }


def subtracted(after: dict, start: dict) -> dict:
    """{name: after - start}: what a site sends of a model it trained from `start`."""
    return {
        name: np.asarray(value, dtype=np.float32) - np.asarray(start[name], dtype=np.float32)
        for name, value in after.items()
    }


def initial_selector_head(in_features: int, num_sites: int) -> dict:
    """The selector's head in a site's first round, the same at every site and at the server (SELECTOR_SEED)."""
    generator = torch.Generator().manual_seed(SELECTOR_SEED)
    return {
        "head.weight": (torch.randn((num_sites, in_features), generator=generator) * 0.02).numpy(),
        "head.bias": np.zeros(num_sites, dtype=np.float32),
    }


def flat(personalized: Dict[str, dict]) -> dict:
    """{site: {name: array}} -> {"site/name": array}: the sites' models in one WEIGHTS DXO."""
    return {f"{site}/{name}": value for site, state in personalized.items() for name, value in state.items()}


def nested(flat_models: dict) -> Dict[str, dict]:
    """The inverse of flat()."""
    out: Dict[str, dict] = {}
    for key, value in flat_models.items():
        site, _, name = key.partition("/")
        out.setdefault(site, {})[name] = value
    return out


def route(selector_probs, threshold: float, personalized_probs: Dict[int, np.ndarray], global_probs) -> dict:
    """FedSM's super-model on a batch of images: each image goes to the personalized model of the site the
    selector gives the highest probability when that probability is above `threshold` (strictly: 1.0 routes
    nothing), else to the global model. `personalized_probs`: {selector output index: that site's model's
    class probabilities}; an index without a model falls back to the global model.
    Returns {"probs": the super-model's class probabilities, "routes": per image the index or -1 (global)}."""
    selector_probs = np.asarray(selector_probs, dtype=float)
    out = np.array(global_probs, dtype=float, copy=True)
    chosen = selector_probs.argmax(axis=1)
    confident = selector_probs.max(axis=1) > threshold
    routes = np.full(len(out), -1, dtype=int)
    for index, probs in personalized_probs.items():
        mask = confident & (chosen == index)
        out[mask] = np.asarray(probs, dtype=float)[mask]
        routes[mask] = index
    return {"probs": out, "routes": routes}


# ---- the site's helpers (fedxvit.algorithms.FedSMSite trains with them)


class Relabeled:
    """A loader whose every image is labelled `label` (the selector learns 'this comes from my site')."""

    def __init__(self, loader, label: int):
        self.loader, self.label = loader, label

    def __iter__(self):
        for batch in self.loader:
            yield {**batch, "label": torch.full_like(batch["label"], self.label)}

    def __len__(self):
        return len(self.loader)


def adam_moments(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """{"exp_avg", "exp_avg_sq": {name: array}, "step"} of the trainable parameters (zeros before any step)."""
    moments = {"exp_avg": {}, "exp_avg_sq": {}, "step": 0}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        state = optimizer.state.get(param, {})
        for key in ("exp_avg", "exp_avg_sq"):
            value = state.get(key)
            # a copy: Adam updates its state in place, and a round's start must not move with it
            moments[key][name] = (value if value is not None else torch.zeros_like(param)).detach().cpu().numpy().copy()
        moments["step"] = max(moments["step"], int(float(state.get("step", 0))))
    return moments


def load_adam_moments(model: nn.Module, optimizer: torch.optim.Optimizer, moments: dict) -> None:
    """Set the optimizer's Adam state of every trainable parameter to the (averaged) moments."""
    step = int(moments.get("step", 0))
    if step == 0:
        return
    for name, param in model.named_parameters():
        if param.requires_grad and name in moments["exp_avg"]:
            optimizer.state[param] = {
                "step": torch.tensor(float(step)),
                # copies: Adam updates them in place, and the received arrays stay what was received
                "exp_avg": torch.tensor(np.asarray(moments["exp_avg"][name])).to(param).reshape(param.shape),
                "exp_avg_sq": torch.tensor(np.asarray(moments["exp_avg_sq"][name])).to(param).reshape(param.shape),
            }


def trainable_arrays(model: nn.Module) -> dict:
    return {
        name: p.detach().cpu().numpy().astype(np.float32) for name, p in model.named_parameters() if p.requires_grad
    }


def overlay(model: nn.Module, arrays: dict) -> None:
    """Copy {name: array} into the model's tensors of those names (the rest stays)."""
    own = model.state_dict()
    unknown = sorted(set(arrays) - set(own))
    if unknown:
        raise FedXViTError(f"FedSM: the server sent {len(unknown)} tensors this model lacks (first: {unknown[0]})")
    with torch.no_grad():
        for name, value in arrays.items():
            own[name].copy_(torch.as_tensor(np.asarray(value)).reshape(own[name].shape))


def build_selector(new_model, global_state: dict, num_sites: int) -> nn.Module:
    """The job's model with one output per training site: the global model's backbone, the head
    initial_selector_head() (the server rebuilds the same starting point)."""
    selector = new_model(num_classes=num_sites)
    backbone = {k: v for k, v in global_state.items() if not k.startswith("head.")}
    missing, unexpected = selector.load_state_dict(backbone, strict=False)
    if unexpected or any(not k.startswith("head.") for k in missing):
        raise FedXViTError("FedSM: the selector does not fit the global model's backbone")
    overlay(selector, initial_selector_head(selector.head.weight.shape[1], num_sites))
    return selector


# ---- inference: the super-model's parts from a finished run


def load_fedsm_models(path: Path, global_model: nn.Module, preset: str, device="cpu") -> dict:
    """{"sites", "selector", "personalized": {site: model}} of a run's MODELS_FILE: each personalized model is the
    final global model with that site's trainable tensors, the selector the global backbone with its own."""
    from fedxvit.classes import TASK_CLASSES
    from fedxvit.model import build_model

    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        sites = list(saved["sites"])
    except Exception as exc:
        raise FedXViTError(f"cannot read FedSM models {path}: {type(exc).__name__}: {exc}") from None
    global_state = {k: v.detach().cpu() for k, v in global_model.state_dict().items()}
    personalized = {}
    for site, state in saved["personalized"].items():
        model = build_model(preset, num_classes=len(TASK_CLASSES))
        model.load_state_dict(global_state)
        overlay(model, state)
        personalized[site] = model.to(device).eval()
    selector = build_selector(
        lambda num_classes: build_model(preset, num_classes=num_classes), global_state, len(sites)
    )
    overlay(selector, saved["selector"])
    return {"sites": sites, "selector": selector.to(device).eval(), "personalized": personalized}


# routing thresholds tried on validation: 0 routes every image (the selector's pick), 1.0 none (the global model);
# with N sites a selector's top probability can be far below 0.5 and still be its pick
THRESHOLDS = (0.0, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)


def routed_predictions(selector: dict, personal: dict, global_preds: dict, sites: list, threshold: float) -> tuple:
    """({site: {"labels", "probs"}} of the super-model, {site: routes}) from every model's predictions
    ({site: {"labels", "probs"}}; `personal`: {training site: such predictions}) on each site's images."""
    out, routes = {}, {}
    for site, preds in global_preds.items():
        options = {i: personal[s][site]["probs"] for i, s in enumerate(sites) if s in personal}
        routed = route(selector[site]["probs"], threshold, options, preds["probs"])
        out[site] = {"labels": preds["labels"], "probs": routed["probs"].round(6).tolist()}
        routes[site] = routed["routes"].tolist()
    return out, routes


def super_model(models: dict, global_model: nn.Module, predict, score) -> dict:
    """FedSM's super-model scored as the method prescribes: the threshold that maximizes `score` (higher is
    better) on the validation split (ties: the higher threshold, fewer routes), then its predictions,
    the selector's site-identification accuracy on test and the share of each route.
    `models`: load_fedsm_models(); `predict(model, split)` -> {site: {"labels", "probs"}} for "validation"
    and "test"; `score(predictions)` -> float."""
    sites = models["sites"]
    preds = {
        split: {
            "global": predict(global_model, split),
            "selector": predict(models["selector"], split),
            "personal": {s: predict(m, split) for s, m in models["personalized"].items()},
        }
        for split in ("validation", "test")
    }
    by_threshold = {
        t: score(
            routed_predictions(
                preds["validation"]["selector"],
                preds["validation"]["personal"],
                preds["validation"]["global"],
                sites,
                t,
            )[0]
        )
        for t in THRESHOLDS
    }
    best = max(by_threshold.values())
    threshold = max(t for t, v in by_threshold.items() if v == best)
    routed = {
        split: routed_predictions(
            preds[split]["selector"], preds[split]["personal"], preds[split]["global"], sites, threshold
        )
        for split in ("validation", "test")
    }
    test, routes = routed["test"]
    identified = [
        int(np.argmax(p) == sites.index(site))
        for site, selected in preds["test"]["selector"].items()
        if site in sites
        for p in selected["probs"]
    ]
    taken = [(site, r) for site, rs in routes.items() for r in rs]
    return {
        "test": test,
        "validation": routed["validation"][0],  # at the threshold chosen on it: for tuning, not for reporting
        "missing_personalized": [s for s in sites if s not in models["personalized"]],  # routed to the global model
        "threshold": threshold,
        "validation_score_by_threshold": {str(t): v for t, v in by_threshold.items()},
        "selector_test_accuracy": float(np.mean(identified)) if identified else None,
        "routes": {
            "global": sum(r == -1 for _, r in taken) / len(taken),
            "own_site": sum(r >= 0 and sites[r] == site for site, r in taken) / len(taken),
            "other_site": sum(r >= 0 and sites[r] != site for site, r in taken) / len(taken),
        },
    }


# ---- the server's part: NVFlare's ScatterAndGather with these three components
