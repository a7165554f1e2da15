"""How afmbench builds Lightning Trainers: the options it owns or refuses, what Lightning
makes of the user's, and the announcements it keeps quiet.

Every experience is one ``Trainer.fit``, so a run builds many Trainers; what they share
(callbacks, logger, the no-op profiler) is set here once.
"""

from __future__ import annotations

import logging
import warnings
from contextlib import AbstractContextManager, nullcontext
from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.profilers import PassThroughProfiler

from afmbench.errors import ConfigError, first_line

# Trainer options that afmbench sets itself, and what to do instead.
OWN_TRAINER_OPTIONS = {
    "logger": "choose it with logger=wandb|csv|none (run(logger=...) from Python)",
    "callbacks": "pass callbacks as plugins (a plugin is a Lightning Callback)",
    "enable_checkpointing": "remove it: a checkpoint is written after every experience "
    "(checkpoint.keep_all=true keeps them all)",
    "default_root_dir": "choose the run folder with run_dir=PATH",
    "num_sanity_val_steps": "remove it: evaluation runs after each experience, not inside fit",
    "limit_val_batches": "remove it: accuracies are measured on whole test sets, so that runs "
    "compare",
    "use_distributed_sampler": "remove it: under DDP each process takes its share of the data",
    "barebones": "remove it: afmbench needs the hooks it disables; logger=none "
    "trainer.enable_progress_bar=false is the leanest run",
}


def check_loop_options(
    max_epochs: Any, batch_size: Any, eval_batch_size: Any, trainer_kwargs: dict[str, Any]
) -> None:
    """Sizes that would train nothing, forever, or crash deep in a loader, and trainer options
    afmbench owns or cannot run under."""
    for key, value in (("data.batch_size", batch_size), ("data.eval_batch_size", eval_batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{key}={value!r} must be a whole number >= 1", f"e.g. {key}=64")
    bounded = trainer_kwargs.get("max_steps", -1) not in (-1, None) or trainer_kwargs.get(
        "max_time"
    )
    valid_int = isinstance(max_epochs, int) and not isinstance(max_epochs, bool)
    if not (valid_int and max_epochs >= 1) and not (bounded and max_epochs in (-1, None)):
        raise ConfigError(
            f"trainer.max_epochs={max_epochs!r} must be a whole number >= 1 (epochs per "
            "experience; -1 only with +trainer.max_steps)",
            "e.g. trainer.max_epochs=1",
        )
    for key in trainer_kwargs:
        if key in OWN_TRAINER_OPTIONS:
            raise ConfigError(f"trainer.{key} is afmbench's to set", OWN_TRAINER_OPTIONS[key])
    strategy = trainer_kwargs.get("strategy")
    if isinstance(strategy, str) and any(w in strategy for w in ("spawn", "fork", "notebook")):
        raise ConfigError(
            f"trainer.strategy={strategy} starts new processes for every fit, and a continual run "
            "keeps its strategies' state from one experience's fit to the next",
            "use trainer.strategy=ddp (its processes live for the whole run)",
        )
    name = strategy if isinstance(strategy, str) else type(strategy).__name__
    if any(w in name.lower() for w in ("fsdp", "deepspeed", "model_parallel", "modelparallel")):
        raise ConfigError(
            f"trainer.strategy={name} shards the model or takes over its gradients, and "
            "afmbench's strategies read and update every parameter whole on every process",
            "use trainer.strategy=ddp",
        )


def check_trainer_options(trainer_kwargs: dict[str, Any]) -> None:
    """Let Lightning vet the ``trainer.*`` options (accelerator, devices, strategy, precision)
    on this machine before anything is written: one line instead of its traceback. Run where
    the job runs, not where a sweep is launched (a login node has no GPU)."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    try:
        bare_trainer(trainer_kwargs)
    except (MisconfigurationException, ValueError, TypeError, ImportError) as error:
        raise ConfigError(
            f"the trainer options do not work here: {first_line(error).rstrip(' .!')}",
            "change or remove the trainer option it names "
            "(trainer.accelerator=cpu where there is no GPU)",
        ) from None


def runs_plain_ddp(trainer_kwargs: dict[str, Any]) -> bool:
    """Whether Lightning runs these options under its plain DDP strategy: ``strategy=ddp``, or
    ``auto`` over several devices or nodes (where it picks DDP itself)."""
    strategy = trainer_kwargs.get("strategy", "auto")
    if strategy != "auto":
        return strategy == "ddp"
    if (
        trainer_kwargs.get("devices", "auto") in (1, "1")
        and trainer_kwargs.get("num_nodes", 1) == 1
    ):
        return False  # one process: nothing to ask Lightning
    from lightning.pytorch.strategies import DDPStrategy

    chosen = bare_trainer(trainer_kwargs).strategy
    if type(chosen) is not DDPStrategy:
        return False
    method = getattr(chosen, "_start_method", "popen")
    if method != "popen":  # an interactive session: Lightning forks or spawns
        raise ConfigError(
            f"several devices here make Lightning start DDP by {method}, a new set of processes "
            "for every fit, and a continual run keeps its strategies' state from one "
            "experience's fit to the next",
            "run afmbench from a script or the command line, or use trainer.devices=1",
        )
    return True


def bare_trainer(trainer_kwargs: dict[str, Any]) -> Trainer:
    """A silent Trainer of these options, writing nothing: what Lightning makes of them."""
    with LightningChatter(verbose=False):
        quiet = {"logger": False, "enable_checkpointing": False, "enable_progress_bar": False}
        return Trainer(**{**quiet, "enable_model_summary": False, **trainer_kwargs})


class Unprofiled(PassThroughProfiler):
    """Lightning's default profiler (which records nothing) without its cost: the loop wraps
    about 30 calls a training step in ``profiler.profile(...)``, and the default builds a
    generator-based context manager for each. One shared no-op context does the same."""

    # ~2 % of a small model's step (RESULTS.md: "Where a short run's time goes").
    _nothing = nullcontext()

    def profile(self, action_name: str) -> AbstractContextManager:
        return self._nothing


class LightningChatter:
    """Lightning announces the accelerator and a product tip for every ``Trainer``; a run makes
    one per experience. Show the announcement once (when verbose) and never the tip, nor the
    warnings that do not apply to this loop (evaluation is deliberately not part of ``fit``)."""

    name = "lightning.pytorch.utilities.rank_zero"
    silenced = (
        ".*`validation_step` but have no `val_dataloader`.*",
        ".*isinstance\\(treespec, LeafSpec\\)` is deprecated.*",
        ".*does not have many workers.*",
    )

    def __init__(self, verbose: bool) -> None:
        self.verbose = verbose
        self.logger = logging.getLogger(self.name)

    def __enter__(self) -> LightningChatter:
        self.level = self.logger.level
        self.logger.addFilter(self._no_tips)
        self.warnings = warnings.catch_warnings()
        self.warnings.__enter__()
        for pattern in self.silenced:
            warnings.filterwarnings("ignore", message=pattern)
        if not self.verbose:
            self.quiet()
        return self

    def quiet(self) -> None:
        self.logger.setLevel(logging.WARNING)

    def __exit__(self, *exc: object) -> None:
        self.warnings.__exit__(*exc)
        self.logger.setLevel(self.level)
        self.logger.removeFilter(self._no_tips)

    @staticmethod
    def _no_tips(record: logging.LogRecord) -> bool:
        return "Tip:" not in str(record.msg)
