"""Record-level differential privacy (DP-SGD) at a site, with Opacus: what one patient's images can
change in everything the site ever sends is bounded by (epsilon, delta).

Every local step samples a Poisson batch (each image with probability q = 1 / batches per epoch),
clips each image's gradient of the trainable tensors to `max_grad_norm` and adds Gaussian noise of
`noise_multiplier` x max_grad_norm to their sum (Opacus' GradSampleModule, DPOptimizer and
DPDataLoader). The noise is chosen once, at the first round, so that the whole planned training
(num_rounds x local_epochs epochs) spends exactly the target epsilon; one RDP accountant then
carries the site's spending across rounds. The accountant is stepped by Opacus' own hook on every
noised optimizer step that ran, not by the plan: a round aborted midway spends what it trained. A round
that would spend past the target is not trained: the site stops sending, with one log line, and the
federation goes on without it.
Frozen tensors (the freeze policy) get no gradient, so frozen BatchNorm stays frozen and needs no
replacement. The model's validation scores are not private (they are a few numbers per round).
"""

from __future__ import annotations

import torch
from opacus import GradSampleModule
from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.data_loader import DPDataLoader
from opacus.optimizers import DPOptimizer

from fedxvit.errors import FedXViTError


class SitePrivacy:
    """One site's DP-SGD state for a whole run: the private loader, the noise, the accountant."""

    def __init__(self, target_epsilon: float, delta: float = 1e-5, max_grad_norm: float = 1.0):
        if not float(target_epsilon) > 0:
            raise FedXViTError(f"job option dp_epsilon={target_epsilon}: must be > 0 (0 turns DP-SGD off)")
        if not 0 < float(delta) < 1:
            raise FedXViTError(f"job option dp_delta={delta}: must be between 0 and 1 (e.g. 1e-5)")
        if not float(max_grad_norm) > 0:
            raise FedXViTError(f"job option dp_max_grad_norm={max_grad_norm}: must be > 0")
        self.target_epsilon, self.delta, self.max_grad_norm = float(target_epsilon), float(delta), float(max_grad_norm)
        self.accountant = RDPAccountant()
        self.loader = self.grad_sample_module = None
        self.noise_multiplier = self.sample_rate = None
        self.planned_epochs = 0

    @property
    def started(self) -> bool:
        return self.loader is not None

    def start(self, model: torch.nn.Module, train_loader, planned_epochs: int) -> None:
        """Once, after the freeze policy is set: per-image gradient hooks on the trainable layers, the
        Poisson loader, and the noise that makes `planned_epochs` epochs cost the target epsilon."""
        if planned_epochs < 1:
            raise FedXViTError(
                f"DP-SGD needs the run's planned epochs (num_rounds x local_epochs), got {planned_epochs}"
            )
        for module in model.modules():  # an in-place activation would overwrite a hooked layer's output (autograd
            if getattr(module, "inplace", False) is True:  # refuses); out of place computes the same values
                module.inplace = False
        self.grad_sample_module = GradSampleModule(model)  # hooks live on the model's own layers
        self.loader = DPDataLoader.from_data_loader(train_loader)
        self.sample_rate = self.loader.sample_rate
        self.planned_epochs = int(planned_epochs)
        self.noise_multiplier = get_noise_multiplier(
            target_epsilon=self.target_epsilon,
            target_delta=self.delta,
            sample_rate=self.sample_rate,
            steps=self.steps(planned_epochs),
            accountant="rdp",
        )

    def steps(self, epochs: int) -> int:
        """Sampled steps in `epochs` epochs (every draw counts, an empty Poisson batch too)."""
        return int(epochs) * len(self.loader)

    def private(self, optimizer: torch.optim.Optimizer) -> DPOptimizer:
        """The round's optimizer with per-image clipping and noise; each of its steps is accounted as it is taken
        (Opacus' accountant hook, as its PrivacyEngine attaches it)."""
        expected_batch = max(1, round(self.sample_rate * len(self.loader.dataset)))
        optimizer = DPOptimizer(
            optimizer,
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=self.max_grad_norm,
            expected_batch_size=expected_batch,
        )
        optimizer.attach_step_hook(self.accountant.get_optimizer_hook_fn(sample_rate=self.sample_rate))
        return optimizer

    def spent(self) -> float:
        """Epsilon spent by the optimizer steps taken so far."""
        return self.accountant.get_epsilon(self.delta) if self.accountant.history else 0.0

    def steps_taken(self) -> int:
        """Noised optimizer steps accounted so far."""
        return sum(steps for _, _, steps in self.accountant.history)

    def would_spend(self, epochs: int) -> float:
        """Epsilon spent after `epochs` more epochs."""
        projected = RDPAccountant()
        projected.history = list(self.accountant.history)
        for _ in range(self.steps(epochs)):
            projected.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)
        return projected.get_epsilon(self.delta)

    def budget_left_for(self, epochs: int) -> bool:
        """The noise is chosen so that the planned epochs spend at most the target; more do not fit."""
        return self.would_spend(epochs) <= self.target_epsilon * (1 + 1e-6)

    def summary(self) -> str:
        return (
            f"DP-SGD epsilon {self.spent():.3g} of {self.target_epsilon:g} spent in {self.steps_taken()} steps "
            f"(delta {self.delta:g}, noise {self.noise_multiplier:.3g}, clip {self.max_grad_norm:g})"
        )
