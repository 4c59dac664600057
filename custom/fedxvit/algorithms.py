"""What each federated algorithm changes at a site: a strategy around the executor's one training loop.

- `fedavg`: plain local training (also the sites' part of FedOpt and cyclic weight transfer,
  which change only the server);
- `fedprox`: NVFlare's PTFedProxLoss, mu/2 * ||w - w_global||^2, added to every batch's loss over
  the *trainable* tensors only (frozen ones cannot move, so they would only cost time);
- `scaffold`: NVFlare's PTScaffoldHelper corrects every optimizer step by
  -lr * (c_global - c_local) and, at the end of the round, updates the site's control variate
  c_local; its change travels to the server next to the weight difference;
- `ditto`: FedAvg for the global model, plus a personalized model that never leaves the site,
  trained each round with NVFlare's PTDittoHelper: cross-entropy + lambda/2 * ||v - w_global||^2
  towards the global model the site received (Li et al., ICML 2021);
- `fedsm`: FedAvg for the global model, plus a personalized model and a site selector that travel
  to the server's FedSM components (fedxvit.fedsm, Xu et al., CVPR 2022).

The executor calls `attach(site)` once (the site's data and device, for a strategy that trains a
model of its own), then per `train` task: `start_round(model, optimizer, global_controls)` once the
global weights are loaded and the freeze policy is set, hands `extra_loss` and `after_step` to
fedxvit.training.train_epoch, then `finish_round(should_abort)`, which returns what travels beside
the weight difference (SCAFFOLD's control-variate change, else nothing), and `round_metrics()`,
what the site tracks besides (Ditto's personalized model's validation scores). No NVFlare runtime
is involved: the tests drive the strategies with a plain loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable

import torch
from nvflare.apis.dxo import DXO, DataKind
from nvflare.app_opt.pt.ditto import PTDittoHelper
from nvflare.app_opt.pt.fedproxloss import PTFedProxLoss
from nvflare.app_opt.pt.scaffold import PTScaffoldHelper
from torch import nn

from fedxvit.errors import FedXViTError
from fedxvit.fedsm import (
    PERSONALIZED,
    SELECTOR,
    SITES,
    Relabeled,
    adam_moments,
    build_selector,
    load_adam_moments,
    overlay,
    subtracted,
    trainable_arrays,
)
from fedxvit.methods import SITE_STRATEGIES, jobs_running
from fedxvit.training import evaluate, make_optimizer, train_epoch

PERSONALIZED_MODEL = "best_personalized_model.pt"  # PTDittoHelper's file in the site's app folder


class RoundAborted(Exception):
    """The site was told to stop while a strategy was still working on the round."""


@dataclass
class SiteTraining:
    """What a strategy that trains models of its own needs from the site (Ditto's and FedSM's)."""

    # the job's model with its freeze policy, on the device (num_classes=: another head, FedSM's selector)
    new_model: Callable[..., nn.Module]
    train_loader: Iterable
    val_loader: Iterable
    device: torch.device
    learning_rate: float
    app_dir: Path


def trainable_parameters(model: nn.Module) -> dict:
    return {name: param for name, param in model.named_parameters() if param.requires_grad}


def proximal_pair(model: nn.Module, reference: dict) -> tuple[nn.ParameterList, nn.ParameterList]:
    """The trainable parameters of `model` (live) and their values in `reference` (fixed), in the same
    order: what PTFedProxLoss pairs, so the term covers only what can move."""
    live = trainable_parameters(model)
    fixed = [
        nn.Parameter(reference[name].detach().clone().to(p.device), requires_grad=False) for name, p in live.items()
    ]
    return nn.ParameterList(list(live.values())), nn.ParameterList(fixed)


class FedAvg:
    """Plain local training: no extra loss, no correction, nothing beside the weight difference."""

    name = "fedavg"
    needs_global_controls = False
    task_parts = ()  # the parts of a train task's COLLECTION it reads besides the weights (FedSM's)

    def __init__(self):
        self.model = self.optimizer = None

    def attach(self, site: SiteTraining) -> None:
        pass

    def receive(self, parts: dict, site_name: str) -> None:
        """The train task's parts named in `task_parts` ({name: DXO}), before start_round."""

    def parts(self) -> dict:
        """{name: DXO} that travel beside the weight difference after finish_round (FedSM's models)."""
        return {}

    def start_round(self, model: nn.Module, optimizer: torch.optim.Optimizer, global_controls: dict | None = None):
        self.model, self.optimizer = model, optimizer

    def extra_loss(self) -> torch.Tensor | None:
        return None

    def after_step(self) -> None:
        pass

    def finish_round(self, should_abort: Callable[[], bool] | None = None) -> dict:
        return {}

    def round_metrics(self) -> dict:
        return {}

    def summary(self) -> str:
        return self.name

    def params(self) -> dict:
        """The settings a site's tracking records."""
        return {"algorithm": self.name}


class FedProx(FedAvg):
    """NVFlare's PTFedProxLoss between the trainable tensors and their values at the round's start."""

    name = "fedprox"

    def __init__(self, mu: float = 0.01):
        super().__init__()
        if float(mu) < 0:
            raise FedXViTError(f"job option mu={mu}: FedProx's weight must be >= 0")
        self.mu = float(mu)
        self.loss = PTFedProxLoss(mu=self.mu)
        self.local = self.reference = None
        self.last_term = None

    def start_round(self, model, optimizer, global_controls=None):
        super().start_round(model, optimizer)
        self.local, self.reference = proximal_pair(model, dict(model.named_parameters()))
        self.last_term = None

    def extra_loss(self) -> torch.Tensor:
        self.last_term = self.loss(self.local, self.reference)
        return self.last_term

    def summary(self) -> str:
        term = "n/a" if self.last_term is None else f"{float(torch.as_tensor(self.last_term).detach()):.3g}"
        return f"fedprox mu={self.mu:g}, last proximal term {term}"

    def params(self) -> dict:
        return {"algorithm": self.name, "mu": self.mu}


class _StateDictOf:
    """What PTScaffoldHelper.terms_update reads of the round's start model: its state_dict()."""

    def __init__(self, state: dict):
        self._state = state

    def state_dict(self) -> dict:
        return self._state


def learning_rate(optimizer: torch.optim.Optimizer) -> float:
    """The one learning rate of all parameter groups (SCAFFOLD's correction and update need it)."""
    rates = {group["lr"] for group in optimizer.param_groups}
    if len(rates) != 1:
        raise FedXViTError(f"SCAFFOLD needs one learning rate for all parameter groups, got {sorted(rates)}")
    return rates.pop()


class Scaffold(FedAvg):
    """NVFlare's PTScaffoldHelper: a corrected step after every optimizer step, the control-variate
    change at the end."""

    name = "scaffold"
    needs_global_controls = True

    def __init__(self):
        super().__init__()
        self.helper = PTScaffoldHelper()
        self.c_global = self.c_local = self.round_start = None
        self.delta_norm = None

    def start_round(self, model, optimizer, global_controls=None):
        if not global_controls:
            raise FedXViTError(
                "algorithm 'scaffold' needs the server's global control variates: run it with "
                "NVFlare's ScatterAndGatherScaffold (jobs/fedxvit_scaffold)"
            )
        super().start_round(model, optimizer)
        if self.helper.c_global is None:
            self.helper.init(model)  # c_local starts at zero and then lives at the site across rounds
        try:
            self.helper.load_global_controls(global_controls)
        except RuntimeError as exc:
            raise FedXViTError(f"SCAFFOLD global control variates do not fit this model: {exc}") from None
        self.c_global, self.c_local = self.helper.get_params()
        self.round_start = _StateDictOf({k: p.detach().clone() for k, p in trainable_parameters(model).items()})
        self.delta_norm = None

    def after_step(self) -> None:
        self.helper.model_update(self.model, learning_rate(self.optimizer), self.c_global, self.c_local)

    def finish_round(self, should_abort=None) -> dict:
        """{parameter name: float32 array}: the change of c_local this round, for the trainable tensors."""
        if self.helper.cnt == 0:
            raise FedXViTError("SCAFFOLD: the round made no optimizer step, so there is no control variate to update")
        self.helper.terms_update(
            self.model, learning_rate(self.optimizer), self.c_global, self.c_local, self.round_start
        )
        deltas = self.helper.get_delta_controls()
        self.delta_norm = float(sum(float((d.astype("float64") ** 2).sum()) for d in deltas.values()) ** 0.5)
        return deltas

    def summary(self) -> str:
        norm = "n/a" if self.delta_norm is None else f"{self.delta_norm:.4g}"
        return f"scaffold: control-variate change norm {norm} sent"


class DittoPersonalization(PTDittoHelper):
    """NVFlare's Ditto helper (its proximal loss, model files and best-model bookkeeping) with
    fedxvit's training loop as the task-dependent `local_train`."""

    def local_train(self, train_loader, model_global, abort_signal, writer=None) -> dict:
        """`model_global`: the global weights the site received this round ({name: tensor}).
        `abort_signal`: a callable that is true once the site must stop."""
        live, fixed = proximal_pair(self.model, model_global)
        metrics = {"steps": 0}
        for _ in range(self.model_epochs):
            epoch = train_epoch(
                self.model,
                train_loader,
                self.optimizer,
                self.device,
                should_abort=abort_signal,
                extra_loss=lambda: self.prox_criterion(live, fixed),
            )
            if epoch["aborted"]:
                raise RoundAborted("while training the personalized model")
            metrics = {**epoch, "steps": metrics["steps"] + epoch["steps"]}
            self.epoch_global += 1
        return metrics


class Ditto(FedAvg):
    """FedAvg for the global model; after it, the site's personalized model trains `personal_epochs`
    epochs pulled towards the global model it received (`ditto_lambda`; 0 = local-only training
    started from the first global model). It is kept (and its best by validation balanced accuracy
    saved) at the site, in PTDittoHelper's files, and never sent."""

    name = "ditto"

    def __init__(self, ditto_lambda: float = 0.1, personal_epochs: int = 1):
        super().__init__()
        if float(ditto_lambda) < 0:
            raise FedXViTError(f"job option ditto_lambda={ditto_lambda}: Ditto's weight must be >= 0")
        if int(personal_epochs) < 1:
            raise FedXViTError(f"job option personal_epochs={personal_epochs}: must be at least 1")
        self.ditto_lambda, self.personal_epochs = float(ditto_lambda), int(personal_epochs)
        self.site = self.helper = self.received = None
        self.metrics = {}

    def attach(self, site: SiteTraining) -> None:
        self.site = site
        personal = site.new_model()
        self.helper = DittoPersonalization(
            nn.CrossEntropyLoss(),  # the helper insists on a criterion; fedxvit's loop uses the same loss
            personal,
            make_optimizer(personal, site.learning_rate),
            site.device,
            str(site.app_dir),
            ditto_lambda=self.ditto_lambda,
            model_epochs=self.personal_epochs,
        )

    def start_round(self, model, optimizer, global_controls=None):
        super().start_round(model, optimizer)
        self.received = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.metrics = {}

    def finish_round(self, should_abort=None) -> dict:
        if self.helper is None:
            raise FedXViTError("Ditto needs the site's data: the executor attaches it before the first round")
        self.helper.load_model(self.received)  # the last round's personalized model, or the global one at first
        trained = self.helper.local_train(self.site.train_loader, self.received, should_abort or (lambda: False))
        scores = evaluate(self.helper.model, self.site.val_loader, self.site.device, should_abort=should_abort)
        if scores["aborted"]:
            raise RoundAborted("while scoring the personalized model")
        # the best personalized model by balanced accuracy: by accuracy, a skewed hospital's best would be the
        # model that calls everything its majority class
        self.helper.update_metric_save_model(scores["balanced_accuracy"])
        self.metrics = {
            "personal_train_loss": trained.get("loss", float("nan")),
            "personal_val_accuracy": scores["accuracy"],
            "personal_val_balanced_accuracy": scores["balanced_accuracy"],
            "personal_val_loss": scores["loss"],
        }
        return {}

    def round_metrics(self) -> dict:
        return dict(self.metrics)

    def summary(self) -> str:
        accuracy = self.metrics.get("personal_val_accuracy")
        shown = "n/a" if accuracy is None else f"{accuracy:.4f}"
        return f"ditto lambda={self.ditto_lambda:g}: personalized model val_acc={shown} (kept at the site)"

    def params(self) -> dict:
        return {"algorithm": self.name, "ditto_lambda": self.ditto_lambda, "personal_epochs": self.personal_epochs}


class FedSMSite(FedAvg):
    """FedSM at a site (fedxvit.fedsm): the executor's loop trains the
    global model; finish_round then trains the personalized model and the selector, whose trainable tensors
    (and the selector's Adam moments) travel beside the weight difference (`parts`)."""

    name = "fedsm"
    task_parts = (PERSONALIZED, SELECTOR)

    def __init__(self, personal_epochs: int = 1):
        super().__init__()
        if int(personal_epochs) < 1:
            raise FedXViTError(f"job option personal_epochs={personal_epochs}: must be at least 1")
        self.personal_epochs = int(personal_epochs)
        self.site = self.received = self.sent = self.started_from = None
        self.metrics = {}

    def attach(self, site) -> None:
        self.site = site

    def receive(self, parts: Dict[str, DXO], site_name: str) -> None:
        personal, selector = parts.get(PERSONALIZED), parts.get(SELECTOR)
        sites = list(selector.get_meta_prop(SITES) or []) if isinstance(selector, DXO) else []
        if site_name not in sites:
            raise FedXViTError(f"FedSM: site {site_name} is not among the selector's training sites {sites}")
        self.received = {
            "personalized": dict(personal.data or {}) if isinstance(personal, DXO) else {},
            "selector": dict(selector.data or {}),
            "sites": sites,
            "index": sites.index(site_name),
        }

    def start_round(self, model, optimizer, global_controls=None):
        if self.received is None:
            raise FedXViTError(
                "algorithm 'fedsm' needs FedSM's server (jobs/fedxvit_fedsm): the task held no FedSM parts"
            )
        self.model, self.optimizer = model, optimizer
        self.received["global"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.metrics, self.sent, self.started_from = {}, None, None

    def _train(self, model, optimizer, loader, should_abort, what: str) -> dict:
        last = {}
        for _ in range(self.personal_epochs):
            last = train_epoch(model, loader, optimizer, self.site.device, should_abort=should_abort)
            if last["aborted"]:
                raise RoundAborted(f"while training the {what}")
        return last

    def finish_round(self, should_abort=None) -> dict:
        should_abort = should_abort or (lambda: False)
        received, site = self.received, self.site
        personal = site.new_model()
        personal.load_state_dict(received["global"])
        overlay(personal, received["personalized"])  # round 0: none yet, it starts as the global model
        self.started_from = "its aggregate" if received["personalized"] else "the global model"
        personal_start = trainable_arrays(personal)
        self._train(
            personal,
            make_optimizer(personal, site.learning_rate),
            site.train_loader,
            should_abort,
            "personalized model",
        )
        scores = evaluate(personal, site.val_loader, site.device, should_abort=should_abort)
        if scores["aborted"]:
            raise RoundAborted("while scoring the personalized model")

        selector = build_selector(site.new_model, received["global"], len(received["sites"]))
        overlay(selector, received["selector"].get("weights", {}))
        optimizer = make_optimizer(selector, site.learning_rate)
        load_adam_moments(selector, optimizer, received["selector"])
        selector_start = {"weights": trainable_arrays(selector), **adam_moments(selector, optimizer)}
        label = received["index"]
        trained = self._train(selector, optimizer, Relabeled(site.train_loader, label), should_abort, "selector")
        picked = evaluate(selector, Relabeled(site.val_loader, label), site.device, should_abort=should_abort)
        if picked["aborted"]:
            raise RoundAborted("while scoring the selector")
        selector_end = {"weights": trainable_arrays(selector), **adam_moments(selector, optimizer)}
        self.sent = {  # differences from what this round started from (fedxvit.fedsm's module doc)
            PERSONALIZED: DXO(
                data_kind=DataKind.WEIGHT_DIFF, data=subtracted(trainable_arrays(personal), personal_start)
            ),
            SELECTOR: DXO(
                data_kind=DataKind.COLLECTION,
                data={
                    **{
                        key: subtracted(selector_end[key], selector_start[key])
                        for key in ("weights", "exp_avg", "exp_avg_sq")
                    },
                    "step": selector_end["step"],
                },
                meta={SITES: received["sites"]},
            ),
        }
        self.metrics = {
            "personal_val_accuracy": scores["accuracy"],
            "personal_val_balanced_accuracy": scores["balanced_accuracy"],
            "personal_val_loss": scores["loss"],
            "selector_train_loss": trained.get("loss", float("nan")),
            "selector_val_accuracy": picked["accuracy"],  # share of this site's images the selector assigns to it
        }
        self.received = None
        return {}

    def parts(self) -> Dict[str, DXO]:
        return dict(self.sent or {})

    def round_metrics(self) -> dict:
        return dict(self.metrics)

    def summary(self) -> str:
        if not self.metrics:
            return "fedsm"
        return (
            f"fedsm: personalized (from {self.started_from}) val_acc={self.metrics['personal_val_accuracy']:.4f}, "
            f"selector picks this site "
            f"for {self.metrics['selector_val_accuracy']:.0%} of its validation images"
        )

    def params(self) -> dict:
        return {"algorithm": self.name, "personal_epochs": self.personal_epochs}


def make_strategy(
    algorithm: str = "fedavg", mu: float = 0.01, ditto_lambda: float = 0.1, personal_epochs: int = 1
) -> FedAvg:
    """The strategy for the executor's `algorithm` job option: one of the registry's site strategies
    (fedxvit.methods)."""
    strategies = {
        "fedavg": FedAvg,
        "fedprox": lambda: FedProx(mu),
        "scaffold": Scaffold,
        "ditto": lambda: Ditto(ditto_lambda, personal_epochs),
        "fedsm": lambda: FedSMSite(personal_epochs),
    }
    if algorithm not in SITE_STRATEGIES:
        uses = "; ".join(f"{s}: {', '.join(jobs_running(s))}" for s in SITE_STRATEGIES)
        raise FedXViTError(
            f"job option algorithm='{algorithm}' is unknown; choose one of the sites' strategies ({uses})"
        )
    return strategies[algorithm]()
