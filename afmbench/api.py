"""``afmbench.run``: the Python entry point, and :func:`start`, the path both entry points share.

:func:`run` checks what a Python caller passes (the command line's checks live in
:mod:`afmbench.runner`); :func:`start` then gives the run its folder (locked, new or resumed),
its identity and its module, trains it with :class:`~afmbench.loop.ExperienceLoop` and adds
the finished run to the leaderboard.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
from lightning.pytorch.loggers import Logger

from afmbench.checkpoint import load_checkpoint
from afmbench.config import OptimizerConfig, save_config
from afmbench.errors import ConfigError, LeaderboardError
from afmbench.identity import config_hash, run_identity, strategy_label
from afmbench.leaderboard import record_run
from afmbench.loop import ExperienceLoop, LoopSettings
from afmbench.models import ContinualModel
from afmbench.module import ContinualModule
from afmbench.plugin import ContinualPlugin
from afmbench.reporting import RunReporter
from afmbench.resume import (
    AUTO,
    auto_resume,
    changes_since,
    check_same_config,
    find_checkpoint,
    finished_run,
    run_folder_of,
)
from afmbench.run_folder import owned
from afmbench.run_record import RunRecord, RunResult
from afmbench.scenarios.base import Scenario
from afmbench.trainers import check_loop_options, runs_plain_ddp


def run(
    scenario: Scenario,
    model: ContinualModel,
    plugins: Sequence[ContinualPlugin] = (),
    *,
    joint: bool = False,
    cumulative: bool = False,
    max_epochs: int = 1,
    batch_size: int = 32,
    eval_batch_size: int = 1024,
    optimizer: OptimizerConfig | None = None,
    seed: int = 0,
    run_dir: str | Path | None = None,
    trainer_kwargs: dict[str, Any] | None = None,
    logger: Logger | None = None,
    keep_checkpoints: bool = False,
    figures: bool = False,
    resume: bool | str | Path = False,
    leaderboard: str | Path | None = None,
    verbose: bool = True,
    augment: str | None = None,
    resident: bool | None = None,
    pass_memory_mb: float = 256.0,
    pass_precision: str = "32-true",
) -> RunResult:
    """Train ``model`` on ``scenario`` with ``plugins`` and return the accuracy matrix and metrics.

    ``joint=True`` trains once on all experiences' data (the upper bound); ``cumulative=True``
    trains each experience on its own data and that of every earlier one. With ``run_dir``
    set, the run folder is written as the run goes (``figures=True`` draws its PNGs at the end).
    ``resume=True`` (or a run folder /
    checkpoint path) continues an interrupted run after its last complete experience; the
    result equals that of an uninterrupted run. ``resume="auto"`` keeps a finished run in
    ``run_dir``, continues an interrupted one, and otherwise starts afresh. A finished run is added to the SQLite
    ``leaderboard`` file when one is given. ``augment="crop_flip"`` augments training batches;
    ``resident`` holds each experience's data on the device (None: on CUDA devices only);
    ``pass_memory_mb`` bounds the working memory of per-sample importance passes, and
    ``pass_precision="bf16-mixed"`` runs them under bfloat16 autocast.
    """
    plugins = check_inputs(scenario, model, plugins)
    if not isinstance(figures, bool):
        raise ConfigError(f"figures must be True or False, got {figures!r}", "e.g. figures=True")
    trainer_kwargs = {"max_epochs": max_epochs, **(trainer_kwargs or {})}
    check_loop_options(max_epochs, batch_size, eval_batch_size, trainer_kwargs)
    settings = LoopSettings(joint, cumulative, batch_size, eval_batch_size, seed, trainer_kwargs,
                            verbose, augment, resident, float(pass_memory_mb),
                            pass_precision)  # fmt: skip
    return start(
        scenario, model, plugins, settings, optimizer or OptimizerConfig(), run_dir,
        lambda _folder: logger, resume=resume, leaderboard=leaderboard,
        keep_checkpoints=keep_checkpoints, figures=figures,
    )  # fmt: skip


def start(
    scenario: Scenario,
    model: ContinualModel,
    plugins: list[ContinualPlugin],
    settings: LoopSettings,
    optimizer: OptimizerConfig,
    run_dir: str | Path | None,
    make_logger: Callable[[Path | None], Logger | None],
    *,
    resume: bool | str | Path = False,
    leaderboard: str | Path | None = None,
    keep_checkpoints: bool = False,
    figures: bool = False,
    config: dict[str, Any] | None = None,
) -> RunResult:
    """Run checked inputs end to end. ``config`` is the command line's resolved configuration
    (kept as ``config.yaml`` and logged as the hyperparameters)."""
    identity = run_identity(scenario, model, plugins, settings.joint, optimizer,
                            settings.batch_size, settings.trainer_kwargs, settings.augment,
                            settings.pass_precision, settings.cumulative)  # fmt: skip
    record = {
        "scenario": scenario.name,
        "protocol": scenario.protocol,
        "strategy": strategy_label(plugins, settings.joint, settings.cumulative),
        "forgetting_layer": any(getattr(p, "is_forgetting_layer", False) for p in plugins),
        "seed": settings.seed,
        "model": identity["model"].get("name", type(model).__name__),
        "config_hash": config_hash(identity),
        **({"config": config} if config is not None else {}),
    }
    auto = resume == AUTO
    if auto and run_dir is None:
        raise ConfigError("resume=auto needs a run folder", "pass run_dir=PATH")
    resume_from = None
    if resume and not auto:
        resume_from = find_checkpoint(resume, Path(run_dir) if run_dir else None)
        run_dir = run_dir if run_dir is not None else run_folder_of(resume_from)
    with owned(run_dir, new_run=not resume) if run_dir is not None else nullcontext() as folder:
        if auto and (found := auto_resume(folder)) == "finished":
            return skip_finished(folder, record["config_hash"], leaderboard, settings.verbose)
        if auto and found:
            resume_from = find_checkpoint(True, folder)
        state = None
        if resume_from is not None:  # checked before anything in the run's folder is rewritten
            state = load_checkpoint(resume_from)
            changes = changes_since(run_folder_of(resume_from), config)
            check_same_config(state["afmbench"], resume_from, record["config_hash"], changes)
        if config is not None and folder is not None:
            save_config(config, folder / "config.yaml")
        for plugin in plugins:
            plugin.prepare(model)
        steps = 1 if settings.joint else scenario.n_experiences
        module = ContinualModule(model, scenario.n_experiences, steps + 1, optimizer,
                                 validation=bool(getattr(scenario, "validation_fraction", 0)))  # fmt: skip
        if scenario.multi_head and runs_plain_ddp(settings.trainer_kwargs):
            # Only the current task's head takes part in a step; DDP must be told to expect that.
            settings.trainer_kwargs["strategy"] = "ddp_find_unused_parameters_true"
        logger = make_logger(folder)
        book = RunRecord(
            record, folder, keep_checkpoints, RunReporter(folder, logger, settings.joint, figures)
        )
        loop = ExperienceLoop(scenario, module, plugins, settings, book, logger)
        result = loop.train(state, resume_from)
        if leaderboard is not None and loop.is_global_zero:
            add_to_leaderboard(leaderboard, result.metrics, folder)
        return result


def skip_finished(
    folder: Path, config_hash: str, leaderboard: str | Path | None, verbose: bool
) -> RunResult:
    """``resume=auto`` on a finished run: keep it, and make sure the leaderboard has it."""
    metrics = finished_run(folder, config_hash)
    if verbose:
        print(f"afmbench: {folder} has finished already: kept (resume=auto)", flush=True)
    if leaderboard is not None:
        add_to_leaderboard(leaderboard, metrics, folder)
    matrix = np.asarray(metrics["accuracy_matrix"])
    return RunResult(matrix, np.asarray(metrics["baseline_accuracy"]), metrics, folder)


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
    check_plugin_names(plugins)
    return plugins


def check_plugin_names(plugins: Sequence[ContinualPlugin]) -> None:
    """Penalties, logs and checkpoints are keyed by a plugin's name: two may not share one."""
    names = [p.name for p in plugins]
    if len(set(names)) != len(names):
        raise ConfigError(
            f"two plugins share the name '{max(names, key=names.count)}' (penalties, logs and "
            "checkpoints are keyed by name)",
            "stack different strategies, or subclass one and give it its own `name`",
        )


def add_to_leaderboard(db: str | Path, metrics: dict[str, Any], folder: Path | None) -> None:
    """Record the finished run; if the leaderboard refuses, say that the results are kept
    and how to add them later."""
    try:
        record_run(db, metrics, folder)
    except LeaderboardError as error:
        if folder is None:
            raise
        raise LeaderboardError(
            f"{error.problem} (the run finished; its results are kept in {folder})",
            "move that file away (or choose another with --db PATH), then add the run: "
            f"afmbench leaderboard --add {folder}",
        ) from error
