"""What a run shows in the terminal while it trains: one bar per experience, then a passing
bar for the work an experience does after its last step (importance passes, retraining),
which would otherwise leave the screen still at 100 % for a while."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, TypeVar

from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm

if TYPE_CHECKING:
    from lightning.pytorch import Trainer

    from afmbench.module import ContinualModule

T = TypeVar("T")


class ExperienceProgressBar(TQDMProgressBar):
    """Lightning's training progress bar, labelled with the experience being trained.

    Evaluation after each experience is a few quick passes over the test sets; its per-loader
    bars would only flicker, so they stay hidden. Hidden from the start: a bar disabled after
    it is made has already drawn itself, and in a terminal the next line printed (the
    accuracy per task) would run on from it.
    """

    def __init__(self, n_steps: int) -> None:
        super().__init__()
        self.n_steps = n_steps

    def init_validation_tqdm(self) -> Tqdm:
        return Tqdm(disable=True)

    def on_train_epoch_start(self, trainer: Trainer, pl_module: ContinualModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        epoch = f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}"
        self.train_progress_bar.set_description(f"{self._experience(pl_module)} {epoch}")

    def passing(self, iterable: Iterable[T], label: str, pl_module: ContinualModule) -> Iterator[T]:
        """``iterable`` with a bar that goes away when it is done. Passes run after the last
        step, so the training bar is closed first: its rate stays that of training."""
        if self._train_progress_bar is not None:
            self._train_progress_bar.close()  # Lightning's close at the end is then a no-op
        bar = Tqdm(
            iterable,
            desc=f"{self._experience(pl_module)}: {label}",
            position=2 * self.process_position,
            disable=self.is_disabled,
            leave=False,
            dynamic_ncols=True,
            file=sys.stdout,
            bar_format=self.BAR_FORMAT,
        )
        with bar:
            yield from bar

    def _experience(self, pl_module: ContinualModule) -> str:
        return f"experience {pl_module.experience + 1}/{self.n_steps}"
