"""What each federated algorithm changes at a site: a strategy around the executor's one training loop.

- `fedavg`: plain local training (also the sites' part of FedOpt and cyclic weight transfer,
  which change only the server);
- `fedprox`: NVFlare's PTFedProxLoss, mu/2 * ||w - w_global||^2, added to every batch's loss over
  the *trainable* tensors only (frozen ones cannot move, so they would only cost time);
- `scaffold`: NVFlare's PTScaffoldHelper corrects every optimizer step by
  -lr * (c_global - c_local) and, at the end of the round, updates the site's control variate
  c_local; its change travels to the server next to the weight difference.

The executor calls, per `train` task: `start_round(model, optimizer, global_controls)` once the
global weights are loaded and the freeze policy is set, hands `extra_loss` and `after_step` to
fedxvit.training.train_epoch, then `finish_round()`, which returns what travels beside the weight
difference (SCAFFOLD's control-variate change, else nothing). No NVFlare runtime is involved:
the tests drive the strategies with a plain loop.
"""

from __future__ import annotations

import torch
from nvflare.app_opt.pt.fedproxloss import PTFedProxLoss
from nvflare.app_opt.pt.scaffold import PTScaffoldHelper
from torch import nn

from fedxvit.errors import FedXViTError

ALGORITHMS = ("fedavg", "fedprox", "scaffold")


def trainable_parameters(model: nn.Module) -> dict:
    return {name: param for name, param in model.named_parameters() if param.requires_grad}


class FedAvg:
    """Plain local training: no extra loss, no correction, nothing beside the weight difference."""

    name = "fedavg"
    needs_global_controls = False

    def __init__(self):
        self.model = self.optimizer = None

    def start_round(self, model: nn.Module, optimizer: torch.optim.Optimizer, global_controls: dict | None = None):
        self.model, self.optimizer = model, optimizer

    def extra_loss(self) -> torch.Tensor | None:
        return None

    def after_step(self) -> None:
        pass

    def finish_round(self) -> dict:
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
        # PTFedProxLoss pairs the named parameters of two modules; these two hold only the trainable
        # tensors, live and as received, in the same order.
        live = list(trainable_parameters(model).values())
        self.local = nn.ParameterList(live)
        self.reference = nn.ParameterList([nn.Parameter(p.detach().clone(), requires_grad=False) for p in live])
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

    def finish_round(self) -> dict:
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


def make_strategy(algorithm: str = "fedavg", mu: float = 0.01) -> FedAvg:
    """The strategy for the executor's `algorithm` job option."""
    if algorithm == "fedavg":
        return FedAvg()
    if algorithm == "fedprox":
        return FedProx(mu)
    if algorithm == "scaffold":
        return Scaffold()
    raise FedXViTError(
        f"job option algorithm='{algorithm}' is unknown; choose one of {', '.join(ALGORITHMS)} "
        f"(FedOpt and cyclic sites run 'fedavg')"
    )
