"""Learning without forgetting (Li and Hoiem, ECCV 2016 / TPAMI 2017)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from afmbench.models import side_pass
from afmbench.plugin import ContinualPlugin
from afmbench.strategies.base import check, switched

if TYPE_CHECKING:
    from lightning.pytorch import Trainer

    from afmbench.module import ContinualModule


class LwF(ContinualPlugin):
    """Distils the model as it was after the previous experience on the current inputs:
    ``alpha · Σ_heads soft_CE(softmax(old / T), log_softmax(new / T))``, averaged over the
    batch. Under the task protocol over every earlier task's head; under the others over the
    shared head's classes seen in earlier experiences."""

    name = "lwf"

    def __init__(self, alpha: float = 1.0, temperature: float = 2.0) -> None:
        check(alpha >= 0, "alpha", alpha, "must be >= 0", 1.0)
        check(temperature > 0, "temperature", temperature, "must be > 0", 2.0)
        self.alpha, self.temperature = alpha, temperature
        #: the model's parameters and buffers after the previous experience (None before)
        self.previous: dict[str, Tensor] | None = None
        self.old_tasks: list[int] = []  # heads trained in earlier experiences (task protocol)
        self.old_classes: list[int] = []  # shared-head classes seen in earlier experiences

    def penalty(self, module: ContinualModule) -> Tensor | None:
        if self.previous is None:
            return None
        model, x = module.model, module.batch[0]
        shared = module.task_id is None or len(model.head.heads) == 1
        loss = x.new_zeros(())
        for task in [0] if shared else self.old_tasks:
            with torch.no_grad(), switched(model, training=False):  # the old model, as it was
                old = torch.func.functional_call(model, self.previous, (x, task))
            with side_pass(model):
                new = model(x, task)
            if shared and self.old_classes:
                old, new = old[:, self.old_classes], new[:, self.old_classes]
            loss = loss + soft_cross_entropy(new, old, self.temperature)
        return self.alpha * loss

    def on_train_end(self, trainer: Trainer, pl_module: ContinualModule) -> None:
        if pl_module.task_id is not None and pl_module.task_id not in self.old_tasks:
            self.old_tasks.append(int(pl_module.task_id))
        seen = set(self.old_classes) | set(pl_module.train_split[1].unique().tolist())
        self.old_classes = sorted(seen)
        self.previous = {k: v.detach().clone() for k, v in pl_module.model.state_dict().items()}

    def state_dict(self) -> dict[str, Any]:
        previous = None if self.previous is None else {k: v.cpu() for k, v in self.previous.items()}
        return {"previous": previous, "old_tasks": list(self.old_tasks),
                "old_classes": list(self.old_classes)}  # fmt: skip

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.previous = state_dict["previous"]
        self.old_tasks = list(state_dict["old_tasks"])
        self.old_classes = list(state_dict["old_classes"])

    def on_train_start(self, trainer: Trainer, pl_module: ContinualModule) -> None:
        if self.previous is not None:  # restored from a checkpoint on the host
            self.previous = {k: v.to(pl_module.device) for k, v in self.previous.items()}


def soft_cross_entropy(logits: Tensor, targets: Tensor, temperature: float) -> Tensor:
    """``−Σ_c softmax(targets / T)_c · log_softmax(logits / T)_c``, averaged over samples; the
    padded (-inf) outputs of a smaller head are left out."""
    mask = torch.isfinite(targets)
    p = F.softmax(targets.masked_fill(~mask, float("-inf")) / temperature, dim=1)
    log_q = F.log_softmax(logits.masked_fill(~mask, float("-inf")) / temperature, dim=1)
    return -(p * log_q.masked_fill(~mask, 0.0)).sum(1).mean()
