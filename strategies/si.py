"""Synaptic intelligence (Zenke, Poole and Ganguli, ICML 2017)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor

from afmbench.strategies.base import QuadraticPenalty, check, named_parameters, snapshot

if TYPE_CHECKING:
    from lightning.pytorch import Trainer

    from afmbench.module import ContinualModule


class SI(QuadraticPenalty):
    """Penalty ``c Σ_k Ω_k (θ_k − θ*_k)²`` with Ω from each parameter's share of the loss drop.

    During an experience every optimizer step adds ``−g_k Δθ_k`` to a running path integral
    ω_k (g the gradient the step was taken on, Δθ the step actually taken, whatever the
    optimizer made of g). At its end ``Ω_k += ω_k / ((θ_k(end) − θ_k(start))² + ξ)`` and ω
    restarts from zero. Ω is not clamped: a negative ω (a parameter that moved uphill) is kept.

    ``gradient``: which g enters ω. ``task`` (default) is the gradient of the task loss alone,
    ``p.grad`` minus the gradient of all plugins' penalties (which the module then stores each
    step): ω then measures each parameter's share of the drop in the *new task's* loss, as the
    paper intends. ``total`` uses ``p.grad`` as is, penalties included, as some reference
    implementations do; it also credits parameters for being pulled back to their anchors.

    Steps are counted in ``on_before_optimizer_step`` (gradients complete, before the update)
    and ``on_train_batch_end`` (after it), so with gradient accumulation ω grows once per real
    update, on the accumulated gradient.
    """

    name = "si"

    def __init__(
        self, c: float = 1.0, xi: float = 0.1, gradient: Literal["task", "total"] = "task"
    ) -> None:
        super().__init__()
        check(c >= 0, "c", c, "must be >= 0", 1.0)
        check(xi > 0, "xi", xi, "must be > 0 (it keeps Ω finite)", 0.1)
        self.c = c
        self.xi = xi
        self.gradient = gradient
        self.strength = c
        self.needs_penalty_grads = gradient == "task"
        # Within an experience only (checkpoints fall between experiences, where ω is zero):
        self.path: dict[str, Tensor] = {}  # ω, the running path integral
        self.start: dict[str, Tensor] = {}  # θ when the experience began
        self._step: tuple[dict[str, Tensor], dict[str, Tensor]] | None = None  # (g, θ before)

    def on_train_start(self, trainer: Trainer, pl_module: ContinualModule) -> None:
        params = named_parameters(pl_module.model).items()
        self.path = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params}
        self.start = snapshot(pl_module.model)
        self._step = None

    def on_before_optimizer_step(
        self, trainer: Trainer, pl_module: ContinualModule, optimizer: Any
    ) -> None:
        grads = {}
        for n, p in named_parameters(pl_module.model).items():
            g = torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
            if self.gradient == "task" and n in pl_module.penalty_grads:
                g -= pl_module.penalty_grads[n]
            grads[n] = g
        self._step = (grads, snapshot(pl_module.model))

    def on_train_batch_end(self, trainer: Trainer, pl_module: ContinualModule, *args: Any) -> None:
        if self._step is None:  # accumulating gradients: no update in this batch
            return
        grads, before = self._step
        for n, p in named_parameters(pl_module.model).items():
            self.path[n] -= grads[n] * (p.detach() - before[n])
        self._step = None

    def on_train_end(self, trainer: Trainer, pl_module: ContinualModule) -> None:
        params = named_parameters(pl_module.model)
        omega = {
            n: w / ((params[n].detach() - self.start[n]).square() + self.xi)
            for n, w in self.path.items()
        }
        self.fold(pl_module, omega, torch.add)
        self.path = {n: torch.zeros_like(w) for n, w in self.path.items()}  # ω restarts at zero
