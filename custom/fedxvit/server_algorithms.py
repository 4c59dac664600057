"""The server-side pieces the FedOpt and SCAFFOLD jobs add to NVFlare's stock components.

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
"""

from __future__ import annotations

from typing import Dict

import numpy as np
import torch
from nvflare.apis.dxo import DXO, DataKind, MetaKey
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.abstract.model import ModelLearnableKey
from nvflare.app_common.app_constant import AlgorithmConstants, AppConstants
from nvflare.app_common.app_event_type import AppEventType
from nvflare.widgets.widget import Widget
from torch import nn

from fedxvit.aggregation import ScreenedAssembler, combine_updates, screen_updates, update_norm
from fedxvit.errors import FedXViTError

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


class ScaffoldScreenedAssembler(ScreenedAssembler):
    """ScreenedAssembler for ScatterAndGatherScaffold: screens and combines weights and control variates together."""

    def __init__(
        self, aggregation: str = "mean", norm_k: float = 10.0, trim_fraction: float = 0.2, max_weight_ratio: float = 4.0
    ):
        super().__init__(
            aggregation, norm_k, trim_fraction, data_kind=DataKind.COLLECTION, max_weight_ratio=max_weight_ratio
        )

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
