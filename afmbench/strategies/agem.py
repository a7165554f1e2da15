"""Averaged gradient episodic memory (Chaudhry, Ranzato, Rohrbach and Elhoseiny, ICLR 2019)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from afmbench.models import side_pass
from afmbench.replay import Selection
from afmbench.strategies.memory import MemoryPlugin

if TYPE_CHECKING:
    from afmbench.module import ContinualModule


class AGEM(MemoryPlugin):
    """Before every step, the gradient g of a memory batch's loss is the reference g_ref;
    where g points against it (gᵀg_ref < 0), g ← g − (gᵀg_ref / g_refᵀg_ref) g_ref, so the
    step does not raise the memory's loss to first order. The memory holds past experiences
    only: by default it is filled class-balanced when each experience ends. Under DDP the
    reference gradient is averaged over the processes like g, so every process projects
    alike."""

    name = "agem"
    changes_gradient = True

    def __init__(
        self, buffer_size: int = 500, replay_batch_size: int = 256,
        selection: Selection = "balanced",
    ) -> None:  # fmt: skip
        super().__init__(buffer_size, selection, replay_batch_size)

    def change_gradient(self, module: ContinualModule) -> None:
        replay = self.replay_batch(module)
        if replay is None:
            return
        x, y, t = replay
        params = {n: p for n, p in module.trainable_parameters().items() if p.grad is not None}
        with torch.enable_grad(), side_pass(module.model):
            loss = F.cross_entropy(module.model(x, t), y)
            reference = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        g_ref = torch.cat([(r if r is not None else torch.zeros_like(p)).flatten()
                           for r, p in zip(reference, params.values())])  # fmt: skip
        if module._trainer is not None and module.trainer.world_size > 1:
            g_ref = module.trainer.strategy.reduce(g_ref, reduce_op="mean")
        g = torch.cat([p.grad.flatten() for p in params.values()])
        projected = project(g, g_ref)
        if projected is not g:
            for p, part in zip(
                params.values(), projected.split([p.numel() for p in params.values()])
            ):
                p.grad.copy_(part.view_as(p))


def project(g: torch.Tensor, g_ref: torch.Tensor) -> torch.Tensor:
    """``g`` itself where ``gᵀg_ref >= 0``; else ``g − (gᵀg_ref / g_refᵀg_ref) g_ref``."""
    dot = torch.dot(g, g_ref)
    if dot >= 0:
        return g
    return g - dot / torch.dot(g_ref, g_ref).clamp(min=1e-12) * g_ref
