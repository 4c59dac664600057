"""Only the trainable tensors go down to a site that already holds the frozen ones.

A site sends back only the tensors it trains (`last-k`: the last ViT blocks, the norm and the head), yet the
server's workflows send it the whole model with every task. This is the server's half of a small protocol on
NVFlare's public parts (the names both halves use are in fedxvit.protocol):

- The site (fedxvit.frozen_tensors, in the executor) keeps the frozen tensors of the last whole model it received and
  publishes, as a public sticky FLContext property (HELD_PROP), the names it trains and a fingerprint of what it
  keeps. NVFlare sends a site's public properties with every task request.
- The server's task-data filter (`TrainableOnlyDownlink`) reads that property from the requesting site's peer
  context. When the task's model holds exactly those frozen tensors (same fingerprint), it sends only the others
  and names the fingerprint in the model DXO's meta (FROZEN_META). Otherwise the whole model goes: a site's
  first task, a site that joins late or comes back after a restart (it holds nothing), a model whose frozen
  tensors differ.
- The site fills in what it keeps after checking the fingerprint. A mismatch refuses the task with one line and
  drops what the site kept, so its next request gets the whole model again.

Encrypted models (the HE job) go whole: that job already encrypts only the trainable tensors. The server's
global model, its checkpoints and cross-site evaluation are untouched: only what a task carries to a site changes.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.filter import Filter
from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import ReservedHeaderKey, Shareable, make_copy
from nvflare.app_common.app_constant import AppConstants

from fedxvit.protocol import FROZEN_META, HELD_PROP, fingerprint, in_clear, model_part

DOWNLINK_FILE = "downlink_sizes.json"  # in the server's run folder: what each task carried to each site


def append_run_record(fl_ctx: FLContext, file_name: str, key: str, row: dict, lock: threading.Lock) -> None:
    """Append `row` to the list `key` of <the job's run folder>/<file_name> (a JSON record a filter keeps)."""
    run_dir = Path(fl_ctx.get_engine().get_workspace().get_run_dir(fl_ctx.get_job_id()))
    with lock:
        path = run_dir / file_name
        rows = json.loads(path.read_text())[key] if path.is_file() else []
        path.write_text(json.dumps({key: [*rows, row]}, indent=1) + "\n")


def _nbytes(weights: dict) -> int:
    return sum(int(value.nbytes) for value in weights.values() if isinstance(value, np.ndarray))


class TrainableOnlyDownlink(Filter):
    """Server task_data_filter (train, validate, evaluate): leaves out the frozen tensors a site already holds, and
    records what each task carried in <run folder>/downlink_sizes.json."""

    def __init__(self):
        super().__init__()
        self._lock = threading.Lock()
        # (the task's weights, frozen names, fingerprint) of the last task: every site gets a copy of one broadcast
        # that shares its weights, so a big model is hashed once per task, not once per site
        self._last = None

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        try:
            dxo = from_shareable(shareable)
        except ValueError:
            return shareable  # a task without a model
        weights = model_part(dxo)
        if weights is None:
            return shareable
        peer = fl_ctx.get_peer_context()
        held = peer.get_prop(HELD_PROP) if peer else None
        site = peer.get_identity_name(default="?") if peer else "?"
        out, kept = shareable, {}
        if isinstance(held, dict) and in_clear(weights.data):
            trainable = set(held.get("trainable") or ())
            frozen = {name: value for name, value in weights.data.items() if name not in trainable}
            if frozen and self._fingerprint(weights.data, frozen) == held.get("fingerprint"):
                kept = frozen
                sent = DXO(
                    DataKind.WEIGHTS,
                    data={name: value for name, value in weights.data.items() if name in trainable},
                    meta={**(weights.meta or {}), FROZEN_META: held["fingerprint"]},
                )
                if dxo is not weights:  # a COLLECTION: the other parts travel as they are
                    sent = DXO(DataKind.COLLECTION, data={**dxo.data, AppConstants.MODEL_WEIGHTS: sent}, meta=dxo.meta)
                out = sent.update_shareable(make_copy(shareable))  # the task's data is shared by every site
            elif frozen:
                self.log_info(fl_ctx, f"fedxvit: {site} holds other frozen tensors: the whole model goes")
        self._record(fl_ctx, shareable, site, weights.data, kept)
        return out

    def _fingerprint(self, weights: dict, frozen: dict) -> str:
        names = tuple(sorted(frozen))
        with self._lock:
            if self._last is not None and self._last[0] is weights and self._last[1] == names:
                return self._last[2]
        digest = fingerprint(frozen)
        with self._lock:
            self._last = (weights, names, digest)
        return digest

    def _record(self, fl_ctx: FLContext, task: Shareable, site: str, weights: dict, kept: dict) -> None:
        full_bytes = _nbytes(weights)
        row = {
            "round": task.get_header(AppConstants.CURRENT_ROUND),
            "task": fl_ctx.get_prop(FLContextKey.TASK_NAME) or task.get_header(ReservedHeaderKey.TASK_NAME),
            "site": site,
            "tensors": len(weights) - len(kept),
            "left_out": len(kept),
            "bytes": full_bytes - _nbytes(kept),
            "full_bytes": full_bytes,
        }
        try:
            append_run_record(fl_ctx, DOWNLINK_FILE, "tasks", row, self._lock)
        except (AttributeError, OSError, ValueError, KeyError) as exc:  # a record must never stop the job
            self.log_error(fl_ctx, f"fedxvit: downlink size not recorded: {exc}")
