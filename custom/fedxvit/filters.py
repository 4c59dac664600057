"""Server-side filters on `train` results: a broken or poisoned update never reaches the aggregator
(RejectBadUpdates), and what every update held is recorded (UpdateSizeLog).

One NaN in one site's update would make the FedAvg sum, and so the global model, NaN for
everyone. The filter checks every tensor (finite, known name, same shape as the global
model) and, on the first problem, replaces the result with an error reply carrying the reason;
ScatterAndGather then drops that site's contribution for the round (the job goes on while at
least `min_clients` sites remain) and the aggregate stays finite.

A SCAFFOLD result is a DXO COLLECTION (the weight difference and the control-variate change);
every DXO in it is checked the same way, so a NaN control variate is caught like a NaN weight.

NVFlare's CyclicController stops the whole relay on the first error result, so the cyclic job sets
`on_bad_result: "empty_update"`: a bad update, or a site's failed turn, becomes an empty
WEIGHT_DIFF instead, and the model passes on unchanged to the next site.
"""

from __future__ import annotations

import threading

import numpy as np
from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.filter import Filter
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable, make_reply
from nvflare.app_common.abstract.model import ModelLearnableKey
from nvflare.app_common.app_constant import AppConstants

from fedxvit.downlink import append_run_record
from fedxvit.protocol import REJECT_REASON_HEADER, result_dxo

CHECKED_KINDS = (DataKind.WEIGHT_DIFF, DataKind.WEIGHTS)
ON_BAD_RESULT = ("error", "empty_update")


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


def updates_in(dxo: DXO, label: str = "") -> list[tuple[str, dict]]:
    """(label, tensors) of every update a result carries: the DXO itself, or each DXO of a COLLECTION
    (SCAFFOLD's weights and control variates), labelled '<key>/' so a problem names which one."""
    if dxo.data_kind == DataKind.COLLECTION:
        return [
            found
            for key, part in (dxo.data or {}).items()
            if isinstance(part, DXO)
            for found in updates_in(part, f"{label}{key}/")
        ]
    return [(label, dxo.data)] if dxo.data_kind in CHECKED_KINDS and dxo.data else []


def find_bad_update(dxo: DXO, reference: dict | None = None) -> str | None:
    """find_bad_tensor over every update in the DXO (control variates share the global model's names and shapes)."""
    for label, update in updates_in(dxo):
        problem = find_bad_tensor(update, reference)
        if problem is not None:
            return label + problem
    return None


class RejectBadUpdates(Filter):
    """task_result_filter for `train`: passes good updates unchanged, turns bad ones into an error reply
    (`on_bad_result: "error"`) or, for the cyclic relay, into an empty update (`"empty_update"`)."""

    def __init__(self, reject_return_code: str = ReturnCode.EXECUTION_RESULT_ERROR, on_bad_result: str = "error"):
        super().__init__()
        if on_bad_result not in ON_BAD_RESULT:
            raise ValueError(
                f"RejectBadUpdates option on_bad_result='{on_bad_result}' is unknown; choose one of "
                f"{', '.join(ON_BAD_RESULT)}"
            )
        self.reject_return_code = reject_return_code
        self.on_bad_result = on_bad_result

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        code = shareable.get_return_code(ReturnCode.OK)
        if code != ReturnCode.OK:  # already a failure; nothing to aggregate
            if self.on_bad_result == "empty_update":
                return self._empty_update(f"the site returned {code}", fl_ctx)
            return shareable
        try:
            dxo = from_shareable(shareable)
        except ValueError:
            return shareable  # not a DXO: not ours to judge
        reference = None
        global_model = fl_ctx.get_prop(AppConstants.GLOBAL_MODEL)
        if global_model:
            reference = global_model.get(ModelLearnableKey.WEIGHTS)
        problem = find_bad_update(dxo, reference)
        if problem is None:
            return shareable
        self.log_error(fl_ctx, f"fedxvit: rejected {dxo.data_kind} update from {_site(fl_ctx)}: {problem}")
        if self.on_bad_result == "empty_update":
            return self._empty_update(f"rejected by the update filter: {problem}", fl_ctx)
        reply = make_reply(self.reject_return_code)
        reply.set_header(REJECT_REASON_HEADER, f"rejected by the update filter: {problem}")
        return reply

    def _empty_update(self, reason: str, fl_ctx: FLContext) -> Shareable:
        """An OK reply that changes nothing: the cyclic relay goes on with the model as it was."""
        self.log_warning(fl_ctx, f"fedxvit: {_site(fl_ctx)}'s turn changes nothing: {reason}")
        reply = DXO(data_kind=DataKind.WEIGHT_DIFF, data={}).to_shareable()
        reply.set_header(REJECT_REASON_HEADER, reason)
        return reply


# ---- what each site sent: sizes and encryption, per round

UPDATE_SIZES_FILE = "update_sizes.json"  # in the server's run folder


def update_size(update: dict) -> dict:
    """{"tensors", "encrypted", "in_clear", "values", "bytes"} of one update as the server received it: an
    encrypted tensor (a TenSEAL CKKS vector, or its serialized bytes) counts its ciphertext's bytes, a
    clear one its array's."""
    sizes = {"tensors": 0, "encrypted": 0, "in_clear": 0, "values": 0, "bytes": 0}
    for value in update.values():
        sizes["tensors"] += 1
        if isinstance(value, (bytes, bytearray)) or hasattr(value, "serialize"):
            payload = value if isinstance(value, (bytes, bytearray)) else value.serialize()
            sizes["encrypted"] += 1
            sizes["values"] += int(value.size()) if hasattr(value, "size") and callable(value.size) else 0
            sizes["bytes"] += len(payload)
        else:
            array = _as_array(value)
            sizes["in_clear"] += 1
            sizes["values"] += int(array.size)
            sizes["bytes"] += int(array.nbytes)
    return sizes


class UpdateSizeLog(Filter):
    """Server task_result_filter for `train`: logs and records what each site's update holds when it
    arrives (tensors encrypted or in clear, bytes), per round, in <run folder>/update_sizes.json. The
    result passes unchanged. It shows a privacy officer that the server received ciphertext only (the HE
    job) and an operator what a round costs in bandwidth."""

    def __init__(self):
        super().__init__()
        self._lock = threading.Lock()

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        dxo = result_dxo(shareable)
        if dxo is None:
            return shareable
        sizes = {"tensors": 0, "encrypted": 0, "in_clear": 0, "values": 0, "bytes": 0}
        for _, update in updates_in(dxo):
            for key, value in update_size(update).items():
                sizes[key] += value
        round_number = shareable.get_header(AppConstants.CURRENT_ROUND, fl_ctx.get_prop(AppConstants.CURRENT_ROUND))
        row = {"round": round_number, "site": _site(fl_ctx), **sizes}
        self.log_info(
            fl_ctx,
            f"fedxvit: update from {row['site']} (round {round_number}): {sizes['tensors']} tensors, "
            f"{sizes['encrypted']} encrypted, {sizes['in_clear']} in clear, {sizes['bytes'] / 1e6:.3f} MB",
        )
        try:
            append_run_record(fl_ctx, UPDATE_SIZES_FILE, "updates", row, self._lock)
        except (OSError, ValueError, KeyError) as exc:  # a record that cannot be written must not stop the job
            self.log_error(fl_ctx, f"fedxvit: update size not recorded: {exc}")
        return shareable


def _site(fl_ctx: FLContext) -> str:
    peer = fl_ctx.get_peer_context()
    return peer.get_identity_name(default="?") if peer else "?"
