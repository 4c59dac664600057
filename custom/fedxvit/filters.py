"""Server-side guard on `train` results: a broken or poisoned update never reaches the aggregator.

One NaN in one site's update would make the FedAvg sum, and so the global model, NaN for
everyone. The filter checks every tensor (finite, known name, same shape as the global
model) and, on the first problem, replaces the result with an error reply carrying the reason;
ScatterAndGather then drops that site's contribution for the round (the job goes on while at
least `min_clients` sites remain) and the aggregate stays finite.
"""

from __future__ import annotations

import numpy as np

from nvflare.apis.dxo import DataKind, from_shareable
from nvflare.apis.filter import Filter
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable, make_reply
from nvflare.app_common.abstract.model import ModelLearnableKey
from nvflare.app_common.app_constant import AppConstants

CHECKED_KINDS = (DataKind.WEIGHT_DIFF, DataKind.WEIGHTS)
REJECT_REASON_HEADER = "fedxvit_reject_reason"  # on the error reply, for the round's log and tracking


def _as_array(value) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().float().numpy()
    return np.asarray(value)


def find_bad_tensor(update: dict, reference: dict | None = None) -> str | None:
    """Why the update is unsafe to aggregate ('<name>: ...'), or None when every tensor is fine.

    `reference` is the global model (name -> array); without it only finiteness is checked.
    """
    for name, value in update.items():
        array = _as_array(value)
        if reference is not None:
            if name not in reference:
                return f"{name}: not a tensor of the global model"
            expected = tuple(np.shape(reference[name]))
            if tuple(array.shape) != expected:
                return f"{name}: shape {tuple(array.shape)} != global {expected}"
        if not np.issubdtype(array.dtype, np.number):
            return f"{name}: dtype {array.dtype} is not numeric"
        if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
            bad = "NaN" if np.isnan(array).any() else "Inf"
            return f"{name}: holds {bad} ({int((~np.isfinite(array)).sum())} of {array.size} values)"
    return None


class RejectBadUpdates(Filter):
    """task_result_filter for `train`: passes good updates unchanged, turns bad ones into an error reply."""

    def __init__(self, reject_return_code: str = ReturnCode.EXECUTION_RESULT_ERROR):
        super().__init__()
        self.reject_return_code = reject_return_code

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        if shareable.get_return_code(ReturnCode.OK) != ReturnCode.OK:
            return shareable  # already a failure; nothing to aggregate
        try:
            dxo = from_shareable(shareable)
        except ValueError:
            return shareable  # not a DXO: not ours to judge
        if dxo.data_kind not in CHECKED_KINDS or not dxo.data:
            return shareable
        reference = None
        global_model = fl_ctx.get_prop(AppConstants.GLOBAL_MODEL)
        if global_model:
            reference = global_model.get(ModelLearnableKey.WEIGHTS)
        problem = find_bad_tensor(dxo.data, reference)
        if problem is None:
            return shareable
        peer = fl_ctx.get_peer_context()
        site = peer.get_identity_name(default="?") if peer else "?"
        self.log_error(fl_ctx, f"fedxvit: rejected {dxo.data_kind} update from {site}: {problem}")
        reply = make_reply(self.reject_return_code)
        reply.set_header(REJECT_REASON_HEADER, f"rejected by the update filter: {problem}")
        return reply
