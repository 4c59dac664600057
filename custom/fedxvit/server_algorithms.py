"""The server-side pieces the FedOpt, SCAFFOLD and FedSM jobs add to NVFlare's stock components.

FedOpt (NVFlare's PTFedOptModelShareableGenerator) steps a torch model on the server with a
torch optimizer and returns that model's state as the new global model, so the torch model must
hold the current global weights before each step. NVFlare's PT persistor loads the initial
checkpoint into the global model, not into that torch model; `ServerModelSync` copies the global
weights into it right before every step (round 0: the transplanted initial model). The model is
kept between rounds, so the optimizer's momentum is too.

SCAFFOLD (NVFlare's ScatterAndGatherScaffold) receives from every site a DXO COLLECTION of the
weight difference and the control-variate change and expects one COLLECTION of both, combined,
back from the aggregator. `ScaffoldScreenedAssembler` gives that to NVFlare's
CollectAndAssembleAggregator with the same safeguards as the FedAvg job: a site whose weight
difference *or* control-variate change is over `norm_k` x the median of the other sites' is
dropped, and both are combined by the job's `aggregation`, a mean with the same bounded step weights
(`max_weight_ratio`, fedxvit.aggregation.bound_weights).

FedSM (fedxvit.fedsm holds its models and arithmetic) keeps ScatterAndGather: `FedSMShareableGenerator` holds the
personalized models and the selector between rounds and rebuilds them from the sites' differences, `FedSMSiteModels`
sends each site only its own SoftPull aggregate, and `FedSMAssembler` screens and combines the three parts.
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
from nvflare.app_common.app_constant import AlgorithmConstants, AppConstants
from nvflare.app_common.app_event_type import AppEventType
from nvflare.app_common.shareablegenerators.full_model_shareable_generator import FullModelShareableGenerator
from nvflare.widgets.widget import Widget
from torch import nn

from fedxvit.aggregation import ScreenedAssembler, combine_updates, screen_updates, update_norm
from fedxvit.errors import FedXViTError
from fedxvit.fedsm import MODELS_FILE, PERSONALIZED, SELECTOR, SITES, added, flat, initial_selector_head, nested
from fedxvit.filters import find_bad_tensor

CONTROLS_MISSING = "sent no SCAFFOLD control-variate change"


def load_global_weights(model: nn.Module, weights: dict) -> None:
    """Copy the global model's weights (numpy arrays or tensors) into `model` in place, so an optimizer
    that holds its parameters keeps them (and its momentum)."""
    own = model.state_dict()
    missing = sorted(set(own) - set(weights))
    if missing:
        raise FedXViTError(
            f"the global model lacks {len(missing)} tensors of the server's FedOpt model "
            f"(first: {missing[0]}): the job's preset differs from the initial model's"
        )
    with torch.no_grad():
        for name, tensor in own.items():
            tensor.copy_(torch.as_tensor(np.asarray(weights[name])))


class ServerModelSync(Widget):
    """Before each global update, copies the global weights into the torch model FedOpt steps (component `model_id`)."""

    def __init__(self, model_id: str = "server_model"):
        super().__init__()
        self.model_id = model_id

    def handle_event(self, event_type: str, fl_ctx: FLContext):
        if event_type != AppEventType.BEFORE_SHAREABLE_TO_LEARNABLE:
            return
        model = fl_ctx.get_engine().get_component(self.model_id)
        global_model = fl_ctx.get_prop(AppConstants.GLOBAL_MODEL)
        if not isinstance(model, nn.Module) or not global_model:
            self.system_panic(
                f"fedxvit: FedOpt needs the torch model component '{self.model_id}' and a global model", fl_ctx
            )
            return
        try:
            load_global_weights(model, global_model[ModelLearnableKey.WEIGHTS])
        except FedXViTError as exc:
            self.system_panic(f"fedxvit: {exc}", fl_ctx)


def screen_scaffold_updates(updates: Dict[str, dict], controls: Dict[str, dict], norm_k: float) -> tuple[list, dict]:
    """(kept sites, {dropped site: reason}): a site is dropped when it sent no control-variate change, or
    when its weight difference or its control-variate change fails fedxvit.aggregation.screen_updates."""
    rejected = {site: CONTROLS_MISSING for site in updates if not controls.get(site)}
    complete = [site for site in updates if site not in rejected]
    _, weight_rejected = screen_updates({s: updates[s] for s in complete}, norm_k)
    _, control_rejected = screen_updates({s: controls[s] for s in complete}, norm_k)
    rejected.update({site: f"control variates: {reason}" for site, reason in control_rejected.items()})
    rejected.update(weight_rejected)
    return [site for site in sorted(updates) if site not in rejected], rejected


class CollectionAssembler(ScreenedAssembler):
    """A ScreenedAssembler of results that are DXO COLLECTIONs (SCAFFOLD's, FedSM's): same settings as FedAvg's."""

    def __init__(
        self,
        aggregation: str = "mean",
        norm_k: float = 10.0,
        trim_fraction: float = 0.2,
        max_weight_ratio: float = 4.0,
        data_kind: str = DataKind.COLLECTION,
    ):
        if data_kind != DataKind.COLLECTION:
            raise FedXViTError(f"job option data_kind='{data_kind}': this assembler takes COLLECTION results only")
        super().__init__(aggregation, norm_k, trim_fraction, data_kind=data_kind, max_weight_ratio=max_weight_ratio)


class ScaffoldScreenedAssembler(CollectionAssembler):
    """ScreenedAssembler for ScatterAndGatherScaffold: screens and combines weights and control variates together."""

    def get_model_params(self, dxo: DXO) -> dict:
        parts = dxo.data or {}
        weights, controls = parts.get(AppConstants.MODEL_WEIGHTS), parts.get(AlgorithmConstants.SCAFFOLD_CTRL_DIFF)
        return {
            "update": weights.data if isinstance(weights, DXO) else {},
            "controls": controls.data if isinstance(controls, DXO) else {},
            "steps": dxo.get_meta_prop(MetaKey.NUM_STEPS_CURRENT_ROUND),
        }

    def assemble(self, data: Dict[str, dict], fl_ctx: FLContext) -> DXO:
        updates = {site: entry["update"] for site, entry in data.items()}
        controls = {site: entry["controls"] for site, entry in data.items()}
        kept, site_weights = self.decide(data, *screen_scaffold_updates(updates, controls, self.norm_k), fl_ctx)
        round_number = fl_ctx.get_prop(AppConstants.CURRENT_ROUND)
        if not kept:  # the global model and controls stay as they are
            weights, control_change = {}, {}
        else:
            weights = combine_updates({s: updates[s] for s in kept}, site_weights, self.aggregation, self.trim_fraction)
            control_change = combine_updates(
                {s: controls[s] for s in kept}, site_weights, self.aggregation, self.trim_fraction
            )
            self.log_info(
                fl_ctx,
                f"fedxvit: round {round_number}: SCAFFOLD control variates of {', '.join(kept)} "
                f"combined; global control change norm {update_norm(control_change):.4g}",
            )
        return DXO(
            data_kind=DataKind.COLLECTION,
            data={
                AppConstants.MODEL_WEIGHTS: DXO(data_kind=DataKind.WEIGHT_DIFF, data=weights),
                AlgorithmConstants.SCAFFOLD_CTRL_DIFF: DXO(data_kind=DataKind.WEIGHT_DIFF, data=control_change),
            },
        )


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


class FedSMAssembler(CollectionAssembler):
    """For NVFlare's CollectAndAssembleAggregator: the global weight differences screened and combined as in
    the FedAvg job (bounded step weights); the personalized-model differences of the kept sites passed on per
    site (the generator soft-pulls them); the selector's weight and Adam-moment differences averaged (unweighted).
    A site whose personalized or selector difference is missing or not finite is dropped like a bad update."""

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
