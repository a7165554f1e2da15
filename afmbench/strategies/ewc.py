"""Elastic weight consolidation (Kirkpatrick et al., PNAS 2017)."""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from afmbench.persample import per_sample_grad_sums
from afmbench.strategies.base import (
    QuadraticPenalty,
    check,
    data_mean,
    head_width,
    task_logits,
)

if TYPE_CHECKING:
    from lightning.pytorch import Trainer

    from afmbench.models import ContinualModel
    from afmbench.module import ContinualModule


class EWC(QuadraticPenalty):
    """Penalty ``(λ/2) Σ_k F_k (θ_k − θ*_k)²`` with F the diagonal Fisher of each experience.

    F is the mean over the experience's training samples (or ``fisher_samples`` of them) of
    squared *per-sample* gradients of the log-likelihood; squaring a batch-mean gradient would
    drop the variance that makes it a Fisher. Which label the log-likelihood uses:

    - ``empirical``: the true label (cheapest, the common choice);
    - ``sampled``: a label drawn from the model's own prediction (an unbiased estimate of the
      true Fisher at the cost of the empirical one);
    - ``exact``: the expectation over all classes of the task's head (one backward pass per
      class, so C times the cost).

    ``mode=separate`` keeps one ``(F_t, θ*_t)`` per past experience and sums their penalties;
    ``online`` keeps one: ``F ← γ F + F_t`` and θ* the latest parameters (Schwarz et al. 2018).
    """

    name = "ewc"

    def __init__(
        self,
        lambda_: float = 30.0,
        fisher: Literal["empirical", "sampled", "exact"] = "empirical",
        mode: Literal["separate", "online"] = "separate",
        gamma: float = 1.0,
        fisher_samples: int | None = None,
    ) -> None:
        super().__init__()
        check(lambda_ >= 0, "lambda_", lambda_, "must be >= 0", 30)
        check(0 <= gamma <= 1, "gamma", gamma, "must be in [0, 1]", 1.0)
        check(fisher_samples is None or fisher_samples >= 1, "fisher_samples", fisher_samples,
              "must be >= 1 (null: all)", 1000)  # fmt: skip
        self.lambda_ = lambda_
        self.fisher = fisher
        self.mode = mode
        self.gamma = gamma
        self.fisher_samples = fisher_samples
        self.strength = lambda_ / 2

    def on_train_end(self, trainer: Trainer, pl_module: ContinualModule) -> None:
        online = self.mode != "separate"
        combine = (lambda old, new: self.gamma * old + new) if online else None
        self.fold(pl_module, self.estimate(pl_module), combine)

    def estimate(self, module: ContinualModule) -> dict[str, Tensor]:
        """The diagonal Fisher of the current experience's training data."""
        model = module.model

        def sums(x: Tensor, y: Tensor, task: int) -> dict[str, Tensor]:
            inputs = (x, y)
            if self.fisher == "sampled":  # Gumbel-max draws y ~ p(y|x) from noise made here
                u = torch.rand(len(x), head_width(model, task), device=x.device)
                inputs = (x, y, -torch.log(-torch.log(u.clamp(1e-12, 1 - 1e-7))))
            terms = partial(log_likelihoods, fisher=self.fisher, task=task)
            return per_sample_grad_sums(
                model, terms, inputs, "square",
                memory_mb=module.pass_memory_mb, precision=module.pass_precision,
            )  # fmt: skip

        return data_mean(module, sums, max_samples=self.fisher_samples, label="ewc Fisher")


def log_likelihoods(
    model: ContinualModel,
    x: Tensor,
    y: Tensor,
    noise: Tensor | None = None,
    *,
    fisher: str,
    task: int,
) -> Tensor:
    """Per-sample terms whose squared gradients, summed over columns, are the Fisher.

    ``exact`` returns ``√p_c · log p_c`` for every class c, so the squares sum to
    ``Σ_c p_c (∇ log p_c)²`` (the weights are constants: detached).
    """
    logp = F.log_softmax(task_logits(model, x, task), dim=1)
    if fisher == "empirical":
        return logp.gather(1, y[:, None])
    if fisher == "sampled":
        return logp.gather(1, (logp.detach() + noise).argmax(1, keepdim=True))
    return logp * (0.5 * logp.detach()).exp()
