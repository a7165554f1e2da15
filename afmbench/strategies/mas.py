"""Memory aware synapses (Aljundi et al., ECCV 2018)."""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from afmbench.persample import per_sample_grad_sums
from afmbench.strategies.base import QuadraticPenalty, check, data_mean, task_logits

if TYPE_CHECKING:
    from lightning.pytorch import Trainer

    from afmbench.models import ContinualModel
    from afmbench.module import ContinualModule


class MAS(QuadraticPenalty):
    """Penalty ``λ Σ_k Ω_k (θ_k − θ*_k)²`` with Ω the output's sensitivity to each parameter.

    Ω_t is the mean over the experience's training samples of ``|∂‖f(x)‖²/∂θ|`` per sample, f
    the logits of the task's own head. It needs no labels: it measures how much the learned
    function moves when a parameter does. Ω sums over experiences; θ* is the latest anchor.
    """

    name = "mas"

    def __init__(self, lambda_: float = 0.01, samples: int | None = None) -> None:
        super().__init__()
        check(lambda_ >= 0, "lambda_", lambda_, "must be >= 0", 0.01)
        check(samples is None or samples >= 1, "samples", samples, "must be >= 1 (null: all)", 1000)
        self.lambda_ = lambda_
        self.samples = samples
        self.strength = lambda_

    def on_train_end(self, trainer: Trainer, pl_module: ContinualModule) -> None:
        self.fold(pl_module, self.estimate(pl_module), torch.add)

    def estimate(self, module: ContinualModule) -> dict[str, Tensor]:
        """Ω of the current experience alone."""
        model = module.model

        def sums(x: Tensor, y: Tensor, task: int) -> dict[str, Tensor]:
            terms = partial(squared_norm, task=task)
            return per_sample_grad_sums(
                model, terms, (x,), "abs",
                memory_mb=module.pass_memory_mb, precision=module.pass_precision,
            )  # fmt: skip

        return data_mean(module, sums, max_samples=self.samples, label="mas importance")


def squared_norm(model: ContinualModel, x: Tensor, *, task: int) -> Tensor:
    """``‖f(x)‖²`` per sample, as a ``(B, 1)`` column."""
    return task_logits(model, x, task).square().sum(1, keepdim=True)
