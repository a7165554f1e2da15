"""Experience replay: a bounded memory of past samples, trained on beside every batch."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch.nn.functional as F
from torch import Tensor

from afmbench.models import side_pass
from afmbench.replay import Selection
from afmbench.strategies.memory import MemoryPlugin

if TYPE_CHECKING:
    from afmbench.module import ContinualModule


class ER(MemoryPlugin):
    """Adds ``cross_entropy(model(x_r, t_r), y_r)`` on ``replay_batch_size`` stored samples
    to every batch's loss. The buffer holds at most ``buffer_size`` samples, filled by
    reservoir sampling after every batch or class-balanced at the end of every experience
    (:mod:`afmbench.replay`); each stored sample keeps its task label, so under the task
    protocol it is replayed through its own head."""

    name = "er"

    def __init__(
        self, buffer_size: int = 500, replay_batch_size: int = 32,
        selection: Selection = "reservoir",
    ) -> None:  # fmt: skip
        super().__init__(buffer_size, selection, replay_batch_size)

    def penalty(self, module: ContinualModule) -> Tensor | None:
        replay = self.replay_batch(module)
        if replay is None:
            return None
        x, y, t = replay
        with side_pass(module.model):
            return F.cross_entropy(module.model(x, t), y)
