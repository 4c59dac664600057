"""What a site and the server exchange, named once: meta keys, headers, the site's public property, tracked
metric names, and the two readers of a task's payload both sides need. Both sides import this module; no site
module imports a server module, no server module a site module (fedxvit/__init__.py lists the roles)."""

from __future__ import annotations

import hashlib

import numpy as np
from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.shareable import Shareable
from nvflare.app_common.app_constant import AppConstants

# ---- in a task result's meta or headers
MAS_FACTOR, MAS_PRIOR = "mas_factor", "mas_prior_sha256"  # what fedxvit.executor puts in a train result's meta
REJECT_REASON_HEADER = "fedxvit_reject_reason"  # on the error reply, for the round's log and tracking
SEED_HEADER = "fedxvit_bootstrap_seed"  # evaluation task header: the server's seed; absent: no replicates
REPLICATES_HEADER = "fedxvit_bootstrap_replicates"  # evaluation task header: how many replicates a site returns
SCORE_BINS = 20  # a site's probability histograms (fedxvit.site_scores): ROC-AUC exact up to ties within a bin

# ---- the trainable-only downlink (fedxvit.downlink on the server, fedxvit.frozen_tensors at a site)
HELD_PROP = "fedxvit.frozen_tensors_held"  # the site's public sticky property: {"trainable": [...], "fingerprint"}
FROZEN_META = "fedxvit_frozen_fingerprint"  # on a model DXO that left out the frozen tensors the site holds


def fingerprint(tensors: dict) -> str:
    """A digest of tensors by name, dtype, shape and bytes (equal models, equal fingerprints)."""
    digest = hashlib.blake2b(digest_size=16)
    for name in sorted(tensors):
        array = np.ascontiguousarray(np.asarray(tensors[name]))
        digest.update(f"{name}|{array.dtype.str}|{array.shape}|".encode())
        digest.update(array.data)
    return digest.hexdigest()


def model_part(dxo: DXO) -> DXO | None:
    """The WEIGHTS DXO a task carries: the DXO itself, or the model part of a COLLECTION (SCAFFOLD's weights and
    control variates, FedSM's models); None when there is none."""
    if dxo.data_kind == DataKind.COLLECTION:
        dxo = (dxo.data or {}).get(AppConstants.MODEL_WEIGHTS)
    return dxo if isinstance(dxo, DXO) and dxo.data_kind == DataKind.WEIGHTS and dxo.data else None


def in_clear(weights: dict) -> bool:
    """Every tensor a plain array (not an HE ciphertext): only such tensors can be fingerprinted and left out."""
    return all(isinstance(value, np.ndarray) for value in weights.values())


def result_dxo(shareable: Shareable) -> DXO | None:
    """The DXO of a successful result; None for an error reply or a result that carries no DXO (not a filter's)."""
    if shareable.get_return_code(ReturnCode.OK) != ReturnCode.OK:
        return None
    try:
        return from_shareable(shareable)
    except ValueError:
        return None


# ---- the Flower app (fedxvit.flower_client, fedxvit.flower_server)
FLOWER_SITE_RECORD = "site"  # a reply's ConfigRecord {"name": <site>}: whose metrics the server tracks
FLOWER_NVFLARE_TRACKING = "nvflare"  # run config `tracking`: sites send metrics as NVFlare analytics events

# ---- What the federated job tracks (step = round number), the one place these names are spelled:
# tracked name -> (where the value comes from, its key there). Result scripts and tests read the tuples.
_SITE_ROUND = {
    "train_loss": ("train", "train_loss"),
    "train_accuracy": ("train", "train_accuracy"),
    "local_val_accuracy": ("train", "local_val_accuracy"),
    "local_val_loss": ("train", "local_val_loss"),
    "global_model_val_accuracy": ("global", "val_accuracy"),
    "global_model_val_loss": ("global", "val_loss"),
}
_SITE_EPOCH = {"epoch_train_loss": "loss", "epoch_train_accuracy": "accuracy"}  # step = round x local_epochs + epoch
_SERVER_ROUND = {
    "global_val_accuracy": "global_val_accuracy",
    "global_val_loss": "global_val_loss",
    "clients_per_round": "num_sites",
}
SITE_ROUND_METRICS = tuple(_SITE_ROUND)
SITE_EPOCH_METRICS = tuple(_SITE_EPOCH)
SERVER_ROUND_METRICS = tuple(_SERVER_ROUND)
AGGREGATED_METRIC_PREFIX = "aggregated."  # server metric aggregated.<site>: 1 = in the round's model, 0 = dropped
WEIGHT_METRIC_PREFIX = "aggregation_weight."  # server metric aggregation_weight.<site>: its share of the mean


def site_round_metrics(global_scores: dict, train_metrics: dict) -> dict:
    """A site's metrics for one round: its score of the received global model, its training and local validation."""
    sources = {"train": train_metrics, "global": global_scores}
    return {name: sources[source][key] for name, (source, key) in _SITE_ROUND.items()}


def site_epoch_metrics(epoch_metrics: dict) -> dict:
    """A site's training loss/accuracy of one local epoch (fedxvit.training.train_epoch's result)."""
    return {name: epoch_metrics[key] for name, key in _SITE_EPOCH.items()}


def server_round_metrics(row: dict) -> dict:
    """The server's metrics for one round from a GlobalValidationTracker row; `aggregated.<site>` is 1
    when that site's update went into the round's model, 0 when it was dropped; `aggregation_weight.<site>`
    its share of the round's mean (steps or MAS weights)."""
    taking_part = {
        **{site: 0.0 for site in row.get("dropped_sites", {})},
        **{site: 1.0 for site in row.get("aggregated_sites", [])},
    }
    return {
        **{name: row[key] for name, key in _SERVER_ROUND.items()},
        **{f"{AGGREGATED_METRIC_PREFIX}{site}": flag for site, flag in sorted(taking_part.items())},
        **{f"{WEIGHT_METRIC_PREFIX}{site}": float(w) for site, w in sorted(row.get("aggregation_weights", {}).items())},
    }
