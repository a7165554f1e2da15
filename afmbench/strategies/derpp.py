"""Dark experience replay++ (Buzzega, Boschini, Porrello, Abati and Calderara, NeurIPS 2020)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from afmbench.models import side_pass
from afmbench.strategies.base import check
from afmbench.strategies.memory import MemoryPlugin, stored_inputs

if TYPE_CHECKING:
    from lightning.pytorch import Trainer

    from afmbench.module import ContinualModule


class DERpp(MemoryPlugin):
    """Replay of logits and labels. The reservoir buffer also keeps the logits the model gave
    each sample in the step that stored it; every batch's loss adds
    ``alpha · MSE(model(x_1), z_1)`` on one replay batch and ``beta · CE(model(x_2), y_2)`` on
    a second one (beta 0: DER). The mean squared error runs over the logits the sample's head
    has (a task's head under the task protocol)."""

    name = "derpp"

    def __init__(
        self, buffer_size: int = 500, replay_batch_size: int = 32, alpha: float = 0.1,
        beta: float = 0.5,
    ) -> None:  # fmt: skip
        check(alpha >= 0, "alpha", alpha, "must be >= 0", 0.1)
        check(beta >= 0, "beta", beta, "must be >= 0", 0.5)
        super().__init__(buffer_size, "reservoir", replay_batch_size)
        self.alpha, self.beta = alpha, beta

    def penalty(self, module: ContinualModule) -> Tensor | None:
        first = self.replay_batch(module)
        if first is None:
            return None
        x, _, t, z = first
        with side_pass(module.model):
            loss = self.alpha * logit_mse(module.model(x, t), z)
            if self.beta:
                x, y, t, _ = self.replay_batch(module)
                loss = loss + self.beta * F.cross_entropy(module.model(x, t), y)
        return loss

    def on_train_batch_end(self, trainer: Trainer, pl_module: ContinualModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:  # fmt: skip
        x, y, t = batch
        self.buffer.add_reservoir(
            stored_inputs(pl_module, x), y, t, self.generator, z=pl_module.batch_logits
        )


def logit_mse(logits: Tensor, stored: Tensor) -> Tensor:
    """Mean squared difference over the finite entries (a head's own outputs; MultiHead pads
    smaller heads with -inf)."""
    mask = torch.isfinite(stored)
    return (logits[mask] - stored[mask]).square().mean()
