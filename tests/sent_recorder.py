"""What a site sends, recorded at the site as it leaves: a test's witness for the privacy jobs' promises.

`RecordSent` is the last task_result_filter on every task (train, validate, submit_model): it writes
one JSON line per result to <site app folder>/sent.jsonl (tensors by name with their values and the
non-zero ones, the DXO meta, the serialized bytes) and passes the result on unchanged. As a client
component it also records every analytics event (the metrics streamed to the server), the other
channel out of a site. `add_recorder` puts both in a client config; `read_sent` reads a run's lines.
"""

import json
import threading
from pathlib import Path

import numpy as np
from nvflare.apis.dxo import DXO, from_shareable
from nvflare.apis.filter import Filter
from nvflare.apis.fl_constant import FLContextKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable

from tooling.standalone import serialized_size

SENT_FILE = "sent.jsonl"
ANALYTICS_EVENT = "analytix_log_stats"
TASKS = ["train", "validate", "submit_model"]
_lock = threading.Lock()


def _plain(value):
    """A JSON-safe copy of DXO meta (numbers, strings, dicts, lists)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (np.generic,)):
        return value.item()
    return value if isinstance(value, (int, float, str, bool, type(None))) else repr(value)


def describe(dxo: DXO) -> dict:
    """kind, meta and every tensor {name: [values, non-zero values]} of a DXO; a COLLECTION's parts by key."""
    row = {"kind": dxo.data_kind, "meta": _plain(dxo.meta or {})}
    if isinstance(dxo.data, dict) and any(isinstance(v, DXO) for v in dxo.data.values()):
        row["parts"] = {key: describe(part) for key, part in dxo.data.items() if isinstance(part, DXO)}
        return row
    tensors, scalars = {}, {}
    for name, value in (dxo.data or {}).items():
        array = np.asarray(value)
        if array.ndim == 0 and not isinstance(value, np.ndarray):
            scalars[name] = _plain(value)
        else:
            tensors[name] = [int(array.size), int(np.count_nonzero(array))]
    row["tensors"], row["scalars"] = tensors, scalars
    return row


def _write(fl_ctx: FLContext, row: dict) -> None:
    path = Path(fl_ctx.get_prop(FLContextKey.APP_ROOT)) / SENT_FILE
    with _lock, open(path, "a") as out:
        out.write(json.dumps({"site": fl_ctx.get_identity_name(), **row}) + "\n")


class RecordSent(Filter):
    """`analytics`: this instance (the component) records the analytics events; NVFlare hands events to every
    filter instance too, so only one records them."""

    def __init__(self, analytics: bool = False):
        super().__init__()
        self.analytics = analytics

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        row = {
            "task": fl_ctx.get_prop(FLContextKey.TASK_NAME),
            "return_code": shareable.get_return_code(ReturnCode.OK),
            "bytes": serialized_size(shareable),
        }
        try:
            row["dxo"] = describe(from_shareable(shareable))
        except ValueError:
            row["dxo"] = None  # a reply without data (an error, an empty result)
        _write(fl_ctx, row)
        return shareable

    def handle_event(self, event_type: str, fl_ctx: FLContext):
        if event_type != ANALYTICS_EVENT or not self.analytics:
            return
        data = fl_ctx.get_prop(FLContextKey.EVENT_DATA)
        if isinstance(data, Shareable):
            try:
                described = describe(from_shareable(data))
            except ValueError:
                described = None
            _write(fl_ctx, {"task": "analytics", "bytes": serialized_size(data), "dxo": described})


def add_recorder(client: dict) -> dict:
    """The client config with RecordSent last in every task's result chain and as a component (analytics)."""
    recorder = {"path": "sent_recorder.RecordSent", "args": {}}
    chains = client.get("task_result_filters", [])
    for chain in chains:
        chain["filters"] = [*chain["filters"], recorder]
    covered = {task for chain in chains for task in chain["tasks"]}
    uncovered = [task for task in TASKS if task not in covered]
    client["task_result_filters"] = [*chains, *([{"tasks": uncovered, "filters": [recorder]}] if uncovered else [])]
    client["components"] = [*client["components"], {"id": "record_sent", **recorder, "args": {"analytics": True}}]
    return client


def read_sent(workspace: Path, site: str) -> list[dict]:
    """Every line a site's RecordSent wrote in a simulator workspace, in order."""
    (path,) = Path(workspace, site).rglob(SENT_FILE)
    return [json.loads(line) for line in path.read_text().splitlines()]


class RecordUpdates(Filter):
    """Each `train` result's arrays and reported steps, saved as <site app folder>/updates/<k>.npz (k counts the
    site's train tasks, so k is the round when the site trains every round): the exact-aggregate check's witness."""

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        from nvflare.apis.dxo import MetaKey

        if fl_ctx.get_prop(FLContextKey.TASK_NAME) != "train":
            return shareable
        dxo = from_shareable(shareable)
        folder = Path(fl_ctx.get_prop(FLContextKey.APP_ROOT)) / "updates"
        folder.mkdir(exist_ok=True)
        steps = dxo.get_meta_prop(MetaKey.NUM_STEPS_CURRENT_ROUND)
        arrays = {name: np.asarray(value) for name, value in dxo.data.items()}
        np.savez(folder / f"{len(list(folder.glob('*.npz')))}.npz", __steps__=np.asarray(steps), **arrays)
        return shareable


def read_updates(workspace: Path, site: str) -> list[tuple[float, dict]]:
    """(steps, {name: array}) of every train result a site's RecordUpdates saved, in order."""
    (folder,) = [path for path in Path(workspace, site).rglob("updates") if path.is_dir()]
    saved = []
    for k in range(len(list(folder.glob("*.npz")))):
        with np.load(folder / f"{k}.npz") as arrays:
            saved.append((float(arrays["__steps__"]), {n: arrays[n] for n in arrays.files if n != "__steps__"}))
    return saved


def add_update_recorder(client: dict) -> dict:
    """The client config with RecordUpdates last in the chain of results that holds `train`."""
    recorder = {"path": "sent_recorder.RecordUpdates", "args": {}}
    chains = client.setdefault("task_result_filters", [])
    chain = next((chain for chain in chains if "train" in chain["tasks"]), None)
    if chain is None:
        chains.append({"tasks": ["train"], "filters": [recorder]})
    else:
        chain["filters"] = [*chain["filters"], recorder]
    return client
