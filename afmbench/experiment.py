"""The experience loop: train on each experience in turn, evaluate on every task after each.

:func:`run` is the whole pipeline for Python users; the CLI builds its arguments from a config
(:mod:`afmbench.runner`). One :class:`ContinualModule` lives through the sequence; every
experience gets a fresh Lightning ``Trainer`` (so ``max_epochs`` counts per experience) that
shares the plugins and the logger. After each experience the run folder is brought up to
date (accuracy matrix so far, metrics, a checkpoint), so an interrupted run loses at most the
experience in progress.
"""

from __future__ import annotations

import hashlib
import logging
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.profilers import PassThroughProfiler

from afmbench.checkpoint import (
    checkpoint_path,
    find_checkpoint,
    load_checkpoint,
    restore,
    run_folder_of,
)
from afmbench.config import NON_IDENTITY_KEYS, OptimizerConfig
from afmbench.errors import (
    AfmbenchError,
    AfmbenchWarning,
    ConfigError,
    Interrupted,
    LeaderboardError,
    first_line,
)
from afmbench.leaderboard import record_run
from afmbench.loader import TensorLoader
from afmbench.metrics import summarize
from afmbench.models import ContinualModel
from afmbench.module import ContinualModule
from afmbench.plugin import ContinualPlugin
from afmbench.progress import ExperienceProgressBar
from afmbench.reporting import RunReporter
from afmbench.results import (
    check_new_run_dir,
    format_report,
    prepare_run_dir,
    versions,
    write_json,
    write_matrix_csv,
)
from afmbench.scenarios.base import Scenario

log = logging.getLogger("afmbench")


@dataclass
class RunResult:
    """What a run produced. ``accuracy_matrix`` has one row per trained experience."""

    accuracy_matrix: np.ndarray
    baseline_accuracy: np.ndarray
    metrics: dict[str, Any]
    run_dir: Path | None = None
    module: ContinualModule | None = field(default=None, repr=False)

    def report(self) -> str:
        return format_report(self.accuracy_matrix, self.metrics)


class Unprofiled(PassThroughProfiler):
    """Lightning's default profiler (which records nothing) without its cost: the loop wraps
    about 30 calls a training step in ``profiler.profile(...)``, and the default builds a
    generator-based context manager for each. One shared no-op context does the same."""

    _nothing = nullcontext()

    def profile(self, action_name: str) -> AbstractContextManager:
        return self._nothing


def experience_seed(seed: int, step: int) -> int:
    """The seed of training step ``step``: each experience's randomness depends only on
    ``(seed, step)``, so a resumed run continues exactly as an uninterrupted one."""
    return (seed * 1_000_003 + 7919 * (step + 1)) % (2**31 - 1)


def run(
    scenario: Scenario,
    model: ContinualModel,
    plugins: Sequence[ContinualPlugin] = (),
    *,
    joint: bool = False,
    max_epochs: int = 1,
    batch_size: int = 32,
    eval_batch_size: int = 1024,
    optimizer: OptimizerConfig | None = None,
    seed: int = 0,
    run_dir: str | Path | None = None,
    trainer_kwargs: dict[str, Any] | None = None,
    logger: Logger | None = None,
    record: dict[str, Any] | None = None,
    keep_checkpoints: bool = False,
    resume: bool | str | Path = False,
    leaderboard: str | Path | None = None,
    verbose: bool = True,
) -> RunResult:
    """Train ``model`` on ``scenario`` with ``plugins`` and return the accuracy matrix and metrics.

    ``joint=True`` trains once on all experiences' data (the upper bound). ``record`` adds
    identity fields (strategy name, config, config hash) to ``metrics.json``; the defaults
    describe a Python-API run. With ``run_dir`` set, the run folder is written as the run goes.
    ``resume=True`` (or a run folder / checkpoint path) continues an interrupted run after its
    last complete experience; the result equals that of an uninterrupted run. A finished run
    is added to the SQLite ``leaderboard`` file when one is given.
    """
    plugins = check_inputs(scenario, model, plugins)
    check_loop_options(max_epochs, batch_size, eval_batch_size, trainer_kwargs or {})
    names = [p.name for p in plugins]
    if len(set(names)) != len(names):
        raise ConfigError(
            f"two plugins share the name '{max(names, key=names.count)}' (penalties, logs and "
            "checkpoints are keyed by name)",
            "stack different strategies, or subclass one and give it its own `name`",
        )
    for plugin in plugins:
        plugin.prepare(model)
    steps = 1 if joint else scenario.n_experiences
    module = ContinualModule(model, scenario.n_experiences, steps + 1, optimizer)
    trainer_kwargs = {"max_epochs": max_epochs, **(trainer_kwargs or {})}
    settings = (module.optimizer_config, batch_size, trainer_kwargs)
    record = {**default_record(scenario, model, plugins, joint, seed, settings), **(record or {})}
    resume_from = find_checkpoint(resume, Path(run_dir) if run_dir else None) if resume else None
    if resume_from is not None and run_dir is None:
        run_dir = run_folder_of(resume_from)
    if run_dir is not None and resume_from is None:
        check_new_run_dir(run_dir)
    folder = prepare_run_dir(run_dir) if run_dir is not None else None
    if scenario.multi_head and _runs_plain_ddp(trainer_kwargs):
        # Only the current task's head takes part in a step; DDP must be told to expect that.
        trainer_kwargs["strategy"] = "ddp_find_unused_parameters_true"
    tests = [TensorLoader(scenario.test(j), eval_batch_size) for j in range(scenario.n_experiences)]
    progress = ExperienceProgressBar(steps)

    def make_trainer(batches: int | None = None) -> Trainer:
        """A Trainer for one ``fit`` over ``batches`` batches an epoch (None: evaluation only)."""
        kwargs = {
            "enable_progress_bar": verbose,
            "enable_model_summary": False,
            "log_every_n_steps": 10,
        }
        kwargs.update(trainer_kwargs)
        kwargs.setdefault("profiler", Unprofiled())
        if batches and kwargs["log_every_n_steps"] > batches:
            # log at least once an epoch, rather than Lightning warning every experience
            # that a short epoch (the digits' default: 8 batches) logs nothing
            kwargs["log_every_n_steps"] = batches
        bar = [progress] if kwargs["enable_progress_bar"] else []
        return Trainer(
            logger=logger if logger is not None else False,
            callbacks=[*plugins, *bar],
            enable_checkpointing=False,
            num_sanity_val_steps=0,
            use_distributed_sampler=False,
            default_root_dir=str(folder) if folder else None,
            **kwargs,
        )

    state = _RunState(
        record, folder, keep_checkpoints, RunReporter(folder, logger, joint), leaderboard
    )

    def learn(step: int) -> None:
        """Train experience ``step``, evaluate every task, and bring the run folder up to date
        (``trainer`` is then this experience's: the last one reports, or is interrupted)."""
        nonlocal trainer
        split = scenario.joint_train() if joint else scenario.train(step)
        module.experience = step
        module.task_id = _task_argument(scenario, step, joint)
        module.train_split = split
        seed_everything(experience_seed(seed, step), verbose=False)
        loader = TensorLoader(split, batch_size, shuffle=True, seed=experience_seed(seed, step))
        trainer = make_trainer(len(loader))
        started = time.perf_counter()
        trainer.fit(module, train_dataloaders=loader)
        state.train_s.append(time.perf_counter() - started)
        state.logged_steps += trainer.global_step
        if hasattr(logger, "step_offset"):
            logger.step_offset = state.logged_steps
        started = time.perf_counter()
        row = _evaluate(trainer, module, tests, row=step + 1)
        state.eval_s.append(time.perf_counter() - started)
        if not joint and trainer.is_global_zero:
            _warn_if_unlearned(step, steps, row[step], state.baseline[step], module, max_epochs)
        state.save(module, trainer, step)
        state.report(module, trainer, step, plugins, state.logged_steps)
        if verbose and trainer.is_global_zero:
            shown = " ".join(f"{a:.3f}" for a in row)
            print(f"after experience {step + 1}/{steps}: accuracy per task [{shown}]", flush=True)

    with _LightningChatter(verbose) as chatter, _finishing(logger, verbose):
        trainer = make_trainer()
        chatter.quiet()
        if resume_from is not None:
            state.resume(load_checkpoint(resume_from), resume_from, module, plugins)
            if hasattr(logger, "continue_from"):  # before anything is logged
                logger.continue_from(state.logged_steps)
        if logger is not None:
            logger.log_hyperparams(
                record.get("config") or {k: v for k, v in record.items() if k != "config"}
            )
        if resume_from is not None:
            if verbose and trainer.is_global_zero:
                print(f"resuming after experience {len(state.train_s)}/{steps} from {resume_from}")
        else:
            seed_everything(experience_seed(seed, -1), verbose=False)
            _evaluate(trainer, module, tests, row=0)
            state.baseline = module.accuracy.compute()[0].cpu().numpy()
        try:
            for step in range(len(state.train_s), steps):
                learn(step)
        except (KeyboardInterrupt, SystemExit) as stop:
            # Lightning answers Ctrl-C inside fit or validate with SystemExit(1) after marking
            # the trainer interrupted (and ignores further Ctrl-C while we record it)
            if isinstance(stop, SystemExit) and not trainer.interrupted:
                raise
            raise state.interrupted(module, trainer, steps) from None
        except Exception as error:  # a diverged loss, a damaged cache file, a full disk, a bug
            state.fail(module, error, trainer)
            raise
        return state.finish(module, trainer, verbose)


def check_inputs(scenario: Any, model: Any, plugins: Any) -> list[ContinualPlugin]:
    """``run``'s first three arguments, or a one-line :class:`ConfigError` naming the mix-up.
    A scenario may be any object with a Scenario's interface (a wrapper that subsamples)."""
    if not all(hasattr(scenario, a) for a in ("n_experiences", "train", "test", "head_sizes")):
        raise ConfigError(
            f"scenario must be a Scenario, got {type(scenario).__name__}",
            "build it with afmbench.build_scenario(name, ...) or Scenario.from_tensors(...)",
        )
    if not isinstance(model, ContinualModel):
        raise ConfigError(
            f"model must be a ContinualModel (head(body(x), task)), got {type(model).__name__}",
            "build it with afmbench.build_model(name, scenario.input_shape, scenario.head_sizes)"
            " or wrap your layers as ContinualModel(body, MultiHead(...))",
        )
    if isinstance(plugins, ContinualPlugin):
        raise ConfigError("plugins must be a list", f"pass [{type(plugins).__name__}(...)]")
    plugins = list(plugins)
    for plugin in plugins:
        if isinstance(plugin, type) and issubclass(plugin, ContinualPlugin):
            raise ConfigError(
                f"plugin {plugin.__name__} is a class", f"pass an instance: {plugin.__name__}()"
            )
        if not isinstance(plugin, ContinualPlugin):
            raise ConfigError(
                f"plugin {plugin!r} is a {type(plugin).__name__}, not a ContinualPlugin",
                "pass instances such as afmbench.strategies.EWC(lambda_=100.0)",
            )
    return plugins


def check_loop_options(
    max_epochs: Any, batch_size: Any, eval_batch_size: Any, trainer_kwargs: dict[str, Any]
) -> None:
    """Sizes that would train nothing, forever, or crash deep in a loader."""
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
    check_own_trainer_options(trainer_kwargs)


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


def check_own_trainer_options(trainer_kwargs: dict[str, Any]) -> None:
    """Refuse, in one line, a Trainer option that afmbench sets itself (Lightning would fail
    with a duplicate keyword) or that would change what a run measures."""
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


def _runs_plain_ddp(trainer_kwargs: dict[str, Any]) -> bool:
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

    chosen = _bare_trainer(trainer_kwargs).strategy
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


def check_trainer_options(trainer_kwargs: dict[str, Any]) -> None:
    """Let Lightning vet the ``trainer.*`` options (accelerator, devices, strategy, precision)
    on this machine before anything is written: one line instead of its traceback. Run where
    the job runs, not where a sweep is launched (a login node has no GPU)."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    try:
        _bare_trainer(trainer_kwargs)
    except (MisconfigurationException, ValueError, TypeError, ImportError) as error:
        raise ConfigError(
            f"the trainer options do not work here: {first_line(error).rstrip(' .!')}",
            "change or remove the trainer option it names "
            "(trainer.accelerator=cpu where there is no GPU)",
        ) from None


def _bare_trainer(trainer_kwargs: dict[str, Any]) -> Trainer:
    """A silent Trainer of these options, writing nothing: what Lightning makes of them."""
    with _LightningChatter(verbose=False):
        quiet = {"logger": False, "enable_checkpointing": False, "enable_progress_bar": False}
        return Trainer(**{**quiet, "enable_model_summary": False, **trainer_kwargs})


def strategy_label(plugins: Sequence[ContinualPlugin], joint: bool) -> str:
    """The strategy a run records: ``joint``, else its strategies' names joined by ``+``
    (``ewc+si``; the forgetting layer is recorded apart), or ``naive`` when there are none."""
    names = [p.name for p in plugins if not getattr(p, "is_forgetting_layer", False)]
    return "joint" if joint else "+".join(names) or "naive"


def default_record(
    scenario: Scenario,
    model: ContinualModel,
    plugins: Sequence[ContinualPlugin],
    joint: bool,
    seed: int,
    settings: tuple[OptimizerConfig, int, dict[str, Any]],
) -> dict[str, Any]:
    """Identity fields of a run started from Python (the CLI passes its own).

    The config hash covers what the run computes, as the CLI's does: the scenario, the model's
    architecture, the plugins' settings, the optimizer, the batch size and the trainer options
    (not the seed, nor where it runs). Runs that share it are one configuration on the
    leaderboard, and a resumed run must match it.
    """
    optimizer, batch_size, trainer_kwargs = settings
    placement = {k.split(".", 1)[1] for k in NON_IDENTITY_KEYS if k.startswith("trainer.")}
    ident = {  # the scenario's seed varies with the run's, as scenario.seed=${seed} in the CLI
        "scenario": {k: v for k, v in scenario.params.items() if k != "seed"},
        "model": repr(model),
        "plugins": [repr(p) for p in plugins],
        "joint": joint,
        "optimizer": repr(optimizer),
        "batch_size": batch_size,
        "trainer": sorted((k, repr(v)) for k, v in trainer_kwargs.items() if k not in placement),
    }
    return {
        "scenario": scenario.name,
        "protocol": scenario.protocol,
        "strategy": strategy_label(plugins, joint),
        "forgetting_layer": any(getattr(p, "is_forgetting_layer", False) for p in plugins),
        "seed": seed,
        "config_hash": hashlib.sha256(repr(ident).encode()).hexdigest()[:12],
    }


def _task_argument(scenario: Scenario, step: int, joint: bool) -> int | None:
    """The head to train: the experience's task label, or None (per sample) for joint task-IL."""
    if not scenario.multi_head:
        return 0
    return None if joint else scenario.task_ids[step]


# An experience's own task must end at least this far above the untrained model's accuracy.
UNLEARNED_MARGIN = 0.02


def _warn_if_unlearned(
    step: int, steps: int, accuracy: float, untrained: float, module: ContinualModule, epochs: int
) -> None:
    """Say so when an experience left its own task at the untrained model's accuracy: a
    diverged or stalled optimizer otherwise shows only as a poor ACC at the end."""
    if accuracy > untrained + UNLEARNED_MARGIN:
        return
    warnings.warn(
        f"experience {step + 1}/{steps} learned nothing: accuracy {accuracy:.3f} on its own "
        f"task, {untrained:.3f} untrained; check optimizer.lr={module.optimizer_config.lr:g} "
        f"(too high diverges, too low stalls) and trainer.max_epochs={epochs}",
        AfmbenchWarning,
        stacklevel=2,
    )


def _evaluate(trainer: Trainer, module: ContinualModule, tests: list[TensorLoader], row: int):
    module.eval_row = row
    trainer.validate(module, dataloaders=tests, verbose=False)
    return module.accuracy.compute()[row].cpu().numpy()


@dataclass
class _RunState:
    """Bookkeeping of one run and the files it keeps current in the run folder."""

    record: dict[str, Any]
    folder: Path | None
    keep_checkpoints: bool
    reporter: RunReporter
    leaderboard: str | Path | None = None
    baseline: np.ndarray | None = None
    logged_steps: int = 0  # training steps of the finished experiences (loggers' step axis)
    train_s: list[float] = field(default_factory=list)
    eval_s: list[float] = field(default_factory=list)

    def metrics(self, module: ContinualModule, status: str, error: str | None = None):
        done = len(self.train_s)
        matrix = module.accuracy.compute()[1 : done + 1].cpu().numpy()
        summary = summarize(matrix, self.baseline) if done else {}
        metrics = {
            **self.record,
            "status": status,
            "error": error,
            "experiences_done": done,
            "accuracy_matrix": matrix,
            "baseline_accuracy": self.baseline,
            **summary,
            "train_time_s": float(sum(self.train_s)),
            "eval_time_s": float(sum(self.eval_s)),
            "timings": {"train_s": self.train_s, "eval_s": self.eval_s},
            "versions": versions(),
        }
        return matrix, metrics

    def resume(self, ckpt: dict[str, Any], path: Path, module: ContinualModule, plugins) -> None:
        loop = restore(ckpt, path, module, plugins, self.record["config_hash"])
        self.baseline = np.asarray(loop["baseline"])
        self.train_s, self.eval_s = list(loop["train_s"]), list(loop["eval_s"])
        self.logged_steps = int(loop.get("logged_steps", 0))  # 0: a checkpoint older than it

    def save(self, module: ContinualModule, trainer: Trainer, step: int) -> None:
        """After an experience: checkpoint, then the matrix and metrics so far (rank 0 writes)."""
        matrix, metrics = self.metrics(module, "running")
        if self.folder is None:
            return
        module.loop_state = {
            "step": step,
            "config_hash": self.record["config_hash"],
            "baseline": self.baseline,
            "train_s": self.train_s,
            "eval_s": self.eval_s,
            "logged_steps": self.logged_steps,
        }
        path = checkpoint_path(self.folder, step)
        checkpoints = path.parent
        tmp = checkpoints / f".experience_{step}.ckpt.tmp"
        trainer.save_checkpoint(tmp, weights_only=False)
        if trainer.is_global_zero:
            tmp.replace(path)
            if not self.keep_checkpoints:
                for old in checkpoints.glob("experience_*.ckpt"):
                    if old != path:
                        old.unlink()
            write_matrix_csv(
                self.folder / "accuracy_matrix.csv", matrix, self.record["strategy"] == "joint"
            )
            write_json(self.folder / "metrics.json", metrics)
        trainer.strategy.barrier()

    def report(
        self, module: ContinualModule, trainer: Trainer, step: int, plugins, global_step: int
    ) -> None:
        """Experience-level results to W&B (rank 0 only; importances agree on every rank)."""
        if trainer.is_global_zero:
            matrix = module.accuracy.compute()[1 : step + 2].cpu().numpy()
            curve = [float(np.mean(matrix[i, : i + 1])) for i in range(len(matrix))]
            self.reporter.after_experience(step, matrix, curve, plugins, global_step)

    def fail(
        self,
        module: ContinualModule,
        error: Exception,
        trainer: Trainer,
        status: str = "failed",
    ) -> None:
        """Record a failed (or interrupted) run without touching what earlier experiences wrote.
        Best effort: the error that stopped the run (a full disk, say) is the one to report."""
        if self.folder is None or not trainer.is_global_zero:
            return
        message = (
            str(error) if isinstance(error, AfmbenchError) else f"{type(error).__name__}: {error}"
        )
        try:
            _, metrics = self.metrics(module, status, message)
            write_json(self.folder / "metrics.json", metrics)
        except Exception as unrecorded:
            log.warning("could not record the run as %s: %s", status, unrecorded)

    def interrupted(self, module: ContinualModule, trainer: Trainer, steps: int) -> Interrupted:
        """Record a run stopped by Ctrl-C (status ``interrupted``) and say how to continue."""
        done = len(self.train_s)
        problem = f"interrupted during experience {done + 1}/{steps}"
        if done and self.folder is not None:
            resume = f"continue with: afmbench run resume={self.folder}"
            error = Interrupted(f"{problem}; the {done} finished are kept", resume)
        else:  # no checkpoint to resume from
            error = Interrupted(problem, "run it again")
        self.fail(module, error, trainer, status="interrupted")
        return error

    def finish(self, module: ContinualModule, trainer: Trainer, verbose: bool) -> RunResult:
        matrix, metrics = self.metrics(module, "finished")
        if trainer.is_global_zero:
            metrics.update(self.reporter.finish(metrics, matrix))
            if self.folder is not None:
                write_matrix_csv(
                    self.folder / "accuracy_matrix.csv", matrix, self.record["strategy"] == "joint"
                )
                write_json(self.folder / "metrics.json", metrics)
        result = RunResult(matrix, self.baseline, metrics, self.folder, module)
        if verbose and trainer.is_global_zero:
            print(result.report(), flush=True)
        if self.leaderboard is not None and trainer.is_global_zero:
            self.add_to_leaderboard(metrics)
        return result

    def add_to_leaderboard(self, metrics: dict[str, Any]) -> None:
        """Record the finished run; if the leaderboard refuses, say that the results are kept
        and how to add them later."""
        try:
            record_run(self.leaderboard, metrics, self.folder)
        except LeaderboardError as error:
            if self.folder is None:
                raise
            raise LeaderboardError(
                f"{error.problem} (the run finished; its results are kept in {self.folder})",
                "move that file away (or choose another with --db PATH), then add the run: "
                f"afmbench leaderboard --add {self.folder}",
            ) from error


@contextmanager
def _finishing(logger: Logger | None, verbose: bool) -> Iterator[None]:
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


class _LightningChatter:
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

    def __enter__(self) -> _LightningChatter:
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
