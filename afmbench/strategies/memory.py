"""What the replay strategies share: a :class:`~afmbench.replay.ReplayBuffer`, filled from the
training data as its ``selection`` says, reseeded every experience, kept in checkpoints.

Under DDP each process keeps a buffer of its own, filled from its own share of the data, with
``buffer_size`` split evenly between the processes: together they hold ``buffer_size``
samples, and each process replays from its own. With ``data.augment`` the buffer keeps the
inputs as loaded and every replayed batch is augmented afresh, as training batches are.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from afmbench.plugin import ContinualPlugin
from afmbench.replay import ReplayBuffer, Selection
from afmbench.strategies.base import check

if TYPE_CHECKING:
    from lightning.pytorch import Trainer

    from afmbench.module import ContinualModule


class MemoryPlugin(ContinualPlugin):
    """Base of ER and A-GEM: the buffer and its filling."""

    def __init__(self, buffer_size: int, selection: Selection, batch_size: int) -> None:
        check(buffer_size >= 1, "buffer_size", buffer_size, "must be >= 1 for replay", 500)
        check(batch_size >= 1, "replay_batch_size", batch_size, "must be >= 1", 32)
        self.buffer_size, self.selection, self.replay_batch_size = (
            buffer_size,
            selection,
            batch_size,
        )
        self.buffer = ReplayBuffer(buffer_size, selection)
        self.generator = torch.Generator()

    def on_train_start(self, trainer: Trainer, pl_module: ContinualModule) -> None:
        # every experience draws from (seed, experience): a resumed run replays the same
        self.generator.manual_seed(pl_module.seed * 1_000_003 + pl_module.experience * 7919 + 1)
        self.buffer.capacity = max(1, self.buffer_size // trainer.world_size)

    def on_train_batch_end(self, trainer: Trainer, pl_module: ContinualModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:  # fmt: skip
        if self.selection == "reservoir":
            x, y, t = batch
            self.buffer.add_reservoir(stored_inputs(pl_module, x), y, t, self.generator)

    def on_train_end(self, trainer: Trainer, pl_module: ContinualModule) -> None:
        if self.selection == "balanced":
            x, y, t = (v.to(pl_module.device) for v in pl_module.train_split)
            self.buffer.select_balanced(x, y, t, self.generator)

    def replay_batch(self, module: ContinualModule) -> tuple[torch.Tensor, ...] | None:
        """A batch of stored samples on the module's device, augmented as training batches
        are (drawn afresh each time), or None while the buffer is empty."""
        if not len(self.buffer):
            return None
        x, *rest = (v.to(module.device) for v in
                    self.buffer.sample(self.replay_batch_size, self.generator))  # fmt: skip
        return (module.augment(x) if module.augmenting else x, *rest)

    def run_metrics(self) -> dict[str, Any]:
        """The buffer as this process holds it: samples kept and bytes they take."""
        return {"buffer_samples": len(self.buffer), "buffer_bytes": self.buffer.nbytes}

    def state_dict(self) -> dict[str, Any]:
        return {"buffer": self.buffer.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.buffer.load_state_dict(state_dict["buffer"])


def stored_inputs(module: ContinualModule, x: torch.Tensor) -> torch.Tensor:
    """What replay keeps of a training batch's inputs ``x``: as loaded, not augmented."""
    loaded = module.unaugmented
    return (x if loaded is None else loaded).detach()
