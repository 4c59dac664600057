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
(FedSMShareableGenerator, which holds FedSM's state between rounds).

At inference (fedxvit.fedsm.route, `result_stat`), the selector routes an image to the personalized
model of the site it most likely comes from when its probability is above a threshold chosen on
validation, else to the global model; threshold 1.0 means "global model only".

The site's side is the strategy fedxvit.algorithms.FedSMSite (client-only code); this module holds
the method's arithmetic, the server's components and the inference, and never imports the training
loop, so the server does not either. Only trainable tensors travel (the freeze policy's; the frozen
backbone is the same everywhere).
The server keeps the personalized models and the selector (the method needs them for routing) in
<run>/app_server/fedsm_models.pt, rewritten every round.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict

import numpy as np
import torch
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.filter import Filter
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.abstract.model import ModelLearnable, ModelLearnableKey
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.shareablegenerators.full_model_shareable_generator import FullModelShareableGenerator
from torch import nn

from fedxvit.aggregation import ScreenedAssembler, combine_updates, screen_updates
from fedxvit.errors import FedXViTError
from fedxvit.filters import find_bad_tensor

PERSONALIZED = "fedsm_personalized"  # task/result part: {tensor name: array} of one site's personalized model
SELECTOR = "fedsm_selector"  # task/result part: {"weights": {...}, "exp_avg": {...}, "exp_avg_sq": {...}, "step": n}
SITES = "fedsm_sites"  # meta of the selector part: the training sites, in the selector's output order
MODELS_FILE = "fedsm_models.pt"  # in the server's app folder
SELECTOR_SEED = 20220  # every site builds the same initial selector head from it


# ---- plain functions: the method's arithmetic


def softpull_weights(sites: list, softpull_lambda: float) -> Dict[str, Dict[str, float]]:
    """{site i: {site j: weight of p_j in site i's aggregate}}; each row sums to one. One site: its own model."""
    if not 0.0 <= float(softpull_lambda) <= 1.0:
        raise FedXViTError(f"job option softpull_lambda={softpull_lambda}: must be between 0 and 1")
    if len(sites) == 1:
        return {sites[0]: {sites[0]: 1.0}}
    other = (1.0 - softpull_lambda) / (len(sites) - 1)
    return {i: {j: (softpull_lambda if i == j else other) for j in sites} for i in sites}


def softpull(personalized: Dict[str, dict], softpull_lambda: float) -> Dict[str, dict]:
    """Each site's SoftPull aggregate of the sites' personalized models (softpull_weights)."""
    matrix = softpull_weights(sorted(personalized), softpull_lambda)
    return {site: combine_updates(personalized, row) for site, row in matrix.items()}  # rows sum to one


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


def average_selector(selectors: Dict[str, dict]) -> dict:
    """The mean of the sites' selector weight and Adam-moment (exp_avg, exp_avg_sq) differences (every site
    started from the same selector, so the mean difference is the difference of the mean), and the largest
    step."""
    sites = sorted(selectors)
    equal = {s: 1.0 / len(sites) for s in sites}
    return {
        key: combine_updates({s: selectors[s][key] for s in sites}, equal)
        for key in ("weights", "exp_avg", "exp_avg_sq")
    } | {"step": max(int(selectors[s]["step"]) for s in sites)}


def personalized_after_round(
    personalized: Dict[str, dict], global_start: dict, differences: Dict[str, dict], softpull_lambda: float
) -> Dict[str, dict]:
    """The SoftPull aggregates sent next round to the sites that sent a difference: each site's trained model
    rebuilt as its start (its last aggregate, or the round's global model in its first round) + difference."""
    trained = {site: added({**global_start, **personalized.get(site, {})}, d) for site, d in differences.items()}
    return softpull(trained, softpull_lambda)


def selector_after_round(selector: dict, global_start: dict, mean: dict, num_sites: int) -> dict:
    """The selector (weights, Adam moments, step) after adding the round's mean differences (average_selector)
    to the one every site started from: the last one, or in the first round the round's global backbone
    with initial_selector_head()."""
    weights = selector.get("weights")
    if weights is None:
        head = initial_selector_head(np.shape(global_start["head.weight"])[1], num_sites)
        weights = {**{k: v for k, v in global_start.items() if not k.startswith("head.")}, **head}
    zeros = {k: np.zeros(np.shape(weights[k]), dtype=np.float32) for k in mean["weights"]}
    return {
        "weights": added(weights, mean["weights"]),  # the trainable tensors: those the sites changed
        **{key: added({**zeros, **selector.get(key, {})}, mean[key]) for key in ("exp_avg", "exp_avg_sq")},
        "step": int(mean["step"]),
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


def sites_of(fl_ctx: FLContext) -> list:
    """The training sites, sorted: the selector's output order."""
    return sorted(client.name for client in fl_ctx.get_engine().get_clients())


class FedSMShareableGenerator(FullModelShareableGenerator):
    """NVFlare's full-model generator for the global model, plus FedSM's state, kept here between rounds and
    saved to MODELS_FILE: every site's personalized model (the SoftPull aggregate it is sent) and the selector
    with its averaged Adam moments. It rebuilds the sites' personalized models and the selector from their
    differences and the starting points it sent (module doc), then soft-pulls."""

    def __init__(self, softpull_lambda: float = 0.3):
        super().__init__()
        softpull_weights(["a"], softpull_lambda)  # a bad value fails when the job starts, in one line
        self.softpull_lambda = float(softpull_lambda)
        self.personalized: Dict[str, dict] = {}
        self.selector: dict = {}
        self.sites: list = []

    def learnable_to_shareable(self, model_learnable: ModelLearnable, fl_ctx: FLContext) -> Shareable:
        global_dxo = from_shareable(super().learnable_to_shareable(model_learnable, fl_ctx))
        if not self.sites:
            self.sites = sites_of(fl_ctx)
        return DXO(
            data_kind=DataKind.COLLECTION,
            data={
                AppConstants.MODEL_WEIGHTS: global_dxo,
                PERSONALIZED: DXO(data_kind=DataKind.WEIGHTS, data=flat(self.personalized)),  # a site gets its own
                SELECTOR: DXO(data_kind=DataKind.COLLECTION, data=dict(self.selector), meta={SITES: self.sites}),
            },
        ).to_shareable()

    def shareable_to_learnable(self, shareable: Shareable, fl_ctx: FLContext) -> ModelLearnable:
        parts = from_shareable(shareable).data or {}
        # the round's global model, before its difference is added: the start of a site's first personalized model
        start = dict(fl_ctx.get_prop(AppConstants.GLOBAL_MODEL)[ModelLearnableKey.WEIGHTS])
        learnable = super().shareable_to_learnable(parts[AppConstants.MODEL_WEIGHTS].to_shareable(), fl_ctx)
        differences = nested(parts[PERSONALIZED].data or {}) if isinstance(parts.get(PERSONALIZED), DXO) else {}
        if differences:
            self.personalized.update(
                personalized_after_round(self.personalized, start, differences, self.softpull_lambda)
            )
            self.log_info(
                fl_ctx,
                f"fedxvit: round {fl_ctx.get_prop(AppConstants.CURRENT_ROUND)}: FedSM personalized models of "
                f"{', '.join(sorted(differences))} soft-pulled (own weight {self.softpull_lambda:g})",
            )
        if isinstance(parts.get(SELECTOR), DXO) and parts[SELECTOR].data:
            self.selector = selector_after_round(self.selector, start, parts[SELECTOR].data, len(self.sites))
        self.save(fl_ctx)
        return learnable

    def save(self, fl_ctx: FLContext) -> None:
        app_dir = Path(fl_ctx.get_engine().get_workspace().get_app_dir(fl_ctx.get_job_id()))
        tensors = lambda state: {k: torch.as_tensor(np.asarray(v)) for k, v in state.items()}  # noqa: E731
        content = {
            "sites": list(self.sites),
            "personalized": {site: tensors(state) for site, state in self.personalized.items()},
            "selector": tensors(self.selector.get("weights", {})),
        }
        tmp = app_dir / (MODELS_FILE + ".tmp")
        torch.save(content, tmp)
        tmp.replace(app_dir / MODELS_FILE)


class FedSMSiteModels(Filter):
    """Server task-data filter on `train`: a site receives its own personalized aggregate only.

    NVFlare gives each site a shallow copy of one broadcast task: the DXOs inside are shared by every site,
    so this filter builds new ones and never changes what it received (changing it would strip the task of
    every site that asks after this one)."""

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        dxo = from_shareable(shareable)
        part = (dxo.data or {}).get(PERSONALIZED) if dxo.data_kind == DataKind.COLLECTION else None
        if not isinstance(part, DXO):
            return shareable
        site = fl_ctx.get_peer_context().get_identity_name(default="?")
        prefix = f"{site}/"
        own = {k[len(prefix) :]: v for k, v in (part.data or {}).items() if k.startswith(prefix)}
        parts = {**dxo.data, PERSONALIZED: DXO(data_kind=part.data_kind, data=own, meta=dict(part.meta or {}))}
        return DXO(data_kind=dxo.data_kind, data=parts, meta=dict(dxo.meta or {})).update_shareable(shareable)


class FedSMAssembler(ScreenedAssembler):
    """For NVFlare's CollectAndAssembleAggregator: the global weight differences screened and combined as in
    the FedAvg job (bounded step weights); the personalized-model differences of the kept sites passed on per
    site (the generator soft-pulls them); the selector's weight and Adam-moment differences averaged (unweighted).
    A site whose personalized or selector difference is missing or not finite is dropped like a bad update."""

    def __init__(
        self, aggregation: str = "mean", norm_k: float = 10.0, trim_fraction: float = 0.2, max_weight_ratio: float = 4.0
    ):
        super().__init__(
            aggregation, norm_k, trim_fraction, data_kind=DataKind.COLLECTION, max_weight_ratio=max_weight_ratio
        )

    def get_model_params(self, dxo: DXO) -> dict:
        parts = dxo.data or {}
        data = {name: parts.get(name) for name in (AppConstants.MODEL_WEIGHTS, PERSONALIZED, SELECTOR)}
        return {
            "update": data[AppConstants.MODEL_WEIGHTS].data
            if isinstance(data[AppConstants.MODEL_WEIGHTS], DXO)
            else {},
            "personalized": data[PERSONALIZED].data if isinstance(data[PERSONALIZED], DXO) else {},
            "selector": data[SELECTOR].data if isinstance(data[SELECTOR], DXO) else {},
            "steps": dxo.get_meta_prop(MetaKey.NUM_STEPS_CURRENT_ROUND),
        }

    def assemble(self, data: Dict[str, dict], fl_ctx: FLContext) -> DXO:
        rejected = {}
        for site, entry in data.items():  # the personalized and selector differences must be complete and finite
            selector = entry["selector"] or {}
            parts = [("personalized", entry["personalized"])]
            parts += [(f"selector {key}", selector.get(key)) for key in ("weights", "exp_avg", "exp_avg_sq")]
            for label, tensors in parts:
                if not tensors or not isinstance(tensors, dict):
                    problem = f"sent no FedSM {label}"
                else:
                    bad = find_bad_tensor(tensors)
                    problem = bad and f"{label}: {bad}"
                if problem:
                    rejected[site] = problem
                    break
        complete = {site: entry["update"] for site, entry in data.items() if site not in rejected}
        kept, screened = screen_updates(complete, self.norm_k)
        kept, site_weights = self.decide(data, kept, {**rejected, **screened}, fl_ctx)
        if not kept:  # every model stays
            return DXO(
                data_kind=DataKind.COLLECTION, data={AppConstants.MODEL_WEIGHTS: DXO(DataKind.WEIGHT_DIFF, data={})}
            )
        weights = combine_updates(
            {s: data[s]["update"] for s in kept}, site_weights, self.aggregation, self.trim_fraction
        )
        return DXO(
            data_kind=DataKind.COLLECTION,
            data={
                AppConstants.MODEL_WEIGHTS: DXO(data_kind=DataKind.WEIGHT_DIFF, data=weights),
                PERSONALIZED: DXO(
                    data_kind=DataKind.WEIGHT_DIFF, data=flat({s: data[s]["personalized"] for s in kept})
                ),
                SELECTOR: DXO(
                    data_kind=DataKind.COLLECTION, data=average_selector({s: data[s]["selector"] for s in kept})
                ),
            },
        )
