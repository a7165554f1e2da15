"""The experience loop: train on each experience in turn, evaluate on every task after each.

One :class:`ContinualModule` lives through the sequence; every experience gets a fresh
Lightning ``Trainer`` (so ``max_epochs`` counts per experience) that shares the plugins and
the logger. :meth:`ExperienceLoop.train` is the whole loop; the run folder's bookkeeping is
:class:`~afmbench.run_record.RunRecord`'s.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.loggers import Logger, WandbLogger

from afmbench.augment import make_augmentation
from afmbench.errors import AfmbenchWarning, ConfigError
from afmbench.loader import TensorLoader
from afmbench.module import ContinualModule
from afmbench.persample import PRECISIONS
from afmbench.plugin import ContinualPlugin
from afmbench.progress import ExperienceProgressBar
from afmbench.resume import restore
from afmbench.run_record import RunRecord, RunResult
from afmbench.scenarios.base import Scenario
from afmbench.trainers import LightningChatter, Unprofiled

# An experience's own task must end at least this far above the untrained model's accuracy.
UNLEARNED_MARGIN = 0.02


@dataclass
class LoopSettings:
    """How each experience is trained and evaluated."""

    joint: bool = False
    cumulative: bool = False  # experience t trains on the union of experiences 0..t
    batch_size: int = 32
    eval_batch_size: int = 1024
    seed: int = 0
    trainer_kwargs: dict[str, Any] = field(default_factory=dict)  # max_epochs included
    verbose: bool = True
    augment: str | None = None  # training batches only (afmbench.augment)
    # hold each experience's data on the device: None on CUDA devices only, True forces it
    resident: bool | None = None
    pass_memory_mb: float = 256.0  # working-memory bound of per-sample importance passes
    pass_precision: str = "32-true"  # importance passes in float32, or under bfloat16 autocast

    def __post_init__(self) -> None:
        if self.joint and self.cumulative:
            raise ConfigError(
                "joint and cumulative training exclude each other",
                "pick one: joint trains once on all data, cumulative on all data so far",
            )
        if self.pass_precision not in PRECISIONS:
            raise ConfigError(
                f"unknown data.pass_precision '{self.pass_precision}'",
                f"use one of {', '.join(PRECISIONS)}",
            )


def experience_seed(seed: int, step: int) -> int:
    """The seed of training step ``step``: each experience's randomness depends only on
    ``(seed, step)``, so a resumed run continues exactly as an uninterrupted one."""
    return (seed * 1_000_003 + 7919 * (step + 1)) % (2**31 - 1)


class ExperienceLoop:
    """Trains ``module`` on ``scenario``'s experiences with ``plugins``, keeping ``book``."""

    def __init__(
        self,
        scenario: Scenario,
        module: ContinualModule,
        plugins: Sequence[ContinualPlugin],
        settings: LoopSettings,
        book: RunRecord,
        logger: Logger | None,
    ) -> None:
        self.scenario, self.module, self.plugins = scenario, module, list(plugins)
        self.settings, self.book, self.logger = settings, book, logger
        self.steps = 1 if settings.joint else scenario.n_experiences
        # every test set, then every validation split: evaluation loader j is column j
        self.eval_loaders = [
            TensorLoader(split(j), settings.eval_batch_size)
            for split in ([scenario.test, scenario.validation] if module.has_validation
                          else [scenario.test])
            for j in range(scenario.n_experiences)
        ]  # fmt: skip
        self.progress = ExperienceProgressBar(self.steps)
        self.trainer: Trainer | None = None
        module.augment = make_augmentation(settings.augment, tuple(scenario.input_shape))
        module.seed, module.pass_memory_mb = settings.seed, settings.pass_memory_mb
        module.pass_precision = settings.pass_precision

    def train(
        self, resume: dict[str, Any] | None = None, resume_from: Path | None = None
    ) -> RunResult:
        """Start (or continue from checkpoint ``resume``); then for each experience: fit,
        evaluate, save, report; then finish."""
        with (
            LightningChatter(self.settings.verbose) as chatter,
            _closing(self.logger, self.settings.verbose),
        ):
            self.trainer = self.make_trainer()
            chatter.quiet()  # Lightning's announcement of the accelerator: once
            for loader in self.eval_loaders:
                self._place(loader)
            self.start(resume, resume_from)
            try:
                for step in range(self.book.done, self.steps):
                    self.fit(step)
                    row = self.evaluate(step)
                    self.book.save(self.module, self.trainer, step)
                    self.book.report(self.module, self.trainer, step, self.plugins)
                    self.say(f"after experience {step + 1}/{self.steps}: accuracy per task "
                             f"[{' '.join(f'{a:.3f}' for a in row)}]")  # fmt: skip
            except (KeyboardInterrupt, SystemExit) as stop:
                # Lightning answers Ctrl-C inside fit or validate with SystemExit(1) after
                # marking the trainer interrupted (and ignores further Ctrl-C meanwhile)
                if isinstance(stop, SystemExit) and not self.trainer.interrupted:
                    raise
                raise self.book.interrupted(self.module, self.trainer, self.steps) from None
            except Exception as error:  # a diverged loss, a damaged cache file, a full disk, a bug
                self.book.fail(self.module, error, self.trainer)
                raise
            return self.book.finish(self.module, self.trainer, self.settings.verbose)

    def start(self, resume: dict[str, Any] | None, resume_from: Path | None) -> None:
        """Restore a checkpoint's state, or measure the untrained model on every task."""
        if resume is not None:
            loop = restore(
                resume, resume_from, self.module, self.plugins, self.book.record["config_hash"]
            )
            self.book.restore(loop)
            if hasattr(self.logger, "continue_from"):  # before anything is logged
                self.logger.continue_from(self.book.logged_steps)
        if self.logger is not None:
            record = self.book.record
            self.logger.log_hyperparams(
                record.get("config") or {k: v for k, v in record.items() if k != "config"}
            )
        if resume is not None:
            self.say(f"resuming after experience {self.book.done}/{self.steps} from {resume_from}")
            return
        seed_everything(experience_seed(self.settings.seed, -1), verbose=False)
        self.book.baseline = self._validate(row=0)

    def fit(self, step: int) -> None:
        """Train experience ``step`` (all experiences at once for joint training, all so far
        for cumulative training)."""
        joint, seed = self.settings.joint, experience_seed(self.settings.seed, step)
        mixed = joint or self.settings.cumulative  # one split of several experiences' data
        split = (self.scenario.joint_train(None if joint else step + 1) if mixed
                 else self.scenario.train(step))  # fmt: skip
        self.module.experience = step
        self.module.task_id = _task_argument(self.scenario, step, mixed)
        self.module.train_split = split
        seed_everything(seed, verbose=False)
        loader = TensorLoader(split, self.settings.batch_size, shuffle=True, seed=seed)
        self.trainer = self.make_trainer(len(loader))
        self._place(loader)
        started = time.perf_counter()
        self.trainer.fit(self.module, train_dataloaders=loader)
        self.book.train_s.append(time.perf_counter() - started)
        self.book.logged_steps += self.trainer.global_step
        if hasattr(self.logger, "step_offset"):
            self.logger.step_offset = self.book.logged_steps

    def evaluate(self, step: int) -> np.ndarray:
        """Test accuracy on every task after experience ``step``; warn if it learned nothing."""
        started = time.perf_counter()
        row = self._validate(row=step + 1)
        self.book.eval_s.append(time.perf_counter() - started)
        if not self.settings.joint and self.trainer.is_global_zero:
            self._warn_if_unlearned(step, row[step], self.book.baseline[step])
        return row

    def make_trainer(self, batches: int | None = None) -> Trainer:
        """A Trainer for one ``fit`` over ``batches`` batches an epoch (None: evaluation only)."""
        kwargs = {
            "enable_progress_bar": self.settings.verbose,
            "enable_model_summary": False,
            "log_every_n_steps": 10,
            **self.settings.trainer_kwargs,
        }
        kwargs.setdefault("profiler", Unprofiled())
        if batches and kwargs["log_every_n_steps"] > batches:
            # log at least once an epoch, rather than Lightning warning every experience
            # that a short epoch (the digits' default: 8 batches) logs nothing
            kwargs["log_every_n_steps"] = batches
        folder = self.book.folder
        return Trainer(
            logger=self.logger if self.logger is not None else False,
            callbacks=[*self.plugins, *([self.progress] if kwargs["enable_progress_bar"] else [])],
            enable_checkpointing=False,
            num_sanity_val_steps=0,
            use_distributed_sampler=False,
            default_root_dir=str(folder) if folder else None,
            **kwargs,
        )

    def _place(self, loader: TensorLoader) -> None:
        """Make ``loader`` resident on the trainer's device where the settings ask for it
        (by default on CUDA only: on the CPU the data is already where the model is)."""
        device = self.trainer.strategy.root_device
        resident = self.settings.resident
        if resident or (resident is None and device.type == "cuda"):
            loader.resident(device)

    @property
    def is_global_zero(self) -> bool:
        return self.trainer is None or self.trainer.is_global_zero

    def say(self, line: str) -> None:
        if self.settings.verbose and self.is_global_zero:
            print(line, flush=True)

    def _validate(self, row: int) -> np.ndarray:
        self.module.eval_row = row
        self.trainer.validate(self.module, dataloaders=self.eval_loaders, verbose=False)
        return self.module.accuracies(row)[0]

    def _warn_if_unlearned(self, step: int, accuracy: float, untrained: float) -> None:
        """Say so when an experience left its own task at the untrained model's accuracy: a
        diverged or stalled optimizer otherwise shows only as a poor ACC at the end."""
        if accuracy > untrained + UNLEARNED_MARGIN:
            return
        epochs = self.settings.trainer_kwargs.get("max_epochs")
        warnings.warn(
            f"experience {step + 1}/{self.steps} learned nothing: accuracy {accuracy:.3f} on its "
            f"own task, {untrained:.3f} untrained; check optimizer.lr="
            f"{self.module.optimizer_config.lr:g} (too high diverges, too low stalls) and "
            f"trainer.max_epochs={epochs}",
            AfmbenchWarning,
            stacklevel=2,
        )


def _task_argument(scenario: Scenario, step: int, mixed: bool) -> int | None:
    """The head to train: the experience's task label, or None (per sample) where the training
    data mixes tasks (joint and cumulative task-IL)."""
    if not scenario.multi_head:
        return 0
    return None if mixed else scenario.task_ids[step]


@contextmanager
def _closing(logger: Logger | None, verbose: bool) -> Iterator[None]:
    """Close the W&B run when the run ends, however it ends, so the next run starts its own."""
    try:
        yield
    finally:
        experiment = (
            getattr(logger, "_experiment", None) if isinstance(logger, WandbLogger) else None
        )
        if experiment is not None and hasattr(experiment, "finish"):
            folder = Path(experiment.dir).parent
            offline = experiment.settings.mode == "offline"
            experiment.finish()
            if verbose:
                how = (
                    f"upload with: wandb sync {folder}"
                    if offline
                    else f"online at {experiment.url}"
                )
                print(
                    f"W&B run {'saved in ' + str(folder) if offline else 'synced'}; {how}",
                    flush=True,
                )
