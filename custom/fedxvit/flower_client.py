"""A hospital in the Flower app (fedxvit/flower_app): Flower's ClientApp over fedxvit's own site code.

Nothing of the training is copied: the site finds its data as the NVFlare client does (fedxvit.sites:
FEDXVIT_DATA_<SITE>, FEDXVIT_DATA_ROOT/<site>, else the checkout's data/<site>), builds the preset's model with
the freeze policy and runs fedxvit.training's loop and scores. Which site a node is: NVFlare names each SuperNode
after its client (node config `client-name`); in Flower's simulation node i is site i of the run config's `sites`.

A train reply carries only the trainable tensors (the server's TrainableFedAvg merges them into the whole model)
and weighs by the site's training images (`num-examples`, Flower's FedAvg key). With run config `tracking` =
"nvflare", the site's per-round metrics travel as NVFlare analytics events to the server's receivers, as in
jobs/fedxvit; otherwise they ride in the reply and the ServerApp tracks them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedxvit.classes import task_classes
from fedxvit.data import make_loader
from fedxvit.errors import FedXViTError
from fedxvit.executor import resolve_torch_threads
from fedxvit.model import build_model
from fedxvit.protocol import FLOWER_NVFLARE_TRACKING, FLOWER_SITE_RECORD, site_round_metrics
from fedxvit.sites import site_data_dir
from fedxvit.training import (
    apply_freeze_policy,
    evaluate,
    make_optimizer,
    resolve_device,
    seed_everything,
    shared_state_keys,
    train_epoch,
)

client_app = ClientApp()


def site_name(context: Context) -> str:
    """NVFlare's client name for this SuperNode, else site `partition-id` of the run config's `sites`."""
    if context.node_config.get("client-name"):
        return str(context.node_config["client-name"])
    sites = [s.strip() for s in str(context.run_config.get("sites", "")).split(",") if s.strip()]
    partition = int(context.node_config.get("partition-id", -1))
    if not 0 <= partition < len(sites):
        raise FedXViTError(
            f"Flower node {partition} of {context.node_config.get('num-partitions', '?')} has no site: the run "
            f"config's sites ({','.join(sites) or 'none'}) name one site per simulated node"
        )
    return sites[partition]


@dataclass
class Site:
    """One hospital's model and data for one message. Built afresh for each message, as an NVFlare SuperNode runs
    every message in a new process anyway, so a round's training depends only on (seed, round) in either world."""

    name: str
    model: torch.nn.Module
    trainable: list
    data_dir: object
    batch_size: int
    device: torch.device

    def loader(self, split: str, seed: int | None = None):
        train = split == "training"
        size = self.model.preset.image_size
        return make_loader(self.data_dir, split, size, self.batch_size, train=train, seed=seed if train else None)


def open_site(context: Context, seed: int) -> Site:
    config = context.run_config
    name = site_name(context)
    torch.set_num_threads(resolve_torch_threads(config.get("torch-threads", "auto")))
    seed_everything(seed)
    num_classes = int(config["num-classes"])
    data_dir = site_data_dir(name, class_names=task_classes(num_classes))
    model = build_model(str(config["preset"]), num_classes=num_classes)
    trained = apply_freeze_policy(model, str(config["freeze-policy"]), int(config["last-k"]))
    trainable = shared_state_keys(model, trained)
    device = resolve_device()
    return Site(name, model.to(device), trainable, data_dir, int(config["batch-size"]), device)


def load_global(site: Site, msg: Message) -> None:
    state = msg.content["arrays"].to_torch_state_dict()
    missing, unexpected = site.model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise FedXViTError(
            f"site {site.name}: the server's model lacks {len(missing)} and adds {len(unexpected)} tensors of the "
            f"'{site.model.preset.name}' model: server and site presets differ"
        )


def scores(site: Site, val_loader) -> dict:
    result = evaluate(site.model, val_loader, site.device)
    return {
        "val_accuracy": result["accuracy"],
        "val_loss": result["loss"],
        "val_balanced_accuracy": result["balanced_accuracy"],
        "val_count": result["count"],
    }


def reply(msg: Message, site: Site, metrics: dict, arrays: ArrayRecord | None = None) -> Message:
    content = RecordDict({"metrics": MetricRecord(metrics), FLOWER_SITE_RECORD: ConfigRecord({"name": site.name})})
    if arrays is not None:
        content["arrays"] = arrays
    return Message(content=content, reply_to=msg)


def send_to_nvflare(metrics: dict, step: int) -> None:
    """The site's metrics as NVFlare analytics events (nvflare.client.tracking, as the NVFlare executor's writer
    sends them): NVFlare's MetricRelay at this client passes them to the server's TensorBoard and MLflow receivers."""
    from nvflare.client import tracking as nvflare_tracking

    sender = nvflare_tracking.init()
    try:
        writer = nvflare_tracking.MLflowWriter(ctx=sender)
        for tag, value in metrics.items():
            writer.log_metric(tag, value, step=step)
    finally:
        nvflare_tracking.shutdown(sender)


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    """Score the global model, train `local-epochs` on the site's training split, score again; send the
    trainable tensors. Seeded with the run config's seed plus the round."""
    config = context.run_config
    server_round = int(msg.content["config"]["server-round"])
    seed = int(config["seed"]) + server_round
    site = open_site(context, seed)
    load_global(site, msg)
    train_loader, val_loader = site.loader("training", seed), site.loader("validation")
    global_scores = scores(site, val_loader)
    optimizer = make_optimizer(site.model, float(config["learning-rate"]))
    steps, last = 0, {"loss": float("nan"), "accuracy": float("nan")}
    for _ in range(int(config["local-epochs"])):
        last = train_epoch(site.model, train_loader, optimizer, site.device)
        steps += last["steps"]
    local = scores(site, val_loader)
    train_metrics = {
        "train_loss": last["loss"],
        "train_accuracy": last["accuracy"],
        "local_val_accuracy": local["val_accuracy"],
        "local_val_loss": local["val_loss"],
    }
    tracked = site_round_metrics(global_scores, train_metrics)
    if config.get("tracking") == FLOWER_NVFLARE_TRACKING:  # step: the 0-based round, as jobs/fedxvit's sites
        send_to_nvflare(tracked, server_round - 1)
    state = site.model.state_dict()
    arrays = ArrayRecord.from_torch_state_dict({k: state[k] for k in site.trainable})
    metrics = {**tracked, "val_count": global_scores["val_count"], "steps": steps}
    metrics["num-examples"] = len(train_loader.dataset)  # Flower's FedAvg weight
    return reply(msg, site, metrics, arrays)


@client_app.evaluate()
def evaluate_global(msg: Message, context: Context) -> Message:
    """The final global model scored on the site's validation split (every train reply scores the model its
    round started from)."""
    site = open_site(context, int(context.run_config["seed"]))
    load_global(site, msg)
    result = scores(site, site.loader("validation"))
    return reply(msg, site, {**result, "num-examples": result["val_count"]})
