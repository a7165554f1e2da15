"""Adversarial neural pruning and synaptic consolidation (ANPyC; Peng et al., TNNLS 2021)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from afmbench.module import make_optimizer
from afmbench.strategies.base import (
    QuadraticPenalty,
    check,
    data_mean,
    named_parameters,
    switched,
    task_logits,
)

if TYPE_CHECKING:
    from lightning.pytorch import Trainer

    from afmbench.module import ContinualModule

#: Pruning advances in steps of this many percentage points of the free pool.
PRUNE_STEP = 10.0


class ANPyC(QuadraticPenalty):
    """Penalty ``λ Σ_k Ω_k (θ_k − θ*_k)²`` with Ω from the output entropy; optional pruning.

    Importance needs no labels: with ``H = −Σ_x Σ_c p_c log p_c`` over a batch of
    ``batch_size`` samples and ``G = ∂H/∂θ``, a batch scores each parameter
    ``max(G θ + ½ θ² G², 0)``: a second-order, Taylor-style score of the parameter's weight in
    the output's uncertainty, with G² standing in for the curvature (the formula of the
    authors' code, GeoX-Lab/ANPyC). Ω_t is the mean over batches;
    Ω accumulates over experiences by elementwise ``max`` (default) or ``sum``.

    ``prune=True``: after every experience but the last, the parameters of ``model.body``
    that earlier experiences did not keep (the free pool) are pruned by lowest Ω_t, per
    tensor, in 10-point steps up to ``p_t`` percent of the pool (``p_0 = prune_percent``,
    ``p_{t+1} = prune_decay · p_t``), with ``retrain_steps`` masked optimizer steps on the
    experience's data after each step and Ω_t re-estimated before the next. Pruned parameters
    are zero and free again for the next experience; the rest of the pool is kept from then on
    and never pruned. Output heads are not pruned. Pruning changes the weights when the
    experience ends, so list ANPyC before other plugins: hooks run in list order, and the
    others should consolidate the pruned network. The retraining is a loop of its own, on
    batches of ``batch_size``: gradients are averaged over DDP processes, but the trainer's
    gradient clipping, accumulation and autocast do not apply to it.
    """

    name = "anpyc"
    tables = ("kept", "pruned")

    def __init__(
        self,
        lambda_: float = 0.1,
        accumulate: Literal["max", "sum"] = "max",
        batch_size: int = 100,
        samples: int | None = None,
        prune: bool = False,
        prune_percent: float = 50.0,
        prune_decay: float = 0.8,
        retrain_steps: int = 100,
    ) -> None:
        super().__init__()
        check(lambda_ >= 0, "lambda_", lambda_, "must be >= 0", 0.1)
        check(batch_size >= 1, "batch_size", batch_size, "must be >= 1", 100)
        check(samples is None or samples >= 1, "samples", samples, "must be >= 1 (null: all)", 1000)
        check(0 < prune_percent < 100, "prune_percent", prune_percent, "must be in (0, 100)", 50)
        check(0 < prune_decay <= 1, "prune_decay", prune_decay, "must be in (0, 1]", 0.8)
        check(retrain_steps >= 0, "retrain_steps", retrain_steps, "must be >= 0", 100)
        self.lambda_ = lambda_
        self.accumulate = accumulate
        self.batch_size = batch_size
        self.samples = samples
        self.prune = prune
        self.prune_percent = prune_percent
        self.prune_decay = prune_decay
        self.retrain_steps = retrain_steps
        self.strength = lambda_
        self.kept: dict[str, Tensor] = {}  # parameters earlier experiences kept (never pruned)
        self.pruned: dict[str, Tensor] = {}  # pruned by the latest experience: zero and free

    def on_train_end(self, trainer: Trainer, pl_module: ContinualModule) -> None:
        if self.prune and pl_module.experience + 1 < pl_module.n_experiences:
            self.prune_and_retrain(trainer, pl_module)
        combine = torch.maximum if self.accumulate == "max" else torch.add
        self.fold(pl_module, self.estimate(pl_module), combine)

    def estimate(self, module: ContinualModule) -> dict[str, Tensor]:
        """Ω_t of the current experience: the mean over batches of the pruning score."""
        model = module.model

        def batch_scores(x: Tensor, y: Tensor, task: int) -> dict[str, Tensor]:
            params = named_parameters(model)
            logp = F.log_softmax(task_logits(model, x, task), dim=1)
            entropy = -(logp.exp() * logp).sum()
            grads = torch.autograd.grad(entropy, list(params.values()), allow_unused=True)
            return {
                n: entropy_score(g, p.detach())
                for (n, p), g in zip(params.items(), grads)
                if g is not None
            }

        return data_mean(
            module,
            batch_scores,
            self.samples,
            self.batch_size,
            per="batch",
            label="anpyc importance",
        )

    def prune_levels(self, experience: int) -> list[float]:
        """Cumulative percentages of the free pool pruned after ``experience``: 10, 20, ..., p_t."""
        target = self.prune_percent * self.prune_decay**experience
        return [*(PRUNE_STEP * i for i in range(1, math.ceil(target / PRUNE_STEP))), target]

    def prune_and_retrain(self, trainer: Trainer, module: ContinualModule) -> None:
        params = {n: p for n, p in named_parameters(module.model).items() if n.startswith("body.")}
        free = {n: ~self.kept[n].to(p.device) if n in self.kept else torch.ones_like(p, dtype=torch.bool)
                for n, p in params.items()}  # fmt: skip
        pruned = {n: torch.zeros_like(f) for n, f in free.items()}
        for level in self.prune_levels(module.experience):
            omega = self.estimate(module)
            for n, p in params.items():
                pruned[n] = lowest(omega[n], free[n], pruned[n], level / 100)
                with torch.no_grad():
                    p.masked_fill_(pruned[n], 0.0)
            self.retrain(trainer, module, pruned)
        self.kept = {n: ~mask for n, mask in pruned.items()}  # earlier keeps ∪ the unpruned pool
        self.pruned = pruned

    def retrain(self, trainer: Trainer, module: ContinualModule, pruned: dict[str, Tensor]) -> None:
        """``retrain_steps`` optimizer steps on the full loss, pruned parameters held at zero.

        Runs outside Lightning's loop (and its DDP wrapper), so gradients are averaged across
        ranks here; every rank takes the same number of steps.
        """
        model = module.model
        params = named_parameters(model)
        optimizer = make_optimizer(module.optimizer_config, list(params.values()))
        batches = _endless(module, self.batch_size)
        with switched(model, training=True), torch.enable_grad():
            for _ in module.progress(range(self.retrain_steps), "anpyc retraining"):
                loss, _, _ = module.loss(next(batches))
                optimizer.zero_grad()
                loss.backward()
                for n, p in params.items():
                    if p.grad is not None:
                        if trainer.world_size > 1:
                            p.grad = module.all_reduce_sum(p.grad) / trainer.world_size
                        if n in pruned:
                            p.grad.masked_fill_(pruned[n], 0.0)
                optimizer.step()
                with torch.no_grad():  # momentum or weight decay could move them otherwise
                    for n, mask in pruned.items():
                        params[n].masked_fill_(mask, 0.0)


def entropy_score(grad: Tensor, theta: Tensor) -> Tensor:
    """``max(G·θ + ½ θ² G², 0)``, written as ``u + ½ u²`` with ``u = G·θ``: two passes over the
    parameters instead of seven (the importance pass runs it once per batch)."""
    u = grad * theta
    return torch.addcmul(u, u, u, value=0.5).relu_()


def lowest(omega: Tensor, free: Tensor, pruned: Tensor, fraction: float) -> Tensor:
    """Mask of the ``fraction`` of ``free`` with the lowest ``omega``, ``pruned`` included first."""
    k = round(fraction * int(free.sum()))
    score = omega.masked_fill(~free, math.inf).masked_fill(pruned, -math.inf)
    mask = torch.zeros(omega.numel(), dtype=torch.bool, device=omega.device)
    mask[score.flatten().topk(k, largest=False).indices] = True
    return mask.view_as(omega)


def _endless(module: ContinualModule, batch_size: int) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    while True:
        yield from module.batches(batch_size=batch_size)
