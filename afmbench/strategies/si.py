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

    ``gradient``: which g enters ω. ``task`` (default) is the gradient of the task loss alone
    (``p.grad`` before the module adds the closed-form penalties' gradient, minus that of any
    other penalty, which the module then stores each step): ω then measures each parameter's
    share of the drop in the *new task's* loss, as the paper intends. ``total`` is the gradient
    the optimizer stepped on, all penalties (and any gradient clipping) included, as some
    reference implementations do; it also credits parameters for being pulled back to their
    anchors. It is read from ``p.grad`` after the step, which leaves it untouched, so it costs
    no copy and no second evaluation of the penalties' gradient.

    Steps are counted in ``on_before_optimizer_step`` (gradients complete, before the update)
    and ``on_train_batch_end`` (after it), so with gradient accumulation ω grows once per real
    update, on the accumulated gradient. Under 16-bit AMP the gradient scaler skips a step
    whose gradients overflowed: θ stays put, and that step adds nothing (not ``inf · 0``).
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
        # the current step's gradient and parameters before it, in buffers reused every step
        self._grad: dict[str, Tensor] = {}
        self._before: dict[str, Tensor] = {}
        self._pending = False  # a step's (g, θ before) is recorded and its update not yet seen
        self._may_skip = False  # a gradient scaler may skip steps (their g is not finite)

    def on_train_start(self, trainer: Trainer, pl_module: ContinualModule) -> None:
        params = named_parameters(pl_module.model).items()
        self.path = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params}
        self.start = snapshot(pl_module.model)
        # total mode reads p.grad after the step instead
        self._grad = {n: torch.empty_like(p) for n, p in params} if self.gradient == "task" else {}
        self._before = {n: torch.empty_like(p) for n, p in params}
        self._pending = False
        precision = getattr(trainer, "precision_plugin", None)
        self._may_skip = getattr(precision, "scaler", None) is not None

    def on_before_optimizer_step(
        self, trainer: Trainer, pl_module: ContinualModule, optimizer: Any
    ) -> None:
        # p.grad: the task loss's gradient plus that of the penalties without a closed form;
        # the module adds the closed-form penalties' gradient after this hook
        with torch.no_grad():
            for n, p in pl_module.trainable_parameters().items():
                if self.gradient == "task":
                    g = self._grad[n]
                    if p.grad is None:
                        g.zero_()
                    else:
                        g.copy_(p.grad)
                    if n in pl_module.graph_penalty_grads:
                        g.sub_(pl_module.graph_penalty_grads[n])
                self._before[n].copy_(p)
        self._pending = True

    def on_train_batch_end(self, trainer: Trainer, pl_module: ContinualModule, *args: Any) -> None:
        if not self._pending:  # accumulating gradients: no update in this batch
            return
        with torch.no_grad():
            for n, p in pl_module.trainable_parameters().items():
                g = self._grad[n] if self.gradient == "task" else p.grad
                if g is None:  # no gradient: the step did not follow from one
                    continue
                step_back = self._before[n].sub_(p)  # θ before − θ after = −Δθ
                if self._may_skip:  # a skipped step: Δθ = 0 and g inf or NaN
                    self.path[n].add_(step_back.mul_(g).nan_to_num_(0.0, 0.0, 0.0))
                else:
                    self.path[n].addcmul_(g, step_back)  # ω += −g Δθ
        self._pending = False

    def on_train_end(self, trainer: Trainer, pl_module: ContinualModule) -> None:
        params = named_parameters(pl_module.model)
        omega = {
            n: w / ((params[n].detach() - self.start[n]).square() + self.xi)
            for n, w in self.path.items()
        }
        self.fold(pl_module, omega, torch.add)
        self.path = {n: torch.zeros_like(w) for n, w in self.path.items()}  # ω restarts at zero
